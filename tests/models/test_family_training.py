"""Qwen2 and Qwen3 train under FSDP2: two torchrun ranks make the same updates as one process (the Llama, Mistral,
Phi-2 and T5 runs are tests/test_train.py's)."""

from __future__ import annotations

import pytest
import torch

from ecellm.synthetic import write_dataset
from ecellm.train import train
from tests.test_train import adapter, config, finish, launch, step_losses
from tests.tiny_checkpoint import make_tiny_checkpoint

FAMILIES = {"qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
            "qwen3": dict(model_type="qwen3", head_dim=12)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_fsdp_ranks_equal_one_process(tmp_path, family):
    tasks = ["SR", "AG"]
    model = make_tiny_checkpoint(tmp_path / "model", tasks=tasks, **FAMILIES[family])
    write_dataset(tmp_path / "data", n_per_task=8, n_eval_per_task=2, seed=0, tasks=tasks)
    setup = (model, tmp_path / "data")
    targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"
    single = train(config(setup, tmp_path / "one", epochs=1, lora_targets=targets))
    finish(launch(config(setup, tmp_path / "two", epochs=1, lora_targets=targets), nproc=2))
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert len(one) == single["total_steps"] == 2 and one == pytest.approx(two, rel=1e-5)
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert any("q_proj" in k for k in a) and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=2e-5)
