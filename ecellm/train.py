"""LoRA instruction tuning on ECInstruct: the eCeLLM recipe in one loop, on one process or many.

    python -m ecellm.train --model DIR --data DIR --out runs/x                    # one process
    torchrun --nproc_per_node=8 -m ecellm.train --model DIR --data DIR ...        # FSDP2 over 8 ranks

Distributed runs shard every transformer block and then the root with FSDP2 (`fully_shard`) over a 1-D device mesh:
nccl on GPUs, gloo on CPU. In bf16, base weights are stored and computed in bf16 while LoRA weights, gradient
reduction and optimizer state stay fp32. The loss is averaged per example by default (each example's mean over its
answer tokens, then the mean over the step's examples, as the reference's micro-batch-1 training weighs them) or
over all answer tokens (`--loss-average token`); either way the normaliser is summed over micro-batches and ranks,
so N ranks make the same update as one process with the same global batch. `--pack N` concatenates the step's
examples into rows of up to N tokens, each example attending only to itself: the same loss and gradients, less
padding.

Checkpoints (`out/checkpoints/step_N/`) hold the adapter in PEFT format plus optimizer, scheduler, RNG states and
the data position; they are written to a temporary directory and renamed, so an interrupted write leaves the previous
one usable. `--resume` continues exactly where the latest checkpoint stopped. SIGTERM saves a checkpoint and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from . import lora
from .data import (
    LOSS_AVERAGES,
    LengthGroupedBatchSampler,
    build_examples,
    collate,
    collate_packed,
    example_loss_weight,
    load_records,
    loss_token_count,
    pack_examples,
    sample_per_task,
)
from .models import causal_lm_loss, from_pretrained, seq2seq_lm_loss
from .tokenizer import load_tokenizer


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the paper's recipe. Each field is a command-line flag."""

    model: str = ""  # checkpoint directory; empty: the embedded SmolLM2-135M-Instruct
    data: str = ""  # a directory with train.json and validation.json, as ECInstruct ships them
    out: str = "runs/ecellm"
    tasks: str = ""  # comma-separated task names or abbreviations (AVE, PRP, ...); empty: all 10
    setting: str = "IND_Diverse_Instruction"
    max_per_task: int = 10000  # the paper caps each task's training records at 10K
    max_val_examples: int = 0  # 0: the whole validation set
    template: str = ""  # "alpaca" or "mistral"; empty: mistral for Mistral models, alpaca otherwise
    max_len: int = 2048
    lora_r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    lora_targets: str = ""  # comma-separated module names; empty: the paper's targets for the family
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    epochs: int = 3
    global_batch: int = 128  # examples per optimizer step, over all ranks and micro-batches
    micro_batch: int = 1  # examples per forward pass on one rank (not used with pack_tokens)
    pack_tokens: int = 0  # --pack: concatenate examples into rows of up to N tokens, one row per forward (0: off)
    loss_average: str = "example"  # "example": each example weighs the same (the paper); "token": each answer token
    max_steps: int = 0  # stop after this many optimizer steps (0: train all epochs)
    dtype: str = "bf16"  # "bf16" or "fp32" ("fp32" for CPUs)
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    activation_checkpointing: bool = False
    group_by_length: bool = False  # batch examples of similar length together (less padding; the paper: random)
    eval_every: int = 0  # evaluate every N steps (0: at the end of each epoch)
    checkpoint_every: int = 50  # checkpoint every N steps (and at each epoch end)
    keep_checkpoints: int = 2  # how many of the latest checkpoints to keep (0: all)
    seed: int = 42
    resume: bool = False


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, bad configuration)."""


# --- distributed set-up -------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    mesh: object | None  # the 1-D device mesh when launched by torchrun

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Sum scalars over ranks (fp64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.mesh is not None:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.mesh is not None:
            dist.barrier()


def setup_distributed() -> Dist:
    """Join the process group when launched by torchrun (nccl on GPUs, gloo on CPU); else a single process."""
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return Dist(0, 1, torch.device("cuda" if cuda else "cpu"), None)
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    return Dist(dist.get_rank(), world, device, mesh)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (decoder `layers`, T5 encoder/decoder `block`): FSDP units and checkpointing units."""
    return [
        block
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "block")
        for block in module
    ]


def enable_activation_checkpointing(blocks: list[nn.Module]) -> None:
    """Recompute each block's activations in the backward pass instead of storing them."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        forward = block.forward
        block.forward = lambda *args, _f=forward, **kw: checkpoint(_f, *args, use_reentrant=False, **kw)


def shard(model: nn.Module, d: Dist, dtype: torch.dtype) -> nn.Module:
    """FSDP2: shard each transformer block, then the root, over the device mesh.

    Compute runs in `dtype` (FSDP2 casts every parameter of a unit, LoRA's included, to it); gradients are reduced
    and kept in fp32 for the fp32 LoRA weights and optimizer state. T5 is sharded as one unit at the root: its
    stacks use block 0's relative-position table and every decoder block's cross-attention projections outside those
    blocks' own forward, where a per-block unit would not have gathered them.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    blocks = [] if model.config.model_type == "t5" else transformer_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=d.mesh, mp_policy=mp)
    fully_shard(model, mesh=d.mesh, mp_policy=mp)
    return model


# --- data ---------------------------------------------------------------------------------------------------------


def _data_file(directory: str, stem: str) -> Path:
    for name in (f"{stem}.json", f"{stem}.jsonl"):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    raise FileNotFoundError(f"no {stem}.json or {stem}.jsonl in {directory}")


def load_examples(config: TrainConfig, tokenizer, template: str, seq2seq: bool, split: str, log) -> list[dict]:
    """Read, select, sample and tokenize one split; reports what was truncated or dropped."""
    stem = {"train": "train", "val": "validation"}[split]
    tasks = [t for t in config.tasks.split(",") if t] or None
    records = load_records(_data_file(config.data, stem), split=split, setting=config.setting, tasks=tasks)
    if split == "train" and config.max_per_task:
        records = sample_per_task(records, config.max_per_task, seed=config.seed)
    if split == "val" and config.max_val_examples:
        records = random.Random(config.seed).sample(list(records), min(len(records), config.max_val_examples))
    if not records:
        raise TrainingError(f"no {split} records in {config.data} for setting={config.setting!r}, tasks={tasks}")
    examples, report = build_examples(records, tokenizer, template, config.max_len, seq2seq=seq2seq)
    log(f"{split}: {report}")
    if not examples:
        raise TrainingError(
            f"{split}: all {len(records)} records in {config.data} were dropped as longer than max_len={config.max_len}"
        )
    for ex in examples:
        ex["n_loss_tokens"] = loss_token_count(ex["labels"], seq2seq)
        ex["loss_weight"] = example_loss_weight(ex["labels"], config.loss_average, seq2seq)
    return examples


def micro_batches(
    examples: list[dict], indices: list[int], size: int, pack_tokens: int, seq2seq: bool
) -> list[list[dict]]:
    """Split one rank's share of a step into micro-batches: packed rows of up to `pack_tokens` tokens filled in the
    given order, or else `size` examples each, longest first (similar lengths pad little)."""
    if pack_tokens:
        return pack_examples([examples[i] for i in indices], pack_tokens, seq2seq)
    ordered = sorted(indices, key=lambda i: -len(examples[i]["input_ids"]))
    return [[examples[i] for i in ordered[s : s + size]] for s in range(0, len(ordered), size)]


def make_batch(examples: list[dict], config: TrainConfig, pad_id: int, seq2seq: bool) -> dict[str, torch.Tensor]:
    """One micro-batch as tensors: a packed row (`--pack`), or examples padded to a multiple of 8 (the paper)."""
    if config.pack_tokens:
        return collate_packed([examples], pad_id, 8, seq2seq, config.loss_average)
    return collate(examples, pad_id, "right", 8, seq2seq, loss_average=config.loss_average)


# --- the loss -----------------------------------------------------------------------------------------------------


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], seq2seq: bool) -> torch.Tensor:
    """Weighted sum of the token cross-entropies of one micro-batch (divided later by the step's total example
    weight, summed over micro-batches and ranks; see `ecellm.data.label_weights`)."""
    packed = {"segment_ids": batch.get("segment_ids")}
    if seq2seq:
        packed["decoder_segment_ids"] = batch.get("decoder_segment_ids")
        return seq2seq_lm_loss(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                               reduction="sum", weights=batch["loss_weights"], **packed)
    return causal_lm_loss(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"), reduction="sum",
                          weights=batch["loss_weights"], **packed)


def forward_passes(d: Dist, n_mine: int) -> int:
    """The most micro-batches any rank has: every rank runs that many forward passes (FSDP's collectives pair up)."""
    counts = d.sum(*[n_mine if r == d.rank else 0 for r in range(d.world)])
    return int(max(counts))


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to 0."""
    if step < warmup:
        return step / max(1, warmup)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# --- checkpoints --------------------------------------------------------------------------------------------------


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor from a parameter that may be an FSDP2 shard (DTensor)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def lora_weights(trainable: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters as full CPU tensors, by name. Collective under FSDP: call on every rank."""
    return {name: _full(p) for name, p in trainable.items()}


def optimizer_state(trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    """AdamW's state by parameter name, as full CPU tensors (collective under FSDP), plus its hyper-parameters."""
    state = {
        name: {k: _full(v) if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
        for name, p in trainable.items()
        if p in optimizer.state
    }
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Inverse of `optimizer_state`: full tensors go back to each parameter's device, re-sharded like it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in trainable.items():
        if name not in saved["state"]:
            continue
        restored = {}
        for key, value in saved["state"][name].items():
            if torch.is_tensor(value) and isinstance(p, DTensor) and value.shape == p.shape:
                value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
            elif torch.is_tensor(value) and key != "step":
                value = value.to(p.device)
            restored[key] = value
        optimizer.state[p] = restored
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group.update(saved_group)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_dir(final: Path, write) -> None:
    """Write a directory under a temporary name, then rename it into place."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)  # the previous version stays on disk until the new one is in place
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    out: Path,
    step: int,
    trainable: dict,
    optimizer,
    scheduler,
    d: Dist,
    state: dict,
    base: str,
    model: nn.Module,
    keep: int,
) -> Path:
    """Checkpoint the run at `step`; collective (every rank calls it). Returns the checkpoint directory."""
    weights = lora_weights(trainable)
    optim = optimizer_state(trainable, optimizer)
    rngs = [None] * d.world
    if d.mesh is not None:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    final = out / "checkpoints" / f"step_{step:08d}"
    if d.main:

        def write(tmp: Path) -> None:
            lora.save_adapter(model, tmp / "adapter", base_model_name_or_path=base, weights=weights)
            trainer = {"step": step, "optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rngs, **state}
            torch.save(trainer, tmp / "trainer.pt")

        _atomic_dir(final, write)
        latest = out / "checkpoints" / "latest"
        latest.with_suffix(".tmp").write_text(final.name)
        os.replace(latest.with_suffix(".tmp"), latest)
        if keep:
            for old in sorted((out / "checkpoints").glob("step_*"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = out / "checkpoints" / pointer.read_text().strip()
    return path if (path / "trainer.pt").is_file() else None


# --- the run ------------------------------------------------------------------------------------------------------


class _Stop:
    """Set by SIGTERM; checked between steps."""

    requested = False

    @classmethod
    def handler(cls, signum, frame) -> None:
        cls.requested = True


def train(config: TrainConfig) -> dict:
    """Fine-tune with LoRA as `config` says; returns the run's summary (also written to `out/summary.json`).

    Args:
        config: the run's settings (see `TrainConfig`).
    Returns:
        dict with steps, epochs, losses, best validation loss and its step, timing and output paths.
    """
    d = setup_distributed()
    out = Path(config.out)
    log_lines: list[str] = []

    def log(message: str) -> None:
        if d.main:
            tqdm.write(f"[ecellm.train] {message}", file=sys.stderr)
            log_lines.append(message)

    if config.dtype not in ("bf16", "fp32"):
        raise TrainingError(f"dtype must be 'bf16' or 'fp32', got {config.dtype!r}")
    if config.loss_average not in LOSS_AVERAGES:
        raise TrainingError(f"loss_average must be one of {LOSS_AVERAGES}, got {config.loss_average!r}")
    if config.pack_tokens < 0:
        raise TrainingError(f"pack_tokens must be >= 0 (0: no packing), got {config.pack_tokens}")
    if config.global_batch % (d.world * config.micro_batch):
        raise TrainingError(
            f"global_batch {config.global_batch} must be a multiple of world_size x micro_batch "
            f"({d.world} x {config.micro_batch})"
        )
    if not config.data:
        raise TrainingError("--data is required: a directory with train.json and validation.json")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))

    # Model, tokenizer, LoRA. The same seed on every rank gives every rank the same LoRA initialisation.
    torch.manual_seed(config.seed)
    if config.model:
        model_dir = config.model
    else:
        from .models.default import default_model_dir

        model_dir = str(default_model_dir())
    dtype = torch.bfloat16 if config.dtype == "bf16" else torch.float32
    tokenizer = load_tokenizer(model_dir)
    model = from_pretrained(model_dir, dtype=dtype, device="cpu")
    family = model.config.model_type
    seq2seq = family == "t5"
    template = config.template or ("mistral" if family == "mistral" else "alpaca")
    targets = [t for t in config.lora_targets.split(",") if t] or None
    lora.inject(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout, targets=targets)
    n_trainable, n_total = lora.count_parameters(model)
    log(f"{family} from {model_dir}: {n_trainable:,} trainable of {n_total:,} parameters "
        f"({100 * n_trainable / n_total:.2f}%)")

    # Data.
    train_examples = load_examples(config, tokenizer, template, seq2seq, "train", log)
    val_examples = load_examples(config, tokenizer, template, seq2seq, "val", log)
    per_rank = config.global_batch // d.world
    lengths = [len(ex["input_ids"]) for ex in train_examples]
    sampler = LengthGroupedBatchSampler(
        lengths, per_rank, seed=config.seed, rank=d.rank, world_size=d.world,
        group_batches=50 if config.group_by_length else 1,
    )
    steps_per_epoch = len(sampler)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    warmup = math.ceil(config.warmup_ratio * total_steps)

    # Resume: LoRA weights go in before sharding; optimizer, scheduler and RNG after.
    checkpoint = latest_checkpoint(out) if config.resume else None
    trainer_state = None
    if config.resume and checkpoint is None:
        log(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from scratch")
    if checkpoint is not None:
        trainer_state = torch.load(checkpoint / "trainer.pt", weights_only=False)
        saved = lora.read_adapter_weights(checkpoint / "adapter")
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        wrong = sorted(set(saved) ^ set(params)) + [n for n in saved if n in params and saved[n].shape != params[n].shape]
        if wrong or len(trainer_state["rng"]) != d.world:
            raise TrainingError(
                f"{checkpoint} does not fit this run (it was written with other LoRA settings or "
                f"{len(trainer_state['rng'])} ranks, this run has {d.world}): differing LoRA tensors {wrong[:6]}"
            )
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)
        log(f"resuming from {checkpoint} (step {trainer_state['step']})")

    if config.activation_checkpointing:
        enable_activation_checkpointing(transformer_blocks(model))
    if d.mesh is not None:
        shard(model, d, dtype)
    else:
        model.to(d.device)
    # The sharded parameters, by name, taken now: FSDP2 swaps in unsharded ones between forward and backward.
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = list(trainable.values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, warmup, total_steps))

    step, best_val, best_step, tokens_seen = 0, math.inf, None, 0
    if trainer_state is not None:
        load_optimizer_state(trainable, optimizer, trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        step, best_val, best_step = trainer_state["step"], trainer_state["best_val"], trainer_state["best_step"]
        tokens_seen = trainer_state["tokens_seen"]
        set_rng_state(trainer_state["rng"][d.rank])

    def run_state() -> dict:
        return {"best_val": best_val, "best_step": best_step, "tokens_seen": tokens_seen}

    def to_device(batch: dict) -> dict:
        return {k: v.to(d.device) for k, v in batch.items()}

    def batch_of(examples: list[dict]) -> dict:
        return to_device(make_batch(examples, config, tokenizer.pad_id, seq2seq))

    @torch.no_grad()
    def validation_loss() -> float:
        model.eval()
        mine = list(range(d.rank, len(val_examples), d.world))
        batches = micro_batches(val_examples, mine, config.micro_batch, config.pack_tokens, seq2seq)
        total_loss = total_weight = 0.0
        for i in range(forward_passes(d, len(batches))):  # the same number on every rank (FSDP needs it)
            if i < len(batches):
                total_loss += loss_sum(model, batch_of(batches[i]), seq2seq).item()
                total_weight += sum(ex["loss_weight"] for ex in batches[i])
            else:
                loss_sum(model, batch_of(val_examples[:1]), seq2seq)
        if d.mesh is not None:
            model.reshard()  # no backward follows to free the root's gathered parameters
        model.train()
        total_loss, total_weight = d.sum(total_loss, total_weight)
        return total_loss / max(total_weight, 1.0)

    def evaluate_and_keep_best(epoch: int) -> None:
        nonlocal best_val, best_step
        val = validation_loss()
        improved = val < best_val
        weights = lora_weights(trainable) if improved else None
        if improved:
            best_val, best_step = val, step
            if d.main:
                _atomic_dir(
                    out / "best_adapter",
                    lambda tmp: lora.save_adapter(model, tmp, base_model_name_or_path=model_dir, weights=weights),
                )
        d.barrier()
        write_log({"type": "eval", "step": step, "epoch": epoch, "val_loss": val, "best_val_loss": best_val})
        log(f"step {step}: validation loss {val:.4f}" + (" (best so far, adapter kept)" if improved else ""))

    log_file = out / "log.jsonl"

    def write_log(record: dict) -> None:
        if d.main:
            with open(log_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    previous_handler = signal.signal(signal.SIGTERM, _Stop.handler)
    _Stop.requested = False
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=not d.main, desc="train", unit="step", dynamic_ncols=True)
    start_time, start_tokens, stopped_by = time.perf_counter(), tokens_seen, None
    last_loss, epoch_batches, batches_epoch = math.nan, [], None
    try:
        while step < total_steps:
            epoch, position = divmod(step, steps_per_epoch)
            if batches_epoch != epoch:  # the epoch's order depends only on (seed, epoch): resumable anywhere
                sampler.set_epoch(epoch)
                epoch_batches, batches_epoch = list(sampler), epoch
            step_indices = epoch_batches[position]  # this rank's examples of this step
            batches = micro_batches(train_examples, step_indices, config.micro_batch, config.pack_tokens, seq2seq)
            mine = [ex for batch in batches for ex in batch]
            step_tokens, step_weight = d.sum(sum(ex["n_loss_tokens"] for ex in mine),
                                             sum(ex["loss_weight"] for ex in mine))
            n_passes = forward_passes(d, len(batches))  # packed rows differ in number between ranks
            step_loss = 0.0
            for i in range(n_passes):
                if d.mesh is not None:
                    model.set_requires_gradient_sync(i == n_passes - 1)
                if i < len(batches):
                    loss = loss_sum(model, batch_of(batches[i]), seq2seq)
                else:  # a rank with fewer rows joins the others' passes with a zero loss
                    loss = 0.0 * loss_sum(model, batch_of(batches[0]), seq2seq)
                # FSDP averages gradients over ranks; scaling by world size turns that into a sum, so the
                # update equals one process's on the same global batch.
                (loss * (d.world / max(step_weight, 1.0))).backward()
                step_loss += loss.item()
            (step_loss,) = d.sum(step_loss)
            step_loss /= max(step_weight, 1.0)
            if not math.isfinite(step_loss):
                last = latest_checkpoint(out)
                raise TrainingError(
                    f"non-finite training loss ({step_loss}) at step {step + 1} (epoch {epoch + 1}); the optimizer "
                    f"step was skipped. Last good checkpoint: {last or 'none yet'}"
                )
            grad_norm = math.nan
            if config.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += int(d.sum(sum(len(ex["input_ids"]) for b in batches for ex in b))[0])
            last_loss = step_loss
            elapsed = time.perf_counter() - start_time
            speed = (tokens_seen - start_tokens) / max(elapsed, 1e-9)
            write_log({"type": "step", "step": step, "epoch": epoch + 1, "loss": step_loss, "lr": lr,
                       "grad_norm": grad_norm, "loss_tokens": int(step_tokens), "tokens_per_s": speed,
                       "elapsed_s": elapsed})
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
            bar.update(1)

            epoch_end = step % steps_per_epoch == 0 or step == total_steps
            if (config.eval_every and step % config.eval_every == 0) or (not config.eval_every and epoch_end):
                evaluate_and_keep_best(epoch + 1)
            (stop,) = d.sum(float(_Stop.requested))
            if stop:
                stopped_by = "SIGTERM"
            if stop or epoch_end or (config.checkpoint_every and step % config.checkpoint_every == 0):
                save_checkpoint(
                    out, step, trainable, optimizer, scheduler, d, run_state(), model_dir, model, config.keep_checkpoints
                )
            if stopped_by:
                log(f"SIGTERM: checkpoint saved at step {step}; resume with --resume")
                break
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous_handler)

    weights = lora_weights(trainable)
    if d.main and not stopped_by:
        _atomic_dir(
            out / "adapter", lambda tmp: lora.save_adapter(model, tmp, base_model_name_or_path=model_dir, weights=weights)
        )
    elapsed = time.perf_counter() - start_time
    summary = {
        "steps": step,
        "total_steps": total_steps,
        "epochs": step / steps_per_epoch,
        "final_train_loss": last_loss,
        "best_val_loss": best_val,
        "best_step": best_step,
        "world_size": d.world,
        "elapsed_s": elapsed,
        "tokens_per_s": (tokens_seen - start_tokens) / max(elapsed, 1e-9),
        "trainable_parameters": n_trainable,
        "stopped_by": stopped_by,
        "adapter": str(out / "adapter"),
        "best_adapter": str(out / "best_adapter"),
    }
    if d.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log(
            f"done: {step}/{total_steps} steps in {elapsed:.0f}s ({summary['tokens_per_s']:.0f} tokens/s), "
            f"final train loss {last_loss:.4f}, best validation loss {best_val:.4f} at step {best_step}"
        )
    d.barrier()
    return summary


# --- command line -------------------------------------------------------------------------------------------------


SHORT_FLAGS = {"pack_tokens": ["--pack"]}  # extra names of some flags


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """A `TrainConfig` from command-line flags, one per field (`--lora-r 16`, `--no-group-by-length`, ...)."""
    parser = argparse.ArgumentParser(prog="python -m ecellm.train", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(TrainConfig):
        flags = ["--" + f.name.replace("_", "-"), *SHORT_FLAGS.get(f.name, [])]
        if f.type in ("bool", bool):
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(*flags, type=kind, default=f.default, help=f"default: {f.default!r}")
    return TrainConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    try:
        train(config)
    except TrainingError as e:
        print(f"ecellm.train: error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
