"""The training loop: FSDP2 over 2 CPU ranks equals one process, exact resume after SIGTERM, atomic checkpoints,
non-finite loss handling, and a loss that falls on a learnable task."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ecellm import train as train_mod
from ecellm.synthetic import write_dataset
from ecellm.train import TrainConfig, TrainingError, latest_checkpoint, train

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


def step_losses(out: Path) -> list[float]:
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["type"] == "step"]


def adapter(out: Path, name: str = "adapter") -> dict[str, torch.Tensor]:
    return load_file(out / name / "adapter_model.safetensors")


def launch(cfg: TrainConfig, nproc: int | None) -> subprocess.Popen:
    """`torchrun --nproc_per_node=nproc -m ecellm.train ...`, or plain `python -m ecellm.train ...` for None."""
    args = []
    for key, value in vars(cfg).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "ecellm.train", *args]
    # One thread per rank under torchrun (2 cores); a plain run keeps this process's thread count, so its float
    # reductions match in-process runs bit for bit.
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if nproc else {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output
    return output


@pytest.mark.parametrize(
    "loss_average, pack_tokens", [("example", 0), ("token", 0), ("example", 700), ("token", 700)]
)
def test_two_fsdp_ranks_equal_one_process(setup, tmp_path, loss_average, pack_tokens):
    """Under both loss weightings, unpacked and packed (rows of 1-3 examples: in 9 of the 12 steps the two ranks run
    different numbers of rows, and one process packs the step's 8 examples differently from two ranks' 4 each)."""
    overrides = dict(loss_average=loss_average, pack_tokens=pack_tokens)
    single = train(config(setup, tmp_path / "one", **overrides))
    finish(launch(config(setup, tmp_path / "two", **overrides), nproc=2))
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert len(one) == len(two) == single["total_steps"] == 12  # 48 records / 8 per step x 2 epochs
    assert one == pytest.approx(two, rel=1e-5)
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        # Summation order differs between 1 and 2 processes; Adam's m / sqrt(v) magnifies that rounding in elements
        # whose gradient is near zero, to ~1e-6. A wrongly weighted loss moves elements by ~lr (5e-3) per step.
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=2e-5)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # it did train


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


def test_resume_refuses_a_checkpoint_of_other_lora_settings(setup, tmp_path):
    out = tmp_path / "run"
    train(config(setup, out, epochs=1, checkpoint_every=2))
    with pytest.raises(TrainingError, match="does not fit this run"):
        train(config(setup, out, epochs=1, lora_r=4, resume=True))


def test_all_records_too_long_is_explained(setup, tmp_path):
    with pytest.raises(TrainingError, match="train: all 48 records .* dropped as longer than max_len=8"):
        train(config(setup, tmp_path, max_len=8))


def test_packed_resume_equals_uninterrupted(setup, tmp_path, monkeypatch):
    """A packed run stopped by SIGTERM after its 3rd step and resumed ends exactly where an uninterrupted one does."""
    packed = dict(pack_tokens=700, checkpoint_every=100, epochs=1)
    reference = train(config(setup, tmp_path / "ref", **packed))
    real, calls = train_mod.loss_sum, {"n": 0}

    def signalled(model, batch, seq2seq):
        calls["n"] += 1
        if calls["n"] == 5:  # inside step 2 (the step's 8 examples make 3-4 rows)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch, seq2seq)

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


def test_sigterm_then_resume_equals_uninterrupted(setup, tmp_path):
    reference = train(config(setup, tmp_path / "ref", checkpoint_every=100))
    cfg = config(setup, tmp_path / "run", checkpoint_every=100)
    proc = launch(cfg, nproc=None)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and len(step_losses(tmp_path / "run")) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = finish(proc)  # exit status 0: a clean stop
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert summary["stopped_by"] == "SIGTERM" and stopped_at < reference["total_steps"], output
    assert latest_checkpoint(tmp_path / "run").name == f"step_{stopped_at:08d}"

    resumed = train(config(setup, tmp_path / "run", checkpoint_every=100, resume=True))
    assert resumed["steps"] == reference["total_steps"]
    assert step_losses(tmp_path / "run") == pytest.approx(step_losses(tmp_path / "ref"), rel=1e-6)
    a, b = adapter(tmp_path / "ref"), adapter(tmp_path / "run")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)  # exact


def test_interrupted_checkpoint_write_leaves_previous_usable(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(config(setup, out, epochs=1, checkpoint_every=2))
    previous = latest_checkpoint(out)
    assert previous is not None

    def crash(obj, path, *a, **k):  # the adapter is written, then the trainer state write dies
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(train_mod.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train(config(setup, out, epochs=2, checkpoint_every=2, resume=True))
    monkeypatch.undo()
    assert latest_checkpoint(out) == previous
    state = torch.load(previous / "trainer.pt", weights_only=False)
    assert state["step"] == int(previous.name.split("_")[1])
    # and a resume from it runs to the end
    assert train(config(setup, out, epochs=2, checkpoint_every=2, resume=True))["steps"] == 12


def test_non_finite_loss_stops_with_the_step(setup, tmp_path, monkeypatch):
    real = train_mod.loss_sum
    calls = {"n": 0}

    def poisoned(model, batch, seq2seq):
        calls["n"] += 1
        loss = real(model, batch, seq2seq)
        return loss * float("nan") if calls["n"] > 12 else loss  # 4 micro-batches per step: step 4 goes bad

    monkeypatch.setattr(train_mod, "loss_sum", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite training loss \(nan\) at step 4 .*Last good checkpoint: .*step_00000002"):
        train(config(setup, tmp_path / "run", checkpoint_every=2, eval_every=100))


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
    assert train_mod.parse_args(["--pack-tokens", "64", "--loss-average", "token"]).pack_tokens == 64
    assert TrainConfig() == train_mod.parse_args([])


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
    state = torch.load(latest_checkpoint(out) / "trainer.pt", weights_only=False)
    moments = [v["exp_avg"] for v in state["optimizer"]["state"].values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    assert all(t.dtype == torch.float32 for t in adapter(out).values())
    assert summary["steps"] == 12
