"""Reading Hugging Face `config.json` fields that old and new transformers releases write in different places."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that is unreadable, incomplete or asks for something ecellm does not support."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse `config.json` (given the file or its directory), with errors that name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json at {path}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def require(config: dict[str, Any], key: str, family: str) -> Any:
    """`config[key]`, or an error naming the missing field."""
    if config.get(key) is None:
        raise ConfigError(f"{family} config.json lacks the required field {key!r}")
    return config[key]


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 writes `rope_parameters`; older releases `rope_theta` + `rope_scaling` at the top level.
    return config.get("rope_parameters") or {}


def rope_theta(config: dict[str, Any], default: float = 10000.0) -> float:
    """The RoPE base: `rope_parameters.rope_theta` (new) or `rope_theta` (old)."""
    value = _rope_parameters(config).get("rope_theta", config.get("rope_theta"))
    return float(default if value is None else value)


def rope_scaling_factor(config: dict[str, Any]) -> float:
    """The linear RoPE scaling factor (1.0 without scaling); other scaling types are refused by name."""
    params = dict(_rope_parameters(config))
    if not params and config.get("rope_scaling"):
        params = dict(config["rope_scaling"])
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return 1.0
    if kind == "linear":
        return float(params["factor"])
    raise ConfigError(f"rope scaling type {kind!r} is not supported (supported: 'default', 'linear')")


def partial_rotary_factor(config: dict[str, Any], default: float = 1.0) -> float:
    """Share of each head that is rotated: `rope_parameters.partial_rotary_factor` (new) or the top level (old)."""
    value = _rope_parameters(config).get("partial_rotary_factor", config.get("partial_rotary_factor"))
    return float(default if value is None else value)


def checkpoint_dtype(config: dict[str, Any]) -> str | None:
    """The dtype the checkpoint was saved in: `dtype` (new) or `torch_dtype` (old)."""
    return config.get("dtype") or config.get("torch_dtype")
