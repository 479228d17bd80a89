"""Run folders (`ecellm.runs`, `ecellm.lock`, `ecellm.files`): one job per folder whatever happens to the lock
file's name, the holder's kind named, symbolic links refused or removed without touching their targets, weights
fingerprinted, and an evaluation that refuses to resume on a changed adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from ecellm.eval import main as eval_main
from ecellm.files import LinkRefused, write_json, write_text_atomically
from ecellm.lock import FolderBusy, FolderLock
from ecellm.runs import (
    FolderKind,
    RunFolderError,
    check_folder,
    check_settings,
    check_unchanged,
    clear,
    fingerprint_files,
)
from ecellm.synthetic import write_dataset

from .tiny_checkpoint import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TRAINING = FolderKind(job="training run", marker="config.json")

HOLD = """
import sys, time
from ecellm.lock import FolderLock
FolderLock(sys.argv[1], "training run").acquire(print)
print("held", flush=True)
time.sleep(120)
"""


def hold_in_another_process(folder: Path) -> subprocess.Popen:
    """A second process that locks `folder` as a training run and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_deleting_the_lock_file_lets_no_second_job_in(tmp_path):
    """The folder itself is locked: a deleted ecellm.lock changes nothing while its job lives; the message names the
    holder's kind (a training run, not 'another evaluation')."""
    proc = hold_in_another_process(tmp_path / "out")
    try:
        with pytest.raises(FolderBusy, match=rf"{tmp_path / 'out'} is in use by another training run: pid {proc.pid} "):
            FolderLock(tmp_path / "out", "evaluation").acquire(print)
        (tmp_path / "out" / "ecellm.lock").unlink()
        with pytest.raises(FolderBusy, match=r"in use by another job: unknown \(its lock file .*ecellm.lock was "
                                             r"deleted\)"):
            FolderLock(tmp_path / "out", "evaluation").acquire(print)
    finally:
        proc.kill()
        proc.wait()
    lock = FolderLock(tmp_path / "out", "evaluation")
    lock.acquire(print)  # the holder is gone: the folder's lock is free
    assert json.loads((tmp_path / "out" / "ecellm.lock").read_text())["job"] == "evaluation"
    lock.release()
    assert not (tmp_path / "out" / "ecellm.lock").exists()


def test_a_symlinked_lock_file_is_refused_and_its_target_kept(tmp_path):
    victim = tmp_path / "thesis.tex"
    victim.write_text("keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ecellm.lock").symlink_to(victim)
    with pytest.raises(LinkRefused, match=rf"{tmp_path / 'out' / 'ecellm.lock'} is a symbolic link \(to {victim}\)"):
        FolderLock(tmp_path / "out", "evaluation").acquire(print)
    assert victim.read_text() == "keep me"
    (tmp_path / "out" / "ecellm.lock").unlink()
    FolderLock(tmp_path / "out", "evaluation").acquire(print)  # the refused attempt left the folder unlocked


def test_files_are_written_fresh_and_links_refused(tmp_path):
    victim = tmp_path / "victim.json"
    victim.write_text("{}")
    (tmp_path / "config.json").symlink_to(victim)
    with pytest.raises(LinkRefused, match="config.json is a symbolic link"):
        write_json(tmp_path / "config.json", {"a": 1})
    assert victim.read_text() == "{}"
    write_text_atomically(tmp_path / "new.txt", "one")
    hard = tmp_path / "hard.txt"
    hard.hardlink_to(tmp_path / "new.txt")
    write_text_atomically(tmp_path / "new.txt", "two")  # a new file: the hard link keeps the old content
    assert (tmp_path / "new.txt").read_text() == "two" and hard.read_text() == "one"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_overwrite_removes_links_never_their_targets(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.json").write_text("keep me")
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "notes").symlink_to(outside)
    (out / "checkpoints" / "step_1").symlink_to(outside / "data.json")
    with pytest.raises(RunFolderError, match=r"already holds a training run \(checkpoints, notes\)"):
        check_folder(out, TRAINING, resume=False, overwrite=False)
    logged = []
    clear(out, check_folder(out, TRAINING, resume=False, overwrite=True), logged.append)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert (outside / "data.json").read_text() == "keep me"
    assert logged == [
        f"--overwrite: removing the symbolic link {out / 'checkpoints' / 'step_1'} (its target "
        f"{outside / 'data.json'} is left as it is)",
        f"--overwrite: removing the symbolic link {out / 'notes'} (its target {outside} is left as it is)",
    ]


def test_a_resume_keeps_every_setting_but_the_resumable_ones(tmp_path):
    check_settings(tmp_path / "config.json", {"lr": 1.0, "minutes": 5}, {"lr": 1.0, "minutes": 9}, TRAINING)
    with pytest.raises(RunFolderError, match=r"differing: lr: 1.0 -> 2.0; seed: '<absent>' -> 3\. Resume with"):
        check_settings(tmp_path / "config.json", {"lr": 1.0}, {"lr": 2.0, "seed": 3}, TRAINING)


def test_weights_are_fingerprinted_by_content(tmp_path):
    """The same size and another content is a change, named with its file; the allowing flag logs it."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 100)
    before = fingerprint_files([weights])
    weights.write_bytes(b"b" * 100)
    after = fingerprint_files([weights])
    assert before[str(weights)]["bytes"] == after[str(weights)]["bytes"] == 100
    with pytest.raises(RunFolderError, match=rf"the weights changed since the training run started, .*{weights}: 100 "
                                             r"bytes, sha256 \w+ -> 100 bytes.*pass --allow-model-change"):
        check_unchanged("the weights", before, after, "--allow-model-change", False, TRAINING, print)
    logged = []
    assert check_unchanged("the weights", before, after, "--allow-model-change", True, TRAINING, logged.append)
    assert logged[0].startswith(f"--allow-model-change: continuing on changed weights: {weights}")
    assert check_unchanged("the weights", before, before, "--allow-model-change", False, TRAINING, print) == []


# --- an evaluation's folder ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_with_adapter(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny model, an adapter for it, and a test file."""
    from ecellm.lora import inject
    from ecellm.models import from_pretrained
    from ecellm.peft_format import save_adapter

    base = tmp_path_factory.mktemp("eval")
    model_dir = make_tiny_checkpoint(base / "model", tasks=["PM"])
    model = from_pretrained(model_dir)
    inject(model, r=2, alpha=4.0, dropout=0.0)
    save_adapter(model, base / "adapter")
    write_dataset(base / "data", n_per_task=1, n_eval_per_task=3, seed=0, tasks=["PM"])
    return model_dir, base / "adapter", base / "data" / "test.json"


def test_eval_resume_refuses_a_changed_adapter_unless_allowed(tiny_with_adapter, tmp_path, capsys):
    model_dir, adapter_dir, test_file = tiny_with_adapter
    adapter = Path(tmp_path / "adapter")
    adapter.mkdir()
    for file in adapter_dir.iterdir():
        (adapter / file.name).write_bytes(file.read_bytes())
    args = ["--model", str(model_dir), "--adapter", str(adapter), "--data", str(test_file), "--max-new-tokens", "2",
            "--out", str(tmp_path / "out")]
    eval_main(args)
    capsys.readouterr()
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v + 1 for k, v in tensors.items()}, adapter / "adapter_model.safetensors")
    with pytest.raises(SystemExit) as e:
        eval_main(args + ["--resume"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1, err
    assert f"--resume: the model's or adapter's weights changed since the evaluation started, so it would mix two: " \
           f"{adapter / 'adapter_model.safetensors'}: " in err
    eval_main(args + ["--resume", "--allow-model-change"])
    assert f"--allow-model-change: continuing on changed model's or adapter's weights: {adapter}" in \
        capsys.readouterr().err
    eval_main(args + ["--resume"])  # the new weights are recorded: resuming again needs no flag


def test_eval_refuses_a_symlinked_lock_file(tiny_with_adapter, tmp_path, capsys):
    model_dir, _, test_file = tiny_with_adapter
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ecellm.lock").symlink_to(victim)
    with pytest.raises(SystemExit) as e:
        eval_main(["--model", str(model_dir), "--data", str(test_file), "--out", str(tmp_path / "out")])
    assert e.value.code == 1
    assert f"{tmp_path / 'out' / 'ecellm.lock'} is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "keep me"
