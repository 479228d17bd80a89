"""Attribute Value Extraction (AVE) from OA-Mine's labelled product titles, in `data_processing/AVE.ipynb`'s layout.

    train.jsonl, test.jsonl    {"input": title, "category": ..., "target_scores": {attribute: {value: 1}}}

A stand-in for the paper's MAVE: one record per product, its input `json.dumps({"product title": title, "target
attributes": "A and B and ..."})` (OA-Mine has titles only), its output the JSON list of `{"attribute", "value",
"source"}`, all lower-cased, source "product title", in the product's attribute order (the notebook's order is a
Python set's). Every OA-Mine attribute has a value in the title, so no "None" values occur.

Held-out attributes (OOD), as the notebook's `holdout_attr`: the test set's attributes shuffled twice after
`random.seed(1)`, taken in turn until their test products number at least 200 (the notebook: 1,000 MAVE rows; this
source has 491 test titles). They are dropped from every in-domain record (a product left without a target
attribute is skipped) and the test products that have one form the OOD test, asking only for those. Validation is
10% of train.jsonl (`train_test_split(test_size=0.1, random_state=1)`), as OA-Mine has no validation split; each
split is then shuffled (`sample(frac=1, random_state=1)`) as the notebook does.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from .common import SEED, Built, SourceError, assemble, example, expect_text, read_jsonl, shuffled, split_off

FILES = ("train.jsonl", "test.jsonl")
PUBLISHED = ("github.com/wbsg-uni-mannheim/ExtractGPT, data/processed_datasets/oa-mine/ (Apache-2.0; OA-Mine's "
             "labelled Amazon titles)")
GET = ("mkdir -p raw/oa-mine && for f in train test; do curl -fsSLo raw/oa-mine/$f.jsonl https://raw.githubusercontent"
       ".com/wbsg-uni-mannheim/ExtractGPT/3f96461b28bd3f0c8ac7c479d595969a9b77d0ab/data/processed_datasets/oa-mine/"
       "$f.jsonl; done")
KEYS = ("input", "target_scores")
OOD_PRODUCTS = 200  # held-out attributes are added until their test products reach this many


def check_row(path: Path):
    """The `read_jsonl` check of one file: `input` non-empty text, `target_scores` {attribute: {value: score}}."""
    def check(row: dict, where: str) -> None:
        expect_text(row["input"], path, where, "input", empty=False)
        scores = row["target_scores"]
        if not (isinstance(scores, dict) and all(isinstance(a, str) and isinstance(values, dict)
                                                 for a, values in scores.items())):
            raise SourceError(f"{path} {where}: 'target_scores' is {str(scores)[:80]}, expected a dict of dicts "
                              "{attribute: {value: score}}")
    return check


def held_out_attributes(test: list[dict]) -> list[str]:
    """AVE.ipynb's `holdout_attr` on the test products: shuffle twice (seed 1), take until OOD_PRODUCTS is reached."""
    attributes = list(dict.fromkeys(a for row in test for a in row["target_scores"]))
    rng = random.Random(SEED)
    rng.shuffle(attributes)
    rng.shuffle(attributes)
    chosen, count = [], 0
    for attribute in attributes:
        if count >= OOD_PRODUCTS:
            break
        chosen.append(attribute)
        count += sum(attribute in row["target_scores"] for row in test)
    return chosen


def extraction(row: dict, attributes: list[str]) -> dict:
    """The `example` asking for `attributes` of one product."""
    text = json.dumps({"product title": row["input"], "target attributes": " and ".join(attributes)})
    triples = [{"attribute": a.lower(), "value": value.lower(), "source": "product title"}
               for a in attributes for value in row["target_scores"][a]]
    return example(text, json.dumps(triples))


def examples(rows: list[dict], keep, skipped: Counter) -> list[dict]:
    """One example per product asking for its attributes that `keep` accepts; products with none are skipped."""
    out = []
    for row in shuffled(rows):
        attributes = [a for a in row["target_scores"] if keep(a)]
        if attributes:
            out.append(extraction(row, attributes))
        else:
            skipped["no target attribute left"] += 1
    return out


def build(raw: Path) -> Built:
    """AVE's train / validation / test records (IND and OOD with held-out attributes) from OA-Mine's folder."""
    train_rows, test_rows = (read_jsonl(Path(raw) / name, KEYS, check_row(Path(raw) / name)) for name in FILES)
    held_out = set(held_out_attributes(test_rows))
    train_rows, validation_rows = split_off(train_rows, 0.1)
    skipped = Counter()
    in_domain = [examples(rows, lambda a: a not in held_out, skipped)
                 for rows in (train_rows, validation_rows, test_rows)]
    ood = [extraction(row, [a for a in row["target_scores"] if a in held_out])
           for row in shuffled(test_rows) if held_out & set(row["target_scores"])]
    return Built(assemble("AVE", *in_domain, ood, raw=Path(raw)), skipped)
