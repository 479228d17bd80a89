"""Small file helpers shared by the modules that write checkpoints and read JSON files."""

from __future__ import annotations

import json
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


def write_json(path: str | Path, value: Any) -> None:
    """Write `value` to the file `path` as indented UTF-8 JSON with a final newline."""
    Path(path).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
