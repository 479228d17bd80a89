"""What the example scripts share: where a run goes and how it was made (machine, command), the model and its
evaluation (`ecellm.eval.evaluate`, filed by test set and task). Training in phases and the job's time budget are
in phases.py, the optional plot in curve.py.

A script in this folder imports it as `from common import ...` (run as a script, its own folder is `sys.path[0]`).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from ecellm import models
from ecellm.eval import BERTSCORE_MINILM, bertscore_encoder, evaluate
from ecellm.files import write_json
from ecellm.lora import load_adapter, merge
from ecellm.models.config import read_config_file
from ecellm.models.default import resolve_model
from ecellm.tasks import task_abbr


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


# --- the model and its evaluation ------------------------------------------------------------------------------------
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


def for_generation(model, device):
    """`model` moved to `device` (this rank's: a CUDA rank's own GPU), in float32: greedy answers of a tuned SmolLM2
    in bfloat16 agreed with float32 on 48 of 48 PM test records but only 41 of 48 SA ones (near-ties between classes;
    bench/bf16_agreement.py, docs/real_data.md), short of the 98% agreement an evaluation in bfloat16 would need."""
    return model.to(device=device, dtype=torch.float32).eval()


def add_bertscore_flag(parser) -> None:
    """The examples' `--bertscore-model`, as `ecellm eval`'s (`ecellm.eval.bertscore_encoder`)."""
    parser.add_argument("--bertscore-model", default=BERTSCORE_MINILM,
                        help="AG's F_BERT encoder: 'minilm' (all-MiniLM-L6-v2, layer 6, fetched and cached on first "
                             "use), 'model' (the untuned model's own final hidden states, the older score) or a "
                             "checkpoint folder (default: %(default)s)")


def ag_encoder(choice: str, base, tokenizer, device, batch_size: int, tasks: Sequence[str] | None):
    """One encoder for AG's F_BERT before and after tuning, so the two compare (`ecellm.eval.bertscore_encoder`;
    "model": the untuned model's states); None when AG is not among `tasks` (nothing is fetched).

    Args:
        choice: `--bertscore-model`.
        base: the untuned model; tokenizer: its tokenizer.
        device: where the encoder runs.
        batch_size: texts per forward pass.
        tasks: the task abbreviations scored (None: all).
    """
    if tasks is not None and "AG" not in tasks:
        return None
    return bertscore_encoder(choice, base, tokenizer, device=device, batch_size=batch_size)


def by_task(records: Sequence[dict]) -> dict[str, list[dict]]:
    """Task abbreviation -> that task's records, in the order the tasks first appear."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(task_abbr(r["task"]), []).append(r)
    return groups


def evaluate_sets(model, tokenizer, tests: Mapping[str, Sequence[dict]], template: str,
                  budgets: int | Mapping[str, int], *, encoder=None, batch_size: int = 8,
                  desc: str = "evaluate") -> dict[str, dict[str, dict]]:
    """Greedy answers to every test set in one `ecellm.eval.evaluate` (under torchrun each rank generates its share
    and every rank gets every score), filed by set and task.

    Args:
        model, tokenizer: from `load_model`.
        tests: results.json key -> test records of one setting (each key its own setting).
        template: "alpaca" or "mistral".
        budgets: most new tokens per answer: one number, or one per task abbreviation.
        encoder: AG's BERTScore encoder (`ag_encoder`); default: a `ModelEncoder` of the evaluated model.
        batch_size: prompts per generation batch.
        desc: the progress bar's label.
    Returns:
        key -> task abbreviation -> `ecellm.metrics.score`'s result, with "invalid" (the share of failed answers),
        "examples" (the first five prediction/reference pairs) and "predictions" (the answers, in record order).
    """
    settings = [group[0]["setting"] for group in tests.values()]
    if len(set(settings)) < len(settings):
        raise ValueError(f"evaluate_sets: two test sets share a setting ({settings}); their scores would merge")
    records = [r for group in tests.values() for r in group]
    evaluation = evaluate(model, tokenizer, records, template=template, batch_size=batch_size,
                          max_new_tokens=budgets, encoder=encoder, desc=desc)
    scores = {(row["task"], row["setting"]): row for row in evaluation["results"]}
    results, offset = {}, 0
    for key, group in tests.items():
        generations, offset = evaluation["generations"][offset:offset + len(group)], offset + len(group)
        answers = [(task_abbr(g["task"]), g["prediction"]) for g in generations]
        results[key] = {}
        for abbr, task_records in by_task(group).items():
            predictions = [p for task, p in answers if task == abbr]
            row = scores[abbr, task_records[0]["setting"]]
            results[key][abbr] = {**row, "invalid": row["n_failed"] / row["n"], "predictions": predictions,
                                  "examples": [{"prediction": p, "reference": r["output"]}
                                               for p, r in list(zip(predictions, task_records))[:5]]}
    return results
