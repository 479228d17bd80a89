"""The decoder-only shell that Llama/Mistral, Qwen2/Qwen3 and Phi-2 share: the config fields every family has (parsed
once by `DecoderConfig.from_dict`), the attention block, the embedding -> blocks -> final-norm stack, and the
language-model wrapper (forward, hidden states, KV-cache decoding).

A family provides what differs: its config's own fields (`_family_fields`), its decoder block, and the names its
checkpoint gives the attention output projection and the final norm. Module names mirror the Hugging Face checkpoint
keys, so checkpoints load without a renaming table.

Shape legend: B batch, T query length, S key length (cache included), H hidden size, nh query heads,
nkv key/value heads, hs head size, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import config as cfg
from .layers import (
    AttentionInputs,
    KVCache,
    PackedSegments,
    RMSNorm,
    RopeScaling,
    attend,
    build_attention_mask,
    default_head_dim,
    rope_cos_sin,
    segment_positions,
)
from .loss import labelled_cross_entropy, next_token_labels


@dataclass
class DecoderConfig:
    """The `config.json` fields every decoder-only family has; a family's subclass adds its own."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the config.json as read, for saving

    default_model_type = "llama"  # when config.json names none

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that rotary embedding rotates."""
        return self.head_dim

    @classmethod
    def _family_fields(cls, d: dict[str, Any], family: str) -> dict[str, Any]:
        """Check and read the fields only this family has."""
        return {}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecoderConfig":
        """Parse a `config.json` dict; errors name the family and the field."""
        family = d.get("model_type", cls.default_model_type)
        own = cls._family_fields(d, family)
        cfg.check_values(d, family, integers=cfg.DECODER_SIZES)
        hidden = cfg.require(d, "hidden_size", family)
        heads = cfg.require(d, "num_attention_heads", family)
        cfg.check_heads(d, family, "hidden_size", "num_attention_heads", "num_key_value_heads")
        return cls(
            model_type=family,
            vocab_size=cfg.require(d, "vocab_size", family),
            hidden_size=hidden,
            intermediate_size=cfg.require(d, "intermediate_size", family),
            num_hidden_layers=cfg.require(d, "num_hidden_layers", family),
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or default_head_dim(hidden, heads),
            rope_theta=cfg.rope_theta(d),
            rope_scaling=cfg.rope_scaling(d),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            raw=dict(d),
            **own,
        )


class DecoderAttention(nn.Module):
    """Query/key/value projections, `attend` (rotary, KV cache, grouped-query SDPA) and the output projection,
    registered under the name the family's checkpoint uses (`o_proj` for Llama, `dense` for Phi).

    Args:
        c: the config.
        layer: this layer's index (its slot in the KV cache).
        bias: whether the q/k/v projections have biases.
        output_name: the output projection's checkpoint name.
        output_bias: whether the output projection has a bias (default: `bias`; Qwen2 has q/k/v biases only).
        qk_norm_eps: when given, an RMSNorm over each head's query and key channels before rotary embedding
            (`q_norm`, `k_norm`: Qwen3).
    """

    def __init__(
        self,
        c: DecoderConfig,
        layer: int,
        bias: bool,
        output_name: str,
        output_bias: bool | None = None,
        qk_norm_eps: float | None = None,
    ):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hs = layer, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.hs, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.hs, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.hs, bias=bias)
        self.q_norm = None if qk_norm_eps is None else RMSNorm(self.hs, qk_norm_eps)
        self.k_norm = None if qk_norm_eps is None else RMSNorm(self.hs, qk_norm_eps)
        self.output_name = output_name
        output_bias = bias if output_bias is None else output_bias
        self.add_module(output_name, nn.Linear(self.nh * self.hs, c.hidden_size, bias=output_bias))

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hs)
        k = self.k_proj(x).view(B, T, self.nkv, self.hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # each head's channels normalised on their own
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs), (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        return self.get_submodule(self.output_name)(attend(q, k, v, inputs, self.layer))


class DecoderStack(nn.Module):
    """Token embedding (then dropout), the decoder blocks, and the final norm under the checkpoint's name for it.

    Args:
        c: the config.
        block: builds decoder block `i`: `block(c, i)`, called as `block(x, AttentionInputs) -> x`.
        final_norm: the norm after the last block, registered as `final_norm_name` (`norm`, `final_layernorm`).
        embed_dropout: dropout probability after the embedding.
    """

    def __init__(
        self,
        c: DecoderConfig,
        block: Callable[[Any, int], nn.Module],
        final_norm: nn.Module,
        final_norm_name: str,
        embed_dropout: float = 0.0,
    ):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embed_dropout = nn.Dropout(embed_dropout)
        self.layers = nn.ModuleList(block(c, i) for i in range(c.num_hidden_layers))
        self.final_norm_name = final_norm_name
        self.add_module(final_norm_name, final_norm)

    def forward(self, input_ids: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x = self.embed_dropout(self.embed_tokens(input_ids))  # (B, T, H)
        for layer in self.layers:
            x = layer(x, inputs)
        return self.get_submodule(self.final_norm_name)(x)


@dataclass
class DecodeState:
    """Incremental-decoding state of a decoder-only model.

    Attributes:
        cache: the KV cache.
        key_padding: (B, T_prompt + max_new_tokens) bool, True for real tokens (left padding is False).
        next_position: (B,) position id of the next token of each row.
    """

    cache: KVCache
    key_padding: torch.Tensor
    next_position: torch.Tensor


class DecoderOnlyLM(nn.Module):
    """The language model around a `DecoderStack`: `forward`, `hidden_states`, and KV-cache decoding.

    The contract with a family: `config` is a `DecoderConfig` (Mistral's adds `sliding_window`, the only optional
    field read here); `model` maps `(input_ids (B, T), AttentionInputs)` to final-norm hidden states (B, T, H);
    `lm_head` projects them to the vocabulary, sharing the embedding's weight when `tie_word_embeddings`.

    Args:
        config: the parsed config.
        model: the family's stack, registered as `model` (checkpoint keys `model.layers.0...`).
        lm_head_bias: whether the vocabulary projection has a bias (Phi-2's does).
    """

    def __init__(self, config: DecoderConfig, model: DecoderStack, lm_head_bias: bool = False):
        super().__init__()
        self.config = config
        self.model = model
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=lm_head_bias)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def sliding_window(self) -> int | None:
        """Mistral's attention window (its config's `sliding_window`); the other families have none."""
        return getattr(self.config, "sliding_window", None)

    def _attention_inputs(
        self,
        position_ids: torch.Tensor,
        key_padding: torch.Tensor | None,
        query_start: int,
        cache: KVCache | None,
        dtype: torch.dtype,
        query_padding: torch.Tensor | None = None,
    ) -> AttentionInputs:
        """Rotary tables at `position_ids` (B, T) and the mask of queries `query_start ..` over `key_padding`
        (B, S); see `build_attention_mask` for `query_padding`."""
        c = self.config
        cos, sin = rope_cos_sin(position_ids, c.rotary_dim, c.rope_theta, c.rope_scaling, dtype)
        T = position_ids.shape[1]
        window = self.sliding_window
        window_matters = window is not None and query_start + T > window
        if key_padding is None and cache is None and not window_matters:
            mask = None  # plain causal: SDPA's fastest path
        else:
            if key_padding is None:
                key_padding = torch.ones(position_ids.shape[0], query_start + T, dtype=torch.bool, device=cos.device)
            mask = build_attention_mask(key_padding, query_start, T, window, query_padding)
        return AttentionInputs(cos, sin, mask, cache)

    def _packed_attention_inputs(self, segment_ids: torch.Tensor, dtype: torch.dtype) -> AttentionInputs:
        """Rotary tables at per-segment positions and causal attention within each segment, for packed rows."""
        c = self.config
        cos, sin = rope_cos_sin(segment_positions(segment_ids), c.rotary_dim, c.rope_theta, c.rope_scaling, dtype)
        segments = PackedSegments.from_segment_ids(segment_ids)
        return AttentionInputs(cos, sin, None, segments=segments, sliding_window=self.sliding_window)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states of a full sequence, or of packed rows.

        Positions are 0..T-1 for every row, as in the reference implementation's forward. Real tokens attend to
        the real tokens before them; padding tokens attend to every token before them, so a right-padded row
        (a training batch) gets exactly the causal mask. The mask is built from the values on the device, without
        inspecting them on the host (no synchronisation). Packed rows (`segment_ids`)
        restart positions at 0 in each segment and attend only within it, so each segment gets the hidden states
        it would get alone.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for real tokens, 0 for padding; None means no padding. Not needed with
                `segment_ids` (padding there is a segment of its own).
            segment_ids: optional (B, T) ids of the example each token belongs to, in contiguous runs.
        Returns:
            (B, T, H).
        """
        B, T = input_ids.shape
        dtype = self.model.embed_tokens.weight.dtype
        if segment_ids is not None:
            return self.model(input_ids, self._packed_attention_inputs(segment_ids, dtype))
        position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        key_padding = None if attention_mask is None else attention_mask.bool()
        inputs = self._attention_inputs(position_ids, key_padding, 0, None, dtype, query_padding=key_padding)
        return self.model(input_ids, inputs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Logits of every position, or with `labels` the next-token loss over the labelled positions only.

        With `labels`, position t is scored on label t+1 (the shift is `loss.next_token_labels`) and the vocabulary
        projection runs only where that label is not -100, so no logits are returned.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for real tokens, 0 for padding.
            segment_ids: optional (B, T) for packed rows, see `hidden_states`; the first label of each segment
                must be -100, so no position predicts across a boundary.
            labels: optional (B, T) target ids aligned with `input_ids`, -100 where no loss is taken.
            loss_weights: optional (B, T) float, aligned with `labels`: each label's loss is multiplied by its
                weight before the reduction (`ecellm.data.label_weights`).
            reduction: with `labels`, "mean" over labelled tokens or "sum" (for averaging across micro-batches
                and ranks).
        Returns:
            (B, T, V) logits, or with `labels` a scalar fp32 loss.
        """
        hidden = self.hidden_states(input_ids, attention_mask, segment_ids=segment_ids)  # (B, T, H)
        if labels is None:
            return self.lm_head(hidden)  # (B, T, V)
        targets, weights = next_token_labels(labels, loss_weights)  # (B, T) each
        return labelled_cross_entropy(self.lm_head, hidden, targets, weights, reduction)

    @torch.no_grad()
    def start_decoding(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int
    ) -> tuple[DecodeState, torch.Tensor]:
        """Prefill the KV cache with left-padded prompts (B, T); the contract is `generate.IncrementalDecoder`."""
        B, T = input_ids.shape
        c, device = self.config, input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        key_padding = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=device)
        key_padding[:, :T] = attention_mask.bool()
        # Positions count real tokens only, so a left-padded prompt sees the positions it would see alone.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        dtype = self.model.embed_tokens.weight.dtype
        cache = KVCache(c.num_hidden_layers, B, c.num_key_value_heads, T + max_new_tokens, c.head_dim, dtype, device)
        inputs = self._attention_inputs(position_ids, key_padding[:, :T], 0, cache, dtype)
        hidden = self.model(input_ids, inputs)
        state = DecodeState(cache, key_padding, position_ids[:, -1] + 1)
        return state, self.lm_head(hidden[:, -1])

    @torch.no_grad()
    def decode_step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, (B,), and return the next logits (B, V); `state` advances in place."""
        cache = state.cache
        start = cache.length
        inputs = self._attention_inputs(
            state.next_position[:, None], state.key_padding[:, : start + 1], start, cache, cache.keys[0].dtype
        )
        hidden = self.model(tokens[:, None], inputs)
        state.next_position = state.next_position + 1
        return self.lm_head(hidden[:, -1])
