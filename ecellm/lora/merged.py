"""A merged checkpoint: the base model with every LoRA update folded in, written as a Hugging Face checkpoint
directory that transformers and ecellm both load (no adapter needed to use it)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..models.saving import check_new_directory, save_pretrained
from .layer import LoRALinear, lora_layers
from .nf4 import NF4Weight
from .targets import LoRAError, model_family


def _checkpoint_entries(model: nn.Module) -> dict[str, tuple[torch.Tensor, LoRALinear | None]]:
    """Checkpoint key -> (the model's tensor, the LoRA layer whose update must be merged into it, or None).

    LoRA tensors are dropped. A tensor shared by several keys (a tied weight) is kept under its first key only, as
    Hugging Face checkpoints store it, unless a LoRA layer owns it (its merged value is its own)."""
    owners = {f"{name}.weight": layer for name, layer in lora_layers(model).items()}
    entries: dict[str, tuple[torch.Tensor, LoRALinear | None]] = {}
    seen: set[int] = set()  # storage addresses already written
    for key, tensor in model.state_dict().items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        if key in owners:
            entries[key] = (tensor, owners[key])
            continue
        storage = tensor.untyped_storage().data_ptr()
        if storage not in seen:
            seen.add(storage)
            entries[key] = (tensor, None)
    return entries


def save_merged(model: nn.Module, path: str | Path, max_shard_size: int | str = "5GB") -> None:
    """Write the model with LoRA merged in as a Hugging Face checkpoint that transformers and ecellm both load.

    The model itself is not changed: merged weights are computed out of place (fp32 math, base dtype), one shard at a
    time, so the extra memory is about one shard.

    Args:
        model: an ecellm model (needs `model.config.raw`, the config.json dict it was built from), LoRA optional.
        path: directory to create (absent or empty), written as `ecellm.models.saving.save_pretrained` says: it
            appears only when complete, sharded past `max_shard_size`.
        max_shard_size: shard size limit, in bytes or as a string such as "5GB".
    """
    check_new_directory(path)  # before anything else: the one error that says nothing about the model
    quantized = [name for name, m in model.named_modules() if isinstance(m, NF4Weight)]
    if quantized:  # its state dict holds 4-bit codes, not the weight a checkpoint needs
        raise LoRAError(f"save_merged: {quantized[0]} (and {len(quantized) - 1} more) is a 4-bit NF4 weight; save "
                        "from a bf16/fp32 copy of the base: from_pretrained(base), load_adapter(model, adapter_dir)")
    raw = getattr(getattr(model, "config", None), "raw", None)
    if not isinstance(raw, dict) or not raw:
        raise LoRAError(f"save_merged: {type(model).__name__} has no config.raw (the config.json dict) to write")
    entries = _checkpoint_entries(model)
    config = dict(raw)
    if config.get("tie_word_embeddings") and "lm_head" in lora_layers(model):
        config["tie_word_embeddings"] = False  # the merged head now differs from the embedding: store both
        if model_family(model) == "t5":  # old T5 configs let the tie also decide the output scaling: pin it
            config["scale_decoder_outputs"] = model.config.scale_decoder_outputs

    def merged(key: str, tensor: torch.Tensor) -> torch.Tensor:
        layer = entries[key][1]
        return tensor if layer is None else layer.merged_weight()

    save_pretrained(path, config, {key: tensor for key, (tensor, _) in entries.items()}, max_shard_size, merged)
