"""Packed training against the unpacked ways to batch the same data: effective (non-padding) tokens/s and peak memory
of LoRA steps on the synthetic 10-task ECInstruct mix.

The mix: all 10 tasks in equal numbers (`ecellm.synthetic`), SR records with the items written in full and purchase
histories of 2 to 60 items, so lengths spread as ECInstruct's do (about 100-200 tokens for most tasks, 450-1650 for
SR, with SmolLM2's tokenizer). Steps of `--global-batch` examples are drawn by `ecellm.data.LengthGroupedBatchSampler`
as `ecellm.train` draws them, and every ecellm configuration runs `ecellm.train`'s own batch path (`micro_batches`,
`make_batch`, `loss_sum`, per-example loss weighting):

    packed            --pack P: the step's random examples first-fit into rows of up to P tokens, one row per pass
    micro-batch 1     the paper's recipe: one example per forward pass, no padding
    random padded     micro-batch B of a random step (train.py sorts a step's examples by length before cutting
                      micro-batches, so this is the best padded batching of random steps)
    length-grouped    --group-by-length: each step holds examples of similar length (sorted over 50 steps),
                      micro-batch B
    transformers+peft micro-batch 1 and `model(input_ids, attention_mask, labels).loss / G`, as the reference's
                      finetune.py runs it (per-example loss, logits at every position)

Each measurement is a fresh process (its own resident-memory high-water mark) that runs one warm-up step and then
`--steps` timed steps (forward + backward of every micro-batch, AdamW). Effective tokens/s counts the examples' real
tokens only; the padding share is the padded tokens over all tokens the passes processed. Memory: peak RSS during the
steps minus RSS before them (activations, gradients, optimizer state, allocator), as bench/train_step.py measures it.
Configurations alternate within one run (the order rotates each repetition), so all see the same machine state.

    python bench/packing.py --models tiny --reps 3                # the tiny random Llama (SmolLM2's vocabulary)
    python bench/packing.py --models smollm2 --global-batch 16 --steps 1 --reps 2
    python bench/packing.py --models smollm2 --device cuda --dtype bf16 --random-weights   # a GPU: bf16 base, fp32 LoRA

On a GPU, memory is `torch.cuda.max_memory_allocated` during the steps minus the memory allocated before them, and
packed rows in bf16 run flash attention's variable-length kernel.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step import build  # noqa: E402

import common  # noqa: E402

CONFIGS = ["packed", "micro-batch 1", "random padded", "length-grouped", "transformers+peft"]


def mix_examples(n_per_task: int, seed: int = 0) -> list[dict]:
    """The synthetic 10-task mix in SmolLM2's tokens (alpaca template, max_len 2048), task-interleaved."""
    import random

    from ecellm.data import TASKS, build_examples
    from ecellm.synthetic import generate_records
    from ecellm.tokenizer import load_tokenizer

    records = []
    for task in TASKS:
        if task.abbr == "SR":  # one record per history length: 2 .. 60 items, written in full
            rng = random.Random(seed)
            records += [generate_records("SR", 1, "train", seed=seed + i, sr_history_len=rng.randint(2, 60),
                                         sr_full_items=True)[0] for i in range(n_per_task)]
        else:
            records += generate_records(task.abbr, n_per_task, "train", seed=seed)
    examples, report = build_examples(records, load_tokenizer(common.smollm2_dir()), "alpaca", 2048)
    if report.dropped:
        raise RuntimeError(f"mix_examples: {report}")
    return examples


def steps_of(examples: list[dict], config: str, global_batch: int, n_steps: int, seed: int) -> list[list[int]]:
    """The first `n_steps` steps of an epoch, as `ecellm.train` draws them (length-grouped or random)."""
    from ecellm.data import LengthGroupedBatchSampler

    grouped = 50 if config == "length-grouped" else 1
    sampler = LengthGroupedBatchSampler([len(e["input_ids"]) for e in examples], global_batch, seed=seed,
                                        group_batches=grouped)
    return list(sampler)[:n_steps]


def ecellm_step_fn(model, config: str, args, examples: list[dict]):
    """One optimizer step's forward and backward passes through ecellm.train's batch path; returns the padded
    tokens processed."""
    from ecellm.data import example_loss_weight
    from ecellm.train import TrainConfig, loss_sum, make_batch, micro_batches

    train_config = TrainConfig(
        pack_tokens=args.pack if config == "packed" else 0,
        micro_batch=1 if config == "micro-batch 1" else args.micro_batch,
    )

    def run(indices: list[int]) -> int:
        weight = sum(example_loss_weight(examples[i]["labels"], "example", False) for i in indices)
        padded = 0
        for group in micro_batches(examples, indices, train_config.micro_batch, train_config.pack_tokens, False):
            batch = {k: v.to(args.device) for k, v in make_batch(group, train_config, args.pad_id, False).items()}
            (loss_sum(model, batch) / weight).backward()
            padded += batch["input_ids"].numel()
        return padded

    return run


def hf_step_fn(loss_fn, examples: list[dict], device: str):
    """The reference's way: micro-batch 1, the mean over each example's answer tokens, divided by the step's size."""

    def run(indices: list[int]) -> int:
        padded = 0
        for i in indices:
            ids = torch.tensor([examples[i]["input_ids"]], device=device)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                     "labels": torch.tensor([examples[i]["labels"]], device=device)}
            (loss_fn(batch) / len(indices)).backward()
            padded += ids.numel()
        return padded

    return run


def child(args) -> None:
    from ecellm.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    examples = mix_examples(args.n_per_task)
    args.pad_id = load_tokenizer(common.smollm2_dir()).pad_id
    steps = steps_of(examples, args.child, args.global_batch, args.steps + 1, args.seed)
    lib = "hf" if args.child == "transformers+peft" else "ecellm"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, loss_fn = build(lib, Path(args.model_dir), args.dropout, False, args.device, dtype)
    if lib == "hf":
        run = hf_step_fn(loss_fn, examples, args.device)
    else:
        run = ecellm_step_fn(model, args.child, args, examples)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(indices: list[int]) -> int:
        padded = run(indices)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return padded

    cuda = args.device == "cuda"
    before = torch.cuda.memory_allocated() / 2**20 if cuda else common.rss_mb()
    common.reset_peak_rss()
    step(steps[0])  # warm-up
    if cuda:
        torch.cuda.synchronize()
    real = padded = 0
    start = time.perf_counter()
    for indices in steps[1:]:
        padded += step(indices)
        real += sum(len(examples[i]["input_ids"]) for i in indices)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else common.peak_rss_mb()
    print(json.dumps({"tokens_per_s": real / elapsed, "padding": 1 - real / padded, "peak_mb": peak - before,
                      "step_s": elapsed / args.steps, "real_tokens": real}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny", help="comma-separated: smollm2, tiny")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--pack", type=int, default=2048, help="packed row budget, tokens")
    ap.add_argument("--micro-batch", type=int, default=8, help="micro-batch of the padded configurations")
    ap.add_argument("--global-batch", type=int, default=32, help="examples per optimizer step")
    ap.add_argument("--n-per-task", type=int, default=64, help="records per task in the mix")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per process (after one warm-up step)")
    ap.add_argument("--reps", type=int, default=2, help="processes per configuration (alternating)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the frozen base's dtype (LoRA: fp32)")
    ap.add_argument("--random-weights", action="store_true",
                    help="offline GPU machine: random weights of SmolLM2's shapes in the cache that holds its config")
    ap.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout (the paper's 0.1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default="/tmp/ecellm-bench", help="where the tiny checkpoint is written")
    ap.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    configs = args.configs.split(",")
    if args.random_weights:
        common.random_weights_if_missing()
    gpu = f"{torch.cuda.get_device_name()}; " if args.device == "cuda" else ""
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {gpu}{common.machine()}; threads={args.threads}")
    print(f"# {args.n_per_task} records per task, steps of {args.global_batch} examples, pack {args.pack}, "
          f"micro-batch {args.micro_batch}; LoRA r=16 alpha=16 dropout={args.dropout}, {args.dtype} base on "
          f"{args.device}; {args.reps} reps x "
          f"{args.steps} steps (+1 warm-up)")
    for name in args.models.split(","):
        path = common.model_dir(name, Path(args.root))
        runs = {c: [] for c in configs}
        for rep in range(args.reps):
            for config in configs[rep % len(configs):] + configs[: rep % len(configs)]:
                flags = ["--child", config, "--model-dir", str(path)]
                for key in ("pack", "micro_batch", "global_batch", "n_per_task", "steps", "threads", "dropout", "seed",
                            "device", "dtype"):
                    flags += ["--" + key.replace("_", "-"), str(getattr(args, key))]
                result = common.run_child(__file__, flags)
                runs[config].append(result)
                print(f"# {name} rep {rep + 1} {config}: {result['tokens_per_s']:.0f} tokens/s, "
                      f"peak {result['peak_mb']:.0f} MB", flush=True)
        unpacked_random = [c for c in configs if c in ("micro-batch 1", "random padded")]
        best_unpacked = max((common.median([r["tokens_per_s"] for r in runs[c]]) for c in unpacked_random), default=0)
        print(f"\n{name}: configuration | effective tokens/s | padding | peak MB | packed speed-up")
        packed = common.median([r["tokens_per_s"] for r in runs["packed"]]) if "packed" in runs else None
        for config, results in runs.items():
            tps = [r["tokens_per_s"] for r in results]
            ratio = f"{packed / common.median(tps):.2f}x" if packed else "-"
            print(f"| {config} | {common.median(tps):.0f} ({common.spread(tps)}) | "
                  f"{100 * common.median([r['padding'] for r in results]):.0f}% | "
                  f"{common.median([r['peak_mb'] for r in results]):.0f} | {ratio} |", flush=True)
        if packed and best_unpacked:
            print(f"packed / best unpacked random-batch configuration: {packed / best_unpacked:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
