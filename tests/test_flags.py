"""ecellm.flags: command-line flags built from a dataclass."""

import argparse
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

from ecellm.errors import FlagError
from ecellm.flags import DTYPES, dtype_name, option, parse_dtype, parse_flags, positive_int


def letter(text: str) -> str:
    """An argparse type for the tests: one lower-case letter."""
    if len(text) != 1 or not text.islower():
        raise argparse.ArgumentTypeError(f"{text!r} is not a letter")
    return text


@dataclass(kw_only=True)
class Settings:
    model: str
    files: list[str] = field(default_factory=lambda: ["a.json"])
    limit: int | None = field(default=None, metadata={"type": positive_int})
    rate: float = 0.5
    mode: str = field(default="x", metadata={"choices": ("x", "y")})
    fast: bool = True
    letters: list[str] | None = option(None, type=letter, split_commas=True, help="letters")

    def __post_init__(self):
        if self.mode == "y" and self.fast:
            raise ValueError("--mode y needs --no-fast")


def test_each_field_is_a_flag_of_its_type():
    assert parse_flags(Settings, ["--model", "m"]) == Settings(model="m")
    got = parse_flags(Settings, ["--model", "m", "--files", "b", "c", "--limit", "3", "--rate", "2", "--mode", "y",
                                 "--no-fast"])
    assert got == Settings(model="m", files=["b", "c"], limit=3, rate=2.0, mode="y", fast=False)


@pytest.mark.parametrize("argv", [["a", "b", "c"], ["a,b,c"], ["a,b", "c"], ["a,", "b", ",c"]])
def test_a_comma_list_flag_takes_spaces_commas_or_both(argv):
    assert parse_flags(Settings, ["--model", "m", "--letters", *argv]).letters == ["a", "b", "c"]


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: --model"),
    (["--model", "m", "--limit", "0"], "argument --limit: 0 is not a positive integer"),
    (["--model", "m", "--rate", "fast"], "argument --rate: invalid float value: 'fast'"),
    (["--model", "m", "--mode", "z"], "argument --mode: invalid choice: 'z'"),
    (["--model", "m", "--mode", "y"], "--mode y needs --no-fast"),  # __post_init__'s ValueError
    (["--model", "m", "--letters", "a,Bc"], "argument --letters: 'Bc' is not a letter"),  # each part converted
])
def test_bad_flags_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_flags(Settings, argv, prog="demo")
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(f"demo: error: {message}")
    assert err.rstrip().endswith("(`demo --help` lists the flags)")


def test_the_check_sees_the_flags_before_the_dataclass_is_built():
    built = []

    @dataclass(kw_only=True)
    class Slow:
        path: str
        device: str = field(default_factory=lambda: built.append("factory") or "cpu")

    def check(flags):
        assert built == [] and not hasattr(flags, "device")  # the factory has not run
        if flags.path == "missing":
            raise FlagError("--path missing: no such folder")

    with pytest.raises(FlagError, match="--path missing: no such folder"):
        parse_flags(Slow, ["--path", "missing"], check=check)
    assert parse_flags(Slow, ["--path", "ok"], check=check) == Slow(path="ok", device="cpu")
    assert parse_flags(Slow, ["--path", "ok", "--device", "cuda"]).device == "cuda" and built == ["factory"]


def test_help_lists_groups_choices_defaults_and_required(capsys):
    @dataclass(kw_only=True)
    class Grouped:
        data: str | None = option(None, required=True, group="inputs", help="the data folder")
        rank: int = option(16, group="LoRA", help="LoRA rank")
        mode: str = option("x", choices=("x", "y"), help="the mode")

    with pytest.raises(SystemExit) as e:
        parse_flags(Grouped, ["--help"], prog="demo")
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert "inputs: --data DATA the data folder (required)" in out
    assert "LoRA: --rank RANK LoRA rank (default: 16)" in out and "--mode {x,y} the mode (default: x)" in out
    with pytest.raises(SystemExit):
        parse_flags(Grouped, [], prog="demo")  # required on the command line, optional in code
    assert Grouped().data is None


def test_dtype_names_short_and_long():
    assert parse_dtype("bf16") is parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("fp32") is parse_dtype("float32") is torch.float32
    assert [dtype_name(n) for n in ("bfloat16", "fp16", "int8")] == ["bf16", "fp16", "int8"]
    with pytest.raises(ValueError, match="dtype 'int8': expected one of"):
        parse_dtype("int8")
    assert set(DTYPES) == {"bf16", "fp32", "fp16"}


def test_flags_and_settings_import_no_torch():
    """The command line parses and checks before torch loads (importing torch takes seconds)."""
    code = "import sys, ecellm.cli, ecellm.configs, ecellm.flags; print(sorted(m for m in sys.modules if 'torch' in m))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


@pytest.mark.parametrize("argv", [[], ["--lora-r", "8", "--no-group-by-length", "--dtype", "fp32", "--resume"]])
def test_train_config_flags_are_the_ones_train_builds(argv):
    """`parse_flags(TrainConfig, ...)` is what `ecellm.train.parse_args` (python -m ecellm.train) builds."""
    from ecellm.train import TrainConfig, parse_args

    argv = ["--data", "d", *argv]
    assert parse_flags(TrainConfig, argv) == parse_args(argv)


def test_a_field_may_have_alias_flags():
    @dataclass
    class Packing:
        pack_tokens: int = field(default=0, metadata={"aliases": ["--rows"]})  # not an abbreviation of the name

    assert parse_flags(Packing, ["--rows", "4096"]).pack_tokens == 4096
    assert parse_flags(Packing, ["--pack-tokens", "512"]).pack_tokens == 512
