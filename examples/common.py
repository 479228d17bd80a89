"""What the example scripts share: where a run goes and how it was made (machine, command), and an evaluation that
splits the generation over the ranks of a torchrun launch and scores each task with `ecellm.metrics.score`.

A script in this folder imports it as `from common import ...` (run as a script, its own folder is `sys.path[0]`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch.distributed as dist
from tqdm.auto import tqdm

from ecellm import models
from ecellm.data import parse_response
from ecellm.eval import build_prompt, references
from ecellm.files import write_json
from ecellm.generate import generate_text
from ecellm.lora import load_adapter, merge
from ecellm.metrics import ModelEncoder, score
from ecellm.models.config import read_config_file
from ecellm.models.default import resolve_model
from ecellm.synthetic import write_dataset
from ecellm.tasks import task_abbr
from ecellm.train import OUT_OF_TIME, TrainConfig, train


# --- provenance -----------------------------------------------------------------------------------------------
def machine() -> str:
    """CPU model and core count, for the results' provenance."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor())
    return f"{model}, {os.cpu_count()} cores"


def launcher(world: int) -> list[str]:
    """How this process was started (`torchrun ...` or `python`), for the results' command line.

    Args:
        world: the number of processes of the run.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return ["torchrun", "--standalone", f"--nproc_per_node={world}"]
    return ["python"]


def default_out(d, prefix: str) -> Path:
    """`$ECELLM_RUNS/<prefix>-<date>-<time>` (default root `~/ecellm-runs`), the same on every rank: a new folder
    each run, never inside the repository.

    Args:
        d: the run's `ecellm.train.DistContext` (rank 0's clock names the folder).
        prefix: the script's name, e.g. "train_generalist".
    """
    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    if d.world > 1:
        dist.broadcast_object_list(stamp, src=0)
    root = Path(os.environ.get("ECELLM_RUNS", Path.home() / "ecellm-runs"))
    return root / f"{prefix}-{stamp[0]}"


def write_results(out: Path, results: dict, markdown: str) -> None:
    """`out/results.json` (strict JSON: a non-finite number is written as null) and `out/results.md`."""
    write_json(out / "results.json", results, strict=True)
    (out / "results.md").write_text(markdown, encoding="utf-8")


# --- evaluation over the ranks ------------------------------------------------------------------------------------
def template_for(model_dir: str | Path) -> str:
    """The prompt template of a checkpoint directory (or a known model's name), as `ecellm.train` chooses it
    (`ecellm.models.template_for`)."""
    return models.template_for(read_config_file(resolve_model(model_dir)).get("model_type"))


def load_model(model_dir: str | Path, adapter: str | Path | None = None):
    """(model, tokenizer) in eval mode, fp32 on the CPU, with `adapter` (a PEFT-format directory) merged in.

    Args:
        model_dir: checkpoint directory, or a known model's name.
        adapter: LoRA adapter directory, or None for the model alone.
    """
    model, tokenizer = models.load_pretrained(model_dir)
    if adapter:
        model = merge(load_adapter(model, adapter))
    return model.eval(), tokenizer


def gather_in_order(mine: list, n: int, d) -> list:
    """Every rank's `records[rank::world]` results put back in record order, on every rank.

    Args:
        mine: this rank's results, for records rank, rank + world, ...
        n: the number of records in all.
        d: the run's `DistContext`.
    """
    gathered = [mine]
    if d.world > 1:
        gathered = [None] * d.world
        dist.all_gather_object(gathered, mine)
    ordered = [None] * n
    for rank, part in enumerate(gathered):
        ordered[rank::d.world] = part
    return ordered


def generate_split(model, tokenizer, records: Sequence[dict], d, template: str, max_new_tokens: int,
                   batch_size: int = 8, bar: tqdm | None = None) -> list[str]:
    """Greedy answers to `records`, each rank generating for its share (`records[rank::world]`); every rank gets
    all the answers, in record order.

    Args:
        model, tokenizer: from `load_model`.
        records: ECInstruct records (any tasks and settings).
        d: the run's `DistContext`.
        template: "alpaca" or "mistral".
        max_new_tokens: most tokens generated per answer.
        batch_size: prompts per generation batch.
        bar: a progress bar to move on by each batch's records (rank 0's), or None.
    Returns:
        the answers: the text after the response marker (for T5 the generation itself), stripped.
    """
    mine = list(records[d.rank::d.world])
    prompts = [build_prompt(r, template) for r in mine]
    # Batches of similar lengths pad little: generate in order of prompt length, answer in record order.
    order = sorted(range(len(prompts)), key=lambda i: len(tokenizer.encode(prompts[i])))
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        chunk = [prompts[i] for i in rows]
        generations = generate_text(model, tokenizer, chunk, max_new_tokens=max_new_tokens, batch_size=batch_size)
        for i, p, g in zip(rows, chunk, generations):
            answers[i] = g.strip() if model.config.model_type == "t5" else parse_response(p + g, template)
        if bar is not None:
            bar.update(len(chunk))
    return gather_in_order(answers, len(records), d)


def score_task(task: str, predictions: Sequence[str], records: Sequence[dict], encoder=None) -> dict:
    """`ecellm.metrics.score` of one task's answers, with the share of invalid answers and the first five pairs.

    Args:
        task: the task (any spelling `ecellm.tasks.task_info` takes).
        predictions: the answers, aligned with `records`.
        records: that task's records, of one setting.
        encoder: AG's BERTScore encoder (`ecellm.metrics.ModelEncoder`); needed for AG only.
    """
    result = score(task, list(predictions), references(task, records), setting=records[0]["setting"],
                   encoder=encoder)
    result["invalid"] = result["n_failed"] / result["n"]
    result["examples"] = [{"prediction": p, "reference": r["output"]} for p, r in list(zip(predictions, records))[:5]]
    return result


def by_task(records: Sequence[dict]) -> dict[str, list[dict]]:
    """Task abbreviation -> that task's records, in the order the tasks first appear."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(task_abbr(r["task"]), []).append(r)
    return groups


def evaluate_split(model, tokenizer, records: Sequence[dict], d, template: str,
                   max_new_tokens: int | Mapping[str, int], *, batch_size: int = 8, encoder=None,
                   desc: str = "evaluate") -> dict[str, dict]:
    """Score `records` task by task, the generation split over the ranks (see `generate_split`); one progress bar
    on rank 0.

    Args:
        model, tokenizer: from `load_model`.
        records: test records of one setting, of one or more tasks.
        d: the run's `DistContext`.
        template: "alpaca" or "mistral".
        max_new_tokens: one limit for every task, or a limit per task abbreviation.
        batch_size: prompts per generation batch.
        encoder: AG's BERTScore encoder; default: a `ModelEncoder` of the evaluated model.
        desc: the progress bar's label.
    Returns:
        task abbreviation -> `score_task`'s result with the answers added under "predictions".
    """
    groups = by_task(records)
    bar = tqdm(total=sum(len(g[d.rank::d.world]) for g in groups.values()), desc=desc, unit="record",
               disable=not d.is_main, dynamic_ncols=True)
    results = {}
    for abbr, group in groups.items():
        bar.set_postfix(task=abbr)
        limit = max_new_tokens if isinstance(max_new_tokens, int) else max_new_tokens[abbr]
        predictions = generate_split(model, tokenizer, group, d, template, limit, batch_size, bar)
        if abbr == "AG" and encoder is None:
            encoder = ModelEncoder(model, tokenizer, batch_size=batch_size)
        results[abbr] = {**score_task(abbr, predictions, group, encoder), "predictions": predictions}
    bar.close()
    return results


def evaluate_settings(model, tokenizer, tests: Mapping[str, Sequence[dict]], settings: Mapping[str, str], d,
                      template: str, budgets: Mapping[str, int], encoder, batch_size: int,
                      stage: str) -> dict[str, dict]:
    """results.json key -> `evaluate_split`'s results of the model on that key's test records.

    Args:
        model, tokenizer: from `load_model`.
        tests: results.json key -> test records of one setting.
        settings: results.json key -> the setting's name (for the progress bars).
        d: the run's `DistContext`.
        template: "alpaca" or "mistral".
        budgets: most new tokens per task abbreviation.
        encoder: AG's BERTScore encoder.
        batch_size: prompts per generation batch.
        stage: "before" or "after", for the progress bars.
    """
    return {key: evaluate_split(model, tokenizer, records, d, template, budgets, batch_size=batch_size,
                                encoder=encoder, desc=f"{stage}, {settings[key]}")
            for key, records in tests.items()}


# --- training in phases (a curriculum) ----------------------------------------------------------------------------
def parse_phases(text: str, flag: str = "--phases") -> list[tuple[int, int, float | None]]:
    """"2:480,4:80:1e-3" -> [(2, 480, None), (4, 80, 0.001)]: SR options per record, training records and,
    optionally, the phase's learning rate (default: the run's).

    Args:
        text: the flag's value.
        flag: the flag's name, for the error message.
    """
    phases = []
    for part in text.split(","):
        fields = part.split(":")
        try:
            options, records = int(fields[0]), int(fields[1])
            lr = float(fields[2]) if len(fields) == 3 else None
        except (ValueError, IndexError):
            raise SystemExit(f"{flag}: {part!r} is not OPTIONS:RECORDS or OPTIONS:RECORDS:LR (e.g. 2:480)") from None
        if len(fields) > 3 or not 2 <= options <= 20 or records < 1 or (lr is not None and lr <= 0):
            raise SystemExit(f"{flag}: {part!r} needs 2 <= OPTIONS <= 20, RECORDS >= 1 and LR > 0")
        phases.append((options, records, lr))
    return phases


def write_sr_phase_data(dirs: Sequence[Path], phases: Sequence[tuple[int, int, float | None]], first_seed: int,
                        names_seed: int) -> None:
    """One synthetic SR set per phase (`parse_phases`'s form) with that phase's number of options: phase k (from 0)
    goes to `dirs[k]`, drawn with `first_seed + k`, the names split by `names_seed` (the test records' seed), so no
    training record names a test record's items.

    Args:
        dirs: each phase's data directory.
        phases: (options, records, lr) per phase.
        first_seed: the first phase's seed.
        names_seed: the seed of the split of names into training and held-out ones.
    """
    for k, (directory, (options, n_records, _)) in enumerate(zip(dirs, phases)):
        write_dataset(directory, n_per_task=n_records, n_eval_per_task=32, seed=first_seed + k, tasks=["SR"],
                      sr_options=options, names_seed=names_seed)


def phase_range(first: int, last: int) -> str:
    """"phase 3" or "phases 3-4"."""
    return f"phase {first}" if first == last else f"phases {first}-{last}"


def train_phases(base: TrainConfig, phases: Sequence[tuple[str, Path, float | None]], minutes: float,
                 init_adapter: str = "", after_phase: Callable[[int, dict], None] | None = None) -> dict:
    """Train phase after phase, each from the previous phase's adapter, within `minutes` of training in all.

    Args:
        base: the settings every phase shares.
        phases: (data directory, run directory, learning rate or None for the base's) of each phase, in order.
        minutes: the training time of all phases together (0: no limit); a phase that reaches it is cut short and the
            phases after it are skipped.
        init_adapter: the adapter the first phase starts from ("" for a fresh LoRA).
        after_phase: called with (phase number, the progress so far) after each phase but the last, unless the time
            limit ended training there (e.g. to score the adapter so far).
    Returns:
        {"adapter", "steps", "seconds", "tokens", "run_dirs", "stopped" (why training ended before its last planned
         step, or None), "last_phase" (the number of the last phase trained)}.
    """
    done = {"adapter": init_adapter, "steps": 0, "seconds": 0.0, "tokens": 0.0, "run_dirs": [], "stopped": None}
    for i, (data, run_dir, lr) in enumerate(phases, 1):
        minutes_left = minutes - done["seconds"] / 60 if minutes else 0.0
        if minutes and minutes_left <= 0:
            done["stopped"] = f"the {minutes:g}-minute time limit: {phase_range(i, len(phases))} skipped"
            break
        config = dataclasses.replace(base, data=str(data), out=str(run_dir), init_adapter=done["adapter"],
                                     minutes=minutes_left, lr=lr or base.lr)
        summary = train(config)
        done["run_dirs"].append(Path(run_dir))
        done["adapter"] = summary["adapter"]
        done["steps"] += summary["steps"]
        done["seconds"] += summary["elapsed_s"]
        done["tokens"] += summary["tokens_per_s"] * summary["elapsed_s"]
        done["last_phase"] = i
        if summary["stopped_by"] == OUT_OF_TIME:
            done["stopped"] = (f"the {minutes:g}-minute time limit, at step {summary['steps']} of "
                               f"{summary['total_steps']} of phase {i}"
                               + (f" ({phase_range(i + 1, len(phases))} skipped)" if i < len(phases) else ""))
        elif summary["stopped_by"] is not None:
            raise SystemExit(f"phase {i}: training stopped by {summary['stopped_by']} at step {summary['steps']}: no "
                             f"tuned adapter (its checkpoint is in {Path(run_dir) / 'checkpoints'})")
        if done["stopped"]:
            break
        if after_phase is not None and i < len(phases):
            after_phase(i, done)
    return done


# --- a time budget for the whole job -------------------------------------------------------------------------------
EVALUATION_SLACK = 1.5  # an evaluation after tuning may take this much longer than the same one before it (measured:
# 1.42x on a 2-core CPU whose load grew meanwhile)


def training_minutes(total_minutes: float, start: float, evaluation_s: float, evaluations_left: int,
                     tail_s: float, slack: float = EVALUATION_SLACK) -> float:
    """The training time that keeps a job within `total_minutes` from `start` to its printed table: what is left after
    the time spent so far, the evaluations still to come (each estimated from the one already measured, with
    `slack`) and `tail_s` for what follows the last training step (the step the cap cuts into, the final
    validation, writing the adapter, loading it).

    Args:
        total_minutes: the whole job's budget (0: none, and training is not capped either).
        start: `time.perf_counter()` at the job's start.
        evaluation_s: seconds the evaluation before tuning took.
        evaluations_left: evaluations of the same size still to run after training.
        tail_s: seconds reserved after training's cap.
        slack: how much longer than the one before tuning an evaluation after it may take.
    Returns:
        minutes of training (0.0 when `total_minutes` is 0).
    Raises:
        SystemExit: the budget leaves no time for training, with the figures.
    """
    if not total_minutes:
        return 0.0
    spent = time.perf_counter() - start
    left = total_minutes * 60 - spent - evaluations_left * evaluation_s * slack - tail_s
    if left <= 0:
        raise SystemExit(f"--minutes {total_minutes:g} leaves no time for training: {spent / 60:.1f} minutes went to "
                         f"setup and the first evaluation, and {evaluations_left} more evaluation(s) of "
                         f"{evaluation_s / 60:.1f} minutes and {tail_s:.0f} s after training must fit too")
    return left / 60


# --- the optional plot --------------------------------------------------------------------------------------------
def training_losses(run_dirs: Sequence[str | Path]) -> list[tuple[float, float]]:
    """(minutes of training, loss) of every step of one or more runs trained one after the other (`log.jsonl`)."""
    points, offset = [], 0.0
    for run in run_dirs:
        steps = [r for r in map(json.loads, (Path(run) / "log.jsonl").read_text().splitlines()) if r["type"] == "step"]
        points += [(offset + r["elapsed_s"] / 60, r["loss"]) for r in steps]
        offset = points[-1][0] if points else offset
    return points


def write_curve(path: Path, losses: Sequence[tuple[float, float]], scores: Sequence[tuple[float, float]],
                metric: str) -> bool:
    """Plot the training loss and `metric` against minutes of training into the PNG `path`, where matplotlib is
    installed (the `plot` extra: `pip install -e '.[plot]'`).

    Args:
        path: the image to write.
        losses: (minutes, training loss) per step, from `training_losses`.
        scores: (minutes, metric) where it was measured (0: before tuning).
        metric: the metric's name, for the axis.
    Returns:
        whether the image was written (False without matplotlib).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(*zip(*losses), color="tab:blue", linewidth=1)
    loss_axis.set(xlabel="minutes of training", ylabel="training loss", yscale="log")
    metric_axis = loss_axis.twinx()
    metric_axis.plot(*zip(*scores), "o", color="tab:red")  # measured points only: no line implies values between
    metric_axis.set(ylabel=metric, ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
