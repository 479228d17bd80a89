"""The `ecellm` command: subcommands train, eval, generate, convert-gguf, each built from a dataclass."""

import json
import re
import subprocess
import sys

import pytest
import torch

import ecellm.models.gguf_convert as gguf_convert
from ecellm.cli import main, run
from ecellm.generate import generate_text
from ecellm.models import from_pretrained
from ecellm.synthetic import write_dataset
from ecellm.tokenizer import load_tokenizer

from .tiny_checkpoint import make_tiny_checkpoint


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
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tiny), "--data", "x.json", "--out", str(tmp_path), "--sample", "--greedy"])
    assert capsys.readouterr().err.splitlines()[-1] == "ecellm eval: error: --sample and --greedy exclude each other"


def test_convert_gguf_subcommand_passes_its_flags(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(gguf_convert, "convert_gguf", lambda src, out: calls.append((src, out)) or out)
    main(["convert-gguf", "--gguf", "m.gguf", "--out", str(tmp_path / "ckpt")])
    assert calls == [("m.gguf", str(tmp_path / "ckpt"))]
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
                          capsys) == f"ecellm eval: error: {missing}: no such file"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    assert one_line_error(["eval", "--model", str(tiny), "--data", str(bad), "--out", str(tmp_path / "o")],
                          capsys) == f"ecellm eval: error: {bad}: record 0: field 'input': missing"
    assert one_line_error(["train", "--data", str(tmp_path), "--out", str(tmp_path / "typo"), "--resume"],
                          capsys).startswith(f"ecellm.train: error: --resume: {tmp_path / 'typo'} does not exist")
    nowhere = tmp_path / "nowhere"
    line = one_line_error(["generate", "--model", str(nowhere), "--prompt", "x"], capsys)
    assert line.startswith("ecellm generate: error: ") and str(nowhere) in line


def test_python_dash_m_ecellm_runs_the_command():
    out = subprocess.run([sys.executable, "-m", "ecellm", "generate", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("usage: ecellm generate") and "--max-new-tokens" in out
