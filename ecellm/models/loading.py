"""Loading Hugging Face checkpoints (`model.safetensors`, or shards listed in `model.safetensors.index.json`) into a
model built on the meta device, so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

# Keys some checkpoints carry that hold no weights (rotary tables that are recomputed on the fly).
# (Old T5 conversions also carry a cross-attention position bias that T5 never uses.)
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".EncDecAttention.relative_attention_bias.weight")


class CheckpointError(ValueError):
    """A checkpoint whose files or tensors do not fit the model."""


def checkpoint_files(path: str | Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint directory, in a stable order.

    Args:
        path: the checkpoint directory.
        allow_pickle: accept `pytorch_model.bin` (pickle; loaded with `weights_only=True`) when no safetensors exist.
    """
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
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
                "Convert them to safetensors, or pass allow_pickle=True to load them with torch.load(weights_only=True)."
            )
        return pickles
    raise CheckpointError(f"no weights in {path}: expected model.safetensors or model.safetensors.index.json")


def _read_tensors(file: Path):
    """Yield (key, tensor) from one weight file."""
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        yield from torch.load(file, map_location="cpu", weights_only=True, mmap=True).items()


def load_checkpoint(
    model: nn.Module, path: str | Path, dtype: torch.dtype, device: str | torch.device, allow_pickle: bool = False
) -> nn.Module:
    """Assign a checkpoint's tensors to a (meta-device) model, cast to `dtype` and moved to `device`.

    Parameters that the model ties (the same Parameter under several names, e.g. `lm_head.weight` and
    `model.embed_tokens.weight`) stay tied and need only one of their names in the checkpoint.

    Args:
        model: the model, typically built under `torch.device("meta")`.
        path: the checkpoint directory.
    Raises:
        CheckpointError: naming the key, the file and the shapes of any missing, unexpected or mis-shaped tensor.
    """
    names_of = defaultdict(list)  # id(parameter or buffer) -> every name it has in the model
    expected = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, t in list(params.items()) + list(model.named_buffers()):
        names_of[id(t)].append(name)
        expected[name] = t

    loaded: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path, allow_pickle):
        for key, tensor in _read_tensors(file):
            if key.endswith(IGNORED_SUFFIXES):
                continue
            if key not in expected:
                raise CheckpointError(f"unexpected tensor {key!r} {tuple(tensor.shape)} in {file}: the model has no such weight")
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise CheckpointError(
                    f"tensor {key!r} in {file} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(expected[key].shape)}"
                )
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            loaded[key] = tensor.to(device)

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
