"""Answerability Prediction (AP) and Answer Generation (AG) from SubjQA, in `data_processing/AP_AG.ipynb`'s layout.

    electronics/train.csv, dev.csv, test.csv    question, review, human_ans_spans (ANSWERNOTFOUND: unanswerable)
    grocery/test.csv                            the held-out category (OOD)

A stand-in for the paper's AmazonQA: questions on real Amazon reviews with human answer spans. The input is
`json.dumps({"question": ..., "document": [review]})` (AmazonQA gave up to 10 review snippets; SubjQA gives one
review, with the SQuAD-style " ANSWERNOTFOUND" the source appends to every review taken off). SubjQA repeats a
question-review pair once per annotator: each pair is one record here, answerable ("yes") when an annotator marked an
answer, and AG's answer the first marked span. Files map to splits as SubjQA splits them: electronics' train, dev
and test for in-domain, grocery's test for OOD (the paper held out Cell_Phones_and_Accessories).

Order and caps as the notebook: AP keeps a file's order unless it holds more than 10,000 / 1,000 records
(`sample(n=size, random_state=1)`, which only the 1,000-record caps of grocery reach); AG shuffles
(`sample(frac=1, random_state=1)`) and keeps the first 10,000 / 1,000.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .common import Built, assemble, example, merge, read_csv, shuffled

FILES = ("electronics/train.csv", "electronics/dev.csv", "electronics/test.csv", "grocery/test.csv")
PUBLISHED = ("github.com/megagonlabs/SubjQA, SubjQA/{electronics,grocery}/splits/*.csv (no licence file; the reviews "
             "are the McAuley lab's Amazon reviews, for research use)")
GET = ("mkdir -p raw/subjqa/electronics raw/subjqa/grocery && for f in electronics/train electronics/dev "
       "electronics/test grocery/test; do curl -fsSLo raw/subjqa/$f.csv https://raw.githubusercontent.com/megagonlabs/"
       "SubjQA/6ea88c77802798b4a09a8218bd6bbde5b9cf4278/SubjQA/${f%/*}/splits/${f#*/}.csv; done")
COLUMNS = ("question", "review", "human_ans_spans")
NOT_FOUND = "ANSWERNOTFOUND"
SIZES = (10_000, 1_000, 1_000, 1_000)  # the notebook's caps, per file of FILES


def read_pairs(path: Path, skipped: Counter) -> list[tuple[str, str, str | None]]:
    """(question, review, first answer span or None) per distinct question-review pair, in file order."""
    pairs: dict[tuple[str, str], str | None] = {}
    for row in read_csv(path, COLUMNS):
        question, review = row["question"].strip(), row["review"].removesuffix(NOT_FOUND).strip()
        if not question or not review:
            skipped["no question or review"] += 1
            continue
        span = None if row["human_ans_spans"] == NOT_FOUND else row["human_ans_spans"]
        if (question, review) in pairs:
            skipped["another annotator of a question-review pair (merged)"] += 1
            pairs[question, review] = pairs[question, review] or span
        else:
            pairs[question, review] = span
    return [(q, r, span) for (q, r), span in pairs.items()]


def qa_input(question: str, review: str) -> str:
    return json.dumps({"question": question, "document": [review]})


def answerability(pairs: list[tuple], size: int) -> list[dict]:
    chosen = pairs if len(pairs) < size else shuffled(pairs)[:size]  # the notebook's sample(n=size), which fails below
    return [example(qa_input(q, r), "no" if span is None else "yes") for q, r, span in chosen]


def answers(pairs: list[tuple], size: int) -> list[dict]:
    return [example(qa_input(q, r), span) for q, r, span in shuffled(pairs) if span is not None][:size]


def build(raw: Path) -> Built:
    """AP's and AG's train / validation / test records (IND electronics, OOD grocery) from SubjQA's folder."""
    skipped = Counter()
    files = [read_pairs(Path(raw) / name, skipped) for name in FILES]
    ap = [answerability(pairs, size) for pairs, size in zip(files, SIZES)]
    ag = [answers(pairs, size) for pairs, size in zip(files, SIZES)]
    return Built(merge(assemble("AP", *ap, raw=Path(raw)), assemble("AG", *ag, raw=Path(raw))), skipped)
