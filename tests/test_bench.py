"""The benchmark scripts' own logic (the scripts themselves run long, on real data or real weights)."""

from __future__ import annotations

import ast
import random
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sr_two_options(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import sr_two_options

    return sr_two_options


def test_two_options_keep_the_target_and_one_other_candidate_of_the_record(sr_two_options):
    titles = [f"title {i}" for i in range(20)]
    record = {"task": "Sequential_Recommendation", "input": "['1st: x']", "output": "E",
              "options": str([f"{chr(65 + i)}: {t}" for i, t in enumerate(titles)])}
    rng = random.Random(0)
    answers = Counter()
    for _ in range(200):
        cut = sr_two_options.two_options(record, rng)
        options = dict(o.split(": ", 1) for o in ast.literal_eval(cut["options"]))
        assert list(options) == ["A", "B"] and options[cut["output"]] == "title 4"  # E, the target
        other = options["B" if cut["output"] == "A" else "A"]
        assert other in titles and other != "title 4"
        assert cut["input"] == record["input"] and record["output"] == "E"  # the record itself is left as it was
        answers[cut["output"]] += 1
    assert 70 < answers["A"] < 130  # the target's letter is A or B at random
