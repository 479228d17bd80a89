"""Tune one model with LoRA on all 10 ECInstruct tasks at once and score every task before and after tuning.

    torchrun --standalone --nproc_per_node=2 examples/train_generalist.py      (or: python examples/train_generalist.py)

With no argument it tunes the embedded default, SmolLM2-135M-Instruct, on a synthetic set of all 10 tasks (seeded,
written to `<out>/data`; validation and test records use names held out from training) with the demo recipe below,
sized to finish within 60 minutes on a 2-core CPU (training stops at 49 minutes at the latest, then about 8 minutes of
evaluation follow). Training runs in phases, each from the previous phase's adapter: first SR alone on records with 2,
4, then 8 options (`--sr-phases`; the main job's curriculum, without which SR's look-up is not learned), then PSI
alone at a lower learning rate (`--focus-phase`; in the mix it stays at chance), then the mix of all tasks
(`<out>/run/sr_phase<i>`, `<out>/run/focus`, then `<out>/run/mix`). For each task it reports the paper's metric on
held-out test records before tuning, after tuning and for a trivial baseline, with the share of invalid answers, in two
settings: the training instructions (`IND_Diverse_Instruction`) and an instruction never used in training
(`IND_Unseen_Instruction`: each task's `TaskInfo.unseen_instruction`). Everything goes to the run folder (`--out`,
default `~/ecellm-runs/train_generalist-<date>-<time>`): `results.json`, `results.md` (the tables to paste, with the
command, machine and date), `generations.jsonl` (every answer), the synthetic data and the training run. Nothing is
written into the repository.

How the figures are read (examples/scoring.py has the baselines, the standard errors and "clearly above"):
- AG's F_BERT embeds with all-MiniLM-L6-v2 (layer 6), before and after (`--bertscore-model model`: the untuned
  model's hidden states, the older score; one encoder either way, so the two compare).
- Answers are decoded greedily, with a per-task limit on new tokens (the longest training answer + 2; 4 for the
  option tasks, which are scored on their first letter), to keep evaluation short.

`--model DIR --data DIR` switch to your checkpoint and the real ECInstruct files (train.json, validation.json,
test.json); the reference code's recipe (`ecellm.train.TrainConfig` defaults) is then the default instead of the demo
recipe. QPR's test records then need their options' ESCI labels (an `esci_labels` field).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch.distributed as dist

from ecellm.data import load_records
from ecellm.eval import select_records
from ecellm.models.default import MODELS, resolve_model
from ecellm.synthetic import write_dataset
from ecellm.tasks import TASKS, task_info
from ecellm.train import TrainConfig, setup_distributed

from common import (
    add_bertscore_flag,
    ag_encoder,
    by_task,
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
from phases import parse_phases, train_phases, write_sr_phase_data
from scoring import (
    BOOTSTRAP_RESAMPLES,
    MIN_GAIN,
    answer_budgets,
    compare,
    data_file,
    generation_lines,
    task_table,
)

# The demo recipe for the embedded default on a 2-core CPU: fp32, a 20x higher learning rate than the paper's, small
# global batches (many updates), one epoch; each step's examples packed into one row per rank (no padding). Training
# stops after 49 minutes at the latest (then validates, writes its adapter and the evaluation follows), so that the run
# ends within 60 minutes on a 2-core AMD EPYC, the slower of the machines we measured on.
DEMO = dict(
    lr=2e-3, lora_r=16, lora_alpha=32.0, lora_dropout=0.05, epochs=1, global_batch=8, micro_batch=4,
    pack_tokens=2048, max_len=512, dtype="fp32", warmup_ratio=0.05, eval_every=0, checkpoint_every=50,
    max_val_examples=32, minutes=49.0, reshard_after_forward=False,  # one all-gather a step: same updates, faster
)
# SR's look-up is learned only through a curriculum on the number of options (examples/train_sr.py,
# docs/sr_recipe.md), so training starts with the main job's phases on SR alone (2, 4, then 8 options per record).
SR_PHASES = "2:480,4:240,8:240"
# The four tasks that judge whether two texts match (PM and PSI: two products; MPC and QPR: a query and titles) stay
# at chance in the mix: alone, each needs 100-200 optimizer steps of its own at lr 1e-3 or less before its loss drops,
# and tuned together they share those steps (four together for 200 steps: all at chance; README). The hour affords one:
# PSI, the quickest (~100 steps alone), gets a phase of its own between the SR warm-up and the mix (`--focus-phase`).
FOCUS_PHASE = "PSI:1200:1e-3"  # TASKS (joined by +):RECORDS per task[:LR]
# Sizing, measured on a 2-core AMD EPYC (no AVX-512) with SmolLM2's tokenizer (2 ranks, fp32): the SR warm-up takes
# about 13 minutes, the PSI phase 13.5 (150 steps of 5.4 s: short examples, 97 tokens, so the per-step cost counts);
# a mixed step takes about 6.5 s (158 tokens an example on average, PSI 97 ... SR 265), so 165 records per task (206
# steps) take about 22.5 minutes. An answer costs about 0.6 s of one core (mostly the prompt's forward pass, with the
# answer limits below), so the 40 test records per task x 10 tasks x 2 settings, before and after (1600 answers),
# take about 8 minutes on 2 ranks. With 140 records per task SA stayed at chance (macro F1 0.15; README).
N_TRAIN, N_TEST = 165, 40
# results.json key -> the setting its test records are scored in
SETTINGS = {"tasks": "IND_Diverse_Instruction", "unseen_instruction": "IND_Unseen_Instruction"}


def results_markdown(results: dict) -> str:
    """Both tables, how they were measured, and the baselines' answers.

    Args:
        results: what results.json holds.
    """
    n = results["n_test_per_task"]
    tasks = "all tasks" if len(results["tasks"]) == len(TASKS) else "tasks " + ", ".join(results["tasks"])
    stopped = f"(training ended early: {results['stopped']}) " if results["stopped"] else ""
    warmup = "".join(f"{p['records']} SR records with {p['options']} options, then " for p in results["sr_phases"])
    if results["focus_phase"]:
        f = results["focus_phase"]
        warmup += f"{f['records']} records each of {', '.join(f['tasks'])} at lr {f['lr']:g}, then "
    baselines = "; ".join(f"{abbr} {t['baseline_answer']}" for abbr, t in results["tasks"].items())
    return "\n".join([
        f"Training instructions (IND_Diverse_Instruction), {n} held-out test records per task:", "",
        task_table(results["tasks"]),
        f"Instructions never seen in training (IND_Unseen_Instruction), the same {n} records per task:", "",
        task_table(results["unseen_instruction"]),
        f"Measured {results['date']} with `{results['command']}` on {results['machine']}: {results['steps']} steps "
        f"{stopped}of global batch {results['global_batch']} ({warmup}{results['n_train']} training records, {tasks}), "
        f"{results['tokens_per_s']:.0f} tokens/s, {results['minutes']:.1f} minutes end to end (evaluation "
        f"{results['timings_s']['evaluation'] / 60:.1f}, training {results['timings_s']['training'] / 60:.1f}).", "",
        "After: ± one standard error over the test records (std / sqrt(n) of per-record scores for HR@1, accuracy, "
        f"NDCG and F_BERT; the standard deviation over {BOOTSTRAP_RESAMPLES} bootstrap resamples, seed 0, for F1 and "
        "macro F1). Clearly above: after exceeds both before and the baseline by more than 2 standard errors and by "
        f"at least {MIN_GAIN}. "
        f"Baselines: {baselines}. AG's F_BERT embeds with "
        f"{results['bertscore_encoder']}.", "",
    ])


# --- the phases before the mix ----------------------------------------------------------------------------------------
def focus_phase(args: argparse.Namespace, tasks: list[str] | None) -> dict | None:
    """The phase on a few tasks alone after the SR warm-up and before the mix: {"tasks", "records" (per task), "lr"
    (None: the run's)} from `--focus-phase`, or `FOCUS_PHASE` on synthetic data (its tasks among `tasks`); None with
    `--focus-phase none` or when `--tasks` leaves out the default's tasks.

    Args:
        args: the command line (`focus_phase`, `data`).
        tasks: the `--tasks` list, or None for all.
    """
    text = args.focus_phase
    if text is not None and args.data and text != "none":
        raise SystemExit("--focus-phase needs the synthetic data (it writes its own records of its tasks); leave it "
                         "out with --data")
    if text == "none" or (text is None and args.data):
        return None
    fields = (text or FOCUS_PHASE).split(":")
    try:
        names = [task_info(t).abbr for t in fields[0].split("+")]
        records, lr = int(fields[1]), (float(fields[2]) if len(fields) == 3 else None)
    except (ValueError, IndexError):  # task_info raises ValueError for an unknown task
        names, records, lr = [], 0, None
    if not names or len(fields) > 3 or records < 1 or (lr is not None and lr <= 0):
        raise SystemExit(f"--focus-phase: {text!r} is not TASKS:RECORDS or TASKS:RECORDS:LR (task abbreviations "
                         "joined by +, RECORDS >= 1 and LR > 0; e.g. PSI+PM:400:1e-3), nor 'none'")
    kept = None if tasks is None else {task_info(x).abbr for x in tasks}
    chosen = names if kept is None else [t for t in names if t in kept]
    if text is not None and chosen != names:
        raise SystemExit(f"--focus-phase: {', '.join(sorted(set(names) - set(chosen)))} not among --tasks")
    return {"tasks": chosen, "records": records, "lr": lr} if chosen else None


def warmup_phases(args: argparse.Namespace, tasks: list[str] | None) -> list[tuple[int, int, float | None]]:
    """The SR warm-up phases to train before the mix (`parse_phases`'s form): `--sr-phases`, or `SR_PHASES` on
    synthetic data; none when the tasks leave SR out or with `--sr-phases none`.

    Args:
        args: the command line (`sr_phases`, `data`).
        tasks: the `--tasks` list, or None for all.
    """
    if args.sr_phases is not None and args.data and args.sr_phases != "none":
        raise SystemExit("--sr-phases needs the synthetic data (the warm-up writes SR records with fewer options); "
                         "leave it out with --data")
    text = args.sr_phases if args.sr_phases is not None else ("none" if args.data else SR_PHASES)
    if text == "none" or (tasks is not None and "SR" not in {task_info(t).abbr for t in tasks}):
        return []
    return parse_phases(text, "--sr-phases")


# --- the run ------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The command line: every flag with its words and its default (`--help`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="",
                        help=f"checkpoint directory or a real model's name ({', '.join(MODELS)}; default: the "
                             "embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default="", help="ECInstruct directory (train.json, validation.json, test.json; "
                                                   "default: a synthetic set of every task written to <out>/data)")
    parser.add_argument("--out", default="",
                        help="run folder (default: $ECELLM_RUNS or ~/ecellm-runs, then train_generalist-<date>-<time>)")
    parser.add_argument("--tasks", default="",
                        help="comma-separated task abbreviations to tune on and score (default: all 10)")
    parser.add_argument("--n-train", type=int, default=N_TRAIN,
                        help="synthetic training records per task (default: %(default)s)")
    parser.add_argument("--sr-phases", default=None,
                        help="SR warm-up before the mix of all tasks: OPTIONS:RECORDS[:LR] per phase, comma-separated, "
                             "each phase on synthetic SR records with that many options (default: "
                             f"{SR_PHASES} on synthetic data; 'none' to start with the mix)")
    parser.add_argument("--focus-phase", default=None,
                        help="a phase on a few tasks alone, after the SR warm-up and before the mix: "
                             "TASKS:RECORDS[:LR] with task abbreviations joined by + and RECORDS per task (default: "
                             f"{FOCUS_PHASE} on synthetic data; 'none' to go straight to the mix)")
    parser.add_argument("--n-test", type=int, default=N_TEST,
                        help="held-out records per task scored before and after (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="stop each training phase after this many steps (default: %(default)s, all)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop training after this many minutes, then evaluate; 0: no limit (default: the demo "
                             f"recipe's {DEMO['minutes']:g}, none with --model DIR or --data)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"learning rate of the mix (default: the demo recipe's {DEMO['lr']:g}; the reference's "
                             f"{TrainConfig.lr:g} with --model DIR or --data)")
    parser.add_argument("--global-batch", type=int, default=None,
                        help=f"examples per optimizer step (default: the demo recipe's {DEMO['global_batch']}; the "
                             f"reference's {TrainConfig.global_batch} with --model DIR or --data)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the synthetic data, the LoRA initialisation and the data order "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="prompts per generation batch (default: %(default)s)")
    add_bertscore_flag(parser)
    return parser


def load_test_sets(data: str, n_test: int, tasks: list[str] | None = None) -> dict[str, list[dict]]:
    """results.json key -> the first `n_test` test records per task in its setting (built from the diverse-instruction
    records by `ecellm.eval.derive_setting` when the data lacks it).

    Args:
        data: the ECInstruct directory.
        n_test: records per task.
        tasks: the tasks to keep (None: all).
    """
    records = load_records(data_file(data, "test"), split="test", tasks=tasks)
    return {key: select_records(records, [setting], limit=n_test) for key, setting in SETTINGS.items()}


def main() -> None:
    args = build_parser().parse_args()
    start = time.perf_counter()
    d = setup_distributed(TrainConfig().dist_timeout_s)
    out = Path(args.out) if args.out else default_out(d, "train_generalist")
    synthetic = not args.data
    data = args.data or str(out / "data")
    tasks = args.tasks.split(",") if args.tasks else None
    sr_phases = warmup_phases(args, tasks)
    focus = focus_phase(args, tasks)
    if synthetic and d.is_main:
        write_dataset(data, n_per_task=args.n_train, n_eval_per_task=args.n_test, seed=args.seed, tasks=tasks)
        write_sr_phase_data([out / "data" / f"sr_phase{i}" for i in range(1, len(sr_phases) + 1)], sr_phases,
                            args.seed + 2, args.seed)
        if focus:
            write_dataset(out / "data" / "focus", n_per_task=focus["records"], n_eval_per_task=8, seed=args.seed + 1,
                          tasks=focus["tasks"], names_seed=args.seed)
    d.barrier()

    recipe = DEMO if (not args.model or args.model in MODELS) and synthetic else {}  # the demo recipe by name too
    config = TrainConfig(model=args.model, tasks=args.tasks, seed=args.seed, **recipe)
    if args.lr is not None:
        config = dataclasses.replace(config, lr=args.lr)
    if args.global_batch is not None:
        config = dataclasses.replace(config, global_batch=args.global_batch)
    if args.max_steps:
        config = dataclasses.replace(config, max_steps=args.max_steps)
    if args.minutes is not None:
        config = dataclasses.replace(config, minutes=args.minutes)
    config = dataclasses.replace(config, model=str(resolve_model(config.model)))  # a folder, a name or the default
    template = template_for(config.model)
    tests = load_test_sets(data, args.n_test, tasks)
    train_records = load_records(data_file(data, "train"), split="train", setting=SETTINGS["tasks"], tasks=tasks)

    base, tokenizer = load_model(config.model)
    base = for_generation(base, d.device)  # a CUDA rank generates on its GPU, in bfloat16
    encoder = ag_encoder(args.bertscore_model, base, tokenizer, d.device, args.batch_size, tasks)
    budgets = answer_budgets(train_records, tokenizer)
    timings = {"setup": time.perf_counter() - start}
    clock = time.perf_counter()
    before = evaluate_sets(base, tokenizer, tests, template, budgets, encoder=encoder,
                           batch_size=args.batch_size, desc="before tuning")
    timings["before"], clock = time.perf_counter() - clock, time.perf_counter()
    phases = [(out / "data" / f"sr_phase{i}", out / "run" / f"sr_phase{i}", lr)
              for i, (_, _, lr) in enumerate(sr_phases, 1)]
    if focus:
        phases.append((out / "data" / "focus", out / "run" / "focus", focus["lr"]))
    phases.append((data, out / "run" / ("mix" if phases else ""), None))
    done = train_phases(config, phases, config.minutes)
    timings["training"], clock = time.perf_counter() - clock, time.perf_counter()
    adapter = done["adapter"]
    tuned = for_generation(load_model(config.model, adapter)[0], d.device)
    after = evaluate_sets(tuned, tokenizer, tests, template, budgets, encoder=encoder,
                          batch_size=args.batch_size, desc="after tuning")
    timings["after"] = time.perf_counter() - clock
    timings["evaluation"] = timings["before"] + timings["after"]

    if d.is_main:
        tables = {key: compare(before[key], after[key], tests[key], train_records, encoder) for key in SETTINGS}
        results = {
            "minutes": (time.perf_counter() - start) / 60, **tables,
            "improved": {key: sum(t["clearly_above"] for t in table.values()) for key, table in tables.items()},
            "steps": done["steps"], "global_batch": config.global_batch, "stopped": done["stopped"],
            "tokens_per_s": done["tokens"] / max(done["seconds"], 1e-9), "training_minutes": done["seconds"] / 60,
            "sr_phases": [{"options": o, "records": n, "lr": lr or config.lr} for o, n, lr in sr_phases],
            "focus_phase": focus and {**focus, "lr": focus["lr"] or config.lr},
            "n_train": sum(min(len(g), config.max_per_task) for g in by_task(train_records).values()),
            "n_test_per_task": args.n_test,
            "max_new_tokens": budgets, "adapter": str(adapter), "timings_s": timings,
            "bertscore_encoder": encoder.name if encoder else None,
            "recipe": recipe, "args": vars(args), "date": time.strftime("%Y-%m-%d"), "machine": machine(),
            "world_size": d.world, "command": shlex.join(launcher(d.world) + sys.argv),
        }
        write_results(out, results, results_markdown(results))
        mean = {stage: statistics.mean(r[r["metric"]] for r in table.values())
                for stage, table in (("before", before["tasks"]), ("after", after["tasks"]))}
        plotted = write_curve(out / "curve.png", training_losses(done["run_dirs"]),
                              [(0.0, mean["before"]), (done["seconds"] / 60, mean["after"])],
                              "mean metric over the tasks")
        generations = [line for stage, evaluation in (("before", before), ("after", after)) for key in SETTINGS
                       for line in generation_lines(stage, SETTINGS[key], evaluation[key], tests[key])]
        (out / "generations.jsonl").write_text("\n".join(generations) + "\n")
        print("\n" + results_markdown(results))
        print(f"results: {out / 'results.json'} and {out / 'results.md'}"
              + (f", curve: {out / 'curve.png'}" if plotted else " (pip install -e '.[plot]' for curve.png)"))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
