"""Llama-2 and Mistral: pre-norm decoder blocks with RMSNorm, rotary attention (grouped-query heads, optional
sliding window) and a gated SiLU MLP. Module names mirror the Hugging Face checkpoint keys
(`model.layers.0.self_attn.q_proj.weight`, ...), so checkpoints load without a renaming table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import config as cfg
from .layers import AttentionInputs, DecoderOnlyLM, GatedMLP, RMSNorm, attend, default_head_dim


@dataclass
class LlamaConfig:
    """Hyper-parameters of a Llama or Mistral checkpoint, parsed from its `config.json` by `from_dict`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the config.json as read, for saving

    @property
    def rotary_dim(self) -> int:
        return self.head_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        family = d.get("model_type", "llama")
        cfg.check_values(d, family, integers=cfg.DECODER_SIZES + ("sliding_window",), numbers=("rms_norm_eps",))
        hidden = cfg.require(d, "hidden_size", family)
        heads = cfg.require(d, "num_attention_heads", family)
        cfg.check_heads(d, family, "hidden_size", "num_attention_heads", "num_key_value_heads")
        return cls(
            model_type=family,
            vocab_size=cfg.require(d, "vocab_size", family),
            hidden_size=hidden,
            intermediate_size=cfg.require(d, "intermediate_size", family),
            num_hidden_layers=cfg.require(d, "num_hidden_layers", family),
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or default_head_dim(hidden, heads),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.rope_theta(d),
            rope_scaling_factor=cfg.rope_scaling_factor(d),
            hidden_act=d.get("hidden_act", "silu"),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False),
            mlp_bias=d.get("mlp_bias", False),
            sliding_window=d.get("sliding_window") if family == "mistral" else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            raw=dict(d),
        )


class LlamaAttention(nn.Module):
    def __init__(self, c: LlamaConfig, layer: int):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hs = layer, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.hs, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.hs, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.hs, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.nh * self.hs, c.hidden_size, bias=c.attention_bias)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        return self.o_proj(attend(q, k, v, inputs, self.layer))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = LlamaAttention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, c.mlp_bias)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, T, H)
        for layer in self.layers:
            x = layer(x, inputs)
        return self.norm(x)


class LlamaForCausalLM(DecoderOnlyLM):
    """Llama-2 / Mistral language model. `forward(input_ids, attention_mask=None) -> (B, T, V)` logits."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
