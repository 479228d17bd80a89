"""The `ecellm` command: subcommands train, eval, generate, convert-gguf, each built from a dataclass."""

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ecellm.generate
import ecellm.models.gguf_convert as gguf_convert
from ecellm.cli import ConvertConfig, GenerateConfig, main, run
from ecellm.configs import MODEL_NAMES, EvalConfig, TrainConfig
from ecellm.flags import add_flags, parse_flags
from ecellm.generate import generate_text
from ecellm.lora import inject, save_adapter
from ecellm.models import from_pretrained
from ecellm.models.decoder import DecoderOnlyLM
from ecellm.synthetic import SyntheticConfig, write_dataset
from ecellm.tokenizer import load_tokenizer

from .tiny_checkpoint import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), tasks=("PM",))


def test_generate_prints_what_generate_text_gives(tiny, capsys):
    """`run` returns the generations; `main`, the console script, returns None (its exit status)."""
    prompts = ["Product 1 and product 2", "yes or no"]
    texts = run(["generate", "--model", str(tiny), "--prompt", *prompts, "--max-new-tokens", "5"])
    model, tokenizer = from_pretrained(tiny, dtype=torch.float32).eval(), load_tokenizer(tiny)
    assert texts == generate_text(model, tokenizer, prompts, max_new_tokens=5, progress=False)
    assert capsys.readouterr().out == "".join(t + "\n" for t in texts)
    assert main(["generate", "--model", str(tiny), "--prompt", "x", "--max-new-tokens", "1"]) is None


@pytest.mark.parametrize("dtype", ["fp32", "float32"])  # train's names, and the old long ones
def test_eval_subcommand_takes_train_style_dtype_names(tiny, tmp_path, dtype, capsys):
    write_dataset(tmp_path / "data", n_per_task=1, n_eval_per_task=2, seed=0, tasks=["PM"])
    main(["eval", "--model", str(tiny), "--data", str(tmp_path / "data" / "test.json"), "--out", str(tmp_path / "out"),
          "--max-new-tokens", "3", "--dtype", dtype])
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert [(r["task"], r["n"]) for r in results] == [("PM", 2)]
    assert "| PM | IND_Diverse_Instruction | f1 |" in capsys.readouterr().out


def test_eval_subcommand_errors_name_the_subcommand(tiny, tmp_path, capsys):
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tiny), "--data", str(tmp_path / "x.json"), "--out", str(tmp_path), "--sample",
              "--greedy"])
    assert capsys.readouterr().err.startswith("ecellm eval: error: --sample and --greedy exclude each other")


def test_convert_gguf_subcommand_passes_its_flags(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(gguf_convert, "convert_gguf", lambda src, out: calls.append((src, out)) or out)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    main(["convert-gguf", "--gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "ckpt")])
    assert calls == [(str(tmp_path / "m.gguf"), str(tmp_path / "ckpt"))]
    assert capsys.readouterr().out == f"wrote {tmp_path / 'ckpt'}\n"


def test_train_subcommand_has_the_train_config_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0 and "--lora-r" in capsys.readouterr().out


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["nope"])
    assert e.value.code == 2
    assert re.fullmatch(r"usage: ecellm \{train,eval,generate,convert-gguf,\S*\} \[FLAGS\] \(got nope\); .*\n",
                        capsys.readouterr().err)


def one_line_error(argv: list[str], capsys) -> str:
    """The stderr of a command that must end in one line and exit status 1 (an expected error, no traceback)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    return err.splitlines()[-1]


def test_expected_errors_end_in_one_line_and_status_1(tiny, tmp_path, capsys):
    """Bad input, an unusable folder, a refused resume: one line naming what and where, exit status 1."""
    missing = tmp_path / "missing.json"
    assert one_line_error(["eval", "--model", str(tiny), "--data", str(missing), "--out", str(tmp_path / "o")],
                          capsys) == f"ecellm eval: error: --data {missing}: no such file"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    assert one_line_error(["eval", "--model", str(tiny), "--data", str(bad), "--out", str(tmp_path / "o")],
                          capsys) == f"ecellm eval: error: {bad}: record 0: field 'input': missing"
    write_dataset(tmp_path / "data", n_per_task=1, n_eval_per_task=1, tasks=["PM"])
    assert one_line_error(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "typo"), "--resume"],
                          capsys).startswith(f"ecellm train: error: --resume: {tmp_path / 'typo'} does not exist")
    nowhere = tmp_path / "nowhere"
    assert one_line_error(["generate", "--model", str(nowhere), "--prompt", "x"], capsys) == (
        f"ecellm generate: error: --model: '{nowhere}' is neither a folder nor a known model (known: "
        f"{', '.join(MODEL_NAMES)})")
    assert "did you mean 'smollm2'?" in one_line_error(["generate", "--model", "smolm2", "--prompt", "x"], capsys)


def timed_command(argv: list[str], cwd) -> tuple[float, subprocess.CompletedProcess]:
    """(seconds, result) of `python -m ecellm ARGV`, start-up included, as a user runs it."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this tree's ecellm, run from another folder
    result = subprocess.run([sys.executable, "-m", "ecellm", *argv], capture_output=True, text=True, cwd=cwd, env=env)
    return time.perf_counter() - start, result


@pytest.mark.parametrize("argv, names", [
    (["train"], "--data"),
    (["train", "--data", "no_such_folder"], "--data no_such_folder: no such folder"),
    (["train", "--data", "data", "--model", "no_such_model"],
     "--model: 'no_such_model' is neither a folder nor a known model"),
    (["train", "--data", "data", "--out", "data/train.json"], "--out data/train.json: not a folder"),
    (["eval"], "--data"),
    (["eval", "--model", "smollm2", "--data", "missing.json", "--out", "o"], "--data missing.json: no such file"),
    (["generate", "--model", "m"], "--prompt"),
])
def test_usage_errors_come_before_torch_loads_within_3_seconds(argv, names, tmp_path):
    """A missing flag or path is told in one line before torch and the model load (torch alone takes seconds)."""
    write_dataset(tmp_path / "data", n_per_task=1, n_eval_per_task=1, tasks=["PM"])
    seconds, result = timed_command(argv, tmp_path)
    assert result.returncode in (1, 2) and len(result.stderr.splitlines()) == 1 and names in result.stderr
    assert seconds < 3, f"{argv}: {seconds:.1f} s"


def test_ctrl_c_is_one_line_and_status_130(tiny, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ecellm.generate, "generate_text", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tiny), "--prompt", "x"])
    assert e.value.code == 130 and capsys.readouterr().err == "ecellm generate: interrupted\n"


def test_a_bug_shows_its_traceback(tiny, tmp_path, monkeypatch):
    """A ValueError inside a model's forward pass is a bug, not bad input: it is not turned into one line."""
    def broken(*args, **kwargs):
        raise ValueError("a bug inside the model")

    monkeypatch.setattr(DecoderOnlyLM, "start_decoding", broken)
    with pytest.raises(ValueError, match="a bug inside the model"):
        main(["generate", "--model", str(tiny), "--prompt", "x"])
    monkeypatch.setattr(DecoderOnlyLM, "forward", broken)
    write_dataset(tmp_path / "data", n_per_task=2, n_eval_per_task=1, tasks=["PM"])
    with pytest.raises(ValueError, match="a bug inside the model"):
        main(["train", "--model", str(tiny), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
              "--dtype", "fp32", "--global-batch", "2", "--max-steps", "1"])


def test_generate_tells_broken_tokenizers_in_one_line(tiny, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "tokenizer.json").write_text('{"model": 3}')
    line = one_line_error(["generate", "--model", str(broken), "--prompt", "x"], capsys)
    assert line.startswith(f"ecellm generate: error: {broken / 'tokenizer.json'}: ")
    bigger = make_tiny_checkpoint(tmp_path / "bigger", tasks=("PM",), vocab_size=512)
    line = one_line_error(["generate", "--model", str(tiny), "--tokenizer", str(bigger), "--prompt", "x"], capsys)
    assert line.startswith(f"ecellm generate: error: the tokenizer {bigger} has ")


def test_generate_tells_adapters_that_do_not_fit_in_one_line(tiny, tmp_path, capsys):
    wider = make_tiny_checkpoint(tmp_path / "wider", tasks=("PM",), hidden_size=48)
    other_base = tmp_path / "other_base"
    save_adapter(inject(from_pretrained(wider), r=2), other_base)
    line = one_line_error(["generate", "--model", str(tiny), "--adapter", str(other_base), "--prompt", "x"], capsys)
    assert line.startswith(f"ecellm generate: error: {other_base / 'adapter_model.safetensors'}: ")
    prefix_tuning = tmp_path / "prefix_tuning"
    shutil.copytree(other_base, prefix_tuning)
    config = json.loads((prefix_tuning / "adapter_config.json").read_text())
    (prefix_tuning / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    line = one_line_error(["generate", "--model", str(tiny), "--adapter", str(prefix_tuning), "--prompt", "x"],
                          capsys)
    assert line == (f"ecellm generate: error: {prefix_tuning / 'adapter_config.json'}: peft_type is 'PREFIX_TUNING'; "
                    "only 'LORA' adapters are supported")


COMMAND_CONFIGS = {"train": TrainConfig, "eval": EvalConfig, "generate": GenerateConfig, "convert-gguf": ConvertConfig,
                   "python -m ecellm.synthetic": SyntheticConfig}


@pytest.mark.parametrize("command", COMMAND_CONFIGS)
def test_every_flag_explains_itself(command):
    parser = argparse.ArgumentParser()
    add_flags(parser, COMMAND_CONFIGS[command])
    flags = [a for a in parser._actions if a.dest != "help"]
    assert flags and not [a.option_strings[0] for a in flags if not a.help or a.help.startswith("(")]


@pytest.mark.parametrize("command, shown", [
    ("train", ["--dtype {bf16,fp32}", "--quantize {nf4}", "--template {alpaca,mistral}",
               "--loss-average {example,token}", "--tasks TASK [TASK ...]", "model and data:", "LoRA:"]),
    ("eval", ["--dtype {bf16,fp32,fp16}", "--template {alpaca,mistral}", "--tasks TASK [TASK ...]"]),
    ("generate", ["--dtype {bf16,fp32,fp16}"]),
])
def test_help_lists_the_values_a_flag_takes(command, shown, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and not [s for s in shown if s not in out]


@pytest.mark.parametrize("config_class, required", [(TrainConfig, ["--data", "d"]),
                                                    (EvalConfig, ["--model", "m", "--data", "d", "--out", "o"]),
                                                    (SyntheticConfig, ["--out", "o"])])
def test_task_lists_are_spaces_or_commas_in_both_commands(config_class, required):
    spaced = parse_flags(config_class, [*required, "--tasks", "PM", "sa"])
    assert spaced.tasks == parse_flags(config_class, [*required, "--tasks", "PM,sa"]).tasks
    assert spaced.tasks == ["Product_Matching", "Sentiment_Analysis"]


def test_unset_settings_are_none_not_empty_strings():
    assert not [k for k, v in dataclasses.asdict(TrainConfig()).items() if v == ""]
    assert TrainConfig(tasks="PM,SA", lora_targets="q_proj, v_proj").tasks == ["PM", "SA"]  # code's older form
    assert TrainConfig(lora_targets="q_proj, v_proj").lora_targets == ["q_proj", "v_proj"]


def test_model_names_are_the_fetchable_models():
    from ecellm.models.default import MODELS

    assert sorted(MODEL_NAMES) == sorted(MODELS)


def test_python_dash_m_ecellm_runs_the_command():
    out = subprocess.run([sys.executable, "-m", "ecellm", "generate", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("usage: ecellm generate") and "--max-new-tokens" in out
