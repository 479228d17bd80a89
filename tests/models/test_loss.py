"""`model(input_ids, attention_mask, labels=..., loss_weights=...)` returns the loss over the labelled positions only,
for decoders and T5, padded or packed: the same number as the loss computed by hand from full logits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ecellm.data import IGNORE_INDEX, collate, collate_packed

from ..test_packing import DECODERS, T5, TINY, decoder_examples, t5_examples, tiny_model


def answer_token_losses(model, example: dict, seq2seq: bool) -> torch.Tensor:
    """One example's per-answer-token losses from its full logits, the label shifts written out by hand."""
    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"])
    if seq2seq:
        decoder_ids = torch.cat([torch.tensor([T5["decoder_start_token_id"]]), labels[:-1]])  # shifted right
        logits = model(ids, decoder_input_ids=decoder_ids[None])[0]  # (T, V)
        targets = labels
    else:
        logits = model(ids)[0, :-1]  # (T - 1, V): position t predicts token t+1
        targets = labels[1:]
    keep = targets != IGNORE_INDEX
    return F.cross_entropy(logits[keep], targets[keep], reduction="none")


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("family", ["llama-gqa", "t5"])
def test_forward_with_labels_returns_the_weighted_loss(family, packed):
    seq2seq = family == "t5"
    model = tiny_model(T5 if seq2seq else {**TINY, **DECODERS[family]})
    examples = t5_examples([5, 9, 3], [3, 6, 2]) if seq2seq else decoder_examples([6, 9, 4], [2, 4, 1])
    if packed:
        batch = collate_packed([examples], 0, 8, seq2seq, "example")
    else:
        batch = collate(examples, 0, "right", 8, seq2seq, loss_average="example")
    packing = {k: batch[k] for k in ("segment_ids", "decoder_segment_ids") if k in batch}
    mask = batch.get("attention_mask")
    with torch.no_grad():
        per_example = [answer_token_losses(model, ex, seq2seq) for ex in examples]
        weighted = model(batch["input_ids"], mask, labels=batch["labels"], loss_weights=batch["loss_weights"],
                         reduction="sum", **packing)
        mean = model(batch["input_ids"], mask, labels=batch["labels"], **packing)
    # per-example weights: the sum over examples of each example's mean over its answer tokens
    torch.testing.assert_close(weighted, sum(losses.mean() for losses in per_example), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(mean, torch.cat(per_example).mean(), rtol=1e-6, atol=1e-5)  # default: token mean
    assert torch.equal(model(**batch, reduction="sum").detach(), weighted)  # a batch passes as keyword arguments


def test_t5_forward_needs_decoder_inputs_or_labels():
    with pytest.raises(ValueError, match="give decoder_input_ids or labels"):
        tiny_model(T5)(torch.tensor([[5, 6]]))


def test_data_does_not_import_the_models():
    code = "import sys, ecellm.data; assert not any(m.startswith('ecellm.models') for m in sys.modules)"
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(repo)})
