"""Training in phases (a curriculum, each phase from the previous phase's adapter) within a time budget for the whole
job: what examples/train_sr.py, train_generalist.py and train_real.py train with.

A script in this folder imports it as `from phases import ...` (run as a script, its own folder is `sys.path[0]`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ecellm.synthetic import write_dataset
from ecellm.train import LOSS_REACHED, OUT_OF_TIME, TrainConfig, train


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
        minutes: the wall time of all phases together, each phase's setup included (0: no limit); a phase that
            reaches it is cut short and the phases after it are skipped (the first phase runs at least one step).
            A phase also ends early once its loss is below `base.stop_at_loss` (the next phase then starts).
        init_adapter: the adapter the first phase starts from ("" for a fresh LoRA).
        after_phase: called with (phase number, the progress so far) after each phase but the last, unless the time
            limit ended training there (e.g. to score the adapter so far).
    Returns:
        {"adapter", "steps", "seconds", "tokens", "run_dirs", "stopped" (why training ended before its last planned
         step, or None), "last_phase" (the number of the last phase trained), "phase_steps" (each phase trained:
         steps run, steps planned, and "loss reached", "time limit" or None for a phase run to its end)}.
    """
    done = {"adapter": init_adapter, "steps": 0, "seconds": 0.0, "tokens": 0.0, "run_dirs": [], "stopped": None,
            "phase_steps": []}
    started = time.perf_counter()
    for i, (data, run_dir, lr) in enumerate(phases, 1):
        # the first phase gets the whole budget (so it runs at least one step); a later one what the earlier ones left
        spent = (time.perf_counter() - started) / 60 if i > 1 else 0.0
        minutes_left = minutes - spent if minutes else 0.0
        if minutes and minutes_left <= 0:
            done["stopped"] = f"the {minutes:.3g}-minute time limit: {phase_range(i, len(phases))} skipped"
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
        done["phase_steps"].append({"steps": summary["steps"], "planned": summary["total_steps"],
                                    "ended": summary["stopped_by"]})
        if summary["stopped_by"] == OUT_OF_TIME:
            done["stopped"] = (f"the {minutes:.3g}-minute time limit, at step {summary['steps']} of "
                               f"{summary['total_steps']} of phase {i}"
                               + (f" ({phase_range(i + 1, len(phases))} skipped)" if i < len(phases) else ""))
        elif summary["stopped_by"] not in (None, LOSS_REACHED):
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
