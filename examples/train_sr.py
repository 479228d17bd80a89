"""Fine-tune a model with LoRA on Sequential Recommendation (SR) and measure HR@1 before and after.

    torchrun --standalone --nproc_per_node=2 examples/train_sr.py

With no argument it tunes the embedded default, SmolLM2-135M-Instruct, on a synthetic SR set (seeded, written to
`<out>/data`) with the demo recipe below, sized to finish within about 15 minutes on a 2-core CPU, then reports HR@1
and the share of invalid outputs on held-out records, before and after tuning, and writes them into README.md.

`--model DIR --data DIR` switch to your checkpoint (any supported family) and the real ECInstruct files; the paper's
recipe (`ecellm.train.TrainConfig` defaults) is then the default instead of the demo recipe.

The demo recipe differs from the paper's on purpose: 2-core CPUs train ~100 tokens/s, so it uses short synthetic
prompts (still 20 options), a 10x higher learning rate, small global batches (many updates), fp32, and one epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch.distributed as dist

from ecellm.data import load_records
from ecellm.eval import evaluate
from ecellm.lora import load_adapter
from ecellm.metrics import score
from ecellm.models import from_pretrained
from ecellm.synthetic import write_dataset
from ecellm.tokenizer import load_tokenizer
from ecellm.train import TrainConfig, setup_distributed, train

# The demo recipe for the embedded default on a 2-core CPU (see the module docstring).
DEMO = dict(
    lr=1e-3, lora_r=16, lora_alpha=32.0, lora_dropout=0.05, epochs=1, global_batch=8, micro_batch=4,
    max_len=512, dtype="fp32", warmup_ratio=0.05, eval_every=0, checkpoint_every=25, max_val_examples=32,
)
README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- train_sr:begin -->", "<!-- train_sr:end -->"
CURVE_BEGIN, CURVE_END = "<!-- train_sr_curve:begin -->", "<!-- train_sr_curve:end -->"


def hr_at_1(model_dir: str, adapter: str | None, records: list[dict], rank: int, world: int, template: str) -> dict:
    """HR@1 and invalid share on `records`, generation split over the ranks, scored on every rank."""
    tokenizer = load_tokenizer(model_dir)
    model = from_pretrained(model_dir)
    if adapter:
        load_adapter(model, adapter)
    mine = records[rank::world]
    out = evaluate(model, tokenizer, mine, template=template, batch_size=8, max_new_tokens=8, progress=rank == 0)
    predictions = [g["prediction"] for g in out["generations"]]
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, predictions)
    else:
        gathered = [predictions]
    ordered = [None] * len(records)  # undo the rank::world split
    for r, preds in enumerate(gathered):
        ordered[r::world] = preds
    result = score("SR", ordered, [x["output"] for x in records])
    result["invalid"] = result["n_failed"] / result["n"]
    result["examples"] = [{"prediction": p, "reference": x["output"]} for p, x in list(zip(ordered, records))[:5]]
    return result


def replace_block(begin: str, end: str, body: str) -> None:
    """Replace the text between two README markers."""
    text = README.read_text()
    if begin not in text or end not in text:
        print(f"README.md has no {begin} ... {end} block; figures not written", file=sys.stderr)
        return
    README.write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{body}\n{end}", text,
                             flags=re.S))


def learning_curve(run: Path, model_dir: str, records: list[dict], d, template: str, before: dict) -> list[dict]:
    """HR@1 of every checkpoint the run kept, against training examples and minutes of training."""
    steps = {x["step"]: x for x in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if x["type"] == "step"}
    config = json.loads((run / "config.json").read_text())
    rows = [{"step": 0, "examples": 0, "minutes": 0.0, "hr@1": before["hr@1"], "invalid": before["invalid"]}]
    for checkpoint in sorted((run / "checkpoints").glob("step_*")):
        step = int(checkpoint.name.split("_")[1])
        result = hr_at_1(model_dir, str(checkpoint / "adapter"), records, d.rank, d.world, template)
        rows.append({"step": step, "examples": step * config["global_batch"],
                     "minutes": steps[step]["elapsed_s"] / 60, "hr@1": result["hr@1"], "invalid": result["invalid"]})
    return rows


def write_readme(before: dict, after: dict, summary: dict, args, minutes: float) -> None:
    """Put the measured figures between the README's train_sr markers."""
    replace_block(BEGIN, END, (
        f"| | HR@1 | invalid outputs | n |\n|---|---|---|---|\n"
        f"| before tuning | {before['hr@1']:.3f} | {before['invalid']:.1%} | {before['n']} |\n"
        f"| after tuning | {after['hr@1']:.3f} | {after['invalid']:.1%} | {after['n']} |\n\n"
        f"Measured {time.strftime('%Y-%m-%d')} with `torchrun --standalone --nproc_per_node={summary['world_size']} "
        f"examples/train_sr.py` on this project's 2-core CPU machine: {summary['steps']} steps, "
        f"{args.n_train} training records, {summary['tokens_per_s']:.0f} tokens/s, {minutes:.1f} minutes end to end "
        f"(chance HR@1 is 0.05)."
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="checkpoint directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default="", help="ECInstruct directory (train.json, validation.json, test.json)")
    parser.add_argument("--out", default="runs/train_sr")
    parser.add_argument("--n-train", type=int, default=320, help="synthetic training records")
    parser.add_argument("--n-test", type=int, default=100, help="held-out records scored before and after")
    parser.add_argument("--max-steps", type=int, default=0, help="stop training after this many steps (0: all)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--curve-every", type=int, default=0,
                        help="checkpoint every N steps, then score each checkpoint: HR@1 against examples and minutes")
    parser.add_argument("--no-readme", action="store_true", help="do not write the figures into README.md")
    args = parser.parse_args()
    start = time.perf_counter()

    d = setup_distributed()
    out = Path(args.out)
    synthetic = not args.data
    data = args.data or str(out / "data")
    if synthetic and d.main:
        write_dataset(data, n_per_task=args.n_train, n_eval_per_task=args.n_test, seed=args.seed, tasks=["SR"])
    d.barrier()

    recipe = DEMO if not args.model and synthetic else {}
    config = TrainConfig(model=args.model, data=data, out=str(out / "run"), tasks="SR", seed=args.seed, **recipe)
    if args.lr is not None:
        config = dataclasses.replace(config, lr=args.lr)
    if args.max_steps:
        config = dataclasses.replace(config, max_steps=args.max_steps)
    if args.curve_every:
        config = dataclasses.replace(config, checkpoint_every=args.curve_every, keep_checkpoints=0)
    if not config.model:
        from ecellm.models.default import default_model_dir

        config = dataclasses.replace(config, model=str(default_model_dir()))
    test_file = next((p for p in (Path(data) / "test.json", Path(data) / "test.jsonl") if p.is_file()), None)
    if test_file is None:
        raise FileNotFoundError(f"no test.json or test.jsonl in {data} (held-out records to score HR@1 on)")
    records = list(load_records(test_file, split="test", setting="IND_Diverse_Instruction", tasks=["SR"]))
    records = records[: args.n_test]
    family = json.loads((Path(config.model) / "config.json").read_text())["model_type"]
    template = "mistral" if family == "mistral" else "alpaca"

    before = hr_at_1(config.model, None, records, d.rank, d.world, template)
    summary = train(config)
    after = hr_at_1(config.model, str(out / "run" / "best_adapter"), records, d.rank, d.world, template)
    minutes = (time.perf_counter() - start) / 60
    curve = learning_curve(out / "run", config.model, records, d, template, before) if args.curve_every else None

    if d.main:
        result = {"before": before, "after": after, "train": summary, "minutes": minutes, "config": vars(args),
                  "curve": curve}
        (out / "results.json").write_text(json.dumps(result, indent=2))
        print(f"\nSequential recommendation, {len(records)} held-out records (chance HR@1 = 0.05):")
        print(f"  before tuning: HR@1 {before['hr@1']:.3f}, invalid {before['invalid']:.1%}")
        print(f"  after tuning:  HR@1 {after['hr@1']:.3f}, invalid {after['invalid']:.1%}")
        print(f"  {summary['steps']} steps, {minutes:.1f} minutes end to end; results in {out / 'results.json'}")
        if curve:
            table = "| training examples | minutes of training | HR@1 | invalid |\n|---|---|---|---|\n" + "\n".join(
                f"| {r['examples']} | {r['minutes']:.1f} | {r['hr@1']:.3f} | {r['invalid']:.1%} |" for r in curve
            )
            print("\nLearning curve:\n" + table)
        if synthetic and not args.model and not args.no_readme:
            if curve:
                replace_block(CURVE_BEGIN, CURVE_END, table + (
                    f"\n\nMeasured {time.strftime('%Y-%m-%d')} with `torchrun --standalone --nproc_per_node={d.world} "
                    f"examples/train_sr.py --n-train {args.n_train} --curve-every {args.curve_every}"
                    + (f" --lr {args.lr}" if args.lr else "") + "` on the 2-core CPU machine."))
            else:
                write_readme(before, after, summary, args, minutes)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
