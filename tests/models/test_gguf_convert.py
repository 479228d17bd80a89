"""`convert_gguf` on tiny Qwen2 GGUF files written here with the `gguf` package: names, q/k/v biases, tied head,
quantized blocks and the Qwen2 pre-tokenizer, against transformers' Qwen2 holding the same (round-tripped) weights.
The real Qwen2.5 GGUF files are tests/models/test_qwen_gguf.py's."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from ecellm.models import from_pretrained
from ecellm.models.gguf_convert import convert_gguf
from ecellm.tokenizer import load_tokenizer

from .hf_tiny import save_tiny_decoder

# checkpoint key (after "model.layers.N.") -> GGUF name (after "blk.N."), the inverse of the converter's table
GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def gguf_name(key: str) -> str:
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    _, _, layer, rest = key.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


def byte_level_vocab(size: int) -> list[str]:
    """Single-byte tokens (the printable ASCII that GPT-2's byte table keeps as is), the merges "ab" and "12", the
    specials."""
    visible = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    return visible[: size - len(SPECIALS) - 2] + ["ab", "12"] + SPECIALS


def write_tiny_qwen2_gguf(path, tmp_path, arch: str = "qwen2", pre: str = "qwen2"):
    """A tiny Qwen2 as GGUF (matrices Q8_0, the rest F32) and transformers' model with the same weights after the
    Q8_0 round trip."""
    reference = save_tiny_decoder("qwen2-tied", tmp_path / "hf")
    c = reference.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(128)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    tokens = byte_level_vocab(c.vocab_size)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(["a b", "1 2"])
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_chat_template("{{ messages }}")
    with torch.no_grad():
        for key, p in reference.state_dict().items():
            if key == "lm_head.weight":
                continue  # tied: a GGUF without output.weight
            w = p.numpy().astype(np.float32)
            if w.ndim == 2:
                q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(gguf_name(key), q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
            else:
                writer.add_tensor(gguf_name(key), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def test_tiny_qwen2_gguf_converts_to_transformers_logits(tmp_path):
    reference = write_tiny_qwen2_gguf(tmp_path / "tiny.gguf", tmp_path)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted")
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["tie_word_embeddings"], config["rope_theta"]) == ("qwen2", True, 1e6)
    ours = from_pretrained(out)
    assert ours.model.layers[0].self_attn.q_proj.bias is not None and ours.model.layers[0].self_attn.o_proj.bias is None
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = reference(ids).logits, ours(ids)
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()


def test_qwen2_gguf_tokenizer_splits_like_qwen2_and_keeps_specials(tmp_path):
    write_tiny_qwen2_gguf(tmp_path / "tiny.gguf", tmp_path)
    tokenizer = load_tokenizer(convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted"))
    assert tokenizer.eos_id == tokenizer.token_to_id("<|im_end|>") == 96
    ids = tokenizer.encode("<|im_start|>ab12<|im_end|>")  # Qwen2 splits digits one by one, so "12" never merges
    assert ids == [95, tokenizer.token_to_id("ab"), tokenizer.token_to_id("1"), tokenizer.token_to_id("2"), 96]
    assert tokenizer.decode(ids) == "ab12"
    chat = json.loads((tmp_path / "converted" / "tokenizer_config.json").read_text())["chat_template"]
    assert chat == "{{ messages }}"


@pytest.mark.parametrize("arch,pre,message", [
    ("gemma", "qwen2", r"GGUF architecture 'gemma' is not supported \(supported: llama, qwen2\)"),
    ("qwen2", "tekken", r"tokenizer.ggml.pre='tekken' is not supported"),
])
def test_unsupported_architecture_or_pre_tokenizer_is_named(tmp_path, arch, pre, message):
    write_tiny_qwen2_gguf(tmp_path / "tiny.gguf", tmp_path, arch=arch, pre=pre)
    with pytest.raises(ValueError, match=message):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted")
    assert not (tmp_path / "converted").exists()
