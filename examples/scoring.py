"""How the examples judge a tuned model: per task, the metric before and after tuning, a trivial baseline, the
standard error of the tuned score, and whether it is clearly above both (used by train_generalist.py and
train_real.py).

- baseline: the best constant answer over the test records (`yes` or `no`; one option letter) for yes/no and option
  tasks; the expected HR@1 of a uniform guess among each record's options for SR; the options in the given order for
  QPR; "not present" (value and source "None") for every target attribute for AVE; the most frequent training answer,
  given to every record, for AG. Each is scored with `ecellm.metrics.score` on the same records.
- clearly above: the tuned score exceeds both the untuned score and the baseline by more than 2 standard errors of
  the tuned score over the test records (std / sqrt(n) of per-record scores for a metric that is their mean, else
  the standard deviation over bootstrap resamples of the records), and by at least `MIN_GAIN` (0.05).
"""

from __future__ import annotations

import ast
import json
import random
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ecellm.eval import references
from ecellm.metrics import score
from ecellm.tasks import task_info

from common import by_task

MEAN_METRICS = ("hr@1", "accuracy", "ndcg", "f_bert")  # metrics that are a mean of per-record scores
BOOTSTRAP_RESAMPLES = 1000
OPTION_ANSWER_TOKENS = 4  # option tasks are scored on the answer's first letter
PAPER_ANSWER_TOKENS = 100  # the reference's max_new_tokens (inference.py)


# --- data ---------------------------------------------------------------------------------------------------------
def data_file(data: str | Path, stem: str) -> Path:
    """`<data>/<stem>.json` or `<data>/<stem>.jsonl`, whichever exists.

    Args:
        data: an ECInstruct directory.
        stem: "train", "validation" or "test".
    """
    found = next((p for p in (Path(data) / f"{stem}.json", Path(data) / f"{stem}.jsonl") if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"no {stem}.json or {stem}.jsonl in {data}")
    return found


def answer_budgets(train_records: Sequence[dict], tokenizer,
                   cap: int | None = PAPER_ANSWER_TOKENS) -> dict[str, int]:
    """Task abbreviation -> most new tokens to generate: the longest training answer + 2 (at most `cap`), or 4 for
    the option tasks (only the first letter is scored).

    Args:
        train_records: the training records of every task evaluated.
        tokenizer: the model's tokenizer.
        cap: the most for any task (default: the paper's 100); None for no cap, where answers are longer than the
            paper's (train_real.py's AVE stand-in lists all of a product's attributes in one answer).
    """
    budgets = {}
    for abbr, records in by_task(train_records).items():
        if task_info(abbr).answer == "option":
            budgets[abbr] = OPTION_ANSWER_TOKENS
        else:
            lengths = map(len, tokenizer.encode_batch([r["output"] for r in records], bos=False, eos=False))
            budgets[abbr] = max(lengths) + 2 if cap is None else min(max(lengths) + 2, cap)
    return budgets


# --- baselines ----------------------------------------------------------------------------------------------------
def uniform_guess(records: Sequence[dict]) -> float:
    """SR's chance: the expected HR@1 of a uniform guess among each record's options, each guess scored with
    `score` (for 20 options: 0.05).

    Args:
        records: SR test records; `options` is the serialized list of "<letter>: <item>" strings.
    """
    expected = []
    for r in records:
        letters = [option.split(":", 1)[0].strip() for option in ast.literal_eval(r["options"])]
        expected.append(statistics.fmean(score("SR", [x], [r["output"]])["hr@1"] for x in letters))
    return statistics.fmean(expected)


def _not_present(record: dict) -> str:
    """AVE's trivial answer: value and source "None" for every target attribute of the record."""
    try:
        targets = json.loads(record["input"]).get("target attributes", "")
    except (ValueError, AttributeError):
        targets = ""
    names = targets.split(",") if isinstance(targets, str) else targets
    return json.dumps([{"attribute": str(a).strip().lower(), "value": "None", "source": "None"}
                       for a in names if str(a).strip()])


def baseline_answers(task: str, records: Sequence[dict], train_outputs: Sequence[str]) -> dict[str, list[str]]:
    """The trivial answer lists a task's baseline is the best of, by name (see the module docstring).

    Args:
        task: any spelling of a task other than SR (see `uniform_guess`).
        records: the task's test records.
        train_outputs: the task's training answers (AG's constant answer is the most frequent).
    """
    info, n = task_info(task), len(records)
    if info.answer == "yes_no":
        return {f"always '{a}'": [a] * n for a in ("yes", "no")}
    if info.answer == "option":
        return {f"always {letter}": [letter] * n for letter in info.options}
    if info.answer == "ranking":
        return {"options in given order": [",".join(chr(ord("A") + i) for i in range(len(ref["labels"])))
                                           for ref in references(task, records)]}
    if info.answer == "triples":
        return {"'None' for every target attribute": [_not_present(r) for r in records]}
    if info.answer == "text":
        answer = Counter(train_outputs).most_common(1)[0][0]
        return {f"always {answer!r}": [answer] * n}
    raise ValueError(f"{info.abbr}: no constant baseline for answers of kind {info.answer!r}; see uniform_guess")


def baseline(task: str, records: Sequence[dict], train_outputs: Sequence[str], encoder=None) -> tuple[float, str]:
    """(score, name) of the task's baseline on `records`: the best of its trivial answer lists, scored with `score`.

    Args:
        task: any spelling of a task.
        records: the task's test records, of one setting.
        train_outputs: the task's training answers.
        encoder: AG's BERTScore encoder.
    """
    info = task_info(task)
    if info.answer == "letter":
        return uniform_guess(records), "uniform guess among the options"
    refs = references(task, records)
    scores = {name: score(task, answers, refs, setting=records[0]["setting"], encoder=encoder)[info.metric]
              for name, answers in baseline_answers(task, records, train_outputs).items()}
    best = max(scores, key=scores.get)
    return scores[best], best


# --- how sure: standard errors ------------------------------------------------------------------------------------
def standard_error(task: str, predictions: Sequence[str], records: Sequence[dict], encoder=None,
                   seed: int = 0) -> float | None:
    """The standard error of the task's metric over `records`: std / sqrt(n) of the per-record scores for a metric
    that is their mean (`MEAN_METRICS`), else the standard deviation over bootstrap resamples of the records.

    Args:
        task: any spelling of a task.
        predictions: the answers, aligned with `records`.
        records: the task's test records, of one setting.
        encoder: AG's BERTScore encoder.
        seed: the bootstrap's seed.
    Returns:
        the standard error, or None for fewer than 2 records.
    """
    n, metric, setting = len(records), task_info(task).metric, records[0]["setting"]
    if n < 2:
        return None
    refs = references(task, records)
    if metric in MEAN_METRICS:
        per_record = [score(task, [p], [r], setting=setting, encoder=encoder)[metric]
                      for p, r in zip(predictions, refs)]
        return statistics.stdev(per_record) / n ** 0.5
    rng = random.Random(seed)
    resampled = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        idx = [rng.randrange(n) for _ in range(n)]
        resampled.append(score(task, [predictions[i] for i in idx], [refs[i] for i in idx], setting=setting)[metric])
    return statistics.stdev(resampled)


MIN_GAIN = 0.05  # "clearly above" also needs this much over the untuned score and the baseline (issue 31)


def clearly_above(before: float, after: float, baseline_score: float, se: float | None) -> bool:
    """Whether the tuned score beats both the untuned score and the baseline by more than 2 standard errors and by
    at least `MIN_GAIN`.

    Args:
        before, after: the metric before and after tuning.
        baseline_score: the baseline's metric.
        se: the standard error of `after` (None: too few records to tell, never clearly above).
    """
    return se is not None and after - max(before, baseline_score) > max(2 * se, MIN_GAIN)


def compare(before: dict, after: dict, records: Sequence[dict], train_records: Sequence[dict], encoder) -> dict:
    """Per task: the metric, before and after, the baseline, the standard error and the verdict.

    Args:
        before, after: `common.evaluate_sets`'s results of one setting (task abbreviation -> scores), before and
            after tuning.
        records: that setting's test records.
        train_records: the training records (for AG's baseline answer).
        encoder: AG's BERTScore encoder (the same as the evaluations').
    """
    tests, trains = by_task(records), by_task(train_records)
    table = {}
    for abbr, group in tests.items():
        metric = task_info(abbr).metric
        outputs = [r["output"] for r in trains.get(abbr, [])]
        value, name = baseline(abbr, group, outputs, encoder)
        se = standard_error(abbr, after[abbr]["predictions"], group, encoder)
        table[abbr] = {
            "metric": metric, "before": _without_predictions(before[abbr]), "after": _without_predictions(after[abbr]),
            "baseline": value, "baseline_answer": name, "se": se,
            "clearly_above": clearly_above(before[abbr][metric], after[abbr][metric], value, se),
        }
    return table


def _without_predictions(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "predictions"}


# --- results ------------------------------------------------------------------------------------------------------
def task_table(table: dict) -> str:
    """One setting's Markdown table: task, metric, before, after (± its standard error), baseline, invalid shares,
    verdict, then the count of tasks clearly above.

    Args:
        table: `compare`'s result.
    """
    lines = ["| task | metric | before | after | baseline | invalid before/after | clearly above? |",
             "|---|---|---|---|---|---|---|"]
    for abbr, t in table.items():
        m = t["metric"]
        se = "" if t["se"] is None else f" ± {t['se']:.3f}"
        lines.append(f"| {abbr} | {m} | {t['before'][m]:.3f} | {t['after'][m]:.3f}{se} | {t['baseline']:.3f} | "
                     f"{t['before']['invalid']:.0%} / {t['after']['invalid']:.0%} | "
                     f"{'yes' if t['clearly_above'] else 'no'} |")
    improved = sum(t["clearly_above"] for t in table.values())
    return "\n".join(lines) + f"\n\nClearly above: {improved} of {len(table)} tasks.\n"


def generation_lines(stage: str, setting: str, results: dict, records: Sequence[dict]) -> list[str]:
    """`generations.jsonl` lines of one evaluation: stage, setting, task, prediction and reference of each record.

    Args:
        stage: "before" or "after".
        setting: the setting the records are scored in, e.g. "IND_Diverse_Instruction".
        results: `common.evaluate_sets`'s results on `records` (task abbreviation -> scores).
        records: the setting's test records.
    """
    lines = []
    for abbr, group in by_task(records).items():
        for p, r in zip(results[abbr]["predictions"], group):
            lines.append(json.dumps({"stage": stage, "setting": setting, "task": abbr, "prediction": p,
                                     "reference": r["output"]}, ensure_ascii=False))
    return lines
