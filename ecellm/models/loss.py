"""Training losses that compute logits only where a label exists.

The vocabulary projection is a large share of a small model's work (a fifth of SmolLM2-135M's); in instruction
tuning only the answer tokens carry loss, so projecting just those positions saves most of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import segment_positions

IGNORE_INDEX = -100


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    *,
    weights: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of a decoder-only model over the positions whose label is not -100.

    Equal to the reference implementation's loss (labels shifted left by one inside), but the `lm_head` runs only on
    the hidden states that predict a label. It calls the model's `forward`, so FSDP's hooks run as usual.

    Args:
        model: a decoder-only ecellm model (its forward takes `positions`).
        input_ids: (B, T) token ids.
        labels: (B, T) target ids aligned with `input_ids`, -100 where no loss is taken.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        reduction: "mean" over labelled tokens, or "sum" (for averaging across micro-batches and ranks).
        weights: optional (B, T) float, aligned with `labels`: each label's loss is multiplied by its weight before
            the reduction (`ecellm.data.label_weights`: 1/answer tokens of its example for per-example averaging).
        segment_ids: optional (B, T) for packed rows (see the models' `forward`); the first label of each segment
            must be -100, so no position predicts across a boundary.
    Returns:
        a scalar fp32 loss.
    """
    targets = labels[:, 1:]  # position t predicts token t+1
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = targets != IGNORE_INDEX  # (B, T): positions whose next token is labelled
    logits = model(input_ids, attention_mask, positions=positions, segment_ids=segment_ids)  # (N, V) labelled only
    losses = F.cross_entropy(logits.float(), targets[positions[:, :-1]], reduction="none")  # (N,)
    if weights is not None:
        losses = losses * weights[:, 1:][positions[:, :-1]]
    return _reduce(losses, reduction)


def seq2seq_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    reduction: str = "mean",
    *,
    weights: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    decoder_segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of an encoder-decoder model (T5) over the target tokens whose label is not -100.

    The decoder reads the labels shifted right behind `config.decoder_start_token_id`, with -100 replaced by
    `config.pad_token_id`, as the reference implementation builds them (in a packed row, each segment starts again
    from the start token); `lm_head` runs only on labelled positions.

    Args:
        model: an ecellm encoder-decoder model (its forward takes `decoder_input_ids` and `positions`).
        input_ids: (B, Te) encoder token ids.
        attention_mask: (B, Te) 1 for real encoder tokens, 0 for padding; None means no padding.
        labels: (B, T) target ids, -100 where no loss is taken.
        reduction: "mean" over labelled tokens, or "sum".
        weights: optional (B, T) float per-label weights, as in `causal_lm_loss`.
        segment_ids, decoder_segment_ids: optional (B, Te) and (B, T) for packed rows: decoder segment i reads
            encoder segment i (see `T5ForConditionalGeneration.forward`).
    Returns:
        a scalar fp32 loss.
    """
    c = model.config
    decoder_input_ids = torch.full_like(labels, c.decoder_start_token_id)
    decoder_input_ids[:, 1:] = labels[:, :-1]
    if decoder_segment_ids is not None:
        starts = segment_positions(decoder_segment_ids) == 0  # (B, T) first token of each segment
        decoder_input_ids = decoder_input_ids.masked_fill(starts, c.decoder_start_token_id)
    decoder_input_ids = decoder_input_ids.masked_fill(decoder_input_ids == IGNORE_INDEX, c.pad_token_id)
    positions = labels != IGNORE_INDEX  # (B, T)
    logits = model(
        input_ids, decoder_input_ids, attention_mask, positions=positions,
        segment_ids=segment_ids, decoder_segment_ids=decoder_segment_ids,
    )  # (N, V)
    losses = F.cross_entropy(logits.float(), labels[positions], reduction="none")  # (N,)
    if weights is not None:
        losses = losses * weights[positions]
    return _reduce(losses, reduction)


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
