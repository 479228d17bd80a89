"""Training losses that compute logits only where a label exists.

The models' `forward(..., labels=...)` returns these losses (nanoGPT's `forward(idx, targets)`); the label shifts of
both model kinds live here. The vocabulary projection is a large share of a small model's work (a fifth of
SmolLM2-135M's); in instruction tuning only the answer tokens carry loss, so projecting just those positions saves
most of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..labels import IGNORE_INDEX
from .layers import segment_positions


def next_token_labels(
    labels: torch.Tensor, loss_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decoder-only label shift: position t predicts token t+1 (the reference implementation's loss).

    Args:
        labels: (B, T) target ids aligned with the input ids, -100 where no loss is taken.
        loss_weights: optional (B, T) float weights aligned with `labels`.
    Returns:
        the labels and weights each position predicts, (B, T): shifted left by one, -100 (weight 0) at the end.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]  # (B, T)
    if loss_weights is None:
        return targets, None
    weights = torch.zeros_like(loss_weights)
    weights[:, :-1] = loss_weights[:, 1:]  # (B, T)
    return targets, weights


def decoder_inputs_from_labels(
    labels: torch.Tensor, start_id: int, pad_id: int, decoder_segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """The encoder-decoder label shift: the decoder reads the labels shifted right behind `start_id`, with -100
    replaced by `pad_id`, as the reference implementation builds them (in a packed row, each segment starts again
    from `start_id`).

    Args:
        labels: (B, T) target ids, -100 where no loss is taken.
        start_id, pad_id: the config's `decoder_start_token_id` and `pad_token_id`.
        decoder_segment_ids: optional (B, T) segment ids of packed rows.
    Returns:
        (B, T) decoder input ids.
    """
    decoder_input_ids = torch.full_like(labels, start_id)
    decoder_input_ids[:, 1:] = labels[:, :-1]
    if decoder_segment_ids is not None:
        starts = segment_positions(decoder_segment_ids) == 0  # (B, T) first token of each segment
        decoder_input_ids = decoder_input_ids.masked_fill(starts, start_id)
    return decoder_input_ids.masked_fill(decoder_input_ids == IGNORE_INDEX, pad_id)


def labelled_cross_entropy(
    project: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    labels: torch.Tensor,
    loss_weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the positions whose label is not -100, projecting only their hidden states to logits.

    Args:
        project: hidden states (N, H) -> logits (N, V) (the model's `lm_head`).
        hidden: (B, T, H) final hidden states.
        labels: (B, T) the label each position predicts (already shifted), -100 where no loss is taken.
        loss_weights: optional (B, T) float: each label's loss is multiplied by its weight before the reduction
            (`ecellm.data.label_weights`: 1/answer tokens of its example for per-example averaging).
        reduction: "mean" over labelled tokens, or "sum" (for averaging across micro-batches and ranks).
    Returns:
        a scalar fp32 loss.
    """
    positions = labels != IGNORE_INDEX  # (B, T)
    logits = project(hidden[positions])  # (N, V) labelled positions only
    losses = F.cross_entropy(logits.float(), labels[positions], reduction="none")  # (N,)
    if loss_weights is not None:
        losses = losses * loss_weights[positions]
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
