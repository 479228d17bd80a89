"""LoRA (Hu et al., 2021) for any `nn.Module`: wrap chosen `nn.Linear`s in place, train two thin matrices, merge them
back, and read and write adapters in the PEFT on-disk format so they travel to transformers + peft and back.

    y = x W^T + b + scaling * dropout(x) A^T B^T        A: (r, in), B: (out, r), scaling = alpha / r

`inject` swaps each targeted `nn.Linear` for a `LoRALinear` that keeps the very same `weight` / `bias` Parameters
(so state-dict keys and tied weights, e.g. `lm_head` sharing `embed_tokens.weight`, stay as they were) and adds two
plain fp32 Parameters `lora_A` / `lora_B`. Everything else in the model is frozen.

Precision: the LoRA path runs in the LoRA dtype (fp32): the input is cast to it, and the (B, T, out) update is cast to
the base output's dtype and added there. A bf16 base thus trains fp32 LoRA weights, as the paper's recipe does.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .models.config import positive
from .models.loading import check_finite_tensor, read_safetensors

# The paper's targets per family: every attention and MLP projection plus the LM head. Entries a model lacks are
# skipped (original T5 has `wi`, T5 v1.1 / Flan-T5 have `wi_0`, `wi_1`).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head"],
    "t5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo", "lm_head"],
}
# The paper's Phi-2 target names come from the old remote-code layout; map them onto the native layout.
PHI_ALIASES: dict[str, list[str]] = {
    "Wqkv": ["q_proj", "k_proj", "v_proj"], "out_proj": ["dense"], "linear": ["lm_head"],
}
# PEFT's task_type per family (what PeftModel.from_pretrained uses to pick its wrapper class).
TASK_TYPES: dict[str, str] = {"llama": "CAUSAL_LM", "mistral": "CAUSAL_LM", "phi": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

Targets = list[str] | str


class LoRALinear(nn.Module):
    """An `nn.Linear` with a frozen base weight and a trainable low-rank update.

    Args:
        base: the linear layer to wrap; its `weight` and `bias` Parameters are reused, not copied.
        r: rank of the update.
        alpha: scale numerator; the update is multiplied by `alpha / r` (`alpha / sqrt(r)` with `rslora`).
        dropout: dropout probability on the input of `lora_A` (skipped entirely when 0).
        rslora: use rank-stabilised scaling `alpha / sqrt(r)`.

    Shapes: input (..., in_features) -> output (..., out_features); `lora_A` (r, in), `lora_B` (out, r), fp32.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # same Parameter object: keeps ties and state-dict keys
        self.bias = base.bias
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=torch.float32))
        self.r, self.alpha, self.dropout, self.rslora = r, alpha, dropout, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.merged = False
        self.tied_to: str | None = None  # set by `merge` when it had to untie a shared weight
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform (as `nn.Linear` initialises its weight), B = 0: the update starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # (..., out) in the base dtype
        if self.merged:
            return out
        h = x.to(self.lora_A.dtype)
        scaling = self.scaling
        if self.dropout > 0.0 and self.training:
            if h.device.type == "cpu":
                # F.dropout on CPU draws with bernoulli_ and rescales the wide input; one uniform draw and a bool mask
                # are faster and lighter to keep for backward, and the 1/(1-p) goes onto the thin tensor below.
                h = h * (torch.rand_like(h) >= self.dropout)
                scaling = scaling / (1.0 - self.dropout)
            else:
                h = F.dropout(h, self.dropout)  # a fused kernel on GPUs
        h = F.linear(h, self.lora_A) * scaling  # (..., r): scale the thin tensor, not the wide one
        return out.add_(F.linear(h, self.lora_B).to(out.dtype))  # in place: no second (..., out) buffer

    def delta_weight(self) -> torch.Tensor:
        """The update `scaling * B @ A` as an fp32 (out, in) matrix."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """`W + scaling * B @ A` (computed in fp32, returned in W's dtype), without changing the layer."""
        if self.merged:
            return self.weight.detach()
        return (self.weight.detach().float() + self.delta_weight()).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, rslora={self.rslora}, merged={self.merged}"
        )


def matches(name: str, targets: Targets) -> bool:
    """PEFT's rule: a string is a regular expression that must match the whole module name; a list matches a name
    equal to an entry or ending in `.<entry>`."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The `LoRALinear` modules of `model`, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _resolve_targets(model: nn.Module, targets: Targets | None, linear_names: list[str]) -> Targets:
    family = _model_type(model)
    if targets is None:
        if family not in DEFAULT_TARGETS:
            raise ValueError(
                f"inject: no default LoRA targets for {type(model).__name__} (config.model_type={family!r}); "
                f"pass targets=[...] (families with defaults: {sorted(DEFAULT_TARGETS)})"
            )
        return [t for t in DEFAULT_TARGETS[family] if any(matches(n, [t]) for n in linear_names)]
    if isinstance(targets, str):
        return targets
    targets = list(targets)
    if family == "phi":
        targets = [native for t in targets for native in PHI_ALIASES.get(t, [t])]
    return list(dict.fromkeys(targets))  # drop duplicates, keep order


def inject(
    model: nn.Module,
    r: int = 16,
    alpha: float = 16,
    dropout: float = 0.0,
    targets: Targets | None = None,
    *,
    rslora: bool = False,
) -> nn.Module:
    """Replace the targeted `nn.Linear`s of `model` by `LoRALinear`s in place and freeze every other parameter.

    Args:
        model: any `nn.Module`; ecellm models (and others with `config.model_type`) get the paper's default targets.
        r, alpha, dropout, rslora: see `LoRALinear`.
        targets: module names to wrap: a list (each entry an exact module name or a dotted suffix such as
            `"q_proj"` or `"self_attn.q_proj"`) or a single regular expression matched against whole names.
            None: the paper's targets for `model.config.model_type` (see `DEFAULT_TARGETS`; entries the model lacks
            are skipped). For Phi, the old names
            `Wqkv`, `out_proj`, `linear` are accepted and mapped onto the native layout.

    Returns:
        `model`, with LoRA parameters trainable (fp32, on the base weights' device) and nothing else.

    Raises:
        ValueError: `model` already holds LoRA layers; a given list entry or regex matches no `nn.Linear` (the message
            lists the Linear names that exist); no default targets for this model.
    """
    existing = lora_layers(model)
    if existing:
        raise ValueError(f"inject: model already has LoRA layers (e.g. {next(iter(existing))!r}); inject once")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = _resolve_targets(model, targets, list(linears))
    chosen = [name for name in linears if matches(name, targets)]
    unmatched = [t for t in targets if not any(matches(n, [t]) for n in linears)] if isinstance(targets, list) else []
    if not chosen or unmatched:
        what = f"targets {unmatched}" if unmatched else f"targets {targets!r}"
        raise ValueError(
            f"inject: {what} match no nn.Linear in {type(model).__name__}; Linear modules: {list(linears)}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoRALinear(linears[name], r, alpha, dropout, rslora)
        layer.train(linears[name].training)  # an eval-mode model stays in eval mode (no dropout)
        setattr(parent, child, layer)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors, keyed as in `model.state_dict()` (`<module>.lora_A` (r, in), `<module>.lora_B` (out, r)),
    so `model.load_state_dict(sd, strict=False)` restores them."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied Parameter counts once, as in PEFT's `get_nb_trainable_parameters`."""
    params = list(model.parameters())  # deduplicated by identity
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _tie_partner(model: nn.Module, name: str, layer: LoRALinear) -> str | None:
    """Another parameter name under which `layer.weight` is registered (a tied weight), or None."""
    for other, p in model.named_parameters(remove_duplicate=False):
        if p is layer.weight and other != f"{name}.weight":
            return other
    return None


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (`W += scaling * B @ A`, in fp32, then cast back); the LoRA path
    is then skipped. Merging a merged layer does nothing. A weight tied to another module (e.g. `lm_head` sharing
    `embed_tokens.weight`) is untied first, so the other module keeps the base weight; `unmerge` ties it again."""
    for name, layer in lora_layers(model).items():
        if layer.merged:
            continue
        layer.tied_to = _tie_partner(model, name, layer)
        if layer.tied_to is None:
            layer.weight.copy_(layer.merged_weight())
        else:
            layer.weight = nn.Parameter(layer.merged_weight(), requires_grad=False)
        layer.merged = True
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`: subtract the update again (fp32 math, so a bf16 weight may differ from the original by one
    rounding step), or, for a weight that `merge` untied, re-tie it to the original shared Parameter."""
    for layer in lora_layers(model).values():
        if not layer.merged:
            continue
        if layer.tied_to is None:
            layer.weight.copy_((layer.weight.float() - layer.delta_weight()).to(layer.weight.dtype))
        else:
            layer.weight = model.get_parameter(layer.tied_to)
            layer.tied_to = None
        layer.merged = False
    return model


def _lora_hparams(model: nn.Module) -> tuple[dict[str, LoRALinear], LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers; call ecellm.lora.inject first")
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        if (layer.r, layer.alpha, layer.dropout, layer.rslora) != (first.r, first.alpha, first.dropout, first.rslora):
            raise ValueError(f"LoRA layer {name!r} has different r/alpha/dropout/rslora than the others")
    return layers, first


def _target_modules(model: nn.Module, chosen: list[str]) -> Targets:
    """What adapter_config.json's `target_modules` should say so that PEFT's matching selects exactly `chosen`:
    the short names when they do, else a regex of the full names."""
    short = sorted({name.rpartition(".")[2] for name in chosen})
    linear_names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
    if sorted(n for n in linear_names if matches(n, short)) == sorted(chosen):
        return short
    return "|".join(re.escape(n) for n in chosen)


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
    family = _model_type(model)
    config = {
        "peft_type": "LORA",
        "task_type": TASK_TYPES.get(family),
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout,
        "use_rslora": first.rslora,
        "target_modules": _target_modules(model, list(layers)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {}
    for name, layer in layers.items():
        for kind in ("lora_A", "lora_B"):
            tensor = getattr(layer, kind) if weights is None else weights[f"{name}.{kind}"]
            tensors[f"{PEFT_PREFIX}{name}.{kind}.weight"] = tensor.detach().float().contiguous().cpu()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})


# adapter_config.json fields that would change what the adapter computes or where it goes; ecellm supports them only
# when unset, false or empty.
_UNSUPPORTED_FIELDS = [
    "use_dora", "fan_in_fan_out", "modules_to_save", "layers_to_transform", "exclude_modules", "rank_pattern",
    "alpha_pattern", "lora_bias", "trainable_token_indices", "target_parameters",
]


def _read_adapter_config(path: Path) -> dict[str, Any]:
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"load_adapter: no {ADAPTER_CONFIG} in {path}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters are supported")
    for key in _UNSUPPORTED_FIELDS:
        if config.get(key):
            raise ValueError(f"{file}: {key}={config[key]!r} is not supported by ecellm.lora")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{file}: bias={config['bias']!r} is not supported (only 'none')")
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise ValueError(f"{file}: the required field {key!r} is missing")
    positive(config["r"], f"{file}: r", integer=True)
    alpha, dropout = config["lora_alpha"], config.get("lora_dropout", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{file}: lora_alpha is {alpha!r}; expected a number")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{file}: lora_dropout is {dropout!r}; expected a number in [0, 1)")
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"{file}: use_rslora is {config['use_rslora']!r}; expected true or false")
    targets = config["target_modules"]
    if not (isinstance(targets, str) or isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise ValueError(f"{file}: target_modules is {targets!r}; expected a list of module names or a regex")
    return config


def _read_adapter_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of `adapter_model.safetensors`, each checked to be floating-point and finite."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (only safetensors adapters are read)")
    tensors = dict(read_safetensors(file))
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{file}: {key} has dtype {tensor.dtype}; LoRA weights must be floating-point")
        check_finite_tensor(tensor, key, file)
    return tensors


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a PEFT-format adapter directory, keyed by the parameter names of an injected model
    (`<module>.lora_A`, `<module>.lora_B`): to restore a training run's LoRA weights in place.

    Raises:
        CheckpointError: the file is unreadable (empty, truncated) or a tensor holds NaN or Inf, naming it.
        ValueError: an integer tensor or a key that is not a LoRA weight, naming the file and key.
    """
    file = Path(path) / ADAPTER_WEIGHTS
    out = {}
    for key, tensor in _read_adapter_tensors(file).items():
        m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+\.lora_[AB])\.weight", key)
        if m is None and ".base_layer." in key:
            continue  # peft's copy of a targeted lm_head's base weight: not a LoRA tensor
        if m is None:
            raise ValueError(f"{file}: unexpected key {key!r} (expected {PEFT_PREFIX}<module>.lora_A.weight)")
        out[m[1]] = tensor
    return out


def _check_adapter_shapes(lora: dict[str, dict[str, torch.Tensor]], linears: dict[str, nn.Linear], r: int,
                          weights_file: Path) -> None:
    """Every tensor of the adapter has the shape its module needs: lora_A (r, in), lora_B (out, r), base_layer.*
    the base's own."""
    for name, tensors in lora.items():
        base = linears[name]
        needs = {
            "lora_A.weight": (r, base.in_features),
            "lora_B.weight": (base.out_features, r),
            "base_layer.weight": tuple(base.weight.shape),
            "base_layer.bias": None if base.bias is None else tuple(base.bias.shape),
        }
        for kind, tensor in tensors.items():
            if tuple(tensor.shape) != needs[kind]:
                need = "no such tensor" if needs[kind] is None else f"shape {needs[kind]}"
                raise ValueError(
                    f"{weights_file}: {PEFT_PREFIX}{name}.{kind} has shape {tuple(tensor.shape)}, the model needs "
                    f"{need} (r={r} in adapter_config.json)"
                )


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Inject LoRA as a PEFT-format adapter directory says and load its weights (written by us or by peft).

    Everything is checked before the model is touched, so a failed load leaves `model` exactly as it was.

    Args:
        model: the base model, without LoRA layers, with module names as in the adapter's keys.
        path: directory with `adapter_config.json` and `adapter_model.safetensors`.

    Returns:
        `model` with LoRA layers holding the adapter's weights (trainable; other parameters frozen). The
        `<module>.base_layer.weight` / `.bias` that peft saves for a targeted `lm_head` are copied into the base.

    Raises:
        ValueError: unsupported or invalid config fields; weights for modules the config does not target or that are
            not `nn.Linear`; targeted modules without weights; unknown keys; shape mismatches; integer tensors; a
            model that already has LoRA layers (each error names the file and key).
        CheckpointError: an empty or truncated weights file, or a tensor holding NaN or Inf.
    """
    path = Path(path)
    config = _read_adapter_config(path)
    weights_file = path / ADAPTER_WEIGHTS
    key_pattern = re.escape(PEFT_PREFIX) + r"(.+)\.(lora_A\.weight|lora_B\.weight|base_layer\.(?:weight|bias))"
    lora: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"lora_A.weight": ..., "base_layer.bias": ...}
    for key, tensor in _read_adapter_tensors(weights_file).items():
        m = re.fullmatch(key_pattern, key)
        if m is None:
            raise ValueError(f"{weights_file}: unexpected key {key!r} (expected {PEFT_PREFIX}<module>.lora_A.weight)")
        lora.setdefault(m[1], {})[m[2]] = tensor
    existing = lora_layers(model)
    if existing:
        raise ValueError(f"load_adapter {path}: the model already has LoRA layers (e.g. {next(iter(existing))!r}); "
                         "load an adapter into a model without them")
    targets = config["target_modules"]
    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    off_target = sorted(n for n in lora if n not in linears or not matches(n, targets))
    if off_target:
        raise ValueError(
            f"{weights_file}: weights for {off_target}, which are not nn.Linear modules of {type(model).__name__} "
            f"selected by target_modules={targets!r}"
        )
    missing = sorted(
        n for n in linears if matches(n, targets) and not {"lora_A.weight", "lora_B.weight"} <= lora.get(n, {}).keys()
    )
    if missing:
        raise ValueError(f"{weights_file}: no lora_A/lora_B weights for targeted modules {missing}")
    _check_adapter_shapes(lora, linears, config["r"], weights_file)

    inject(
        model,
        r=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        targets="|".join(re.escape(n) for n in sorted(lora)),  # exactly these modules
        rslora=config.get("use_rslora", False),
    )
    layers = lora_layers(model)
    with torch.no_grad():
        for name, tensors in lora.items():
            for kind, tensor in tensors.items():
                # "lora_A.weight" -> layer.lora_A, "base_layer.bias" -> layer.bias, ...
                part, attr = kind.split(".")
                getattr(layers[name], attr if part == "base_layer" else part).copy_(tensor)
    return model


def _parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" / "500MB" (decimal units, as transformers reads them)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if m is None:
        raise ValueError(f"max_shard_size {size!r}: expected bytes (int) or a string such as '5GB' or '500MB'")
    return int(float(m[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m[2]])


def _checkpoint_entries(model: nn.Module) -> dict[str, tuple[torch.Tensor, LoRALinear | None]]:
    """Checkpoint key -> (the model's tensor, the LoRA layer whose update must be merged into it, or None).

    LoRA tensors are dropped. A tensor shared by several keys (a tied weight) is kept under its first key only, as
    Hugging Face checkpoints store it, unless a LoRA layer owns it (its merged value is its own)."""
    owners = {f"{name}.weight": layer for name, layer in lora_layers(model).items()}
    entries: dict[str, tuple[torch.Tensor, LoRALinear | None]] = {}
    seen: set[int] = set()  # storage addresses already written
    for key, tensor in model.state_dict().items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        if key in owners:
            entries[key] = (tensor, owners[key])
            continue
        storage = tensor.untyped_storage().data_ptr()
        if storage not in seen:
            seen.add(storage)
            entries[key] = (tensor, None)
    return entries


def save_merged(model: nn.Module, path: str | Path, max_shard_size: int | str = "5GB") -> None:
    """Write the model with LoRA merged in as a Hugging Face checkpoint that transformers and ecellm both load.

    The model itself is not changed: merged weights are computed out of place (fp32 math, base dtype), one shard at a
    time, so the extra memory is about one shard.

    Args:
        model: an ecellm model (needs `model.config.raw`, the config.json dict it was built from), LoRA optional.
        path: directory to create (absent or empty); gets `config.json` and `model.safetensors`, or, past
            `max_shard_size`, `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`. It is
            written under a temporary name beside it and renamed when complete, so a crash leaves no half checkpoint.
        max_shard_size: shard size limit, in bytes or as a string such as "5GB".
    """
    final = Path(path)
    if final.exists() and any(final.iterdir()):
        raise FileExistsError(f"save_merged: {final} exists and is not empty; choose a new directory")
    raw = getattr(getattr(model, "config", None), "raw", None)
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"save_merged: {type(model).__name__} has no config.raw (the config.json dict) to write")
    entries = _checkpoint_entries(model)
    config = dict(raw)
    if config.get("tie_word_embeddings") and "lm_head" in lora_layers(model):
        config["tie_word_embeddings"] = False  # the merged head now differs from the embedding: store both
        if _model_type(model) == "t5":  # old T5 configs let the tie also decide the output scaling: pin it
            config["scale_decoder_outputs"] = model.config.scale_decoder_outputs
    dtypes = {t.dtype for t, _ in entries.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        config.pop("torch_dtype", None)
        config["dtype"] = str(dtypes.pop()).removeprefix("torch.")

    limit = _parse_size(max_shard_size)
    shards: list[list[str]] = [[]]  # checkpoint keys per shard, filled in order up to `limit` bytes
    size = total = 0
    for key, (tensor, _) in entries.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
        total += nbytes

    final.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))  # renamed into place when complete
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    for name, keys in zip(names, shards):
        tensors = {}
        for key in keys:
            tensor, layer = entries[key]
            tensors[key] = (tensor if layer is None else layer.merged_weight()).detach().contiguous().cpu()
        save_file(tensors, str(path / name), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    path.chmod(0o755)
    if final.exists():
        final.rmdir()
    path.rename(final)
