"""Building blocks shared by the model families: RMSNorm, rotary embeddings, attention with a KV cache, and the gated
MLP.

Shape legend: B batch, T query length, S key length (cache included), H hidden size, nh query heads,
nkv key/value heads, hs head size, V vocabulary.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    # GPT-2's tanh approximation, under the names configs use for it.
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    """The activation function a config names (`hidden_act`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """Root-mean-square norm: `weight * x / sqrt(mean(x^2) + eps)`, computed in fp32 and cast back before scaling.

    Args:
        dim: size of the last dimension.
        eps: added to the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


@dataclass(frozen=True)
class RopeScaling:
    """How a config stretches the rotary frequencies for contexts longer than pretraining's.

    Attributes:
        rope_type: "default" (no scaling), "linear" (every frequency divided by `factor`) or "llama3" (Llama-3.1:
            low frequencies divided by `factor`, high ones kept, the band between interpolated smoothly).
        factor: the stretch.
        low_freq_factor, high_freq_factor, original_max_position_embeddings: "llama3" only: wavelengths longer than
            `original / low_freq_factor` are stretched, shorter than `original / high_freq_factor` kept.
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def rope_inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling, device=None) -> torch.Tensor:
    """The rotary inverse frequencies `theta^(-2i/rotary_dim)`, scaled as `scaling` says; (rotary_dim/2,) fp32."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type != "llama3":
        return inv_freq
    original, low, high = scaling.original_max_position_embeddings, scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    stretched = torch.where(wavelen > original / low, inv_freq / scaling.factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)  # 0 at the low-frequency edge of the band, 1 at the high
    smoothed = (1 - smooth) * stretched / scaling.factor + smooth * stretched
    in_band = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(in_band, smoothed, stretched)


def rope_cos_sin(
    position_ids: torch.Tensor, rotary_dim: int, theta: float, scaling: RopeScaling = RopeScaling(), dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and signed sines of the rotary embedding at the given positions.

    Computed on the fly (a few thousand flops) rather than stored, so a model built on the meta device needs no buffer
    re-initialisation. The sines of the first half of the channels come negated, so `apply_rope` swaps the two halves
    without negating one of them.

    Args:
        position_ids: (B, T) integer positions.
        rotary_dim: number of rotated channels per head (even).
        theta: the RoPE base.
        scaling: the config's frequency scaling (`RopeScaling`; none by default).
    Returns:
        cos, sin: (B, T, rotary_dim) in `dtype`; `sin` is `(-sin(f), sin(f))` where `cos` is `(cos(f), cos(f))`.
    """
    inv_freq = rope_inv_freq(rotary_dim, theta, scaling, position_ids.device)  # (rotary_dim/2,)
    freqs = position_ids[:, :, None].float() * inv_freq  # (B, T, rotary_dim/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` channels of each head (the "rotate half" layout); the rest pass through.

    With halves x1, x2: (x1 cos - x2 sin, x2 cos + x1 sin), computed as `x * cos + swap(x) * signed_sin`.

    Args:
        x: (B, nh, T, hs).
        cos, sin: (B, T, rotary_dim) from `rope_cos_sin` (signed sines), rotary_dim <= hs.
    """
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, rotary_dim)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    swapped = torch.cat((rot[..., half:], rot[..., :half]), dim=-1)
    rot = torch.addcmul(rot * cos, swapped, sin)
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding. The cache owns its position: each
    layer's `update` writes at the positions that layer has filled so far and moves them on, so a forward pass that
    runs every layer once advances `length` by its number of tokens.

    Args:
        n_layers, batch, n_kv_heads, max_len, head_dim: cache geometry.
    Attributes:
        length: number of positions every layer holds (the same for every row; padding is masked, not skipped).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.filled = [0] * n_layers  # positions written, per layer

    @property
    def length(self) -> int:
        return min(self.filled)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values (B, nkv, T, hs) to `layer`'s and return all of them (B, nkv, S, hs)."""
        start, end = self.filled[layer], self.filled[layer] + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow at layer {layer}: {end} positions needed, {self.max_len} allocated")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self.filled[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position within its segment of a packed row: 0 at a segment's first token, then 1, 2, ...

    Args:
        segment_ids: (B, T) integer ids; a segment is a run of equal ids.
    Returns:
        (B, T) long.
    """
    B, T = segment_ids.shape
    index = torch.arange(T, device=segment_ids.device).expand(B, T)
    first = torch.ones_like(segment_ids, dtype=torch.bool)
    first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = torch.where(first, index, 0).cummax(dim=-1).values  # (B, T) index of each token's segment start
    return index - starts


def segment_mask(query_segments: torch.Tensor, key_segments: torch.Tensor) -> torch.Tensor:
    """Block-diagonal attention mask of packed rows: a query sees only the keys of its own segment.

    Args:
        query_segments: (B, T) segment ids of the queries; key_segments: (B, S) of the keys.
    Returns:
        (B, 1, T, S) bool, True where a query may attend.
    """
    return (query_segments[:, :, None] == key_segments[:, None, :])[:, None]


@dataclass
class PackedSegments:
    """Where the segments of packed rows start and end, in the rows flattened one after another (B * T tokens).

    Attributes:
        cu_seqlens: (N + 1,) int32 offsets: segment i is tokens cu_seqlens[i] .. cu_seqlens[i+1]-1 (the form flash
            attention's variable-length kernel takes).
        bounds: the same offsets as a list of ints.
        max_len: the longest segment.
    """

    cu_seqlens: torch.Tensor
    bounds: list[int]
    max_len: int

    @classmethod
    def from_segment_ids(cls, segment_ids: torch.Tensor) -> "PackedSegments":
        """Segments of (B, T) ids, flattened row after row (a row's start always starts a segment)."""
        starts = (segment_positions(segment_ids) == 0).flatten()  # (B * T,)
        offsets = torch.nonzero(starts).flatten()
        end = torch.tensor([starts.numel()], device=offsets.device)
        cu_seqlens = torch.cat((offsets, end)).to(torch.int32)
        bounds = cu_seqlens.tolist()
        return cls(cu_seqlens, bounds, max(b - a for a, b in zip(bounds, bounds[1:])))


def use_varlen_attention(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether packed rows run on flash attention's variable-length kernel: CUDA, half precision, head size <= 256.

    Elsewhere (CPU, fp32) attention runs segment by segment with SDPA's causal kernel; both compute only the
    scores within segments, which a block-diagonal mask would compute for the whole row and then discard.
    """
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or head_dim > 256:
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class AttentionInputs:
    """What every attention layer of one forward pass shares.

    Attributes:
        cos, sin: (B, T, rotary_dim) rotary tables for the query positions.
        mask: (B, 1, T, S) bool, True where a query may attend to a key; None means plain causal attention.
        cache: the KV cache when decoding incrementally, else None.
        segments: packed rows' segments: causal attention within each, in place of `mask`.
        sliding_window: the window applied within segments (a `mask` carries its own).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    cache: KVCache | None = None
    segments: PackedSegments | None = None
    sliding_window: int | None = None


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, layer: int, scale: float | None = None
) -> torch.Tensor:
    """Rotary embedding, KV-cache update and scaled-dot-product attention with grouped-query heads.

    Args:
        q: (B, nh, T, hs); k, v: (B, nkv, T, hs), before rotary embedding.
        inputs: the pass's shared rotary tables, mask and cache.
        layer: index of the calling layer (its slot in the cache).
        scale: softmax scale; default 1/sqrt(hs).
    Returns:
        (B, T, nh * hs) attention output, heads concatenated, before the output projection.
    """
    q = apply_rope(q, inputs.cos, inputs.sin)
    k = apply_rope(k, inputs.cos, inputs.sin)
    if inputs.cache is not None:
        k, v = inputs.cache.update(layer, k, v)  # (B, nkv, S, hs)
    gqa = q.shape[1] != k.shape[1]
    if inputs.segments is not None:
        return _packed_attend(q, k, v, inputs, scale, gqa)
    if inputs.mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask, scale=scale, enable_gqa=gqa)
    B, nh, T, hs = y.shape
    return y.transpose(1, 2).reshape(B, T, nh * hs)


@functools.cache
def _varlen_takes_gqa(varlen_attn) -> bool:
    """Whether this torch's `varlen_attn` accepts fewer key/value heads than query heads (`enable_gqa`: torch 2.13
    has it, 2.11 does not)."""
    return "enable_gqa" in inspect.signature(varlen_attn).parameters


@torch.compiler.disable  # its loop over the segments would compile anew for every packing: it runs eagerly
def _packed_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, scale: float | None, gqa: bool
) -> torch.Tensor:
    """Causal attention within each segment of packed rows (with the sliding window, if any); (B, T, nh * hs).

    On CUDA in half precision, flash attention's variable-length kernel does all segments in one launch; elsewhere
    SDPA runs once per segment. Under `torch.compile` it runs eagerly, between the compiled code before and after.
    """
    B, nh, T, hs = q.shape
    segments, window = inputs.segments, inputs.sliding_window
    if use_varlen_attention(q.device, q.dtype, hs):
        from torch.nn.attention.varlen import varlen_attn

        if gqa and not _varlen_takes_gqa(varlen_attn):  # torch 2.11: one key/value head per query head
            k, v = k.repeat_interleave(nh // k.shape[1], dim=1), v.repeat_interleave(nh // v.shape[1], dim=1)
            gqa = False

        def tokens_first(x: torch.Tensor) -> torch.Tensor:  # (B, heads, T, hs) -> (B * T, heads, hs)
            return x.transpose(1, 2).reshape(B * T, x.shape[1], hs)

        left = -1 if window is None else window - 1  # a query sees keys q-left .. q
        y = varlen_attn(
            tokens_first(q), tokens_first(k), tokens_first(v),
            segments.cu_seqlens, segments.cu_seqlens, segments.max_len, segments.max_len,
            scale=scale, window_size=(left, 0), **({"enable_gqa": True} if gqa else {}),
        )  # (B * T, nh, hs)
        return y.reshape(B, T, nh * hs)

    def one_row(x: torch.Tensor) -> torch.Tensor:  # (B, heads, T, hs) -> (1, heads, B * T, hs)
        return x.transpose(0, 1).reshape(1, x.shape[1], B * T, hs)

    q, k, v = one_row(q), one_row(k), one_row(v)
    parts = []
    for start, end in zip(segments.bounds, segments.bounds[1:]):
        L = end - start
        mask = None
        if window is not None and L > window:
            mask = build_attention_mask(torch.ones(1, L, dtype=torch.bool, device=q.device), 0, L, window)
        qs, ks, vs = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
        parts.append(F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None and L > 1, scale=scale, enable_gqa=gqa
        ))  # (1, nh, L, hs)
    y = torch.cat(parts, dim=2)[0]  # (nh, B * T, hs)
    return y.transpose(0, 1).reshape(B, T, nh * hs)


def build_attention_mask(
    key_padding: torch.Tensor,
    query_start: int,
    query_len: int,
    sliding_window: int | None = None,
    query_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """The boolean attention mask for queries at absolute positions `query_start .. query_start + query_len - 1`.

    A query attends to a key when the key is not padding, not in the future, and (with a sliding window `w`) fewer
    than `w` positions behind it. A padding query's row must not be empty (SDPA would return NaN): by default it
    attends to itself; given `query_padding`, it attends to every key not in its future (or window), so that a
    right-padded row gets exactly the causal mask. Real queries never see padding keys either way.

    Args:
        key_padding: (B, S) with 1/True for real tokens, covering every key position (cache included).
        query_padding: optional (B, T) with 1/True for real queries.
    Returns:
        (B, 1, T, S) bool.
    """
    S = key_padding.shape[1]
    device = key_padding.device
    q_pos = torch.arange(query_start, query_start + query_len, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    mask = allowed[None] & key_padding.bool()[:, None, :]  # (B, T, S)
    if query_padding is None:
        mask = mask | (k_pos == q_pos)[None]
    else:
        mask = mask | (allowed[None] & ~query_padding.bool()[:, :, None])
    return mask[:, None]


class GatedMLP(nn.Module):
    """`down_proj(act(gate_proj(x)) * up_proj(x))`, the Llama/Mistral feed-forward block."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _check_divisible(what: str, a: int, b: int) -> None:
    if a % b:
        raise ValueError(f"{what}: {a} is not divisible by {b}")


def default_head_dim(hidden_size: int, num_heads: int) -> int:
    """hidden_size / num_heads, checked."""
    _check_divisible("hidden_size / num_attention_heads", hidden_size, num_heads)
    return hidden_size // num_heads


__all__ = [
    "RMSNorm",
    "RopeScaling",
    "rope_inv_freq",
    "rope_cos_sin",
    "apply_rope",
    "KVCache",
    "AttentionInputs",
    "segment_positions",
    "segment_mask",
    "PackedSegments",
    "use_varlen_attention",
    "attend",
    "build_attention_mask",
    "GatedMLP",
    "activation",
    "default_head_dim",
]
