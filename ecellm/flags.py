"""Command-line flags built from a dataclass: each field is one flag, so a command's settings are written once.

    @dataclass(kw_only=True)
    class Config:
        model: str                                   # required: --model DIR
        batch_size: int = field(default=8, metadata={"type": positive_int, "help": "prompts per batch"})
        tasks: list[str] | None = None               # --tasks PM SA
        greedy: bool = False                         # --greedy / --no-greedy

    config = parse_flags(Config, argv, prog="ecellm eval")

A field `x_y` becomes `--x-y`. Its type gives the flag's kind: `bool` an on/off pair, `list[T]` one or more values,
`T | None` an optional value, `int` / `float` / `str` one value. A field's `metadata` may add "help", "choices",
"metavar", "aliases" (other flag names, e.g. `["--pack"]`) and "type" (a converter that raises
`argparse.ArgumentTypeError` for a bad value). A field without a default is a required flag. A `ValueError` from the dataclass's `__post_init__` is reported as a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence

import torch

# Precision names the commands accept; the long torch names are accepted too.
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DTYPE_ALIASES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype of "bf16", "fp32" or "fp16" (or "bfloat16", "float32", "float16")."""
    short = DTYPE_ALIASES.get(name, name)
    if short not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(DTYPES)} (or {sorted(DTYPE_ALIASES)})")
    return DTYPES[short]


def positive_int(text: str) -> int:
    """An argparse type: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _kind(annotation) -> tuple[type, bool, bool]:
    """(value type, is a list, may be None) of a field annotation such as `int`, `list[str] | None`."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional, annotation = True, args[0]
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True, optional
    return annotation, False, optional


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def add_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Add one flag per field of the dataclass `config_class` to `parser` (see the module docstring)."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        flags, default = ["--" + field.name.replace("_", "-"), *field.metadata.get("aliases", [])], _default(field)
        value_type, many, _ = _kind(hints[field.name])
        options = {k: field.metadata[k] for k in ("choices", "metavar") if k in field.metadata}
        help_text = field.metadata.get("help", "")
        if default is dataclasses.MISSING:
            options["required"] = True
        else:
            options["default"] = default
        if default not in (None, dataclasses.MISSING):
            help_text = f"{help_text} (default: {default!r})".lstrip()
        if value_type is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, help=help_text, **options)
            continue
        if many:
            options["nargs"] = "+"
        parser.add_argument(*flags, type=field.metadata.get("type", value_type), help=help_text, **options)


def parse_flags(config_class: type, argv: Sequence[str] | None = None, *, prog: str | None = None,
                description: str | None = None):
    """An instance of the dataclass `config_class` from command-line flags (`sys.argv[1:]` when argv is None).

    Raises:
        SystemExit: a usage error (unknown, missing or bad flag, or a `ValueError` of `__post_init__`), after
            argparse printed it.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_flags(parser, config_class)
    values = vars(parser.parse_args(argv))
    try:
        return config_class(**values)
    except ValueError as e:
        parser.error(str(e))
