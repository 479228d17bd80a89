"""`--compile`: five compiled steps equal five eager ones (losses, adapter), with packing, LoRA dropout and activation
checkpointing on; packed rows of changing length compile once, not once per step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo.utils
import torch._inductor.config
from safetensors.torch import load_file

from ecellm import train as train_mod
from ecellm.synthetic import write_dataset
from ecellm.train import TrainConfig, train

from .test_train import step_losses
from .tiny_checkpoint import make_tiny_checkpoint


def run(base, out, **overrides) -> TrainConfig:
    """Five steps of packed rows (1-3 examples of 3 tasks, lengths changing every step), LoRA dropout 0.1."""
    settings = dict(model=str(base / "model"), data=str(base / "data"), out=str(out), dtype="fp32", lr=5e-3,
                    lora_dropout=0.1, global_batch=4, pack_tokens=700, max_steps=5, max_len=512, max_val_examples=2,
                    checkpoint_every=0, seed=3)
    return TrainConfig(**{**settings, **overrides})


def train_eager_and_compiled(base, **overrides) -> tuple[dict, list[tuple[int, int]], list[int]]:
    """Train `run(base, ...)` eagerly into base/eager and compiled with activation checkpointing into base/compiled
    (the model and data under `base`). Inductor draws dropout's masks with torch's generator (`fallback_random`, as
    `compile_blocks` has it on the CPU), so both runs drop the same elements. Returns the compiled run's summary,
    dynamo's (graphs, graph breaks) after each of its steps, and its rows' lengths."""
    train(run(base, base / "eager", **overrides))
    counters, per_step, lengths = torch._dynamo.utils.counters, [], []
    note_step_time, device_batch = train_mod.note_step_time, train_mod.device_batch

    def noting(run_, seconds):
        per_step.append((counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())))
        note_step_time(run_, seconds)

    def recording(run_, examples):
        batch = device_batch(run_, examples)
        lengths.append(batch["input_ids"].shape[1])
        return batch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "note_step_time", noting)
        mp.setattr(train_mod, "device_batch", recording)
        mp.setattr(torch._inductor.config, "fallback_random", True)
        torch._dynamo.reset()
        counters.clear()
        summary = train(run(base, base / "compiled", compile=True, activation_checkpointing=True, **overrides))
    return summary, per_step, lengths


def make_data(base: Path) -> Path:
    tasks = ["SR", "PM", "AG"]
    make_tiny_checkpoint(base / "model", tasks=tasks)
    write_dataset(base / "data", n_per_task=8, n_eval_per_task=2, seed=0, tasks=tasks)
    return base


def assert_compiled_once(per_step: list[tuple[int, int]], lengths: list[int]) -> None:
    """Rows of changing length compiled at the first step only; the graph breaks are the packed attention's."""
    assert len(set(lengths)) >= 4, lengths  # the row length changed from step to step
    graphs, breaks = zip(*per_step)
    assert graphs[0] > 0 and set(graphs) == {graphs[0]}, per_step  # nothing compiled after the first step
    assert set(breaks) == {breaks[0]}, per_step
    reasons = list(torch._dynamo.utils.counters["graph_break"])
    assert breaks[0] == 0 or all("function _packed_attend" in r for r in reasons), reasons


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = make_data(tmp_path_factory.mktemp("compile"))
    return (base, *train_eager_and_compiled(base))


@pytest.mark.slow  # compiling takes about a minute on 2 cores; both tests share the runs
def test_compiled_steps_equal_eager(runs):
    base, summary, _, _ = runs
    eager, compiled = step_losses(base / "eager"), step_losses(base / "compiled")
    assert len(eager) == 5
    assert compiled == pytest.approx(eager, rel=1e-5)
    a = load_file(base / "eager" / "adapter" / "adapter_model.safetensors")
    b = load_file(base / "compiled" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # Adam's first steps move every element by ~lr (5e-3): a wrong gradient shows far above 1e-5
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    assert summary["compile_s"] > 0 and summary["first_step_s"] > summary["compile_s"]


@pytest.mark.slow
def test_rows_of_changing_length_compile_once(runs):
    _, _, per_step, lengths = runs
    assert_compiled_once(per_step, lengths)
