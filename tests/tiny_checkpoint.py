"""A tiny Llama checkpoint with a real (tiny) byte-level BPE tokenizer, for training and evaluation tests.

Built without transformers: the tokenizer is trained with the `tokenizers` library on synthetic ECInstruct text and
the model is ecellm's own Llama with random weights, saved as `config.json` + `model.safetensors`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ecellm.data import format_prompt
from ecellm.models import from_config
from ecellm.synthetic import generate_records

SPECIAL = ["<pad>", "<s>", "</s>"]


def make_tiny_checkpoint(
    path: Path, tasks=("SR",), vocab_size: int = 384, seed: int = 0, family: str = "llama", **config
) -> Path:
    """Write a tiny checkpoint directory (config, weights, tokenizer.json, tokenizer_config.json) and return it.

    `family` is "llama" (decoder-only) or "t5" (encoder-decoder); `config` overrides config.json fields."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    texts = [format_prompt(r) + r["output"] for t in tasks for r in generate_records(t, 40, "train", seed=seed)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": family != "t5"})
    )
    if family == "t5":
        cfg = {
            "model_type": "t5", "vocab_size": tok.get_vocab_size(), "d_model": 32, "d_kv": 8, "d_ff": 64,
            "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8,
            "relative_attention_max_distance": 32, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
            "decoder_start_token_id": 0, "eos_token_id": 2, "pad_token_id": 0, **config,
        }
    else:
        cfg = {
            "model_type": "llama", "vocab_size": tok.get_vocab_size(), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **config,
        }
    (path / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(seed)
    model = from_config(cfg, device="cpu")
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():  # a tied tensor once, under its first name (as HF files have it)
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[key] = tensor.contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
