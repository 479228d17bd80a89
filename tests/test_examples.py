"""examples/train_sr.py and examples/train_generalist.py on a tiny model: results land in the run folder only, in the
documented layout; the generalist's baselines and standard errors by hand."""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ecellm.synthetic import write_dataset
from ecellm.tasks import TASKS

from .tiny_checkpoint import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def repository_files() -> dict[str, float]:
    """Every file under the repository (outside .git) with its modification time."""
    return {str(p): p.stat().st_mtime for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts
            and "__pycache__" not in p.parts and ".pytest_cache" not in p.parts}


def test_train_sr_writes_results_to_the_run_folder_only(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "model")
    write_dataset(tmp_path / "data", n_per_task=40, n_eval_per_task=6, tasks=["SR"])
    runs = tmp_path / "runs"
    before = repository_files()
    cmd = [sys.executable, "examples/train_sr.py", "--model", str(model), "--data", str(tmp_path / "data"),
           "--n-test", "6", "--max-steps", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "ECELLM_RUNS": str(runs)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert repository_files() == before, "the example wrote into the repository"

    (out,) = runs.glob("train_sr-*")  # the default run folder: a new one under $ECELLM_RUNS
    results = json.loads((out / "results.json").read_text())
    sr = results["tasks"]["SR"]
    assert sr["metric"] == "hr@1" and sr["baseline"] == pytest.approx(0.05)
    assert sr["before"]["n"] == sr["after"]["n"] == 6
    assert 0.0 <= sr["after"]["invalid"] <= 1.0 and results["minutes"] > 0 and results["steps"] == 1
    markdown = (out / "results.md").read_text()
    assert "| before tuning |" in markdown and "examples/train_sr.py" in markdown


def test_train_sr_curriculum_phases_chain_adapters(tmp_path):
    """Synthetic phases: each phase trains from the previous phase's adapter on records with its number of options;
    the test records keep 20 options; --score-phases adds a row per phase."""
    model = make_tiny_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    cmd = [sys.executable, "examples/train_sr.py", "--model", str(model), "--out", str(out),
           "--phases", "2:16,4:8:5e-4", "--n-test", "4", "--max-steps", "1", "--score-phases", "--minutes", "30",
           "--pack", "1024"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert [(r["phase"], r["options"], r["steps"]) for r in results["curve"]] == [(0, None, 0), (1, 2, 1), (2, 4, 2)]
    assert json.loads((out / "run" / "phase1" / "config.json").read_text())["pack_tokens"] == 1024
    assert results["phases"] == [{"options": 2, "records": 16, "lr": 1e-4, "steps": 1, "planned": 1, "ended": None},
                                 {"options": 4, "records": 8, "lr": 5e-4, "steps": 1, "planned": 1, "ended": None}]
    assert "2: 16 @ 0.0001 (1 of 1 steps)" in (out / "results.md").read_text()
    phase2 = json.loads((out / "run" / "phase2" / "config.json").read_text())
    assert phase2["init_adapter"] == str(out / "run" / "phase1" / "adapter") and phase2["minutes"] > 0
    assert phase2["lr"] == 5e-4
    train2 = json.loads((out / "data" / "phase2" / "train.json").read_text())
    assert {len(ast.literal_eval(r["options"])) for r in train2} == {4}
    test = json.loads((out / "data" / "test" / "test.json").read_text())
    assert len(test) == 4 and {len(ast.literal_eval(r["options"])) for r in test} == {20}
    assert "| after phase |" in (out / "results.md").read_text()
    # --minutes is the whole job's budget: training got what setup and the three evaluations (two after it) left
    timings = results["timings_s"]
    assert set(timings) == {"setup", "training", "evaluation"} and results["training_cap_minutes"] < 30
    assert results["minutes"] * 60 >= sum(timings.values()) * 0.99 and "(setup " in (out / "results.md").read_text()


def test_train_generalist_writes_results_to_the_run_folder_only(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "model", tasks=[t.abbr for t in TASKS], vocab_size=2048)  # short prompts
    runs = tmp_path / "runs"
    before = repository_files()
    cmd = [sys.executable, "examples/train_generalist.py", "--model", str(model), "--n-train", "1", "--n-test", "2",
           "--max-steps", "2", "--global-batch", "4", "--minutes", "1e-6",  # the time limit ends training after step 1
           "--sr-phases", "none", "--focus-phase", "none", "--bertscore-model", "model"]  # no fetch in a fast test
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "ECELLM_RUNS": str(runs)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert repository_files() == before, "the example wrote into the repository"

    (out,) = runs.glob("train_generalist-*")
    assert {p.name for p in (out / "data").iterdir()} == {"train.json", "validation.json", "test.json"}
    assert (out / "run" / "summary.json").is_file() and (out / "run" / "adapter").is_dir()
    results = json.loads((out / "results.json").read_text())
    abbrs = [t.abbr for t in TASKS]
    assert results["minutes"] > 0 and results["steps"] == 1 and results["sr_phases"] == []
    assert results["focus_phase"] is None
    assert results["stopped"] == "the 1e-06-minute time limit, at step 1 of 2 of phase 1"
    assert json.loads((out / "run" / "config.json").read_text())["minutes"] == 1e-6
    for key in ("tasks", "unseen_instruction"):
        assert list(results[key]) == abbrs
        for abbr, row in results[key].items():
            info = next(t for t in TASKS if t.abbr == abbr)
            assert row["metric"] == info.metric and row["before"]["n"] == row["after"]["n"] == 2
            assert row["before"][row["metric"]] is not None and 0.0 <= row["after"]["invalid"] <= 1.0
            assert isinstance(row["clearly_above"], bool) and row["se"] >= 0 and row["baseline_answer"]
        assert results[key]["SR"]["baseline"] == pytest.approx(0.05)
        assert results["improved"][key] == sum(r["clearly_above"] for r in results[key].values())
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 2 * 2 * 10 * 2
    assert {(g["stage"], g["setting"]) for g in generations} == {
        (stage, setting) for stage in ("before", "after")
        for setting in ("IND_Diverse_Instruction", "IND_Unseen_Instruction")}
    markdown = (out / "results.md").read_text()
    assert markdown.count("| task | metric | before | after | baseline |") == 2
    assert "examples/train_generalist.py" in markdown and "Clearly above:" in markdown
    assert "training ended early: the 1e-06-minute time limit, at step 1 of 2 of phase 1" in markdown


def test_train_generalist_tasks_flag_tunes_and_scores_only_those(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "model", tasks=["SA", "AP"], vocab_size=2048)
    out = tmp_path / "out"
    cmd = [sys.executable, "examples/train_generalist.py", "--model", str(model), "--out", str(out), "--tasks", "SA,AP",
           "--n-train", "2", "--n-test", "2", "--max-steps", "1", "--global-batch", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results["tasks"]) == list(results["unseen_instruction"]) == ["SA", "AP"]
    assert results["n_train"] == 4
    train_records = json.loads((out / "data" / "train.json").read_text())
    assert {r["task"] for r in train_records} == {"Sentiment_Analysis", "Answerability_Prediction"}
    assert "training records, tasks SA, AP)" in (out / "results.md").read_text()


def test_train_generalist_warms_up_on_sr_phases_then_tunes_the_mix_from_their_adapter(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "model", tasks=["SR", "AP"], vocab_size=2048)
    out = tmp_path / "out"
    cmd = [sys.executable, "examples/train_generalist.py", "--model", str(model), "--out", str(out), "--tasks", "SR,AP",
           "--n-train", "2", "--n-test", "2", "--max-steps", "1", "--global-batch", "4", "--sr-phases", "2:4,4:4:5e-4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["sr_phases"] == [{"options": 2, "records": 4, "lr": 1e-4}, {"options": 4, "records": 4, "lr": 5e-4}]
    assert results["steps"] == 3 and results["adapter"] == str(out / "run" / "mix" / "adapter")
    for i, options in ((1, 2), (2, 4)):
        records = json.loads((out / "data" / f"sr_phase{i}" / "train.json").read_text())
        assert {r["task"] for r in records} == {"Sequential_Recommendation"}
        assert {len(ast.literal_eval(r["options"])) for r in records} == {options}
    test_items = {item for r in json.loads((out / "data" / "test.json").read_text()) if r["task"].startswith("Seq")
                  for item in ast.literal_eval(r["options"])}
    warmup_items = {item for i in (1, 2) for r in json.loads((out / "data" / f"sr_phase{i}" / "train.json").read_text())
                    for item in ast.literal_eval(r["options"])}
    assert not {x.split(": ", 1)[1] for x in test_items} & {x.split(": ", 1)[1] for x in warmup_items}
    configs = [json.loads((out / "run" / name / "config.json").read_text()) for name in ("sr_phase2", "mix")]
    assert configs[0]["init_adapter"] == str(out / "run" / "sr_phase1" / "adapter") and configs[0]["lr"] == 5e-4
    assert configs[1]["init_adapter"] == str(out / "run" / "sr_phase2" / "adapter") and configs[1]["lr"] == 1e-4
    assert "4 SR records with 2 options, then 4 SR records with 4 options, then 4 training records" in (
        (out / "results.md").read_text())
    proc = subprocess.run(cmd[:-2] + ["--data", str(out / "data"), "--sr-phases", "2:4"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--sr-phases needs the synthetic data" in proc.stderr


def test_train_generalist_focus_phase_trains_its_tasks_alone_before_the_mix(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "model", tasks=["PM", "MPC", "AP"], vocab_size=2048)
    out = tmp_path / "out"
    cmd = [sys.executable, "examples/train_generalist.py", "--model", str(model), "--out", str(out), "--tasks",
           "PM,MPC,AP", "--n-train", "2", "--n-test", "2", "--max-steps", "1", "--global-batch", "4",
           "--focus-phase", "PM+MPC:4:5e-4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["sr_phases"] == []  # SR is not among the tasks: no warm-up
    assert results["focus_phase"] == {"tasks": ["PM", "MPC"], "records": 4, "lr": 5e-4}
    assert results["steps"] == 2 and results["adapter"] == str(out / "run" / "mix" / "adapter")
    phase_records = json.loads((out / "data" / "focus" / "train.json").read_text())
    assert Counter(r["task"] for r in phase_records) == {"Product_Matching": 4, "Multiclass_Product_Classification": 4}
    mix_records = json.loads((out / "data" / "train.json").read_text())
    assert not {r["input"] for r in phase_records} & {r["input"] for r in mix_records}  # drawn with another seed

    def brands(records):  # PM's manufacturers: names the generator holds out of training
        return {json.loads(r["input"])[side]["manufacturer"] for r in records if r["task"] == "Product_Matching"
                for side in ("product 1", "product 2")}

    test_brands = brands(json.loads((out / "data" / "test.json").read_text()))
    assert test_brands and brands(phase_records) and not brands(phase_records) & test_brands
    configs = [json.loads((out / "run" / name / "config.json").read_text()) for name in ("focus", "mix")]
    assert configs[0]["init_adapter"] == "" and configs[0]["lr"] == 5e-4
    assert configs[1]["init_adapter"] == str(out / "run" / "focus" / "adapter") and configs[1]["lr"] == 1e-4
    assert "4 records each of PM, MPC at lr 0.0005, then 6 training records" in (out / "results.md").read_text()
    for value, message in (("PM:0", "is not TASKS:RECORDS"), ("PM:4:x", "is not TASKS:RECORDS"),
                           ("XX:4", "is not TASKS:RECORDS"), ("PSI:4", "PSI not among --tasks")):
        proc = subprocess.run(cmd[:-1] + [value], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    proc = subprocess.run(cmd + ["--data", str(out / "data")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--focus-phase needs the synthetic data" in proc.stderr


@pytest.fixture
def generalist(monkeypatch):
    """examples/train_generalist.py as a module (it imports examples/common.py as `common`)."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    return importlib.import_module("train_generalist")


@pytest.fixture
def scoring(monkeypatch):
    """examples/scoring.py as a module (baselines, standard errors, the verdict)."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    return importlib.import_module("scoring")


def test_training_minutes_leaves_room_for_the_evaluations_after(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    phases = importlib.import_module("phases")
    now = 1000.0
    monkeypatch.setattr(phases.time, "perf_counter", lambda: now)
    # 15 minutes in all, 2 spent, one more evaluation of 60 s (x slack) and 45 s of tail
    expected = (15 * 60 - 120 - 60 * phases.EVALUATION_SLACK - 45) / 60
    assert phases.training_minutes(15, now - 120, 60.0, 1, 45.0) == pytest.approx(expected)
    assert phases.training_minutes(0, now - 120, 60.0, 1, 45.0) == 0.0  # no budget: no cap
    with pytest.raises(SystemExit, match="leaves no time for training: 2.0 minutes went to setup"):
        phases.training_minutes(3, now - 120, 60.0, 1, 45.0)
    # a job whose evaluation after tuning is cheaper than the one before (train_real.py) reserves less for it
    assert phases.training_minutes(15, now - 120, 60.0, 1, 45.0, slack=1.15) == pytest.approx(
        (900 - 120 - 69 - 45) / 60)


def test_examples_evaluate_with_ecellm_eval_filed_by_set_and_task(tmp_path, monkeypatch):
    """The examples' evaluation is `ecellm.eval.evaluate` (one call for every test set, the budgets per task): its
    scores and answers, filed by results.json key and task, with the share of invalid answers."""
    from ecellm.eval import evaluate, select_records
    from ecellm.synthetic import generate_records
    from ecellm.tasks import task_abbr

    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    common = importlib.import_module("common")
    model_dir = make_tiny_checkpoint(tmp_path / "model", tasks=["SR", "PM"])
    model, tokenizer = common.load_model(model_dir)
    records = generate_records("SR", 3, "test", seed=1) + generate_records("PM", 4, "test", seed=1)
    tests = {"tasks": records, "unseen": select_records(records, ["IND_Unseen_Instruction"])}
    budgets = {"SR": 4, "PM": 3}
    filed = common.evaluate_sets(model, tokenizer, tests, "alpaca", budgets, batch_size=3)
    whole = evaluate(model, tokenizer, tests["tasks"] + tests["unseen"], batch_size=3, max_new_tokens=budgets,
                     progress=False)
    assert list(filed) == ["tasks", "unseen"] and all(list(filed[key]) == ["SR", "PM"] for key in filed)
    for row in whole["results"]:
        key = "tasks" if row["setting"] == "IND_Diverse_Instruction" else "unseen"
        result = filed[key][row["task"]]
        assert {k: result[k] for k in row} == row and result["invalid"] == row["n_failed"] / row["n"]
        assert result["predictions"] == [g["prediction"] for g in whole["generations"]
                                         if (task_abbr(g["task"]), g["setting"]) == (row["task"], row["setting"])]
    with pytest.raises(ValueError, match="two test sets share a setting"):
        common.evaluate_sets(model, tokenizer, {"a": records, "b": records}, "alpaca", budgets)


def test_train_sr_budgets_only_the_default_demo(monkeypatch):
    import argparse

    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    train_sr = importlib.import_module("train_sr")
    def args(**kw):
        return argparse.Namespace(**{"minutes": None, "phases": train_sr.DEFAULT_PHASES, "model": "", "data": "",
                                     **kw})

    assert train_sr.job_minutes(args()) == train_sr.DEFAULT_MINUTES
    assert train_sr.job_minutes(args(minutes=0.0)) == 0.0 and train_sr.job_minutes(args(minutes=7.0)) == 7.0
    assert train_sr.job_minutes(args(phases="2:480,4:240,8:240,20:240")) == 0.0
    assert train_sr.job_minutes(args(model="/my/model")) == 0.0 and train_sr.job_minutes(args(data="/ec")) == 0.0


def _record(task, output, setting="IND_Diverse_Instruction", **fields):
    return {"task": task, "output": output, "setting": setting, "instruction": "", "input": "", "options": None,
            **fields}


def test_answer_budgets_fit_the_longest_training_answer_capped_at_the_papers_100(scoring):
    class Words:  # one token a word
        @staticmethod
        def encode_batch(texts, bos, eos):
            return [t.split() for t in texts]

    records = [_record("AVE", " ".join(["w"] * 150)), _record("AVE", "w w"), _record("AG", "a short answer"),
               _record("SA", "B")]
    assert scoring.answer_budgets(records, Words) == {"AVE": 100, "AG": 5, "SA": scoring.OPTION_ANSWER_TOKENS}
    assert scoring.answer_budgets(records, Words, cap=None)["AVE"] == 152  # answers longer than the paper's


def test_baselines_by_hand(scoring):
    pm = [_record("Product_Matching", x) for x in ("yes", "yes", "yes", "no")]
    assert scoring.baseline("PM", pm, []) == (pytest.approx(6 / 7), "always 'yes'")  # P 3/4, R 1
    mpc = [_record("Multiclass_Product_Classification", x) for x in ("A: exact", "A: exact", "B: sub", "D: irr")]
    assert scoring.baseline("MPC", mpc, []) == (0.5, "always A")
    options = [str([f"{c}: item" for c in letters]) for letters in ("ABCDEFGHIJKLMNOPQRST", "ABCD")]
    sr = [_record("Sequential_Recommendation", "C", options=o) for o in options]
    assert scoring.baseline("SR", sr, [])[0] == pytest.approx((1 / 20 + 1 / 4) / 2)
    qpr = [_record("Query_Product_Rank", "B,A", esci_labels=["I", "E"])]  # "A,B": the E item second
    assert scoring.baseline("QPR", qpr, []) == (pytest.approx(1 / torch.log2(torch.tensor(3.0)).item()),
                                                   "options in given order")
    ave = [_record("Attribute_Value_Extraction", json.dumps([{"attribute": a, "value": v, "source": s}]),
                   input=json.dumps({"target attributes": a.title()}))
           for a, v, s in (("color", "red", "product title"), ("size", "None", "None"))]
    assert scoring.baseline("AVE", ave, [])[0] == pytest.approx(0.5)  # one hit of 2 predicted, 2 gold

    vocabulary = {}

    def words(texts):  # one-hot word embeddings: BERTScore counts shared words
        ids = [[vocabulary.setdefault(w, len(vocabulary)) for w in t.split()] for t in texts]
        return [torch.nn.functional.one_hot(torch.tensor(x), 32).float() for x in ids]

    ag = [_record("Answer_Generation", x) for x in ("It is red.", "It is blue.")]
    value, name = scoring.baseline("AG", ag, ["It is red.", "It is red.", "It is blue."], encoder=words)
    assert name == "always 'It is red.'" and value == pytest.approx((1 + 2 / 3) / 2)


def test_standard_errors_and_verdict(scoring):
    mpc = [_record("Multiclass_Product_Classification", x) for x in ("A", "A", "B", "D")]
    assert scoring.standard_error("MPC", ["A", "A", "B", "C"], mpc) == pytest.approx(0.5 / 2)  # per record 1,1,1,0
    sa = [_record("Sentiment_Analysis", x) for x in ("A: very positive", "B: positive", "C: neutral")]
    assert scoring.standard_error("SA", ["A", "B", "C"], sa) == 0.0  # every resample scores macro F1 = 1
    pm = [_record("Product_Matching", x) for x in ("yes", "no", "yes", "no", "yes", "no")]
    se = scoring.standard_error("PM", ["yes", "yes", "no", "no", "yes", "no"], pm)
    assert 0 < se < 1 and se == scoring.standard_error("PM", ["yes", "yes", "no", "no", "yes", "no"], pm)
    assert scoring.standard_error("MPC", ["A"], mpc[:1]) is None
    assert scoring.clearly_above(before=0.1, after=0.9, baseline_score=0.667, se=0.1)
    assert not scoring.clearly_above(before=0.1, after=0.9, baseline_score=0.667, se=0.12)
    assert not scoring.clearly_above(before=0.8, after=0.9, baseline_score=0.1, se=0.06)  # untuned was close
    assert not scoring.clearly_above(before=0.1, after=0.9, baseline_score=0.1, se=None)
    assert not scoring.clearly_above(before=0.1, after=0.14, baseline_score=0.1, se=0.001)  # 2 SE, not 0.05
    assert scoring.clearly_above(before=0.1, after=0.16, baseline_score=0.1, se=0.001)


def test_ag_encoder_is_minilm_by_default_and_none_without_ag(generalist, monkeypatch):
    """The examples' AG encoder: all-MiniLM-L6-v2 unless --bertscore-model says otherwise; none without AG."""
    from ecellm.models import encoders

    import common

    monkeypatch.setattr(encoders, "minilm_encoder", lambda **kw: SimpleNamespace(name="stand-in-minilm", **kw))
    args = generalist.build_parser().parse_args([])
    encoder = common.ag_encoder(args.bertscore_model, None, None, "cpu", 4, ("PM", "AG"))
    assert encoder.name == "stand-in-minilm" and encoder.batch_size == 4
    assert common.ag_encoder(args.bertscore_model, None, None, "cpu", 4, ("PM", "SA")) is None


def test_training_losses_chain_phases_and_the_curve_needs_matplotlib(generalist, tmp_path, monkeypatch):
    """Losses of runs trained one after the other line up on one time axis; without matplotlib (the `plot` extra)
    no curve is written and the caller is told so."""
    import curve

    for name, steps in (("one", [(1, 30.0, 2.0), (2, 60.0, 1.0)]), ("two", [(1, 30.0, 0.5)])):
        (tmp_path / name).mkdir()
        lines = [json.dumps({"type": "step", "step": s, "elapsed_s": t, "loss": loss}) for s, t, loss in steps]
        (tmp_path / name / "log.jsonl").write_text("\n".join(lines + ['{"type": "eval", "step": 2}']) + "\n")
    assert curve.training_losses([tmp_path / "one", tmp_path / "two"]) == [(0.5, 2.0), (1.0, 1.0), (1.5, 0.5)]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert not curve.write_curve(tmp_path / "curve.png", [(0.5, 2.0)], [(0.0, 0.1)], "HR@1")
    assert not (tmp_path / "curve.png").exists()


def test_train_sr_refuses_a_budget_without_time_for_training(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "model")
    cmd = [sys.executable, "examples/train_sr.py", "--model", str(model), "--out", str(tmp_path / "out"),
           "--phases", "2:16,4:8", "--n-test", "4", "--minutes", "1e-9"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--minutes 1e-09 leaves no time for training" in proc.stderr


def test_time_limit_skips_later_phases_and_says_so(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    phases_module = importlib.import_module("phases")
    from ecellm.train import TrainConfig

    model = make_tiny_checkpoint(tmp_path / "model")
    for i, options in ((1, 2), (2, 4)):
        write_dataset(tmp_path / f"data{i}", n_per_task=48 // i, n_eval_per_task=2, seed=i, tasks=["SR"],
                      sr_options=options)
    base = TrainConfig(model=str(model), tasks="SR", global_batch=4, micro_batch=4, max_len=256, eval_every=0)
    phases = [(tmp_path / f"data{i}", tmp_path / f"run{i}", None) for i in (1, 2)]
    done = phases_module.train_phases(base, phases, 1e-9)
    assert done["steps"] == 1 and not (tmp_path / "run2").exists()
    assert re.fullmatch(r"the 1e-09-minute time limit, at step 1 of \d+ of phase 1 \(phase 2 skipped\)",
                        done["stopped"])
    assert done["last_phase"] == 1


def test_train_real_scores_every_real_task_in_the_run_folder_only(tmp_path):
    """examples/train_real.py on a tiny model: records built from ../shared/realdata, a step of PM alone and one of
    the mix, every task scored after tuning in its settings (OOD where the source has a held-out part) and before on
    the first --n-test-before records, results in --out only."""
    from .test_sources import realdata

    raw = realdata("")
    tasks = ("PM", "SA", "AVE", "AP", "AG", "SR")
    model = make_tiny_checkpoint(tmp_path / "model", tasks=tasks)
    out = tmp_path / "out"
    before = repository_files()
    cmd = [sys.executable, "examples/train_real.py", "--raw", str(raw), "--model", str(model), "--out", str(out),
           "--n-train", "PM:4,SA:2,AVE:2,AP:2,AG:2,SR:2", "--n-test", "2", "--n-test-extra", "3", "--n-test-pm", "3",
           "--n-test-before", "1", "--pm-phase", "3", "--balance", "SA,AP", "--max-steps", "1", "--max-len", "4096",
           "--minutes", "0", "--pm-hard",
           "--bertscore-model", "model"]  # no fetch in a fast test (MiniLM's wiring: test_ag_encoder_...)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert repository_files() == before, "the example wrote into the repository"
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == set(tasks) and results["steps"] == 2  # one step a phase
    assert results["pm_phase"] == 3 and [p["steps"] for p in results["phase_steps"]] == [1, 1]
    phase_records = json.loads((out / "data" / "pm" / "train.json").read_text())
    mix_records = json.loads((out / "data" / "train.json").read_text())
    assert len(phase_records) == 3 and {r["task"] for r in phase_records} == {"Product_Matching"}
    assert sum(r["task"] == "Product_Matching" for r in mix_records) == 1 and len(mix_records) == 11
    for abbr, t in results["tasks"].items():
        assert {"before", "after", "baseline", "metric"} <= set(t) and t["metric"] in t["after"], abbr
    assert set(results["tables"]) == {"tasks", "unseen_instruction", "ood", "pm_hard"}
    assert set(results["tables"]["ood"]) == {"SA", "AVE", "AP", "AG", "SR"}  # PM's source has no held-out part
    assert set(results["tables"]["pm_hard"]) == {"PM"} and results["n_test"]["pm_hard"]["PM"] == 3
    assert results["tasks"]["SR"]["metric"] == "hr@1" and results["bertscore_encoder"] == "evaluated-model"
    hard = json.loads((out / "data" / "test_hard.json").read_text())
    assert len(hard) == 3 and all(r["task"] == "Product_Matching" for r in hard)
    assert results["n_test"]["tasks"]["PM"] == 3 and results["n_test"]["tasks"]["SA"] == 2
    assert results["n_test"]["unseen_instruction"]["SA"] == 3 and results["n_test"]["ood"]["AVE"] == 3
    assert (Path(results["adapter"]) / "adapter_config.json").is_file() and results["minutes"] > 0
    test = json.loads((out / "data" / "test.json").read_text())
    assert {r["setting"] for r in test} == {"IND_Diverse_Instruction", "IND_Unseen_Instruction",
                                            "OOD_Diverse_Instruction"}
    markdown = (out / "results.md").read_text()
    assert "Beside the paper" in markdown and "examples/train_real.py" in markdown and "look-alike" in markdown
    assert "GPT-4 Turbo 0.387" in markdown
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert sum(g["stage"] == "after" for g in generations) == len(test) + len(hard)  # every test record answered
    untuned = sum(len(by_task) for by_task in results["n_test_before"].values())  # the first record of each task
    assert sum(g["stage"] == "before" for g in generations) == untuned == 6 + 6 + 5 + 1


def test_train_real_refuses_an_unknown_task_and_a_missing_raw_folder(tmp_path):
    for flags, message in ((["--tasks", "PM,XYZ"], "--tasks: XYZ not among"),
                           (["--raw", str(tmp_path / "nowhere")], "--raw: no folder"),
                           (["--balance", "SA,XYZ"], "--balance: XYZ not among"),
                           (["--tasks", ","], "--tasks: name at least one of")):
        proc = subprocess.run([sys.executable, "examples/train_real.py", "--out", str(tmp_path / "out"), *flags],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("script", ["train_sr", "train_generalist", "train_real", "generate"])
def test_every_flag_of_the_examples_says_what_it_does_and_its_default(script, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    parser = importlib.import_module(script).build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help.split()) >= 3, f"{script} {name}: no words in --help"
        assert "default" in action.help, f"{script} {name}: --help does not give the default"
    parser.format_help()  # every %(default)s placeholder renders


def test_train_real_takes_sa_and_ap_training_answers_in_turn(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    train_real = importlib.import_module("train_real")
    records = [{"output": o, "i": i} for i, o in enumerate("AAABBC")]
    assert [r["i"] for r in train_real.balanced_order(records)] == [0, 3, 5, 1, 4, 2]  # A B C, A B, A
