"""Greedy decoding speed: `ecellm.generate.generate` against transformers' `generate` on the same checkpoint.

Both models are loaded once in one process; the libraries alternate (the order flipping each repetition) on the
same left-padded batch of synthetic ECInstruct SR prompts, and each call produces exactly `--new` tokens per row
(EOS does not stop either). Two figures: end to end, batch * new tokens / wall time of the whole call (prefill
included, which is the same matmul work in both libraries and dominates with ECInstruct-length prompts); and
decoding alone, batch * (new - 1) / (time of the call - time of a call making 1 token), i.e. per-token steps.

    python bench/generate.py                              # SmolLM2-135M-Instruct, batch 1 and 8, prompts 256 and 640
    python bench/generate.py --batches 1,8 --lengths 256 --new 64 --reps 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402


def load(path: Path, device: str, dtype: torch.dtype):
    """(ecellm model, transformers model), both in eval mode, on the same weights."""
    import transformers

    from ecellm.models import from_pretrained

    ours = from_pretrained(path, dtype=dtype, device=device).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return ours, ref


def runners(ours, ref):
    """name -> function(ids, mask, new) running one greedy generation of exactly `new` tokens per row."""
    from ecellm.generate import generate

    def ecellm_run(ids, mask, new):
        return generate(ours, ids, mask, max_new_tokens=new, eos_token_id=[])

    def hf_run(ids, mask, new):
        with torch.inference_mode():
            return ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=ref.config.pad_token_id)

    return {"ecellm": ecellm_run, "hf": hf_run}


def compare(run, prompts, pad_id: int, reps: int, new: int, sync=lambda: None,
            device: str = "cpu") -> dict[str, dict[str, list[float]]]:
    """End-to-end and decoding-only tokens/s of each runner over `reps` alternating repetitions (one untimed
    warm-up call each first): {name: {"e2e": [...], "decode": [...]}}."""
    from ecellm.generate import left_pad

    ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))
    for f in run.values():
        f(ids, mask, new)

    def timed(f, n):
        sync()
        t = time.perf_counter()
        f(ids, mask, n)
        sync()
        return time.perf_counter() - t

    speeds = {name: {"e2e": [], "decode": []} for name in run}
    for rep in range(reps):
        for name in list(run) if rep % 2 == 0 else list(run)[::-1]:
            one, full = timed(run[name], 1), timed(run[name], new)
            speeds[name]["e2e"].append(len(prompts) * new / full)
            speeds[name]["decode"].append(len(prompts) * (new - 1) / max(full - one, 1e-9))
    return speeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--lengths", default="256,640", help="prompt lengths in tokens (rows are cut to 0-15 fewer)")
    ap.add_argument("--new", type=int, default=64, help="tokens generated per row")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = common.smollm2_dir()
    ours, ref = load(path, "cpu", torch.float32)
    run = runners(ours, ref)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {common.machine()}; threads={args.threads}")
    print(f"# SmolLM2-135M-Instruct fp32, greedy, {args.new} new tokens per row, {args.reps} alternating reps")
    for T in map(int, args.lengths.split(",")):
        for B in map(int, args.batches.split(",")):
            speeds = compare(run, common.sr_prompts(B, T), ref.config.pad_token_id, args.reps, args.new)
            for kind in ("e2e", "decode"):
                e, h = speeds["ecellm"][kind], speeds["hf"][kind]
                print(f"generate B={B} prompt~{T} {kind}: tokens/s ecellm {common.median(e):.1f} ({common.spread(e)}) "
                      f"vs transformers {common.median(h):.1f} ({common.spread(h)}) -> "
                      f"{common.median(e) / common.median(h):.2f}x (target >= 1.5x)", flush=True)


if __name__ == "__main__":
    main()
