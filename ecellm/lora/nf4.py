"""QLoRA's 4-bit NormalFloat weights (Dettmers et al., 2023): a frozen base stored in ~0.52 bytes per value.

    weight (out, in), flattened row by row, cut into blocks of 64 values:
        absmax[b]  = max |w| over block b                     one fp32 scale per block ...
        code[i]    = the NF4 entry nearest to w[i] / absmax[b]  ... and a 4-bit code per value, two per byte
    the absmax scales, minus their mean, cut into blocks of 256 ("double quantization"):
        scale_code[b] = the 8-bit dynamic-map entry nearest to (absmax[b] - mean) / absmax2[c]
    dequantized:  w[i] ~ NF4[code[i]] * (DYNAMIC[scale_code[b]] * absmax2[c] + mean)

NF4 holds the 16 quantiles of a standard normal, rescaled to [-1, 1] with an exact 0; the dynamic map is the signed
8-bit float-like type of Dettmers (2016). Both, and every rounding step, follow bitsandbytes' `quantize_4bit(...,
quant_type="nf4", compress_statistics=True)` through its portable PyTorch kernels, the oracle `tests/test_nf4.py`
matches bit for bit (bitsandbytes' CPU C kernel searches the 8-bit map approximately: ~0.1% of scale codes differ).

The weight is dequantized to the compute dtype inside each forward, for one matmul, and again in the backward (the
gradient to the input needs it): the full-precision copy of a layer lives for one matmul, never between steps and
never in autograd's saved tensors. Adapters trained on a 4-bit base are ordinary LoRA adapters; merging them needs the
base in bf16/fp32 (adding a LoRA update to 4-bit codes would round most of it away), so `merge` refuses here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .layer import LoRALinear

BLOCK = 64  # weight values per absmax scale
SCALE_BLOCK = 256  # absmax scales per second-level (fp32) scale

# The NormalFloat-4 table, as bitsandbytes ships it (QLoRA, appendix E).
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])

NF4_PAIRS = torch.stack([NF4.repeat_interleave(16), NF4.repeat(16)], dim=1)  # (256, 2): a byte's two values, high first


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map: for exponents 10^-6 .. 10^0, 2^i evenly spaced fractions in [0.1, 1] (their
    midpoints), with both signs, plus 0 and 1; 256 sorted fp32 values."""
    values = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1)
        fractions = 10.0 ** (i - 6) * (edges[:-1] + edges[1:]) / 2
        values += [fractions, -fractions]
    return torch.cat(values).sort().values


DYNAMIC = dynamic_map()


def _nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the `table` entry (sorted) nearest to each value of `x` (a tie goes to the smaller), as uint8."""
    midpoints = (table[:-1] + table[1:]) / 2
    return torch.bucketize(x, midpoints.to(x.device)).to(torch.uint8)


class NF4Weight(nn.Module):
    """A frozen (out, in) weight in NF4 with double-quantized scales; `self(x, bias)` is `F.linear` with it.

    Buffers (they follow `.to(device)` and appear in `state_dict`):
        codes: (out * in / 2,) uint8, two 4-bit codes per byte, the first value in the high nibble.
        scale_codes: (out * in / 64,) uint8, each block's absmax as an 8-bit dynamic-map code.
        scale_scales: (ceil(out * in / 64 / 256),) fp32, the absmax of each block of 256 centred scales.
        scale_offset: () fp32, the mean of the absmax scales, subtracted before their quantization.
    and the two lookup tables `nf4_pairs` and `dynamic` (not saved), so they sit on the weight's device: no copy
    from the host in each forward.
    """

    def __init__(self, codes: torch.Tensor, scale_codes: torch.Tensor, scale_scales: torch.Tensor,
                 scale_offset: torch.Tensor, shape: tuple[int, ...]):
        super().__init__()
        self.shape = torch.Size(shape)
        self.register_buffer("codes", codes)
        self.register_buffer("scale_codes", scale_codes)
        self.register_buffer("scale_scales", scale_scales)
        self.register_buffer("scale_offset", scale_offset)
        self.register_buffer("nf4_pairs", NF4_PAIRS.to(codes.device), persistent=False)
        self.register_buffer("dynamic", DYNAMIC.to(codes.device), persistent=False)

    def absmax(self) -> torch.Tensor:
        """The per-block scales, (out * in / 64,) fp32, from their 8-bit codes."""
        second = self.scale_scales.repeat_interleave(SCALE_BLOCK)[: self.scale_codes.numel()]
        return self.dynamic[self.scale_codes.long()] * second + self.scale_offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight, (out, in) in `dtype` (computed in fp32, then rounded once). Transient memory: ~8 bytes a
        value (int32 byte indices, the fp32 values, the result)."""
        values = self.nf4_pairs[self.codes.int()].view(-1, BLOCK)  # (n / 64, 64) fp32
        return values.mul_(self.absmax()[:, None]).view(self.shape).to(dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(..., in) -> (..., out), in `x`'s dtype."""
        out = _DequantizedLinear.apply(x, self)
        return out if bias is None else out + bias

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, block={BLOCK}, scale_block={SCALE_BLOCK}"


class _DequantizedLinear(torch.autograd.Function):
    """`x @ W^T` with W dequantized for the forward and again for the backward: autograd keeps only the 4-bit W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
        ctx.weight = weight
        return F.linear(x, weight.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_out @ ctx.weight.dequantize(grad_out.dtype), None  # the base is frozen: no gradient for W


def quantize(weight: torch.Tensor) -> NF4Weight:
    """Quantize `weight` (out, in), any float dtype, to NF4 with double-quantized scales.

    Raises:
        ValueError: `in` is not a multiple of 64 (each block must stay within one row).
    """
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        raise ValueError(f"nf4.quantize: weight of shape {tuple(weight.shape)}: needs (out, in), in a multiple of "
                         f"{BLOCK}")
    blocks = weight.detach().float().reshape(-1, BLOCK)  # (n / 64, 64)
    absmax = blocks.abs().amax(dim=1)  # (n / 64,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    codes = _nearest(scaled, NF4).view(-1)
    packed = codes[0::2] << 4 | codes[1::2]  # (n / 2,)

    offset = absmax.mean()
    centred = absmax - offset
    padded = F.pad(centred, (0, -len(centred) % SCALE_BLOCK)).view(-1, SCALE_BLOCK)  # zeros change no absmax
    scale_scales = padded.abs().amax(dim=1)  # (ceil(n / 64 / 256),)
    scale_codes = _nearest(padded / scale_scales.clamp(min=1e-38)[:, None], DYNAMIC).view(-1)[: len(centred)]
    return NF4Weight(packed, scale_codes, scale_scales, offset, tuple(weight.shape))


class NF4Linear(nn.Module):
    """A frozen `nn.Linear` whose weight is an `NF4Weight` (for the large linears LoRA does not wrap).

    Shapes: input (..., in_features) -> output (..., out_features), in the input's dtype.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = quantize(base.weight)
        self.bias = base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@dataclass
class QuantizeReport:
    """What `quantize_model` did: module names quantized, and those left in full precision with the reason."""

    quantized: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        left = "; ".join(f"{name} ({why})" for name, why in self.left.items()) or "none"
        return f"nf4: quantized {len(self.quantized)} linear layers; left in full precision: {left}"


def _reason_to_leave(name: str, weight: torch.Tensor, owners: dict[int, list[str]], skip: list[str]) -> str | None:
    if any(name == s or name.endswith("." + s) for s in skip):
        return "skipped by name"
    if weight.requires_grad:
        return "trainable"
    if weight.shape[1] % BLOCK:
        return f"width {weight.shape[1]} is not a multiple of {BLOCK}"
    others = [n for n in owners[id(weight)] if n != f"{name}.weight"]
    if others:
        return f"weight tied to {others[0]}"
    return None


@torch.no_grad()
def quantize_model(model: nn.Module, skip: list[str] | tuple[str, ...] = ()) -> QuantizeReport:
    """Store the frozen weight of every `LoRALinear` and every other `nn.Linear` of `model` as NF4, in place.

    Call it after `lora.inject` (which freezes the base). A layer is left in full precision, and named in the report,
    when its weight is trainable, its width (in_features) is not a multiple of 64, its weight is tied to another
    module (an LM head sharing the embedding: quantizing it would add a copy, not save one), or its name (or dotted
    suffix) is in `skip`.

    Returns:
        the report of what was quantized and what was left.
    """
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    report = QuantizeReport()
    linears = [(n, m) for n, m in model.named_modules()  # a layer quantized by an earlier call is passed over
               if isinstance(m, (nn.Linear, LoRALinear)) and isinstance(m.weight, torch.Tensor)]
    for name, module in linears:
        why = _reason_to_leave(name, module.weight, owners, list(skip))
        if why:
            report.left[name] = why
            continue
        if isinstance(module, LoRALinear):
            weight = module.weight
            del module.weight  # a registered Parameter: remove it before a module takes the name
            module.weight = quantize(weight)
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, NF4Linear(module))
        report.quantized.append(name)
    return report
