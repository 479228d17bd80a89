"""Raw public sources -> ECInstruct records, in the released layout (`train.json`, `validation.json`, `test.json`).

    from ecellm.sources import build, write
    splits = build("amazon-google", "../shared/realdata/amazon-google")  # {"train": [..], "validation": .., "test": ..}
    write("subjqa", "../shared/realdata/subjqa", "data/subjqa")  # or: ecellm data build subjqa --raw DIR --out DIR

One module a source, each following the reference repository's notebook for its task (ninglab/eCeLLM
`data_processing/*.ipynb`): PM exactly as ECInstruct built it; SA, AVE, AP and AG from public stand-ins for the
paper's sources, in ECInstruct's layout; SR from real Amazon purchase histories (the notebook's source family). Every record has the fields task, setting, split, instruction, input,
options, output and few_shot_example; `ecellm.data.load_records`, `ecellm train` and `ecellm eval` read the files
unchanged.
"""

from __future__ import annotations

from pathlib import Path

from ..files import write_dir_atomically, write_json
from . import amazon_google, amazon_sequences, clothing_reviews, oa_mine, subjqa
from .common import SPLIT_NAMES, Built, SourceError

__all__ = ["SOURCES", "Built", "SourceError", "build", "build_report", "check_out", "write", "write_splits",
           "summary"]

# source name -> its builder module (`build(raw) -> Built`) and the tasks it yields
SOURCES = {
    "amazon-google": amazon_google,
    "amazon-sequences": amazon_sequences,
    "clothing-reviews": clothing_reviews,
    "oa-mine": oa_mine,
    "subjqa": subjqa,
}


def build_report(source: str, raw: str | Path | None = None) -> Built:
    """The records of `source` and the rows left out, by reason.

    Args:
        source: a key of `SOURCES`.
        raw: the folder holding the source's files; None where the source can be fetched (clothing-reviews).
    Raises:
        SourceError: unreadable raw input (naming the file and column), or no folder for a source that needs one.
    """
    if source not in SOURCES:
        raise SourceError(f"unknown source {source!r}; expected one of {list(SOURCES)}")
    module = SOURCES[source]
    if raw is None:
        if not hasattr(module, "fetch"):
            raise SourceError(f"{source}: give the folder holding {module.FILES} (--raw); it cannot be fetched")
        raw = module.fetch()
    return module.build(Path(raw))


def build(source: str, raw: str | Path | None = None) -> dict[str, list[dict]]:
    """"train", "validation", "test" -> the records of `source` (see `build_report`)."""
    return build_report(source, raw).splits


def check_out(out: str | Path) -> None:
    """A `SourceError` unless `out` is a new or empty folder (built files never overwrite anything)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SourceError(f"{out}: exists and is not an empty folder; choose a new --out")


def write_splits(splits: dict[str, list[dict]], out: str | Path) -> list[Path]:
    """Write `splits` as `<out>/train.json`, `validation.json`, `test.json`, all at once (`write_dir_atomically`).

    Raises:
        SourceError: `out` exists and is not an empty folder.
    """
    check_out(out)
    out = Path(out)

    def fill(folder: Path) -> None:
        for name in SPLIT_NAMES:
            write_json(folder / f"{name}.json", splits[name])

    write_dir_atomically(out, fill)
    return [out / f"{name}.json" for name in SPLIT_NAMES]


def write(source: str, raw: str | Path | None, out: str | Path) -> list[Path]:
    """Build `source` (see `build_report`) and write its three files into the new folder `out`; returns them."""
    check_out(out)
    return write_splits(build(source, raw), out)


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
