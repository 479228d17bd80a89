"""examples/train_sr.py on a tiny model: results land in the run folder only, in the documented layout."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ecellm.synthetic import write_dataset

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
    cmd = [sys.executable, "examples/train_sr.py", "--model", str(model), "--out", str(out), "--phases", "2:16,4:8",
           "--n-test", "4", "--max-steps", "1", "--score-phases", "--minutes", "30"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert [(r["phase"], r["options"], r["steps"]) for r in results["curve"]] == [(0, None, 0), (1, 2, 1), (2, 4, 2)]
    assert results["phases"] == [{"options": 2, "records": 16}, {"options": 4, "records": 8}]
    phase2 = json.loads((out / "run" / "phase2" / "config.json").read_text())
    assert phase2["init_adapter"] == str(out / "run" / "phase1" / "adapter") and phase2["minutes"] > 0
    train2 = json.loads((out / "data" / "phase2" / "train.json").read_text())
    assert {len(ast.literal_eval(r["options"])) for r in train2} == {4}
    test = json.loads((out / "data" / "test" / "test.json").read_text())
    assert len(test) == 4 and {len(ast.literal_eval(r["options"])) for r in test} == {20}
    assert "| after phase |" in (out / "results.md").read_text()
