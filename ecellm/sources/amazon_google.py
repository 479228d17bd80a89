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
are read as latin-1 here, and a copy re-saved as UTF-8 is recognised as such (`text_encoding`), giving the same
text. Cells are typed as `pandas.read_csv` types them (`pandas_column`), because `str()` of a price shows it: an
all-integer column gives "0", a numeric column with a gap "0.0", missing values "nan".
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from .common import Built, SourceError, assemble, example, read_csv, shuffled, split_80_10_10, text_encoding

AMAZON, GOOGLE, MAPPING = "Amazon.csv", "GoogleProducts.csv", "Amzon_GoogleProducts_perfectMapping.csv"
FILES = (AMAZON, GOOGLE, MAPPING)
PUBLISHED = ("the Leipzig entity-resolution benchmarks, https://dbs.uni-leipzig.de/research/projects/"
             "benchmark-datasets-for-entity-resolution (Amazon-GoogleProducts.zip; CC-BY-4.0 as the reference "
             "repository lists it)")
GET = ("mkdir -p raw/amazon-google && curl -fsSLo ag.zip https://dbs.uni-leipzig.de/files/datasets/"
       "Amazon-GoogleProducts.zip && unzip -jo ag.zip -d raw/amazon-google")
PRODUCT_COLUMNS = ("description", "manufacturer", "price")
ENCODING = "latin-1"
# pandas.read_csv's default missing-value markers
NA_VALUES = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
             "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
INTEGER = re.compile(r"[+-]?\d+")
FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
TOKEN = re.compile(r"[a-z0-9]+")


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
    rows = read_csv(path, columns, text_encoding(path, ENCODING))
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


# --- hard negatives: look-alike products (`--negatives hard`) -----------------------------------------------------
def title_tokens(title) -> list[str]:
    """A title's lower-cased alphanumeric words (a missing title has none)."""
    return TOKEN.findall(title.lower()) if isinstance(title, str) else []


def tfidf(documents: list[list[str]], idf: dict[str, float]) -> list[dict[str, float]]:
    """Each token list as its L2-normalised TF-IDF vector, {token: weight}."""
    vectors = []
    for tokens in documents:
        weights = {t: n * idf[t] for t, n in Counter(tokens).items()}
        norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
        vectors.append({t: w / norm for t, w in weights.items()})
    return vectors


class TitleIndex:
    """Google products ranked by the TF-IDF cosine similarity of their name to an Amazon title (blocking, as
    entity-matching benchmarks build their candidate pairs): an inverted index from token to (rows, weights)."""

    def __init__(self, amazon: list[dict], google: list[dict]):
        amazon_tokens = [title_tokens(r["title"]) for r in amazon]
        google_tokens = [title_tokens(r["name"]) for r in google]
        frequency = Counter(t for tokens in amazon_tokens + google_tokens for t in set(tokens))
        n = len(amazon_tokens) + len(google_tokens)
        idf = {t: math.log(n / df) + 1.0 for t, df in frequency.items()}
        postings: dict[str, list[tuple[int, float]]] = {}
        for row, vector in enumerate(tfidf(google_tokens, idf)):
            for t, w in vector.items():
                postings.setdefault(t, []).append((row, w))
        self.postings = {t: (np.array([r for r, _ in p]), np.array([w for _, w in p])) for t, p in postings.items()}
        self.amazon_vectors, self.n_google = tfidf(amazon_tokens, idf), len(google)

    def ranked(self, amazon_row: int) -> np.ndarray:
        """Google row numbers, most similar title first (ties: file order); rows sharing no word are left out."""
        scores = np.zeros(self.n_google)  # (n_google,)
        for t, w in self.amazon_vectors[amazon_row].items():
            rows, weights = self.postings.get(t, (np.array([], dtype=int), np.array([])))
            scores[rows] += w * weights
        order = np.argsort(-scores, kind="stable")
        return order[scores[order] > 0]


def hard_negatives(positives: list[dict], amazon: list[dict], google: list[dict], mapping: list[dict],
                   known: set[str], skipped: Counter) -> list[dict]:
    """For each positive `example`, its Amazon product against the most similar Google product by title that is not
    one of its matches (`TitleIndex`) and not a pair already in `known` (inputs; updated), output "no"."""
    index = TitleIndex(amazon, google)
    row_of = {json.dumps(product(a, "title")): i for i, a in enumerate(amazon)}
    matches: dict[str, set[str]] = {}
    for m in mapping:
        matches.setdefault(m["idAmazon"], set()).add(m["idGoogleBase"])
    out = []
    for positive in positives:
        first = json.loads(positive["input"])["product 1"]
        row = row_of[json.dumps(first)]
        for g in index.ranked(row):
            if google[g]["id"] in matches.get(amazon[row]["id"], ()):
                continue
            text = pair_text(first, product(google[g], "name"))
            if text not in known:
                known.add(text)
                out.append(example(text, "no"))
                break
        else:
            skipped["matched product without a look-alike"] += 1
    return out


def build(raw: Path, negatives: str = "random") -> Built:
    """PM's train / validation / test records from the folder holding the three CSV files.

    Args:
        raw: the folder.
        negatives: "random": ECInstruct's records, exactly. "hard": the same, and each split's matched pairs also
            get a hard negative each (`hard_negatives`) in train and validation; the test file stays ECInstruct's,
            and "test_hard" holds the test matches with their hard negatives (1:1).
    """
    if negatives not in ("random", "hard"):
        raise SourceError(f"negatives {negatives!r}: expected 'random' or 'hard'")
    raw = Path(raw)
    amazon = read_table(raw / AMAZON, ("id", "title", *PRODUCT_COLUMNS))
    google = read_table(raw / GOOGLE, ("id", "name", *PRODUCT_COLUMNS))
    mapping = read_table(raw / MAPPING, ("idAmazon", "idGoogleBase"))
    skipped = Counter()
    examples = match_examples(amazon, google, mapping, skipped)
    train, validation, test = split_80_10_10(examples)
    if negatives == "random":
        return Built(assemble("PM", train, validation, test, raw=raw), skipped)
    known = {e["input"] for e in examples}

    def hard(part: list[dict]) -> list[dict]:
        return hard_negatives([e for e in part if e["output"] == "yes"], amazon, google, mapping, known, skipped)

    train, validation = train + hard(train), validation + hard(validation)
    test_matches = [e for e in test if e["output"] == "yes"]
    splits = assemble("PM", train, validation, test, raw=raw)
    splits["test_hard"] = assemble("PM", train, validation, test_matches + hard(test_matches), raw=raw)["test"]
    return Built(splits, skipped)
