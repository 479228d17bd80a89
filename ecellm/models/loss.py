"""Training losses that compute logits only where a label exists.

The vocabulary projection is a large share of a small model's work (a fifth of SmolLM2-135M's); in instruction
tuning only the answer tokens carry loss, so projecting just those positions saves most of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy of a decoder-only model over the positions whose label is not -100.

    Equal to the reference implementation's loss (labels shifted left by one inside), but the `lm_head` runs only on
    the hidden states that predict a label. It calls the model's `forward`, so FSDP's hooks run as usual.

    Args:
        model: a decoder-only ecellm model (its forward takes `positions`).
        input_ids: (B, T) token ids.
        labels: (B, T) target ids aligned with `input_ids`, -100 where no loss is taken.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        reduction: "mean" over labelled tokens, or "sum" (for token-weighted averaging across micro-batches and ranks).
    Returns:
        a scalar fp32 loss.
    """
    targets = labels[:, 1:]  # position t predicts token t+1
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = targets != IGNORE_INDEX  # (B, T): positions whose next token is labelled
    logits = model(input_ids, attention_mask, positions=positions)  # (N, V) for the N labelled positions only
    return F.cross_entropy(logits.float(), targets[positions[:, :-1]], reduction=reduction)


def seq2seq_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of an encoder-decoder model (T5) over the target tokens whose label is not -100.

    The decoder reads the labels shifted right behind `config.decoder_start_token_id`, with -100 replaced by
    `config.pad_token_id`, as the reference implementation builds them; `lm_head` runs only on labelled positions.

    Args:
        model: an ecellm encoder-decoder model (its forward takes `decoder_input_ids` and `positions`).
        input_ids: (B, Te) encoder token ids.
        attention_mask: (B, Te) 1 for real encoder tokens, 0 for padding; None means no padding.
        labels: (B, T) target ids, -100 where no loss is taken.
        reduction: "mean" over labelled tokens, or "sum".
    Returns:
        a scalar fp32 loss.
    """
    c = model.config
    decoder_input_ids = torch.full_like(labels, c.decoder_start_token_id)
    decoder_input_ids[:, 1:] = labels[:, :-1]
    decoder_input_ids = decoder_input_ids.masked_fill(decoder_input_ids == IGNORE_INDEX, c.pad_token_id)
    positions = labels != IGNORE_INDEX  # (B, T)
    logits = model(input_ids, decoder_input_ids, attention_mask, positions=positions)  # (N, V)
    return F.cross_entropy(logits.float(), labels[positions], reduction=reduction)
