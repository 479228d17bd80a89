"""Qwen2 / Qwen2.5 and Qwen3: the Llama block (`llama.py`) with Qwen's attention. Qwen2 has biases on the q/k/v
projections and none on o_proj; Qwen3 has no q/k/v biases (unless `attention_bias`) but an RMSNorm over each head's
queries and keys, and a `head_dim` set apart from the width. Only the config parsing is Qwen's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import config as cfg
from .llama import LlamaConfig


@dataclass
class QwenConfig(LlamaConfig):
    """Hyper-parameters of a Qwen2 / Qwen2.5 (`model_type: qwen2`) or Qwen3 (`qwen3`) checkpoint."""

    @classmethod
    def _family_fields(cls, d: dict[str, Any], family: str) -> dict[str, Any]:
        # The released checkpoints keep every layer on full attention; a windowed layer would need per-layer masks.
        if d.get("use_sliding_window") or "sliding_attention" in (d.get("layer_types") or []):
            raise cfg.ConfigError(f"{family} config.json turns on sliding-window attention (use_sliding_window / "
                                  "layer_types), which ecellm does not support; the released Qwen models leave it off")
        cfg.check_values(d, family, numbers=("rms_norm_eps",))
        qwen3 = family == "qwen3"
        return dict(
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            hidden_act=d.get("hidden_act", "silu"),
            attention_bias=qwen3 and d.get("attention_bias", False),
            qkv_bias=not qwen3,
            qk_norm=qwen3,
        )
