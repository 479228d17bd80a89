"""Product Matching (PM) from Amazon-Google Products, exactly as ECInstruct built it (`data_processing/PM.ipynb`).

    Amazon.csv                                 id, title, description, manufacturer, price
    GoogleProducts.csv                         id, name, description, manufacturer, price
    Amzon_GoogleProducts_perfectMapping.csv    idAmazon, idGoogleBase (the source's own spelling)

Positives: the perfect mapping joined to both tables, in the mapping's order; a pair already seen (either way round)
is skipped. Negatives, as many: the Amazon table shuffled, the Google table shuffled, Amazon row with index label i
against the Google row at position i, a known pair skipped. Products are `{title, description, manufacturer,
price}` (Google's `name` as title); a description over 50 words is cut to 50, dots stripped at both ends, "..."
appended; manufacturer and price go through `str()` as pandas typed them; a missing title or description stays NaN
(`json.dumps` writes `NaN` inside `input`). Then 80/10/10 with seed 1 and the diverse instructions.

The notebook opens the files without an encoding, which fails on these latin-1 files under a UTF-8 locale; they
are read as latin-1 here. Cells are typed as `pandas.read_csv` types them (`pandas_column`), because `str()` of
a price shows it: an all-integer column gives "0", a numeric column with a gap "0.0", missing values "nan".
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

from .common import Built, assemble, example, read_csv, shuffled, split_80_10_10

AMAZON, GOOGLE, MAPPING = "Amazon.csv", "GoogleProducts.csv", "Amzon_GoogleProducts_perfectMapping.csv"
FILES = (AMAZON, GOOGLE, MAPPING)
PRODUCT_COLUMNS = ("description", "manufacturer", "price")
ENCODING = "latin-1"
# pandas.read_csv's default missing-value markers
NA_VALUES = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
             "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
INTEGER = re.compile(r"[+-]?\d+")
FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def pandas_column(cells: list[str]) -> list:
    """A CSV column's cells typed as `pandas.read_csv` types them: all integers and none missing -> int; all
    numbers -> float (missing: NaN); else text (missing: NaN)."""
    present = [c for c in cells if c not in NA_VALUES]
    if present and len(present) == len(cells) and all(INTEGER.fullmatch(c) for c in present):
        return [int(c) for c in cells]
    if present and all(FLOAT.fullmatch(c) for c in present):
        return [math.nan if c in NA_VALUES else float(c) for c in cells]
    return [math.nan if c in NA_VALUES else c for c in cells]


def read_table(path: Path, columns: tuple[str, ...]) -> list[dict]:
    """The rows of one of the three CSV files, each cell typed as pandas types it."""
    rows = read_csv(path, columns, ENCODING)
    typed = {c: pandas_column([r[c] for r in rows]) for c in columns}
    return [{c: typed[c][i] for c in columns} for i in range(len(rows))]


def cut_description(text):
    """The notebook's `process_desc`: over 50 space-separated words -> the first 50, dots stripped, "..."."""
    words = str(text).split(" ")
    return " ".join(words[:50]).strip(".") + "..." if len(words) > 50 else text


def product(row: dict, title_column: str) -> dict:
    return {"title": row[title_column], "description": cut_description(row["description"]),
            "manufacturer": str(row["manufacturer"]), "price": str(row["price"])}


def pair_text(first: dict, second: dict) -> str:
    return json.dumps({"product 1": first, "product 2": second})


def match_examples(amazon: list[dict], google: list[dict], mapping: list[dict], skipped: Counter) -> list[dict]:
    """The notebook's positives then as many negatives, as `example` dicts, in the notebook's order."""
    seen: set[tuple[str, str]] = set()  # (product, product) pairs, both ways round, as their JSON text

    def add(a: dict, g: dict) -> bool:
        key = (json.dumps(a), json.dumps(g))
        if key in seen or key[::-1] in seen:
            return False
        seen.update((key, key[::-1]))
        return True

    amazon_by_id, google_by_id = {}, {}
    for row in amazon:
        amazon_by_id.setdefault(row["id"], []).append(row)
    for row in google:
        google_by_id.setdefault(row["id"], []).append(row)
    positives = []
    for m in mapping:  # the inner joins keep the mapping's order
        for a in amazon_by_id.get(m["idAmazon"], []):
            for g in google_by_id.get(m["idGoogleBase"], []):
                first, second = product(a, "title"), product(g, "name")
                if add(first, second):
                    positives.append(example(pair_text(first, second), "yes"))
                else:
                    skipped["duplicate matching pair"] += 1
    negatives = []
    google_shuffled = shuffled(google)
    for index in shuffled(range(len(amazon))):  # Amazon rows by index label, Google rows by position
        if len(negatives) == len(positives):
            break
        first, second = product(amazon[index], "title"), product(google_shuffled[index], "name")
        if add(first, second):
            negatives.append(example(pair_text(first, second), "no"))
        else:
            skipped["random pair already known"] += 1
    return positives + negatives


def build(raw: Path) -> Built:
    """PM's train / validation / test records from the folder holding the three CSV files."""
    raw = Path(raw)
    amazon = read_table(raw / AMAZON, ("id", "title", *PRODUCT_COLUMNS))
    google = read_table(raw / GOOGLE, ("id", "name", *PRODUCT_COLUMNS))
    mapping = read_table(raw / MAPPING, ("idAmazon", "idGoogleBase"))
    skipped = Counter()
    train, validation, test = split_80_10_10(match_examples(amazon, google, mapping, skipped))
    return Built(assemble("PM", train, validation, test, raw=raw), skipped)
