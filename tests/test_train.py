"""The training loop: FSDP2 over 2 CPU ranks (and 2 nodes) equals one process, exact resume after SIGTERM, SIGINT or
kill -9, atomic checkpoints that are never unpickled, resume rules, `--out` reuse, hangs, non-finite loss handling,
and a loss that falls on a learnable task."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ecellm import checkpoints
from ecellm import train as train_mod
from ecellm.checkpoints import ResumeError, latest_checkpoint, prune_checkpoints, read_checkpoint
from ecellm.files import LinkRefused
from ecellm.lock import FolderBusy, FolderLock
from ecellm.runs import RunFolderError
from ecellm.synthetic import write_dataset
from ecellm.train import TrainConfig, TrainingError, train

from .tiny_checkpoint import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    # Answers of very different lengths (a letter, yes/no, a sentence), so ranks and micro-batches carry different
    # numbers of loss tokens and only a normaliser summed over the whole step makes N ranks equal one process.
    tasks = ["SR", "PM", "AG"]
    model = make_tiny_checkpoint(base / "model", tasks=tasks)
    write_dataset(base / "data", n_per_task=16, n_eval_per_task=4, seed=0, tasks=tasks)
    return model, base / "data"


def config(setup, out, **overrides) -> TrainConfig:
    model, data = setup
    base = dict(
        model=str(model), data=str(data), out=str(out), dtype="fp32", lr=5e-3, lora_dropout=0.0, epochs=2,
        global_batch=8, micro_batch=2, max_len=512, checkpoint_every=2, eval_every=0, seed=3,
    )
    return TrainConfig(**{**base, **overrides})


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON output"))


def log_records(out: Path, kind: str = "step") -> list[dict]:
    return [r for r in map(strict_json, (out / "log.jsonl").read_text().splitlines()) if r["type"] == kind]


def step_losses(out: Path) -> list[float]:
    return [r["loss"] for r in log_records(out)]


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory) -> Path:
    """One uninterrupted run with the default test config (12 steps, checkpoints every 2, the last two kept); tests
    copy it before changing anything."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train(config(setup, out))["steps"] == 12
    return out


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def adapter(out: Path, name: str = "adapter") -> dict[str, torch.Tensor]:
    return load_file(out / name / "adapter_model.safetensors")


def cli_args(cfg: TrainConfig) -> list[str]:
    """The command-line flags of `cfg`."""
    args = []
    for key, value in vars(cfg).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        elif value is not None:  # None: not set
            args += [flag, str(value)]
    return args


def launch(cfg: TrainConfig, nproc: int | None) -> subprocess.Popen:
    """`torchrun --nproc_per_node=nproc -m ecellm.train ...`, or plain `python -m ecellm.train ...` for None."""
    args = cli_args(cfg)
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "ecellm.train", *args]
    # One thread per rank under torchrun (2 cores); a plain run keeps this process's thread count, so its float
    # reductions match in-process runs bit for bit.
    threads = "1" if nproc else str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until the run in `out` has logged `n` steps."""
    log, deadline = out / "log.jsonl", time.time() + timeout
    while not (log.is_file() and log.read_text().count('"type": "step"') >= n):
        assert time.time() < deadline and proc.poll() is None, "the run did not reach step %d" % n
        time.sleep(0.05)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output
    return output


def assert_same_run(one: Path, two: Path) -> None:
    """Two runs of the same global batch on different numbers of processes made the same updates."""
    a_losses, b_losses = step_losses(one), step_losses(two)
    assert len(a_losses) == len(b_losses) == 12  # 48 records / 8 per step x 2 epochs
    assert a_losses == pytest.approx(b_losses, rel=1e-5)
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        # Summation order differs between 1 and 2 processes; Adam's m / sqrt(v) magnifies that rounding in elements
        # whose gradient is near zero, to ~1e-6. A wrongly weighted loss moves elements by ~lr (5e-3) per step.
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=2e-5)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # it did train


@pytest.mark.parametrize(
    "loss_average, pack_tokens", [("example", 0), ("token", 0), ("example", 700), ("token", 700)]
)
def test_two_fsdp_ranks_equal_one_process(setup, tmp_path, loss_average, pack_tokens):
    """Under both loss weightings, unpacked and packed (rows of 1-3 examples: in 9 of the 12 steps the two ranks run
    different numbers of rows, and one process packs the step's 8 examples differently from two ranks' 4 each)."""
    overrides = dict(loss_average=loss_average, pack_tokens=pack_tokens)
    single = train(config(setup, tmp_path / "one", **overrides))
    finish(launch(config(setup, tmp_path / "two", **overrides), nproc=2))
    assert single["total_steps"] == 12
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_two_fsdp_ranks_keeping_gathered_weights_equal_one_process(setup, tmp_path):
    """`reshard_after_forward=False` (one all-gather a step) makes the same updates; a validation after every step
    (forward passes with no backward) must not leave stale gathered LoRA weights for the next step's forward."""
    single = train(config(setup, tmp_path / "one", eval_every=1))
    finish(launch(config(setup, tmp_path / "two", eval_every=1, reshard_after_forward=False), nproc=2))
    assert single["total_steps"] == 12
    assert_same_run(tmp_path / "one", tmp_path / "two")
    one, two = (log_records(tmp_path / name, "eval") for name in ("one", "two"))
    assert [r["val_loss"] for r in one] == pytest.approx([r["val_loss"] for r in two], rel=1e-5)


def test_t5_two_fsdp_ranks_equal_one_process(tmp_path):
    tasks = ["SR", "PM", "AG"]
    model = make_tiny_checkpoint(tmp_path / "t5", tasks=tasks, family="t5")
    write_dataset(tmp_path / "data", n_per_task=8, n_eval_per_task=4, seed=0, tasks=tasks)
    setup = (model, tmp_path / "data")
    single = train(config(setup, tmp_path / "one", epochs=1))
    finish(launch(config(setup, tmp_path / "two", epochs=1), nproc=2))
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert len(one) == single["total_steps"] == 3 and one == pytest.approx(two, rel=1e-5)
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert any("EncDecAttention" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=2e-5)


def test_resume_refuses_other_settings_by_name(setup, reference, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    saved = (out / "config.json").read_text()
    with pytest.raises(RunFolderError, match=r"differing: lora_r: 16 -> 4; lr: 0.005 -> 0.5; max_len: 512 -> 300; "
                       r"seed: 3 -> 99\. Resume with the saved values"):
        train(config(setup, out, lr=0.5, seed=99, max_len=300, lora_r=4, resume=True))
    assert (out / "config.json").read_text() == saved  # it records what the run used
    # A field the saved config lacks (one added after the run started) counts as a difference too.
    older = json.loads(saved)
    del older["grad_clip"]
    (out / "config.json").write_text(json.dumps(older))
    with pytest.raises(RunFolderError, match=r"differing: grad_clip: '<absent>' -> 1.0\."):
        train(config(setup, out, resume=True))
    # Where and how often it writes may change.
    (out / "config.json").write_text(saved)
    summary = train(config(setup, out, resume=True, checkpoint_every=5, keep_checkpoints=3, eval_every=4))
    assert summary["steps"] == 12 and step_losses(out) == step_losses(reference)


def test_resume_refuses_a_checkpoint_of_another_world_size(setup, reference, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    for step in (10, 12):
        trainer_file = out / "checkpoints" / f"step_{step:08d}" / "trainer.json"
        state = json.loads(trainer_file.read_text())
        trainer_file.write_text(json.dumps({**state, "rng": state["rng"] * 2}))  # as 2 ranks write it
    with pytest.raises(TrainingError, match=r"step_00000012 does not fit this run .* 2 ranks, this run has 1"):
        train(config(setup, out, resume=True))


def test_all_records_too_long_is_explained(setup, tmp_path):
    with pytest.raises(TrainingError, match="train: all 48 records .* dropped as longer than max_len=8"):
        train(config(setup, tmp_path, max_len=8))


def test_packed_resume_equals_uninterrupted(setup, tmp_path, monkeypatch):
    """A packed run stopped by SIGTERM after its 3rd step and resumed ends exactly where an uninterrupted one does."""
    packed = dict(pack_tokens=700, checkpoint_every=100, epochs=1)
    reference = train(config(setup, tmp_path / "ref", **packed))
    real, calls = train_mod.loss_sum, {"n": 0}

    def signalled(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # inside step 2 (the step's 8 examples make 3-4 rows)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch)

    monkeypatch.setattr(train_mod, "loss_sum", signalled)
    stopped = train(config(setup, tmp_path / "run", **packed))
    monkeypatch.undo()
    assert stopped["stopped_by"] == "SIGTERM" and 0 < stopped["steps"] < reference["total_steps"]
    resumed = train(config(setup, tmp_path / "run", resume=True, **packed))
    assert resumed["steps"] == reference["total_steps"]
    assert step_losses(tmp_path / "run") == step_losses(tmp_path / "ref")
    a, b = adapter(tmp_path / "ref"), adapter(tmp_path / "run")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)  # exact


def assert_resumed_exactly(run: Path, reference: Path) -> None:
    """The resumed run logged each step once, with the losses of the uninterrupted one, and ends on its adapter."""
    assert [r["step"] for r in log_records(run)] == list(range(1, 13))
    assert step_losses(run) == pytest.approx(step_losses(reference), rel=1e-6)
    a, b = adapter(reference), adapter(run)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)  # exact


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_interrupt_then_resume_equals_uninterrupted(setup, reference, tmp_path, sig):
    """SIGTERM and Ctrl-C (SIGINT) save a checkpoint and exit cleanly; after kill -9 the run resumes from its last
    checkpoint and drops the log lines past it. Either way the resumed run ends exactly as an uninterrupted one."""
    out = tmp_path / "run"
    proc = launch(config(setup, out, checkpoint_every=3), nproc=None)
    wait_for_steps(out, 2, proc)
    proc.send_signal(sig)
    if sig == signal.SIGKILL:
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    else:
        output = finish(proc)  # exit status 0: a clean stop
        summary = strict_json((out / "summary.json").read_text())  # no Infinity for a best loss not yet measured
        stopped_at = summary["steps"]
        assert summary["stopped_by"] == sig.name and stopped_at < 12 and summary["best_val_loss"] is None, output
        assert latest_checkpoint(out)[0].name == f"step_{stopped_at:08d}"
    resumed = train(config(setup, out, checkpoint_every=3, resume=True))
    assert resumed["steps"] == 12
    assert_resumed_exactly(out, reference)


def test_interrupted_checkpoint_write_leaves_previous_usable(setup, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, writes = checkpoints.save_file, []

    def crash_third(tensors, path, *a, **k):  # the third checkpoint's adapter is written, then its trainer state dies
        writes.append(path)
        if len(writes) == 3:
            Path(path).write_bytes(b"partial")
            raise KeyboardInterrupt("killed mid-write")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoints, "save_file", crash_third)
    with pytest.raises(KeyboardInterrupt):
        train(config(setup, out))
    monkeypatch.undo()
    previous, damaged = latest_checkpoint(out)
    assert previous.name == "step_00000004" and damaged == []
    state, _, _ = read_checkpoint(previous)
    assert state.step == 4
    # and a resume from it runs to the end
    assert train(config(setup, out, resume=True))["steps"] == 12
    assert_resumed_exactly(out, reference)


class _InfiniteGradient(torch.autograd.Function):
    """The identity forward; an infinite gradient backward (a finite loss whose update explodes)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("poison", ["loss", "gradient norm"])
def test_a_non_finite_step_is_skipped_and_reported(setup, tmp_path, monkeypatch, poison):
    """Step 4's loss (or only its gradient norm) is not finite: the update is skipped (weights and AdamW's state as
    after step 3), the log says so, and the run goes on to its end with finite weights."""
    real, calls = train_mod.loss_sum, {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        if 12 < calls["n"] <= 16:  # 4 micro-batches per step: step 4
            return loss * float("nan") if poison == "loss" else _InfiniteGradient.apply(loss)
        return loss

    monkeypatch.setattr(train_mod, "loss_sum", poisoned)
    out = tmp_path / "run"
    summary = train(config(setup, out, checkpoint_every=1, keep_checkpoints=0, max_steps=6, eval_every=100))
    assert summary["steps"] == 6
    records = log_records(out)
    assert [r.get("skipped") for r in records] == [None] * 3 + [f"non-finite {poison}"] + [None] * 2
    assert (records[3]["loss"] is None) == (poison == "loss") and records[3]["grad_norm"] is None
    step3, step4 = (read_checkpoint(out / "checkpoints" / f"step_{s:08d}") for s in (3, 4))
    for before, after in ((step3[1], step4[1]), (step3[2], step4[2])):  # optimizer state, then LoRA weights
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(t).all() for t in adapter(out).values())


def test_non_finite_weights_are_never_checkpointed(setup, tmp_path, monkeypatch):
    """Weights that become infinite end the run without a checkpoint of them: with --keep-checkpoints 1 the last good
    one stays, and a resume starts from it."""
    class BlowsUpAtStep2(torch.optim.AdamW):  # step 2's update makes the weights infinite
        def step(self, closure=None):
            result = super().step(closure)
            self.steps = getattr(self, "steps", 0) + 1
            if self.steps == 2:
                with torch.no_grad():
                    for group in self.param_groups:
                        for p in group["params"]:
                            p.fill_(float("inf"))
            return result

    monkeypatch.setattr(train_mod.torch.optim, "AdamW", BlowsUpAtStep2)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"step 2: the LoRA weights are no longer finite .*; no checkpoint "
                                            r"written. Last good checkpoint: \S*step_00000001$"):
        train(config(setup, out, checkpoint_every=1, keep_checkpoints=1, eval_every=100))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001"]
    assert latest_checkpoint(out) == (out / "checkpoints" / "step_00000001", [])


def test_loss_falls_on_learnable_task(setup, tmp_path):
    out = tmp_path / "run"
    train(config(setup, out, epochs=6, lr=1e-2, lora_r=8))
    losses = step_losses(out)
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    evals = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(evals) == 6 and (out / "best_adapter" / "adapter_config.json").is_file()
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr"] == 1e-2 and saved["epochs"] == 6


def test_cli_flags_cover_every_field():
    cfg = train_mod.parse_args(["--lora-r", "4", "--group-by-length", "--lr", "0.5", "--data", "d", "--pack", "4096"])
    assert (cfg.lora_r, cfg.group_by_length, cfg.lr, cfg.data, cfg.pack_tokens) == (4, True, 0.5, "d", 4096)
    assert train_mod.parse_args(["--pack-tokens", "64", "--loss-average", "token", "--data", "d"]).pack_tokens == 64
    assert TrainConfig(data="d") == train_mod.parse_args(["--data", "d"])


def test_defaults_are_the_papers_recipe():
    """Random batches and per-example loss, as the reference's micro-batch-1 training; no packing."""
    assert TrainConfig().group_by_length is False
    assert TrainConfig().loss_average == "example"
    assert TrainConfig().pack_tokens == 0


def test_bad_loss_average_and_pack_are_explained(setup, tmp_path):
    with pytest.raises(TrainingError, match="loss_average must be one of"):
        train(config(setup, tmp_path, loss_average="mean"))
    with pytest.raises(TrainingError, match="pack_tokens must be >= 0"):
        train(config(setup, tmp_path, pack_tokens=-1))


def test_bad_global_batch_is_explained(setup, tmp_path):
    with pytest.raises(TrainingError, match="global_batch 6 must be a multiple of world_size x micro_batch"):
        train(config(setup, tmp_path, global_batch=6, micro_batch=4))


def test_bf16_run_keeps_lora_and_optimizer_state_fp32(setup, tmp_path):
    """bf16 base weights, fp32 LoRA weights and AdamW state; the loss stays finite and falls."""
    out = tmp_path / "run"
    summary = train(config(setup, out, dtype="bf16", epochs=2, lr=1e-2, global_batch=8, micro_batch=4))
    losses = step_losses(out)
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]
    _, optimizer_tensors, _ = read_checkpoint(latest_checkpoint(out)[0])
    moments = [t for key, t in optimizer_tensors.items() if key.endswith("/exp_avg")]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    assert all(t.dtype == torch.float32 for t in adapter(out).values())
    assert summary["steps"] == 12


def test_tokenizer_larger_than_the_embedding_is_refused(setup, tmp_path):
    """A model whose embedding has fewer rows than its tokenizer has ids: refused by name before training."""
    model = tmp_path / "model"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((setup[0] / name).read_bytes())
    cfg = json.loads((setup[0] / "config.json").read_text()) | {"vocab_size": 300}
    (model / "config.json").write_text(json.dumps(cfg))
    weights = load_file(setup[0] / "model.safetensors")
    save_file({k: v[:300] if v.shape[0] == 384 else v for k, v in weights.items()}, model / "model.safetensors")
    with pytest.raises(ValueError, match=r"the tokenizer .* has 384 ids but the model .*model embeds only 300"):
        train(config((model, setup[1]), tmp_path / "run"))


class _Payload:
    """Pickles to a call that writes a file: what a tampered checkpoint would run if it were unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_resume_never_unpickles_a_checkpoint(setup, reference, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    newest = out / "checkpoints" / "step_00000012"
    marker = tmp_path / "payload_ran"
    for name in ("trainer.pt", "trainer.safetensors", "trainer.json"):  # the pickle format, and pickles in disguise
        torch.save({"step": _Payload(marker)}, newest / name)
    (newest / "adapter" / "adapter_model.safetensors").write_bytes((newest / "trainer.pt").read_bytes())
    assert not latest_checkpoint(out)[0] == newest
    train(config(setup, out, resume=True))  # resumes from step 10
    assert not marker.exists()
    assert_resumed_exactly(out, reference)
    # A checkpoint of the old pickle format alone is reported, never loaded.
    for name in ("trainer.json", "trainer.safetensors"):
        (newest / name).unlink()
    torch.save({"step": _Payload(marker)}, newest / "trainer.pt")
    _, damaged = latest_checkpoint(out)
    old_format = "its trainer.pt, a pickle, is never loaded"
    assert damaged == [f"{newest}: missing trainer.json ({old_format})"]
    assert not marker.exists()


def test_reused_out_is_refused_unless_resume_or_overwrite(setup, reference, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    held = r"run already holds a training run \(adapter, best_adapter, checkpoints, log.jsonl, summary.json\)"
    with pytest.raises(RunFolderError, match=held + ": pass --resume to continue it, --overwrite to delete it"):
        train(config(setup, out, seed=4))
    with pytest.raises(RunFolderError, match="--resume continues the training run in --out and --overwrite deletes"):
        train(config(setup, out, resume=True, overwrite=True))
    summary = train(config(setup, out, seed=4, epochs=1, overwrite=True))
    assert summary["steps"] == 6 and [r["step"] for r in log_records(out)] == list(range(1, 7))  # none of the old run
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000004", "step_00000006"]
    assert json.loads((out / "config.json").read_text())["seed"] == 4
    # --overwrite deletes only an ecellm run.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    with pytest.raises(
        RunFolderError, match=r"holds \['thesis.tex'\] but no config.json \(no ecellm training run\): not deleted"
    ):
        train(config(setup, other, overwrite=True))
    assert (other / "thesis.tex").read_text() == "keep me"
    # A start that failed before training (here: no data) leaves only config.json, which the next start replaces.
    with pytest.raises(FileNotFoundError, match="no train.json"):
        train(config(setup, tmp_path / "fresh", data=str(tmp_path / "nowhere")))
    assert train(config(setup, tmp_path / "fresh", epochs=1))["steps"] == 6


def test_reused_out_is_refused_on_every_rank(setup, reference, tmp_path):
    """Rank 0 decides about --out and tells the others: every rank ends with the error, none waits for a timeout."""
    out = copy_run(reference, tmp_path / "run")
    proc = launch(config(setup, out), nproc=2)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "ecellm.train: error: rank 0 failed: RunFolderError: " in output, output  # rank 1's line
    assert output.count("already holds a training run") == 2, output


def test_one_run_per_out(setup, reference, tmp_path, capsys):
    """While a run holds --out, a second one is refused before it writes anything, naming the folder and the holder,
    whatever its flags; a lock left by a run that died is taken over, naming it, and released at the end."""
    out = copy_run(reference, tmp_path / "run")
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    fresh = tmp_path / "fresh"  # a first run still loading its model: only its lock is there yet
    holders = [FolderLock(folder, "training run") for folder in (out, fresh)]  # first runs, still going
    for holder in holders:
        holder.acquire(print)
    try:
        for folder, flags in ((out, {}), (out, {"resume": True}), (out, {"overwrite": True}), (fresh, {})):
            with pytest.raises(FolderBusy, match=rf"{folder} is in use by another training run: pid {os.getpid()} "
                                                 rf"on host {socket.gethostname()}, started "):
                train(config(setup, folder, **flags))
    finally:
        for holder in holders:
            holder.release()
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written
    (out / "ecellm.lock").write_text('{"pid": 4242, "host": "gone", "started": "2026-12-04 12:00:00 UTC"}')
    train(config(setup, out, resume=True))
    assert "taking over the stale lock " + str(out / "ecellm.lock") + " of pid 4242 on host gone, started " \
        "2026-12-04 12:00:00 UTC: that job ended without releasing it" in capsys.readouterr().err
    assert not (out / "ecellm.lock").exists()


def test_a_busy_out_is_refused_on_every_rank(setup, reference, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    holder = FolderLock(out, "training run")
    holder.acquire(print)
    try:
        proc = launch(config(setup, out, resume=True), nproc=2)
        output, _ = proc.communicate(timeout=120)
    finally:
        holder.release()
    assert proc.returncode != 0 and f'File "{ROOT / "ecellm"}' not in output, output  # torchrun's traceback only
    assert output.count(f"is in use by another training run: pid {os.getpid()}") == 2, output  # rank 0 and rank 1


def test_resume_of_a_missing_or_empty_out_is_an_error(setup, tmp_path):
    with pytest.raises(RunFolderError, match=r"--resume: \S*typo does not exist, so there is no training run to"):
        train(config(setup, tmp_path / "typo", resume=True))
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFolderError, match=r"--resume: \S*empty holds no training run to continue"):
        train(config(setup, tmp_path / "empty", resume=True))
    assert list((tmp_path / "empty").iterdir()) == []


def test_resume_refuses_changed_data_unless_allowed(setup, tmp_path, capsys):
    """config.json records each data file's size, records and hash; a resume on other data is refused naming the
    file, or with --allow-data-change logged and recorded. Resuming the finished run keeps its summary."""
    data = Path(shutil.copytree(setup[1], tmp_path / "data"))
    out = tmp_path / "run"
    finished = train(config((setup[0], data), out, max_steps=2))
    recorded = json.loads((out / "config.json").read_text())["data_fingerprint"]
    assert sorted(recorded) == [str(data / "train.json"), str(data / "validation.json")]
    assert recorded[str(data / "train.json")]["records"] == 48
    records = json.loads((data / "train.json").read_text())
    records[5]["output"] = "flipped"
    (data / "train.json").write_text(json.dumps(records))
    changed = rf"--resume: the data files changed since the training run started, .*: {data / 'train.json'}: 48 records"
    with pytest.raises(RunFolderError, match=changed + r", \d+ bytes, sha256 \w+ -> 48 records"):
        train(config((setup[0], data), out, max_steps=2, resume=True))
    resumed = train(config((setup[0], data), out, max_steps=2, resume=True, allow_data_change=True))
    assert f"--allow-data-change: continuing on changed data files: {data / 'train.json'}" in capsys.readouterr().err
    assert [r["type"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())][-1] == "data_change"
    assert json.loads((out / "config.json").read_text())["data_fingerprint"] != recorded
    assert resumed["final_train_loss"] == finished["final_train_loss"] is not None  # not rewritten as null
    assert strict_json((out / "summary.json").read_text())["final_train_loss"] == finished["final_train_loss"]


def test_pruning_orders_checkpoints_by_step_number(tmp_path):
    for step in (5, 99_999_999, 100_000_000, 100_000_001):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    prune_checkpoints(tmp_path, 100_000_000, keep=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # step 100000001 is newer than the step just saved (left after a resume skipped it): not counted, not deleted
    assert kept == ["step_100000000", "step_100000001", "step_99999999"]


@pytest.mark.parametrize("damage", ["missing", "truncated", "non-finite", "adapter config"])
def test_resume_skips_a_damaged_newest_checkpoint(setup, reference, tmp_path, capsys, damage):
    out = copy_run(reference, tmp_path / "run")
    newest = out / "checkpoints" / "step_00000012"
    if damage == "missing":
        (newest / "trainer.json").unlink()
    elif damage == "truncated":
        data = (newest / "trainer.safetensors").read_bytes()
        (newest / "trainer.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "adapter config":
        (newest / "adapter" / "adapter_config.json").write_text('{"r": 1')  # cut short
    else:
        weights = load_file(newest / "adapter" / "adapter_model.safetensors")
        next(iter(weights.values()))[0, 0] = float("inf")
        save_file(weights, newest / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ResumeError):  # one error class for every damage (refused weights included)
        read_checkpoint(newest)
    train(config(setup, out, resume=True))
    log = capsys.readouterr().err
    reason = {
        "missing": "missing trainer.json", "truncated": "trainer.safetensors is unreadable",
        "non-finite": "adapter/adapter_model.safetensors is refused (tensor",
        "adapter config": "adapter/adapter_config.json is unreadable",
    }
    assert f"skipping a newer checkpoint, {newest}: " in log and reason[damage] in log, log
    assert f"resuming from {out / 'checkpoints' / 'step_00000010'} (step 10)" in log
    assert_resumed_exactly(out, reference)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000010", "step_00000012"]


def test_resume_without_a_readable_checkpoint_names_the_damage(setup, reference, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    for step in (10, 12):
        (out / "checkpoints" / f"step_{step:08d}" / "trainer.json").write_text('{"step": ')
    unreadable = r"trainer.json is unreadable \(JSONDecodeError"
    both = rf"step_00000012: {unreadable}.*; .*step_00000010: {unreadable}"
    with pytest.raises(TrainingError, match="no readable checkpoint in .*" + both):
        train(config(setup, out, resume=True))
    assert len(list((out / "checkpoints").iterdir())) == 2  # nothing deleted


def test_train_from_code_restores_signal_handlers_and_leaves_its_process_group(setup, tmp_path, monkeypatch):
    port = free_port()
    for key, value in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        monkeypatch.setenv(key, str(value))
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    assert train(config(setup, tmp_path / "run", epochs=1, global_batch=16))["world_size"] == 1
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert not torch.distributed.is_initialized()


# --- two nodes, and ranks that stop answering (torchrun agents on 127.0.0.1) ------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(cfg: TrainConfig) -> list[subprocess.Popen]:
    """Two torchrun agents ("nodes") of one process each, meeting by c10d rendezvous on a free loopback port."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    procs = []
    for node in (0, 1):
        launcher = [
            "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--local-addr=127.0.0.1", f"--rdzv-conf=is_host={int(node == 0)}",
        ]
        cmd = [sys.executable, *launcher, "-m", "ecellm.train", *cli_args(cfg)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def workers_of(agent: subprocess.Popen) -> list[int]:
    """The pids of the training processes a torchrun agent started (each in a session of its own)."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(agent.pid)], capture_output=True, text=True)
    return [int(pid) for pid in children.stdout.split()]


def end_node(agent: subprocess.Popen) -> str:
    """kill -9 a node: its torchrun agent and its worker. Returns what the node printed."""
    for pid in [*workers_of(agent), agent.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone
    return agent.communicate(timeout=60)[0]


@pytest.mark.slow
def test_two_nodes_equal_one_process(setup, reference, tmp_path):
    nodes = launch_two_nodes(config(setup, tmp_path / "two"))
    for node in nodes:
        finish(node)
    assert_same_run(reference, tmp_path / "two")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["node lost", "rank frozen"])
def test_a_silent_rank_ends_the_run_naming_it(setup, tmp_path, fault):
    """kill -9 of a whole node ends the other at once; a frozen rank (SIGSTOP) after `dist_timeout_s`: both with an
    error naming rank 1."""
    timeout = 6
    out = tmp_path / "run"
    node0, node1 = launch_two_nodes(config(setup, out, epochs=50, dist_timeout_s=timeout))
    try:
        wait_for_steps(out, 2, node0)
        start = time.time()
        if fault == "node lost":
            end_node(node1)
        else:
            (worker,) = workers_of(node1)
            os.kill(worker, signal.SIGSTOP)
        output, _ = node0.communicate(timeout=4 * timeout + 60)
        elapsed = time.time() - start
    finally:
        for node in (node0, node1):
            if node.poll() is None:
                end_node(node)
    assert node0.returncode != 0
    assert f"rank 0: rank(s) 1 stopped answering (no reply within dist_timeout_s={timeout}s" in output, output
    # one timeout for the failed collective and one for the probe, plus torchrun's own shutdown
    assert elapsed < 2 * timeout + 45, elapsed


def test_the_stages_run_a_step_and_a_checkpoint_restores_it(setup, tmp_path):
    """The stages `train` runs, called one by one: a step from a restored checkpoint equals the step it continues."""
    cfg = config(setup, tmp_path / "run", max_steps=2)
    (tmp_path / "run").mkdir()
    dist_ctx = train_mod.setup_distributed(cfg.dist_timeout_s)

    def new_run() -> train_mod.Run:
        run = train_mod.setup_model(cfg, dist_ctx)
        train_mod.setup_data(run)
        return run

    run = new_run()
    train_mod.setup_optimizer(run)
    first = train_mod.train_step(run)
    checkpoint = train_mod.save_checkpoint(run)
    second = train_mod.train_step(run)

    restored = new_run()
    resumed = train_mod.restore_lora_weights(restored, checkpoint)
    train_mod.setup_optimizer(restored)
    train_mod.restore_trainer_state(restored, *resumed)
    assert (first["step"], restored.step) == (1, 1)
    assert train_mod.train_step(restored)["loss"] == second["loss"]
    assert all(torch.equal(restored.trainable[n], p) for n, p in run.trainable.items())


def test_time_limit_stops_after_a_step_validates_and_writes_the_adapter(setup, reference, tmp_path):
    """`minutes` ends the run after the first step that passes it: validated, checkpointed, the final adapter written;
    a resume with a larger limit (a setting a resume may change) continues to the end, as an uninterrupted run."""
    out = tmp_path / "run"
    stopped = train(config(setup, out, minutes=1e-9))
    assert stopped["steps"] == 1 and stopped["stopped_by"] == "time limit"
    assert [r["step"] for r in log_records(out, "eval")] == [1]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["step_00000001"]
    resumed = train(config(setup, out, minutes=60, resume=True))
    assert resumed["steps"] == 12 and resumed["stopped_by"] is None
    assert step_losses(out) == step_losses(reference)


def test_stop_at_loss_ends_the_run_once_the_recent_mean_loss_is_below_it(setup, reference, tmp_path):
    """`stop_at_loss` ends the run after the first step at which the mean loss of the last 5 steps is below it:
    validated, the adapter written, every step before it as in the full run; 0 never stops."""
    losses = step_losses(reference)
    means = [sum(losses[i - 5:i]) / 5 for i in range(5, len(losses) + 1)]  # after steps 5..12
    threshold = means[2] + 1e-9  # reached after step 7 at the latest
    expected = 5 + next(i for i, m in enumerate(means) if m < threshold)
    out = tmp_path / "run"
    stopped = train(config(setup, out, stop_at_loss=threshold))
    assert stopped["stopped_by"] == "loss reached" and stopped["steps"] == expected < 12
    assert step_losses(out) == losses[:expected]
    assert [r["step"] for r in log_records(out, "eval")][-1] == expected
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_minutes_and_init_adapter_are_explained(setup, tmp_path):
    with pytest.raises(TrainingError, match="minutes must be >= 0"):
        train(config(setup, tmp_path / "a", minutes=-1))
    with pytest.raises(TrainingError, match=r"init_adapter: .*nowhere is not a directory"):
        train(config(setup, tmp_path / "b", init_adapter=str(tmp_path / "nowhere")))


def test_init_adapter_starts_from_its_weights(setup, reference, tmp_path):
    """Training from an adapter starts where it ended: with lr 0 the run's adapter is the given one, bit for bit; with
    the usual lr the first loss is the first run's final one's neighbourhood, not the fresh start's. Adapters of
    another rank or alpha are refused naming the file, before anything runs."""
    start = reference / "adapter"
    still = train(config(setup, tmp_path / "still", init_adapter=str(start), lr=0.0, epochs=1))
    assert still["steps"] == 6
    a, b = adapter(reference), adapter(tmp_path / "still")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    fresh_first, trained_last = step_losses(reference)[0], step_losses(reference)[-1]
    further = train(config(setup, tmp_path / "further", init_adapter=str(start), epochs=1))
    first = step_losses(tmp_path / "further")[0]
    assert abs(first - trained_last) < abs(first - fresh_first) and further["steps"] == 6
    with pytest.raises(TrainingError, match=r"adapter_config.json has r=16, lora_alpha=16.0; this run has r=8"):
        train(config(setup, tmp_path / "r8", init_adapter=str(start), lora_r=8))
    with pytest.raises(TrainingError, match=r"adapter_model.safetensors does not fit this run's LoRA layers .*missing"):
        train(config(setup, tmp_path / "more", init_adapter=str(start), lora_targets="q_proj,k_proj,v_proj,o_proj"))


# --- run-folder trust: symlinks, weights, signals during validation, bugs, no-op runs -------------------------------


def test_a_symlinked_config_is_refused_and_its_target_kept(setup, tmp_path):
    victim = tmp_path / "victim.json"
    victim.write_text('{"mine": true}')
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").symlink_to(victim)
    with pytest.raises(LinkRefused, match=rf"{tmp_path / 'run' / 'config.json'} is a symbolic link"):
        train(config(setup, tmp_path / "run", max_steps=1))
    assert victim.read_text() == '{"mine": true}'


def test_resume_refuses_changed_base_weights_unless_allowed(setup, tmp_path, capsys):
    """config.json records the base weights' size and hash: new weights at the same path are refused naming the
    file, or with --allow-model-change logged and recorded in log.jsonl."""
    model = Path(shutil.copytree(setup[0], tmp_path / "model"))
    out = tmp_path / "run"
    train(config((model, setup[1]), out, max_steps=2))
    weights = load_file(model / "model.safetensors")
    save_file({k: v * 1.01 for k, v in weights.items()}, model / "model.safetensors")  # other values
    with pytest.raises(RunFolderError, match=rf"the model files changed since the training run started, .*"
                                             rf"{model / 'model.safetensors'}: \d+ bytes, sha256 \w+ -> \d+ bytes"):
        train(config((model, setup[1]), out, max_steps=2, resume=True))
    train(config((model, setup[1]), out, max_steps=2, resume=True, allow_model_change=True))
    assert f"--allow-model-change: continuing on changed model files: {model / 'model.safetensors'}" in \
        capsys.readouterr().err
    assert log_records(out, "model_change")[0]["step"] == 2


@pytest.mark.parametrize("where", ["load_pretrained", "loss_sum"])
def test_a_bug_during_training_shows_its_traceback(setup, tmp_path, monkeypatch, where):
    """A ValueError from code (here: loading the model, a model's forward) is a bug: `ecellm train` lets it through
    with its traceback instead of telling it as an expected one-line error."""
    from ecellm import cli

    def bug(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(train_mod, where, bug)
    with pytest.raises(ValueError, match="a bug"):
        cli.run(["train", *cli_args(config(setup, tmp_path / "run", max_steps=1))])


SLOW_VALIDATION = """
import sys, time
from pathlib import Path
from ecellm import train

real, started = train.loss_sum, Path(sys.argv[1])

def slow_when_validating(model, batch):
    if not model.training:
        started.touch()
        time.sleep(2)
    return real(model, batch)

train.loss_sum = slow_when_validating
train.main(sys.argv[2:])
"""


def test_sigterm_during_validation_stops_within_seconds_with_the_step_checkpointed(setup, tmp_path):
    """The step is checkpointed before its validation; SIGTERM during the validation (here 24 forward passes of 2 s)
    ends it within a pass, and the run exits cleanly. The resume runs the validation it missed, once."""
    out, started = tmp_path / "run", tmp_path / "validating"
    cfg = config(setup, out, max_steps=2, micro_batch=1)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_VALIDATION, str(started), *cli_args(cfg)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not started.exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and time.time() - signalled < 10, output
    assert "SIGTERM: checkpoint saved at step 2" in output
    checkpoint = json.loads((out / "checkpoints" / "step_00000002" / "trainer.json").read_text())
    assert checkpoint["step"] == 2 and checkpoint["validation_due"] is True
    assert log_records(out, "eval") == []
    summary = train(config(setup, out, max_steps=2, micro_batch=1, resume=True))
    assert [r["step"] for r in log_records(out, "eval")] == [2] and summary["best_step"] == 2
    assert json.loads((out / "checkpoints" / "step_00000002" / "trainer.json").read_text())["validation_due"] is False


def test_a_run_whose_steps_all_had_learning_rate_zero_says_so(setup, reference, tmp_path, capsys):
    """With the reference's warm-up, `max_steps=1` takes one step at learning rate 0: the adapter cannot change, and
    the run says so in its log and summary.json."""
    summary = train(config(setup, tmp_path / "run", max_steps=1))
    assert [r["lr"] for r in log_records(tmp_path / "run")] == [0.0]
    expected = "every one of the run's 1 steps had learning rate 0, so the adapter did not change"
    assert summary["warnings"][0].startswith(expected)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["warnings"] == summary["warnings"]
    assert f"warning: {expected}" in capsys.readouterr().err
    assert json.loads((reference / "summary.json").read_text())["warnings"] == []
