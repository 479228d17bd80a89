"""BERT (Devlin et al., 2019): the encoder-only transformer behind AG's F_BERT (`ecellm.models.encoders` fetches the
real one, sentence-transformers' all-MiniLM-L6-v2). Post-norm blocks (LayerNorm after each residual sum), learned
absolute positions and token types, bidirectional attention over the unpadded tokens, exact GELU. Module names
mirror Hugging Face's `BertModel` checkpoint keys (`embeddings.word_embeddings.weight`,
`encoder.layer.0.attention.self.query.weight`, `encoder.layer.0.output.LayerNorm.bias`, `pooler.dense.weight`).

Shape legend: B batch, T tokens, d hidden_size, nh heads, hs head size (d / nh), f intermediate_size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import config as cfg
from .layers import activation
from .loading import load_checkpoint

SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "type_vocab_size")


@dataclass
class BertConfig:
    """Hyper-parameters of a BERT checkpoint, parsed from its `config.json` by `from_dict`."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    model_type: str = "bert"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BertConfig":
        """Parse a `config.json` dict, refusing (naming the field) what this implementation cannot build."""
        if d.get("model_type") != "bert":
            raise cfg.ConfigError(f"config.json: model_type is {d.get('model_type')!r}, expected 'bert'")
        cfg.check_values(d, "bert", integers=SIZE_FIELDS, numbers=("layer_norm_eps",))
        cfg.check_heads(d, "bert", "hidden_size", "num_attention_heads", "num_attention_heads")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise cfg.ConfigError(f"bert config.json: position_embedding_type {d['position_embedding_type']!r} is "
                                  "not supported (only 'absolute')")
        act = d.get("hidden_act", "gelu")
        try:
            activation(act)
        except ValueError as e:
            raise cfg.ConfigError(f"bert config.json: hidden_act: {e}") from None
        return cls(**{key: cfg.require(d, key, "bert") for key in SIZE_FIELDS[:5]},
                   max_position_embeddings=d.get("max_position_embeddings", 512),
                   type_vocab_size=d.get("type_vocab_size", 2), layer_norm_eps=d.get("layer_norm_eps", 1e-12),
                   hidden_act=act)


class DenseNorm(nn.Module):
    """BERT's post-norm output: LayerNorm(residual + dense(h))."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(h))


class BertLayer(nn.Module):
    """One block: x = LN(x + attention(x)); x = LN(x + W2 act(W1 x))."""

    def __init__(self, c: BertConfig):
        super().__init__()
        d, eps = c.hidden_size, c.layer_norm_eps
        self.n_heads = c.num_attention_heads
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({name: nn.Linear(d, d) for name in ("query", "key", "value")}),
            "output": DenseNorm(d, d, eps),
        })
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(d, c.intermediate_size)})
        self.output = DenseNorm(c.intermediate_size, d, eps)
        self.act = activation(c.hidden_act)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d); key_mask: (B, 1, 1, T) True where a key may be attended to. Returns (B, T, d)."""
        B, T, d = x.shape
        projections = self.attention["self"]
        q, k, v = (projections[name](x).view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, nh, T, hs)
                   for name in ("query", "key", "value"))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, nh, T, hs)
        x = self.attention["output"](a.transpose(1, 2).reshape(B, T, d), x)  # (B, T, d)
        return self.output(self.act(self.intermediate["dense"](x)), x)  # (B, T, f) -> (B, T, d)


class BertEmbeddings(nn.Module):
    """Token + absolute position + token type embeddings, then LayerNorm."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, token_type_ids: (B, T) (token types default to 0). Returns (B, T, d)."""
        T = input_ids.shape[1]
        if T > self.position_embeddings.num_embeddings:
            raise ValueError(f"{T} tokens, but BERT has positions for {self.position_embeddings.num_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + \
            self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class BertModel(nn.Module):
    """The BERT encoder: `forward` gives the hidden states after the embeddings and after each layer; `pool` gives
    the pooled first token ([CLS]) of the last layer, as `BertModel.pooler_output`."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(BertLayer(config)
                                                             for _ in range(config.num_hidden_layers))})
        self.pooler = nn.ModuleDict({"dense": nn.Linear(config.hidden_size, config.hidden_size)})

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        num_layers: int | None = None,
    ) -> list[torch.Tensor]:
        """The hidden states: index 0 the embeddings' output, index i the output of layer i.

        Args:
            input_ids: (B, T) token ids, with [CLS] and [SEP] as the tokenizer adds them.
            attention_mask: (B, T) 1 for real tokens, 0 for padding; None means no padding.
            token_type_ids: (B, T) segment ids; None means all 0.
            num_layers: run only the first `num_layers` layers (all by default).
        Returns:
            `num_layers + 1` tensors of shape (B, T, d).
        """
        layers = self.encoder["layer"]
        num_layers = len(layers) if num_layers is None else num_layers
        if not 0 <= num_layers <= len(layers):
            raise ValueError(f"num_layers={num_layers}, but the model has {len(layers)} layers")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        hidden = [self.embeddings(input_ids, token_type_ids)]  # (B, T, d)
        for layer in layers[:num_layers]:
            hidden.append(layer(hidden[-1], key_mask))
        return hidden

    def pool(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """tanh(dense(first token)): (B, T, d) -> (B, d)."""
        return torch.tanh(self.pooler["dense"](last_hidden[:, 0]))


def load_bert(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> BertModel:
    """A BERT checkpoint directory (`config.json` + `model.safetensors`), built on the meta device and loaded.

    Args:
        path: the checkpoint directory.
        dtype: parameter dtype.
        device: where the weights go.
    Raises:
        ConfigError: config.json unreadable or not a BERT this implementation builds, naming the file and field.
        CheckpointError: weights missing, unexpected or mis-shaped, naming the file and tensor.
    """
    raw = cfg.read_config_file(path)
    try:
        config = BertConfig.from_dict(raw)
    except cfg.ConfigError as e:
        raise cfg.ConfigError(f"{cfg.config_file(path)}: {e}") from None
    with torch.device("meta"):
        model = BertModel(config)
    load_checkpoint(model.to(dtype), path, dtype, device)
    return model.eval()
