"""QLoRA's 4-bit base (ecellm/lora/nf4.py): what it costs per training step, and what it saves in memory.

speed     one LoRA training step (forward + backward + AdamW; r=16, the paper's targets) on a full-precision base and
          on its NF4 copy, and the dequantization alone: every 4-bit weight dequantized twice, as a step does it
          (forward, and backward for the input's gradient; a third time with activation checkpointing). On CUDA
          also `torch.compile`d dequantization. Medians over --reps.
memory    measured: peak resident memory of training steps on the CPU, one fresh process per row (so the
          high-water mark belongs to that row alone), above the process's resident set before the model was built
          (Python, torch and the batch excluded). glibc's mmap threshold is pinned to 64 KiB so freed tensors
          return to the system and RSS tracks live tensors.
computed  7B / 13B from the meta-device parameter counts (Mistral-7B-v0.2, Llama-2-13B configs in
          tests/assets/configs): weights, LoRA state, and activations at max_len 2048, micro-batch 1, with
          activation checkpointing (the estimate is itemised in `activation_bytes`).

    python bench/nf4.py speed --device cpu --batch 1 --seq 256
    python bench/nf4.py speed --device cuda --batch 4 --seq 1024          # < 60 s on an H200
    python bench/nf4.py memory --models smollm2,qwen2.5-0.5b --batch 1 --seq 512
    python bench/nf4.py computed

Offline (a GPU machine): --random-weights, with SmolLM2's config and tokenizer in $ECELLM_CACHE (bench/gpu_checks.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ecellm import lora, nf4  # noqa: E402
from ecellm.models import from_config, from_pretrained  # noqa: E402

import common  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                  max_position_embeddings=32768, tie_word_embeddings=True, hidden_act="silu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(name: str, dtype: torch.dtype, quantize: bool, device: str):
    """The model with LoRA (r=16, alpha=16, the paper's targets), optionally on a 4-bit base, in train mode."""
    if name == "smollm2":
        model = from_pretrained(common.smollm2_dir(), dtype=dtype)
    else:  # random weights of the real shapes: memory and speed do not depend on the values
        torch.manual_seed(0)
        model = from_config(QWEN25_05B, dtype=dtype, device="cpu")
    lora.inject(model, r=16, alpha=16)
    if quantize:
        print("#", nf4.quantize_model(model).summary()[:200], flush=True)
    return model.to(device).train()


def median_seconds(fn, reps: int, device: str) -> float:
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(args) -> None:
    dtype = DTYPES[args.dtype]
    batch = {k: v.to(args.device) for k, v in common.sr_batch(args.batch, args.seq).items()}
    for quantize in (False, True):
        model = build(args.model, dtype, quantize, args.device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step():
            model(**batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up
        seconds = median_seconds(step, args.reps, args.device)
        row = dict(model=args.model, device=args.device, dtype=args.dtype, base="nf4" if quantize else args.dtype,
                   batch=args.batch, seq=args.seq, step_s=round(seconds, 4))
        if quantize:
            weights = [m for m in model.modules() if isinstance(m, nf4.NF4Weight)]

            def dequantize_all(fn=nf4.NF4Weight.dequantize):
                for w in weights:
                    fn(w, dtype)

            dequantize_all()
            row["dequantize_per_step_s"] = round(2 * median_seconds(dequantize_all, args.reps, args.device), 4)
            row["n_weights"] = len(weights)
            if args.device == "cuda":
                compiled = torch.compile(nf4.NF4Weight.dequantize)
                dequantize_all(compiled)  # compiles
                row["compiled_dequantize_per_step_s"] = round(
                    2 * median_seconds(lambda: dequantize_all(compiled), args.reps, args.device), 4)
        print(json.dumps(row), flush=True)


def memory_row(args) -> None:
    """One measurement (run in its own process by `memory`)."""
    batch = common.sr_batch(args.batch, args.seq)
    before = common.rss_mb()
    model = build(args.model, DTYPES[args.dtype], args.quantize, "cpu")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    after_setup = common.rss_mb()
    common.reset_peak_rss()
    for _ in range(3):
        model(**batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = common.peak_rss_mb()
    tensors = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    print(json.dumps(dict(model=args.model, base="nf4" if args.quantize else args.dtype, compute=args.dtype,
                          batch=args.batch, seq=args.seq, weights_mb=round(tensors), after_setup_mb=round(
                              after_setup - before), peak_training_mb=round(peak - before))), flush=True)


def memory(args) -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    for name in args.models.split(","):
        for dtype, quantize in (("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)):
            cmd = [sys.executable, __file__, "memory-row", "--model", name, "--dtype", dtype, "--batch",
                   str(args.batch), "--seq", str(args.seq)] + (["--quantize"] if quantize else [])
            cmd += ["--random-weights"] if args.random_weights else []
            subprocess.run(cmd, env=env, check=True)


def nf4_bytes(n: int) -> int:
    """Bytes of an NF4 weight of n values: codes, 8-bit scale codes, fp32 second-level scales and the offset."""
    blocks = n // nf4.BLOCK
    return n // 2 + blocks + 4 * -(-blocks // nf4.SCALE_BLOCK) + 4


def activation_bytes(c: dict, seq: int, lora_r: int) -> dict[str, int]:
    """Activation memory of a bf16 Llama-style decoder step at micro-batch 1 with activation checkpointing (our
    implementation: the LoRA path casts each targeted linear's input to fp32 and keeps it for lora_A's gradient;
    SDPA's memory-efficient/flash kernels keep O(T) per head, not T x T)."""
    h, i, v, n_layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = h * c.get("num_key_value_heads", c["num_attention_heads"]) // c["num_attention_heads"]
    bf16, fp32 = 2, 4
    one_block = seq * (
        2 * h * fp32  # the two RMSNorms' inputs (normalised in fp32)
        + (4 * h + 2 * h + i) * fp32  # the fp32 inputs the LoRA paths keep: q, k, v, o; gate, up; down
        + (2 * h + 2 * kv) * bf16  # q, k (after RoPE), v, attention output
        + 4 * i * bf16  # gate, up, silu(gate), their product
        + 7 * lora_r * fp32  # the (T, r) LoRA intermediates
    )
    return {
        "block inputs kept by checkpointing": n_layers * seq * h * bf16,
        "one block recomputed in backward": one_block,
        "its gradients in flight (~ the same again)": one_block,
        "logits and their gradient (every token labelled, fp32)": 2 * seq * v * fp32,
    }


def computed(args) -> None:
    configs = {"Mistral-7B-v0.2": "mistral-7b-instruct-v0.2.json", "Llama-2-13B": "llama-2-13b-chat.json"}
    for name, file in configs.items():
        c = json.loads((ROOT / "tests" / "assets" / "configs" / file).read_text())
        model = lora.inject(from_config(c, dtype=torch.bfloat16), r=16, alpha=16)  # meta device: no memory
        linears = [m for m in model.modules() if isinstance(m, lora.LoRALinear)]
        linear_n = sum(m.in_features * m.out_features for m in linears)
        lora_n, total_n = lora.count_parameters(model)
        other_n = total_n - lora_n - linear_n  # embeddings, norms
        biggest = max(m.in_features * m.out_features for m in linears)
        acts = activation_bytes(c, 2048, 16)  # the paper's max_len
        base_bf16 = 2 * (linear_n + other_n)
        base_nf4 = sum(nf4_bytes(m.in_features * m.out_features) for m in linears) + 2 * other_n
        lora_state = 16 * lora_n  # fp32 weights, gradients, AdamW's two moments
        dequant_transient = 8 * biggest  # the largest layer being dequantized (int32 indices, fp32, bf16)
        gib = 2**30
        for base, weights, transient in (("bf16", base_bf16, 0), ("nf4", base_nf4, dequant_transient)):
            total = weights + lora_state + sum(acts.values()) + transient
            print(json.dumps(dict(model=name, base=base, params=total_n - lora_n, lora_params=lora_n,
                                  weights_gib=round(weights / gib, 2), lora_state_gib=round(lora_state / gib, 2),
                                  activations_gib=round(sum(acts.values()) / gib, 2),
                                  dequantize_transient_gib=round(transient / gib, 2), total_gib=round(total / gib, 2),
                                  fits_24gib=total / gib < 23)))  # 1 GiB for the CUDA context and fragmentation
        print("# activations, " + name + ": " + ", ".join(f"{k}: {v / gib:.2f} GiB" for k, v in acts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["speed", "memory", "memory-row", "computed"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "qwen2.5-0.5b"])
    parser.add_argument("--models", default="smollm2,qwen2.5-0.5b")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--quantize", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--random-weights", action="store_true", help="offline: random SmolLM2 weights (see common)")
    args = parser.parse_args()
    if args.random_weights:
        common.random_weights_if_missing()
    print(f"# {common.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)
    {"speed": speed, "memory": memory, "memory-row": memory_row, "computed": computed}[args.part](args)


if __name__ == "__main__":
    main()
