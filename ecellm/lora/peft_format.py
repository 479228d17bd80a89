"""LoRA adapters in the PEFT on-disk format, so they travel to transformers + peft and back.

An adapter directory holds `adapter_config.json` (rank, alpha, dropout, target modules, ...) and
`adapter_model.safetensors` with fp32 tensors `base_model.model.<module>.lora_A.weight` (r, in) and
`.lora_B.weight` (out, r). `save_adapter` writes one from an injected model, `load_adapter` injects LoRA into a base
model as a directory says and loads its weights (checking everything first), `read_adapter_weights` reads the
tensors back under the model's own parameter names (to resume training). The LoRA layer itself is `layer.py`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..files import read_json, write_json
from ..models.config import positive
from ..models.loading import check_finite_tensor, read_safetensors
from .layer import LoRALinear, inject, lora_layers
from .targets import LoRAError, Targets, check_pattern, matches, model_family, select

# PEFT's task_type per family (what PeftModel.from_pretrained uses to pick its wrapper class).
TASK_TYPES: dict[str, str] = {"llama": "CAUSAL_LM", "mistral": "CAUSAL_LM", "qwen2": "CAUSAL_LM", "qwen3": "CAUSAL_LM",
                              "phi": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# --- writing ------------------------------------------------------------------------------------------------------
def _lora_hparams(model: nn.Module) -> tuple[dict[str, LoRALinear], LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise LoRAError(f"{type(model).__name__} has no LoRA layers; call ecellm.lora.inject first")
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        if (layer.r, layer.alpha, layer.dropout, layer.rslora) != (first.r, first.alpha, first.dropout, first.rslora):
            raise LoRAError(f"LoRA layer {name!r} has different r/alpha/dropout/rslora than the others")
    return layers, first


def _target_modules(model: nn.Module, chosen: list[str]) -> Targets:
    """What adapter_config.json's `target_modules` should say so that PEFT's matching selects exactly `chosen`:
    the short names when they do, else a regex of the full names."""
    short = sorted({name.rpartition(".")[2] for name in chosen})
    linear_names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
    if sorted(n for n in linear_names if matches(n, short)) == sorted(chosen):
        return short
    return "|".join(re.escape(n) for n in chosen)


def _adapter_config(model: nn.Module, first: LoRALinear, chosen: list[str], base: str | None) -> dict[str, Any]:
    """The adapter_config.json of PEFT's LoRA for layers `chosen`, which share `first`'s hyperparameters."""
    return {
        "peft_type": "LORA",
        "task_type": TASK_TYPES.get(model_family(model)),
        "base_model_name_or_path": base,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout,
        "use_rslora": first.rslora,
        "target_modules": _target_modules(model, chosen),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(
    model: nn.Module,
    path: str | Path,
    base_model_name_or_path: str | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the LoRA weights in the PEFT on-disk format, loadable by `peft.PeftModel.from_pretrained`.

    Args:
        model: a model with LoRA layers (merged or not).
        path: directory to create; gets `adapter_config.json` and `adapter_model.safetensors` (fp32 tensors
            `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r)).
        base_model_name_or_path: recorded in the config (PEFT uses it to find the base model).
        weights: the LoRA tensors by parameter name (`<module>.lora_A`, `<module>.lora_B`), to use instead of the
            layers' own parameters: the full tensors gathered from an FSDP-sharded model.
    """
    layers, first = _lora_hparams(model)
    config = _adapter_config(model, first, list(layers), base_model_name_or_path)
    tensors = {}
    for name, layer in layers.items():
        for kind in ("lora_A", "lora_B"):
            tensor = getattr(layer, kind) if weights is None else weights[f"{name}.{kind}"]
            tensors[f"{PEFT_PREFIX}{name}.{kind}.weight"] = tensor.detach().float().contiguous().cpu()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / ADAPTER_CONFIG, config)
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})


# --- reading ------------------------------------------------------------------------------------------------------
# adapter_config.json fields that would change what the adapter computes or where it goes; ecellm supports them only
# when unset, false or empty.
_UNSUPPORTED_FIELDS = [
    "use_dora", "fan_in_fan_out", "modules_to_save", "layers_to_transform", "exclude_modules", "rank_pattern",
    "alpha_pattern", "lora_bias", "trainable_token_indices", "target_parameters",
]


def read_adapter_config(path: Path) -> dict[str, Any]:
    """`path/adapter_config.json`, checked to be a LoRA adapter ecellm can load (each error names file and field)."""
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"load_adapter: no {ADAPTER_CONFIG} in {path}")
    config = read_json(file)
    if not isinstance(config, dict):
        raise LoRAError(f"{file}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise LoRAError(f"{file}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters are supported")
    for key in _UNSUPPORTED_FIELDS:
        if config.get(key):
            raise LoRAError(f"{file}: {key}={config[key]!r} is not supported by ecellm.lora")
    if config.get("bias", "none") != "none":
        raise LoRAError(f"{file}: bias={config['bias']!r} is not supported (only 'none')")
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise LoRAError(f"{file}: the required field {key!r} is missing")
    positive(config["r"], f"{file}: r", integer=True)
    alpha, dropout = config["lora_alpha"], config.get("lora_dropout", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise LoRAError(f"{file}: lora_alpha is {alpha!r}; expected a number")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise LoRAError(f"{file}: lora_dropout is {dropout!r}; expected a number in [0, 1)")
    if not isinstance(config.get("use_rslora", False), bool):
        raise LoRAError(f"{file}: use_rslora is {config['use_rslora']!r}; expected true or false")
    targets = config["target_modules"]
    if not (isinstance(targets, str) or isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise LoRAError(f"{file}: target_modules is {targets!r}; expected a list of module names or a regex")
    if isinstance(targets, str):
        check_pattern(targets, str(file))  # compiles, and matches in bounded time
    return config


def _read_adapter_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of `adapter_model.safetensors`, each checked to be floating-point and finite."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (only safetensors adapters are read)")
    tensors = dict(read_safetensors(file))
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise LoRAError(f"{file}: {key} has dtype {tensor.dtype}; LoRA weights must be floating-point")
        check_finite_tensor(tensor, key, file)
    return tensors


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a PEFT-format adapter directory, keyed by the parameter names of an injected model
    (`<module>.lora_A`, `<module>.lora_B`): to restore a training run's LoRA weights in place.

    Raises:
        CheckpointError: the file is unreadable (empty, truncated) or a tensor holds NaN or Inf, naming it.
        LoRAError: an integer tensor or a key that is not a LoRA weight, naming the file and key.
    """
    by_module = _adapter_tensors_by_module(Path(path) / ADAPTER_WEIGHTS)
    # "lora_A.weight" -> "<module>.lora_A"; peft's base_layer.* copy of a targeted lm_head is not a LoRA tensor
    return {f"{module}.{kind.removesuffix('.weight')}": tensor for module, kinds in by_module.items()
            for kind, tensor in kinds.items() if kind.startswith("lora_")}


def _adapter_tensors_by_module(weights_file: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter's tensors grouped by module: {"<module>": {"lora_A.weight": ..., "base_layer.bias": ...}}."""
    key_pattern = re.escape(PEFT_PREFIX) + r"(.+)\.(lora_A\.weight|lora_B\.weight|base_layer\.(?:weight|bias))"
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _read_adapter_tensors(weights_file).items():
        m = re.fullmatch(key_pattern, key)
        if m is None:
            raise LoRAError(f"{weights_file}: unexpected key {key!r} (expected {PEFT_PREFIX}<module>.lora_A.weight)")
        by_module.setdefault(m[1], {})[m[2]] = tensor
    return by_module


def _check_targets(model: nn.Module, tensors: dict[str, dict[str, torch.Tensor]], targets: Targets,
                   path: Path) -> None:
    """The adapter in directory `path` holds weights for exactly the `nn.Linear` modules of `model` that `targets`
    selects."""
    linears = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    selected = select(linears, targets, str(path / ADAPTER_CONFIG))
    weights_file = path / ADAPTER_WEIGHTS
    off_target = sorted(set(tensors) - set(selected))
    if off_target:
        raise LoRAError(
            f"{weights_file}: weights for {off_target}, which are not nn.Linear modules of {type(model).__name__} "
            f"selected by target_modules={targets!r}"
        )
    missing = [n for n in selected if not {"lora_A.weight", "lora_B.weight"} <= tensors.get(n, {}).keys()]
    if missing:
        raise LoRAError(f"{weights_file}: no lora_A/lora_B weights for targeted modules {sorted(missing)}")


def _check_adapter_shapes(tensors: dict[str, dict[str, torch.Tensor]], linears: dict[str, nn.Linear], r: int,
                          weights_file: Path) -> None:
    """Every tensor of the adapter has the shape its module needs: lora_A (r, in), lora_B (out, r), base_layer.*
    the base's own."""
    for name, kinds in tensors.items():
        base = linears[name]
        needs = {
            "lora_A.weight": (r, base.in_features),
            "lora_B.weight": (base.out_features, r),
            "base_layer.weight": tuple(base.weight.shape),
            "base_layer.bias": None if base.bias is None else tuple(base.bias.shape),
        }
        for kind, tensor in kinds.items():
            if tuple(tensor.shape) != needs[kind]:
                need = "no such tensor" if needs[kind] is None else f"shape {needs[kind]}"
                raise LoRAError(
                    f"{weights_file}: {PEFT_PREFIX}{name}.{kind} has shape {tuple(tensor.shape)}, the model needs "
                    f"{need} (r={r} in adapter_config.json)"
                )


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a PEFT-format LoRA adapter directory (written by ecellm or by peft) into `model`: inject LoRA layers with
    the rank, alpha, dropout and target modules its config names, then copy its weights into them.

    Everything is checked before the model is touched, so a failed load leaves `model` exactly as it was. A string
    `target_modules` is a regular expression over module names and must pass `targets.check_pattern` (it compiles
    and matches in bounded time).

    Args:
        model: the base model, without LoRA layers, with module names as in the adapter's keys.
        path: directory with `adapter_config.json` and `adapter_model.safetensors`.

    Returns:
        `model` with LoRA layers holding the adapter's weights (trainable; other parameters frozen). The
        `<module>.base_layer.weight` / `.bias` that peft saves for a targeted `lm_head` are copied into the base.

    Raises:
        LoRAError (a ValueError): unsupported or invalid config fields (a refused target pattern included);
            weights for modules the config does not target or that are not `nn.Linear`; targeted modules without
            weights; unknown keys; shape mismatches; integer tensors; a model that already has LoRA layers (each
            error names the file and key).
        CheckpointError: an empty or truncated weights file, or a tensor holding NaN or Inf.
    """
    path = Path(path)
    config = read_adapter_config(path)
    weights_file = path / ADAPTER_WEIGHTS
    tensors = _adapter_tensors_by_module(weights_file)
    existing = lora_layers(model)
    if existing:
        raise LoRAError(f"load_adapter {path}: the model already has LoRA layers (e.g. {next(iter(existing))!r}); "
                        "load an adapter into a model without them")
    _check_targets(model, tensors, config["target_modules"], path)
    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    _check_adapter_shapes(tensors, linears, config["r"], weights_file)

    inject(
        model,
        r=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        targets="|".join(re.escape(n) for n in sorted(tensors)),  # exactly these modules
        rslora=config.get("use_rslora", False),
    )
    layers = lora_layers(model)
    with torch.no_grad():
        for name, kinds in tensors.items():
            for kind, tensor in kinds.items():
                # "lora_A.weight" -> layer.lora_A, "base_layer.bias" -> layer.bias, ...
                part, attr = kind.split(".")
                getattr(layers[name], attr if part == "base_layer" else part).copy_(tensor)
    return model
