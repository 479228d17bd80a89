"""LoRA fine-tuning steps: ecellm against transformers + peft on the same weights, data and LoRA config.

Each measurement is a fresh process (so the resident-memory high-water mark belongs to one library alone) that loads
the checkpoint, injects LoRA (r=16, alpha=16, the paper's targets q,k,v,o,gate,up,down_proj and lm_head), builds one
batch of synthetic ECInstruct SR examples of exactly the given length, and runs warm-up steps then timed steps of
forward + backward + AdamW. ecellm's loss is the model's own (`model(..., labels=...)`: logits only where a label
exists); transformers + peft get `model(input_ids, attention_mask, labels).loss`, as its users call it. With
--compile, ecellm with its blocks compiled as `ecellm train --compile` compiles them (`ecellm.train.compile_blocks`;
the warm-up steps compile) runs as a third library.
The libraries alternate, the order flipping each repetition, so a machine shared with other
work slows them alike; the script reports medians over repetitions and the ratios ecellm / reference.

Memory: peak resident set during the steps minus the resident set before the first step (the kernel's VmHWM, reset
just before the steps), i.e. activations, gradients, optimizer state and allocator overhead, not the weights.

Then, unless --no-limit: the achieved FLOP/s of ecellm's step (useful FLOPs counted as described in `step_flops`)
against the best fp32 matmul this machine does on the step's shapes, and a torch.profiler table of the top ops.

    python bench/train_step.py                      # SmolLM2-135M-Instruct and the tiny model, B=4, T=256 and 512
    python bench/train_step.py --models smollm2 --lengths 256,512,1024 --reps 5
    python bench/train_step.py --models smollm2 --lengths 256 --threads 1 --compile --no-limit
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402


def build(lib: str, path: Path, dropout: float, compile_: bool, device: str = "cpu", dtype=torch.float32):
    """The model with LoRA injected (fp32 LoRA weights in both libraries), in train mode, and a function
    batch -> loss."""
    if lib == "ecellm":
        from ecellm import lora
        from ecellm.models import from_pretrained

        model = from_pretrained(path, dtype=dtype, device=device)
        lora.inject(model, r=16, alpha=16, dropout=dropout, targets=common.LORA_TARGETS)
        if compile_:
            from ecellm.train import compile_blocks, transformer_blocks

            compile_blocks(transformer_blocks(model), torch.device(device))

        def loss_fn(b):
            return model(b["input_ids"], b["attention_mask"], labels=b["labels"])
    else:
        import transformers
        from peft import LoraConfig, get_peft_model

        base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        config = LoraConfig(r=16, lora_alpha=16, lora_dropout=dropout, target_modules=common.LORA_TARGETS,
                            task_type="CAUSAL_LM")
        model = get_peft_model(base, config)
        if compile_:
            model.compile()

        def loss_fn(b):
            return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                         use_cache=False).loss
    return model.train(), loss_fn


def child(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = common.sr_batch(args.batch, args.seq_len)
    model, loss_fn = build(args.child, Path(args.model_dir), args.dropout, args.compile)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    before = common.rss_mb()
    common.reset_peak_rss()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = common.peak_rss_mb() - before
    step_s = common.median(times)
    print(json.dumps({"step_s": step_s, "tokens_per_s": args.batch * args.seq_len / step_s, "peak_mb": peak,
                      "trainable": sum(p.numel() for p in params)}))


# --- the physical limit -------------------------------------------------------------------------------------------
def step_flops(c: dict, B: int, T: int, n_labelled: int, r: int = 16,
               segments: list[int] | None = None) -> dict[str, float]:
    """Useful FLOPs of one LoRA step of a Llama model (multiply-add = 2 FLOPs).

    Frozen projections: forward 2*N per token; backward only the activation gradient (2*N per token), none for the
    weights, and none at all for layer 0's q/k/v, whose input needs no gradient. LoRA (A: r x in, B: out x r) on
    every projection: forward 2*r*(in+out) per token, backward the same twice (weight and activation gradients).
    Attention: causal, so half of the T x T scores: forward 2 matmuls of 2*T*T/2*hs per head, backward twice that
    (a flash-attention kernel's recomputation of the scores is not counted); in packed rows (`segments`: the
    lengths of all rows' examples) only the scores within each example count, sum(L*L) in place of B*T*T. The
    vocabulary projection (with its LoRA) only at the `n_labelled` positions that carry loss. Norms, activations,
    softmax and the optimizer are not counted.
    """
    H, ffn, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    nh, nkv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    hs = c.get("head_dim") or H // nh
    shapes = [(H, nh * hs), (H, nkv * hs), (H, nkv * hs), (nh * hs, H), (H, ffn), (H, ffn), (ffn, H)]  # (in, out)
    tokens = B * T
    frozen_fwd = 2 * tokens * L * sum(i * o for i, o in shapes)
    qkv = sum(i * o for i, o in shapes[:3])
    frozen_bwd = frozen_fwd - 2 * tokens * qkv
    lora = 2 * tokens * L * sum(r * (i + o) for i, o in shapes) * 3
    square = sum(n * n for n in segments) if segments is not None else B * T * T
    attn_fwd = L * nh * 2 * (2 * square / 2 * hs)
    head = n_labelled * (2 * 2 * H * V + 3 * 2 * r * (H + V))  # frozen fwd + activation grad; LoRA fwd + 2 grads
    parts = {"frozen projections": frozen_fwd + frozen_bwd, "LoRA": lora, "attention": 3 * attn_fwd,
             "vocabulary projection": head}
    parts["total"] = sum(parts.values())
    return parts


def matmul_peak(M: int, shapes: list[tuple[int, int]], threads: int, seconds: float = 2.0) -> float:
    """Best fp32 matmul FLOP/s on (M x in) @ (in x out) for the given shapes, as F.linear computes them."""
    torch.set_num_threads(threads)
    best = 0.0
    for i, o in shapes:
        x, w = torch.randn(M, i), torch.randn(o, i)
        torch.nn.functional.linear(x, w)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.nn.functional.linear(x, w)
            n += 1
        best = max(best, 2 * M * i * o * n / (time.perf_counter() - t0))
    return best


def profile(path: Path, B: int, T: int, dropout: float, threads: int, rows: int = 15) -> str:
    """torch.profiler table (self CPU time) of ecellm's LoRA step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    torch.set_num_threads(threads)
    batch = common.sr_batch(B, T)
    model, loss_fn = build("ecellm", path, dropout, False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss_fn(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with prof(activities=[ProfilerActivity.CPU]) as p:
        step()
        step()
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)


# --- the orchestrating run ----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,tiny", help="comma-separated: smollm2, tiny")
    ap.add_argument("--lengths", default="256,512", help="sequence lengths (tokens per example)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3, help="processes per library and setting (alternating)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout (the paper's 0.1)")
    ap.add_argument("--compile", action="store_true", help="also ecellm with compiled blocks (ecellm train --compile)")
    ap.add_argument("--no-limit", action="store_true", help="skip the FLOP/s and profile part")
    ap.add_argument("--root", default="/tmp/ecellm-bench", help="where the tiny checkpoint is written")
    ap.add_argument("--before", help="another ecellm source tree (e.g. `git archive <commit> ecellm | tar -x -C DIR`) "
                    "measured as a third library, for before/after figures of a change")
    ap.add_argument("--child", choices=["ecellm", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {common.machine()}; threads={args.threads}")
    print(f"# B={args.batch}, LoRA r=16 alpha=16 dropout={args.dropout}, fp32, {args.reps} reps x {args.steps} steps"
          f" (+{args.warmup} warm-up)")
    results = {}
    for name in args.models.split(","):
        path = common.model_dir(name, Path(args.root))
        for T in map(int, args.lengths.split(",")):
            libs = ["ecellm", "hf"] + (["compiled"] if args.compile else []) + (["before"] if args.before else [])
            runs = {lib: [] for lib in libs}
            for rep in range(args.reps):
                for lib in libs if rep % 2 == 0 else libs[::-1]:
                    flags = ["--child", "hf" if lib == "hf" else "ecellm", "--model-dir", str(path),
                             "--seq-len", str(T), "--batch", str(args.batch), "--steps", str(args.steps),
                             "--warmup", str(args.warmup), "--threads", str(args.threads), "--dropout",
                             str(args.dropout)] + (["--compile"] if lib == "compiled" else [])
                    runs[lib].append(common.run_child(__file__, flags, args.before if lib == "before" else None))
            e, h = ({k: [r[k] for r in runs[lib]] for k in ("tokens_per_s", "peak_mb")} for lib in ("ecellm", "hf"))
            tps = common.median(e["tokens_per_s"]) / common.median(h["tokens_per_s"])
            mem = common.median(e["peak_mb"]) / common.median(h["peak_mb"])
            results[(name, T)] = (runs, path)
            print(f"train {name} B={args.batch} T={T}: tokens/s ecellm {common.median(e['tokens_per_s']):.0f} "
                  f"({common.spread(e['tokens_per_s'])}) vs transformers+peft {common.median(h['tokens_per_s']):.0f} "
                  f"({common.spread(h['tokens_per_s'])}) -> {tps:.2f}x (target >= 1.2x); peak step memory "
                  f"ecellm {common.median(e['peak_mb']):.0f} MB vs {common.median(h['peak_mb']):.0f} MB -> "
                  f"{mem:.2f}x (target <= 0.9x)", flush=True)
            if args.compile:
                c = {k: [r[k] for r in runs["compiled"]] for k in ("tokens_per_s", "peak_mb")}
                c_tps = common.median(c["tokens_per_s"])
                print(f"  compiled: tokens/s {c_tps:.0f} ({common.spread(c['tokens_per_s'])}) -> "
                      f"{c_tps / common.median(h['tokens_per_s']):.2f}x transformers+peft (target >= 1.5x), "
                      f"{c_tps / common.median(e['tokens_per_s']):.2f}x eager ecellm; peak "
                      f"{common.median(c['peak_mb']):.0f} MB", flush=True)
            if args.before:
                b = {k: [r[k] for r in runs["before"]] for k in ("tokens_per_s", "peak_mb")}
                b_tps = common.median(b["tokens_per_s"])
                print(f"  before ({args.before}): tokens/s {b_tps:.0f} ({common.spread(b['tokens_per_s'])}), "
                      f"{b_tps / common.median(h['tokens_per_s']):.2f}x the reference; peak "
                      f"{common.median(b['peak_mb']):.0f} MB; now/before tokens/s "
                      f"{common.median(e['tokens_per_s']) / b_tps:.2f}x", flush=True)
    if args.no_limit:
        return
    for (name, T), (runs, path) in results.items():
        c = json.loads((path / "config.json").read_text())
        labels = common.sr_batch(args.batch, T)["labels"]
        flops = step_flops(c, args.batch, T, n_labelled=int((labels[:, 1:] != -100).sum()))
        H, ffn = c["hidden_size"], c["intermediate_size"]
        peak = matmul_peak(args.batch * T, [(H, ffn), (ffn, H), (H, H)], args.threads)
        step_s = common.median([r["step_s"] for r in runs["ecellm"]])
        achieved = flops["total"] / step_s
        split = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in flops.items() if k != "total")
        print(f"limit {name} B={args.batch} T={T}: {flops['total'] / 1e9:.1f} GFLOP per step ({split}); "
              f"ecellm {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of the fp32 matmul peak "
              f"{peak / 1e9:.1f} GFLOP/s (best of ({args.batch * T} x {H}) @ ({H} x {ffn}) and similar)", flush=True)
    name, T = next(iter(results))
    print(f"\nprofile: ecellm {name} B={args.batch} T={T}, two steps, top ops by self CPU time")
    print(profile(results[(name, T)][1], args.batch, T, args.dropout, args.threads))


if __name__ == "__main__":
    main()
