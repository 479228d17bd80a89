"""Evaluation: generate answers to ECInstruct test records, parse and score them per task and setting as the paper does.

    python -m ecellm.eval --model DIR [--adapter DIR] --data test.json --tasks PM SA \\
        --setting IND_Diverse_Instruction OOD_Diverse_Instruction --out results/

prints a table per task and setting (primary metric, secondary figures, n, n_failed) and writes `results.json`,
`results.md` and the raw generations `generations.jsonl` to `--out`. In code: `evaluate(model, tokenizer, records)`.

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

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ecellm.data import SETTINGS, TASK_BY_NAME, TASKS, format_prompt, load_records, parse_response, resolve_task
from ecellm.generate import generate_text
from ecellm.metrics import ModelEncoder, score

PAPER_SAMPLING = {"temperature": 0.15, "top_p": 0.95}
ONE_SHOT = "_1-shot"


# --- settings -----------------------------------------------------------------------------------------------
def one_shot_instruction(record: dict) -> str:
    """The instruction of a 1-shot prompt: the record's instruction followed by its demonstration.

    The demonstration (`few_shot_example`, JSON of a training record's `input`, optional `options` and `output`)
    is written in the template's section style::

        {instruction}

        ### Example Input:
        {input}

        ### Example Options:      (only when the demonstration has options)
        {options}

        ### Example Response:
        {output}

    A `few_shot_example` that is not such a JSON object is placed verbatim under `### Example:`.

    Args:
        record: an ECInstruct record with a non-empty `few_shot_example`.
    """
    text = record.get("few_shot_example")
    if not text:
        raise ValueError(f"{record['task']} record has no few_shot_example for a 1-shot prompt")
    try:
        demo = json.loads(text)
    except ValueError:
        demo = None
    if not (isinstance(demo, dict) and isinstance(demo.get("input"), str) and isinstance(demo.get("output"), str)):
        return f"{record['instruction']}\n\n### Example:\n{text}"
    options = f"\n\n### Example Options:\n{demo['options']}" if demo.get("options") else ""
    return (f"{record['instruction']}\n\n### Example Input:\n{demo['input']}{options}"
            f"\n\n### Example Response:\n{demo['output']}")


def build_prompt(record: dict, template: str) -> str:
    """The prompt of a test record: `ecellm.data.format_prompt`, with the demonstration of 1-shot settings.

    Args:
        record: an ECInstruct record.
        template: "alpaca" or "mistral".
    """
    if record["setting"].endswith(ONE_SHOT):
        record = {**record, "instruction": one_shot_instruction(record)}
    return format_prompt(record, template)


def _demonstration(record: dict) -> str:
    demo = {"input": record["input"]}
    if record.get("options"):
        demo["options"] = record["options"]
    demo["output"] = record["output"]
    return json.dumps(demo)


def derive_setting(records: Sequence[dict], setting: str, demos: Sequence[dict] | None = None) -> list[dict]:
    """Build the records of `setting` from the same domain's `*_Diverse_Instruction` records.

    Args:
        records: test records; those of `{IND|OOD}_Diverse_Instruction` are the base.
        setting: one of `ecellm.data.SETTINGS`.
        demos: training records (`IND_Diverse_Instruction`, split train) for a 1-shot setting whose base records
            have no `few_shot_example`; test record i of a task gets training record i of the same task.
    Returns:
        copies of the base records with `setting` set and the instruction or demonstration changed.
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; expected one of {list(SETTINGS)}")
    domain = setting.split("_")[0]
    base_setting = f"{domain}_Diverse_Instruction"
    if setting == base_setting:
        raise ValueError(f"{setting} is the base setting; it must be in the data")
    base = [r for r in records if r["setting"] == base_setting]
    if not base:
        raise ValueError(f"cannot build {setting}: no {base_setting} records to build it from")
    train_by_task: dict[str, list[dict]] = {}
    for r in demos or ():
        if r["split"] == "train" and r["setting"] == "IND_Diverse_Instruction":
            train_by_task.setdefault(r["task"], []).append(r)
    out, seen = [], {}
    for r in base:
        new = {**r, "setting": setting}
        info = TASK_BY_NAME[r["task"]]
        if setting.endswith("_Single_Instruction"):
            new["instruction"] = info.seed_instruction
        elif setting.endswith("_Unseen_Instruction"):
            new["instruction"] = info.unseen_instruction
        elif not r.get("few_shot_example"):
            i = seen[r["task"]] = seen.get(r["task"], -1) + 1
            pool = train_by_task.get(r["task"], [])
            if i >= len(pool):
                raise ValueError(f"cannot build {setting}: {r['task']} test record {i} needs training record {i} "
                                 f"as its demonstration, but the demonstrations hold {len(pool)} "
                                 f"(pass the training file with --demos)")
            new["few_shot_example"] = _demonstration(pool[i])
        out.append(new)
    return out


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
    try:
        labels = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(labels, list):
        raise ValueError(f"{path}: expected a JSON list of label lists, got {type(labels).__name__}")
    for i, entry in enumerate(labels):
        if not isinstance(entry, list) or not all(label in ("E", "S", "C", "I") for label in entry):
            raise ValueError(f"{path}: entry {i} is {entry!r}, expected a list of ESCI labels such as ['E', 'S']")
    return labels


# --- evaluation ---------------------------------------------------------------------------------------------
def evaluate(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[dict],
    *,
    template: str = "alpaca",
    batch_size: int = 8,
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    paper_compat: bool = False,
    encoder=None,
    qpr_labels: Sequence[Sequence[str]] | None = None,
    progress: bool = True,
) -> dict:
    """Generate an answer for every record and score each (task, setting) group as the paper does.

    Args:
        model: an ecellm model (any family), in eval mode.
        tokenizer: its `ecellm.tokenizer` tokenizer.
        records: ECInstruct records (`instruction`, `input`, `options`, `output`, `task`, `setting`; 1-shot
            settings also `few_shot_example`); each is scored under its own task and setting.
        template: prompt template, "alpaca" or "mistral".
        batch_size: prompts per generation batch (prompts of all tasks are grouped by length).
        max_new_tokens: most tokens generated per answer (the paper: 100).
        temperature: 0 for greedy decoding; the paper's sampling is temperature 0.15 with top_p 0.95.
        top_p: nucleus-sampling mass.
        seed: seed of sampling (ignored when greedy).
        paper_compat: score with the reference evaluation's defects (see `ecellm.metrics`). In both modes AVE
            outputs of a T5 model (`model.config.model_type == "t5"`) are parsed as evaluate_T5.py does
            (`ecellm.metrics.parse_ave_t5`: Flan-T5 cannot write braces), others as evaluate.py does.
        encoder: AG's BERTScore encoder; default `ModelEncoder(model, tokenizer)` (the evaluated model itself).
        qpr_labels: ESCI labels of the QPR options, per QPR record of each setting in order (see `references`).
        progress: show a tqdm progress bar.
    Returns:
        {"results": one `score` dict per (task, setting) with "setting" added, in the paper's task order, then
         setting order,
         "generations": per record {"index", "task", "setting", "prompt", "generation", "prediction",
         "reference"}}; "generation" is the decoded continuation, "prediction" the answer read from it (the text
         after the template's response marker in prompt + generation, stripped; for T5 the generation itself).
    """
    model.eval()  # no dropout (LoRA's included) while generating
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault((resolve_task(r["task"]), r["setting"]), []).append(i)
    refs = {key: references(key[0], [records[i] for i in idx], qpr_labels) for key, idx in groups.items()}
    prompts = [build_prompt(r, template) for r in records]
    generations = generate_text(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                temperature=temperature, top_p=top_p, seed=seed, progress=progress)
    seq2seq = model.config.model_type == "t5"
    predictions = generations if seq2seq else [parse_response(p + g, template) for p, g in zip(prompts, generations)]
    ave_parser = "t5" if seq2seq else "json"
    results = []
    task_order = [t.name for t in TASKS]
    for (task, setting), idx in sorted(groups.items(), key=lambda kv: (task_order.index(kv[0][0]),
                                                                        SETTINGS.index(kv[0][1]))):
        if task == "Answer_Generation" and encoder is None:
            encoder = ModelEncoder(model, tokenizer, batch_size=batch_size)
        result = score(task, [predictions[i] for i in idx], refs[task, setting], setting=setting,
                       paper_compat=paper_compat, ave_parser=ave_parser, encoder=encoder)
        results.append({"task": result.pop("task"), "setting": setting, **result})
    gens = [{"index": i, "task": r["task"], "setting": r["setting"], "prompt": prompts[i], "generation": generations[i],
             "prediction": predictions[i], "reference": r["output"]} for i, r in enumerate(records)]
    return {"results": results, "generations": gens}


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


def write_outputs(out_dir: str | Path, evaluation: dict, config: dict) -> dict[str, Path]:
    """Write `results.json` (config + results), `results.md` (the table) and `generations.jsonl` to `out_dir`.

    Args:
        out_dir: output directory (created if needed).
        evaluation: what `evaluate` returned.
        config: how the run was made (model, data, decoding, ...), stored in `results.json`.
    Returns:
        name -> path written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "generations": out / "generations.jsonl"}
    paths["json"].write_text(json.dumps({"config": config, "results": evaluation["results"]}, indent=2) + "\n",
                             encoding="utf-8")
    paths["markdown"].write_text(markdown_table(evaluation["results"]), encoding="utf-8")
    with open(paths["generations"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(g, ensure_ascii=False) + "\n" for g in evaluation["generations"])
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


def _positive_int(text: str) -> int:
    """An argparse type: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _task(name: str) -> str:
    """An argparse type: a task name or abbreviation, as the data names it."""
    try:
        return resolve_task(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ecellm.eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT format), merged into the model")
    p.add_argument("--data", required=True, nargs="+", help="ECInstruct test file(s), JSON array or JSON Lines")
    p.add_argument("--split", default="test", help="records of this split (default: test)")
    p.add_argument("--tasks", nargs="+", type=_task, help="task names or abbreviations (default: all in the data)")
    p.add_argument("--setting", nargs="+", choices=SETTINGS, metavar="SETTING",
                   help=f"settings (default: those in the data); one of {', '.join(SETTINGS)}")
    p.add_argument("--demos", nargs="+", help="training file(s) giving 1-shot demonstrations")
    p.add_argument("--qpr-labels", help="the reference code's data_label/label.json (QPR option labels)")
    p.add_argument("--limit", type=_positive_int, help="at most this many records per task and setting")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--template", choices=("alpaca", "mistral"), help="default: mistral for Mistral, else alpaca")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--max-new-tokens", type=_positive_int, default=100)
    decoding = p.add_mutually_exclusive_group()
    decoding.add_argument("--sample", action="store_true",
                          help="the reference's sampling, temperature 0.15, top-p 0.95 (default with --adapter)")
    decoding.add_argument("--greedy", action="store_true", help="greedy decoding (default without --adapter)")
    p.add_argument("--temperature", type=float, help="sampling temperature (overrides --sample's)")
    p.add_argument("--top-p", type=float, help="nucleus mass (overrides --sample's)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--paper-compat", action="store_true", help="score with the reference evaluation's defects")
    p.add_argument("--bertscore-model", help="checkpoint whose embeddings score AG (default: the evaluated model)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the command line (see `python -m ecellm.eval --help`); returns what `evaluate` returned."""
    from ecellm.lora import load_adapter, merge
    from ecellm.models import from_pretrained
    from ecellm.tokenizer import load_tokenizer

    args = _parser().parse_args(argv)
    dtype = getattr(torch, args.dtype)
    tasks = args.tasks
    records = load_records(args.data, split=args.split, tasks=tasks)
    if not records:
        raise SystemExit(f"no {args.split} records{' of ' + ', '.join(tasks) if tasks else ''} in {args.data}")
    demos = load_records(args.demos, split="train", tasks=tasks) if args.demos else None
    records = select_records(records, args.setting, demos, args.limit)
    qpr_labels = load_qpr_labels(args.qpr_labels) if args.qpr_labels else None

    model = from_pretrained(args.model, dtype=dtype, device=args.device)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    tokenizer.check_fits(model.config.vocab_size, args.model)
    if args.adapter:
        model = merge(load_adapter(model, args.adapter)).eval()
    template = args.template or ("mistral" if model.config.model_type == "mistral" else "alpaca")
    sample = args.sample or (args.adapter is not None and not args.greedy)  # the reference's choice (docstring)
    sampling = PAPER_SAMPLING if sample else {"temperature": 0.0, "top_p": 1.0}
    temperature = sampling["temperature"] if args.temperature is None else args.temperature
    top_p = sampling["top_p"] if args.top_p is None else args.top_p
    encoder = None
    if args.bertscore_model:
        bert_model = from_pretrained(args.bertscore_model, dtype=dtype, device=args.device)
        bert_tokenizer = load_tokenizer(args.bertscore_model)
        bert_tokenizer.check_fits(bert_model.config.vocab_size, args.bertscore_model)
        encoder = ModelEncoder(bert_model, bert_tokenizer, batch_size=args.batch_size)

    start = time.time()
    evaluation = evaluate(model, tokenizer, records, template=template, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=top_p, seed=args.seed,
                          paper_compat=args.paper_compat, encoder=encoder, qpr_labels=qpr_labels)
    config = {"model": args.model, "adapter": args.adapter, "data": args.data, "split": args.split,
              "template": template, "max_new_tokens": args.max_new_tokens, "temperature": temperature,
              "top_p": top_p, "seed": args.seed, "paper_compat": args.paper_compat,
              "bertscore_encoder": args.bertscore_model or args.model, "n_records": len(records),
              "seconds": round(time.time() - start, 1)}
    paths = write_outputs(args.out, evaluation, config)
    print(markdown_table(evaluation["results"]), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return evaluation


if __name__ == "__main__":
    main()
