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
from tokenizers import Tokenizer as BPETokenizer  # the `tokenizers` Rust library, not `transformers`
from tqdm.auto import tqdm

from ..files import write_json
from .config import ConfigError
from .gguf_check import GGUFError, TensorInfo, check_gguf_file
from .llama import LlamaConfig, LlamaForCausalLM
from .loading import check_finite_tensor
from .qwen import QwenConfig
from .saving import check_new_directory, write_new_folder

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
_TOP_KEYS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# GGUF general.architecture -> (config.json model_type, transformers class, whether llama.cpp permuted q/k rows)
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM", True), "qwen2": ("qwen2", "Qwen2ForCausalLM", False)}
_CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": QwenConfig}  # config.json model_type -> ecellm's config class
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


_REQUIRED = object()


def _field(reader, key: str, kind: type | tuple[type, ...], path: Path, default=_REQUIRED):
    """The metadata value `key`, refused (naming the file and key) when it is not of `kind`: `int` (not a bool),
    `float` (an int too), `str`, `bool`, or `(list, str)` / `(list, int)` for arrays of that item type. An absent key
    gives `default`, or is refused when there is none."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise GGUFError(f"{path}: the GGUF metadata lacks {key}")
        return default
    value = field.contents()
    container, item = kind if isinstance(kind, tuple) else (None, kind)
    allowed = (int, float) if item is float else item
    items = value if container is list and isinstance(value, list) else [value]
    if (container is list) != isinstance(value, list) or not all(
            isinstance(v, allowed) and (item is bool or not isinstance(v, bool)) for v in items):
        expected = f"a list of {item.__name__}" if container is list else f"a {item.__name__}"
        raise GGUFError(f"{path}: the GGUF metadata {key} is {str(value)[:60]!r}; expected {expected}")
    return value


def _architecture(reader, path: Path) -> str:
    arch = _field(reader, "general.architecture", str, path)
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return arch


def _config(reader, path: Path, tied: bool) -> dict:
    arch = _architecture(reader, path)
    model_type, architecture, _ = ARCHITECTURES[arch]

    def size(key, default=_REQUIRED):
        value = _field(reader, f"{arch}.{key}", int, path, default)
        if value is not None and value <= 0:
            raise GGUFError(f"{path}: the GGUF metadata {arch}.{key} is {value}; expected a positive integer")
        return value

    hidden, heads = size("embedding_length"), size("attention.head_count")
    vocab = size("vocab_size", None) or len(_field(reader, "tokenizer.ggml.tokens", (list, str), path))
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": size("feed_forward_length"),
        "num_hidden_layers": size("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": size("attention.head_count_kv", heads),
        "head_dim": size("rope.dimension_count", hidden // heads or None),
        "max_position_embeddings": size("context_length"),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", float, path)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", float, path, 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", int, path, None),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", int, path, None),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id", int, path, None),
        "torch_dtype": "float32",
    }


def _checkpoint_key(name: str, path: Path) -> tuple[str, str | None]:
    """(checkpoint key, the GGUF name after "blk.N." or None) of a GGUF tensor name; other names are refused."""
    if name in _TOP_KEYS:
        return _TOP_KEYS[name], None
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_KEYS:
        return f"model.layers.{int(parts[1])}.{_BLOCK_KEYS[parts[2]]}", parts[2]
    if name == "rope_freqs.weight":
        raise GGUFError(f"{path}: GGUF tensor {name!r} (llama-3 style RoPE scaling) is not supported")
    raise GGUFError(f"{path}: unexpected GGUF tensor {name!r}")


def _check_tensors(tensors: list[TensorInfo], config: dict, path: Path) -> None:
    """Refuse, before any weight is read, a tensor table that does not make the model `config` describes: the
    blocks present against the block count (checked first, so an absurd count builds nothing), then every key and
    shape against the model built on the meta device."""
    blocks = {int(t.name.split(".")[1]) for t in tensors if _checkpoint_key(t.name, path)[1] is not None}
    if blocks != set(range(config["num_hidden_layers"])):
        held = f"blocks {min(blocks)} to {max(blocks)} ({len(blocks)} in all)" if blocks else "no blocks"
        raise GGUFError(f"{path}: the GGUF metadata says {config['num_hidden_layers']} blocks (block_count) but the "
                        f"file holds tensors of {held}")
    try:
        parsed = _CONFIG_CLASSES[config["model_type"]].from_dict(config)
    except ConfigError as e:
        raise GGUFError(f"{path}: the GGUF metadata describes no model ecellm can build: {e}") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlamaForCausalLM(parsed).state_dict().items()}
    found = {}
    for t in tensors:
        key = _checkpoint_key(t.name, path)[0]
        shape = tuple(reversed(t.dims))  # GGUF lists the fastest-varying dimension first
        if key not in expected or shape != expected[key]:
            wanted = f"shape {expected[key]}" if key in expected else "no such weight"
            raise GGUFError(f"{path}: GGUF tensor {t.name!r} has shape {shape}; the model its metadata describes "
                            f"has {wanted} for {key}")
        found[key] = t.name
    missing = sorted(set(expected) - set(found) - ({"lm_head.weight"} if config["tie_word_embeddings"] else set()))
    if missing:
        raise GGUFError(f"{path}: the GGUF file lacks the tensors of {', '.join(missing[:4])}"
                        + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))


def _check_dequantizable(tensors: list[TensorInfo], path: Path) -> None:
    """Refuse a tensor type that the `gguf` package cannot dequantize, trying one zero block of each type."""
    gguf = _import_gguf()
    for kind in sorted({t.type for t in tensors}):
        qtype = gguf.GGMLQuantizationType(kind)
        block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
        try:
            gguf.quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
        except NotImplementedError:
            name = next(t.name for t in tensors if t.type == kind)
            raise GGUFError(f"{path}: tensor {name!r} has type {qtype.name}, which the gguf package cannot "
                            "dequantize") from None


def _weights(reader, config: dict, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32 under its checkpoint key ((Llama) q/k rows back in the Hugging Face order),
    each refused when it holds NaN or Inf."""
    gguf = _import_gguf()
    permuted = ARCHITECTURES[config["model_type"]][2]
    state = {}
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", leave=False):
        key, rest = _checkpoint_key(t.name, path)
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy
        if permuted and rest == "attn_q.weight":
            w = unpermute_qk(w, config["num_attention_heads"])
        elif permuted and rest == "attn_k.weight":
            w = unpermute_qk(w, config["num_key_value_heads"])
        state[key] = torch.from_numpy(np.ascontiguousarray(w))
        check_finite_tensor(state[key], t.name, path)
    return state


def _vocabulary(reader, path: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE ("gpt2") vocabulary that fits the model's `vocab_size`."""
    model = _field(reader, "tokenizer.ggml.model", str, path)
    if model != "gpt2":
        raise GGUFError(f"{path}: GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens", (list, str), path)
    types = _field(reader, "tokenizer.ggml.token_type", (list, int), path, [1] * len(tokens))
    merges = _field(reader, "tokenizer.ggml.merges", (list, str), path, [])
    if not 0 < len(tokens) <= vocab_size or len(types) != len(tokens):
        raise GGUFError(f"{path}: the GGUF vocabulary has {len(tokens)} tokens and {len(types)} token types; expected "
                        f"as many of each, and between 1 and the model's {vocab_size} embedding rows")
    bad_merge = next((m for m in merges if len(m.split(" ")) != 2), None)
    if bad_merge is not None:
        raise GGUFError(f"{path}: GGUF merge {bad_merge!r} is not two tokens separated by one space")
    for key in ("bos", "eos", "padding", "unknown"):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id", int, path, None)
        if i is not None and not 0 <= i < len(tokens):
            raise GGUFError(f"{path}: tokenizer.ggml.{key}_token_id is {i}, outside the vocabulary of {len(tokens)} "
                            "tokens")
    return tokens, types, merges


def _tokenizer_files(reader, path: Path, vocab_size: int) -> tuple[dict, dict]:
    """tokenizers-library JSON and tokenizer_config.json for a byte-level BPE ("gpt2") GGUF vocabulary, checked by
    loading the JSON with the `tokenizers` library before anything is written."""
    tokens, types, merges = _vocabulary(reader, path, vocab_size)
    pre = _field(reader, "tokenizer.ggml.pre", str, path, "default")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(f"{path}: GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported "
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
            "merges": [m.split(" ") for m in merges],
        },
    }
    try:
        BPETokenizer.from_str(json.dumps(tokenizer_json, ensure_ascii=False))
    except Exception as e:  # noqa: BLE001 (the Rust library raises a bare Exception for a bad vocabulary)
        raise GGUFError(f"{path}: the GGUF vocabulary does not make a tokenizer ({e})") from None

    def token(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id", int, path, None)
        return None if i is None else tokens[i]

    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": _field(reader, "tokenizer.ggml.add_bos_token", bool, path, False),
        "add_eos_token": _field(reader, "tokenizer.ggml.add_eos_token", bool, path, False),
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "model_max_length": _field(reader, f"{_architecture(reader, path)}.context_length", int, path),
        "chat_template": _field(reader, "tokenizer.chat_template", str, path, None),
    }
    return tokenizer_json, {k: v for k, v in tokenizer_config.items() if v is not None}


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a Llama- or Qwen2-architecture GGUF file into a checkpoint directory that `from_pretrained` loads.

    Every tensor is dequantized to fp32 and (Llama) q/k rows are returned to the Hugging Face order. The file is
    checked before anything is written (`gguf_check.check_gguf_file`, then its metadata, tensor table and vocabulary
    against the model they describe); a malformed or unsupported file is a `GGUFError` naming it. The folder is
    written under its lock and never loses what it did not write (`saving.write_new_folder`); model.safetensors, the
    file `from_pretrained` needs, appears last.

    Args:
        gguf_path: the .gguf file.
        out_dir: the folder to create (absent, or empty).
    Returns:
        `out_dir`.
    Raises:
        GGUFError: the file is not a well-formed GGUF file of a model ecellm converts, naming the file and what.
        FileExistsError: `out_dir` holds files, or a file of the conversion's appeared in it while converting.
        FolderBusy: another job holds `out_dir`'s lock.
    """
    gguf = _import_gguf()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    check_new_directory(out_dir)  # early, before the work; again under the lock
    tensors = check_gguf_file(gguf_path, {int(kind): sizes for kind, sizes in gguf.GGML_QUANT_SIZES.items()})
    reader = gguf.GGUFReader(str(gguf_path))
    config = _config(reader, gguf_path, tied=not any(t.name == "output.weight" for t in tensors))
    _check_tensors(tensors, config, gguf_path)
    _check_dequantizable(tensors, gguf_path)
    tokenizer_json, tokenizer_config = _tokenizer_files(reader, gguf_path, config["vocab_size"])
    state = _weights(reader, config, gguf_path)
    generation_config = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    write_new_folder(out_dir, "conversion", {
        "config.json": lambda path: write_json(path, config),
        "generation_config.json": lambda path: write_json(path, generation_config),
        "tokenizer.json": lambda path: path.write_text(json.dumps(tokenizer_json, ensure_ascii=False),
                                                       encoding="utf-8"),
        "tokenizer_config.json": lambda path: path.write_text(json.dumps(tokenizer_config, indent=2,
                                                                         ensure_ascii=False), encoding="utf-8"),
        "model.safetensors": lambda path: save_file(state, str(path), metadata={"format": "pt"}),
    })
    return out_dir
