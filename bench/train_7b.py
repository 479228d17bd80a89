"""LoRA steps on the paper's 7B shapes, one GPU: ecellm eager and compiled against transformers + peft, in tokens/s,
peak memory and model FLOPs utilisation.

The model: Mistral-7B-Instruct-v0.2's config (32 layers of width 4096, 8 key/value heads, vocabulary 32000) with
random weights (speed does not depend on them, and the GPU machine is offline), bf16 base, fp32 LoRA r=16 alpha=16
dropout 0.1 on the paper's targets (q,k,v,o,gate,up,down_proj and lm_head), activation checkpointing on every block.
The data: rows of `--pack` tokens (16K) first-fit packed from the synthetic 10-task mix (`bench/packing.py`'s,
SmolLM2's tokenizer; token ids taken modulo the vocabulary, which speed does not see either); every library trains
on the same rows, one row per optimizer step (forward, backward, AdamW).

    ecellm             `ecellm.train`'s batch path (`make_batch`: a packed row with segment ids; `loss_sum`), flash
                       attention's variable-length kernel over the row's examples
    ecellm compiled    the same with `ecellm.train.compile_blocks` (as `ecellm train --compile`)
    transformers+peft  `DataCollatorWithFlattening` (its padding-free collator: the row's examples concatenated,
                       positions restarting per example) and `model(**batch).loss`; flash_attention_2 when the
                       flash_attn package is installed, else sdpa (which masks the examples apart in a full row)

Each library runs in a fresh process with its own time limit (a hang or an out-of-memory costs that library only):
`--warmup` steps (compilation), then `--steps` timed ones. Peak memory is `torch.cuda.max_memory_allocated` over
the whole process (weights included). MFU: the useful FLOPs of the timed steps (`train_step.step_flops` with the rows'
example lengths: frozen projections forward and activation-gradient, LoRA, attention within each example, the
vocabulary projection where a label is) over their time and the GPU's dense bf16 peak (`--peak-tflops`, H200: 989).

    python bench/train_7b.py --device cuda     # about 4 minutes on an H200 (bench/gpu_checks.sh runs it offline)
    python bench/train_7b.py --tiny            # the same path on the CPU: a 2-layer model of width 64, rows of 1024
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from packing import mix_examples  # noqa: E402
from train_step import step_flops  # noqa: E402

import common  # noqa: E402

MISTRAL_7B = dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                  rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, hidden_act="silu")
TINY = {**MISTRAL_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
LIBS = {"ecellm": "ecellm", "compiled": "ecellm compiled", "hf": "transformers+peft"}


def packed_rows(config: dict, pack: int, n_rows: int) -> list[list[dict]]:
    """The first `n_rows` full rows of the 10-task mix packed into `pack` tokens (ids modulo the vocabulary)."""
    from ecellm.data import pack_examples

    V = config["vocab_size"]
    n_per_task = 8
    while True:
        examples = [{"input_ids": [i % V for i in e["input_ids"]],
                     "labels": [i % V if i >= 0 else i for i in e["labels"]]} for e in mix_examples(n_per_task)]
        rows = pack_examples(examples, pack)[:-1]  # the last row is the remainder
        if len(rows) >= n_rows:
            return rows[:n_rows]
        n_per_task *= 2


def ecellm_model(config: dict, device: str, dtype: torch.dtype, compiled: bool, pack: int):
    """ecellm's model with LoRA and activation checkpointing (compiled blocks if asked); returns it and row -> loss."""
    from ecellm import lora
    from ecellm.models import from_config
    from ecellm.train import (
        TrainConfig,
        compile_blocks,
        enable_activation_checkpointing,
        loss_sum,
        make_batch,
        transformer_blocks,
    )

    model = from_config(config, dtype=dtype, device=device)
    lora.inject(model, r=16, alpha=16, dropout=0.1, targets=common.LORA_TARGETS)
    if compiled:
        compile_blocks(transformer_blocks(model), torch.device(device))
    enable_activation_checkpointing(transformer_blocks(model))
    train_config = TrainConfig(pack_tokens=pack)

    def loss(row: list[dict]) -> torch.Tensor:
        batch = make_batch(row, train_config, config["eos_token_id"], False)
        return loss_sum(model, {k: v.to(device) for k, v in batch.items()})

    return model.train(), loss


def hf_model(config: dict, device: str, dtype: torch.dtype):
    """transformers + peft on the same shapes, with gradient checkpointing and the padding-free collator."""
    import transformers
    from peft import LoraConfig, get_peft_model

    attn = "flash_attention_2" if device == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    hf_config = transformers.MistralConfig(**{k: v for k, v in config.items() if k != "model_type"})
    with torch.device(device):
        base = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=attn)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.1, target_modules=common.LORA_TARGETS,
                                            task_type="CAUSAL_LM"))
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=attn == "flash_attention_2")
    print(f"# transformers+peft: attn_implementation={attn}", file=sys.stderr)

    def loss(row: list[dict]) -> torch.Tensor:
        batch = collator([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in row])
        return model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}, use_cache=False).loss

    return model.train(), loss


def child(args) -> None:
    config = TINY if args.tiny else MISTRAL_7B
    device, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    rows = packed_rows(config, args.pack, args.warmup + args.steps)
    torch.manual_seed(0)
    started = time.perf_counter()
    if args.child == "hf":
        model, loss_fn = hf_model(config, device, dtype)
    else:
        model, loss_fn = ecellm_model(config, device, dtype, args.child == "compiled", args.pack)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def step(row: list[dict]) -> float:
        t = time.perf_counter()
        loss_fn(row).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    print(f"# {LIBS[args.child]}: model built in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    first = [step(row) for row in rows[: args.warmup]]
    times = [step(row) for row in rows[args.warmup:]]
    timed = rows[args.warmup:]
    segments = [len(e["input_ids"]) for row in timed for e in row]
    n_labelled = sum(sum(x != -100 for x in e["labels"][1:]) for row in timed for e in row)
    flops = step_flops(config, 1, sum(segments), n_labelled, segments=segments)  # all timed rows together
    print(json.dumps({"lib": args.child, "tokens_per_s": sum(segments) / sum(times), "step_s": sum(times) / len(times),
                      "first_step_s": first[0] if first else None, "mfu": flops["total"] / sum(times)
                      / (args.peak_tflops * 1e12), "peak_gb": torch.cuda.max_memory_allocated() / 2**30
                      if device == "cuda" else common.peak_rss_mb() / 1024, "row_tokens": sum(segments) / len(timed)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of width 64 and rows of 1024 tokens (CPU)")
    ap.add_argument("--libs", default="ecellm,compiled,hf", help="comma-separated: ecellm, compiled, hf")
    ap.add_argument("--pack", type=int, help="tokens per row (default 16384; 1024 with --tiny)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--timeout", type=float, default=70, help="seconds for each library's process")
    ap.add_argument("--compile-timeout", type=float, default=120, help="seconds for the compiled one")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H200 SXM: 989)")
    ap.add_argument("--random-weights", action="store_true",
                    help="offline: random SmolLM2 weights beside its cached config and tokenizer "
                         "(the data's tokenizer)")
    ap.add_argument("--child", choices=list(LIBS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.pack = args.pack or (1024 if args.tiny else 16384)
    if args.child:
        return child(args)
    if args.random_weights:
        common.random_weights_if_missing()

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {common.machine()}")
    print(f"# {'tiny' if args.tiny else 'Mistral-7B'} shapes, random weights, {args.device}, "
          f"rows of {args.pack} tokens (10-task mix), LoRA r=16 alpha=16 dropout 0.1 fp32, activation checkpointing; "
          f"{args.warmup} warm-up + {args.steps} timed steps; MFU over {args.peak_tflops:g} TFLOP/s", flush=True)
    flags = ["--device", args.device, "--pack", str(args.pack), "--warmup", str(args.warmup), "--steps",
             str(args.steps), "--peak-tflops", str(args.peak_tflops)] + (["--tiny"] if args.tiny else [])
    results = {}
    for lib in args.libs.split(","):
        limit = args.compile_timeout if lib == "compiled" else args.timeout
        try:
            out = subprocess.run([sys.executable, __file__, "--child", lib, *flags], capture_output=True, text=True,
                                 timeout=limit)
        except subprocess.TimeoutExpired as e:
            print(f"{LIBS[lib]}: stopped after its limit of {limit:.0f}s\n{(e.stderr or b'')[-1500:]}", flush=True)
            continue
        print(out.stderr[-1500:] if out.returncode else "".join(line + "\n" for line in out.stderr.splitlines()
                                                                 if line.startswith("#")), end="", flush=True)
        if out.returncode:
            print(f"{LIBS[lib]}: exited {out.returncode}", flush=True)
            continue
        results[lib] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[lib]
        print(f"{LIBS[lib]}: {r['tokens_per_s']:.0f} tokens/s, {r['step_s']:.2f} s/step (first {r['first_step_s']:.1f}"
              f" s), peak {r['peak_gb']:.1f} GB, MFU {100 * r['mfu']:.1f}%", flush=True)
    hf = results.get("hf")
    print(f"\n{'tiny' if args.tiny else 'Mistral-7B'} rows of {args.pack}: library | tokens/s | peak GB | MFU | "
          "tokens/s vs transformers+peft")
    for lib, r in results.items():
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-"
        print(f"| {LIBS[lib]} | {r['tokens_per_s']:.0f} | {r['peak_gb']:.1f} | {100 * r['mfu']:.1f}% | {ratio} |")


if __name__ == "__main__":
    main()
