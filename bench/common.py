"""Helpers the benchmark scripts share: the checkpoints (the embedded SmolLM2-135M-Instruct and a tiny random Llama
saved with transformers, so both libraries load the very same weights), ECInstruct-like batches, and memory probes."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

TINY = dict(vocab_size=49152, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def smollm2_dir() -> Path:
    from ecellm.models.default import default_model_dir

    return default_model_dir()


def tiny_dir(root: Path) -> Path:
    """A tiny random Llama (SmolLM2's vocabulary, 4 layers of width 128) saved by transformers, built once."""
    path = root / "tiny-llama"
    if not (path / "model.safetensors").is_file():
        import transformers

        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
        model.save_pretrained(path)
    return path


def model_dir(name: str, root: Path) -> Path:
    return smollm2_dir() if name == "smollm2" else tiny_dir(root)


def random_weights_if_missing() -> None:
    """On a machine that cannot fetch the embedded SmolLM2 (no network), write random weights of its shapes into
    the cache directory that holds its config and tokenizer: speed does not depend on the values (decoding is forced
    to a fixed number of tokens)."""
    import transformers

    from ecellm.models.default import NAME, cache_dir

    target = cache_dir() / NAME
    if (target / "model.safetensors").is_file():
        return
    if not (target / "config.json").is_file():
        sys.exit(f"--random-weights: no {target / 'config.json'} (copy the converted checkpoint's config and tokenizer "
                 "files there)")
    config = transformers.AutoConfig.from_pretrained(target)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(target)
    print(f"# random weights of SmolLM2-135M-Instruct's shapes written to {target}")


def _sr_records(n: int, min_tokens: int, split: str, seed: int) -> list[dict]:
    """Synthetic SR records whose alpaca prompts all have at least `min_tokens` tokens (the purchase history grows
    until they do; items are written in full, title + categories + brand, beyond ~420 tokens)."""
    from ecellm.data import format_prompt
    from ecellm.synthetic import generate_records
    from ecellm.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir())
    full, history = min_tokens > 420, 2
    while True:
        records = generate_records("SR", n, split, seed=seed, sr_history_len=history, sr_full_items=full)
        if min(len(tok.encode(format_prompt(r))) for r in records) >= min_tokens:
            return records
        history += 4


def sr_batch(batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`batch` synthetic sequential-recommendation examples, each exactly `seq_len` tokens (SmolLM2's tokenizer):
    the purchase history is made long enough and `build_examples` cuts the input text to fit, as training does
    (records too long even without their input are dropped, as training drops them).
    Labels cover the answer (a letter and EOS), the prompt is masked (-100)."""
    from ecellm.data import build_examples, collate
    from ecellm.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir())
    # Twice the records needed: a record whose instruction and options alone exceed seq_len is dropped.
    examples, report = build_examples(_sr_records(2 * batch, seq_len, "train", seed), tok, max_len=seq_len)
    examples = examples[:batch]
    lengths = [len(e["input_ids"]) for e in examples]
    if lengths != [seq_len] * batch:
        raise RuntimeError(f"sr_batch: wanted {batch} examples of {seq_len} tokens, got {lengths} ({report})")
    return collate(examples, tok.pad_id, multiple_of=1)


def sr_prompts(n: int, seq_len: int, seed: int = 1) -> list[list[int]]:
    """`n` synthetic SR prompts (the alpaca template up to "### Response:"), cut to `seq_len` tokens minus 0..15
    (the head kept, the last 16 tokens kept), so rows differ in length and batches are left padded as in
    evaluation."""
    from ecellm.data import format_prompt
    from ecellm.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir())
    prompts = [tok.encode(format_prompt(r)) for r in _sr_records(n, seq_len, "test", seed)]
    cut = [seq_len - (i * 5) % 16 for i in range(n)]
    return [p[:c - 16] + p[-16:] for p, c in zip(prompts, cut)]


def rss_mb() -> float:
    """Current resident set size (VmRSS), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """Resident-set high-water mark (VmHWM) since the last `reset_peak_rss`, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "-"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft_version}, Python {platform.python_version()}")


def run_child(script: str, args: list[str], pythonpath: str | None = None) -> dict:
    """Run `python script --child ...` in a fresh process (with `pythonpath` first on its path: another ecellm
    source tree) and return the JSON line it prints last."""
    import json

    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    """min-max as a percentage of the median."""
    m = statistics.median(xs)
    return f"±{50 * (max(xs) - min(xs)) / m:.0f}%" if m else "-"
