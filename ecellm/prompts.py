"""Prompts of a test record in each evaluation setting: the 1-shot demonstration, and settings derived from the
diverse-instruction records (single instruction, unseen instruction, 1-shot).

Layer: data (imports data and tasks; no model, generation or evaluation code), so the source builders use it too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .data import SETTINGS, prompt_segments
from .errors import EcellmError
from .tasks import TASK_BY_NAME

ONE_SHOT = "_1-shot"


class PromptError(EcellmError, ValueError):
    """A record that cannot give the prompt or setting asked for (no demonstration, no base records)."""


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
        raise PromptError(f"{record['task']} record has no few_shot_example for a 1-shot prompt")
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
    """The prompt of a test record: `ecellm.data.format_prompt`, with the demonstration of 1-shot settings (the
    joined `prompt_parts`).

    Args:
        record: an ECInstruct record.
        template: "alpaca" or "mistral".
    """
    return "".join(prompt_parts(record, template))


def prompt_parts(record: dict, template: str) -> list[str]:
    """`build_prompt`'s prompt as the template's markup and the record's text in turn (`ecellm.data.prompt_segments`,
    the 1-shot demonstration inside the instruction's text); joined, it is `build_prompt(record, template)`.

    Args:
        record: an ECInstruct record.
        template: "alpaca" or "mistral".
    """
    if record["setting"].endswith(ONE_SHOT):
        record = {**record, "instruction": one_shot_instruction(record)}
    return prompt_segments(record, template)


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
        raise PromptError(f"unknown setting {setting!r}; expected one of {list(SETTINGS)}")
    domain = setting.split("_")[0]
    base_setting = f"{domain}_Diverse_Instruction"
    if setting == base_setting:
        raise PromptError(f"{setting} is the base setting; it must be in the data")
    base = [r for r in records if r["setting"] == base_setting]
    if not base:
        raise PromptError(f"cannot build {setting}: no {base_setting} records to build it from")
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
                raise PromptError(f"cannot build {setting}: {r['task']} test record {i} needs training record {i} "
                                 f"as its demonstration, but the demonstrations hold {len(pool)} "
                                 f"(pass the training file with --demos)")
            new["few_shot_example"] = _demonstration(pool[i])
        out.append(new)
    return out
