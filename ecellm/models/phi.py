"""Phi-2 in the native `PhiForCausalLM` layout: one LayerNorm (with bias) feeds attention and MLP in parallel,
rotary embedding on part of each head, `gelu_new` MLP (`fc1`, `fc2`), biases everywhere including `lm_head`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import config as cfg
from .layers import AttentionInputs, DecoderOnlyLM, activation, attend, default_head_dim


@dataclass
class PhiConfig:
    """Hyper-parameters of a Phi-2 checkpoint, parsed from its `config.json` by `from_dict`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    partial_rotary_factor: float = 0.5
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0
    hidden_act: str = "gelu_new"
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    model_type: str = "phi"
    sliding_window: None = None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PhiConfig":
        if d.get("qk_layernorm"):
            raise cfg.ConfigError("phi config.json sets qk_layernorm=true, which ecellm does not support (Phi-2 has it off)")
        cfg.check_values(d, "phi", integers=cfg.DECODER_SIZES, numbers=("layer_norm_eps",))
        hidden = cfg.require(d, "hidden_size", "phi")
        heads = cfg.require(d, "num_attention_heads", "phi")
        cfg.check_heads(d, "phi", "hidden_size", "num_attention_heads", "num_key_value_heads")
        return cls(
            vocab_size=cfg.require(d, "vocab_size", "phi"),
            hidden_size=hidden,
            intermediate_size=cfg.require(d, "intermediate_size", "phi"),
            num_hidden_layers=cfg.require(d, "num_hidden_layers", "phi"),
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or default_head_dim(hidden, heads),
            partial_rotary_factor=cfg.partial_rotary_factor(d, default=0.5),
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
            rope_theta=cfg.rope_theta(d),
            rope_scaling_factor=cfg.rope_scaling_factor(d),
            hidden_act=d.get("hidden_act", "gelu_new"),
            resid_pdrop=d.get("resid_pdrop", 0.0),
            embd_pdrop=d.get("embd_pdrop", 0.0),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            raw=dict(d),
        )


class PhiAttention(nn.Module):
    def __init__(self, c: PhiConfig, layer: int):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hs = layer, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.hs)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.hs)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.hs)
        self.dense = nn.Linear(self.nh * self.hs, c.hidden_size)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        return self.dense(attend(q, k, v, inputs, self.layer))


class PhiMLP(nn.Module):
    def __init__(self, c: PhiConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = activation(c.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    def __init__(self, c: PhiConfig, layer: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = PhiAttention(c, layer)
        self.mlp = PhiMLP(c)
        self.resid_dropout = nn.Dropout(c.resid_pdrop)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        h = self.input_layernorm(x)  # one norm feeds both branches, which run in parallel
        return x + self.resid_dropout(self.self_attn(h, inputs)) + self.resid_dropout(self.mlp(h))


class PhiModel(nn.Module):
    def __init__(self, c: PhiConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embed_dropout = nn.Dropout(c.embd_pdrop)
        self.layers = nn.ModuleList(PhiDecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x = self.embed_dropout(self.embed_tokens(input_ids))  # (B, T, H)
        for layer in self.layers:
            x = layer(x, inputs)
        return self.final_layernorm(x)


class PhiForCausalLM(DecoderOnlyLM):
    """Phi-2 language model. `forward(input_ids, attention_mask=None) -> (B, T, V)` logits."""

    def __init__(self, config: PhiConfig):
        super().__init__()
        self.config = config
        self.model = PhiModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
