"""What the example scripts share: where a run goes and how it was made (machine, command), and an evaluation that
splits the generation over the ranks of a torchrun launch and scores each task with `ecellm.metrics.score`.

A script in this folder imports it as `from common import ...` (run as a script, its own folder is `sys.path[0]`).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch.distributed as dist
from tqdm.auto import tqdm

from ecellm.data import parse_response
from ecellm.eval import build_prompt, references
from ecellm.files import write_json
from ecellm.generate import generate_text
from ecellm.lora import load_adapter, merge
from ecellm.metrics import ModelEncoder, score
from ecellm.models import from_pretrained
from ecellm.tasks import task_abbr
from ecellm.tokenizer import load_tokenizer


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
    """The prompt template of a checkpoint: "mistral" for Mistral models, "alpaca" otherwise (as `ecellm.train`)."""
    family = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
    return "mistral" if family == "mistral" else "alpaca"


def load_model(model_dir: str | Path, adapter: str | Path | None = None):
    """(model, tokenizer) in eval mode, fp32 on the CPU, with `adapter` (a PEFT-format directory) merged in.

    Args:
        model_dir: checkpoint directory.
        adapter: LoRA adapter directory, or None for the model alone.
    """
    tokenizer = load_tokenizer(model_dir)
    model = from_pretrained(model_dir)
    tokenizer.check_fits(model.config.vocab_size, str(model_dir))
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
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generations = generate_text(model, tokenizer, chunk, max_new_tokens=max_new_tokens, batch_size=batch_size)
        if model.config.model_type == "t5":
            answers += [g.strip() for g in generations]
        else:
            answers += [parse_response(p + g, template) for p, g in zip(chunk, generations)]
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
