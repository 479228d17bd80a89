"""The decoder shell (`ecellm/models/decoder.py`) and the KV cache: the cache advances its own position, the
padding mask is built without reading the mask on the host, and Llama and Phi share one config parser."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ecellm.generate import _id_list, left_pad
from ecellm.models import from_config
from ecellm.models.decoder import DecoderConfig
from ecellm.models.layers import KVCache, build_attention_mask
from ecellm.models.llama import LlamaConfig
from ecellm.models.phi import PhiConfig

TINY = dict(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
FAMILIES = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=3),
    "phi": dict(model_type="phi", partial_rotary_factor=0.5),
}


def tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return from_config({**TINY, **FAMILIES[family]}, device="cpu").eval()


def test_kv_cache_advances_its_own_position():
    cache = KVCache(n_layers=2, batch=1, n_kv_heads=1, max_len=4, head_dim=2, dtype=torch.float32, device="cpu")
    k = torch.ones(1, 1, 3, 2)
    keys, _ = cache.update(0, k, k)
    assert keys.shape[2] == 3 and cache.length == 0  # layer 1 has not written these positions yet
    cache.update(1, k, k)
    assert cache.length == 3
    with pytest.raises(RuntimeError, match="layer 0: 6 positions needed, 4 allocated"):
        cache.update(0, k, k)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoding_advances_the_cache_without_the_caller(family):
    model = tiny_model(family)
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], pad_id=0)
    state, _ = model.start_decoding(ids, mask, max_new_tokens=3)
    assert state.cache.length == 4
    model.decode_step(state, torch.tensor([1, 2]))
    assert state.cache.length == 5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hidden_states_never_reads_the_mask_on_the_host(family, monkeypatch):
    model = tiny_model(family)
    ids = torch.randint(1, 61, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])

    def no_sync(*args):
        raise AssertionError("hidden_states copied a tensor's value to the host")

    with torch.no_grad():
        for name in ("__bool__", "item", "tolist"):
            monkeypatch.setattr(torch.Tensor, name, no_sync)
        model.hidden_states(ids, mask)


@pytest.mark.parametrize("window", [None, 3])
def test_right_padding_gets_exactly_the_causal_mask(window):
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    causal = build_attention_mask(torch.ones_like(right), 0, 6, window)
    assert torch.equal(build_attention_mask(right, 0, 6, window, query_padding=right), causal)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_right_padded_rows_match_unpadded_rows_at_every_position(family):
    model = tiny_model(family)
    ids = torch.randint(1, 61, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(model.hidden_states(ids, mask), model.hidden_states(ids), atol=1e-6, rtol=0)


def test_llama_and_phi_share_one_parser_and_phi_has_no_window():
    assert LlamaConfig.from_dict.__func__ is PhiConfig.from_dict.__func__ is DecoderConfig.from_dict.__func__
    assert "sliding_window" not in {f.name for f in dataclasses.fields(PhiConfig)}
    phi = PhiConfig.from_dict({**TINY, "model_type": "phi"})
    assert (phi.hidden_act, phi.rotary_dim) == ("gelu_new", 2)


def test_left_pad_and_eos_ids():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert _id_list(2, [3, 2], None) == [2, 3]
