"""`convert_gguf` on tiny Qwen2 GGUF files written here with the `gguf` package: names, q/k/v biases, tied head,
quantized blocks and the Qwen2 pre-tokenizer, against transformers' Qwen2 holding the same (round-tripped) weights.
The real Qwen2.5 GGUF files are tests/models/test_qwen_gguf.py's."""

from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
import torch

from ecellm.models import from_pretrained
from ecellm.models.gguf_check import GGUFError
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


# --- malformed files: each refused in one line naming the file, before anything is written ---------------------
def write_small_gguf(path, blocks: int = 1, block_count: int | None = None, eos: int = 97, arch: str = "llama",
                     pre: str = "smollm"):
    """A small Llama GGUF with random F32 weights, built without transformers (hidden 8, 2 heads, 1 key/value head,
    feed-forward 16, the 99-token byte-level vocabulary); `block_count` overrides what the metadata says."""
    hidden, ff, vocab = 8, 16, 99
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(blocks if block_count is None else block_count)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    tokens = byte_level_vocab(vocab)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(["a b", "1 2"])
    writer.add_eos_token_id(eos)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(blocks):
        shapes |= {f"blk.{i}.{name}": shape for name, shape in (
            ("attn_norm.weight", (hidden,)), ("ffn_norm.weight", (hidden,)), ("attn_q.weight", (hidden, hidden)),
            ("attn_k.weight", (4, hidden)), ("attn_v.weight", (4, hidden)), ("attn_output.weight", (hidden, hidden)),
            ("ffn_gate.weight", (ff, hidden)), ("ffn_up.weight", (ff, hidden)), ("ffn_down.weight", (hidden, ff)))}
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tensor_info_offset(path, index: int) -> tuple[int, int]:
    """(byte offset of tensor `index`'s type field, of its data offset field) in the file's tensor table."""
    field = gguf.GGUFReader(str(path)).tensors[index].field
    name_len, n_dims = int(field.parts[0][0]), int(field.parts[2][0])
    type_at = field.offset + 8 + name_len + 4 + 8 * n_dims
    return type_at, type_at + 4


def _array_length_offset(path, key: str) -> int:
    """Byte offset of the item count of the metadata array `key`."""
    return gguf.GGUFReader(str(path)).fields[key].offset + 8 + len(key) + 4 + 4


def _patch(path, at: int, fmt: str, value) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, at, value)
    path.write_bytes(bytes(data))


def _cut(path, keep: float) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


MALFORMED = {
    "empty": (lambda p: p.write_bytes(b""), r"the file is empty, not a GGUF file"),
    "not GGUF": (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(60)), r"not a GGUF file \(it starts with b'PK"),
    "version 99": (lambda p: _patch(p, 4, "<I", 99), r"GGUF version 99 is not supported \(supported: 2, 3\)"),
    "cut in the header": (lambda p: p.write_bytes(p.read_bytes()[:10]), r"cut short: the file ends inside the "
                                                                            r"tensor count"),
    "cut in the metadata": (lambda p: _cut(p, 0.03), r"cut short|more than the \d+ bytes left"),
    "cut in the data": (lambda p: _cut(p, 0.9), r"cut short: tensor '.*' needs bytes \d+ to \d+ of the data "
                                                r"section, which holds \d+"),
    "2^40 tensors": (lambda p: _patch(p, 8, "<Q", 2**40), r"the tensor count is 1099511627776, more than the \d+ "
                                                           r"bytes left in the file can hold"),
    "2^40 metadata": (lambda p: _patch(p, 16, "<Q", 2**40), r"the metadata count is 1099511627776"),
    "2^40 tokens": (lambda p: _patch(p, _array_length_offset(p, "tokenizer.ggml.tokens"), "<Q", 2**40),
                    r"the length of the array 'tokenizer.ggml.tokens' is 1099511627776"),
    "unknown tensor type": (lambda p: _patch(p, _tensor_info_offset(p, 1)[0], "<I", 99),
                            r"tensor 'output_norm.weight' has the unknown tensor type 99"),
    "overlapping tensors": (lambda p: _patch(p, _tensor_info_offset(p, 2)[1], "<Q", 32),
                            r"tensors '.*' \(bytes \d+ to \d+\) and '.*' \(from byte 32\) overlap"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_gguf_file_is_refused_in_one_line_before_anything_is_written(tmp_path, case):
    path = write_small_gguf(tmp_path / "bad.gguf")
    damage, message = MALFORMED[case]
    damage(path)
    with pytest.raises(GGUFError, match=message) as caught:
        convert_gguf(path, tmp_path / "out" / "converted")
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs,message", [
    ({"eos": 10**6}, r"tokenizer.ggml.eos_token_id is 1000000, outside the vocabulary of 99 tokens"),
    ({"block_count": 100000}, r"the GGUF metadata says 100000 blocks \(block_count\) but the file holds tensors of "
                              r"blocks 0 to 0 \(1 in all\)"),
    ({"arch": "gemma"}, r"GGUF architecture 'gemma' is not supported \(supported: llama, qwen2\)"),
    ({"pre": "tekken"}, r"tokenizer.ggml.pre='tekken' is not supported"),
])
def test_a_gguf_file_describing_no_convertible_model_is_refused_before_writing(tmp_path, kwargs, message):
    path = write_small_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(GGUFError, match=message):
        convert_gguf(path, tmp_path / "out" / "converted")
    assert not (tmp_path / "out").exists()


def test_a_gguf_tensor_of_another_shape_is_refused_before_writing(tmp_path):
    path = write_small_gguf(tmp_path / "bad.gguf")
    reader = gguf.GGUFReader(str(path))
    dims_at = reader.tensors[0].field.offset + 8 + len("token_embd.weight") + 4  # token_embd's dims: (8, 99)
    _patch(path, dims_at + 8, "<Q", 98)  # 98 rows: its bytes still fit the file, but not the model
    with pytest.raises(GGUFError, match=r"GGUF tensor 'token_embd.weight' has shape \(98, 8\); the model its "
                       r"metadata describes has shape \(99, 8\) for model.embed_tokens.weight"):
        convert_gguf(path, tmp_path / "converted")


def test_the_small_gguf_converts_and_convert_gguf_tells_a_bad_one_in_one_line(tmp_path, capsys):
    from ecellm import cli

    good = write_small_gguf(tmp_path / "good.gguf")
    model = from_pretrained(convert_gguf(good, tmp_path / "converted"))
    assert model.config.num_hidden_layers == 1
    (tmp_path / "bad.gguf").write_bytes(b"")
    capsys.readouterr()  # the conversion's progress bar
    with pytest.raises(SystemExit) as exit_:
        cli.run(["convert-gguf", "--gguf", str(tmp_path / "bad.gguf"), "--out", str(tmp_path / "x")])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == (f"ecellm convert-gguf: error: {tmp_path / 'bad.gguf'}: the file is empty, not "
                                       "a GGUF file\n")


# --- the output folder: locked, and nothing ecellm did not write is ever removed ------------------------------
def test_a_file_put_into_the_output_folder_during_a_conversion_is_kept(tmp_path, monkeypatch):
    import ecellm.models.gguf_convert as gc

    path, out = write_small_gguf(tmp_path / "small.gguf"), tmp_path / "converted"
    weights = gc._weights

    def user_writes_meanwhile(*args):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return weights(*args)

    monkeypatch.setattr(gc, "_weights", user_writes_meanwhile)
    with pytest.raises(FileExistsError, match=rf"{out} exists and is not empty \(it holds notes.txt\); choose a "
                                              "new directory"):
        convert_gguf(path, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_a_file_of_the_same_name_appearing_meanwhile_is_never_replaced(tmp_path, monkeypatch):
    import ecellm.models.gguf_convert as gc

    path, out = write_small_gguf(tmp_path / "small.gguf"), tmp_path / "converted"
    save = gc.save_file

    def user_writes_config(*args, **kwargs):  # while the weights are written, after the folder was taken
        (out / "config.json").write_text("the user's")
        return save(*args, **kwargs)

    monkeypatch.setattr(gc, "save_file", user_writes_config)
    with pytest.raises(FileExistsError, match=rf"{out / 'config.json'} appeared while the conversion was written; "
                                              "it is left as it was"):
        convert_gguf(path, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert (out / "config.json").read_text() == "the user's"


def test_a_conversion_into_a_folder_another_job_holds_is_refused(tmp_path):
    from ecellm.lock import FolderBusy, FolderLock

    path, out = write_small_gguf(tmp_path / "small.gguf"), tmp_path / "converted"
    other = FolderLock(out, "conversion")
    other.acquire(print)
    try:
        with pytest.raises(FolderBusy, match=rf"{out} is in use by another conversion"):
            convert_gguf(path, out)
        assert sorted(p.name for p in out.iterdir()) == ["ecellm.lock"]
    finally:
        other.release()
    assert (convert_gguf(path, out) / "model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
