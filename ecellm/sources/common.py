"""What every source builder shares: reading raw files with errors that name the file and the column, the
notebooks' seeded shuffles and splits (pandas' and scikit-learn's, rebuilt on numpy), and the released layout of
records and settings.

The notebooks (ninglab/eCeLLM `data_processing/*.ipynb`, seed 1) shuffle with `DataFrame.sample(frac=1,
random_state=1)` and split with `train_test_split(..., random_state=1)`. Both draw one
`numpy.random.RandomState(1).permutation(n)`: `sample` keeps the permutation's order, `train_test_split` puts its
first `ceil(test_size * n)` positions in the test part and the rest, in order, in the training part.

Then each task's records get their instructions as the notebooks' diverse-instruction cell does: `random.seed(1)`,
one draw of the held-out (unseen) paraphrase, then one `random.sample(pool, k=1)` per record, file after file.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EcellmError
from ..prompts import derive_setting
from ..tasks import task_info

SEED = 1  # every notebook's seed
SPLIT_NAMES = {"train": "train", "validation": "val", "test": "test"}  # file name -> the records' `split`


class SourceError(EcellmError, ValueError):
    """Raw input that cannot be read: the message names the file and, where one is at fault, the column."""


@dataclass
class Built:
    """A source's records and what was left out on the way.

    Attributes:
        splits: "train", "validation", "test" -> records in the released layout.
        skipped: reason -> rows of the raw files left out for it.
    """

    splits: dict[str, list[dict]]
    skipped: Counter = field(default_factory=Counter)


# --- reading raw files ----------------------------------------------------------------------------------------
def need_file(path: Path) -> Path:
    """`path` if it is a file, else a `SourceError` naming it."""
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    return path


def text_encoding(path: Path, fallback: str) -> str:
    """"utf-8-sig" when the file's bytes are UTF-8 (a byte-order mark is then read, not kept), else `fallback`: a file
    that the source publishes in another encoding (Amazon-Google's latin-1) and a user re-saved as UTF-8 gives the
    same text rather than mojibake."""
    try:
        need_file(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return fallback
    return "utf-8-sig"


def read_csv(path: Path, columns: Sequence[str], encoding: str = "utf-8") -> list[dict[str, str]]:
    """The rows of a CSV file with a header line, as dicts of text; `columns` must all be in the header.

    Every row must have as many fields as the header and the file must not end inside a quoted field, so a file cut
    short, a stray delimiter or an unterminated quote is refused rather than read as other rows. A UTF-8 file's
    byte-order mark is read (utf-8-sig).

    Raises:
        SourceError naming the file (and the row and line): missing, not in `encoding`, a column missing (named),
        a row with another number of fields, unreadable CSV (a quote left open, a field over the csv module's
        131,072 characters), no rows.
    """
    need_file(path)
    encoding = "utf-8-sig" if encoding == "utf-8" else encoding
    try:
        with open(path, newline="", encoding=encoding) as f:
            reader = csv.reader(f, strict=True)
            try:
                header = next(reader, [])
                missing = [c for c in columns if c not in header]
                if missing:
                    raise SourceError(f"{path}: no column {missing[0]!r} (the header has {header})")
                rows = [row for row in reader if row]  # csv.reader gives [] for a blank line
                for number, row in enumerate(rows, 1):
                    if len(row) != len(header):
                        raise SourceError(f"{path} row {number}: {len(row)} fields where the header has "
                                          f"{len(header)} (a row cut short, a stray delimiter or quote?)")
            except csv.Error as e:
                raise SourceError(f"{path} line {reader.line_num}: not readable as CSV ({e}; a quote left "
                                  "open?)") from e
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not {encoding.removesuffix('-sig')} text ({e})") from e
    if not rows:
        raise SourceError(f"{path}: no rows")
    return [dict(zip(header, row)) for row in rows]


def expect_text(value, path: Path, where: str, key: str, empty: bool = True) -> str:
    """`value` if it is a string (non-empty unless `empty`), else a `SourceError` naming the file, the row or line
    (`where`) and the key or column."""
    if not isinstance(value, str) or (not empty and not value):
        raise SourceError(f"{path} {where}: {key!r} is {value!r}, expected {'' if empty else 'non-empty '}text")
    return value


def read_jsonl(path: Path, keys: Sequence[str], check: Callable[[dict, str], None] | None = None) -> list[dict]:
    """The objects of a JSON Lines file; each must have `keys` (a byte-order mark is read).

    Args:
        path: the file.
        keys: the keys every object must have.
        check: called as `check(row, "line N")` on each object; raises a `SourceError` for a value of a wrong type.
    Raises:
        SourceError naming the file and the line: missing file, not UTF-8, broken JSON, a missing key, no lines.
    """
    need_file(path)
    rows = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not utf-8 text ({e})") from e
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path} line {number}: not JSON ({e})") from e
        missing = [k for k in keys if not isinstance(row, dict) or k not in row]
        if missing:
            raise SourceError(f"{path} line {number}: no key {missing[0]!r}")
        if check is not None:
            check(row, f"line {number}")
        rows.append(row)
    if not rows:
        raise SourceError(f"{path}: no rows")
    return rows


# --- the notebooks' shuffles and splits -------------------------------------------------------------------------
def permutation(n: int, seed: int = SEED) -> list[int]:
    """`numpy.random.RandomState(seed).permutation(n)`: the order of `DataFrame.sample(frac=1, random_state=seed)`
    (and of `sample(n=k)`: its first k)."""
    return np.random.RandomState(seed).permutation(n).tolist()


def shuffled(items: Sequence, seed: int = SEED) -> list:
    """`items` in the order pandas' `sample(frac=1, random_state=seed)` puts a table's rows."""
    return [items[i] for i in permutation(len(items), seed)]


def split_off(items: Sequence, test_size: float, seed: int = SEED) -> tuple[list, list]:
    """(train, test) as scikit-learn's `train_test_split(items, test_size=test_size, random_state=seed)`."""
    order = permutation(len(items), seed)
    n_test = math.ceil(test_size * len(items))
    return [items[i] for i in order[n_test:]], [items[i] for i in order[:n_test]]


def split_80_10_10(items: Sequence, seed: int = SEED) -> tuple[list, list, list]:
    """(train, validation, test) as the notebooks split: 20% off for validation + test, then that halved."""
    train, rest = split_off(items, 0.2, seed)
    validation, test = split_off(rest, 0.5, seed)
    return train, validation, test


# --- records in the released layout -----------------------------------------------------------------------------
def example(input_text: str, output: str, options: str | None = None) -> dict:
    """One record's content before its instruction and setting are known."""
    return {"input": input_text, "options": options, "output": output}


def assemble(task: str, train: list[dict], validation: list[dict], test: list[dict],
             ood: list[dict] | None = None, *, raw: Path) -> dict[str, list[dict]]:
    """The released files of one task from its examples (`example`), with instructions and settings.

    Training, validation and IND test records take instructions from the task's diverse pool, drawn as the
    notebooks draw them (`random.seed(1)`, the unseen paraphrase drawn first, then one draw per record: train,
    validation, test, OOD test in turn). The test file holds IND_Diverse_Instruction, IND_Unseen_Instruction and
    IND_Diverse_Instruction_1-shot (test record i with training record i as its demonstration, as the notebooks pair
    them), and likewise OOD_* when `ood` is given (demonstrations from the IND training records).

    Args:
        task: task name or abbreviation.
        train, validation, test: examples of the in-domain splits; ood: examples of the held-out part, or None.
        raw: the raw folder they came from, for the error below.
    Raises:
        SourceError: a split without records (raw files too small, or filtered away), naming the folder.
    Returns:
        "train", "validation", "test" -> records (fields task, setting, split, instruction, input, options, output,
        few_shot_example).
    """
    info = task_info(task)
    parts = {"train": train, "validation": validation, "test": test, **({"OOD test": ood} if ood is not None else {})}
    empty = [name for name, part in parts.items() if not part]
    if empty:
        raise SourceError(f"{raw}: {info.abbr}'s {empty[0]} split comes out empty ({sum(map(len, parts.values()))} "
                          "examples in all): the raw files are too small, or all their rows were left out")
    rng = random.Random(SEED)
    rng.sample(range(len(info.instructions)), k=1)  # the notebook's draw of the unseen paraphrase (5 -> 1)

    def records(examples: list[dict], split: str, setting: str) -> list[dict]:
        return [{"task": info.name, "setting": setting, "split": split,
                 "instruction": rng.sample(info.instructions, k=1)[0], **e, "few_shot_example": None}
                for e in examples]

    splits = {"train": records(train, "train", "IND_Diverse_Instruction"),
              "validation": records(validation, "val", "IND_Diverse_Instruction")}
    tests = {"IND": records(test, "test", "IND_Diverse_Instruction")}
    if ood is not None:
        tests["OOD"] = records(ood, "test", "OOD_Diverse_Instruction")
    splits["test"] = []
    for domain, base in tests.items():
        splits["test"] += base
        splits["test"] += derive_setting(base, f"{domain}_Unseen_Instruction")
        splits["test"] += derive_setting(base, f"{domain}_Diverse_Instruction_1-shot", demos=splits["train"])
    return splits


def merge(*parts: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The files of several tasks built from one source, task after task."""
    return {name: [r for part in parts for r in part[name]] for name in SPLIT_NAMES}
