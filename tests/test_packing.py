"""Packed rows (several examples in one row, each attending only to itself) equal the same examples unpacked, and
the loss weighting: per example (the reference) or per token, computed per segment."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ecellm import lora
from ecellm.data import IGNORE_INDEX, collate, collate_packed, label_weights, pack_examples
from ecellm.models import from_config
from ecellm.models.layers import segment_mask, segment_positions

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
DECODERS = {
    "llama-gqa": dict(model_type="llama", num_key_value_heads=2),
    "mistral-window": dict(model_type="mistral", num_key_value_heads=2, sliding_window=4),
    "phi-partial": dict(model_type="phi", partial_rotary_factor=0.5, rope_theta=100.0),
    "llama3-rope": dict(model_type="llama", rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "qwen2-bias": dict(model_type="qwen2", num_key_value_heads=2),
    "qwen3-qknorm": dict(model_type="qwen3", num_key_value_heads=2, head_dim=12),
}
T5 = dict(
    model_type="t5", vocab_size=61, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
    tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)


def tiny_model(config: dict, seed: int = 0, with_lora: bool = False) -> torch.nn.Module:
    """A tiny fp32 model with weights large enough (and LoRA B non-zero) that every path shows in the output (T5,
    without 1/sqrt(d) attention scaling, gets smaller ones)."""
    torch.manual_seed(seed)
    model = from_config(config, device="cpu")
    if with_lora:
        lora.inject(model, r=4, alpha=8)
    std = 0.15 if config["model_type"] == "t5" else 0.3
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else std * torch.randn_like(p))
    return model.eval()


def decoder_examples(lengths, answers, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, a in zip(lengths, answers):
        ids = torch.randint(2, 61, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n - a) + ids[n - a:]})
    return out


def t5_examples(source_lengths, target_lengths, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(2, 61, (s,), generator=g).tolist(),
         "labels": torch.randint(2, 61, (t,), generator=g).tolist()}
        for s, t in zip(source_lengths, target_lengths)
    ]


def test_segment_positions_and_mask():
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    assert segment_positions(segments).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    mask = segment_mask(segments, segments)[0, 0]
    assert mask[2].tolist() == [True, True, True, False, False, False, False, False]
    assert mask[3].tolist() == [False, False, False, True, True, False, False, False]


def test_pack_examples_first_fit_in_stream_order():
    examples = [{"input_ids": [0] * n, "labels": [0] * n} for n in (6, 5, 3, 4, 12, 1)]
    rows = pack_examples(examples, budget=10)
    assert [[len(e["input_ids"]) for e in row] for row in rows] == [[6, 3, 1], [5, 4], [12]]  # 12 > budget: alone


def test_collate_packed_layout():
    examples = decoder_examples([5, 3], [2, 1])
    batch = collate_packed([examples], pad_id=0, multiple_of=4, loss_average="example")
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]
    labels = batch["labels"][0].tolist()
    assert labels[5] == IGNORE_INDEX and labels[3:5] == examples[0]["labels"][3:]
    assert labels[7] == examples[1]["labels"][2]
    assert batch["loss_weights"].tolist() == [[0, 0, 0, 0.5, 0.5, 0, 0, 1.0]]
    padded = collate_packed([examples[:1], examples[1:]], pad_id=0, multiple_of=4)
    assert padded["input_ids"].shape == (2, 8) and padded["segment_ids"][1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_packed_decoder_logits_equal_unpacked(name):
    model = tiny_model({**TINY, **DECODERS[name]})
    examples = decoder_examples([7, 12, 5], [2, 3, 1])  # windows of 4 cut into the 7- and 12-token segments
    batch = collate_packed([examples], pad_id=0, multiple_of=8)
    with torch.no_grad():
        packed = model(batch["input_ids"], segment_ids=batch["segment_ids"])[0]  # (T, V)
        start = 0
        for ex in examples:
            alone = model(torch.tensor([ex["input_ids"]]))[0]  # (L, V)
            torch.testing.assert_close(packed[start : start + len(alone)], alone, rtol=0, atol=1e-5)
            start += len(alone)


def test_packed_t5_logits_equal_unpacked():
    model = tiny_model(T5)
    examples = t5_examples([9, 4, 14], [3, 6, 2])  # distances up to 13: exact and log buckets
    batch = collate_packed([examples], pad_id=0, multiple_of=8, seq2seq=True)
    decoder_ids = torch.where(batch["labels"] == IGNORE_INDEX, 0, batch["labels"])
    with torch.no_grad():
        packed = model(batch["input_ids"], decoder_input_ids=decoder_ids, segment_ids=batch["segment_ids"],
                       decoder_segment_ids=batch["decoder_segment_ids"])[0]  # (T, V)
        start = 0
        for ex in examples:
            alone = model(torch.tensor([ex["input_ids"]]), decoder_input_ids=torch.tensor([ex["labels"]]))[0]  # (L, V)
            torch.testing.assert_close(packed[start : start + len(alone)], alone, rtol=0, atol=1e-5)
            start += len(alone)


def test_per_example_and_per_token_loss_by_hand():
    """Answers of 1 and 3 tokens: "example" is the mean of the two examples' means, "token" the mean of 4 tokens."""
    model = tiny_model({**TINY, **DECODERS["llama-gqa"]})
    examples = decoder_examples([6, 9], [1, 3])
    with torch.no_grad():
        per_token = []  # each example's answer-token losses, from its full logits
        for ex in examples:
            logits = model(torch.tensor([ex["input_ids"]]))[0, :-1]  # position t predicts token t+1
            targets = torch.tensor(ex["labels"][1:])
            keep = targets != IGNORE_INDEX
            per_token.append(F.cross_entropy(logits[keep], targets[keep], reduction="none"))
        by_example = (per_token[0].mean() + per_token[1].mean()) / 2
        by_token = torch.cat(per_token).mean()
        for average, expected, normaliser in (("example", by_example, 2), ("token", by_token, 4)):
            batch = collate(examples, pad_id=0, loss_average=average)
            loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                         loss_weights=batch["loss_weights"], reduction="sum")
            torch.testing.assert_close(loss / normaliser, expected, rtol=1e-6, atol=1e-6)
    assert abs(by_example - by_token) > 1e-3  # the two weightings differ on this batch


def test_label_weights():
    assert label_weights([IGNORE_INDEX, IGNORE_INDEX, 5, 6], "example", seq2seq=False) == [0, 0, 0.5, 0.5]
    assert label_weights([7, 5, 6, 1], "example", seq2seq=True) == [0.25] * 4
    assert label_weights([7, 5, 6, 1], "token", seq2seq=False) == [0, 1, 1, 1]  # label 0 is never a target
    with pytest.raises(ValueError, match="loss_average must be one of"):
        label_weights([1], "mean", seq2seq=False)


def loss_and_grads(model, batch: dict, seq2seq: bool, normaliser: float) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    if seq2seq:
        loss = model(batch["input_ids"], batch.get("attention_mask"), labels=batch["labels"],
                     loss_weights=batch["loss_weights"], segment_ids=batch.get("segment_ids"),
                     decoder_segment_ids=batch.get("decoder_segment_ids"), reduction="sum")
    else:
        loss = model(batch["input_ids"], batch.get("attention_mask"), labels=batch["labels"],
                     loss_weights=batch["loss_weights"], segment_ids=batch.get("segment_ids"), reduction="sum")
    (loss / normaliser).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item() / normaliser, grads


@pytest.mark.parametrize("average", ["example", "token"])
@pytest.mark.parametrize("family", ["mistral-window", "t5"])
def test_packed_loss_and_lora_grads_equal_unpacked(family, average):
    seq2seq = family == "t5"
    model = tiny_model(T5 if seq2seq else {**TINY, **DECODERS[family]}, with_lora=True)
    if seq2seq:
        examples = t5_examples([9, 4, 14, 6], [3, 6, 2, 1])
        normaliser = 4 if average == "example" else 12
    else:
        examples = decoder_examples([7, 12, 5, 9], [2, 5, 1, 3])
        normaliser = 4 if average == "example" else 11
    padded = collate(examples, pad_id=0, seq2seq=seq2seq, loss_average=average)
    rows = pack_examples(examples, budget=24, seq2seq=seq2seq)
    assert len(rows) == 2  # two packed rows, of different lengths
    packed = collate_packed(rows, pad_id=0, seq2seq=seq2seq, loss_average=average)
    loss, grads = loss_and_grads(model, padded, seq2seq, normaliser)
    packed_loss, packed_grads = loss_and_grads(model, packed, seq2seq, normaliser)
    assert packed_loss == pytest.approx(loss, rel=1e-6)
    assert len(grads) > 0 and all(g.abs().max() > 0 for g in grads.values())
    for name, grad in grads.items():  # fp32 summation order differs: tolerance relative to the gradient's scale
        torch.testing.assert_close(packed_grads[name], grad, rtol=0, atol=2e-5 * grad.abs().max().item())


def _reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """torch 2.11's `varlen_attn` signature (no `enable_gqa`: query and key heads must match), computed per segment
    with a written-out mask, so the packed path's fallback can be checked without a GPU."""
    assert q.shape[1] == k.shape[1] == v.shape[1], "torch 2.11's varlen_attn takes as many key heads as query heads"
    out = []
    for a, b in zip(cu_q.tolist(), cu_q.tolist()[1:]):
        i = torch.arange(b - a)
        allowed = (i[None, :] <= i[:, None]) & ((window_size[0] < 0) | (i[:, None] - i[None, :] <= window_size[0]))
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))  # (heads, L, hs)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window"])
def test_varlen_path_repeats_kv_heads_where_torch_has_no_enable_gqa(name, monkeypatch):
    """The CUDA varlen branch, run on the CPU through a stand-in with torch 2.11's signature: key/value heads are
    repeated for GQA, and packed logits still equal the examples run alone."""
    import torch.nn.attention.varlen as varlen

    from ecellm.models import layers

    monkeypatch.setattr(varlen, "varlen_attn", _reference_varlen_attn)
    monkeypatch.setattr(layers, "use_varlen_attention", lambda device, dtype, head_dim: True)
    model = tiny_model({**TINY, **DECODERS[name]})
    examples = decoder_examples([7, 12, 5], [2, 3, 1])
    batch = collate_packed([examples], pad_id=0, multiple_of=8)
    with torch.no_grad():
        packed = model(batch["input_ids"], segment_ids=batch["segment_ids"])[0]
    monkeypatch.undo()
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([ex["input_ids"]]))[0] for ex in examples])
    torch.testing.assert_close(packed[: len(alone)], alone, rtol=0, atol=5e-5)  # masked vs causal kernel: rounding
