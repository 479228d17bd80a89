"""Evaluation: generate answers to ECInstruct test records, parse and score them per task and setting as the paper does.

    ecellm eval --model DIR [--adapter DIR] --data test.json --tasks PM SA \\
        --setting IND_Diverse_Instruction OOD_Diverse_Instruction --out results/      (or python -m ecellm.eval)

prints a table per task and setting (primary metric, secondary figures, n, n_failed) and writes `results.json`,
`results.md` and the raw generations `generations.jsonl` to `--out`. Every flag is a field of `EvalConfig`. In code:
`evaluate(model, tokenizer, records)`, or `run(EvalConfig(...))` for the whole command.

Nothing is lost to an interruption. `evaluation.json` (the settings and a hash of the records) is written first,
each batch's generations are appended to `generations.jsonl` as soon as they are made, and `results.md` and
`results.json` come last, each written atomically. `--resume` continues an interrupted evaluation from the
generations already there (refused under other settings or records); batch b is seeded by its position, so the
result equals an uninterrupted run's. A folder holding another evaluation is refused unless `--resume` or
`--overwrite`, and one folder serves one evaluation at a time (a lock, `ecellm.lock`). Reference answers, the folder,
the model and the adapter are all checked before the first generation.

Settings. A record is scored under its own `setting`. A requested setting that the data file lacks is built from the
same domain's `*_Diverse_Instruction` test records, the way the dataset's notebooks built it: `*_Single_Instruction`
gives every record the task's seed instruction, `*_Unseen_Instruction` the held-out paraphrase never used in
training, `*_Diverse_Instruction_1-shot` pairs test record i of a task with training record i of that task (from
`--demos`, the training file; OOD tests take their demonstration from the IND training data, as the notebooks do)
unless the record already carries a `few_shot_example`.

1-shot prompts. The reference code does not say how `few_shot_example` enters the prompt; ecellm puts the
demonstration after the instruction, in the template's own section style (see `one_shot_instruction`).

Decoding, as the reference: a run with `--adapter` samples at temperature 0.15, top-p 0.95 (inference.py line
126-136, inference_T5.py line 106-115), seeded by `--seed` (default 0) so a run repeats exactly; a model without an
adapter (a merged or base model) is decoded greedily (inference_merged.py line 99-109, `do_sample` commented out).
`--greedy` and `--sample` force either. An adapter is merged into the weights before generation (same outputs up to
rounding, faster; inference_T5.py merges too).

Answers, as the reference: the text after the template's response marker in prompt + continuation
(`ecellm.data.parse_response`, utils/prompter.py line 47-48); for T5 the raw continuation (inference_T5.py line 118).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .configs import (  # noqa: F401 (PAPER_SAMPLING: public here too)
    BERTSCORE_EVALUATED_MODEL,
    BERTSCORE_MINILM,
    PAPER_SAMPLING,
    EvalConfig,
)
from .data import TEMPLATES, Records, load_records, parse_response
from .errors import EcellmError, exit_on_error
from .files import open_to_append, read_json, write_text_atomically
from .flags import parse_dtype, parse_flags
from .generate import generate_text, length_batches
from .lock import FolderLock
from .metrics import ModelEncoder, score
from .models import encoders, template_for
from .prompts import ONE_SHOT, build_prompt, derive_setting, one_shot_instruction, prompt_parts  # noqa: F401 (public here too)
from .runs import (  # noqa: F401 (RESUMABLE_CHANGES: public here too)
    RESUMABLE_CHANGES,
    FolderKind,
    check_flags,
    check_folder,
    check_settings,
    check_unchanged,
    clear,
    fingerprint_files,
    held,
    weight_files,
)
from .tasks import SETTINGS, TASK_BY_NAME, TASKS, resolve_task

PAPER_MAX_NEW_TOKENS = 100  # the reference's max_new_tokens (inference.py)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class EvalError(EcellmError, ValueError):
    """An evaluation that cannot start or go on: bad input, a folder holding another evaluation, a refused resume."""


# --- references ---------------------------------------------------------------------------------------------
def references(task: str, records: Sequence[dict], qpr_labels: Sequence[Sequence[str]] | None = None) -> list:
    """The references `ecellm.metrics.score` takes for one task's records.

    Args:
        task: task name or abbreviation.
        records: that task's records of one setting, in order.
        qpr_labels: QPR only: ESCI labels of each record's options A, B, ... in record order (the reference
            code's `data_label/label.json`); a record's own `esci_labels` field takes precedence.
    """
    if resolve_task(task) != "Query_Product_Rank":
        return [r["output"] for r in records]
    refs = []
    for i, r in enumerate(records):
        labels = r.get("esci_labels")
        if labels is None:
            if qpr_labels is None or i >= len(qpr_labels):
                have = 0 if qpr_labels is None else len(qpr_labels)
                raise ValueError(f"QPR record {i} of {r['setting']} has no ESCI labels (NDCG needs the label of "
                                 f"every option): records need an 'esci_labels' field, or pass the reference "
                                 f"code's data_label/label.json with --qpr-labels (it holds {have} entries)")
            labels = qpr_labels[i]
        refs.append({"ranking": r["output"], "labels": list(labels)})
    return refs


def load_qpr_labels(path: str | Path) -> list[list[str]]:
    """Read the reference code's `data_label/label.json`: per QPR test record, the ESCI labels of its options.

    Args:
        path: the JSON file, a list of lists of "E" / "S" / "C" / "I".
    """
    labels = read_json(path, EvalError)
    if not isinstance(labels, list):
        raise EvalError(f"{path}: expected a JSON list of label lists, got {type(labels).__name__}")
    for i, entry in enumerate(labels):
        if not isinstance(entry, list) or not all(label in ("E", "S", "C", "I") for label in entry):
            raise EvalError(f"{path}: entry {i} is {entry!r}, expected a list of ESCI labels such as ['E', 'S']")
    return labels


# --- evaluation ---------------------------------------------------------------------------------------------
def _groups(records: Sequence[dict]) -> dict[tuple[str, str], list[int]]:
    """(task name, setting) -> indices of its records, in the paper's task order, then setting order."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault((resolve_task(r["task"]), r["setting"]), []).append(i)
    task_order = [t.name for t in TASKS]
    return dict(sorted(groups.items(), key=lambda kv: (task_order.index(kv[0][0]), SETTINGS.index(kv[0][1]))))


def answer_budgets(tasks: Sequence[str], max_new_tokens: int | Mapping[str, int]) -> dict[str, int]:
    """Task name -> most new tokens generated for its answers.

    Args:
        tasks: the task names (any spelling `resolve_task` takes) to budget.
        max_new_tokens: one budget for every task, or a budget per task (any spelling); a task it leaves out gets
            the paper's `PAPER_MAX_NEW_TOKENS`.
    """
    if isinstance(max_new_tokens, int):
        return {resolve_task(t): max_new_tokens for t in tasks}
    given = {resolve_task(t): n for t, n in max_new_tokens.items()}
    return {resolve_task(t): given.get(resolve_task(t), PAPER_MAX_NEW_TOKENS) for t in tasks}


def read_answer(prompt: str, generation: str, template: str, model_type: str) -> str:
    """The answer in a generation, as the reference reads it: for a decoder, the text after the template's response
    marker in prompt + generation, stripped (`parse_response`, utils/prompter.py line 47-48); for T5 (an
    encoder-decoder, whose output is the answer alone) the generation itself, as is (inference_T5.py line 118).

    Args:
        prompt: the prompt the generation continues.
        generation: the decoded continuation.
        template: "alpaca" or "mistral", the template the prompt was built with.
        model_type: the model's `config.model_type`.
    """
    return generation if model_type == "t5" else parse_response(prompt + generation, template)


def encode_prompts(tokenizer, parts: Sequence[Sequence[str]]) -> list[list[int]]:
    """The prompts' token ids as training encodes a record (`Tokenizer.encode_parts`): a special-token string in the
    template's markup is its control id, one in the record's text (a review quoting `</s>`) stays text. Where no
    such string appears, the ids are `tokenizer.encode` of the joined prompt.

    Args:
        tokenizer: an `ecellm.tokenizer` tokenizer.
        parts: each prompt's `prompt_parts`.
    """
    return tokenizer.encode_parts_batch([list(p) for p in parts])


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks of the torchrun launch (0, 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gathered(made: list[tuple[int, str]], world: int) -> list[tuple[int, str]]:
    """Every rank's (record index, generation) pairs of one round, rank 0's first, on every rank."""
    if world == 1:
        return made
    parts: list = [None] * world
    dist.all_gather_object(parts, made)
    return [pair for part in parts for pair in part]


def _generate_all(model, tokenizer, prompts: Sequence[str], prompt_ids: Sequence[list[int]], budgets: Sequence[int],
                  *, batch_size: int, temperature: float, top_p: float, seed: int | None, done: Mapping[int, str],
                  progress: bool, desc: str, on_batch: Callable[[list[int], list[str]], None],
                  stop_strings: Sequence[str] = ()) -> dict[int, str]:
    """Record index -> generation for every prompt (`prompt_ids`: its token ids). The prompts go in length-sorted
    batches of one answer budget each (`length_batches`); the batches not yet `done` are dealt out to the ranks in
    rounds (batch k of a round to the round's rank k), and after each round every rank holds every generation of it.
    A batch is seeded by its position in the order, so its text depends neither on the number of ranks nor on the
    batches before it."""
    rank, world = _rank_and_world()
    batches = length_batches([len(ids) for ids in prompt_ids], batch_size, budgets)
    starts = [0, *itertools.accumulate(len(rows) for rows in batches)]
    generations = dict(done)
    pending = [k for k, rows in enumerate(batches) if not all(i in generations for i in rows)]
    with tqdm(total=len(prompts), initial=len(prompts) - sum(len(batches[k]) for k in pending), desc=desc,
              unit="record", dynamic_ncols=True, disable=not progress or rank != 0) as bar:
        for first in range(0, len(pending), world):
            round_ = pending[first:first + world]
            made = []
            if rank < len(round_):
                rows = batches[round_[rank]]
                texts = generate_text(model, tokenizer, [prompts[i] for i in rows],
                                      prompt_ids=[prompt_ids[i] for i in rows], stop_strings=stop_strings,
                                      max_new_tokens=budgets[rows[0]],
                                      batch_size=len(rows), temperature=temperature, top_p=top_p,
                                      seed=None if seed is None else seed + starts[round_[rank]])
                made = list(zip(rows, texts))
            round_generations = dict(_gathered(made, world))
            for k in round_:  # in batch order, whichever rank made it
                texts = [round_generations[i] for i in batches[k]]
                generations.update(zip(batches[k], texts))
                on_batch(batches[k], texts)
                bar.update(len(texts))
    return generations


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[dict],
    *,
    template: str = "alpaca",
    batch_size: int = 8,
    max_new_tokens: int | Mapping[str, int] = PAPER_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    paper_compat: bool = False,
    encoder=None,
    qpr_labels: Sequence[Sequence[str]] | None = None,
    progress: bool = True,
    desc: str = "generate",
    done: Mapping[int, str] | None = None,
    on_batch: Callable[[list[dict]], None] | None = None,
    stop_at_marker: bool = True,
) -> dict:
    """Generate an answer for every record and score each (task, setting) group as the paper does; under torchrun
    each rank generates its share of the batches and every rank gets every generation and score.

    Args:
        model, tokenizer: an ecellm model (any family) and its tokenizer.
        records: ECInstruct records, each scored under its own task and setting.
        template, batch_size, max_new_tokens: "alpaca"/"mistral"; prompts per batch; one number or task -> number.
        temperature, top_p, seed: 0 is greedy; batch p of the batches' order is seeded with seed + p.
        paper_compat, encoder: score with the reference's defects (`ecellm.metrics`); AG's BERTScore encoder.
        qpr_labels, progress, desc: ESCI labels of the QPR options (`references`); a tqdm bar on rank 0, its label.
        done, on_batch: generations already made (index -> text; a resume); a callback for each batch's records.
        stop_at_marker: end a decoder's answer at the template's response marker (same predictions, shorter runs).
    Returns:
        {"results": a `score` dict per (task, setting) with "setting", in the paper's order; "generations": per
         record {"index", "task", "setting", "prompt", "generation", "prediction" (`read_answer`), "reference"}}.
    """
    model.eval()  # no dropout (LoRA's included) while generating
    groups = _groups(records)
    refs = {key: references(key[0], [records[i] for i in idx], qpr_labels) for key, idx in groups.items()}
    parts = [prompt_parts(r, template) for r in records]
    prompts = ["".join(p) for p in parts]
    model_type = model.config.model_type
    budget = answer_budgets({r["task"] for r in records}, max_new_tokens)

    def generation_records(rows: Sequence[int], texts: Sequence[str]) -> list[dict]:
        return [{"index": i, "task": records[i]["task"], "setting": records[i]["setting"], "prompt": prompts[i],
                 "generation": text, "prediction": read_answer(prompts[i], text, template, model_type),
                 "reference": records[i]["output"]} for i, text in zip(rows, texts)]

    budgets = [budget[resolve_task(r["task"])] for r in records]
    stop_strings = [TEMPLATES[template]["response_split"]] if stop_at_marker and model_type != "t5" else []
    generations = _generate_all(model, tokenizer, prompts, encode_prompts(tokenizer, parts), budgets,
                                stop_strings=stop_strings,
                                batch_size=batch_size, temperature=temperature, top_p=top_p, seed=seed,
                                done=done or {}, progress=progress, desc=desc, on_batch=lambda rows, texts: (
                                    on_batch(generation_records(rows, texts)) if on_batch else None))
    gens = generation_records(range(len(records)), [generations[i] for i in range(len(records))])
    return {"results": _score_groups(model, tokenizer, gens, groups, refs, batch_size=batch_size,
                                     paper_compat=paper_compat, encoder=encoder, seq2seq=model_type == "t5"),
            "generations": gens}


def _score_groups(model, tokenizer, gens: Sequence[dict], groups: Mapping[tuple[str, str], list[int]],
                  refs: Mapping, *, batch_size: int, paper_compat: bool, encoder, seq2seq: bool) -> list[dict]:
    """`score` of each (task, setting) group's predictions, with "setting" added; AG's encoder made when needed."""
    results = []
    for (task, setting), idx in groups.items():
        if TASK_BY_NAME[task].answer == "text" and encoder is None:  # BERTScore needs an encoder
            encoder = ModelEncoder(model, tokenizer, batch_size=batch_size)
        result = score(task, [gens[i]["prediction"] for i in idx], refs[task, setting], setting=setting,
                       paper_compat=paper_compat, ave_parser="t5" if seq2seq else "json", encoder=encoder)
        results.append({"task": result.pop("task"), "setting": setting, **result})
    return results


# --- tables -------------------------------------------------------------------------------------------------
_COUNTS = ("task", "setting", "metric", "n", "n_failed")


def _secondary(row: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in row.items() if k not in _COUNTS and k != row["metric"])


def markdown_table(results: Sequence[dict]) -> str:
    """A Markdown table of `evaluate`'s results: task, setting, metric, value, secondary figures, n, n_failed.

    Args:
        results: the "results" list of `evaluate`.
    """
    lines = ["| task | setting | metric | value | secondary | n | n_failed |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['setting']} | {r['metric']} | {r[r['metric']]:.3f} | {_secondary(r)} | {r['n']} "
              f"| {r['n_failed']} |" for r in results]
    return "\n".join(lines) + "\n"


# --- the output folder ----------------------------------------------------------------------------------------
# An evaluation's files in --out. evaluation.json (its settings, records and weights) is written first,
# generations.jsonl grows by one flushed batch at a time, results.md and then results.json (the mark of a finished
# evaluation) last. The rules for reusing the folder are `ecellm.runs`'.
EVALUATION, GENERATIONS, RESULTS, TABLE = "evaluation.json", "generations.jsonl", "results.json", "results.md"
EVALUATING = FolderKind(job="evaluation", marker=EVALUATION, files=(EVALUATION, GENERATIONS, RESULTS, TABLE))


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an `out` that holds another evaluation unless `resume` (continue it) or `overwrite` (delete it), and a
    `resume` with nothing to continue (`ecellm.runs.check_folder`). Nothing is written."""
    check_folder(out, EVALUATING, resume, overwrite)


def evaluation_header(config: EvalConfig, records: Sequence[dict], prompts: Sequence[str],
                      weights: dict[str, dict]) -> dict:
    """What evaluation.json records, which a resumed evaluation must match: the settings (but for
    `RESUMABLE_CHANGES`), a hash of the records' prompts and references, and the fingerprints of the weights
    (`ecellm.runs.fingerprint_files` of the model's and the adapter's safetensors files)."""
    digest = hashlib.sha256()
    for record, prompt in zip(records, prompts):
        digest.update(json.dumps([record["task"], record["setting"], prompt, record["output"]]).encode())
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}
    return {"settings": settings, "n_records": len(records), "records_sha256": digest.hexdigest(), "weights": weights}


def check_same_evaluation(out: Path, header: dict, allow_model_change: bool) -> None:
    """Refuse to resume the evaluation in `out` under other settings, records or weights (weights: unless
    `allow_model_change`, then logged and the new fingerprints recorded in evaluation.json)."""
    saved = read_json(out / EVALUATION, EvalError)
    check_settings(out / EVALUATION, saved["settings"], header["settings"], EVALUATING)
    if (saved["n_records"], saved["records_sha256"]) != (header["n_records"], header["records_sha256"]):
        raise EvalError(f"--resume: the records differ from the {saved['n_records']} the evaluation in {out} started "
                        f"on (now {header['n_records']}; the data changed?): start a new evaluation")
    if "weights" not in saved:
        _log(f"--resume: {out / EVALUATION} records no fingerprint of the weights: they cannot be checked; recording "
             "them now")
    elif not check_unchanged("the model's or adapter's weights", saved["weights"], header["weights"],
                             "--allow-model-change", allow_model_change, EVALUATING, _log):
        return
    write_text_atomically(out / EVALUATION, json.dumps({**saved, "weights": header["weights"]}, indent=2) + "\n")


def read_done(out: Path, records: Sequence[dict], prompts: Sequence[str]) -> dict[int, str]:
    """The generations a resumed evaluation already made (record index -> generation), each checked to be this
    evaluation's record. A last line cut short by a kill is dropped."""
    done, file = {}, out / GENERATIONS
    lines = file.read_text(encoding="utf-8").split("\n") if file.is_file() else []
    for n, line in enumerate(lines[:-1], 1):  # the text after the last newline is a line cut short (or nothing)
        try:
            gen = json.loads(line)
            i = gen["index"]
            same = 0 <= i < len(records) and (gen["prompt"], gen["reference"]) == (prompts[i], records[i]["output"])
        except (ValueError, KeyError, TypeError):
            raise EvalError(f"{file}: line {n} is not a generation record") from None
        if not same:
            raise EvalError(f"{file}: line {n} (record {i}) is not this evaluation's record {i}: other prompt or "
                            "reference")
        done[i] = gen["generation"]
    write_text_atomically(file, "".join(line + "\n" for line in lines[:-1]))
    return done


def start_or_resume(out: Path, header: dict, records: Sequence[dict], prompts: Sequence[str], resume: bool,
                    allow_model_change: bool = False) -> dict[int, str]:
    """Start the evaluation in `out` (an old evaluation's files deleted: `--overwrite`; evaluation.json written), or
    resume it (`check_same_evaluation`, `read_done`). Returns the generations already made, by record index."""
    if resume:
        check_same_evaluation(out, header, allow_model_change)
        done = read_done(out, records, prompts)
        _log(f"--resume: {len(done)} of {len(records)} generations already in {out / GENERATIONS}")
        return done
    found = held(out, EVALUATING)
    if found:
        _log(f"--overwrite: deleting the previous evaluation in {out}")
        clear(out, found, _log)
    write_text_atomically(out / EVALUATION, json.dumps(header, indent=2) + "\n")
    return {}


def write_results(out: Path, evaluation: dict, config: dict) -> dict[str, Path]:
    """Finish an evaluation's folder: generations.jsonl rewritten in record order, then results.md and results.json
    (config + results), each replaced atomically; results.json last.

    Args:
        out: the output folder.
        evaluation: what `evaluate` returned.
        config: how the run was made (model, data, decoding, ...), stored in `results.json`.
    Returns:
        name -> path written.
    """
    paths = {"generations": out / GENERATIONS, "markdown": out / TABLE, "json": out / RESULTS}
    write_text_atomically(paths["generations"],
                          "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in evaluation["generations"]))
    write_text_atomically(paths["markdown"], markdown_table(evaluation["results"]))
    write_text_atomically(paths["json"],
                          json.dumps({"config": config, "results": evaluation["results"]}, indent=2) + "\n")
    return paths


# --- command line -------------------------------------------------------------------------------------------
def select_records(records: Sequence[dict], settings: Sequence[str] | None, demos: Sequence[dict] | None = None,
                   limit: int | None = None) -> list[dict]:
    """The records of each requested setting, built by `derive_setting` when the data lacks them.

    Args:
        records: test records (already filtered to the wanted tasks).
        settings: setting names; None takes the settings present in `records`.
        demos: training records for building 1-shot settings.
        limit: keep at most this many records per task and setting (the first ones); positive.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"select_records: limit={limit}; expected a positive number of records (or None for all)")
    present = sorted({r["setting"] for r in records}, key=SETTINGS.index)
    out = []
    for setting in settings or present:
        chosen = [r for r in records if r["setting"] == setting] if setting in present else derive_setting(
            records, setting, demos)
        counts: dict[str, int] = {}
        for r in chosen:
            counts[r["task"]] = counts.get(r["task"], 0) + 1
            if limit is None or counts[r["task"]] <= limit:
                out.append(r)
    return out


def _model_dir(model: str) -> Path:
    """The checkpoint directory of a `--model` value (`models.default.resolve_model`)."""
    from .models.default import resolve_model

    return resolve_model(model)


def _load_model(path: str, tokenizer_path: str | None, dtype: torch.dtype, device: str):
    """(model, tokenizer) from a checkpoint directory or a known model's name (`ecellm.models.load_pretrained`)."""
    from .models import load_pretrained

    return load_pretrained(path, dtype=dtype, device=device, tokenizer=tokenizer_path)


def check_references(records: Records) -> None:
    """Refuse, before anything is generated, a record whose reference answer its task cannot score (an SR answer
    that is not one of its option letters, a PM answer that is not yes or no, ...), naming the file and the record's
    index in it. Free text (AG) is always an answer; QPR's rankings are checked with their labels (`references`).

    Args:
        records: what `ecellm.data.load_records` returned (its `origins` name each record's file and index).
    """
    for record, (file, index) in zip(records, records.origins):
        info = TASK_BY_NAME[record["task"]]
        if info.answer in ("text", "ranking"):
            continue
        try:
            score(info.name, [""], [record["output"]], setting=record["setting"])
        except ValueError as e:
            raise EvalError(f"{file}: record {index}: the reference answer {record['output']!r} is not a valid "
                            f"{info.abbr} answer ({e})") from None


def _load_records(config: EvalConfig) -> list[dict]:
    """The records to evaluate: the test records of the chosen tasks, in each chosen setting."""
    records = load_records(config.data, split=config.split, tasks=config.tasks)
    if not records:
        tasks = f" of {', '.join(config.tasks)}" if config.tasks else ""
        raise EvalError(f"no {config.split} records{tasks} in {config.data}")
    check_references(records)
    demos = load_records(config.demos, split="train", tasks=config.tasks) if config.demos else None
    return select_records(records, config.setting, demos, config.limit)


def bertscore_encoder(choice: str, model: torch.nn.Module, tokenizer, *, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu", batch_size: int = 8):
    """AG's BERTScore encoder as `--bertscore-model` names it: "minilm" (`BERTSCORE_MINILM`, the default) the real
    sentence encoder all-MiniLM-L6-v2 at layer 6 without IDF weighting (`ecellm.models.encoders.minilm_encoder`,
    fetched and cached on first use); "model" (`BERTSCORE_EVALUATED_MODEL`) the final hidden states of `model`
    itself (`ecellm.metrics.ModelEncoder`, the older score, kept for the comparison); anything else a checkpoint
    folder or known model's name whose final hidden states score. The results name the encoder.

    Args:
        choice: the flag's value.
        model, tokenizer: the evaluated model and its tokenizer.
        dtype, device: how a checkpoint named by `choice` is loaded (MiniLM runs in float32 on `device`).
        batch_size: texts per forward pass.
    """
    if choice == BERTSCORE_MINILM:
        return encoders.minilm_encoder(device=device, batch_size=batch_size)
    if choice == BERTSCORE_EVALUATED_MODEL:
        return ModelEncoder(model, tokenizer, batch_size=batch_size)
    bert_model, bert_tokenizer = _load_model(choice, None, dtype, device)
    return ModelEncoder(bert_model, bert_tokenizer, batch_size=batch_size, name=choice)


def _load_models(config: EvalConfig, scores_text: bool) -> tuple[torch.nn.Module, object, object | None]:
    """(model with its adapter merged, tokenizer, AG's BERTScore encoder when `scores_text`, else None); what does
    not load, or does not fit, is an `EvalError`."""
    from .lora import load_adapter, merge

    dtype = parse_dtype(config.dtype)
    try:
        model, tokenizer = _load_model(config.model, config.tokenizer, dtype, config.device)
        if config.adapter:
            model = merge(load_adapter(model, config.adapter)).eval()
        encoder = None
        if scores_text:
            encoder = bertscore_encoder(config.bertscore_model, model, tokenizer, dtype=dtype, device=config.device,
                                        batch_size=config.batch_size)
    except ValueError as e:
        raise EvalError(str(e)) from e
    return model, tokenizer, encoder


class EvaluationStopped(EcellmError):
    """A stop signal (SIGTERM, SIGINT) arrived during an evaluation: what was generated is on disk, --resume goes on.
    Not a ValueError, so that no `except ValueError` on its way out takes it for bad input."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside, SIGTERM and SIGINT raise `EvaluationStopped` in the main thread at once (between two decoding
    steps, at worst after one batch's prompt pass), instead of killing the process or waiting; a second signal while
    the first unwinds is ignored. The previous handlers come back on leaving."""
    received: list[str] = []

    def handler(signum: int, frame) -> None:
        if not received:
            received.append(signal.Signals(signum).name)
            raise EvaluationStopped(received[0])

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _stopped(out: Path, signal_name: str, n_records: int) -> EvalError:
    """The one line told when a signal stopped the evaluation in `out`."""
    file = out / GENERATIONS
    made = file.read_text(encoding="utf-8").count("\n") if file.is_file() else 0
    return EvalError(f"stopped by {signal_name}: {made} of {n_records} generations are in {file}; run the same "
                     "command with --resume to continue")


def _generate_into(out: Path, config: EvalConfig, model, tokenizer, encoder, records: Sequence[dict],
                   template: str, done: Mapping[int, str], qpr_labels) -> dict:
    """`evaluate` with each batch's generations appended to out/generations.jsonl as soon as they are made."""
    temperature, top_p = config.decoding()
    with open_to_append(out / GENERATIONS) as f:

        def append(batch: list[dict]) -> None:
            f.write("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in batch))
            f.flush()

        return evaluate(model, tokenizer, records, template=template, batch_size=config.batch_size,
                        max_new_tokens=config.max_new_tokens, temperature=temperature, top_p=top_p,
                        seed=config.seed, paper_compat=config.paper_compat, encoder=encoder,
                        qpr_labels=qpr_labels, done=done, on_batch=append)


def run(config: EvalConfig) -> dict:
    """Evaluate as `config` says, writing to `config.out` as it goes (see the module docstring), and print the
    table; returns what `evaluate` returned.

    Everything that can be checked is checked before generating: the records and their reference answers, the QPR
    labels, the folder (writable, and holding no other evaluation unless --resume or --overwrite), the model,
    tokenizer and adapter. The folder is locked for the evaluation's life (`ecellm.lock.FolderLock`). SIGTERM or
    SIGINT stops it within seconds with the generations made so far on disk: an `EvalError` saying so (exit 1).
    """
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world > 1:  # every rank would run the whole evaluation into one folder; the second finds it locked
        raise EvalError(f"ecellm eval runs in one process, and this is one of {world} (torchrun's WORLD_SIZE): run it "
                        "without torchrun, or call ecellm.eval.evaluate in your own process group (docs/evaluation.md)")
    out = Path(config.out)
    check_flags(out, EVALUATING, config.resume, config.overwrite)
    records = _load_records(config)
    qpr_labels = load_qpr_labels(config.qpr_labels) if config.qpr_labels else None
    lock = FolderLock(out, "evaluation")
    lock.acquire(_log)
    try:
        with stop_on_signals():
            check_out(out, config.resume, config.overwrite)
            scores_text = any(TASK_BY_NAME[resolve_task(r["task"])].answer == "text" for r in records)
            model, tokenizer, encoder = _load_models(config, scores_text)
            template = template_for(model.config.model_type, config.template)
            prompts = [build_prompt(r, template) for r in records]
            weights = fingerprint_files(weight_files(_model_dir(config.model), config.adapter))
            header = evaluation_header(config, records, prompts, weights)
            done = start_or_resume(out, header, records, prompts, config.resume, config.allow_model_change)
            start = time.time()
            evaluation = _generate_into(out, config, model, tokenizer, encoder, records, template, done, qpr_labels)
            temperature, top_p = config.decoding()
            summary = {"model": config.model, "adapter": config.adapter, "data": config.data,
                       "split": config.split, "template": template, "max_new_tokens": config.max_new_tokens,
                       "temperature": temperature, "top_p": top_p, "seed": config.seed,
                       "paper_compat": config.paper_compat, "n_records": len(records),
                       "bertscore_encoder": encoder and encoder.name, "seconds": round(time.time() - start, 1)}
            paths = write_results(out, evaluation, summary)
    except EvaluationStopped as e:
        raise _stopped(out, str(e), len(records)) from None
    finally:
        lock.release()
    print(markdown_table(evaluation["results"]), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return evaluation


def main(argv: Sequence[str] | None = None, prog: str = "python -m ecellm.eval") -> dict:
    """Run the command line (see `python -m ecellm.eval --help`); returns what `evaluate` returned. An expected
    error ends in one line and exit status 1 (`ecellm.errors.exit_on_error`)."""
    config = parse_flags(EvalConfig, argv, prog=prog, description=__doc__.split("\n")[0])
    return exit_on_error(prog, lambda: run(config))


if __name__ == "__main__":
    main()
