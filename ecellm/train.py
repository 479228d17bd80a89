"""LoRA instruction tuning on ECInstruct: the eCeLLM recipe in one loop, on one process or many.

    python -m ecellm.train --model DIR --data DIR --out runs/x                    # one process
    torchrun --nproc_per_node=8 -m ecellm.train --model DIR --data DIR ...        # FSDP2 over 8 ranks

The run reads top to bottom in `_train`, as stages over one `Run` (settings, ranks, model, data, optimizer, progress):

    check_config -> prepare_out (lock) -> setup_model -> setup_data -> check_inputs -> [restore_lora_weights]
    -> setup_optimizer -> [restore_trainer_state] -> fit (run_step, then after_step: save_checkpoint, validate;
    until the last step, a signal or the time limit) -> finish (final adapter, summary.json) -> the lock released

The loss is averaged per example by default (as the reference's micro-batch-1 training weighs them) or over all
answer tokens (`--loss-average token`), its normaliser summed over micro-batches and ranks: N ranks (FSDP2,
`ecellm.distributed`) make the same update as one process with the same global batch. `--pack N` concatenates
examples into rows of up to N tokens, each attending only to itself. A step whose loss or gradient norm is not
finite is skipped and logged. The folder's files and rules (checkpoints, `--resume`, `--overwrite`, the lock, the
fingerprints of data and weights) live in `ecellm.checkpoints` and `ecellm.runs`; docs/training.md tells them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import lora, nf4
from .checkpoints import (
    DATA_FINGERPRINT,
    MODEL_FINGERPRINT,
    TrainerState,
    TrainingError,
    append_log,
    check_inputs,
    checkpoint_dir,
    copy_lora_weights,
    full_tensor,
    latest_checkpoint,
    load_initial_adapter,
    load_optimizer_state,
    optimizer_state,
    param_groups,
    prepare_out,
    read_checkpoint,
    rewrite_trainer_state,
    rng_state,
    set_rng_state,
    write_adapter,
    write_checkpoint,
)
from .configs import TrainConfig
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
from .distributed import (  # noqa: F401 (setup_distributed and the model placement: public here too)
    DistContext,
    compile_blocks,
    distributed,
    enable_activation_checkpointing,
    reshard_all,
    setup_distributed,
    shard,
    transformer_blocks,
)
from .errors import exit_on_error
from .files import write_json
from .flags import parse_dtype, parse_flags
from .lock import FolderLock
from .models import load_pretrained, template_for
from .models.default import resolve_model
from .runs import fingerprint_files, weight_files
from .tokenizer import Tokenizer

# --- data ---------------------------------------------------------------------------------------------------------


def _data_file(directory: str, stem: str) -> Path:
    for name in (f"{stem}.json", f"{stem}.jsonl"):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    raise FileNotFoundError(f"no {stem}.json or {stem}.jsonl in {directory}")


def load_examples(
    config: TrainConfig, tokenizer, template: str, seq2seq: bool, split: str, log
) -> tuple[list[dict], dict[str, dict]]:
    """Read, select, sample and tokenize one split; reports what was truncated or dropped. Returns the examples and
    the fingerprint of the file read (`ecellm.data.Records.fingerprints`)."""
    stem = {"train": "train", "val": "validation"}[split]
    tasks = config.tasks
    records = load_records(_data_file(config.data, stem), split=split, setting=config.setting, tasks=tasks)
    fingerprint = records.fingerprints
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
    return examples, fingerprint


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
    """One micro-batch as tensors, the model's keyword arguments: a packed row (`--pack`), or examples padded to a
    multiple of 8 (the paper)."""
    if config.pack_tokens:
        return collate_packed([examples], pad_id, 8, seq2seq, config.loss_average)
    batch = collate(examples, pad_id, "right", 8, seq2seq, loss_average=config.loss_average)
    if not seq2seq:
        # Decoder batches are right-padded: under causal attention no real token sees a later pad, so the mask
        # changes nothing the loss reads, and without it attention takes SDPA's causal (flash) path.
        del batch["attention_mask"]
    return batch


# --- the loss -----------------------------------------------------------------------------------------------------


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Weighted sum of the token cross-entropies of one micro-batch (divided later by the step's total example
    weight, summed over micro-batches and ranks; see `ecellm.data.label_weights`)."""
    return model(**batch, reduction="sum")


def forward_passes(dist_ctx: DistContext, n_mine: int) -> int:
    """The most micro-batches any rank has: every rank runs that many forward passes (FSDP's collectives pair up)."""
    counts = dist_ctx.all_reduce_sum(*[n_mine if r == dist_ctx.rank else 0 for r in range(dist_ctx.world)])
    return int(max(counts))


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to 0."""
    if step < warmup:
        return step / max(1, warmup)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# --- the run's state ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the stages of one run share: its settings and place among the ranks, the model and its data, the
    optimizer, and where training stands. `setup_model`, `setup_data` and `setup_optimizer` fill it in that order;
    `train_step`, `validate` and the loop advance it; `save_checkpoint` writes it down."""

    config: TrainConfig
    dist_ctx: DistContext
    model_dir: str  # the base model's checkpoint directory
    model: nn.Module  # with LoRA; sharded by FSDP2 in a distributed run
    tokenizer: Tokenizer
    n_trainable: int  # LoRA parameters of the whole (unsharded) model
    train_examples: list[dict] = field(default_factory=list)
    val_examples: list[dict] = field(default_factory=list)
    data_fingerprint: dict[str, dict] = field(default_factory=dict)  # file -> size, records, sha256 (both splits)
    model_fingerprint: dict[str, dict] = field(default_factory=dict)  # base weights' file -> size, sha256 (main rank)
    sampler: LengthGroupedBatchSampler | None = None  # this rank's share of each step
    steps_per_epoch: int = 0
    total_steps: int = 0
    trainable: dict[str, nn.Parameter] = field(default_factory=dict)  # LoRA parameters (FSDP2 shards), by name
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    step: int = 0  # optimizer steps taken
    best_val: float = math.inf  # the lowest validation loss so far, and its step
    best_step: int | None = None
    tokens_seen: int = 0  # input tokens of all steps, over all ranks
    last_loss: float = math.nan  # the training loss of the latest step applied (not skipped)
    recent_losses: list[float] = field(default_factory=list)  # the latest steps' losses, for `config.stop_at_loss`
    validation_due: bool = False  # the current step's validation has not ended (a checkpoint written before it)
    checkpointed_step: int | None = None  # the step of this process's latest checkpoint, and the RNG states in it
    checkpoint_rngs: list[dict] = field(default_factory=list)
    epoch_order: list[list[int]] = field(default_factory=list)  # this rank's examples of each step of `ordered_epoch`
    ordered_epoch: int | None = None
    started: float = 0.0  # `time.perf_counter()` when the loop started, and `tokens_seen` then
    tokens_at_start: int = 0
    first_step_s: float | None = None  # wall time of this process's first step (with --compile: compiling), and
    compile_s: float | None = None  # the first step's time minus the second's: the compilation's cost

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def seq2seq(self) -> bool:
        return self.model.config.model_type == "t5"

    def log(self, message: str) -> None:
        """A progress line, written by the main rank."""
        if self.dist_ctx.is_main:
            log(message)

    def speed(self) -> tuple[float, float]:
        """Seconds since the loop started, and input tokens per second since then."""
        elapsed = time.perf_counter() - self.started
        return elapsed, (self.tokens_seen - self.tokens_at_start) / max(elapsed, 1e-9)


def log(message: str) -> None:
    """One progress line on stderr (tqdm's bar stays below it)."""
    tqdm.write(f"[ecellm.train] {message}", file=sys.stderr)


# --- setting up: model, data, optimizer, resume -----------------------------------------------------------------------


def check_config(config: TrainConfig, world: int) -> None:
    """Refuse settings no run can use, before anything is loaded."""
    if config.dtype not in ("bf16", "fp32"):
        raise TrainingError(f"dtype must be 'bf16' or 'fp32', got {config.dtype!r}")
    if config.loss_average not in LOSS_AVERAGES:
        raise TrainingError(f"loss_average must be one of {LOSS_AVERAGES}, got {config.loss_average!r}")
    if config.minutes < 0:
        raise TrainingError(f"minutes must be >= 0 (0: no time limit), got {config.minutes}")
    if config.init_adapter and not Path(config.init_adapter).is_dir():
        raise TrainingError(f"init_adapter: {config.init_adapter} is not a directory (an adapter written by ecellm or "
                            "peft: adapter_config.json + adapter_model.safetensors)")
    if config.pack_tokens < 0:
        raise TrainingError(f"pack_tokens must be >= 0 (0: no packing), got {config.pack_tokens}")
    if config.quantize not in (None, "nf4"):
        raise TrainingError(f"quantize must be 'nf4' or None (off), got {config.quantize!r}")
    if config.quantize and world > 1:
        raise TrainingError(f"quantize nf4 runs in one process, this run has {world}: FSDP2 shards Parameters and the "
                            "4-bit weights are buffers, so every rank would hold the whole base; drop --quantize or "
                            "run without torchrun")
    if config.global_batch % (world * config.micro_batch):
        raise TrainingError(
            f"global_batch {config.global_batch} must be a multiple of world_size x micro_batch "
            f"({world} x {config.micro_batch})"
        )
    if not config.data:
        raise TrainingError("--data is required: a directory with train.json and validation.json")


def setup_model(config: TrainConfig, dist_ctx: DistContext) -> Run:
    """Load the base model and its tokenizer, and add LoRA. Seeds torch with `config.seed` first: every rank starts
    from the same LoRA initialisation."""
    torch.manual_seed(config.seed)
    model_dir = str(resolve_model(config.model))  # a checkpoint directory, a real model's name, or the default
    model, tokenizer = load_pretrained(model_dir, dtype=parse_dtype(config.dtype), device="cpu")
    lora.inject(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                targets=config.lora_targets)
    if config.init_adapter:
        load_initial_adapter(model, Path(config.init_adapter), config.lora_r, config.lora_alpha)
    n_trainable, n_total = lora.count_parameters(model)
    run = Run(config, dist_ctx, model_dir, model, tokenizer, n_trainable)
    if dist_ctx.is_main:
        run.model_fingerprint = fingerprint_files(weight_files(model_dir))
    run.log(f"{model.config.model_type} from {model_dir}: {n_trainable:,} trainable of {n_total:,} parameters "
            f"({100 * n_trainable / n_total:.2f}%)" + (f", LoRA from {config.init_adapter}" if config.init_adapter
                                                       else ""))
    if config.quantize:
        run.log(nf4.quantize_model(model).summary())
    return run


def setup_data(run: Run) -> None:
    """Tokenize both splits and lay out the steps: this rank's sampler, the steps per epoch and in all."""
    config, dist_ctx = run.config, run.dist_ctx
    family = run.model.config.model_type
    template = template_for(family, config.template)
    run.train_examples, train_files = load_examples(config, run.tokenizer, template, run.seq2seq, "train", run.log)
    run.val_examples, val_files = load_examples(config, run.tokenizer, template, run.seq2seq, "val", run.log)
    run.data_fingerprint = {**train_files, **val_files}
    run.sampler = LengthGroupedBatchSampler(
        [len(ex["input_ids"]) for ex in run.train_examples], config.global_batch // dist_ctx.world,
        seed=config.seed, rank=dist_ctx.rank, world_size=dist_ctx.world,
        group_batches=50 if config.group_by_length else 1,
    )
    run.steps_per_epoch = len(run.sampler)
    run.total_steps = run.steps_per_epoch * config.epochs
    if config.max_steps:
        run.total_steps = min(run.total_steps, config.max_steps)


def restore_lora_weights(run: Run, checkpoint: Path) -> tuple[TrainerState, dict[str, torch.Tensor]]:
    """Copy a checkpoint's LoRA weights into the model (before sharding). Returns the checkpoint's trainer state and
    optimizer tensors, for `restore_trainer_state` once the optimizer exists."""
    trainer_state, optim_tensors, saved = read_checkpoint(checkpoint)
    if len(trainer_state.rng) != run.dist_ctx.world:
        raise TrainingError(f"{checkpoint} does not fit this run (written by {len(trainer_state.rng)} ranks, this "
                            f"run has {run.dist_ctx.world})")
    copy_lora_weights(run.model, saved, checkpoint)
    run.log(f"resuming from {checkpoint} (step {trainer_state.step})")
    return trainer_state, optim_tensors


def setup_optimizer(run: Run) -> None:
    """Place the model (compilation, activation checkpointing, then FSDP2 sharding or the move to the device), then
    AdamW and the learning-rate schedule over its LoRA parameters."""
    config, model = run.config, run.model
    if config.compile:
        compile_blocks(transformer_blocks(model), run.dist_ctx.device)
        run.log("--compile: each block compiled for any row length (the first step compiles, once)")
    if config.activation_checkpointing:
        enable_activation_checkpointing(transformer_blocks(model))
    if run.dist_ctx.mesh is not None:
        # T5 is one unit at the root: its stacks use block 0's relative-position table and every decoder block's
        # cross-attention projections outside those blocks' own forward, where a per-block unit would not gather them.
        blocks = [] if model.config.model_type == "t5" else transformer_blocks(model)
        shard(model, blocks, run.dist_ctx, parse_dtype(config.dtype), config.reshard_after_forward)
    else:
        model.to(run.dist_ctx.device)
    # The sharded parameters, by name, taken now: FSDP2 swaps in unsharded ones between forward and backward.
    run.trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    run.optimizer = torch.optim.AdamW(list(run.trainable.values()), lr=config.lr, weight_decay=config.weight_decay)
    warmup, total = math.ceil(config.warmup_ratio * run.total_steps), run.total_steps
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: cosine_with_warmup(s, warmup, total))


def restore_trainer_state(run: Run, state: TrainerState, optim_tensors: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's optimizer, scheduler, progress and this rank's RNG states back (see `save_checkpoint`)."""
    load_optimizer_state(run.trainable, run.optimizer, optim_tensors, state.param_groups)
    run.scheduler.load_state_dict(state.scheduler)
    run.step, run.best_step, run.tokens_seen = state.step, state.best_step, state.tokens_seen
    run.best_val = math.inf if state.best_val is None else state.best_val
    run.last_loss = math.nan if state.last_loss is None else state.last_loss
    run.validation_due = state.validation_due
    set_rng_state(state.rng[run.dist_ctx.rank])


# --- one step, validation, the log ----------------------------------------------------------------------------------


def next_step_examples(run: Run) -> list[int]:
    """This rank's examples of the next step. An epoch's order depends only on (seed, epoch): resumable anywhere."""
    epoch, position = divmod(run.step, run.steps_per_epoch)
    if run.ordered_epoch != epoch:
        run.sampler.set_epoch(epoch)
        run.epoch_order, run.ordered_epoch = list(run.sampler), epoch
    return run.epoch_order[position]


def device_batch(run: Run, examples: list[dict]) -> dict[str, torch.Tensor]:
    """One micro-batch as tensors on this rank's device (see `make_batch`)."""
    batch = make_batch(examples, run.config, run.tokenizer.pad_id, run.seq2seq)
    return {k: v.to(run.dist_ctx.device) for k, v in batch.items()}


def loss_and_gradients(run: Run, batches: list[list[dict]]) -> tuple[float, float]:
    """Forward and backward over this rank's micro-batches of one step. Returns the step's loss (over all ranks:
    the weighted loss sum over the total example weight) and its number of answer tokens."""
    dist_ctx = run.dist_ctx
    mine = [ex for batch in batches for ex in batch]
    step_tokens, step_weight = dist_ctx.all_reduce_sum(sum(ex["n_loss_tokens"] for ex in mine),
                                                       sum(ex["loss_weight"] for ex in mine))
    n_passes = forward_passes(dist_ctx, len(batches))  # packed rows differ in number between ranks
    step_loss = 0.0
    for i in range(n_passes):
        if dist_ctx.mesh is not None:
            run.model.set_requires_gradient_sync(i == n_passes - 1)
        if i < len(batches):
            loss = loss_sum(run.model, device_batch(run, batches[i]))
        else:  # a rank with fewer rows joins the others' passes with a zero loss
            loss = 0.0 * loss_sum(run.model, device_batch(run, batches[0]))
        # FSDP averages gradients over ranks; scaling by world size turns that into a sum, so the update equals one
        # process's on the same global batch.
        (loss * (dist_ctx.world / max(step_weight, 1.0))).backward()
        step_loss += loss.item()
    (step_loss,) = dist_ctx.all_reduce_sum(step_loss)
    return step_loss / max(step_weight, 1.0), step_tokens


def train_step(run: Run) -> dict:
    """One optimizer step on the next step's examples. Returns its log record.

    A step whose loss or gradient norm is not finite is skipped: its gradients are dropped, the weights and AdamW's
    state stay as they were, and the record says why ("skipped"). The schedule and the data order move on as after
    any step, so the run (and a resume of it) continues with the next step's examples.
    """
    config, epoch = run.config, run.step // run.steps_per_epoch
    batches = micro_batches(run.train_examples, next_step_examples(run), config.micro_batch, config.pack_tokens,
                            run.seq2seq)
    loss, loss_tokens = loss_and_gradients(run, batches)
    params = list(run.trainable.values())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    grad_norm = float(full_tensor(norm))  # over all ranks: every rank takes the same decision
    skipped = ("non-finite loss" if not math.isfinite(loss) else
               "non-finite gradient norm" if not math.isfinite(grad_norm) else None)
    lr = run.scheduler.get_last_lr()[0]
    if skipped:
        run.log(f"step {run.step + 1}: {skipped} (loss {loss}, gradient norm {grad_norm}): update skipped")
    else:
        if config.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, config.grad_clip, norm)
        run.optimizer.step()
        run.last_loss = loss
        run.recent_losses = [*run.recent_losses, loss][-STOP_AT_LOSS_STEPS:]
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.tokens_seen += int(run.dist_ctx.all_reduce_sum(sum(len(ex["input_ids"]) for b in batches for ex in b))[0])
    elapsed, speed = run.speed()
    return {"type": "step", "step": run.step, "epoch": epoch + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "loss_tokens": int(loss_tokens), "tokens_per_s": speed, "elapsed_s": elapsed,
            **({"skipped": skipped} if skipped else {})}


def signalled(run: Run) -> bool:
    """Whether any rank received a stop signal. Collective."""
    return run.dist_ctx.all_reduce_sum(float(_Stop.received is not None))[0] > 0


@torch.no_grad()
def validation_loss(run: Run) -> float | None:
    """The loss on the validation examples, averaged like the training loss, over all ranks; None when a stop signal
    came first (checked before each forward pass, so a signal is answered within one). Collective."""
    dist_ctx, model = run.dist_ctx, run.model
    model.eval()
    mine = list(range(dist_ctx.rank, len(run.val_examples), dist_ctx.world))
    batches = micro_batches(run.val_examples, mine, run.config.micro_batch, run.config.pack_tokens, run.seq2seq)
    total_loss = total_weight = 0.0
    stopped = False
    for i in range(forward_passes(dist_ctx, len(batches))):  # the same number on every rank (FSDP needs it)
        if signalled(run):
            stopped = True
            break
        if i < len(batches):
            total_loss += loss_sum(model, device_batch(run, batches[i])).item()
            total_weight += sum(ex["loss_weight"] for ex in batches[i])
        else:
            loss_sum(model, device_batch(run, run.val_examples[:1]))
    if dist_ctx.mesh is not None:
        reshard_all(model)  # no backward follows to free the gathered weights
    model.train()
    if stopped:
        return None
    total_loss, total_weight = dist_ctx.all_reduce_sum(total_loss, total_weight)
    return total_loss / max(total_weight, 1.0)


def validate(run: Run) -> bool:
    """Log the validation loss of the current step; a new best keeps its adapter in `out/best_adapter`. Returns
    False when a stop signal ended the validation first (nothing written). Collective."""
    val = validation_loss(run)
    if val is None:
        return False
    improved = val < run.best_val
    weights = lora_weights(run.trainable) if improved else None
    if improved:
        run.best_val, run.best_step = val, run.step
        if run.dist_ctx.is_main:
            write_adapter(run.model, run.model_dir, run.out / "best_adapter", weights)
    run.dist_ctx.barrier()
    epoch = (run.step - 1) // run.steps_per_epoch + 1
    write_log(run, {"type": "eval", "step": run.step, "epoch": epoch, "val_loss": val, "best_val_loss": run.best_val})
    run.log(f"step {run.step}: validation loss {val:.4f}" + (" (best so far, adapter kept)" if improved else ""))
    return True


def write_log(run: Run, record: dict) -> None:
    """Append one record to `out/log.jsonl` (main rank only)."""
    if run.dist_ctx.is_main:
        append_log(run.out, record)


# --- checkpointing ------------------------------------------------------------------------------------------------


def lora_weights(trainable: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters as full CPU tensors, by name. Collective under FSDP: call on every rank."""
    return {name: full_tensor(p) for name, p in trainable.items()}


def trainer_state(run: Run, rngs: list[dict]) -> TrainerState:
    """The run's `TrainerState` now, with every rank's RNG states `rngs`."""
    return TrainerState(
        step=run.step, scheduler=run.scheduler.state_dict(), param_groups=param_groups(run.optimizer),
        rng=rngs, best_val=run.best_val, best_step=run.best_step, tokens_seen=run.tokens_seen,
        last_loss=run.last_loss, validation_due=run.validation_due,
    )


def save_checkpoint(run: Run) -> Path:
    """Checkpoint the run at its current step (`ecellm.checkpoints.write_checkpoint`); collective (every rank calls
    it, the main rank writes). Returns the checkpoint directory.

    It holds the adapter, AdamW's tensors and the `TrainerState`. Older checkpoints beyond `keep_checkpoints` are
    deleted. Weights that are not finite are never written: the run ends with a `TrainingError` naming the last
    good checkpoint (which pruning therefore never removes)."""
    weights = lora_weights(run.trainable)
    bad = [name for name, t in weights.items() if not torch.isfinite(t).all()]
    if bad:  # every rank holds the full weights: all raise together
        last, _ = latest_checkpoint(run.out)
        raise TrainingError(f"step {run.step}: the LoRA weights are no longer finite ({', '.join(bad[:3])}); no "
                            f"checkpoint written. Last good checkpoint: {last or 'none yet'}")
    optim_tensors = optimizer_state(run.trainable, run.optimizer)
    run.checkpoint_rngs = run.dist_ctx.gather(rng_state())
    if run.dist_ctx.is_main:
        write_checkpoint(run.out, run.model, run.model_dir, weights, optim_tensors,
                         trainer_state(run, run.checkpoint_rngs), run.config.keep_checkpoints)
    run.dist_ctx.barrier()
    run.checkpointed_step = run.step
    return checkpoint_dir(run.out, run.step)


def note_validated(run: Run) -> None:
    """The current step's validation ended: a checkpoint written before it at this step records so (and the best
    validation loss), so a resume does not validate again. Collective."""
    run.validation_due = False
    if run.checkpointed_step == run.step and run.dist_ctx.is_main:
        rewrite_trainer_state(checkpoint_dir(run.out, run.step), trainer_state(run, run.checkpoint_rngs))
    run.dist_ctx.barrier()


# --- the run ------------------------------------------------------------------------------------------------------


class _Stop:
    """Set by SIGTERM or SIGINT (Ctrl-C); checked after each step and before each validation forward pass. A second
    Ctrl-C stops at once, without saving."""

    received: str | None = None  # the signal's name

    @classmethod
    def handler(cls, signum, frame) -> None:
        if cls.received == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        cls.received = signal.Signals(signum).name


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
OUT_OF_TIME = "time limit"  # `fit`'s reason when `config.minutes` ran out
LOSS_REACHED = "loss reached"  # `fit`'s reason when the recent training loss fell below `config.stop_at_loss`
STOP_AT_LOSS_STEPS = 5  # the steps whose mean training loss `config.stop_at_loss` compares
FINISHED = (None, OUT_OF_TIME, LOSS_REACHED)  # endings that validate and write the adapter


def loss_reached(run: Run) -> bool:
    """Whether the mean training loss of the last `STOP_AT_LOSS_STEPS` steps is below `config.stop_at_loss` (the
    same on every rank: each step's loss is reduced over the ranks)."""
    recent = run.recent_losses
    return (run.config.stop_at_loss > 0 and len(recent) == STOP_AT_LOSS_STEPS
            and sum(recent) / len(recent) < run.config.stop_at_loss)


def stop_requested(run: Run) -> str | None:
    """Why the run stops after this step: the name of the stop signal this rank received ("a signal to another rank"
    for another's), `OUT_OF_TIME` when a rank's clock passed `config.minutes`, `LOSS_REACHED`, or None. Collective:
    every rank stops at the same step."""
    out_of_time = run.config.minutes > 0 and time.perf_counter() - run.started >= 60 * run.config.minutes
    signalled, timed_out = run.dist_ctx.all_reduce_sum(float(_Stop.received is not None), float(out_of_time))
    if signalled:
        return _Stop.received or "a signal to another rank"
    return OUT_OF_TIME if timed_out else LOSS_REACHED if loss_reached(run) else None


def note_step_time(run: Run, seconds: float) -> None:
    """Keep the first step's wall time and, with `--compile`, the compilation's (the first step's time minus the
    second's), shown once on the progress line."""
    if run.first_step_s is None:
        run.first_step_s = seconds
    elif run.config.compile and run.compile_s is None:
        run.compile_s = max(run.first_step_s - seconds, 0.0)
        run.log(f"--compile: the first step took {run.first_step_s:.1f}s, {run.compile_s:.1f}s of it compiling")


def run_step(run: Run, bar: tqdm) -> None:
    """One optimizer step, logged and shown on the progress bar."""
    started = time.perf_counter()
    record = train_step(run)
    note_step_time(run, time.perf_counter() - started)
    write_log(run, record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
    bar.update(1)


def after_step(run: Run) -> str | None:
    """What follows a step: the checkpoint (on schedule, at an epoch's end, or before stopping), then the step's
    validation (on schedule, or when the time is up). The checkpoint comes first, so a stop signal during the
    validation ends it within a forward pass with the step on disk; the checkpoint records that its validation is
    due, and a resume runs it first. Returns what stops the run (`stop_requested`), if anything. Collective."""
    config = run.config
    epoch_end = run.step % run.steps_per_epoch == 0 or run.step == run.total_steps
    stopped_by = stop_requested(run)
    run.validation_due = ((config.eval_every and run.step % config.eval_every == 0)
                          or (not config.eval_every and epoch_end) or stopped_by in (OUT_OF_TIME, LOSS_REACHED))
    if stopped_by or epoch_end or (config.checkpoint_every and run.step % config.checkpoint_every == 0):
        save_checkpoint(run)
    if run.validation_due and stopped_by in FINISHED:
        stopped_by = validate_or_stop(run) or stopped_by
    return stopped_by


def validate_or_stop(run: Run) -> str | None:
    """Run the current step's validation; on a stop signal during it, make sure the step is checkpointed (its
    validation still due) and return the signal's name. Collective."""
    if validate(run):
        note_validated(run)
        return None
    if run.checkpointed_step != run.step:
        save_checkpoint(run)
    return _Stop.received or "a signal to another rank"


def fit(run: Run) -> str | None:
    """The training loop: optimizer steps until the last one, a stop signal or the time limit, checkpointing and
    validating on schedule (`after_step`). A resume whose checkpoint was written before its step's validation runs
    that validation first. SIGTERM and SIGINT are handled here and their previous handlers restored after. Returns
    what stopped the run early (a signal's name or `OUT_OF_TIME`), if anything."""
    previous_handlers = {s: signal.signal(s, _Stop.handler) for s in STOP_SIGNALS}
    _Stop.received, stopped_by = None, None
    run.model.train()
    bar = tqdm(total=run.total_steps, initial=run.step, disable=not run.dist_ctx.is_main, desc="train", unit="step",
               dynamic_ncols=True)
    run.started, run.tokens_at_start = time.perf_counter(), run.tokens_seen
    try:
        if run.validation_due:
            run.checkpointed_step, run.checkpoint_rngs = run.step, run.dist_ctx.gather(rng_state())
            stopped_by = validate_or_stop(run)
        while run.step < run.total_steps and not stopped_by:
            run_step(run, bar)
            stopped_by = after_step(run)
    finally:
        bar.close()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    if stopped_by == OUT_OF_TIME:
        run.log(f"time limit of {run.config.minutes:g} minutes reached after step {run.step} of {run.total_steps}: "
                "checkpoint saved (--resume with a larger --minutes continues)")
    elif stopped_by == LOSS_REACHED:
        run.log(f"the mean loss of the last {STOP_AT_LOSS_STEPS} steps fell below {run.config.stop_at_loss:g} after "
                f"step {run.step} of {run.total_steps}: done")
    elif stopped_by:
        run.log(f"{stopped_by}: checkpoint saved at step {run.step}; resume with --resume")
    return stopped_by


def zero_lr_warning(run: Run) -> str | None:
    """A warning when every step of the run (its log, resumed parts included) had learning rate 0, so the adapter
    never changed: with the reference's warm-up, a run of very few steps (`--max-steps 1`) takes only its first
    step, whose learning rate is 0."""
    lrs = [record["lr"] for record in map(json.loads, (run.out / "log.jsonl").read_text().splitlines())
           if record.get("type") == "step"] if run.dist_ctx.is_main else []
    if not lrs or any(lr != 0 for lr in lrs):
        return None
    warmup = math.ceil(run.config.warmup_ratio * run.total_steps)
    return (f"every one of the run's {len(lrs)} steps had learning rate 0, so the adapter did not change (lr "
            f"{run.config.lr:g}; the warm-up's first step has learning rate 0, and this run warms up over {warmup} of "
            f"{run.total_steps} steps): train for more steps to change it")


def finish(run: Run, stopped_by: str | None) -> dict:
    """Write the final adapter (unless a signal stopped the run) and `out/summary.json`; returns the summary."""
    weights = lora_weights(run.trainable)
    if run.dist_ctx.is_main and stopped_by in FINISHED:
        write_adapter(run.model, run.model_dir, run.out / "adapter", weights)
    elapsed, speed = run.speed()
    warning = run.dist_ctx.from_main(lambda: zero_lr_warning(run))
    summary = {
        "steps": run.step, "total_steps": run.total_steps, "epochs": run.step / run.steps_per_epoch,
        "final_train_loss": run.last_loss, "best_val_loss": run.best_val, "best_step": run.best_step,
        "world_size": run.dist_ctx.world, "elapsed_s": elapsed, "tokens_per_s": speed,
        "trainable_parameters": run.n_trainable, "first_step_s": run.first_step_s, "compile_s": run.compile_s,
        "stopped_by": stopped_by, "adapter": str(run.out / "adapter"), "best_adapter": str(run.out / "best_adapter"),
        "warnings": [warning] if warning else [],
    }
    if run.dist_ctx.is_main:
        write_json(run.out / "summary.json", summary, strict=True)
        if warning:
            log(f"warning: {warning}")
        log(f"done: {run.step}/{run.total_steps} steps in {elapsed:.0f}s ({speed:.0f} tokens/s), final train loss "
            f"{run.last_loss:.4f}, best validation loss {run.best_val:.4f} at step {run.best_step}")
    run.dist_ctx.barrier()
    return summary


def train(config: TrainConfig) -> dict:
    """Fine-tune with LoRA as `config` says; returns the run's summary (also written to `out/summary.json`).

    Joins the process group when launched by torchrun and leaves it at the end if it created it; a collective that
    fails (a rank frozen for `dist_timeout_s`, or lost with its node) ends the run with an error naming the ranks that
    stopped answering (`ecellm.distributed.distributed`). Global state it changes: torch's random generator is seeded
    with `config.seed` (and, on a resume, python's, numpy's and torch's generators get the checkpoint's states);
    SIGTERM's and SIGINT's handlers are replaced during the loop and restored after.

    Args:
        config: the run's settings (see `TrainConfig`).
    Returns:
        dict with steps, epochs, losses, best validation loss and its step, timing, output paths and warnings.
    """
    with distributed(config.dist_timeout_s) as dist_ctx:
        return _train(config, dist_ctx)


def _train(config: TrainConfig, dist_ctx: DistContext) -> dict:
    """The run itself, stage by stage, on the ranks of `dist_ctx`: see `train`."""
    check_config(config, dist_ctx.world)
    lock = FolderLock(config.out, "training run")  # taken by the main rank in prepare_out, for the run's life
    try:
        resume_from = dist_ctx.from_main(lambda: prepare_out(Path(config.out), dataclasses.asdict(config), lock, log))
        run = setup_model(config, dist_ctx)
        setup_data(run)
        resume_step = int(resume_from.split("_")[1]) if resume_from else 0 if config.resume else None
        inputs = {DATA_FINGERPRINT: run.data_fingerprint, MODEL_FINGERPRINT: run.model_fingerprint}
        allowed = {DATA_FINGERPRINT: config.allow_data_change, MODEL_FINGERPRINT: config.allow_model_change}
        dist_ctx.from_main(lambda: check_inputs(run.out, inputs, resume_step, allowed, log))
        # Resume: LoRA weights go in before sharding; optimizer, scheduler and RNG states once the optimizer exists.
        resumed = restore_lora_weights(run, run.out / "checkpoints" / resume_from) if resume_from else None
        setup_optimizer(run)
        if resumed is not None:
            restore_trainer_state(run, *resumed)
        stopped_by = fit(run)
        return finish(run, stopped_by)
    finally:
        lock.release()


# --- command line -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """A `TrainConfig` from command-line flags, one per field (`--lora-r 16`, `--no-group-by-length`, ...; `--pack`
    is argparse's abbreviation of `--pack-tokens`)."""
    return parse_flags(TrainConfig, argv, prog="python -m ecellm.train", description=__doc__.split("\n")[0])


def main(argv: list[str] | None = None) -> None:
    """The command line: an expected error ends in one line and exit status 1 (`ecellm.errors.exit_on_error`)."""
    config = parse_args(argv)
    exit_on_error("ecellm.train", lambda: train(config))


if __name__ == "__main__":
    main()
