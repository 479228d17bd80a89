"""Turn a Llama- or Qwen2-architecture GGUF file (llama.cpp's format, possibly quantized) into an ordinary checkpoint
directory: `config.json`, `model.safetensors` (dequantized), `tokenizer.json` and `tokenizer_config.json`.

Needs the optional `gguf` package (`pip install 'ecellm[gguf]'`), the reader llama.cpp's authors publish; its
`gguf.quants.dequantize` undoes every block type (Q4_0 .. Q8_0, the K-quants Q2_K .. Q6_K, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..files import write_dir_atomically, write_json

# GGUF tensor name (after "blk.N.") -> checkpoint key (after "model.layers.N.")
_BLOCK_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",  # Qwen2
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_KEYS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# GGUF general.architecture -> (config.json model_type, transformers class, whether llama.cpp permuted q/k rows)
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM", True), "qwen2": ("qwen2", "Qwen2ForCausalLM", False)}
_CONTROL_TOKEN, _USER_DEFINED_TOKEN = 3, 4  # llama.cpp's token types: special tokens, added ordinary ones
# GGUF tokenizer.ggml.pre -> the splits before the byte-level BPE (the regex is Qwen2's published pre-tokenizer)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    "default": [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}],
    # SmolLM's splits every digit before the GPT-2 byte-level split.
    "smollm": [{"type": "Digits", "individual_digits": True},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}],
    "qwen2": [{"type": "Split", "pattern": {"Regex": _QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
              {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}],
}
_NORMALIZERS = {"qwen2": {"type": "NFC"}}


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF import needs the optional 'gguf' package: pip install 'ecellm[gguf]'") from e
    return gguf


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a q or k projection (it stores rotary pairs interleaved).

    Args:
        w: (rows, cols) weight as stored in the GGUF file.
        n_head: query heads for q, key/value heads for k.
    """
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _architecture(reader, path: Path) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return arch


def _config(reader, path: Path, tied: bool) -> dict:
    arch = _architecture(reader, path)
    model_type, architecture, _ = ARCHITECTURES[arch]

    def need(key):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    hidden, heads = need("embedding_length"), need("attention.head_count")
    vocab = _field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": _field(reader, f"{arch}.rope.dimension_count", hidden // heads),
        "max_position_embeddings": need("context_length"),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def _weights(reader, config: dict, path: Path) -> dict[str, torch.Tensor]:
    gguf = _import_gguf()
    permuted = ARCHITECTURES[_architecture(reader, path)][2]
    state = {}
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", leave=False):
        name, rest = t.name, None
        if name in _TOP_KEYS:
            key = _TOP_KEYS[name]
        elif name.startswith("blk.") and name.split(".", 2)[2] in _BLOCK_KEYS:
            _, layer, rest = name.split(".", 2)
            key = f"model.layers.{layer}.{_BLOCK_KEYS[rest]}"
        elif name == "rope_freqs.weight":
            raise ValueError(f"{path}: GGUF tensor {name!r} (llama-3 style RoPE scaling) is not supported")
        else:
            raise ValueError(f"{path}: unexpected GGUF tensor {name!r}")
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy
        if permuted and rest == "attn_q.weight":
            w = unpermute_qk(w, config["num_attention_heads"])
        elif permuted and rest == "attn_k.weight":
            w = unpermute_qk(w, config["num_key_value_heads"])
        state[key] = torch.from_numpy(np.ascontiguousarray(w))
    return state


def _tokenizer_files(reader, path: Path) -> tuple[dict, dict]:
    """tokenizers-library JSON and tokenizer_config.json for a byte-level BPE ("gpt2") GGUF vocabulary."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{path}: GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = _field(reader, "tokenizer.ggml.merges")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{path}: GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported "
                         f"(supported: {', '.join(_PRE_TOKENIZERS)})")
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": kind == _CONTROL_TOKEN}
            for i, (tok, kind) in enumerate(zip(tokens, types))
            if kind in (_CONTROL_TOKEN, _USER_DEFINED_TOKEN)
        ],
        "normalizer": _NORMALIZERS.get(pre),
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": _PRE_TOKENIZERS[pre]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }

    def token(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "model_max_length": _field(reader, f"{_architecture(reader, path)}.context_length"),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    return tokenizer_json, {k: v for k, v in tokenizer_config.items() if v is not None}


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a Llama- or Qwen2-architecture GGUF file into a checkpoint directory that `from_pretrained` loads.

    Every tensor is dequantized to fp32 and (Llama) q/k rows are returned to the Hugging Face order. The directory
    appears atomically: it is written next to `out_dir` and renamed into place, so an interrupted conversion leaves
    nothing that looks complete.

    Args:
        gguf_path: the .gguf file.
        out_dir: the directory to create (must not exist).
    Returns:
        `out_dir`.
    """
    gguf = _import_gguf()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    reader = gguf.GGUFReader(str(gguf_path))
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    config = _config(reader, gguf_path, tied)
    state = _weights(reader, config, gguf_path)
    tokenizer_json, tokenizer_config = _tokenizer_files(reader, gguf_path)

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False),
                                                   encoding="utf-8")
        write_json(tmp / "generation_config.json",
                   {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]})

    write_dir_atomically(out_dir, write)
    return out_dir
