"""Checks that need a CUDA GPU (skipped elsewhere): CUDA parity with transformers, bf16, nccl + FSDP2 training.

Run on a GPU machine with `python -m pytest tests/test_gpu.py`; figures from the last run are in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecellm.generate import generate, left_pad
from ecellm.models import from_pretrained
from ecellm.synthetic import write_dataset

from .models.hf_tiny import save_tiny_decoder
from .tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["llama-tied-gqa", "mistral-window", "phi-partial"])
def test_cuda_fp32_matches_transformers_and_cpu_greedy(name, tmp_path):
    ref = save_tiny_decoder(name, tmp_path).cuda()
    ours = from_pretrained(tmp_path, device="cuda")
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        a, b = ref(ids).logits, ours(ids)
    assert (a - b).abs().max().item() <= 1e-4 * max(1.0, a.abs().max().item())  # TF32 off: cuBLAS fp32 reductions
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    ids, mask = left_pad(prompts, 0)
    on_gpu = generate(ours, ids.cuda(), mask.cuda(), max_new_tokens=8, eos_token_id=[])
    on_cpu = generate(from_pretrained(tmp_path), ids, mask, max_new_tokens=8, eos_token_id=[])
    assert on_gpu == on_cpu


def test_bf16_on_cuda_tracks_fp32(tmp_path):
    save_tiny_decoder("llama-untied", tmp_path)
    ids = torch.randint(3, 97, (4, 32), generator=torch.Generator().manual_seed(1)).cuda()
    labels = ids.clone()
    with torch.no_grad():
        full = from_pretrained(tmp_path, device="cuda")(ids).float()
        half = from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")(ids).float()
        loss32 = from_pretrained(tmp_path, device="cuda")(ids, labels=labels)
        loss16 = from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")(ids, labels=labels)
    rel = ((full - half).norm() / full.norm()).item()
    assert rel < 0.03, rel
    assert (full.argmax(-1) == half.argmax(-1)).float().mean().item() > 0.9
    assert abs(loss32.item() - loss16.item()) < 0.02 * loss32.item()


@pytest.mark.parametrize("flags", [[], ["--compile", "--pack", "700"]], ids=["eager", "compiled-packed"])
def test_torchrun_nccl_fsdp2_bf16_training(tmp_path, flags):
    tasks = ["SR", "PM", "AG"]
    model = make_tiny_checkpoint(tmp_path / "model", tasks=tasks)
    write_dataset(tmp_path / "data", n_per_task=32, n_eval_per_task=8, seed=0, tasks=tasks)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={torch.cuda.device_count()}",
           "-m", "ecellm.train", "--model", str(model), "--data", str(tmp_path / "data"), "--out", str(out),
           "--dtype", "bf16", "--lr", "1e-2", "--epochs", "3", "--global-batch", "8", "--micro-batch", "2",
           "--activation-checkpointing", "--max-len", "512", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in records if x["type"] == "step"]
    assert len(losses) == 36 and all(x == x for x in losses)
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", ["llama-tied-gqa", "mistral-window"])
def test_packed_bf16_varlen_matches_unpacked(name, tmp_path):
    """Packed rows in bf16 on CUDA run flash attention's varlen kernel: logits of each segment track the same
    example run alone (bf16 rounding apart), sliding window included."""
    from ecellm.models.layers import use_varlen_attention

    save_tiny_decoder(name, tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")
    assert use_varlen_attention(torch.device("cuda"), torch.bfloat16, model.config.head_dim)
    g = torch.Generator().manual_seed(4)
    examples = [torch.randint(3, 97, (n,), generator=g) for n in (9, 17, 6)]
    ids = torch.cat(examples)[None].cuda()
    segments = torch.cat([torch.full((len(x),), i) for i, x in enumerate(examples)])[None].cuda()
    with torch.no_grad():
        packed = model(ids, segment_ids=segments)[0].float()
        alone = torch.cat([model(x[None].cuda())[0] for x in examples]).float()
    assert ((packed - alone).norm() / alone.norm()).item() < 0.01


def test_compiled_bf16_packed_steps_track_eager_and_compile_once(tmp_path):
    """`--compile` on CUDA in bf16 (packed rows on flash attention's varlen kernel, dropout, activation
    checkpointing): five steps track the eager ones within bf16 rounding, and rows of changing length compile at the
    first step only."""
    from .test_compile import assert_compiled_once, make_data, train_eager_and_compiled
    from .test_train import adapter, step_losses

    base = make_data(tmp_path)
    _, per_step, lengths = train_eager_and_compiled(base, dtype="bf16")
    assert_compiled_once(per_step, lengths)
    eager, compiled = step_losses(base / "eager"), step_losses(base / "compiled")
    assert len(eager) == 5 and compiled == pytest.approx(eager, rel=2e-2)
    a, b = adapter(base / "eager"), adapter(base / "compiled")
    a, b = torch.cat([a[k].flatten() for k in sorted(a)]), torch.cat([b[k].flatten() for k in sorted(a)])
    # bf16 rounds differently where compiled kernels fuse, and Adam's first steps magnify that in near-zero gradients
    assert ((a - b).norm() / a.norm()).item() < 0.2
