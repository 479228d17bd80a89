"""T5 and Flan-T5: an encoder-decoder with pre-norm blocks, T5's RMS norm, learned relative-position biases
(bucketed key-minus-query distances, one table per stack, read in block 0 and added in every block) and no
`1/sqrt(d)` attention scaling. Module names mirror the Hugging Face checkpoint keys
(`encoder.block.0.layer.0.SelfAttention.q.weight`, `decoder.block.0.layer.1.EncDecAttention.k.weight`, ...).

Two layouts, chosen by `config.json`:
    original T5       feed_forward_proj "relu":       `wi`, `wo`; lm_head tied to `shared`, decoder output
                      scaled by d_model ** -0.5 before it
    T5 v1.1, Flan-T5  feed_forward_proj "gated-gelu": `wi_0`, `wi_1`, `wo` (gelu_new gate); own lm_head, no scaling

Shape legend: B batch, T query length, S key length (cache included), Te encoder length, d d_model, nh heads,
hs d_kv (head size), V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import config as cfg
from .layers import KVCache, RMSNorm, activation, segment_mask
from .loss import decoder_inputs_from_labels, labelled_cross_entropy

# config.json fields that must be positive integers when present
SIZE_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
               "relative_attention_num_buckets", "relative_attention_max_distance")


@dataclass
class T5Config:
    """Hyper-parameters of a T5 / Flan-T5 checkpoint, parsed from its `config.json` by `from_dict`.

    `tie_word_embeddings` ties `lm_head` to `shared`; `scale_decoder_outputs` multiplies the decoder's output by
    `d_model ** -0.5` before `lm_head`. Old configs say only `tie_word_embeddings`, which then decides both (original
    T5: true, v1.1 / Flan-T5: false); transformers >= 5 writes both fields, with `tie_word_embeddings` always true.
    """

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "relu"
    is_gated_act: bool = False
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True
    decoder_start_token_id: int = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int = 0
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the config.json as read, for saving
    model_type: str = "t5"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "T5Config":
        cfg.check_values(d, "t5", integers=SIZE_FIELDS, numbers=("layer_norm_epsilon",))
        proj = d.get("feed_forward_proj", "relu")
        if not isinstance(proj, str):
            raise cfg.ConfigError(f"t5 config.json: feed_forward_proj is {proj!r}; expected a string such as 'relu'")
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise cfg.ConfigError(f"t5 config.json: feed_forward_proj {proj!r} is not 'ACT' or 'gated-ACT'")
        # "gated-gelu" means the tanh approximation (Flan-T5 was trained with it); other names are taken as given.
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]
        try:
            activation(act)
        except ValueError as e:
            raise cfg.ConfigError(f"t5 config.json: feed_forward_proj {proj!r}: {e}") from e
        num_layers = cfg.require(d, "num_layers", "t5")
        tie = d.get("tie_word_embeddings", True)
        pad = d.get("pad_token_id", 0)
        start = d.get("decoder_start_token_id")
        return cls(
            vocab_size=cfg.require(d, "vocab_size", "t5"),
            d_model=cfg.require(d, "d_model", "t5"),
            d_kv=cfg.require(d, "d_kv", "t5"),
            d_ff=cfg.require(d, "d_ff", "t5"),
            num_layers=num_layers,
            num_decoder_layers=d.get("num_decoder_layers") or num_layers,
            num_heads=cfg.require(d, "num_heads", "t5"),
            relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=d.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-6),
            dense_act_fn=act,
            is_gated_act=len(parts) == 2,
            tie_word_embeddings=tie,
            scale_decoder_outputs=d.get("scale_decoder_outputs", tie),
            decoder_start_token_id=pad if start is None else start,  # T5 starts decoding from the pad token
            eos_token_id=d.get("eos_token_id", 1),
            pad_token_id=pad,
            raw=dict(d),
        )


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each key-minus-query distance.

    Half of the buckets (all of them when causal) hold the exact distances 0 .. max_exact-1; the rest are
    log-spaced up to `max_distance`, beyond which everything shares the last bucket. Bidirectional attention gives
    keys after the query their own half of the buckets; causal attention puts them in bucket 0 (they are masked).

    Args:
        relative_position: integer tensor of key position minus query position.
    Returns:
        long tensor of the same shape, values in [0, num_buckets).
    """
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # The float expression (and its truncation) follows the reference, so bucket edges fall at the same distances.
    ratio = distance.clamp(min=max_exact).float() / max_exact
    log_bucket = max_exact + (
        torch.log(ratio) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, log_bucket)


class T5Attention(nn.Module):
    """Multi-head attention without 1/sqrt(hs) scaling; the additive bias carries positions and masks.

    Args:
        c: the config.
        relative_bias: "bidirectional" or "causal" to own the stack's relative-position table (block 0's
            self-attention), None otherwise.
    """

    def __init__(self, c: T5Config, relative_bias: str | None = None):
        super().__init__()
        self.nh, self.hs = c.num_heads, c.d_kv
        self.q = nn.Linear(c.d_model, self.nh * self.hs, bias=False)
        self.k = nn.Linear(c.d_model, self.nh * self.hs, bias=False)
        self.v = nn.Linear(c.d_model, self.nh * self.hs, bias=False)
        self.o = nn.Linear(self.nh * self.hs, c.d_model, bias=False)
        if relative_bias is not None:
            self.bidirectional = relative_bias == "bidirectional"
            self.num_buckets, self.max_distance = c.relative_attention_num_buckets, c.relative_attention_max_distance
            self.relative_attention_bias = nn.Embedding(self.num_buckets, self.nh)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)

    def position_bias(self, query_start: int, T: int, S: int) -> torch.Tensor:
        """The learned bias of queries at positions `query_start ..` over keys at `0 .. S-1`: (1, nh, T, S)."""
        device = self.relative_attention_bias.weight.device
        q_pos = torch.arange(query_start, query_start + T, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        buckets = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, nh, T, S)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a sequence, (B, nh, S, hs) each (cross-attention computes them once per layer)."""
        return self._heads(self.k(x)), self._heads(self.v(x))

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """Attend from `x` to itself (self-attention) or to precomputed keys/values (cross-attention).

        Args:
            x: (B, T, d) queries' hidden states.
            bias: (B or 1, nh or 1, T, S) additive float bias (positions, and finfo.min where masked), or None.
            kv: (keys, values) (B, nh, S, hs) to attend to; None means self-attention over `x`.
            cache: the decoder's KV cache when decoding incrementally (self-attention only).
            layer: this layer's slot in the cache.
        Returns:
            (B, T, d).
        """
        B, T, _ = x.shape
        q = self._heads(self.q(x))  # (B, nh, T, hs)
        if kv is None:
            k, v = self.project_kv(x)  # (B, nh, T, hs)
            if cache is not None:
                k, v = cache.update(layer, k, v)  # (B, nh, S, hs)
        else:
            k, v = kv
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (B, nh, T, hs)
        return self.o(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, c: T5Config, relative_bias: str | None):
        super().__init__()
        self.SelfAttention = T5Attention(c, relative_bias)
        self.layer_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias, cache=cache, layer=layer)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(c)
        self.layer_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None, kv: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        return x + self.EncDecAttention(self.layer_norm(x), bias, kv=kv)


class T5DenseReluDense(nn.Module):
    """The feed-forward block: `wo(act(wi(x)))`, or gated `wo(act(wi_0(x)) * wi_1(x))` (v1.1 / Flan-T5)."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.gated = c.is_gated_act
        if self.gated:
            self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
            self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        else:
            self.wi = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)
        self.act = activation(c.dense_act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))  # (B, T, d_ff)
        return self.wo(h)


class T5LayerFF(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(c)
        self.layer_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


@dataclass
class CrossAttentionInputs:
    """What the decoder attends to: per-layer keys/values of the encoder output, and its padding bias.

    Attributes:
        kv: one (keys, values) pair per decoder layer, (B, nh, Te, hs) each.
        bias: (B, 1, 1, Te) 0 for real encoder tokens and finfo.min for padding, or None without padding.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    bias: torch.Tensor | None


class T5Block(nn.Module):
    """`layer` holds self-attention, cross-attention (decoder only) and the feed-forward block, in that order."""

    def __init__(self, c: T5Config, is_decoder: bool, first: bool):
        super().__init__()
        relative_bias = ("causal" if is_decoder else "bidirectional") if first else None
        self.layer = nn.ModuleList([T5LayerSelfAttention(c, relative_bias)])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(c))
        self.layer.append(T5LayerFF(c))

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        cross: CrossAttentionInputs | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        x = self.layer[0](x, bias, cache, layer)
        if cross is not None:
            x = self.layer[1](x, cross.bias, cross.kv[layer])
        return self.layer[-1](x)


class T5Stack(nn.Module):
    """The encoder or the decoder: shared embedding, blocks, final norm.

    Args:
        c: the config.
        embed_tokens: the model's `shared` embedding (the same module, so its weight is tied).
        is_decoder: causal self-attention with cross-attention, else bidirectional self-attention.
    """

    def __init__(self, c: T5Config, embed_tokens: nn.Embedding, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.embed_tokens = embed_tokens
        n_layers = c.num_decoder_layers if is_decoder else c.num_layers
        self.block = nn.ModuleList(T5Block(c, is_decoder, first=i == 0) for i in range(n_layers))
        self.final_layer_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)

    def self_attention_bias(
        self,
        query_start: int,
        T: int,
        key_padding: torch.Tensor | None,
        dtype: torch.dtype,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Block 0's relative-position bias with the causal (decoder), padding and packing masks folded in.

        In a packed row the bias of a query and a key of the same segment depends only on their distance, which
        equals their distance within the segment, so only the mask between segments is added.

        Args:
            query_start: position of the first query (the cache length when decoding).
            T: number of queries.
            key_padding: (B, S) with 1/True for real tokens, S = query_start + T; None means no padding.
            segment_ids: (B, T) packed-row segment ids (no cache); None for unpacked rows.
        Returns:
            (1 or B, nh, T, S) float bias, finfo.min where a query may not attend.
        """
        S = query_start + T
        bias = self.block[0].layer[0].SelfAttention.position_bias(query_start, T, S).to(dtype)  # (1, nh, T, S)
        allowed = None
        if self.is_decoder and T > 1:
            q_pos = torch.arange(query_start, S, device=bias.device)[:, None]
            allowed = torch.arange(S, device=bias.device)[None, :] <= q_pos  # (T, S)
        if key_padding is not None:
            real = key_padding.bool()[:, None, None, :]  # (B, 1, 1, S)
            allowed = real if allowed is None else allowed & real  # (B, 1, T, S)
        if segment_ids is not None:
            same = segment_mask(segment_ids, segment_ids)  # (B, 1, T, T)
            allowed = same if allowed is None else allowed & same
        if allowed is None:
            return bias
        return torch.where(allowed, bias, torch.finfo(dtype).min)

    def forward(
        self,
        input_ids: torch.Tensor,
        key_padding: torch.Tensor | None = None,
        cross: CrossAttentionInputs | None = None,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the stack.

        Args:
            input_ids: (B, T) token ids.
            key_padding: (B, S) 1 for real tokens, 0 for padding (S = T, or cache length + T when decoding).
            cross: the encoder's keys/values (decoder only).
            cache: the decoder's KV cache when decoding incrementally; queries start at its length.
            segment_ids: (B, T) packed-row segment ids: tokens attend only within their segment.
        Returns:
            (B, T, d) hidden states after the final norm.
        """
        query_start = 0 if cache is None else cache.length
        x = self.embed_tokens(input_ids)  # (B, T, d)
        bias = self.self_attention_bias(query_start, input_ids.shape[1], key_padding, x.dtype, segment_ids)
        for i, block in enumerate(self.block):
            x = block(x, bias, cross, cache, i)
        return self.final_layer_norm(x)


@dataclass
class T5DecodeState:
    """Incremental-decoding state: the decoder's self-attention cache and the fixed cross-attention inputs."""

    cache: KVCache
    cross: CrossAttentionInputs


class T5ForConditionalGeneration(nn.Module):
    """T5 / Flan-T5. `forward(input_ids, decoder_input_ids, attention_mask=None) -> (B, T_dec, V)` logits;
    `encode(input_ids, attention_mask)` runs the encoder alone; `start_decoding` / `decode_step` implement the
    generation protocol of `ecellm.generate`.
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = c = config
        self.shared = nn.Embedding(c.vocab_size, c.d_model)
        self.encoder = T5Stack(c, self.shared, is_decoder=False)
        self.decoder = T5Stack(c, self.shared, is_decoder=True)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The encoder's output.

        Args:
            input_ids: (B, Te) token ids, padded on either side.
            attention_mask: (B, Te) 1 for real tokens, 0 for padding; None means no padding.
            segment_ids: (B, Te) packed-row segment ids; None for unpacked rows.
        Returns:
            (B, Te, d) after the encoder's final norm.
        """
        return self.encoder(input_ids, attention_mask, segment_ids=segment_ids)

    def cross_attention_inputs(
        self,
        encoder_out: torch.Tensor,
        attention_mask: torch.Tensor | None,
        segment_ids: torch.Tensor | None = None,
        decoder_segment_ids: torch.Tensor | None = None,
    ) -> CrossAttentionInputs:
        """Every decoder layer's keys/values of the encoder output (B, Te, d), and the cross-attention bias: the
        encoder padding, or for packed rows decoder segment i seeing only encoder segment i."""
        kv = [block.layer[1].EncDecAttention.project_kv(encoder_out) for block in self.decoder.block]
        if decoder_segment_ids is not None:
            allowed = segment_mask(decoder_segment_ids, segment_ids)  # (B, 1, T, Te)
        elif attention_mask is not None:
            allowed = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Te)
        else:
            return CrossAttentionInputs(kv, None)
        zero = torch.zeros((), dtype=encoder_out.dtype, device=encoder_out.device)
        return CrossAttentionInputs(kv, torch.where(allowed, zero, torch.finfo(encoder_out.dtype).min))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.scale_decoder_outputs:
            hidden = hidden * self.config.d_model**-0.5
        return self.lm_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        decoder_segment_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Decoder logits (teacher forcing), or with `labels` the loss over the labelled target tokens only.

        With `labels` and no `decoder_input_ids`, the decoder reads the labels shifted right
        (`loss.decoder_inputs_from_labels`); the vocabulary projection runs only where the label is not -100, so no
        logits are returned.

        Args:
            input_ids: (B, Te) encoder token ids.
            attention_mask: (B, Te) 1 for real encoder tokens, 0 for padding.
            decoder_input_ids: (B, T) decoder token ids, starting with `decoder_start_token_id` (in a packed row,
                every decoder segment starts with it); built from `labels` when not given.
            decoder_attention_mask: (B, T) 1 for real decoder tokens, 0 for padding (causal masking is always on).
            segment_ids, decoder_segment_ids: packed rows, (B, Te) and (B, T): example i's encoder tokens carry
                the same id as its decoder tokens; each attends only within its example, so every example gets
                the logits it would get alone. Padding takes an id of its own; the masks are then not needed.
            labels: optional (B, T) target ids, -100 where no loss is taken.
            loss_weights: optional (B, T) float, aligned with `labels`: each label's loss is multiplied by its
                weight before the reduction (`ecellm.data.label_weights`).
            reduction: with `labels`, "mean" over labelled tokens or "sum".
        Returns:
            (B, T, V) logits, or with `labels` a scalar fp32 loss.
        """
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5ForConditionalGeneration.forward: give decoder_input_ids or labels")
            c = self.config
            decoder_input_ids = decoder_inputs_from_labels(
                labels, c.decoder_start_token_id, c.pad_token_id, decoder_segment_ids
            )  # (B, T)
        encoder_out = self.encode(input_ids, attention_mask, segment_ids)
        cross = self.cross_attention_inputs(encoder_out, attention_mask, segment_ids, decoder_segment_ids)
        hidden = self.decoder(decoder_input_ids, decoder_attention_mask, cross, segment_ids=decoder_segment_ids)
        if labels is None:
            return self._logits(hidden)  # (B, T, V)
        return labelled_cross_entropy(self._logits, hidden, labels, loss_weights, reduction)

    @torch.no_grad()
    def start_decoding(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int
    ) -> tuple[T5DecodeState, torch.Tensor]:
        """Run the encoder once on prompts (B, Te) padded on either side, project each decoder layer's
        cross-attention keys/values once, and feed `decoder_start_token_id`; the contract is
        `generate.IncrementalDecoder`."""
        B = input_ids.shape[0]
        c = self.config
        cross = self.cross_attention_inputs(self.encode(input_ids, attention_mask), attention_mask)
        dtype, device = self.shared.weight.dtype, input_ids.device
        cache = KVCache(c.num_decoder_layers, B, c.num_heads, max(max_new_tokens, 1), c.d_kv, dtype, device)
        state = T5DecodeState(cache, cross)
        start = torch.full((B,), c.decoder_start_token_id, dtype=torch.long, device=device)
        return state, self.decode_step(state, start)

    @torch.no_grad()
    def decode_step(self, state: T5DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one decoder token per row, (B,), and return the next logits (B, V); `state` advances in place."""
        hidden = self.decoder(tokens[:, None], cross=state.cross, cache=state.cache)  # (B, 1, d)
        return self._logits(hidden[:, -1])
