"""A training run's folder (`--out`): its checkpoints, its log and the rules for reusing it.

    out/config.json             the run's settings (a resume must match them, but for RESUMABLE_CHANGES)
    out/log.jsonl               one JSON record per step and per validation
    out/checkpoints/step_N/     adapter/ (PEFT format), trainer.safetensors (AdamW's tensors), trainer.json (step,
                                scheduler, optimizer hyper-parameters, every rank's RNG states, best validation loss)

Checkpoints are written to a temporary directory and renamed (`ecellm.files.write_dir_atomically`), so an interrupted
write leaves the previous one usable, and they are read with JSON and safetensors only: nothing is unpickled.
`prepare_out` decides what a new run, `--overwrite` or `--resume` does with the folder. Nothing here knows about
ranks: `ecellm.train` gathers the tensors on every rank and calls these on the main one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import peft_format
from .files import read_json, strict_json, write_dir_atomically, write_json
from .lock import LOCK_NAME, FolderLock
from .models.loading import CheckpointError
from .errors import EcellmError


class TrainingError(EcellmError, RuntimeError):
    """A run that cannot go on (non-finite loss, bad configuration)."""


class ResumeError(TrainingError):
    """A checkpoint that cannot be resumed from (a missing, truncated or non-finite part)."""


TRAINER_JSON, TRAINER_TENSORS = "trainer.json", "trainer.safetensors"
TRAINER_FIELDS = ("step", "scheduler", "param_groups", "rng", "best_val", "best_step", "tokens_seen")


# --- the tensors a checkpoint holds -------------------------------------------------------------------------------


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor from a parameter that may be an FSDP2 shard (DTensor)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()



def optimizer_state(
    trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW's state as full CPU tensors keyed `<parameter name>/<key>` (collective under FSDP), and the
    hyper-parameters of each parameter group (JSON-ready)."""
    tensors = {
        f"{name}/{key}": full_tensor(value)
        for name, p in trainable.items()
        for key, value in optimizer.state.get(p, {}).items()
    }
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, groups


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


def checkpoint_dir(out: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives: `out/checkpoints/step_N` (N zero-padded to 8 digits)."""
    return out / "checkpoints" / f"step_{step:08d}"


def write_checkpoint(
    out: Path, model: nn.Module, model_dir: str, weights: dict[str, torch.Tensor],
    optim_tensors: dict[str, torch.Tensor], trainer: dict, keep: int,
) -> Path:
    """Write one checkpoint all at once, then delete all but the `keep` newest (see `prune_checkpoints`).

    Args:
        out: the run's folder.
        model, model_dir, weights: the adapter, as `write_adapter` takes it.
        optim_tensors: AdamW's tensors (from `optimizer_state`).
        trainer: the JSON-ready trainer state, with every key of `TRAINER_FIELDS` (its "step" names the checkpoint).
        keep: how many checkpoints to keep (0: all).
    Returns:
        the checkpoint directory.
    """

    def write(tmp: Path) -> None:
        peft_format.save_adapter(model, tmp / "adapter", base_model_name_or_path=model_dir, weights=weights)
        save_file(optim_tensors, str(tmp / TRAINER_TENSORS))
        (tmp / TRAINER_JSON).write_text(strict_json(trainer))

    final = write_dir_atomically(checkpoint_dir(out, trainer["step"]), write)
    prune_checkpoints(out, trainer["step"], keep)
    return final


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's trainer state (`trainer.json`), optimizer tensors and LoRA weights, every file read in full.

    Only JSON and safetensors are read: a `trainer.pt` (the pickle format of older versions) is never loaded.

    Raises:
        ResumeError: a missing, truncated or unreadable file, a missing field, or a non-finite tensor.
    """
    adapter_weights = f"adapter/{peft_format.ADAPTER_WEIGHTS}"
    readers = {
        TRAINER_JSON: lambda file: json.loads(file.read_text()),
        "adapter/adapter_config.json": lambda file: json.loads(file.read_text()),
        TRAINER_TENSORS: lambda file: load_file(str(file)),
        adapter_weights: lambda file: peft_format.read_adapter_weights(file.parent),
    }
    parts = []
    for name, read in readers.items():
        if not (path / name).is_file():
            pickled = (path / "trainer.pt").exists()
            old = " (its trainer.pt, the pickle format of older versions, is never loaded)" if pickled else ""
            raise ResumeError(f"{path}: missing {name}{old}")
        try:
            parts.append(read(path / name))
        except CheckpointError as e:  # read, but refused (e.g. NaN/Inf): the message names the file and tensor
            raise ResumeError(f"{path}: {name} is refused ({e})") from e
        except (OSError, ValueError, SafetensorError) as e:
            raise ResumeError(f"{path}: {name} is unreadable ({type(e).__name__}: {e})") from e
    trainer, _, optim, weights = parts
    missing = [key for key in TRAINER_FIELDS if key not in trainer]
    if missing:
        raise ResumeError(f"{path}: {TRAINER_JSON} lacks the fields {missing}")
    bad = [name for name, t in optim.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # (read_adapter_weights already refused non-finite LoRA weights)
        raise ResumeError(f"{path}: {TRAINER_TENSORS} holds non-finite values in {bad[:3]}")
    return trainer, optim, weights


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

# Settings a resumed run may change: where and how often it writes, and how long ranks wait for each other. Every
# other field (one added later included) shapes the run's mathematics and must keep its saved value.
RESUMABLE_CHANGES = {
    "out", "resume", "overwrite", "checkpoint_every", "keep_checkpoints", "eval_every", "dist_timeout_s", "minutes",
    "allow_data_change",
}
DATA_FINGERPRINT = "data_fingerprint"  # config.json's record of the data files (`ecellm.data.Records.fingerprints`)


def check_same_settings(saved_file: Path, settings: dict) -> None:
    """Refuse to resume the run recorded in `saved_file` (its config.json) under other `settings`, naming them."""
    try:
        saved = read_json(saved_file)
    except (OSError, ValueError) as e:
        raise TrainingError(f"--resume: cannot read the run's settings in {saved_file}: {e}") from e
    new, absent = settings, "<absent>"
    changed = [
        f"{key}: {saved.get(key, absent)!r} -> {new.get(key, absent)!r}"
        for key in sorted(set(saved) | set(new))
        if key not in RESUMABLE_CHANGES | {DATA_FINGERPRINT} and saved.get(key, absent) != new.get(key, absent)
    ]
    if changed:
        raise TrainingError(
            f"--resume with settings other than {saved_file} records would mix two runs; differing: "
            f"{'; '.join(changed)}. Resume with the saved values, or start a new run (another --out, or --overwrite)"
        )


def trim_log(log_file: Path, step: int) -> None:
    """Keep the log's records up to `step` (later ones are redone by the resumed run); drop a line cut short."""
    if not log_file.is_file():
        return
    kept = []
    for line in log_file.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # the last line of a killed run may be cut short
    tmp = log_file.with_name(log_file.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, log_file)


def prepare_out(out: Path, settings: dict, lock: FolderLock, log: Callable[[str], None]) -> str | None:
    """Make `out` ready for this run (main rank only); returns the name of the checkpoint to resume from, if any.

    Nothing is written before `lock` is taken: a second run into the same `out` is refused while the first one
    holds it (`ecellm.lock.FolderBusy`). A new run needs an `out` that is absent or empty (but for the config.json
    of a start that failed before writing anything else); `--overwrite` first deletes the run in it. `--resume`
    continues the run in `out` under the same settings, from its newest complete checkpoint, with the log cut back
    to that step; a missing or empty `out` is an error.

    Args:
        out: the run's folder.
        settings: the run's settings as config.json records them (`dataclasses.asdict(TrainConfig)`), with the
            booleans "resume" and "overwrite".
        lock: the folder's lock (`FolderLock(out, ...)`), taken here; the caller releases it when the run ends.
        log: writes one progress line.
    """
    resume, overwrite = settings["resume"], settings["overwrite"]
    if resume and overwrite:
        raise TrainingError("--resume continues the run in --out and --overwrite deletes it: pass one of them")
    if resume and not out.is_dir():
        raise TrainingError(f"--resume: {out} does not exist, so there is no run to continue (a typo?); start a new "
                            "run without --resume")
    lock.acquire(log)
    held = sorted(p.name for p in out.iterdir() if p.name not in ("config.json", LOCK_NAME))
    if resume and not held:
        raise TrainingError(f"--resume: {out} holds no run to continue (no log, no checkpoint); start a new run "
                            "without --resume")
    if held and overwrite:
        if not (out / "config.json").is_file():
            raise TrainingError(f"--overwrite: {out} holds {held[:5]} but no config.json (no ecellm run): not deleted")
        log(f"--overwrite: deleting the previous run in {out}")
        for name in held:  # all but the lock this run holds
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink()
    elif held and not resume:
        raise TrainingError(
            f"{out} already holds a run ({', '.join(held[:5])}): pass --resume to continue it, --overwrite to delete "
            "it and start over, or choose another --out"
        )
    if not resume:
        write_json(out / "config.json", settings)
        return None
    check_same_settings(out / "config.json", settings)
    checkpoint, damaged = latest_checkpoint(out)
    for damage in damaged:
        log(f"--resume: skipping a newer checkpoint, {damage}")
    if checkpoint is None and damaged:
        raise TrainingError(f"--resume: no readable checkpoint in {out / 'checkpoints'}: {'; '.join(damaged)}")
    if checkpoint is None:
        log(f"--resume: no checkpoint in {out / 'checkpoints'} yet, starting the run from step 0")
    trim_log(out / "log.jsonl", int(checkpoint.name.split("_")[1]) if checkpoint else 0)
    return checkpoint.name if checkpoint else None


def check_data(out: Path, fingerprints: dict[str, dict], resume_step: int | None, allow_change: bool,
               log: Callable[[str], None]) -> None:
    """Record the data a run reads in its config.json, or on a resume check it is the data the run started on.

    Args:
        out: the run's folder (its config.json written by `prepare_out`).
        fingerprints: file -> {"bytes", "records", "sha256"} of the train and validation files
            (`ecellm.data.Records.fingerprints`).
        resume_step: the step a resume continues from (0 before any checkpoint); None for a new run.
        allow_change: on a resume, continue on changed data: the change is logged (and written to log.jsonl as a
            "data_change" record) and the new fingerprints recorded.
        log: writes one progress line.
    Raises:
        TrainingError: a resume on changed data without `allow_change`, naming the file and what changed.
    """
    settings = read_json(out / "config.json", TrainingError)
    saved = settings.get(DATA_FINGERPRINT)
    if resume_step is not None and saved is None:
        log(f"--resume: {out / 'config.json'} records no data fingerprint (a run of an older version): the data "
            "cannot be checked; recording it now")
    elif resume_step is not None:
        changes = [f"{file}: {_in_words(saved.get(file))} -> {_in_words(fingerprints.get(file))}"
                   for file in sorted(set(saved) | set(fingerprints)) if saved.get(file) != fingerprints.get(file)]
        if changes and not allow_change:
            raise TrainingError(
                f"--resume: the data changed since the run started, so it would train on a mix of two datasets: "
                f"{'; '.join(changes)}. Restore the data, start a new run, or pass --allow-data-change to continue "
                "on the new data (the change is logged)"
            )
        if not changes:
            return
        log(f"--allow-data-change: continuing from step {resume_step} on changed data: {'; '.join(changes)}")
        with open(out / "log.jsonl", "a") as f:
            f.write(strict_json({"type": "data_change", "step": resume_step, "changes": changes}) + "\n")
    write_json(out / "config.json", {**settings, DATA_FINGERPRINT: fingerprints})


def _in_words(fingerprint: dict | None) -> str:
    if fingerprint is None:
        return "absent"
    return f"{fingerprint['records']} records, {fingerprint['bytes']} bytes, sha256 {fingerprint['sha256'][:12]}"
