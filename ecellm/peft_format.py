"""The old home of the PEFT adapter format, kept so `from ecellm import peft_format` works: the code is
`ecellm/lora/peft_format.py`."""

from .lora.peft_format import (  # noqa: F401
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    TASK_TYPES,
    load_adapter,
    read_adapter_config,
    read_adapter_weights,
    save_adapter,
)
