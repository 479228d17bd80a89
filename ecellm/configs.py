"""The settings of `ecellm train` and `ecellm eval`, one dataclass each; every field is a flag (`ecellm.flags`).

    TrainConfig(model="smollm2", data="ECInstruct/", out="runs/x", tasks=["PM", "SA"])     # ecellm.train.train
    EvalConfig(model="smollm2", data=["test.json"], out="results/")                        # ecellm.eval.run

This module imports no torch and no model code (layer 0 of CONTRIBUTING.md's order): a command builds its settings
and checks its paths (`check_train_flags`, `check_eval_flags`) in a fraction of a second, before torch and the model
load. `ecellm.train.TrainConfig` and `ecellm.eval.EvalConfig` are these classes.
"""

from __future__ import annotations

import argparse
import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import EcellmError, FlagError
from .flags import DTYPES, dtype_name, option, positive_int
from .tasks import SETTINGS, resolve_task

# The names `--model` takes besides a folder: the real models of `ecellm.models.default.MODELS` (a test keeps the two
# equal; that module imports torch, this list does not).
MODEL_NAMES = ("smollm2", "qwen2.5-0.5b", "qwen2.5-1.5b")
TEMPLATES = ("alpaca", "mistral")  # the prompt templates of `ecellm.data.TEMPLATES`
PAPER_SAMPLING = {"temperature": 0.15, "top_p": 0.95}  # the reference's decoding of a model with an adapter


def task_name(name: str) -> str:
    """An argparse type: a task name or abbreviation (any spelling `ecellm.tasks.resolve_task` takes), as the data
    names it."""
    try:
        return resolve_task(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _comma_list(value: list[str] | str | None) -> list[str] | None:
    """A list setting given in code as a list or as one comma-separated string ("PM,SA"); None stays None."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()] or None
    return value


DATA, LORA, OPTIMIZER, LENGTH, PRECISION = "model and data", "LoRA", "optimization", "run length and checkpoints", \
    "precision and speed"


@dataclass(kw_only=True)
class TrainConfig:
    """Every setting of a training run; the defaults are the reference code's recipe (README: "Differences from the
    reference code"). Each field is a flag of `ecellm train`."""

    model: str | None = option(None, group=DATA, help=f"checkpoint directory, or a real model's name "
                               f"({', '.join(MODEL_NAMES)}); default: SmolLM2-135M-Instruct")
    data: str | None = option(None, required=True, group=DATA,
                              help="a folder with train.json and validation.json (or .jsonl), as ECInstruct ships them")
    out: str = option("runs/ecellm", group=DATA, help="the run's folder: log, checkpoints, adapter, summary")
    tasks: list[str] | None = option(None, type=task_name, split_commas=True, group=DATA, metavar="TASK",
                                     help="task names or abbreviations (PM SA, or PM,SA); default: all 10")
    setting: str = option("IND_Diverse_Instruction", choices=SETTINGS, metavar="SETTING", group=DATA,
                          help="the records' setting to train on")
    max_per_task: int = option(10000, group=DATA, help="training records kept per task (the paper caps each at 10K)")
    max_val_examples: int = option(0, group=DATA, help="validation records used (0: all)")
    template: str | None = option(None, choices=TEMPLATES, group=DATA,
                                  help="prompt template; default: mistral for Mistral models, alpaca otherwise")
    max_len: int = option(2048, group=DATA, help="tokens per example; longer ones are dropped")
    lora_r: int = option(16, group=LORA, help="LoRA rank")
    lora_alpha: float = option(16.0, group=LORA, help="LoRA scale numerator (the update is scaled by alpha / r)")
    lora_dropout: float = option(0.1, group=LORA, help="dropout on the LoRA branch's input")
    lora_targets: list[str] | None = option(None, split_commas=True, group=LORA, metavar="MODULE",
                                            help="module names to adapt (q_proj v_proj, or q_proj,v_proj); default: "
                                                 "the paper's targets for the family")
    init_adapter: str | None = option(None, group=LORA, help="start LoRA from this adapter folder (PEFT format, "
                                                             "same r, alpha and targets)")
    lr: float = option(1e-4, group=OPTIMIZER, help="peak learning rate (AdamW; linear warmup, cosine decay)")
    weight_decay: float = option(0.0, group=OPTIMIZER, help="AdamW weight decay")
    warmup_ratio: float = option(0.05, group=OPTIMIZER, help="share of the steps spent warming up")
    epochs: int = option(3, group=OPTIMIZER, help="passes over the training records")
    global_batch: int = option(128, group=OPTIMIZER, help="examples per optimizer step, over all ranks and "
                                                          "micro-batches")
    micro_batch: int = option(1, group=OPTIMIZER, help="examples per forward pass on one rank (not used with "
                                                       "--pack-tokens)")
    pack_tokens: int = option(0, aliases=["--pack"], group=OPTIMIZER, help="concatenate examples into rows of up "
                              "to N tokens, one row per forward pass (0: off)")
    loss_average: str = option("example", choices=("example", "token"), group=OPTIMIZER,
                               help="example: each example weighs the same (the paper); token: each answer token does")
    grad_clip: float = option(1.0, group=OPTIMIZER, help="max global gradient norm (0: no clipping)")
    group_by_length: bool = option(False, group=OPTIMIZER, help="batch examples of similar length together (less "
                                                                "padding; the paper samples at random)")
    seed: int = option(42, group=OPTIMIZER, help="seed of LoRA's initialisation, the sampling and the dropout")
    max_steps: int = option(0, group=LENGTH, help="stop after this many optimizer steps (0: train all epochs)")
    minutes: float = option(0.0, group=LENGTH, help="stop after the first step that ends this many minutes into "
                            "training, validated and with its adapter written (0: no limit; the learning rate "
                            "follows the planned steps)")
    stop_at_loss: float = option(0.0, group=LENGTH, help="stop once the mean training loss of the last 5 steps is "
                                 "below this, validated and with its adapter written (0: never; a curriculum's "
                                 "phase can end once it is learned)")
    eval_every: int = option(0, group=LENGTH, help="validate every N steps (0: at the end of each epoch)")
    checkpoint_every: int = option(50, group=LENGTH, help="checkpoint every N steps (and at each epoch's end)")
    keep_checkpoints: int = option(2, group=LENGTH, help="how many of the latest checkpoints to keep (0: all)")
    resume: bool = option(False, group=LENGTH, help="continue the run in --out from its newest complete checkpoint "
                                                    "(same settings)")
    overwrite: bool = option(False, group=LENGTH, help="delete the run already in --out and start over")
    allow_data_change: bool = option(False, group=LENGTH, help="let --resume continue on data files other than the "
                                                               "run started on (logged)")
    allow_model_change: bool = option(False, group=LENGTH, help="let --resume continue on base weights other than "
                                                                "the run started on (logged)")
    dtype: str = option("bf16", type=dtype_name, choices=("bf16", "fp32"), group=PRECISION,
                        help="precision of the base weights and the computation (fp32 for CPUs); LoRA weights and "
                             "optimizer state stay fp32")
    quantize: str | None = option(None, choices=("nf4",), group=PRECISION,
                                  help="nf4: the frozen base linears in 4 bits (QLoRA), one process only; default: off")
    activation_checkpointing: bool = option(False, group=PRECISION, help="recompute activations in the backward "
                                                                         "pass (less memory, more time)")
    reshard_after_forward: bool = option(True, group=PRECISION,
                                         help="under torchrun, free each block's gathered weights after its forward "
                                              "pass and gather them again for the backward (FSDP2's default; off: "
                                              "one all-gather a step instead of two, each rank holding the whole "
                                              "model until the backward is done: faster where it fits, e.g. a "
                                              "small model on CPUs)")
    compile: bool = option(False, group=PRECISION, help="torch.compile each transformer block (the first step "
                                                        "compiles)")
    dist_timeout_s: int = option(300, group=PRECISION, help="seconds ranks wait for each other before the run ends "
                                                            "naming the silent rank")

    def __post_init__(self):
        self.tasks, self.lora_targets = _comma_list(self.tasks), _comma_list(self.lora_targets)


def _default_device() -> str:
    import torch  # here: only when an evaluation is built without --device

    return "cuda" if torch.cuda.is_available() else "cpu"


# --bertscore-model's two words: the real sentence encoder (`ecellm.models.encoders.minilm_encoder`), and the
# evaluated model's own hidden states (`ecellm.metrics.ModelEncoder`); any other value is a checkpoint.
BERTSCORE_MINILM, BERTSCORE_EVALUATED_MODEL = "minilm", "model"


@dataclass(kw_only=True)
class EvalConfig:
    """Every setting of an evaluation run; each field is a flag of `ecellm eval`."""

    model: str = option(help=f"checkpoint directory (config.json + safetensors), or a real model's name "
                             f"({', '.join(MODEL_NAMES)})")
    tokenizer: str | None = option(None, help="tokenizer directory (default: --model)")
    adapter: str | None = option(None, help="LoRA adapter directory (PEFT format), merged in")
    data: list[str] = option(help="ECInstruct test file(s), JSON array or JSON Lines")
    split: str = option("test", help="records of this split")
    tasks: list[str] | None = option(None, type=task_name, split_commas=True, metavar="TASK",
                                     help="task names or abbreviations (PM SA, or PM,SA); default: all in the data")
    setting: list[str] | None = option(None, choices=SETTINGS, metavar="SETTING",
                                       help=f"settings (default: those in the data); any of {', '.join(SETTINGS)}")
    demos: list[str] | None = option(None, help="training file(s) giving 1-shot demonstrations")
    qpr_labels: str | None = option(None, help="the reference code's data_label/label.json (QPR option labels)")
    limit: int | None = option(None, type=positive_int, help="at most this many records per task and setting")
    out: str = option(help="output directory")
    template: str | None = option(None, choices=TEMPLATES, help="prompt template (default: mistral for Mistral, "
                                                                "else alpaca)")
    batch_size: int = option(8, type=positive_int, help="prompts generated together")
    max_new_tokens: int = option(100, type=positive_int, help="tokens generated per answer at most")
    sample: bool = option(False, help="the reference's sampling, temperature 0.15, top-p 0.95 (the default with "
                                      "--adapter)")
    greedy: bool = option(False, help="greedy decoding (the default without --adapter)")
    temperature: float | None = option(None, help="sampling temperature (overrides --sample's)")
    top_p: float | None = option(None, help="nucleus mass (overrides --sample's)")
    seed: int = option(0, help="sampling seed")
    paper_compat: bool = option(False, help="score with the reference evaluation's defects")
    bertscore_model: str = option(BERTSCORE_MINILM, help="AG's F_BERT encoder: 'minilm' (all-MiniLM-L6-v2, layer 6, "
                                                         "fetched and cached on first use; the default), 'model' (the "
                                                         "evaluated model's own final hidden states, the older score "
                                                         "kept for comparison), or a checkpoint folder or known "
                                                         "model's name whose final hidden states score")
    dtype: str = option("fp32", type=dtype_name, choices=tuple(DTYPES), help="precision of the weights")
    device: str = option(default_factory=_default_device, help="torch device (default: cuda when available, else cpu)")
    resume: bool = option(False, help="continue the evaluation in --out from the generations it holds (same settings "
                                      "and records)")
    overwrite: bool = option(False, help="delete the evaluation in --out and start over")
    allow_model_change: bool = option(False, help="let --resume continue although the model's or adapter's weights "
                                                 "changed since the evaluation started (logged)")

    def __post_init__(self):
        if self.sample and self.greedy:
            raise ValueError("--sample and --greedy exclude each other")

    def decoding(self) -> tuple[float, float]:
        """(temperature, top_p): the reference's choice (`ecellm.eval`'s docstring) unless flags say otherwise."""
        sample = self.sample or (self.adapter is not None and not self.greedy)
        sampling = PAPER_SAMPLING if sample else {"temperature": 0.0, "top_p": 1.0}
        temperature = sampling["temperature"] if self.temperature is None else self.temperature
        return temperature, sampling["top_p"] if self.top_p is None else self.top_p


# --- paths checked before anything loads ------------------------------------------------------------------------


class UnknownModelError(EcellmError, ValueError):
    """A model given by a name that is neither a folder nor a known model (a key of `ecellm.models.default.MODELS`)."""


def unknown_model(value: str) -> UnknownModelError:
    """The error for a `--model` value that is neither a folder nor a known name: it lists the known names and
    names the nearest one (`difflib`)."""
    nearest = difflib.get_close_matches(value, list(MODEL_NAMES), n=1, cutoff=0.6)
    hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
    return UnknownModelError(f"{value!r} is neither a folder nor a known model (known: {', '.join(MODEL_NAMES)}){hint}")


def check_model(flag: str, value: str | None) -> None:
    """Refuse a `--model`-like value that is neither a folder nor a known name, naming the nearest name."""
    if value is None or value in MODEL_NAMES or Path(value).is_dir():
        return
    raise UnknownModelError(f"{flag}: {unknown_model(value)}")


def check_tokenizer(value: str | None) -> None:
    """Refuse a `--tokenizer` that is neither a tokenizer file nor what `--model` takes."""
    if value is not None and not Path(value).is_file():
        check_model("--tokenizer", value)


def check_folder(flag: str, value: str | None, holds: tuple[str, ...] = ()) -> None:
    """Refuse a folder flag whose folder does not exist or lacks one of the files `holds` names (each entry may
    offer alternatives: "train.json|train.jsonl")."""
    if value is None:
        return
    if not Path(value).is_dir():
        raise FlagError(f"{flag} {value}: no such folder")
    for alternatives in holds:
        names = alternatives.split("|")
        if not any((Path(value) / name).is_file() for name in names):
            raise FlagError(f"{flag} {value}: no {' or '.join(names)} in this folder")


def check_files(flag: str, values: list[str] | str | None) -> None:
    """Refuse a file flag (one or several files) whose file does not exist."""
    for value in [values] if isinstance(values, str) else values or []:
        if not Path(value).is_file():
            raise FlagError(f"{flag} {value}: no such file")


def check_out(flag: str, value: str) -> None:
    """Refuse an output folder that cannot be used: a file, or under a folder this user cannot write to."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise FlagError(f"{flag} {value}: not a folder")
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise FlagError(f"{flag} {value}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FlagError(f"{flag} {value}: {existing} is not writable")


def check_train_flags(flags: TrainConfig | argparse.Namespace) -> None:
    """Refuse, before torch and the model load, the paths `ecellm train` cannot use: the data folder and its files,
    the model, the initial adapter, the output folder."""
    check_folder("--data", flags.data, holds=("train.json|train.jsonl", "validation.json|validation.jsonl"))
    check_model("--model", flags.model)
    check_folder("--init-adapter", flags.init_adapter)
    check_out("--out", flags.out)


def check_eval_flags(flags: EvalConfig | argparse.Namespace) -> None:
    """Refuse, before torch and the model load, the paths `ecellm eval` cannot use: data, demonstration and label
    files, the models, tokenizer and adapter, the output folder."""
    check_files("--data", flags.data)
    check_files("--demos", flags.demos)
    check_files("--qpr-labels", flags.qpr_labels)
    check_model("--model", flags.model)
    if flags.bertscore_model not in (BERTSCORE_MINILM, BERTSCORE_EVALUATED_MODEL):
        check_model("--bertscore-model", flags.bertscore_model)
    check_tokenizer(flags.tokenizer)
    check_folder("--adapter", flags.adapter)
    check_out("--out", flags.out)
