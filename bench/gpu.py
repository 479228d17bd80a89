"""The GPU benchmarks in one run of a few minutes on one CUDA GPU, bf16: the LoRA training step and greedy decoding,
ecellm against transformers (+ peft), and ecellm's FSDP2 training loop launched by torchrun on one GPU.

Training step: bf16 frozen base, fp32 LoRA (r=16, alpha=16, dropout 0.1, the paper's targets) in both libraries,
synthetic SR batches of exactly T tokens, forward + backward + AdamW; tokens/s, and peak memory as
`torch.cuda.max_memory_allocated` during the steps minus the memory allocated before them. Both models stay loaded;
the libraries alternate, the order flipping each repetition. Decoding: greedy, exactly `--new` tokens per row.
FSDP2: `torchrun --standalone --nproc_per_node=1 -m ecellm.train` on a synthetic SR set, bf16, its summary's
tokens/s (validation included).

    python bench/gpu.py                 # ~3-5 minutes on an H100
    python bench/gpu.py --compile       # also torch.compile'd ecellm blocks in the training-step comparison
    ECELLM_CACHE=build/gpu-cache python bench/gpu.py --random-weights   # offline: config + tokenizer only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import generate as gen_bench  # noqa: E402
import train_step  # noqa: E402

import common  # noqa: E402


def train_compare(path: Path, B: int, T: int, reps: int, steps: int, compile_: bool) -> dict[str, dict]:
    batch = {k: v.cuda() for k, v in common.sr_batch(B, T).items()}
    libs = {"ecellm": ("ecellm", False), "hf": ("hf", False)}
    if compile_:
        libs["ecellm+compile"] = ("ecellm", True)
    runs = {}
    for name, (lib, comp) in libs.items():
        torch.manual_seed(0)
        model, loss_fn = train_step.build(lib, path, 0.1, comp, "cuda", torch.bfloat16)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[name] = (model, loss_fn, opt)

    def step(loss_fn, opt):
        loss_fn(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name, (_, loss_fn, opt) in list(runs.items()):  # warm-up (and compilation)
        try:
            for _ in range(2):
                step(loss_fn, opt)
        except Exception as e:  # noqa: BLE001 (a failed compilation drops that variant, not the comparison)
            print(f"gpu train: {name} failed in warm-up: {type(e).__name__}: {str(e)[:300]}", flush=True)
            del runs[name]
    speeds = {name: [] for name in runs}
    peaks = {name: [] for name in runs}
    for rep in range(reps):
        for name in list(runs) if rep % 2 == 0 else list(runs)[::-1]:
            _, loss_fn, opt = runs[name]
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            for _ in range(steps):
                step(loss_fn, opt)
            torch.cuda.synchronize()
            speeds[name].append(B * T * steps / (time.perf_counter() - t))
            peaks[name].append((torch.cuda.max_memory_allocated() - before) / 2**20)
    del runs
    torch.cuda.empty_cache()
    return {name: {"tokens_per_s": common.median(speeds[name]), "spread": common.spread(speeds[name]),
                   "peak_mb": common.median(peaks[name])} for name in speeds}


def fsdp_run(root: Path, steps: int) -> dict | None:
    """ecellm.train under torchrun on one GPU (FSDP2, bf16); None when ecellm/train.py is absent."""
    try:
        import ecellm.train  # noqa: F401
    except ImportError:
        return None
    data, out = root / "data", root / "run"
    subprocess.run([sys.executable, "-m", "ecellm.synthetic", "--out", str(data), "--n-per-task", "2000",
                    "--n-eval-per-task", "50", "--tasks", "SR"], check=True, capture_output=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "ecellm.train",
           "--data", str(data), "--out", str(out), "--tasks", "SR", "--dtype", "bf16", "--max-steps", str(steps),
           "--global-batch", "64", "--micro-batch", "16", "--checkpoint-every", "100000", "--max-val-examples", "64"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return summary


def section(fn, *args) -> None:
    """Run one part; a failure prints its traceback and the next part still runs (one device call, every figure)."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        import traceback

        print(f"{fn.__name__} failed:\n{traceback.format_exc()}", flush=True)
    torch.cuda.empty_cache()


def train_section(path: Path, args) -> None:
    for T in map(int, args.lengths.split(",")):
        r = train_compare(path, args.batch, T, args.reps, args.steps, args.compile)
        e, h = r["ecellm"], r["hf"]
        ratio = e["tokens_per_s"] / h["tokens_per_s"]
        print(f"gpu train B={args.batch} T={T}: tokens/s ecellm {e['tokens_per_s']:.0f} ({e['spread']}) vs "
              f"transformers+peft {h['tokens_per_s']:.0f} ({h['spread']}) -> {ratio:.2f}x;"
              f" peak memory {e['peak_mb']:.0f} MB vs {h['peak_mb']:.0f} MB -> {e['peak_mb'] / h['peak_mb']:.2f}x",
              flush=True)
        if "ecellm+compile" in r:
            c = r["ecellm+compile"]
            print(f"gpu train B={args.batch} T={T}: ecellm + torch.compile {c['tokens_per_s']:.0f} tokens/s "
                  f"({c['tokens_per_s'] / h['tokens_per_s']:.2f}x), peak {c['peak_mb']:.0f} MB", flush=True)


def generate_section(path: Path, args) -> None:
    ours, ref = gen_bench.load(path, "cuda", torch.bfloat16)
    run = gen_bench.runners(ours, ref)
    for B in (1, 8):
        prompts = common.sr_prompts(B, 640)
        ids_speeds = gen_bench.compare(run, prompts, ref.config.pad_token_id, args.reps, args.new,
                                       sync=torch.cuda.synchronize, device="cuda")
        for kind in ("e2e", "decode"):
            e, h = common.median(ids_speeds["ecellm"][kind]), common.median(ids_speeds["hf"][kind])
            print(f"gpu generate B={B} prompt~640 {kind}: tokens/s ecellm {e:.0f} vs transformers {h:.0f} -> "
                  f"{e / h:.2f}x", flush=True)


def fsdp_section(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        s = fsdp_run(Path(tmp), args.fsdp_steps)
    if s is None:
        print("gpu fsdp: ecellm/train.py not present, skipped")
    else:
        print(f"gpu fsdp (torchrun nproc 1, FSDP2, bf16, micro-batch 16, global 64): {s['steps']} steps in "
              f"{s['elapsed_s']:.0f} s, {s['tokens_per_s']:.0f} tokens/s (padded tokens, validation included)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lengths", default="512,1024")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    ap.add_argument("--new", type=int, default=128, help="tokens generated per row")
    ap.add_argument("--fsdp-steps", type=int, default=20)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--random-weights", action="store_true",
                    help="without the real checkpoint (offline GPU machine), use random weights of its shapes")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    if args.random_weights:
        common.random_weights_if_missing()
    path = common.smollm2_dir()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {torch.cuda.get_device_name()}; "
          f"{common.machine()}")
    print(f"# SmolLM2-135M-Instruct bf16 base, fp32 LoRA r=16 alpha=16 dropout=0.1; B={args.batch}; "
          f"{args.reps} alternating reps x {args.steps} steps")
    section(train_section, path, args)
    section(generate_section, path, args)
    section(fsdp_section, args)


if __name__ == "__main__":
    main()
