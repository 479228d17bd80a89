"""Writing Hugging Face checkpoints: `config.json` plus `model.safetensors`, or numbered shards and
`model.safetensors.index.json` past a size limit, as transformers writes them; the counterpart of `loading.py`.
A new checkpoint directory is written under its lock and never loses or replaces a file it did not write
(`write_new_folder`, also what `gguf_convert` writes with)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..files import write_json
from ..lock import LOCK_NAME, FolderLock


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" / "500MB" (decimal units, as transformers reads them)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if m is None:
        raise ValueError(f"max_shard_size {size!r}: expected bytes (int) or a string such as '5GB' or '500MB'")
    return int(float(m[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m[2]])


def plan_shards(tensors: Mapping[str, torch.Tensor], limit: int) -> list[list[str]]:
    """The keys of each shard: `tensors` in order, a new shard whenever the next tensor would pass `limit` bytes."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _with_dtype(config: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """`config` with `dtype` set to the tensors' one floating-point dtype (when they share one)."""
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        return config
    config = {k: v for k, v in config.items() if k != "torch_dtype"}
    return {**config, "dtype": str(dtypes.pop()).removeprefix("torch.")}


def check_new_directory(path: str | Path) -> None:
    """Refuse to write a checkpoint into an existing directory that holds anything but a lock file (one a killed
    job left is taken over)."""
    path = Path(path)
    held = sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME) if path.exists() else []
    if held:
        raise FileExistsError(f"{path} exists and is not empty (it holds {', '.join(held[:3])}); choose a new "
                              "directory")


def write_new_folder(path: str | Path, job: str, files: Mapping[str, Callable[[Path], None]]) -> Path:
    """Create the checkpoint directory `path` holding `files` (name -> a writer of that file), under the folder's
    lock (`ecellm.lock.FolderLock`), never removing or replacing anything this call did not write.

    Every file is written into a staging folder inside `path`, then hard-linked into place in the order of
    `files` (put the file that makes the directory loadable last), so a file that appeared meanwhile is never
    replaced. On any failure only what this call created is removed: its links, its staging folder, and `path` itself
    when this call made it and it is empty.

    Args:
        path: the directory (absent, or empty but for a stale lock file).
        job: what writes it, for the lock's messages ("conversion", "checkpoint").
        files: file name -> `write(file_path)`, in the order the files appear in `path`.
    Raises:
        FolderBusy: another job holds the folder's lock.
        FileExistsError: `path` holds files, or one of `files` appeared in it while they were written.
    """
    path = Path(path)
    created = not path.exists()
    lock = FolderLock(path, job)
    lock.acquire(lambda message: print(message, file=sys.stderr))
    linked: list[Path] = []
    try:
        check_new_directory(path)
        staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=path))
        try:
            for name, write in files.items():
                write(staging / name)
            for name in files:
                try:
                    os.link(staging / name, path / name)
                except FileExistsError:
                    raise FileExistsError(f"{path / name} appeared while the {job} was written; it is left as it "
                                          f"was, and the {job} is not written: choose a new directory") from None
                linked.append(path / name)
        finally:
            shutil.rmtree(staging)
    except BaseException:
        for file in linked:
            file.unlink()
        raise
    finally:
        lock.release()
        if created and not linked:
            with contextlib.suppress(OSError):  # not empty: something not ours is in it, so it stays
                path.rmdir()
    return path


def save_pretrained(
    path: str | Path,
    config: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    max_shard_size: int | str = "5GB",
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint directory that transformers and `ecellm.models.from_pretrained` both load.

    Args:
        path: directory to create (absent or empty); gets `config.json` and `model.safetensors`, or, past
            `max_shard_size`, `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`. It is
            written under its lock and never loses a file it did not write (`write_new_folder`); the weights file
            (or the shards' index) appears last.
        config: the config.json dict; its `dtype` is set to the tensors' dtype when they share one.
        tensors: checkpoint key -> tensor, in the order to write.
        max_shard_size: shard size limit, in bytes or as a string such as "5GB".
        transform: `transform(key, tensor)` gives the tensor actually written (same shape and dtype), computed one
            shard at a time: e.g. a weight with a LoRA update merged in, without holding all of them at once.
    """
    check_new_directory(path)
    shards = plan_shards(tensors, parse_size(max_shard_size))
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]

    def shard_writer(keys: list[str]) -> Callable[[Path], None]:
        def write(file: Path) -> None:
            shard = {key: tensors[key] if transform is None else transform(key, tensors[key]) for key in keys}
            save_file({k: t.detach().contiguous().cpu() for k, t in shard.items()}, str(file),
                      metadata={"format": "pt"})
        return write

    files = {"config.json": lambda file: write_json(file, _with_dtype(config, tensors))}
    files |= {name: shard_writer(keys) for name, keys in zip(names, shards)}
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
        files["model.safetensors.index.json"] = lambda file: write_json(
            file, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_new_folder(path, "checkpoint", files)
