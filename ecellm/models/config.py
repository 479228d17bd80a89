"""Reading Hugging Face `config.json` fields that old and new transformers releases write in different places."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import EcellmError
from ..files import read_json
from .layers import RopeScaling


class ConfigError(EcellmError, ValueError):
    """A config.json that is unreadable, incomplete or asks for something ecellm does not support."""


# Decoder-only config.json fields (Llama, Mistral, Phi) that must be positive integers when present.
DECODER_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim")


def config_file(path: str | Path) -> Path:
    """`config.json` given the file or its directory."""
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse `config.json` (given the file or its directory), with errors that name the file."""
    path = config_file(path)
    if not path.is_file():
        raise ConfigError(f"no config.json at {path}")
    config = read_json(path, ConfigError)
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def require(config: dict[str, Any], key: str, family: str) -> Any:
    """`config[key]`, or an error naming the missing field."""
    if config.get(key) is None:
        raise ConfigError(f"{family} config.json lacks the required field {key!r}")
    return config[key]


def positive(value: Any, field: str, integer: bool = False) -> int | float:
    """`value` if it is a positive number (an integer when `integer`), else an error naming the field."""
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        raise ConfigError(f"{field} is {value!r}; expected a positive {'integer' if integer else 'number'}")
    return value


def check_values(
    config: dict[str, Any], family: str, integers: tuple[str, ...] = (), numbers: tuple[str, ...] = ()
) -> None:
    """Refuse, naming the field, a present (non-null) value that is not a positive integer (`integers`) or a
    positive number (`numbers`)."""
    for keys, integer in ((integers, True), (numbers, False)):
        for key in keys:
            if config.get(key) is not None:
                positive(config[key], f"{family} config.json field {key!r}", integer)


def check_heads(config: dict[str, Any], family: str, width_key: str, heads_key: str, kv_heads_key: str) -> None:
    """Attention heads that split the model: without an explicit `head_dim` the heads must divide the width, and
    the key/value heads must divide the query heads (grouped-query attention)."""
    width, heads, kv_heads = config[width_key], config[heads_key], config.get(kv_heads_key) or config[heads_key]
    if config.get("head_dim") is None and width % heads:
        raise ConfigError(f"{family} config.json: {heads_key}={heads} does not divide {width_key}={width}")
    if heads % kv_heads:
        raise ConfigError(f"{family} config.json: {kv_heads_key}={kv_heads} does not divide {heads_key}={heads}")


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 writes `rope_parameters`; older releases `rope_theta` + `rope_scaling` at the top level.
    return config.get("rope_parameters") or {}


def rope_theta(config: dict[str, Any], default: float = 10000.0) -> float:
    """The RoPE base: `rope_parameters.rope_theta` (new) or `rope_theta` (old)."""
    value = _rope_parameters(config).get("rope_theta", config.get("rope_theta"))
    return float(default if value is None else positive(value, "config.json field 'rope_theta'"))


def rope_scaling(config: dict[str, Any]) -> RopeScaling:
    """The RoPE frequency scaling: none, "linear" or "llama3" (Llama-3.x); other types are refused by name."""
    params = dict(_rope_parameters(config))
    if not params and config.get("rope_scaling"):
        params = dict(config["rope_scaling"])
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return RopeScaling()
    if kind not in ("linear", "llama3"):
        raise ConfigError(f"rope scaling type {kind!r} is not supported (supported: 'default', 'linear', 'llama3')")
    factor = float(positive(params.get("factor"), f"{kind} rope scaling's 'factor' in config.json"))
    if kind == "linear":
        return RopeScaling("linear", factor)
    where = "llama3 rope scaling's {!r} in config.json"
    low = float(positive(params.get("low_freq_factor"), where.format("low_freq_factor")))
    high = float(positive(params.get("high_freq_factor"), where.format("high_freq_factor")))
    original = positive(params.get("original_max_position_embeddings"),
                        where.format("original_max_position_embeddings"), integer=True)
    if high <= low:
        raise ConfigError(f"llama3 rope scaling in config.json: high_freq_factor {high} must exceed "
                          f"low_freq_factor {low}")
    return RopeScaling("llama3", factor, low, high, original)


def partial_rotary_factor(config: dict[str, Any], default: float = 1.0) -> float:
    """Share of each head that is rotated: `rope_parameters.partial_rotary_factor` (new) or the top level (old)."""
    value = _rope_parameters(config).get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if value is None:
        return default
    if positive(value, "config.json field 'partial_rotary_factor'") > 1:
        raise ConfigError(f"config.json field 'partial_rotary_factor' is {value!r}; expected a share in (0, 1]")
    return float(value)
