"""Raw public sources -> ECInstruct records, in the released layout (`train.json`, `validation.json`, `test.json`).

    from ecellm.sources import build, write
    splits = build("amazon-google", "../shared/realdata/amazon-google")  # {"train": [..], "validation": .., "test": ..}
    write("subjqa", "../shared/realdata/subjqa", "data/subjqa")  # or: ecellm data build subjqa --raw DIR --out DIR

One module a source, each following the reference repository's notebook for its task (ninglab/eCeLLM
`data_processing/*.ipynb`): PM exactly as ECInstruct built it; SA, AVE, AP and AG from public stand-ins for the
paper's sources, in ECInstruct's layout; SR from real Amazon purchase histories (the notebook's source family).
Every record has the fields task, setting, split, instruction, input, options, output and few_shot_example;
`ecellm.data.load_records`, `ecellm train` and `ecellm eval` read the files unchanged.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..lock import LOCK_NAME, FolderLock
from . import amazon_google, amazon_sequences, clothing_reviews, oa_mine, subjqa
from .common import Built, SourceError

__all__ = ["SOURCES", "Built", "SourceError", "build", "build_report", "check_out", "claimed_folder", "write",
           "write_files", "write_splits", "summary"]

# source name -> its builder module (`build(raw) -> Built`) and the tasks it yields
SOURCES = {
    "amazon-google": amazon_google,
    "amazon-sequences": amazon_sequences,
    "clothing-reviews": clothing_reviews,
    "oa-mine": oa_mine,
    "subjqa": subjqa,
}


def build_report(source: str, raw: str | Path | None = None, negatives: str = "random") -> Built:
    """The records of `source` and the rows left out, by reason.

    Args:
        source: a key of `SOURCES`.
        raw: the folder holding the source's files; None where the source can be fetched (clothing-reviews).
        negatives: amazon-google's non-matching pairs: "random" (ECInstruct's) or "hard" (see `amazon_google`).
    Raises:
        SourceError: unreadable raw input (naming the file and column), no folder for a source that needs one (naming
            where the files are published and how to get them), `negatives` for another source.
    """
    if source not in SOURCES:
        raise SourceError(f"unknown source {source!r}; expected one of {list(SOURCES)}")
    module = SOURCES[source]
    if raw is None:
        if not hasattr(module, "fetch"):
            raise SourceError(f"{source}: give the folder holding {', '.join(module.FILES)} (--raw); it cannot be "
                              f"fetched. Published at {module.PUBLISHED}; get them with: {module.GET}")
        raw = module.fetch()
    if source == "amazon-google":
        return module.build(Path(raw), negatives)
    if negatives != "random":
        raise SourceError(f"{source}: --negatives {negatives} applies to amazon-google only")
    return module.build(Path(raw))


def build(source: str, raw: str | Path | None = None, negatives: str = "random") -> dict[str, list[dict]]:
    """"train", "validation", "test" (and "test_hard" for hard negatives) -> the records of `source` (see
    `build_report`)."""
    return build_report(source, raw, negatives).splits


def check_out(out: str | Path) -> None:
    """A `SourceError` unless `out` is a new or empty folder (a lock file aside): built files never overwrite
    anything."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(p.name != LOCK_NAME for p in out.iterdir()))):
        raise SourceError(f"{out}: exists and is not an empty folder; choose a new --out")


@contextmanager
def claimed_folder(out: str | Path) -> Iterator[Path]:
    """`out`, a new or empty folder, held under its lock (`FolderLock`) while the block builds and writes into it.

    A second build into the same folder is refused (`FolderBusy`) while this one runs. When the block fails, the
    folder is removed only if this call created it and nothing else was put in it; a folder that was there before
    is left as it was.

    Raises:
        SourceError: `out` exists and is not an empty folder. FolderBusy: another build holds it.
    """
    out = Path(out)
    check_out(out)
    try:
        out.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    lock = FolderLock(out, "data build")
    try:
        lock.acquire(log=lambda message: print(message, file=sys.stderr))
    except BaseException:
        remove_if_empty(out, created)
        raise
    try:
        check_out(out)  # again, now that no other build can write here
        yield out
    except BaseException:
        lock.release()
        remove_if_empty(out, created)
        raise
    lock.release()


def remove_if_empty(folder: Path, created: bool) -> None:
    """Remove `folder` when this run created it and it is empty (`rmdir` never removes anything else)."""
    if created:
        try:
            folder.rmdir()
        except OSError:  # not empty: someone put a file there; it stays
            pass


def write_files(splits: dict[str, list[dict]], folder: Path) -> list[Path]:
    """Write each split as `<folder>/<name>.json`, never over an existing file: each is written to a temporary name
    created exclusively, then linked to its name (which fails if the name exists) and the temporary name removed.

    Raises:
        SourceError: a file of that name appeared in `folder` (named); the files written so far are removed.
    """
    written: list[Path] = []
    try:
        for name, records in splits.items():
            path, tmp = folder / f"{name}.json", folder / f".{name}.json.{os.getpid()}.tmp"
            with open(tmp, "x", encoding="utf-8") as f:
                f.write(json.dumps(records, indent=2) + "\n")
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise SourceError(f"{path}: appeared while this build ran; nothing written over it") from None
            finally:
                tmp.unlink()
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def write_splits(splits: dict[str, list[dict]], out: str | Path) -> list[Path]:
    """Write `splits` as `<out>/train.json`, `validation.json`, `test.json` (and `test_hard.json` where built) into
    the new or empty folder `out`, held under its lock (`claimed_folder`, `write_files`); returns the files.

    Raises:
        SourceError: `out` exists and is not an empty folder. FolderBusy: another build writes there.
    """
    with claimed_folder(out) as folder:
        return write_files(splits, folder)


def write(source: str, raw: str | Path | None, out: str | Path, negatives: str = "random") -> list[Path]:
    """Build `source` (see `build_report`) and write its files into the new folder `out`, holding the folder's lock
    from start to end; returns them."""
    with claimed_folder(out) as folder:
        return write_files(build(source, raw, negatives), folder)


def summary(built: Built) -> str:
    """Records per file and setting, then the rows left out with their reasons."""
    lines = []
    for name, records in built.splits.items():
        counts: dict[tuple[str, str], int] = {}
        for r in records:
            counts[r["task"], r["setting"]] = counts.get((r["task"], r["setting"]), 0) + 1
        lines.append(f"{name}.json: {len(records)} records")
        lines += [f"  {task} {setting}: {n}" for (task, setting), n in counts.items()]
    lines.append(f"skipped rows: {sum(built.skipped.values())}")
    lines += [f"  {reason}: {n}" for reason, n in sorted(built.skipped.items())]
    return "\n".join(lines)
