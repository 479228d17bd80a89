"""A training run's folder (`--out`): its checkpoints, its log and what a resume reads back.

    out/config.json             the run's settings and the fingerprints of its data and base weights
    out/log.jsonl               one JSON record per step and per validation
    out/checkpoints/step_N/     adapter/ (PEFT format), trainer.safetensors (AdamW's tensors), trainer.json
                                (`TrainerState`: step, scheduler, optimizer hyper-parameters, every rank's RNG
                                states, best validation loss, whether the step's validation is still due)

Checkpoints are written to a temporary directory and renamed (`ecellm.files.write_dir_atomically`), so an interrupted
write leaves the previous one usable, and they are read with JSON and safetensors only: nothing is unpickled.
`prepare_out` applies the run-folder rules of `ecellm.runs` (new run, `--overwrite`, `--resume`). Nothing here knows
about ranks: `ecellm.train` gathers the tensors on every rank and calls these on the main one.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import peft_format
from .errors import EcellmError
from .files import (
    open_to_append,
    read_json,
    refuse_link,
    strict_json,
    write_dir_atomically,
    write_json,
    write_text_atomically,
)
from .lock import FolderLock
from .models.loading import CheckpointError
from .runs import FolderKind, check_flags, check_folder, check_settings, check_unchanged, clear


class TrainingError(EcellmError, RuntimeError):
    """A run that cannot go on (non-finite loss, bad configuration)."""


class ResumeError(TrainingError):
    """A checkpoint that cannot be resumed from (a missing, truncated or non-finite part)."""


TRAINING = FolderKind(job="training run", marker="config.json")
TRAINER_JSON, TRAINER_TENSORS = "trainer.json", "trainer.safetensors"


@dataclass
class TrainerState:
    """Where a run stands, beside its weights and AdamW's tensors: what `trainer.json` holds, field by field."""

    step: int  # optimizer steps taken
    scheduler: dict  # the learning-rate scheduler's state_dict
    param_groups: list[dict]  # AdamW's hyper-parameters, per parameter group
    rng: list[dict]  # every rank's random generator states (`rng_state`), in rank order
    best_val: float | None  # the lowest validation loss so far (None: none yet), and its step
    best_step: int | None
    tokens_seen: int  # input tokens of all steps, over all ranks
    last_loss: float | None = None  # the training loss of the latest step applied
    validation_due: bool = False  # the step's validation had not ended when the checkpoint was written

    def to_json(self) -> str:
        """The state as strict JSON (non-finite numbers as null)."""
        return strict_json(dataclasses.asdict(self))

    @classmethod
    def read(cls, file: Path) -> TrainerState:
        """The state in `file`, or `ResumeError` naming the fields it lacks."""
        saved = json.loads(file.read_text())
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in saved]
        if missing:
            raise ResumeError(f"{file.parent}: {file.name} lacks the fields {missing}")
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


# --- the tensors a checkpoint holds -------------------------------------------------------------------------------


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor from a parameter that may be an FSDP2 shard (DTensor)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()



def optimizer_state(trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's state as full CPU tensors keyed `<parameter name>/<key>` (collective under FSDP)."""
    return {
        f"{name}/{key}": full_tensor(value)
        for name, p in trainable.items()
        for key, value in optimizer.state.get(p, {}).items()
    }


def param_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The hyper-parameters of each of the optimizer's parameter groups (JSON-ready)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def load_optimizer_state(
    trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list
) -> None:
    """Inverse of `optimizer_state`: full tensors go back to each parameter's device, re-sharded like it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for key, value in tensors.items():
        name, state_key = key.rsplit("/", 1)
        p = trainable[name]
        if isinstance(p, DTensor) and value.shape == p.shape:
            value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        elif state_key != "step":
            value = value.to(p.device)
        optimizer.state[p][state_key] = value
    for group, saved_group in zip(optimizer.param_groups, groups):
        group.update(saved_group)


def rng_state() -> dict[str, list]:
    """This process's random number generators (python, numpy, torch, cuda) as plain JSON-ready lists."""
    version, words, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached_gauss],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, list]) -> None:
    """Inverse of `rng_state`."""
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# --- writing, choosing and pruning checkpoints --------------------------------------------------------------------


def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    """The run's `checkpoints/step_N` directories as (N, path), ordered by step number."""
    found = []
    for path in (out / "checkpoints").glob("step_*"):
        number = re.fullmatch(r"step_(\d+)", path.name)
        if number and path.is_dir():
            found.append((int(number[1]), path))
    return sorted(found)


def prune_checkpoints(out: Path, step: int, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints up to `step` (keep 0: delete none). Newer ones, which a resume
    skipped as damaged, are not counted: they stay until this run overwrites them."""
    if keep:
        for _, path in [c for c in checkpoint_dirs(out) if c[0] <= step][:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def write_adapter(model: nn.Module, model_dir: str, directory: Path, weights: dict[str, torch.Tensor]) -> None:
    """Write the LoRA `weights` of `model` (full tensors by name) to `directory` in PEFT format, all at once.

    Args:
        model: the model with LoRA layers (for the adapter's config: r, alpha, targets).
        model_dir: the base model's directory, recorded as `base_model_name_or_path`.
        directory: the adapter directory to create or replace.
        weights: the LoRA parameters as full CPU tensors, by name.
    """
    write_dir_atomically(
        directory, lambda tmp: peft_format.save_adapter(model, tmp, base_model_name_or_path=model_dir, weights=weights)
    )


def copy_lora_weights(model: nn.Module, saved: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `saved` LoRA weights (read from `source`) into `model`'s LoRA layers, after checking that they are the
    same tensors in the same shapes (else `TrainingError`, naming `source`; the model is left as it was)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    wrong = [f"{n} {tuple(saved[n].shape)} vs {tuple(p.shape)}" for n, p in params.items()
             if n in saved and saved[n].shape != p.shape]
    if missing or extra or wrong:
        raise TrainingError(f"{source} does not fit this run's LoRA layers (other targets, r or model): missing "
                            f"{missing[:4]}, unexpected {extra[:4]}, other shapes {wrong[:4]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def load_initial_adapter(model: nn.Module, path: Path, r: int, alpha: float) -> None:
    """Copy the LoRA weights of the adapter directory `path` into `model`'s freshly injected layers, to train further
    from them (`--init-adapter`). The adapter must have the run's `r`, `alpha` and target modules; everything is
    checked first, so a refused adapter leaves the model as it was."""
    saved_config = peft_format.read_adapter_config(path)
    if saved_config["lora_alpha"] != alpha or saved_config["r"] != r:
        raise TrainingError(
            f"init_adapter: {path / peft_format.ADAPTER_CONFIG} has r={saved_config['r']}, lora_alpha="
            f"{saved_config['lora_alpha']}; this run has r={r}, lora_alpha={alpha} (train with the adapter's values)"
        )
    copy_lora_weights(model, peft_format.read_adapter_weights(path), path / peft_format.ADAPTER_WEIGHTS)


def checkpoint_dir(out: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives: `out/checkpoints/step_N` (N zero-padded to 8 digits)."""
    return out / "checkpoints" / f"step_{step:08d}"


def write_checkpoint(
    out: Path, model: nn.Module, model_dir: str, weights: dict[str, torch.Tensor],
    optim_tensors: dict[str, torch.Tensor], state: TrainerState, keep: int,
) -> Path:
    """Write one checkpoint all at once, then delete all but the `keep` newest (see `prune_checkpoints`).

    Args:
        out: the run's folder.
        model, model_dir, weights: the adapter, as `write_adapter` takes it.
        optim_tensors: AdamW's tensors (from `optimizer_state`).
        state: the trainer state (its step names the checkpoint).
        keep: how many checkpoints to keep (0: all).
    Returns:
        the checkpoint directory.
    """

    def write(tmp: Path) -> None:
        peft_format.save_adapter(model, tmp / "adapter", base_model_name_or_path=model_dir, weights=weights)
        save_file(optim_tensors, str(tmp / TRAINER_TENSORS))
        (tmp / TRAINER_JSON).write_text(state.to_json())

    refuse_link(out / "checkpoints")
    final = write_dir_atomically(checkpoint_dir(out, state.step), write)
    prune_checkpoints(out, state.step, keep)
    return final


def rewrite_trainer_state(checkpoint: Path, state: TrainerState) -> None:
    """Replace a checkpoint's trainer state (after the validation it was written before), atomically."""
    write_text_atomically(checkpoint / TRAINER_JSON, state.to_json())


def read_checkpoint(path: Path) -> tuple[TrainerState, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's trainer state, optimizer tensors and LoRA weights, every file read in full.

    Only JSON and safetensors are read: a `trainer.pt` (a pickle) is never loaded.

    Raises:
        ResumeError: a missing, truncated or unreadable file, a missing field, or a non-finite tensor.
    """
    readers = {
        TRAINER_JSON: TrainerState.read,
        f"adapter/{peft_format.ADAPTER_CONFIG}": lambda file: json.loads(file.read_text()),
        TRAINER_TENSORS: lambda file: load_file(str(file)),
        f"adapter/{peft_format.ADAPTER_WEIGHTS}": lambda file: peft_format.read_adapter_weights(file.parent),
    }
    parts = []
    for name, read in readers.items():
        if not (path / name).is_file():
            pickled = " (its trainer.pt, a pickle, is never loaded)" if (path / "trainer.pt").exists() else ""
            raise ResumeError(f"{path}: missing {name}{pickled}")
        try:
            parts.append(read(path / name))
        except CheckpointError as e:  # read, but refused (e.g. NaN/Inf): the message names the file and tensor
            raise ResumeError(f"{path}: {name} is refused ({e})") from e
        except (OSError, ValueError, TypeError, SafetensorError) as e:
            raise ResumeError(f"{path}: {name} is unreadable ({type(e).__name__}: {e})") from e
    state, _, optim, weights = parts
    bad = [name for name, t in optim.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # (read_adapter_weights already refused non-finite LoRA weights)
        raise ResumeError(f"{path}: {TRAINER_TENSORS} holds non-finite values in {bad[:3]}")
    return state, optim, weights


def latest_checkpoint(out: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that reads completely (`read_checkpoint`), and what is wrong with each newer one."""
    damaged = []
    for _, path in reversed(checkpoint_dirs(out)):
        try:
            read_checkpoint(path)
            return path, damaged
        except ResumeError as e:
            damaged.append(str(e))
    return None, damaged


# --- the output folder --------------------------------------------------------------------------------------------

CONFIG, LOG = "config.json", "log.jsonl"
DATA_FINGERPRINT = "data_fingerprint"  # config.json's record of the data files (`ecellm.data.Records.fingerprints`)
MODEL_FINGERPRINT = "model_fingerprint"  # and of the base model's weights (`ecellm.runs.fingerprint_files`)


def append_log(out: Path, record: dict) -> None:
    """Append one record to `out/log.jsonl` as a line of strict JSON."""
    with open_to_append(out / LOG) as f:
        f.write(strict_json(record) + "\n")


def trim_log(out: Path, step: int, validated: bool) -> None:
    """Keep the log's records up to `step` (later ones are redone by the resumed run), but for the validation of
    `step` itself unless `validated`; drop a line cut short."""
    log_file = out / LOG
    if not log_file.is_file():
        return
    kept = []
    for line in log_file.read_text().splitlines():
        try:
            record = json.loads(line)
            if record["step"] < step or (record["step"] == step and (validated or record["type"] != "eval")):
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # the last line of a killed run may be cut short
    write_text_atomically(log_file, "".join(kept))


def prepare_out(out: Path, settings: dict, lock: FolderLock, log: Callable[[str], None]) -> str | None:
    """Make `out` ready for this run (main rank only); returns the name of the checkpoint to resume from, if any.

    Nothing is written before `lock` is taken: a second run into the same `out` is refused while the first one
    holds it (`ecellm.lock.FolderBusy`). The rules of `ecellm.runs.check_folder` decide what a new run,
    `--overwrite` and `--resume` do; a resume continues under the same settings (`ecellm.runs.check_settings`) from
    the newest complete checkpoint, with the log cut back to that step.

    Args:
        out: the run's folder.
        settings: the run's settings as config.json records them (`dataclasses.asdict(TrainConfig)`), with the
            booleans "resume" and "overwrite".
        lock: the folder's lock (`FolderLock(out, ...)`), taken here; the caller releases it when the run ends.
        log: writes one progress line.
    """
    resume = settings["resume"]
    check_flags(out, TRAINING, resume, settings["overwrite"])
    lock.acquire(log)
    overwritten = check_folder(out, TRAINING, resume, settings["overwrite"])
    if overwritten:
        log(f"--overwrite: deleting the previous run in {out}")
        clear(out, overwritten, log)
    if not resume:
        write_json(out / CONFIG, settings)
        return None
    saved = read_json(out / CONFIG, TrainingError)
    check_settings(out / CONFIG, {k: v for k, v in saved.items() if not k.endswith("_fingerprint")}, settings,
                   TRAINING)
    checkpoint, damaged = latest_checkpoint(out)
    for damage in damaged:
        log(f"--resume: skipping a newer checkpoint, {damage}")
    if checkpoint is None and damaged:
        raise TrainingError(f"--resume: no readable checkpoint in {out / 'checkpoints'}: {'; '.join(damaged)}")
    if checkpoint is None:
        log(f"--resume: no checkpoint in {out / 'checkpoints'} yet, starting the run from step 0")
        trim_log(out, 0, validated=True)
        return None
    state = TrainerState.read(checkpoint / TRAINER_JSON)
    trim_log(out, state.step, validated=not state.validation_due)
    return checkpoint.name


def check_inputs(out: Path, inputs: dict[str, dict[str, dict]], resume_step: int | None, allowed: dict[str, bool],
                 log: Callable[[str], None]) -> None:
    """Record the files a run reads (data, base weights) in its config.json, or on a resume check they are the ones
    the run started on.

    Args:
        out: the run's folder (its config.json written by `prepare_out`).
        inputs: `DATA_FINGERPRINT` and/or `MODEL_FINGERPRINT` -> file -> fingerprint.
        resume_step: the step a resume continues from (0 before any checkpoint); None for a new run.
        allowed: the same keys -> whether the run's flag allows a change (--allow-data-change,
            --allow-model-change); an allowed change is logged and written to log.jsonl as a "data_change" or
            "model_change" record, and the new fingerprints recorded.
        log: writes one progress line.
    Raises:
        RunFolderError: a resume on changed files that is not allowed, naming each file and what changed.
    """
    settings = read_json(out / CONFIG, TrainingError)
    for key, fingerprints in inputs.items():
        saved, what = settings.get(key), key.removesuffix("_fingerprint")
        if resume_step is None:
            continue
        if saved is None:
            log(f"--resume: {out / CONFIG} records no {what} fingerprint: the {what} files cannot be checked; "
                "recording them now")
            continue
        flag = f"--allow-{what}-change"
        changes = check_unchanged(f"the {what} files", saved, fingerprints, flag, allowed[key], TRAINING, log)
        if changes:
            append_log(out, {"type": f"{what}_change", "step": resume_step, "changes": changes})
    write_json(out / CONFIG, {**settings, **inputs})
