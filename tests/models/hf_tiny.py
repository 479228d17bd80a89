"""Tiny random Hugging Face checkpoints, built and saved with transformers (the reference oracle)."""

from __future__ import annotations

import torch
import transformers

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

# name -> (transformers config class, model class, config overrides)
DECODERS = {
    "llama-untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama-tied-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=2)),
    "llama-headdim-bias": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(head_dim=12, num_key_value_heads=2, attention_bias=True, mlp_bias=True, rope_theta=500.0),
    ),
    "mistral-window": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(sliding_window=5, num_key_value_heads=2, tie_word_embeddings=False),
    ),
    "llama3-rope": (  # all three frequency bands of llama3 scaling occur at head size 8 with this context
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=2, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                      high_freq_factor=4.0, original_max_position_embeddings=64)),
    ),
    "qwen2-tied": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    ),
    "qwen3-headdim": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(num_key_value_heads=2, head_dim=12, tie_word_embeddings=False),
    ),
    "phi-partial": (
        "PhiConfig",
        "PhiForCausalLM",
        dict(partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0, tie_word_embeddings=False),
    ),
}


def save_tiny_decoder(name: str, path, seed: int = 0):
    """Build the named tiny transformers model with random weights, save it to `path`, return it (eval, fp32)."""
    config_cls, model_cls, overrides = DECODERS[name]
    config = getattr(transformers, config_cls)(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        # Larger weights than the default init (so greedy decoding does not repeat one token) and non-trivial norms
        # and biases (so a weight we failed to load shows up in the logits).
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1 if n.endswith(".bias") else 0.25)
    model.save_pretrained(path)
    return model
