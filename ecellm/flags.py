"""Command-line flags built from a dataclass: each field is one flag, so a command's settings are written once.

    @dataclass(kw_only=True)
    class Config:
        model: str = option(help="checkpoint directory")                   # no default: a required flag
        batch_size: int = option(8, type=positive_int, help="prompts per batch")
        tasks: list[str] | None = option(None, split_commas=True, help="task names")   # --tasks PM SA or PM,SA
        greedy: bool = option(False, help="greedy decoding")                 # --greedy / --no-greedy

    config = parse_flags(Config, argv, prog="ecellm eval")

A field `x_y` becomes `--x-y`. Its type gives the flag's kind: `bool` an on/off pair, `list[T]` one or more values
separated by spaces, `T | None` an optional value (None: not set), `int` / `float` / `str` one value. A field's
`metadata` (the keywords of `option`) may add "help", "choices", "metavar", "group" (the heading it is listed under in
--help), "aliases" (other flag names, e.g. `["--pack"]`), "type" (a converter that raises
`argparse.ArgumentTypeError` for a bad value), "required" (a flag the command needs although the field has a default
for code that builds the dataclass itself) and "split_commas" (a list flag that also takes `a,b`). A field without a
default is a required flag. A usage error is one line on stderr and exit status 2; a `ValueError` from the dataclass's
`__post_init__` is one too.

This module imports no torch: a command parses and checks its flags before anything slow is imported. Precision
flags are names ("bf16"); `parse_dtype` turns one into a torch dtype where torch is in use anyway.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

# Precision names the commands accept (short name -> torch's name); the long names are accepted too.
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
DTYPE_ALIASES = {long: short for short, long in DTYPES.items()}


def dtype_name(name: str) -> str:
    """The short precision name of a long one ("bfloat16" -> "bf16"); any other name as given. An argparse type for
    a precision flag, whose choices then refuse an unknown name."""
    return DTYPE_ALIASES.get(name, name)


def parse_dtype(name: str):
    """The torch dtype (e.g. `torch.bfloat16`) of a precision name, short or long ("bf16" or "bfloat16").

    Raises:
        ValueError: an unknown name.
    """
    import torch  # here, not at the top: the callers have imported torch already, the command line has not

    if dtype_name(name) not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(DTYPES)} (or {sorted(DTYPE_ALIASES)})")
    return getattr(torch, DTYPES[dtype_name(name)])


def positive_int(text: str) -> int:
    """An argparse type: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
           **metadata: Any) -> Any:
    """A dataclass field that is a flag: its default (none: a required flag), its help text and any other metadata
    key of the module docstring (`choices`, `group`, `type`, ...)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **metadata})


class _OneLineParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose usage errors are one line (a command with 40 flags has a long usage text)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the flags)\n")


class _CommaList(argparse.Action):
    """A list flag given as `--x a b`, `--x a,b` or both; each part converted by `convert`."""

    def __init__(self, *args, convert: Callable[[str], Any] = str, **kwargs):
        super().__init__(*args, **kwargs)
        self.convert = convert

    def __call__(self, parser, namespace, values, option_string=None):
        parts = [part.strip() for value in values for part in value.split(",") if part.strip()]
        try:
            setattr(namespace, self.dest, [self.convert(part) for part in parts])
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise argparse.ArgumentError(self, str(e)) from None


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
    """The flag's default: the field's, `argparse.SUPPRESS` for a default factory (left to the dataclass, which
    calls it only when the flag is not given: the factory may be slow), `MISSING` for none."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return argparse.SUPPRESS
    return dataclasses.MISSING


def _help(field: dataclasses.Field, default, is_bool: bool) -> str:
    """The field's help text, ending in its default ("on" or "off" for a boolean) or "(required)"."""
    text = field.metadata.get("help", "")
    if default is dataclasses.MISSING or field.metadata.get("required"):
        return f"{text} (required)".lstrip()
    if default in (None, argparse.SUPPRESS):
        return text
    if is_bool:
        shown = "on" if default else "off"
    elif isinstance(default, list):
        shown = " ".join(map(str, default))
    else:
        shown = default
    return f"{text} (default: {shown})".lstrip()


def add_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Add one flag per field of the dataclass `config_class` to `parser` (see the module docstring), each under its
    field's "group" heading when it has one."""
    hints, groups = typing.get_type_hints(config_class), {}
    for field in dataclasses.fields(config_class):
        group_name = field.metadata.get("group")
        target = groups.setdefault(group_name, parser.add_argument_group(group_name)) if group_name else parser
        flags, default = ["--" + field.name.replace("_", "-"), *field.metadata.get("aliases", [])], _default(field)
        value_type, many, _ = _kind(hints[field.name])
        options = {k: field.metadata[k] for k in ("choices", "metavar") if k in field.metadata}
        options["help"] = _help(field, default, value_type is bool)
        if default is dataclasses.MISSING or field.metadata.get("required"):
            options["required"] = True
        if default is not dataclasses.MISSING:
            options["default"] = default
        convert = field.metadata.get("type", value_type)
        if value_type is bool:
            target.add_argument(*flags, action=argparse.BooleanOptionalAction, **options)
        elif many and field.metadata.get("split_commas"):
            target.add_argument(*flags, nargs="+", action=_CommaList, convert=convert, **options)
        else:
            target.add_argument(*flags, type=convert, nargs="+" if many else None, **options)


def parse_flags(config_class: type, argv: Sequence[str] | None = None, *, prog: str | None = None,
                description: str | None = None, check: Callable[[argparse.Namespace], None] | None = None):
    """An instance of the dataclass `config_class` from command-line flags (`sys.argv[1:]` when argv is None).

    Args:
        config_class: a dataclass whose fields are the flags (see the module docstring).
        argv: the flags; `sys.argv[1:]` when None.
        prog: the command's name in help and errors.
        description: the text --help shows under the usage line.
        check: called with the parsed flags (one attribute per field) before the dataclass is built; it raises an
            expected error (`ecellm.errors.FlagError`) for a value that cannot be used (a missing folder, ...).
            Building the dataclass may be slow (a default that asks torch for a GPU), the check never is.
    Raises:
        SystemExit: a usage error (unknown, missing or bad flag, or a `ValueError` of `__post_init__`), after one
            line on stderr.
    """
    parser = _OneLineParser(prog=prog, description=description)
    add_flags(parser, config_class)
    values = parser.parse_args(argv)
    if check is not None:
        check(values)
    try:
        return config_class(**vars(values))
    except ValueError as e:
        parser.error(str(e))
