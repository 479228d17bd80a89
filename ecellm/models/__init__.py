"""Model families and their construction from Hugging Face checkpoints.

`from_pretrained(dir)` reads `config.json`, picks the family by `model_type` and loads the weights;
`from_config(config)` builds the same model without weights (on the meta device by default);
`load_pretrained(dir_or_name)` returns the model with its tokenizer, checked to fit, and `template_for` the prompt
template a model family is trained with. Wherever a checkpoint directory is taken, a known model's name
(`ecellm.models.default.MODELS`, e.g. "smollm2") works too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..labels import IGNORE_INDEX
from ..tokenizer import Tokenizer, load_tokenizer
from .config import ConfigError, config_file, read_config_file
from .default import UnknownModelError, resolve_model
from .llama import LlamaConfig, LlamaForCausalLM
from .loading import CheckpointError, check_config_fits_weights, load_checkpoint
from .phi import PhiConfig, PhiForCausalLM
from .qwen import QwenConfig
from .t5 import T5Config, T5ForConditionalGeneration

# model_type -> (config dataclass, model class)
FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (LlamaConfig, LlamaForCausalLM),
    "phi": (PhiConfig, PhiForCausalLM),
    "qwen2": (QwenConfig, LlamaForCausalLM),
    "qwen3": (QwenConfig, LlamaForCausalLM),
    "t5": (T5Config, T5ForConditionalGeneration),
}


def parse_config(config: dict[str, Any]):
    """The family's config dataclass for a `config.json` dict; unknown `model_type` lists the supported ones."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type][0].from_dict(config)


def from_config(
    config: str | Path | dict[str, Any], dtype: torch.dtype = torch.float32, device: str | torch.device = "meta"
) -> nn.Module:
    """Build a model from a config without loading weights.

    On the meta device (the default) no memory is allocated: use it to inspect modules, count parameters or
    initialise FSDP. On a real device the weights are randomly initialised.

    Args:
        config: a `config.json` path, its directory, or the parsed dict.
        dtype: parameter dtype.
        device: where to allocate parameters.
    """
    if isinstance(config, dict):
        raw, parsed = config, parse_config(config)
    else:
        raw = read_config_file(config)
        try:
            parsed = parse_config(raw)
        except ConfigError as e:
            raise ConfigError(f"{config_file(config)}: {e}") from None
    with torch.device(device):
        model = FAMILIES[raw["model_type"]][1](parsed)
    return model.to(dtype)


def from_pretrained(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    check_finite: bool = True,
) -> nn.Module:
    """Load a Hugging Face checkpoint directory (`config.json` + safetensors, sharded or not).

    The model is built on the meta device and the checkpoint's tensors are assigned to it, cast to `dtype`, so peak
    memory stays near one copy of the weights. Returned in eval mode.

    Args:
        path: checkpoint directory, or a known model's name (`ecellm.models.default.MODELS`, fetched on first use).
        dtype: parameter dtype (the checkpoint's own dtype is ignored).
        device: where the weights go.
        allow_pickle: also accept `pytorch_model.bin` files (loaded with `torch.load(weights_only=True)`).
        check_finite: refuse a weight holding NaN or Inf, naming it (False skips the pass over the weights).
    Raises:
        UnknownModelError: `path` is neither a folder nor a known model's name.
        ConfigError: config.json unreadable, with invalid values, or with layer counts or sizes beyond what the
            weights hold (checked before the model is built), naming the file and field.
        CheckpointError: weight files unreadable or not fitting the config, naming the file and tensor.
    """
    path = resolve_model(path)
    check_config_fits_weights(read_config_file(path), path, allow_pickle)
    model = from_config(path, dtype=dtype, device="meta")
    load_checkpoint(model, path, dtype, device, allow_pickle, check_finite)
    return model.eval()


def load_pretrained(
    name_or_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: str | Path | None = None,
) -> tuple[nn.Module, Tokenizer]:
    """The model and its tokenizer from a checkpoint directory or a known model's name, checked to fit each other
    (the one loader of `ecellm train`, `eval`, `generate` and the examples).

    The tokenizer is loaded first (quick, and a broken one is told before the weights load), then the model
    (`from_pretrained`, in eval mode), then the tokenizer's ids are checked against the model's embedding.

    Args:
        name_or_dir: checkpoint directory, or a known model's name (`ecellm.models.default.MODELS`).
        dtype: parameter dtype.
        device: where the weights go.
        tokenizer: a tokenizer directory or file (or a known model's name) other than the model's own.
    Returns:
        (model in eval mode, its tokenizer).
    """
    path = resolve_model(name_or_dir)
    loaded_tokenizer = load_tokenizer(path if tokenizer is None else tokenizer)
    model = from_pretrained(path, dtype=dtype, device=device)
    loaded_tokenizer.check_fits(model.config.vocab_size, str(path))
    return model, loaded_tokenizer


TEMPLATES = ("alpaca", "mistral")


def template_for(model_type: str, template: str | None = None) -> str:
    """The prompt template to use: `template` when one is given, else the family's own ("mistral", the `[INST]`
    form, for Mistral models; "alpaca" for every other family, as eCeLLM trains them).

    Args:
        model_type: the model's `config.json` model_type (`model.config.model_type`).
        template: an explicit choice (one of `TEMPLATES`), or None / "" for the family's own.
    """
    if template:
        if template not in TEMPLATES:
            raise ConfigError(f"prompt template {template!r} is not one of {', '.join(TEMPLATES)}")
        return template
    return "mistral" if model_type == "mistral" else "alpaca"


__all__ = [
    "FAMILIES",
    "IGNORE_INDEX",
    "TEMPLATES",
    "CheckpointError",
    "ConfigError",
    "LlamaConfig",
    "LlamaForCausalLM",
    "PhiConfig",
    "PhiForCausalLM",
    "QwenConfig",
    "T5Config",
    "T5ForConditionalGeneration",
    "UnknownModelError",
    "from_config",
    "from_pretrained",
    "load_pretrained",
    "parse_config",
    "template_for",
]
