"""Fine-tune a model with LoRA on Sequential Recommendation (SR) and measure HR@1 before and after.

    torchrun --standalone --nproc_per_node=2 examples/train_sr.py

With no argument it tunes the embedded default, SmolLM2-135M-Instruct, on synthetic SR records (seeded, written to
`<out>/data`) with the demo recipe below, then reports HR@1 and the share of invalid outputs on 100 held-out records
(20 options each, names never seen in training), before and after tuning. Everything goes to the run folder (`--out`,
default `~/ecellm-runs/train_sr-<date>-<time>`): `results.json`, `results.md` (the table to paste, with the command,
machine and date), `curve.png` where matplotlib is installed, the synthetic data and the training runs. Nothing is
written into the repository.

The demo trains in phases, a curriculum on the number of options (docs/sr_recipe.md has every recipe we tried): 2
options per record until the model has learned to find the option that continues the last purchase (the loss sits at
chance for ~25-50 steps, then falls), then 4, 8 and 20 at a quarter of the learning rate (at the full rate the first
steps of a new phase can undo the look-up), each phase starting from the previous phase's adapter and ending early
once it is learned (the mean loss of its last 5 steps below `--stop-at-loss`, 0.05), each step's examples packed into
one row per rank. The default job ends within 15 minutes end to end on a 2-core CPU: `--minutes` (default 15 for the
default demo) caps the whole job, from start to the printed table, and training gets what setup and the two
evaluations leave (the evaluation after tuning is estimated from the one before it), about 11-12 minutes on a 2-core
AMD EPYC; later phases are then cut or skipped, and the results say so (0: no cap).

`--model DIR --data DIR` switch to your checkpoint (any supported family) and the real ECInstruct files; the
reference code's recipe (`ecellm.train.TrainConfig` defaults; see the README's "Differences from the reference code")
is then the default instead of the demo recipe.

The demo recipe differs from the paper's on purpose: 2-core CPUs train ~150 tokens/s, so it uses short synthetic
prompts, a 20x higher learning rate, small global batches (many updates), fp32, one epoch per phase, and the
curriculum.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import shlex
import sys
import time
from pathlib import Path

import torch.distributed as dist

from ecellm.data import load_records
from ecellm.models.default import MODELS, resolve_model
from ecellm.synthetic import write_dataset
from ecellm.train import TrainConfig, setup_distributed

from common import (
    default_out,
    evaluate_sets,
    for_generation,
    launcher,
    load_model,
    machine,
    template_for,
    write_results,
)
from curve import training_losses, write_curve
from phases import parse_phases, train_phases, training_minutes, write_sr_phase_data

# The demo recipe for the embedded default on a 2-core CPU (see the module docstring): options:records[:lr] per phase;
# a phase ends early once its mean loss over 5 steps is below stop_at_loss.
DEFAULT_PHASES = "2:480,4:240:5e-4,8:240:5e-4,20:240:5e-4"
DEFAULT_MINUTES = 15.0  # the default demo's budget, end to end (setup, evaluations and training together)
TAIL_S = 60.0  # reserved after training's cap: the step it cuts into, the final validation, saving, loading the adapter
DEMO = dict(
    lr=2e-3, lora_r=16, lora_alpha=32.0, lora_dropout=0.05, epochs=1, global_batch=8, micro_batch=4,
    pack_tokens=2048, max_len=512, dtype="fp32", warmup_ratio=0.05, eval_every=0, checkpoint_every=25,
    max_val_examples=32, stop_at_loss=0.05, reshard_after_forward=False,
)


SR_ANSWER_TOKENS = 8  # an SR answer is one option letter


def hr_at_1(model_dir: str, adapter: str | None, records: list[dict], template: str, device) -> dict:
    """HR@1 and invalid share on `records` (generation shared over the ranks, each on its device; scored on every
    rank)."""
    model, tokenizer = load_model(model_dir, adapter)
    model = for_generation(model, device)
    return evaluate_sets(model, tokenizer, {"SR": records}, template, SR_ANSWER_TOKENS, desc="HR@1")["SR"]["SR"]


def chance_hr_at_1(records: list[dict]) -> float:
    """HR@1 of a uniform guess: the mean over records of 1 / number of options."""
    return sum(1 / len(ast.literal_eval(r["options"])) for r in records) / len(records)


def phase_run(phase: dict) -> str:
    """" (38 of 60 steps, loss reached)", or " (skipped)" for a phase the time limit left out."""
    if "steps" not in phase:
        return " (skipped)"
    return f" ({phase['steps']} of {phase['planned']} steps{', ' + phase['ended'] if phase['ended'] else ''})"


def results_markdown(results: dict) -> str:
    """The before/after table, the curve if any, and how they were measured."""
    sr = results["tasks"]["SR"]
    lines = [
        "| | HR@1 | invalid outputs | n |", "|---|---|---|---|",
        f"| before tuning | {sr['before']['hr@1']:.3f} | {sr['before']['invalid']:.1%} | {sr['before']['n']} |",
        f"| after tuning | {sr['after']['hr@1']:.3f} | {sr['after']['invalid']:.1%} | {sr['after']['n']} |",
        f"| chance | {sr['baseline']:.3f} | | |", "",
        f"Measured {results['date']} with `{results['command']}` on {results['machine']}: {results['steps']} steps "
        f"of global batch {results['global_batch']} in {results['training_minutes']:.1f} minutes of training "
        f"({results['tokens_per_s']:.0f} tokens/s), {results['minutes']:.1f} minutes end to end (setup "
        f"{results['timings_s']['setup'] / 60:.1f}, training {results['timings_s']['training'] / 60:.1f}, evaluation "
        f"{results['timings_s']['evaluation'] / 60:.1f})."
        + (" Phases (options: records @ learning rate, steps run of planned and why the phase ended): " + ", ".join(
            f"{p['options']}: {p['records']} @ {p['lr']:g}" + phase_run(p) for p in results["phases"]) + "."
           if results["phases"] else "")
        + (f" Training ended early: {results['stopped']}." if results["stopped"] else ""),
    ]
    if len(results["curve"]) > 1:
        lines += ["", "HR@1 on the 20-option test records after each phase:", "",
                  "| after phase | options in training | steps | training examples | minutes of training | HR@1 | "
                  "invalid |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['phase']} | {r['options']} | {r['steps']} | {r['examples']} | {r['minutes']:.1f} | "
                  f"{r['hr@1']:.3f} | {r['invalid']:.1%} |" for r in results["curve"]]
    return "\n".join(lines) + "\n"


def write_synthetic_data(out: Path, phases: list[tuple[int, int, float | None]], n_test: int, seed: int) -> None:
    """`out/data/test` (20 options, held-out names) and one `out/data/phase<i>` per phase (its number of options;
    drawn with seed + i, the names split by `seed`, so no training record names a test record's items)."""
    write_dataset(out / "data" / "test", n_per_task=1, n_eval_per_task=n_test, seed=seed, tasks=["SR"])
    write_sr_phase_data([out / "data" / f"phase{i}" for i in range(1, len(phases) + 1)], phases, seed + 1, seed)


def job_minutes(args: argparse.Namespace) -> float:
    """The whole job's time budget in minutes (0: none): `--minutes` when given, else `DEFAULT_MINUTES` for the default
    demo (the embedded model, the default phases) and no budget otherwise."""
    if args.minutes is not None:
        return args.minutes
    return DEFAULT_MINUTES if args.phases == DEFAULT_PHASES and not args.model and not args.data else 0.0


def build_parser() -> argparse.ArgumentParser:
    """The command line: every flag with its words and its default (`--help`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="",
                        help=f"checkpoint directory or a real model's name ({', '.join(MODELS)}; default: the "
                             "embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default="", help="ECInstruct directory (train.json, validation.json, test.json; "
                                                   "default: synthetic SR records written to <out>/data)")
    parser.add_argument("--out", default="",
                        help="run folder (default: $ECELLM_RUNS or ~/ecellm-runs, then train_sr-<date>-<time>)")
    parser.add_argument("--phases", default=DEFAULT_PHASES,
                        help="synthetic curriculum: OPTIONS:RECORDS[:LR] per phase, comma-separated (default: "
                             "%(default)s); each phase trains from the previous one's adapter on records with that "
                             "many options, at its own learning rate if given")
    parser.add_argument("--n-test", type=int, default=100,
                        help="held-out SR records (20 options each) scored before and after (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="the whole job's budget in minutes, from start to the printed table: training stops "
                             "in time for the evaluation after it (0: no limit; default: "
                             f"{DEFAULT_MINUTES:g} with the default phases, else none)")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="stop each phase after this many steps (default: %(default)s, all)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"learning rate of the phases that set none (default: the demo recipe's {DEMO['lr']:g}; "
                             f"the reference's {TrainConfig.lr:g} with --model DIR or --data)")
    parser.add_argument("--lora-r", type=int, default=None,
                        help=f"LoRA rank (default: {DEMO['lora_r']}, the demo recipe's and the reference's)")
    parser.add_argument("--lora-targets", default=None, help="comma-separated module names (default: the paper's)")
    parser.add_argument("--stop-at-loss", type=float, default=None,
                        help="end a phase once the mean loss of its last 5 steps is below this; the next phase starts "
                             f"(default: the demo recipe's {DEMO['stop_at_loss']:g}; 0: every phase runs to its end)")
    parser.add_argument("--pack", type=int, default=None,
                        help="pack each step's examples into rows of up to N tokens; 0: padded micro-batches "
                             f"(default: the demo recipe's {DEMO['pack_tokens']}, or the reference's 0)")
    parser.add_argument("--init-adapter", default="",
                        help="start from this adapter, same r, alpha and targets (default: a fresh LoRA)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the synthetic data, the LoRA initialisation and the data order "
                             "(default: %(default)s)")
    parser.add_argument("--score-phases", action="store_true",
                        help="score the test records after every phase, not only the last, for a curve by phase "
                             "(default: off)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    args.minutes = job_minutes(args)
    start = time.perf_counter()

    d = setup_distributed(TrainConfig().dist_timeout_s)
    out = Path(args.out) if args.out else default_out(d, "train_sr")
    synthetic = not args.data
    phases = parse_phases(args.phases) if synthetic else [(0, 0, None)]
    if synthetic and d.is_main:
        write_synthetic_data(out, phases, args.n_test, args.seed)
    d.barrier()
    data_dirs = [str(out / "data" / f"phase{i}") for i in range(1, len(phases) + 1)] if synthetic else [args.data]
    test_dir = out / "data" / "test" if synthetic else Path(args.data)

    demo = (not args.model or args.model in MODELS) and synthetic  # the demo recipe also for a model by name
    overrides = {k: v for k, v in (("lr", args.lr), ("lora_r", args.lora_r), ("lora_targets", args.lora_targets),
                                   ("pack_tokens", args.pack), ("stop_at_loss", args.stop_at_loss)) if v is not None}
    base = TrainConfig(model=args.model, tasks="SR", seed=args.seed, max_steps=args.max_steps,
                       **{**(DEMO if demo else {}), **overrides})
    base = dataclasses.replace(base, model=str(resolve_model(base.model)))  # a folder, a name or the default
    test_file = next((p for p in (test_dir / "test.json", test_dir / "test.jsonl") if p.is_file()), None)
    if test_file is None:
        raise FileNotFoundError(f"no test.json or test.jsonl in {test_dir} (held-out records to score HR@1 on)")
    records = list(load_records(test_file, split="test", setting="IND_Diverse_Instruction", tasks=["SR"]))
    records = records[: args.n_test]
    template = template_for(base.model)

    def score_adapter(adapter: str | None) -> dict:
        return hr_at_1(base.model, adapter, records, template, d.device)

    clock = time.perf_counter()
    before = score_adapter(args.init_adapter or None)
    timings = {"setup": clock - start, "evaluation": time.perf_counter() - clock}
    evaluations_left = 1 + (len(phases) - 1 if args.score_phases else 0)
    training_cap = training_minutes(args.minutes, start, timings["evaluation"], evaluations_left, TAIL_S)
    run_dirs = [out / "run" / f"phase{i}" for i in range(1, len(phases) + 1)] if synthetic else [out / "run"]
    scored_phases = []

    def score_phase(i: int, done: dict) -> None:
        clock = time.perf_counter()
        scored = score_adapter(done["adapter"])
        timings["evaluation"] += time.perf_counter() - clock
        scored_phases.append({"phase": i, "options": phases[i - 1][0], "steps": done["steps"],
                              "examples": done["steps"] * base.global_batch, "minutes": done["seconds"] / 60,
                              "hr@1": scored["hr@1"], "invalid": scored["invalid"]})
        if d.is_main:
            print(f"after phase {i} ({phases[i - 1][0]} options, {done['steps']} steps): HR@1 {scored['hr@1']:.3f}, "
                  f"invalid {scored['invalid']:.1%} on the 20-option test records", flush=True)

    clock, evaluated = time.perf_counter(), timings["evaluation"]
    done = train_phases(base, [(data, run, lr) for data, run, (_, _, lr) in zip(data_dirs, run_dirs, phases)],
                        training_cap, args.init_adapter, score_phase if args.score_phases else None)
    timings["training"] = time.perf_counter() - clock - (timings["evaluation"] - evaluated)
    clock = time.perf_counter()
    after = score_adapter(done["adapter"])
    timings["evaluation"] += time.perf_counter() - clock
    curve = [{"phase": 0, "options": None, "steps": 0, "examples": 0, "minutes": 0.0, "hr@1": before["hr@1"],
              "invalid": before["invalid"]}, *scored_phases,
             {"phase": done["last_phase"], "options": phases[done["last_phase"] - 1][0], "steps": done["steps"],
              "examples": done["steps"] * base.global_batch, "minutes": done["seconds"] / 60,
              "hr@1": after["hr@1"], "invalid": after["invalid"]}]
    minutes = (time.perf_counter() - start) / 60

    if d.is_main:
        results = {
            "minutes": minutes,
            "tasks": {"SR": {"metric": "hr@1", "before": before, "after": after,
                             "baseline": chance_hr_at_1(records)}},
            "steps": done["steps"], "global_batch": base.global_batch,
            "tokens_per_s": done["tokens"] / max(done["seconds"], 1e-9), "training_minutes": done["seconds"] / 60,
            "stopped": done["stopped"], "timings_s": timings, "training_cap_minutes": training_cap,
            "phases": [{"options": o, "records": n, "lr": lr or base.lr, **ran}
                       for (o, n, lr), ran in zip(phases, done["phase_steps"] + [{}] * len(phases))]
                      if synthetic else [],
            "curve": curve, "args": vars(args), "date": time.strftime("%Y-%m-%d"),
            "machine": machine(), "world_size": d.world,
            "command": shlex.join(launcher(d.world) + sys.argv),
        }
        write_results(out, results, results_markdown(results))
        plotted = write_curve(out / "curve.png", training_losses(done["run_dirs"]),
                              [(r["minutes"], r["hr@1"]) for r in curve], "HR@1 (20 options)")
        print(f"\nSequential recommendation, {len(records)} held-out records (chance HR@1 = "
              f"{results['tasks']['SR']['baseline']:.2f}):")
        print(f"  before tuning: HR@1 {before['hr@1']:.3f}, invalid {before['invalid']:.1%}")
        print(f"  after tuning:  HR@1 {after['hr@1']:.3f}, invalid {after['invalid']:.1%}")
        print(f"  {done['steps']} steps in {done['seconds'] / 60:.1f} minutes of training, {minutes:.1f} minutes end "
              f"to end (setup {timings['setup'] / 60:.1f}, evaluation {timings['evaluation'] / 60:.1f})"
              + (f"; training ended early: {done['stopped']}" if done["stopped"] else ""))
        print(f"  results: {out / 'results.json'} and {out / 'results.md'}"
              + (f", curve: {out / 'curve.png'}" if plotted else " (pip install -e '.[plot]' for curve.png)"))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
