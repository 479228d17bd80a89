"""Loading checkpoints that are damaged or wrong: every failure names the file (and the tensor or config field)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ecellm.models import CheckpointError, ConfigError, from_config, from_pretrained
from ecellm.models.loading import read_safetensors

TINY = {
    "model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
}


@pytest.fixture
def tiny(tmp_path):
    """A tiny random Llama checkpoint directory (config.json + model.safetensors)."""
    torch.manual_seed(0)
    model = from_config(TINY, device="cpu")
    save_file(model.state_dict(), tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    return tmp_path


def _edit_weights(path, key, fn):
    state = load_file(path / "model.safetensors")
    state[key] = fn(state[key])
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("keep", [0, 4, 0.5])  # empty, a header cut short, half the file
def test_truncated_or_empty_weights_name_the_file(tiny, keep):
    file = tiny / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=rf"{file}: not a readable safetensors file, perhaps empty or truncated"):
        from_pretrained(tiny)
    with pytest.raises(CheckpointError, match=str(file)):  # the helper a trainer-state reader shares
        dict(read_safetensors(file))


def test_integer_weight_is_refused_by_name(tiny):
    _edit_weights(tiny, "model.norm.weight", lambda t: t.to(torch.int64))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' in .*model.safetensors has dtype torch.int64"):
        from_pretrained(tiny)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_refused_by_name(tiny, value):
    def poison(t):
        t[1, 2] = value
        return t

    _edit_weights(tiny, "model.layers.0.mlp.up_proj.weight", poison)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.up_proj.weight' in .*model.safetensors holds 1 "
                                              r"NaN or Inf values \(of 512\)"):
        from_pretrained(tiny)
    assert not torch.isfinite(from_pretrained(tiny, check_finite=False).model.layers[0].mlp.up_proj.weight).all()


def test_overflow_on_cast_is_caught_and_a_large_finite_sum_is_not(tiny):
    """A float32 weight beyond float16's range turns Inf when cast; finite values whose sum overflows are fine."""
    _edit_weights(tiny, "model.norm.weight", lambda t: torch.full_like(t, 1e5))
    with pytest.raises(CheckpointError, match="'model.norm.weight'"):
        from_pretrained(tiny, dtype=torch.float16)
    _edit_weights(tiny, "model.norm.weight", lambda t: torch.full_like(t, 6e4))  # sums to Inf in float16
    assert (from_pretrained(tiny, dtype=torch.float16).model.norm.weight == 6e4).all()


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/x.safetensors", ".."])
def test_index_pointing_outside_the_folder_is_refused(tiny, shard):
    outside = tiny.parent / "outside.safetensors"
    (tiny / "model.safetensors").rename(outside)
    keys = load_file(outside).keys()
    (tiny / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard for k in keys}}))
    with pytest.raises(CheckpointError, match=rf"index.json: weight_map\[.*\] = '{shard}' is not a file name in the "
                                              "checkpoint folder"):
        from_pretrained(tiny)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 0}, r"field 'hidden_size' is 0; expected a positive integer"),
        ({"num_hidden_layers": -1}, r"field 'num_hidden_layers' is -1; expected a positive integer"),
        ({"vocab_size": "64"}, r"field 'vocab_size' is '64'; expected a positive integer"),
        ({"intermediate_size": 32.5}, r"field 'intermediate_size' is 32.5; expected a positive integer"),
        ({"num_attention_heads": 0}, r"field 'num_attention_heads' is 0"),
        ({"num_attention_heads": 3}, r"num_attention_heads=3 does not divide hidden_size=16"),
        ({"num_key_value_heads": 3}, r"num_key_value_heads=3 does not divide num_attention_heads=4"),
        ({"rms_norm_eps": 0}, r"field 'rms_norm_eps' is 0; expected a positive number"),
        ({"rms_norm_eps": -1e-6}, r"field 'rms_norm_eps' is -1e-06"),
        ({"rope_theta": "big"}, r"field 'rope_theta' is 'big'; expected a positive number"),
        ({"rope_scaling": {"type": "linear"}}, r"linear rope scaling's 'factor' in config.json is None"),
        ({"rope_scaling": {"type": "linear", "factor": 0}}, r"'factor' in config.json is 0"),
        ({"model_type": "phi", "partial_rotary_factor": 2}, r"'partial_rotary_factor' is 2; expected a share"),
        ({"model_type": "phi", "layer_norm_eps": -1}, r"field 'layer_norm_eps' is -1"),
    ],
)
def test_invalid_config_values_name_file_and_field(tiny, change, message):
    (tiny / "config.json").write_text(json.dumps(TINY | change))
    with pytest.raises(ConfigError, match=rf"{tiny / 'config.json'}: .*{message}"):
        from_pretrained(tiny)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"d_model": 0}, r"field 'd_model' is 0"),
        ({"num_heads": "8"}, r"field 'num_heads' is '8'"),
        ({"layer_norm_epsilon": 0.0}, r"field 'layer_norm_epsilon' is 0.0"),
        ({"feed_forward_proj": 3}, r"feed_forward_proj is 3; expected a string"),
    ],
)
def test_invalid_t5_config_values(tmp_path, change, message):
    config = {"model_type": "t5", "vocab_size": 64, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 1,
              "num_heads": 4} | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'config.json'}: .*{message}"):
        from_config(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_hidden_layers": 100000}, r"num_hidden_layers is 100000 but the weights in .* hold 1 layers at most "
                                        r"\(model.layers: 1\)"),
        ({"num_hidden_layers": 2}, r"num_hidden_layers is 2 but the weights .* hold 1 layers at most \(.*\)"),
        ({"hidden_size": 10**9, "num_attention_heads": 1, "num_key_value_heads": 1},
         r"hidden_size is 1000000000 but the weights in .* hold no dimension over 64"),
        ({"intermediate_size": 2**40}, r"intermediate_size is 1099511627776 but .* no dimension over 64"),
    ],
)
def test_a_config_asking_for_more_than_its_weights_hold_is_refused_before_building(tiny, change, message,
                                                                                   monkeypatch):
    from ecellm import models

    (tiny / "config.json").write_text(json.dumps(TINY | change))
    monkeypatch.setattr(models, "from_config", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(ConfigError, match=rf"^{tiny / 'config.json'}: {message}; this config.json does not describe "
                                          "these weights$"):
        from_pretrained(tiny)


def test_a_t5_config_with_more_decoder_layers_than_its_weights_is_refused(tmp_path):
    from ..tiny_checkpoint import make_tiny_checkpoint

    tiny = make_tiny_checkpoint(tmp_path / "t5", family="t5")
    assert from_pretrained(tiny).config.num_decoder_layers == 2
    config = json.loads((tiny / "config.json").read_text())
    (tiny / "config.json").write_text(json.dumps(config | {"num_decoder_layers": 5000}))
    with pytest.raises(ConfigError, match=r"num_decoder_layers is 5000 but the weights in .* hold 2 layers at most "
                                          r"\(decoder.block: 2, encoder.block: 2\)"):
        from_pretrained(tiny)
