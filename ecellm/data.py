"""ECInstruct: loading the released files, the eCeLLM prompt templates, training examples, batching, sampling.

The facts implemented here (fields, settings, splits, task names, templates) are in the project spec
`ECINSTRUCT.md` and its `tasks.json`. The flow from a user's files to a training batch:

    records = load_records("train.json", split="train", setting="IND_Diverse_Instruction")
    examples, report = build_examples(records, tokenizer, "alpaca", max_len=2048)
    sampler = LengthGroupedBatchSampler([len(e["input_ids"]) for e in examples], batch_size=8, seed=0)
    for idx in sampler:
        batch = collate([examples[i] for i in idx], tokenizer.pad_id)   # (B, T) tensors

Tokenization: as the reference code (finetune.py line 213-239), a decoder-only training example is the
tokenization of prompt + answer as ONE text, the first `len(encode(prompt))` labels masked, then EOS. With
sentencepiece (Llama-2, Mistral) the answer after the prompt's newline therefore starts with "A" (29909), not
"▁A" (319) as a separate tokenization would give. Where joint tokenization merges the prompt's last token with the
answer's first (byte-level BPE only, for an answer that is a newline or starts with a newline and more
whitespace: the prompt's final newline and the answer's first become one double-newline token; sentencepiece's
newline is a byte token that never merges), the masked length is still the prompt's own, as in the reference: the
merged token is masked and the answer's first newline is never a target. A record too long for `max_len` loses
the end of its `input` text, never its answer (the reference cut the end of the joined text, answer and EOS
included). T5 follows finetune_T5.py line 153-174: the prompt + EOS is the encoder input, the answer + EOS the target.

Control tokens: a record's text (instruction, input, options, answer) is data, often written by strangers. By
default a special-token string in it (`</s>`, `<|im_end|>`) is encoded as the text it is, so a record cannot end
its prompt or answer early; the template's own markup is encoded as markup (`prompt_segments`,
`Tokenizer.encode_parts`). `controls_in_text=True` gives the reference code's tokenization, where such strings in a
`tokenizer.json` model's data become control ids. With no such string in a record both give the same ids.
"""

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import EcellmError
from .labels import IGNORE_INDEX  # -100: positions without loss
from .tasks import SETTINGS, TASK_BY_ABBR, TASK_BY_NAME, TASKS, TaskInfo, resolve_task  # noqa: F401 (public here)

# --- splits (the tasks and settings are in ecellm.tasks) ----------------------------------------------------
SPLITS = ("train", "val", "test")


# --- prompt templates ---------------------------------------------------------------------------------------
_PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides further context. "
             "Write a response that appropriately completes the request.\n\n")
# template -> (text before the instruction, text before "### Response:" marker end, response marker)
TEMPLATES = {
    "alpaca": {"start": _PREAMBLE, "end": "### Response:\n", "response_split": "### Response:"},
    "mistral": {"start": "[INST] " + _PREAMBLE, "end": " [/INST] ### Response:\n",
                "response_split": "[/INST] ### Response:"},
}


def prompt_segments(record: dict, template: str = "alpaca") -> list[str]:
    """The prompt of a record as markup and record text in turn: [markup, instruction, markup, input, markup] or,
    with options, [markup, instruction, markup, input, markup, options, markup]; joined, `format_prompt`'s text.
    `Tokenizer.encode_parts` takes it: the template's markup may hold control tokens, the record's text never does."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {sorted(TEMPLATES)}")
    t = TEMPLATES[template]
    head = [f"{t['start']}### Instruction:\n", record["instruction"], "\n\n### Input:\n", record["input"]]
    options = record.get("options")
    if options:
        return head + ["\n\n### Options:\n", options, "\n\n" + t["end"]]
    return head + ["\n\n" + t["end"]]


def format_prompt(record: dict, template: str = "alpaca") -> str:
    """The eCeLLM prompt of a record, exactly as the paper's code builds it.

    Args:
        record: a dict with `instruction`, `input` and optionally `options` (a string holding the serialized
            list, used verbatim, never parsed; the options form is used when it is non-empty).
        template: "alpaca" (Llama-2, Phi-2, Flan-T5 and others) or "mistral" (the `[INST]` form).
    Returns:
        the prompt, ending with the response marker and its newline.
    """
    return "".join(prompt_segments(record, template))


def parse_response(text: str, template: str = "alpaca") -> str:
    """The model's answer in a decoded output, as the reference's `Prompter.get_response` (utils/prompter.py line
    47-48): the text between the template's own response marker (`### Response:` for alpaca, `[/INST] ### Response:`
    for mistral) and the next one, stripped.

    Args:
        text: the prompt followed by its continuation, as the reference code passes it (a continuation alone that
            repeats the marker would yield the text after the repeat). Text without the marker is returned
            stripped (the reference raises IndexError).
        template: "alpaca" or "mistral", the template the prompt was built with.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {sorted(TEMPLATES)}")
    parts = text.split(TEMPLATES[template]["response_split"])
    return (parts[1] if len(parts) > 1 else parts[0]).strip()


# --- loading ------------------------------------------------------------------------------------------------
REQUIRED_FIELDS = ("instruction", "input", "output", "task", "setting", "split")
OPTIONAL_FIELDS = ("options", "few_shot_example")  # a string, null, or absent


class RecordError(EcellmError, ValueError):
    """A bad record: names the file, the record index (0-based) and the field."""

    def __init__(self, file, index: int | None, field: str | None, problem: str):
        self.file, self.index, self.field, self.problem = str(file), index, field, problem
        where = [self.file] + ([f"record {index}"] if index is not None else [])
        where += [f"field {field!r}"] if field is not None else []
        super().__init__(f"{': '.join(where)}: {problem}")


class Records(list):
    """The selected records (a list of dicts) with an account of everything else that was read.

    Attributes:
        n_read: records read from the files (bad ones included).
        skipped: reason -> count of bad records skipped (only with skip_bad=True).
        n_filtered: good records not selected by split / setting / tasks.
        origins: (file, record index within the file) of each selected record, in order.
        fingerprints: file -> {"bytes", "records", "sha256"} of every file read: its size, the records in it and
            the SHA-256 of its bytes, taken while reading (a changed file is told apart from the one a run used).
    """

    def __init__(self, records=(), n_read: int = 0, skipped: Counter | None = None, n_filtered: int = 0,
                 origins: list[tuple[str, int]] | None = None, fingerprints: dict[str, dict] | None = None):
        super().__init__(records)
        self.n_read, self.skipped, self.n_filtered = n_read, skipped or Counter(), n_filtered
        self.origins, self.fingerprints = origins or [], fingerprints or {}

    def summary(self) -> str:
        lines = [f"{len(self)} records selected of {self.n_read} read; {self.n_filtered} not selected; "
                 f"{sum(self.skipped.values())} bad records skipped"]
        lines += [f"  skipped {n}: {reason}" for reason, n in sorted(self.skipped.items())]
        return "\n".join(lines)


_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone surrogate: json.loads accepts "\\ud800", UTF-8 cannot hold it


def _check_record(rec) -> tuple[str | None, str, str] | None:
    """(field, reason, message) for a bad record, None for a good one; `rec` is only read.

    The reason is what `Records.skipped` counts: "missing field 'x'", "mistyped field 'x'", "invalid text in field
    'x'" (a lone surrogate), "unknown task", "unknown setting", "unknown split", "not a JSON object"."""
    if not isinstance(rec, dict):
        return None, "not a JSON object", f"not a JSON object but {type(rec).__name__}"
    for field in REQUIRED_FIELDS:
        if field not in rec:
            return field, f"missing field {field!r}", "missing"
        if not isinstance(rec[field], str):
            return field, f"mistyped field {field!r}", f"is {type(rec[field]).__name__}, expected a string"
    for field in OPTIONAL_FIELDS:
        if rec.get(field) is not None and not isinstance(rec[field], str):
            return (field, f"mistyped field {field!r}",
                    f"is {type(rec[field]).__name__}, expected a string or null")
    for field in REQUIRED_FIELDS + OPTIONAL_FIELDS:
        text = rec.get(field) or ""
        surrogate = None if text.isascii() else _SURROGATE.search(text)  # isascii() is free: CPython knows it
        if surrogate:
            return (field, f"invalid text in field {field!r}",
                    f"holds a lone surrogate {surrogate[0].encode('unicode_escape').decode()} at character "
                    f"{surrogate.start()}, which is not valid Unicode (a JSON escape such as \\ud800 without its pair)")
    try:
        resolve_task(rec["task"])
    except ValueError:
        return "task", "unknown task", f"unknown task {rec['task']!r}"
    if rec["setting"] not in SETTINGS:
        return "setting", "unknown setting", f"unknown setting {rec['setting']!r}"
    if rec["split"] not in SPLITS:
        return "split", "unknown split", f"unknown split {rec['split']!r}"
    return None


_WS = re.compile(r"[ \t\n\r]*")


def _position(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    return f"line {line} column {pos - (text.rfind(chr(10), 0, pos) + 1) + 1}"


def _read_array(text: str, file: Path):
    """Yield (index, record) from a JSON array, one element at a time so errors can name the record."""
    decoder = json.JSONDecoder()
    pos = _WS.match(text, text.index("[") + 1).end()
    if text.startswith("]", pos):
        return
    index = 0
    while True:
        try:
            rec, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise RecordError(file, index, None, f"broken JSON at line {e.lineno} column {e.colno}: {e.msg} "
                                                 "(a broken JSON array cannot be skipped past)") from None
        yield index, rec
        pos = _WS.match(text, pos).end()
        if text.startswith(",", pos):
            pos, index = _WS.match(text, pos + 1).end(), index + 1
        elif text.startswith("]", pos) and _WS.match(text, pos + 1).end() == len(text):
            return
        else:
            raise RecordError(file, index, None, f"broken JSON after this record at {_position(text, pos)}: "
                                                 "expected ',' or ']' (a broken JSON array cannot be skipped past)")


def _decode(data: bytes, file: Path, index: int | None, line_offset: int = 0) -> str:
    """`data` as UTF-8 text, or a RecordError naming the file, the line and the byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line_offset + data.count(b"\n", 0, e.start) + 1
        raise RecordError(file, index, None, f"not UTF-8 text: byte 0x{data[e.start]:02x} on line {line} "
                                             f"({e.reason}); save the file as UTF-8") from None


def _read_file(file: Path, skip_bad: bool, skipped: Counter, digest):
    """Yield (index, record) of a JSON array or JSON Lines file; broken JSON lines are skipped when asked. Every
    byte read goes into `digest` (a hashlib object) as it is read."""
    with open(file, "rb") as f:
        start = f.read(4096).lstrip()
    if start.startswith(b"["):
        data = file.read_bytes()
        digest.update(data)
        yield from _read_array(_decode(data, file, None), file)
        return
    with open(file, "rb") as f:
        index = 0
        for lineno, raw in enumerate(f, 1):
            digest.update(raw)
            line = _decode(raw, file, index, lineno - 1)
            if not line.strip():
                continue
            try:
                yield index, json.loads(line)
            except json.JSONDecodeError as e:
                if not skip_bad:
                    raise RecordError(file, index, None, f"broken JSON on line {lineno} column {e.colno}: "
                                                         f"{e.msg}") from None
                skipped["broken JSON"] += 1
            index += 1


def _as_set(value, name: str, allowed) -> set[str] | None:
    if value is None:
        return None
    values = {value} if isinstance(value, str) else set(value)
    unknown = values - set(allowed)
    if unknown:
        raise ValueError(f"unknown {name} {sorted(unknown)}; expected some of {list(allowed)}")
    return values


def load_records(paths, *, split=None, setting=None, tasks=None, skip_bad: bool = False) -> Records:
    """Read ECInstruct records from the files users download, checked and selected.

    Args:
        paths: one path or a list of paths; each a JSON array (`train.json` as released) or JSON Lines.
        split: "train", "val" or "test" (or a list of them); None keeps all.
        setting: a setting name such as "IND_Diverse_Instruction" (or a list); None keeps all.
        tasks: task names, abbreviations or reference-code spellings (a string or a list); None keeps all.
        skip_bad: count and skip bad records instead of raising. A broken JSON array always raises.
    Returns:
        `Records`: a list of record dicts in file order, `task` rewritten to the canonical name, extra fields
        (e.g. `synthetic`) kept; `.skipped` counts bad records by reason, `.summary()` reports it all.
    Raises:
        RecordError naming the file, record index and field: a missing or mistyped field (the 6 string fields
        instruction, input, output, task, setting, split; options and few_shot_example a string or null), an
        unknown task, setting or split, broken JSON.
        FileNotFoundError for a missing file.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    splits = _as_set(split, "split", SPLITS)
    settings = _as_set(setting, "setting", SETTINGS)
    task_names = None if tasks is None else {resolve_task(t) for t in ([tasks] if isinstance(tasks, str) else tasks)}
    out, skipped, n_parsed, n_filtered, origins, fingerprints = [], Counter(), 0, 0, [], {}
    for file in map(Path, paths):
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file")
        digest, n_in_file = hashlib.sha256(), 0
        for index, rec in _read_file(file, skip_bad, skipped, digest):
            n_parsed, n_in_file = n_parsed + 1, n_in_file + 1
            bad = _check_record(rec)
            if bad is not None:
                field, reason, problem = bad
                if not skip_bad:
                    raise RecordError(file, index, field, problem)
                skipped[reason] += 1
                continue
            rec["task"] = resolve_task(rec["task"])  # the canonical name (the record was just parsed: ours to change)
            if ((splits is not None and rec["split"] not in splits)
                    or (settings is not None and rec["setting"] not in settings)
                    or (task_names is not None and rec["task"] not in task_names)):
                n_filtered += 1
                continue
            out.append(rec)
            origins.append((str(file), index))
        fingerprints[str(file)] = {"bytes": file.stat().st_size, "records": n_in_file, "sha256": digest.hexdigest()}
    return Records(out, n_read=n_parsed + skipped["broken JSON"], skipped=skipped, n_filtered=n_filtered,
                   origins=origins, fingerprints=fingerprints)


# --- training examples --------------------------------------------------------------------------------------
@dataclass
class BuildReport:
    """What `build_examples` did to fit records into the length limits.

    Attributes:
        n_records: records given.
        n_truncated: examples whose `input` text was cut in the middle of the prompt (answer kept whole).
        tokens_cut: prompt tokens removed in total.
        dropped: indices of records dropped because even without their `input` they do not fit (or, for T5,
            their answer is longer than the target limit).
    """

    n_records: int
    n_truncated: int
    tokens_cut: int
    dropped: list[int]

    def __str__(self) -> str:
        return (f"{self.n_records} records: {self.n_truncated} truncated ({self.tokens_cut} prompt tokens cut), "
                f"{len(self.dropped)} dropped as too long")


def _encode(tokenizer, batch: list[list[str]], bos: bool | None, eos: bool | None,
            controls_in_text: bool) -> list[list[int]]:
    """The ids of each list of `prompt_segments` (markup and record text in turn): special-token strings in the
    markup become control ids, those in the record's text only with `controls_in_text`."""
    if controls_in_text:
        return tokenizer.encode_batch(["".join(parts) for parts in batch], bos=bos, eos=eos)
    return tokenizer.encode_parts_batch(batch, bos=bos, eos=eos)


def _fit_prompt(ids: list[int], budget: int, record: dict, tokenizer, template: str, eos: bool,
                controls_in_text: bool) -> list[int] | None:
    """Cut a prompt's token ids to `budget` by removing the end of its `input` text, keeping the head
    (BOS, preamble, instruction, "### Input:") and the tail (options, response marker, EOS); None if the head
    and tail alone exceed the budget."""
    if len(ids) <= budget:
        return ids
    segments = prompt_segments(record, template)  # head: segments[:3], input: segments[3], tail: segments[4:]
    n_head = len(_encode(tokenizer, [segments[:3]], None, False, controls_in_text)[0])
    n_tail = len(_encode(tokenizer, [segments[4:]], False, eos, controls_in_text)[0])
    keep = budget - n_head - n_tail
    if keep < 0:
        return None
    return ids[:n_head + keep] + ids[len(ids) - n_tail:]


def _causal_example(record, full_ids, n_prompt, tokenizer, template, max_len, controls_in_text) -> dict | None:
    prompt_ids, answer_ids = full_ids[:n_prompt], full_ids[n_prompt:] + [tokenizer.eos_id]
    fitted = _fit_prompt(prompt_ids, max_len - len(answer_ids), record, tokenizer, template, False, controls_in_text)
    if fitted is None:
        return None
    return {"input_ids": fitted + answer_ids, "labels": [IGNORE_INDEX] * len(fitted) + answer_ids,
            "n_cut": len(prompt_ids) - len(fitted)}


def build_example(record: dict, tokenizer, template: str = "alpaca", max_len: int = 2048, *,
                  controls_in_text: bool = False) -> dict | None:
    """One decoder-only training example, tokenized and masked as the reference code does.

    `encode(prompt + answer)` followed by EOS; the first `len(encode(prompt))` labels are -100 (see the module
    docstring for the tokens this gives at the prompt/answer boundary).

    Args:
        record: an ECInstruct record (`instruction`, `input`, `options`, `output`).
        tokenizer: an `ecellm.tokenizer.Tokenizer`; the text gets the family's BOS rule, never an EOS of its own.
        template: "alpaca" or "mistral".
        max_len: the longest sequence allowed. A longer example loses the end of its `input` text (the answer
            is never cut); if even the rest of the prompt plus the answer do not fit, the record is dropped.
        controls_in_text: False (the default): a special-token string in the record's text (`</s>`, `<|im_end|>`
            in a review) is encoded as text, so data cannot end a prompt or an answer early; the template's own
            markup still gives control tokens (`Tokenizer.encode_parts`). True: such strings become control ids, as
            the reference code's tokenizer call made them.
    Returns:
        {"input_ids": list (L,), "labels": list (L,) with -100 on the prompt, "n_cut": prompt tokens removed},
        or None when the record is dropped.
    """
    segments = prompt_segments(record, template)
    full_ids, prompt_ids = _encode(tokenizer, [segments + [record["output"]], segments], None, False,
                                   controls_in_text)
    return _causal_example(record, full_ids, len(prompt_ids), tokenizer, template, max_len, controls_in_text)


def _seq2seq_example(record, source_ids, target_ids, tokenizer, template, max_source_len, max_target_len,
                     controls_in_text) -> dict | None:
    target_ids = target_ids + [tokenizer.eos_id]
    if len(target_ids) > max_target_len:
        return None
    fitted = _fit_prompt(source_ids, max_source_len, record, tokenizer, template, True, controls_in_text)
    if fitted is None:
        return None
    return {"input_ids": fitted, "labels": target_ids, "n_cut": len(source_ids) - len(fitted)}


def build_seq2seq_example(record: dict, tokenizer, template: str = "alpaca", max_source_len: int = 2048,
                          max_target_len: int = 2048, *, controls_in_text: bool = False) -> dict | None:
    """One encoder-decoder (T5) example: the prompt is the encoder input, the answer the target.

    Args:
        record, tokenizer, template, controls_in_text: as `build_example`.
        max_source_len: the longest encoder input (prompt + EOS); a longer one loses the end of its `input` text.
        max_target_len: the longest target (answer + EOS); a longer answer drops the record (never cut). The
            reference's one cutoff_len, 2048, limits the target too (finetune_T5.py line 171, where it cuts).
    Returns:
        {"input_ids": list (S,) ending with EOS, "labels": list (L,) = answer + EOS, "n_cut": int}, or None.
    """
    [source_ids] = _encode(tokenizer, [prompt_segments(record, template)], False, True, controls_in_text)
    [target_ids] = _encode(tokenizer, [["", record["output"]]], False, False, controls_in_text)
    return _seq2seq_example(record, source_ids, target_ids, tokenizer, template, max_source_len, max_target_len,
                            controls_in_text)


def build_examples(records: list[dict], tokenizer, template: str = "alpaca", max_len: int = 2048, *,
                   seq2seq: bool = False, max_target_len: int = 2048,
                   controls_in_text: bool = False) -> tuple[list[dict], BuildReport]:
    """`build_example` (or `build_seq2seq_example` with seq2seq=True, max_len then being the source limit) over
    many records, tokenizing in batches. Returns the kept examples in record order and a `BuildReport` that
    counts every truncated and dropped record. `controls_in_text` as `build_example`: by default a record's text
    never yields a control token."""
    segments = [prompt_segments(r, template) for r in records]
    prompts = _encode(tokenizer, segments, False if seq2seq else None, seq2seq, controls_in_text)
    if seq2seq:
        targets = _encode(tokenizer, [["", r["output"]] for r in records], False, False, controls_in_text)
    else:
        targets = _encode(tokenizer, [p + [r["output"]] for p, r in zip(segments, records)], None, False,
                          controls_in_text)
    examples, dropped, n_truncated, tokens_cut = [], [], 0, 0
    for i, (record, prompt_ids, target_ids) in enumerate(zip(records, prompts, targets)):
        if seq2seq:
            ex = _seq2seq_example(record, prompt_ids, target_ids, tokenizer, template, max_len, max_target_len,
                                  controls_in_text)
        else:
            ex = _causal_example(record, target_ids, len(prompt_ids), tokenizer, template, max_len, controls_in_text)
        if ex is None:
            dropped.append(i)
            continue
        n_truncated += ex["n_cut"] > 0
        tokens_cut += ex["n_cut"]
        examples.append(ex)
    return examples, BuildReport(len(records), n_truncated, tokens_cut, dropped)


# --- batching -----------------------------------------------------------------------------------------------
def _pad(seqs: list[list[int]], value: int, side: str, multiple_of: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    width = -(-width // multiple_of) * multiple_of
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        else:
            out[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
    return out


LOSS_AVERAGES = ("example", "token")


def loss_token_count(labels: list[int], seq2seq: bool) -> int:
    """How many labels of one example carry loss: its T5 targets, or a decoder's labels after the first (position t
    predicts token t+1, so label 0 is never a target)."""
    return sum(label != IGNORE_INDEX for label in (labels if seq2seq else labels[1:]))


def example_loss_weight(labels: list[int], loss_average: str, seq2seq: bool) -> int:
    """An example's share of the step's loss normaliser: 1 per example with an answer ("example"), or its number of
    loss tokens ("token"). The step loss is the sum of weighted token losses divided by the sum of these."""
    n = loss_token_count(labels, seq2seq)
    return min(n, 1) if loss_average == "example" else n


def label_weights(labels: list[int], loss_average: str, seq2seq: bool) -> list[float]:
    """The weight of each label's loss, aligned with `labels`.

    "example" (the reference: micro-batch 1, so each example's loss is the mean over its own answer tokens and every
    example weighs the same) gives each loss token 1/n, n being its example's loss tokens; "token" gives 1, so long
    answers weigh more. Labels without loss get 0. The weights of one example sum to `example_loss_weight`.

    Args:
        labels: one example's labels (-100 where no loss is taken).
        loss_average: "example" or "token".
        seq2seq: T5 targets (every label counts) rather than decoder labels (label 0 never does).
    Returns:
        a list of len(labels) floats.
    """
    if loss_average not in LOSS_AVERAGES:
        raise ValueError(f"loss_average must be one of {LOSS_AVERAGES}, got {loss_average!r}")
    n = loss_token_count(labels, seq2seq)
    weight = 1.0 / n if loss_average == "example" and n else 1.0
    weights = [weight if label != IGNORE_INDEX else 0.0 for label in labels]
    if not seq2seq and weights:
        weights[0] = 0.0
    return weights


def _pad_floats(seqs: list[list[float]], side: str, multiple_of: int) -> torch.Tensor:
    width = -(-max(len(s) for s in seqs) // multiple_of) * multiple_of
    out = torch.zeros(len(seqs), width)
    for i, s in enumerate(seqs):
        if side == "right":
            out[i, :len(s)] = torch.tensor(s)
        else:
            out[i, width - len(s):] = torch.tensor(s)
    return out


def collate(examples: list[dict], pad_id: int, padding_side: str = "right", multiple_of: int = 8,
            seq2seq: bool = False, loss_average: str | None = None) -> dict[str, torch.Tensor]:
    """Pad a list of examples into a batch.

    Args:
        examples: dicts with "input_ids" (list) and optionally "labels" (list); other keys are ignored.
        pad_id: the id written into padding (`tokenizer.pad_id`; 0 for models without a pad token).
        padding_side: "right" for training, "left" for generation (prompts end where generation starts).
        multiple_of: the padded length is rounded up to a multiple of this (8 in the paper).
        seq2seq: labels are T5 targets of their own length, right-padded with -100 independently of the inputs.
        loss_average: "example" or "token" to add each label's loss weight (`label_weights`).
    Returns:
        input_ids (B, T) long, attention_mask (B, T) long (1 on tokens), labels (B, T) long with -100 on padding
        ((B, T_target) for seq2seq) when the examples carry labels, and with `loss_average` loss_weights float
        shaped like labels (0 on padding).
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not examples:
        raise ValueError("collate: no examples")
    ids = [e["input_ids"] for e in examples]
    batch = {"input_ids": _pad(ids, pad_id, padding_side, multiple_of),
             "attention_mask": _pad([[1] * len(s) for s in ids], 0, padding_side, multiple_of)}
    if "labels" in examples[0]:
        labels = [e["labels"] for e in examples]
        if not seq2seq:
            for i, (a, b) in enumerate(zip(ids, labels)):
                if len(a) != len(b):
                    raise ValueError(f"collate: example {i} has {len(a)} input_ids but {len(b)} labels")
        label_side = "right" if seq2seq else padding_side
        batch["labels"] = _pad(labels, IGNORE_INDEX, label_side, multiple_of)
        if loss_average is not None:
            weights = [label_weights(x, loss_average, seq2seq) for x in labels]
            batch["loss_weights"] = _pad_floats(weights, label_side, multiple_of)
    return batch


class LengthGroupedBatchSampler:
    """Batches of indices of similar length, for less padding; deterministic and rank-aware.

    Each epoch shuffles all indices (seed + epoch), sorts them by length within groups of `group_batches` global
    batches, cuts global batches of `batch_size * world_size` and shuffles their order. A rank takes every
    `world_size`-th index of each global batch, so all ranks see similar lengths at every step and the same number
    of steps. Unless `drop_last`, the index list is wrapped around to fill the last global batch (as
    `torch.utils.data.DistributedSampler` does), so a few examples repeat.

    Args:
        lengths: length (tokens) of each example, N values.
        batch_size: examples per batch on one rank.
        seed: shuffling seed; call `set_epoch(e)` each epoch for a new order.
        rank, world_size: this process's place in distributed training.
        drop_last: drop the incomplete last global batch instead of wrapping around.
        group_batches: how many global batches are sorted together (larger: less padding, less randomness).
    """

    def __init__(self, lengths, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, group_batches: int = 50):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or group_batches < 1:
            raise ValueError(f"batch_size ({batch_size}) and group_batches ({group_batches}) must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last, self.group_batches, self.epoch = drop_last, group_batches, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n, g = len(self.lengths), self.batch_size * self.world_size
        return n // g if self.drop_last else -(-n // g)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        g = self.batch_size * self.world_size
        perm = rng.permutation(len(self.lengths))
        perm = perm[:len(self) * g] if self.drop_last else np.resize(perm, len(self) * g)
        batches = []
        for start in range(0, len(perm), g * self.group_batches):
            group = perm[start:start + g * self.group_batches]
            group = group[np.argsort(-self.lengths[group], kind="stable")]
            batches += [group[i:i + g] for i in range(0, len(group), g)]
        for b in rng.permutation(len(batches)):
            yield batches[b][self.rank::self.world_size].tolist()


# --- packing ------------------------------------------------------------------------------------------------
def _packed_length(example: dict, seq2seq: bool) -> int:
    return max(len(example["input_ids"]), len(example["labels"])) if seq2seq else len(example["input_ids"])


def pack_examples(examples: list[dict], budget: int, seq2seq: bool = False) -> list[list[dict]]:
    """Group examples into rows of at most `budget` tokens, first fit in the given (shuffled) order.

    Each example goes into the first row that still has room for it, else it opens a new row, so a row holds
    examples in stream order and no example moves further than the rows the stream fills. An example longer than
    the budget gets a row of its own. For T5 an example's length is the longer of its input and its target (the
    encoder and the decoder rows are packed side by side).

    Args:
        examples: dicts with "input_ids" and "labels".
        budget: the most tokens in one row.
        seq2seq: T5 examples.
    Returns:
        the rows, each a list of examples.
    """
    rows: list[list[dict]] = []
    room: list[int] = []
    for ex in examples:
        n = _packed_length(ex, seq2seq)
        row = next((r for r, free in enumerate(room) if free >= n), None)
        if row is None:
            rows.append([])
            room.append(budget)
            row = len(rows) - 1
        rows[row].append(ex)
        room[row] -= n
    return rows


def _concat_segments(parts: list[list], pad, width: int) -> tuple[list, list[int]]:
    """One packed row: the parts concatenated and padded to `width`, and each token's segment id (padding: one more
    id, a segment of its own)."""
    row = [x for part in parts for x in part]
    segments = [i for i, part in enumerate(parts) for _ in part]
    return row + [pad] * (width - len(row)), segments + [len(parts)] * (width - len(row))


def _row_width(rows: list[list[list]], multiple_of: int) -> int:
    return -(-max(sum(map(len, parts)) for parts in rows) // multiple_of) * multiple_of


def collate_packed(rows: list[list[dict]], pad_id: int, multiple_of: int = 8, seq2seq: bool = False,
                   loss_average: str = "example") -> dict[str, torch.Tensor]:
    """Concatenate each row's examples into one sequence, with the segment ids that keep them apart.

    The models attend only within a segment and restart positions at 0 in each (see their `segment_ids`), so each
    example gets the logits it would get alone; loss weights are computed per example (`label_weights`). A decoder
    example's first label is set to -100 (it is a prompt token, never a target), so no position predicts the next
    example's first token. Rows are right-padded to a common length; padding is a segment of its own.

    Args:
        rows: from `pack_examples`; each a non-empty list of examples with "input_ids" and "labels".
        pad_id: the id written into padding.
        multiple_of: the row length is rounded up to a multiple of this.
        seq2seq: T5 examples: inputs and targets are packed side by side, example i being segment i of both.
        loss_average: "example" or "token".
    Returns:
        input_ids (R, T), segment_ids (R, T), labels (R, T) (T5: (R, T_target)), loss_weights shaped like labels,
        and for T5 decoder_segment_ids (R, T_target).
    """
    if not rows or not all(rows):
        raise ValueError("collate_packed: no rows, or an empty row")
    inputs = [[ex["input_ids"] for ex in row] for row in rows]
    labels = [[ex["labels"] if seq2seq else [IGNORE_INDEX] + ex["labels"][1:] for ex in row] for row in rows]
    weights = [[label_weights(x, loss_average, seq2seq) for x in row] for row in labels]
    width, label_width = _row_width(inputs, multiple_of), _row_width(labels, multiple_of)
    ids, segments = zip(*(_concat_segments(parts, pad_id, width) for parts in inputs))
    targets, target_segments = zip(*(_concat_segments(parts, IGNORE_INDEX, label_width) for parts in labels))
    batch = {
        "input_ids": torch.tensor(ids),
        "segment_ids": torch.tensor(segments),
        "labels": torch.tensor(targets),
        "loss_weights": torch.tensor([_concat_segments(parts, 0.0, label_width)[0] for parts in weights]),
    }
    if seq2seq:
        batch["decoder_segment_ids"] = torch.tensor(target_segments)
    return batch


# --- sampling for studies -----------------------------------------------------------------------------------
def sample_per_task(records: list[dict], n: int, seed: int = 0) -> list[dict]:
    """At most `n` records per task (the paper caps training at 10K per task), chosen at random with `seed`
    (independently per task, so adding a task does not change another's sample), in their original order."""
    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_task.setdefault(r["task"], []).append(i)
    keep = set()
    for task, idx in by_task.items():
        keep.update(idx if len(idx) <= n else random.Random(f"{seed}/{task}").sample(idx, n))
    return [r for i, r in enumerate(records) if i in keep]


def leave_one_category_out(records: list[dict], field: str, category: str) -> tuple[list[dict], list[dict]]:
    """Split a user's records into in-domain records and an out-of-domain test of one held-out category.

    Args:
        records: record dicts that carry a top-level `field` (e.g. "category" added by the user).
        field: the key naming each record's category.
        category: the value to hold out.
    Returns:
        (kept, held_out): the records of other categories unchanged, and copies of the held-out ones with
        `split` = "test" and `setting` switched from IND_* to OOD_* (OOD scoring rules key on that).
    """
    kept, held_out, seen = [], [], set()
    for i, r in enumerate(records):
        if field not in r:
            raise RecordError("<records>", i, field, "missing (the category field for leave-one-category-out)")
        seen.add(r[field])
        if r[field] == category:
            setting = r.get("setting", "IND_Diverse_Instruction")
            held_out.append({**r, "split": "test", "setting": "OOD_" + setting.removeprefix("IND_")
                             .removeprefix("OOD_")})
        else:
            kept.append(r)
    if not held_out:
        raise ValueError(f"no record has {field} == {category!r}; values present: {sorted(map(str, seen))[:20]}")
    return kept, held_out
