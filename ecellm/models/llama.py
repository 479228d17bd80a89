"""Llama-2/3 and Mistral: pre-norm decoder blocks with RMSNorm, rotary attention (grouped-query heads, optional
sliding window) and a gated SiLU MLP, in the shared decoder shell (`decoder.py`). Qwen2 and Qwen3 use the same block
with their attention's differences switched on (`qwen.py`). Module names mirror the Hugging Face checkpoint keys
(`model.layers.0.self_attn.q_proj.weight`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import config as cfg
from .decoder import DecoderAttention, DecoderConfig, DecoderOnlyLM, DecoderStack
from .layers import AttentionInputs, GatedMLP, RMSNorm


@dataclass
class LlamaConfig(DecoderConfig):
    """Hyper-parameters of a Llama or Mistral checkpoint, parsed from its `config.json` by `from_dict`."""

    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral only
    qkv_bias: bool = False  # Qwen2: biases on the q/k/v projections (not on o_proj) whatever `attention_bias` says
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's queries and keys

    @classmethod
    def _family_fields(cls, d: dict[str, Any], family: str) -> dict[str, Any]:
        cfg.check_values(d, family, integers=("sliding_window",), numbers=("rms_norm_eps",))
        return dict(
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            hidden_act=d.get("hidden_act", "silu"),
            attention_bias=d.get("attention_bias", False),
            mlp_bias=d.get("mlp_bias", False),
            sliding_window=d.get("sliding_window") if family == "mistral" else None,
        )


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = DecoderAttention(
            c, layer, bias=c.attention_bias or c.qkv_bias, output_name="o_proj", output_bias=c.attention_bias,
            qk_norm_eps=c.rms_norm_eps if c.qk_norm else None,
        )
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, c.mlp_bias)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(DecoderOnlyLM):
    """Llama / Mistral / Qwen language model. `forward(input_ids, attention_mask=None) -> (B, T, V)` logits."""

    def __init__(self, config: LlamaConfig):
        final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderStack(config, LlamaDecoderLayer, final_norm, "norm"), lm_head_bias=False)
