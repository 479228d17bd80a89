"""LoRA for any `nn.Module`, and its files: `ecellm.lora.inject(model, r=16)`, train, then `save_adapter`,
`load_adapter`, `merge` or `save_merged`.

The package's modules import one way, each only from those above it in this list:

    targets.py      which Linears are wrapped: default targets per family, PEFT's matching rule, the checks
                    (targets that would never run, target patterns that cannot be matched in bounded time)
    layer.py        LoRALinear, inject, merge / unmerge, lora_state_dict, count_parameters
    nf4.py          QLoRA's 4-bit NormalFloat bases (quantize, NF4Weight, NF4Linear, quantize_model)
    merged.py       save_merged: a Hugging Face checkpoint with the updates folded in
    peft_format.py  adapters in PEFT's on-disk format (save_adapter, load_adapter, read_adapter_weights)
"""

from .layer import LoRALinear, count_parameters, inject, lora_layers, lora_state_dict, merge, unmerge
from .merged import save_merged
from .peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TASK_TYPES,
    load_adapter,
    read_adapter_config,
    read_adapter_weights,
    save_adapter,
)
from .targets import DEFAULT_TARGETS, PHI_ALIASES, LoRAError, Targets, matches, model_family

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "DEFAULT_TARGETS", "PHI_ALIASES", "TASK_TYPES", "LoRAError", "LoRALinear",
    "Targets", "count_parameters", "inject", "load_adapter", "lora_layers", "lora_state_dict", "matches", "merge",
    "model_family", "read_adapter_config", "read_adapter_weights", "save_adapter", "save_merged", "unmerge",
]
