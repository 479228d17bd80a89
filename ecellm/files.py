"""Small file helpers: JSON read and written with errors naming the file, and the one way ecellm writes a file or a
folder it owns: fresh, under a temporary name, then renamed into place.

A rename replaces a directory entry, never what a symbolic link there points to; still, a symbolic link where ecellm
expects its own file is refused (`LinkRefused`, naming it), so a folder cannot be turned into a way to overwrite
another file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import EcellmError


class LinkRefused(EcellmError, RuntimeError):
    """A symbolic link where ecellm writes a file or a folder of its own."""


def refuse_link(path: str | Path) -> Path:
    """`path` as a Path, or `LinkRefused` naming it when it is a symbolic link (a dangling one included)."""
    path = Path(path)
    if path.is_symlink():
        raise LinkRefused(f"{path} is a symbolic link (to {os.readlink(path)}) where ecellm writes its own file: "
                          "refused; remove the link or choose another folder")
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to a fresh temporary file beside `path`, then rename it to `path`: a reader sees the old
    file or the new one, never half of one, and an existing `path` is replaced, not written through.

    Args:
        path: the file to create or replace; a symbolic link there is refused (`LinkRefused`).
        text: its new content.
    Returns:
        `path` as a Path.
    """
    path = refuse_link(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0o600; ecellm's files are as readable as any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_dir_atomically(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Create the directory `final` all at once: `write(tmp)` fills a fresh temporary directory beside it, which is
    then renamed to `final`. A crash or an exception leaves no half-written `final` (the temporary directory is
    removed on an exception); an existing `final` is replaced, and stays in place until the new one is complete.

    Args:
        final: the directory to create or replace; a symbolic link there is refused (`LinkRefused`).
        write: fills the directory it is given.
    Returns:
        `final` as a Path.
    """
    final = refuse_link(final)
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
    """Write `value` to the file `path` as indented UTF-8 JSON with a final newline, atomically
    (`write_text_atomically`).

    Args:
        path: the file.
        value: any JSON-ready value; with `strict`, a dict written by `strict_json` (non-finite numbers as null).
        strict: write strict JSON (see `strict_json`) rather than Python's NaN / Infinity extension.
    """
    text = strict_json(value, indent=2) if strict else json.dumps(value, indent=2)
    write_text_atomically(path, text + "\n")


def open_to_append(path: str | Path):
    """`path` opened to append UTF-8 text (created if absent), refusing a symbolic link there (`LinkRefused`)."""
    path = refuse_link(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if Path(path).is_symlink():  # made between the check and the open
            refuse_link(path)
        raise e
    return os.fdopen(fd, "a", encoding="utf-8")
