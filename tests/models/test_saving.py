"""ecellm.models.saving: Hugging Face checkpoint directories, sharded past a size limit, written all at once."""

import json

import pytest
import torch

from ecellm.models import from_config, from_pretrained
from ecellm.models.saving import parse_size, plan_shards, save_pretrained

TINY = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": False, "torch_dtype": "float16"}


def test_parse_size_and_shard_plan():
    assert parse_size("5GB") == 5 * 10**9 and parse_size(" 1.5 mb") == 1_500_000 and parse_size(7) == 7
    with pytest.raises(ValueError, match="max_shard_size '5 GiB'"):
        parse_size("5 GiB")
    tensors = {"a": torch.zeros(10), "b": torch.zeros(10), "c": torch.zeros(30)}  # 40, 40, 120 bytes
    assert plan_shards(tensors, 80) == [["a", "b"], ["c"]]  # a tensor larger than the limit gets a shard alone


def test_round_trip_sharded_with_dtype_recorded(tmp_path):
    model = from_config(TINY, device="cpu")
    save_pretrained(tmp_path / "ckpt", TINY, model.state_dict(), max_shard_size=5000)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["dtype"] == "float32" and "torch_dtype" not in config
    assert len(list((tmp_path / "ckpt").glob("model-*-of-*.safetensors"))) > 1
    loaded = from_pretrained(tmp_path / "ckpt")
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_a_failed_transform_leaves_no_directory(tmp_path):
    model = from_config(TINY, device="cpu")

    def fail(key, tensor):
        raise RuntimeError(f"cannot merge {key}")

    with pytest.raises(RuntimeError, match="cannot merge"):
        save_pretrained(tmp_path / "ckpt", TINY, model.state_dict(), transform=fail)
    assert list(tmp_path.iterdir()) == []


def test_files_that_appear_in_the_directory_while_saving_are_never_removed_or_replaced(tmp_path, monkeypatch):
    import ecellm.models.saving as saving

    model, out = from_config(TINY, device="cpu"), tmp_path / "ckpt"
    save = saving.save_file

    def user_writes_meanwhile(*args, **kwargs):
        (out / "notes.txt").write_text("mine")
        return save(*args, **kwargs)

    monkeypatch.setattr(saving, "save_file", user_writes_meanwhile)
    save_pretrained(out, TINY, model.state_dict())  # written beside the user's file, which stays
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]

    def user_writes_weights_meanwhile(tensors, file, **kwargs):
        (tmp_path / "again" / "model.safetensors").write_text("the user's")
        return save(tensors, file, **kwargs)

    monkeypatch.setattr(saving, "save_file", user_writes_weights_meanwhile)
    with pytest.raises(FileExistsError, match=r"again/model.safetensors appeared while the checkpoint was written; it "
                                              "is left as it was"):
        save_pretrained(tmp_path / "again", TINY, model.state_dict())
    assert [p.name for p in (tmp_path / "again").iterdir()] == ["model.safetensors"]
    assert (tmp_path / "again" / "model.safetensors").read_text() == "the user's"
