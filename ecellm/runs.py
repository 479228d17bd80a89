"""An output folder one job owns (a training run's or an evaluation's `--out`): when a job may start in it, what
`--overwrite` deletes, what `--resume` checks, and the fingerprints of the files a job reads.

    check_flags      --resume and --overwrite exclude each other; --resume needs an existing folder
    check_folder     a new job needs a folder holding no job of its kind; --overwrite deletes it (`clear`,
                     symbolic links removed, never their targets); --resume needs one to continue
    check_settings   a resume keeps every setting but RESUMABLE_CHANGES
    check_unchanged  a resume reads the same files (data, weights) as the job started on, by size and SHA-256,
                     unless a flag allows the change (then logged)

Every file written in the folder goes through `ecellm.files` (fresh temporary file, then renamed; symbolic links
refused) and the folder is locked for the job's life (`ecellm.lock.FolderLock`). No model code here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import EcellmError
from .files import refuse_link
from .lock import LOCK_NAME

# Settings a resumed job may change: where and how often it writes, how long ranks wait for each other, how long it
# may run (minutes, the loss it stops at), whether FSDP2 keeps gathered weights through the backward, and the flags
# that allow a change of inputs. Every other setting (one added later included) shapes the result and must keep its
# saved value.
RESUMABLE_CHANGES = frozenset({
    "out", "resume", "overwrite", "allow_data_change", "allow_model_change",
    "checkpoint_every", "keep_checkpoints", "eval_every", "dist_timeout_s", "minutes", "reshard_after_forward",
    "stop_at_loss",
})


class RunFolderError(EcellmError, RuntimeError):
    """An output folder that cannot be used as asked: it holds another job, has nothing to resume, or a resume would
    mix two jobs (other settings, changed data or weights)."""


@dataclass(frozen=True)
class FolderKind:
    """What one kind of job keeps in its folder.

    Args:
        job: the job in words ("training run", "evaluation").
        marker: the file recording the job's settings, written first (config.json, evaluation.json).
        files: the names the job writes; None: the whole folder is the job's (a lone `marker` is a start that
            failed before writing anything else, and is replaced).
    """

    job: str
    marker: str
    files: tuple[str, ...] | None = None

    @property
    def a_job(self) -> str:
        return ("an " if self.job[0] in "aeiou" else "a ") + self.job


def held(folder: Path, kind: FolderKind) -> list[str]:
    """The names in `folder` that belong to a job of `kind` (the lock aside), sorted."""
    if kind.files is not None:
        return sorted(name for name in kind.files if os.path.lexists(folder / name))
    return sorted(p.name for p in folder.iterdir() if p.name not in (kind.marker, LOCK_NAME))


def check_flags(folder: Path, kind: FolderKind, resume: bool, overwrite: bool) -> None:
    """Refuse --resume with --overwrite, and --resume of a folder that does not exist (checked before the folder's
    lock, which creates it)."""
    if resume and overwrite:
        raise RunFolderError(f"--resume continues the {kind.job} in --out and --overwrite deletes it: pass one of them")
    if resume and not folder.is_dir():
        raise RunFolderError(f"--resume: {folder} does not exist, so there is no {kind.job} to continue (a typo?); "
                             f"start a new {kind.job} without --resume")


def check_folder(folder: Path, kind: FolderKind, resume: bool, overwrite: bool) -> list[str]:
    """Refuse a folder that holds a job of `kind` unless `resume` (continue it) or `overwrite` (delete it), and a
    `resume` with nothing to continue (`check_flags` too). Nothing is written. Returns what `overwrite` is to delete
    (`clear`).

    Raises:
        RunFolderError: naming the folder, what it holds and the flags that would use it.
        ecellm.files.LinkRefused: a symbolic link where the job's settings file goes.
    """
    check_flags(folder, kind, resume, overwrite)
    refuse_link(folder / kind.marker)
    found = held(folder, kind) if folder.is_dir() else []
    if resume and not (found and (folder / kind.marker).is_file()):
        raise RunFolderError(f"--resume: {folder} holds no {kind.job} to continue (no {kind.marker}, or nothing beside "
                             f"it); start a new {kind.job} without --resume")
    if found and overwrite and kind.files is None and not (folder / kind.marker).is_file():
        raise RunFolderError(f"--overwrite: {folder} holds {found[:5]} but no {kind.marker} (no ecellm "
                             f"{kind.job}): not deleted")
    if found and not (resume or overwrite):
        raise RunFolderError(f"{folder} already holds {kind.a_job} ({', '.join(found[:5])}): pass --resume to continue "
                             "it, --overwrite to delete it and start over, or choose another --out")
    return found if overwrite else []


def clear(folder: Path, names: Iterable[str], log: Callable[[str], None]) -> None:
    """Delete `names` in `folder` (what `check_folder` returned for --overwrite). A symbolic link is removed, never
    what it points to, and `log` names it; links inside a deleted folder likewise."""
    for name in names:
        path = folder / name
        links = [path] if path.is_symlink() else [p for p in path.rglob("*") if p.is_symlink()] if path.is_dir() else []
        for link in links:
            log(f"--overwrite: removing the symbolic link {link} (its target {os.readlink(link)} is left as it is)")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def check_settings(saved_file: Path, saved: dict, settings: dict, kind: FolderKind) -> None:
    """Refuse to resume the job recorded in `saved_file` under other `settings`, naming each difference; a setting
    either side lacks counts as one. `RESUMABLE_CHANGES` may differ.

    Args:
        saved_file: where `saved` was read (for the message).
        saved, settings: the recorded and the new settings, by name.
        kind: the job's kind (for the message).
    """
    absent = "<absent>"
    changed = [f"{key}: {saved.get(key, absent)!r} -> {settings.get(key, absent)!r}"
               for key in sorted(set(saved) | set(settings))
               if key not in RESUMABLE_CHANGES and saved.get(key, absent) != settings.get(key, absent)]
    if changed:
        raise RunFolderError(
            f"--resume with settings other than {saved_file} records would mix two {kind.job}s; differing: "
            f"{'; '.join(changed)}. Resume with the saved values, or start a new {kind.job} (another --out, or "
            "--overwrite)"
        )


# --- fingerprints of the files a job reads -----------------------------------------------------------------------


def weight_files(*directories: str | Path | None) -> list[Path]:
    """The safetensors files of the given model or adapter directories (None skipped), sorted per directory."""
    return [file for d in directories if d for file in sorted(Path(d).glob("*.safetensors"))]


def fingerprint_files(files: Iterable[Path]) -> dict[str, dict]:
    """file -> {"bytes", "sha256"}: each file's size and the hash of its contents."""
    fingerprints = {}
    for file in files:
        with open(file, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        fingerprints[str(file)] = {"bytes": file.stat().st_size, "sha256": digest}
    return fingerprints


def _in_words(fingerprint: dict | None) -> str:
    if fingerprint is None:
        return "absent"
    records = f"{fingerprint['records']} records, " if "records" in fingerprint else ""
    return f"{records}{fingerprint['bytes']} bytes, sha256 {fingerprint['sha256'][:12]}"


def check_unchanged(what: str, saved: dict, now: dict, allow_flag: str, allowed: bool, kind: FolderKind,
                    log: Callable[[str], None]) -> list[str]:
    """On a resume, check that the files a job reads are the ones it started on; returns the changes in words.

    Args:
        what: the files in words ("the data", "the model's weights").
        saved, now: file -> fingerprint (`fingerprint_files`, or with "records" too) when the job started and now.
        allow_flag, allowed: the flag that allows a change ("--allow-data-change") and whether it was given; a change
            it allows is logged.
        kind: the job's kind (for the messages).
        log: writes one progress line.
    Raises:
        RunFolderError: a change not allowed, naming each file and what changed.
    """
    changes = [f"{file}: {_in_words(saved.get(file))} -> {_in_words(now.get(file))}"
               for file in sorted(set(saved) | set(now)) if saved.get(file) != now.get(file)]
    if changes and not allowed:
        raise RunFolderError(
            f"--resume: {what} changed since the {kind.job} started, so it would mix two: {'; '.join(changes)}. "
            f"Restore them, start a new {kind.job}, or pass {allow_flag} to continue on the new ones (logged)"
        )
    if changes:
        log(f"{allow_flag}: continuing on changed {what.removeprefix('the ')}: {'; '.join(changes)}")
    return changes
