"""The old home of QLoRA's 4-bit bases, kept so `from ecellm import nf4` works: the code is `ecellm/lora/nf4.py`."""

from .lora.nf4 import (  # noqa: F401
    BLOCK,
    DYNAMIC,
    NF4,
    NF4_PAIRS,
    SCALE_BLOCK,
    NF4Linear,
    NF4Weight,
    QuantizeReport,
    dynamic_map,
    quantize,
    quantize_model,
)
