"""ecellm.flags: command-line flags built from a dataclass."""

from dataclasses import dataclass, field

import pytest
import torch

from ecellm.flags import parse_dtype, parse_flags, positive_int


@dataclass(kw_only=True)
class Settings:
    model: str
    files: list[str] = field(default_factory=lambda: ["a.json"])
    limit: int | None = field(default=None, metadata={"type": positive_int})
    rate: float = 0.5
    mode: str = field(default="x", metadata={"choices": ("x", "y")})
    fast: bool = True

    def __post_init__(self):
        if self.mode == "y" and self.fast:
            raise ValueError("--mode y needs --no-fast")


def test_each_field_is_a_flag_of_its_type():
    assert parse_flags(Settings, ["--model", "m"]) == Settings(model="m")
    got = parse_flags(Settings, ["--model", "m", "--files", "b", "c", "--limit", "3", "--rate", "2", "--mode", "y",
                                 "--no-fast"])
    assert got == Settings(model="m", files=["b", "c"], limit=3, rate=2.0, mode="y", fast=False)


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: --model"),
    (["--model", "m", "--limit", "0"], "argument --limit: 0 is not a positive integer"),
    (["--model", "m", "--rate", "fast"], "argument --rate: invalid float value: 'fast'"),
    (["--model", "m", "--mode", "z"], "argument --mode: invalid choice: 'z'"),
    (["--model", "m", "--mode", "y"], "--mode y needs --no-fast"),  # __post_init__'s ValueError
])
def test_bad_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_flags(Settings, argv, prog="demo")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.splitlines()[-1].startswith(f"demo: error: {message}")


def test_dtype_names_short_and_long():
    assert parse_dtype("bf16") is parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("fp32") is parse_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="dtype 'int8': expected one of"):
        parse_dtype("int8")


@pytest.mark.parametrize("argv", [[], ["--lora-r", "8", "--no-group-by-length", "--dtype", "fp32", "--resume"]])
def test_train_config_flags_are_the_ones_train_builds(argv):
    """`parse_flags(TrainConfig, ...)` is a drop-in for `ecellm.train.parse_args` (which train.py can then use)."""
    from ecellm.train import TrainConfig, parse_args

    assert parse_flags(TrainConfig, argv) == parse_args(argv)


def test_a_field_may_have_alias_flags():
    @dataclass
    class Packing:
        pack_tokens: int = field(default=0, metadata={"aliases": ["--rows"]})  # not an abbreviation of the name

    assert parse_flags(Packing, ["--rows", "4096"]).pack_tokens == 4096
    assert parse_flags(Packing, ["--pack-tokens", "512"]).pack_tokens == 512
