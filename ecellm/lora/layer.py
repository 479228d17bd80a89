"""LoRA (Hu et al., 2021) for any `nn.Module`: wrap chosen `nn.Linear`s in place, train two thin matrices, merge them
back.

    y = x W^T + b + scaling * dropout(x) A^T B^T        A: (r, in), B: (out, r), scaling = alpha / r

`inject` swaps each targeted `nn.Linear` for a `LoRALinear` that keeps the very same `weight` / `bias` Parameters
(so state-dict keys and tied weights, e.g. `lm_head` sharing `embed_tokens.weight`, stay as they were) and adds two
plain fp32 Parameters `lora_A` / `lora_B`. Everything else in the model is frozen. Which Linears are targets is
`targets.py`; 4-bit bases are `nf4.py`, adapter files `peft_format.py`, merged checkpoints `merged.py`.

Precision: the LoRA path runs in the LoRA dtype (fp32): the input is cast to it, and the (B, T, out) update is cast to
the base output's dtype and added there. A bf16 base thus trains fp32 LoRA weights (the reference
code's peft 0.7.1 kept them in bf16: see the README's "Differences from the reference code").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .targets import LoRAError, Targets, refuse_uncalled, resolve_targets, select


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
            raise LoRAError(f"LoRA rank r must be positive, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {dropout}")
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
        base = self.weight  # a weight tensor, or a 4-bit `nf4.NF4Weight` module that computes its own linear
        out = F.linear(x, base, self.bias) if isinstance(base, torch.Tensor) else base(x, self.bias)  # (..., out)
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


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The `LoRALinear` modules of `model`, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _choose(model: nn.Module, targets: Targets | None) -> dict[str, nn.Linear]:
    """The Linears of `model` that `targets` selects, by name, each one that will run its LoRA branch."""
    existing = lora_layers(model)
    if existing:
        raise LoRAError(f"inject: model already has LoRA layers (e.g. {next(iter(existing))!r}); inject once")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = resolve_targets(model, targets, list(linears))
    chosen = select(linears, targets, "inject")
    unmatched = [t for t in targets if not select(linears, [t], "inject")] if isinstance(targets, list) else []
    if not chosen or unmatched:
        what = f"targets {unmatched}" if unmatched else f"targets {targets!r}"
        raise LoRAError(f"inject: {what} match no nn.Linear in {type(model).__name__}; Linear modules: "
                        f"{list(linears)}")
    if "" in chosen:  # the root has no parent to be replaced in: wrapping it in place cannot work
        raise LoRAError(f"inject: targets {targets!r} match the {type(model).__name__} itself; inject replaces the "
                        "Linear layers inside a model: wrap a lone nn.Linear with LoRALinear(linear, r, alpha)")
    refuse_uncalled(model, chosen)
    return {name: linears[name] for name in chosen}


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
            `"q_proj"` or `"self_attn.q_proj"`) or a single regular expression matched against whole names (PEFT's
            rule; `targets.check_pattern` says which patterns are refused). None: the paper's targets for
            `model.config.model_type` (`DEFAULT_TARGETS`; entries the model lacks are skipped). For Phi, the old
            names `Wqkv`, `out_proj`, `linear` are accepted and mapped onto the native layout.

    Returns:
        `model`, with LoRA parameters trainable (fp32, on the base weights' device) and nothing else.

    Raises:
        LoRAError (a ValueError): `model` already holds LoRA layers; a given list entry or pattern matches no
            `nn.Linear`, or no default targets exist for this model (both messages list the Linear names); the
            targets match `model` itself (an `nn.Linear` has no parent to be replaced in); a target whose owner
            never calls it (`nn.MultiheadAttention.out_proj`, see `targets.WEIGHT_READERS`), so its LoRA branch
            would never run.
    """
    chosen = _choose(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in chosen.items():
        parent_name, _, child = name.rpartition(".")
        layer = LoRALinear(linear, r, alpha, dropout, rslora)
        layer.train(linear.training)  # an eval-mode model stays in eval mode (no dropout)
        setattr(model.get_submodule(parent_name), child, layer)
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
    `embed_tokens.weight`) is untied first, so the other module keeps the base weight; `unmerge` ties it again.
    A 4-bit (NF4) base is refused (LoRAError): merge into a bf16/fp32 copy of it."""
    layers = lora_layers(model)
    quantized = [name for name, layer in layers.items() if not isinstance(layer.weight, torch.Tensor)]
    if quantized:  # an NF4Weight module: a LoRA update added to 4-bit codes would mostly round away
        raise LoRAError(f"merge: {quantized[0]}.weight (and {len(quantized) - 1} more) is a 4-bit NF4 weight; merge "
                        "into a bf16/fp32 copy of the base instead: from_pretrained(base), "
                        "load_adapter(model, adapter_dir), then merge")
    for name, layer in layers.items():
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
