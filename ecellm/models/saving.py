"""Writing Hugging Face checkpoints: `config.json` plus `model.safetensors`, or numbered shards and
`model.safetensors.index.json` past a size limit, as transformers writes them; the counterpart of `loading.py`."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..files import write_dir_atomically, write_json


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
    """Refuse to write a checkpoint into an existing directory that holds files."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; choose a new directory")


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
            `max_shard_size`, `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`. It
            appears only when complete (`ecellm.files.write_dir_atomically`).
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

    def write(tmp: Path) -> None:
        write_json(tmp / "config.json", _with_dtype(config, tensors))
        for name, keys in zip(names, shards):
            shard = {key: tensors[key] if transform is None else transform(key, tensors[key]) for key in keys}
            save_file({k: t.detach().contiguous().cpu() for k, t in shard.items()}, str(tmp / name),
                      metadata={"format": "pt"})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
            write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                               "weight_map": weight_map})

    write_dir_atomically(path, write)
