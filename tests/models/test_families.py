"""Qwen2 / Qwen2.5, Qwen3 and Llama-3.x: the real configs' sizes, and what their config fields switch on or refuse.
(Their logits, losses and generation against transformers are the `qwen*` / `llama3*` cases of test_decoders.py.)"""

from __future__ import annotations

import pytest
import torch
import transformers

from ecellm.models import ConfigError, from_config
from ecellm.models.layers import RopeScaling, rope_inv_freq

QWEN2 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6,
             rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151643, use_sliding_window=False,
             attention_dropout=0.0, torch_dtype="bfloat16")
# The published config.json files (fields that do not change the parameters' shapes left at the values above).
REAL_CONFIGS = {
    "Qwen2.5-0.5B": dict(QWEN2, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         sliding_window=32768, max_window_layers=24, tie_word_embeddings=True),
    "Qwen2.5-1.5B": dict(QWEN2, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         sliding_window=32768, max_window_layers=21, tie_word_embeddings=True),
    "Qwen2.5-7B": dict(QWEN2, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                       sliding_window=131072, max_window_layers=28, tie_word_embeddings=False),
    "Qwen3-0.6B": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, attention_bias=False, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
                       max_position_embeddings=40960, sliding_window=None, max_window_layers=28,
                       use_sliding_window=False, tie_word_embeddings=True, bos_token_id=151643,
                       eos_token_id=151645, torch_dtype="bfloat16"),
    "Llama-3.1-8B": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192),
                         attention_bias=False, mlp_bias=False, tie_word_embeddings=False, bos_token_id=128000,
                         eos_token_id=128001, torch_dtype="bfloat16"),
}
PUBLISHED = {"Qwen2.5-0.5B": 494_032_768, "Qwen2.5-1.5B": 1_543_714_304, "Qwen2.5-7B": 7_615_616_512,
             "Qwen3-0.6B": 596_049_920, "Llama-3.1-8B": 8_030_261_248}


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight counts once


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_real_configs_have_the_published_parameter_counts(name):
    config = REAL_CONFIGS[name]
    ours = from_config(config)
    assert all(p.device.type == "meta" for p in ours.parameters())
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    assert n_parameters(ours) == n_parameters(reference) == PUBLISHED[name]
    assert sorted(ours.state_dict()) == sorted(reference.state_dict())  # the same tensors by name, so loads fit
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == config["tie_word_embeddings"]


def test_llama3_rope_frequencies_match_transformers():
    config = transformers.LlamaConfig(**{k: v for k, v in REAL_CONFIGS["Llama-3.1-8B"].items() if k != "architectures"})
    expected, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = rope_inv_freq(128, 500000.0, from_config(REAL_CONFIGS["Llama-3.1-8B"]).config.rope_scaling)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    plain = rope_inv_freq(128, 500000.0, RopeScaling())
    kept, stretched = ours == plain, ours == plain / 8
    assert kept.any() and stretched.any() and not (kept | stretched).all()  # the three bands all occur


def test_qwen_attention_layout():
    qwen2 = from_config(REAL_CONFIGS["Qwen2.5-0.5B"]).model.layers[0].self_attn
    assert qwen2.q_proj.bias is not None and qwen2.o_proj.bias is None and qwen2.q_norm is None
    qwen3 = from_config(REAL_CONFIGS["Qwen3-0.6B"]).model.layers[0].self_attn
    assert qwen3.q_proj.bias is None and qwen3.q_norm.weight.shape == (128,) and qwen3.q_proj.out_features == 2048


@pytest.mark.parametrize("fields", [dict(use_sliding_window=True),
                                    dict(layer_types=["full_attention", "sliding_attention"])])
def test_qwen_sliding_window_is_refused_by_name(fields):
    with pytest.raises(ConfigError, match="qwen2 config.json turns on sliding-window attention"):
        from_config({**REAL_CONFIGS["Qwen2.5-0.5B"], **fields})


@pytest.mark.parametrize(
    "scaling,message",
    [
        (dict(rope_type="yarn", factor=4.0), r"rope scaling type 'yarn' is not supported"),
        (dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
         r"llama3 rope scaling's 'original_max_position_embeddings' in config.json is None"),
        (dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0,
              original_max_position_embeddings=8192), r"high_freq_factor 1.0 must exceed low_freq_factor 4.0"),
    ],
)
def test_bad_rope_scaling_is_refused_by_name(scaling, message):
    with pytest.raises(ConfigError, match=message):
        from_config({**REAL_CONFIGS["Llama-3.1-8B"], "rope_scaling": scaling})
