"""Small file helpers shared by the modules that write checkpoints and read JSON files."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_dir_atomically(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Create the directory `final` all at once: `write(tmp)` fills a fresh temporary directory beside it, which is
    then renamed to `final`. A crash or an exception leaves no half-written `final` (the temporary directory is
    removed on an exception); an existing `final` is replaced, and stays in place until the new one is complete.

    Args:
        final: the directory to create or replace.
        write: fills the directory it is given.
    Returns:
        `final` as a Path.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0o700; a checkpoint directory is as readable as any other
        old = tmp.with_suffix(".old")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_json(path: str | Path, error: type[Exception] = ValueError) -> Any:
    """The JSON value in the file `path`, or `error` naming the file when it is not UTF-8 JSON.

    Args:
        path: the file.
        error: the exception class to raise for a file that does not parse (a `ValueError` subclass by default).
    Raises:
        FileNotFoundError: no such file.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from e


def strict_json(record: dict, indent: int | None = None) -> str:
    """`record` as strict JSON text: top-level NaN and infinities become null (JSON has no such numbers); nested ones
    are an error (`ValueError`)."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False, indent=indent)


def write_json(path: str | Path, value: Any, strict: bool = False) -> None:
    """Write `value` to the file `path` as indented UTF-8 JSON with a final newline.

    Args:
        path: the file.
        value: any JSON-ready value; with `strict`, a dict written by `strict_json` (non-finite numbers as null).
        strict: write strict JSON (see `strict_json`) rather than Python's NaN / Infinity extension.
    """
    text = strict_json(value, indent=2) if strict else json.dumps(value, indent=2)
    Path(path).write_text(text + "\n", encoding="utf-8")
