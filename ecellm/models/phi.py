"""Phi-2 in the native `PhiForCausalLM` layout, in the shared decoder shell (`decoder.py`): one LayerNorm (with
bias) feeds attention and MLP in parallel, rotary embedding on part of each head, `gelu_new` MLP (`fc1`, `fc2`),
biases everywhere including `lm_head`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import config as cfg
from .decoder import DecoderAttention, DecoderConfig, DecoderOnlyLM, DecoderStack
from .layers import AttentionInputs, activation


@dataclass
class PhiConfig(DecoderConfig):
    """Hyper-parameters of a Phi-2 checkpoint, parsed from its `config.json` by `from_dict`."""

    partial_rotary_factor: float = 0.5
    layer_norm_eps: float = 1e-5
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0

    default_model_type = "phi"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def _family_fields(cls, d: dict[str, Any], family: str) -> dict[str, Any]:
        if d.get("qk_layernorm"):
            raise cfg.ConfigError(
                "phi config.json sets qk_layernorm=true, which ecellm does not support (Phi-2 has it off)"
            )
        cfg.check_values(d, family, numbers=("layer_norm_eps",))
        return dict(
            partial_rotary_factor=cfg.partial_rotary_factor(d, default=0.5),
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
            hidden_act=d.get("hidden_act", "gelu_new"),
            resid_pdrop=d.get("resid_pdrop", 0.0),
            embd_pdrop=d.get("embd_pdrop", 0.0),
        )


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
        self.self_attn = DecoderAttention(c, layer, bias=True, output_name="dense")
        self.mlp = PhiMLP(c)
        self.resid_dropout = nn.Dropout(c.resid_pdrop)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        h = self.input_layernorm(x)  # one norm feeds both branches, which run in parallel
        return x + self.resid_dropout(self.self_attn(h, inputs)) + self.resid_dropout(self.mlp(h))


class PhiForCausalLM(DecoderOnlyLM):
    """Phi-2 language model. `forward(input_ids, attention_mask=None) -> (B, T, V)` logits."""

    def __init__(self, config: PhiConfig):
        final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        model = DecoderStack(config, PhiDecoderLayer, final_norm, "final_layernorm", embed_dropout=config.embd_pdrop)
        super().__init__(config, model, lm_head_bias=True)
