"""Loading Hugging Face checkpoints (`model.safetensors`, or shards listed in `model.safetensors.index.json`) into a
model built on the meta device, so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import EcellmError
from ..files import read_json
from .config import ConfigError, config_file

# Keys some checkpoints carry that hold no weights (rotary tables that are recomputed on the fly).
# (Old T5 conversions also carry a cross-attention position bias that T5 never uses.)
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".EncDecAttention.relative_attention_bias.weight")
# (BERT checkpoints written by transformers < 4.31 also carry the position index table 0, 1, ..., max_len - 1.)
IGNORED_SUFFIXES += ("embeddings.position_ids",)
# config.json fields that count layers, and sizes that no weight dimension is smaller than (`check_config_fits_weights`)
LAYER_COUNTS = ("num_hidden_layers", "num_layers", "num_decoder_layers")
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "d_model", "d_ff", "d_kv", "num_heads")


class CheckpointError(EcellmError, ValueError):
    """A checkpoint whose files or tensors do not fit the model."""


def read_safetensors(file: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from a safetensors file, one tensor at a time.

    Args:
        file: the `.safetensors` file (model weights, a LoRA adapter, a trainer state).
    Raises:
        CheckpointError: naming the file, when it is empty, truncated or otherwise not safetensors.
    """
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file, perhaps empty or truncated ({e})") from None


def check_finite_tensor(tensor: torch.Tensor, key: str, file: str | Path) -> None:
    """Refuse a floating-point tensor holding NaN or Inf, naming it and its file.

    One summation pass (NaN and Inf survive a sum); only a non-finite sum, which a finite tensor can also reach by
    overflowing, pays for the exact element-wise check.
    """
    if not tensor.is_floating_point() or torch.isfinite(tensor.sum()):
        return
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:
        raise CheckpointError(f"tensor {key!r} in {file} holds {bad} NaN or Inf values (of {tensor.numel()})")


def _shard_files(index: Path) -> list[Path]:
    """The shard files a `model.safetensors.index.json` lists; a shard outside the index's folder is refused."""
    index_json = read_json(index, CheckpointError)
    weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
    for key, name in weight_map.items():
        if Path(name).name != name or name in (".", ".."):  # a path, not a file name: it may leave the folder
            raise CheckpointError(
                f"{index}: weight_map[{key!r}] = {name!r} is not a file name in the checkpoint folder "
                f"{index.parent}; shards outside it are refused"
            )
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def checkpoint_files(path: str | Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint directory, in a stable order.

    Args:
        path: the checkpoint directory.
        allow_pickle: accept `pytorch_model.bin` (pickle; loaded with `weights_only=True`) when no safetensors exist.
    """
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = _shard_files(index)
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that do not exist: {missing}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} holds only pickle weights ({pickles[0].name}); pickle files can run code when loaded. "
                "Convert them to safetensors, or pass allow_pickle=True to load them with "
                "torch.load(weights_only=True)."
            )
        return pickles
    raise CheckpointError(f"no weights in {path}: expected model.safetensors or model.safetensors.index.json")


def weight_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, read from the safetensors files' headers alone (no weight is read); pickle files, which
    have no header to read, are left out."""
    shapes = {}
    for file in files:
        if file.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes |= {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except SafetensorError as e:
            raise CheckpointError(
                f"{file}: not a readable safetensors file, perhaps empty or truncated ({e})"
            ) from None
    return shapes


def _stack_depths(keys) -> dict[str, int]:
    """Layers per stack of numbered blocks: {"model.layers": 2} for keys `model.layers.0.` .. `model.layers.1.`."""
    depths: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if at is not None:
            stack = ".".join(parts[:at])
            depths[stack] = max(depths.get(stack, 0), int(parts[at]) + 1)
    return depths


def check_config_fits_weights(config: dict[str, Any], path: str | Path, allow_pickle: bool = False) -> None:
    """Refuse, before a model is built from it, a config.json whose layer counts exceed the layers its weights hold
    or whose sizes exceed every dimension of its weights (`num_hidden_layers: 100000` would otherwise build for
    minutes, only to fail on the first missing tensor). Only the safetensors headers are read.

    Args:
        config: the parsed config.json.
        path: the checkpoint directory.
        allow_pickle: as `from_pretrained` takes it (pickle weights are not checked here).
    Raises:
        ConfigError: naming config.json, the field, its value and what the weights hold.
    """
    shapes = weight_shapes(checkpoint_files(path, allow_pickle))
    if not shapes:
        return
    depths = _stack_depths(shapes)
    most_layers = max(depths.values(), default=0)
    largest = max((d for shape in shapes.values() for d in shape), default=0)
    for fields, bound, what in ((LAYER_COUNTS, most_layers, f"{most_layers} layers at most ("
                                 + ", ".join(f"{stack}: {n}" for stack, n in sorted(depths.items())) + ")"),
                                (SIZE_FIELDS, largest, f"no dimension over {largest}")):
        for field in fields:
            value = config.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value > bound:
                raise ConfigError(f"{config_file(path)}: {field} is {value} but the weights in {path} hold {what}; "
                                  "this config.json does not describe these weights")


def _read_tensors(file: Path):
    """Yield (key, tensor) from one weight file."""
    if file.suffix == ".safetensors":
        yield from read_safetensors(file)
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 (truncated zip, bad pickle, refused global: all name the file)
            raise CheckpointError(
                f"{file}: not a readable torch weights file, perhaps empty or truncated ({e})"
            ) from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a dict of tensors")
        yield from state.items()


def _checked_tensors(file: Path, expected: dict[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device,
                     check_finite: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) of one weight file, each checked against the model's `expected` tensor, cast to `dtype`
    (floating-point weights only) and moved to `device`; keys in IGNORED_SUFFIXES are skipped."""
    for key, tensor in _read_tensors(file):
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if key not in expected:
            raise CheckpointError(
                f"unexpected tensor {key!r} {tuple(tensor.shape)} in {file}: the model has no such weight"
            )
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"tensor {key!r} in {file} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
        if expected[key].is_floating_point():
            if not tensor.is_floating_point():
                raise CheckpointError(
                    f"tensor {key!r} in {file} has dtype {tensor.dtype}, the model needs a floating-point weight"
                )
            tensor = tensor.to(dtype)
        tensor = tensor.to(device)
        if check_finite:
            check_finite_tensor(tensor, key, file)
        yield key, tensor


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    dtype: torch.dtype,
    device: str | torch.device,
    allow_pickle: bool = False,
    check_finite: bool = True,
) -> nn.Module:
    """Assign a checkpoint's tensors to a (meta-device) model, cast to `dtype` and moved to `device`.

    Parameters that the model ties (the same Parameter under several names, e.g. `lm_head.weight` and
    `model.embed_tokens.weight`) stay tied and need only one of their names in the checkpoint.

    Args:
        model: the model, typically built under `torch.device("meta")`.
        path: the checkpoint directory.
        check_finite: refuse a weight holding NaN or Inf after the cast to `dtype` (one summation pass per tensor;
            see BENCHMARKS.md for its cost).
    Raises:
        CheckpointError: naming the file and key of any missing, unexpected, mis-shaped, integer-typed or (with
            `check_finite`) non-finite tensor, and any unreadable file.
    """
    names_of = defaultdict(list)  # id(parameter or buffer) -> every name it has in the model
    expected = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, t in list(params.items()) + list(model.named_buffers()):
        names_of[id(t)].append(name)
        expected[name] = t

    loaded = {key: tensor for file in checkpoint_files(path, allow_pickle)
              for key, tensor in _checked_tensors(file, expected, dtype, device, check_finite)}

    state = {}
    for names in names_of.values():
        found = [n for n in names if n in loaded]
        if not found:
            raise CheckpointError(
                f"checkpoint {path} has no tensor {names[0]!r} (shape {tuple(expected[names[0]].shape)})"
                + (f" nor its tied aliases {names[1:]}" if len(names) > 1 else "")
            )
        tensor = loaded[found[0]]
        for other in found[1:]:
            if not torch.equal(loaded[other], tensor):
                raise CheckpointError(
                    f"checkpoint {path} holds different values for {found[0]!r} and {other!r}, which the config ties "
                    "(tie_word_embeddings): set it to false in config.json if the checkpoint has its own head"
                )
        value = nn.Parameter(tensor, requires_grad=tensor.is_floating_point()) if names[0] in params else tensor
        for n in names:
            state[n] = value  # the same object under every name keeps ties
    model.load_state_dict(state, strict=True, assign=True)
    return model
