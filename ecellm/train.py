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

Checkpoints (`out/checkpoints/step_N/`) hold the adapter in PEFT format, the optimizer's tensors in safetensors and
the step, scheduler and RNG states in JSON (nothing is unpickled); they are written to a temporary directory and
renamed, so an interrupted write leaves the previous one usable. `--resume` continues exactly where the newest complete
checkpoint stopped, under the same settings. SIGTERM and Ctrl-C save a checkpoint and exit; `--minutes M` ends the run
after the step that passes M minutes, validated, checkpointed and with its adapter written. A new run refuses an
`--out` that holds another run unless `--overwrite` is given, and one run at a time holds `--out` (a lock,
`ecellm.lock`). `config.json` records the data files' fingerprints: a resume on changed data is refused unless
`--allow-data-change`. A step whose loss or gradient norm is not finite is skipped and logged; weights that are not
finite are never checkpointed. `--init-adapter DIR` starts LoRA from a saved adapter. The folder's files and rules
live in `ecellm.checkpoints`; this module is the loop.

The run reads top to bottom in `_train`, as stages over one `Run` (settings, ranks, model, data, optimizer, progress):

    check_config -> prepare_out (lock) -> setup_model -> setup_data -> check_data -> [restore_lora_weights]
    -> setup_optimizer -> [restore_trainer_state] -> fit (train_step, validate, save_checkpoint, until the last step
    or a signal) -> finish (final adapter, summary.json) -> the lock released

`train()` seeds torch with `config.seed`, installs SIGTERM/SIGINT handlers for the loop and restores them, and
destroys the process group if it created one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from . import lora, nf4, peft_format
from .checkpoints import (
    TrainingError,
    check_data,
    checkpoint_dir,
    full_tensor,
    latest_checkpoint,
    load_optimizer_state,
    optimizer_state,
    prepare_out,
    read_checkpoint,
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
from .errors import exit_on_error
from .files import strict_json, write_json
from .flags import parse_dtype, parse_flags
from .lock import FolderLock
from .models import load_pretrained, template_for
from .models.default import resolve_model
from .tokenizer import Tokenizer

# --- distributed set-up -------------------------------------------------------------------------------------------


@dataclass
class DistContext:
    """This process's place in the run: its rank among `world` processes, its device, and the groups it talks on."""

    rank: int
    world: int
    device: torch.device
    mesh: object | None  # the 1-D device mesh when launched by torchrun
    owns_group: bool = False  # the process group was created here (and is destroyed at the end of the run)
    probe: object | None = None  # a spare gloo group, to find the ranks that stopped answering

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    def all_reduce_sum(self, *values: float) -> list[float]:
        """Sum scalars over ranks (fp64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.mesh is not None:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.mesh is not None:
            dist.barrier()

    def from_main(self, fn):
        """`fn()` run on the main rank; its result, or its error, reaches every rank (none waits on a failed one)."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # re-raised below, once the other ranks have been told
                error = e
        if self.mesh is not None:
            box = [result, None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(box, src=0)
            result, message = box
            if message and not self.is_main:
                raise TrainingError(f"rank 0 failed: {message}")
        if error is not None:
            raise error
        return result

    def silent_ranks(self) -> list[int]:
        """After a failed collective: the other ranks that do not send a message within the timeout (on `probe`)."""
        others = [r for r in range(self.world) if r != self.rank]
        hello, sends, silent = torch.ones(1), {}, []
        for r in others:  # every send first: a live rank's answer then never waits on a silent third rank
            try:
                sends[r] = dist.isend(hello, r, group=self.probe)
            except RuntimeError:
                silent.append(r)
        for r, send in sends.items():
            try:
                dist.recv(torch.zeros(1), r, group=self.probe)
                send.wait()
            except RuntimeError:
                silent.append(r)
        return sorted(silent)


def setup_distributed(timeout_s: int) -> DistContext:
    """Join the process group when launched by torchrun (nccl on GPUs, gloo on CPU); else a single process.

    Args:
        timeout_s: how long a collective waits for the other ranks before it fails.
    """
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return DistContext(0, 1, torch.device("cuda" if cuda else "cpu"), None)
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    probe = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), world, device, mesh, owns_group, probe)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (decoder `layers`, T5 encoder/decoder `block`): FSDP units and checkpointing units."""
    return [
        block
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "block")
        for block in module
    ]


def compile_blocks(blocks: list[nn.Module], device: torch.device) -> None:
    """`torch.compile` each block's forward (torchtune's per-block compile), with dynamic shapes: packed rows and
    padded micro-batches change length from step to step, and one compilation serves every length.

    Call before `enable_activation_checkpointing` and `shard`: the checkpoint then reruns the compiled forward (the
    same kernels and dropout masks), and FSDP2's hooks stay outside the compiled code. The blocks share their code,
    so they share compiled graphs (block 0 gets its own: its input needs no gradient) once their layer index, an
    integer attribute dynamo would otherwise specialise on, is left unspecialised. On the CPU, LoRA dropout's random
    numbers come from torch's generator (`fallback_random`: inductor's own are ~4x slower there), the comparison and
    the multiply fused around them.

    Args:
        blocks: from `transformer_blocks`.
        device: where the blocks will run.
    """
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    options = {"fallback_random": True} if device.type == "cpu" else None
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=True, options=options)


def enable_activation_checkpointing(blocks: list[nn.Module]) -> None:
    """Recompute each block's activations in the backward pass instead of storing them."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        forward = block.forward
        block.forward = lambda *args, _f=forward, **kw: checkpoint(_f, *args, use_reentrant=False, **kw)


def shard(model: nn.Module, dist_ctx: DistContext, dtype: torch.dtype) -> nn.Module:
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
        fully_shard(block, mesh=dist_ctx.mesh, mp_policy=mp)
    fully_shard(model, mesh=dist_ctx.mesh, mp_policy=mp)
    return model


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
    try:  # a model or tokenizer that does not load or fit, LoRA targets the model lacks: told as a TrainingError
        model, tokenizer = load_pretrained(model_dir, dtype=parse_dtype(config.dtype), device="cpu")
        lora.inject(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                    targets=config.lora_targets)
    except ValueError as e:
        raise TrainingError(str(e)) from e
    if config.init_adapter:
        load_initial_adapter(model, config)
    n_trainable, n_total = lora.count_parameters(model)
    run = Run(config, dist_ctx, model_dir, model, tokenizer, n_trainable)
    run.log(f"{model.config.model_type} from {model_dir}: {n_trainable:,} trainable of {n_total:,} parameters "
            f"({100 * n_trainable / n_total:.2f}%)" + (f", LoRA from {config.init_adapter}" if config.init_adapter
                                                       else ""))
    if config.quantize:
        run.log(nf4.quantize_model(model).summary())
    return run


def load_initial_adapter(model: nn.Module, config: TrainConfig) -> None:
    """Copy the LoRA weights of `config.init_adapter` into the freshly injected layers, to train further from them.
    The adapter must have been trained with the same r, alpha and target modules; everything is checked first, so a
    refused adapter leaves the model as it was."""
    path = Path(config.init_adapter)
    saved_config = peft_format.read_adapter_config(path)
    if saved_config["lora_alpha"] != config.lora_alpha or saved_config["r"] != config.lora_r:
        raise TrainingError(
            f"init_adapter: {path / peft_format.ADAPTER_CONFIG} has r={saved_config['r']}, lora_alpha="
            f"{saved_config['lora_alpha']}; this run has r={config.lora_r}, lora_alpha={config.lora_alpha} "
            "(train with the adapter's values)"
        )
    saved = peft_format.read_adapter_weights(path)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    wrong = [f"{n} {tuple(saved[n].shape)} vs {tuple(p.shape)}" for n, p in params.items()
             if n in saved and saved[n].shape != p.shape]
    if missing or extra or wrong:
        raise TrainingError(
            f"init_adapter: {path / peft_format.ADAPTER_WEIGHTS} does not fit this run's LoRA layers (other targets or "
            f"model): missing {missing[:4]}, unexpected {extra[:4]}, other shapes {wrong[:4]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


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


def restore_lora_weights(run: Run, checkpoint: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Copy a checkpoint's LoRA weights into the model (before sharding). Returns the checkpoint's trainer state and
    optimizer tensors, for `restore_trainer_state` once the optimizer exists."""
    trainer_state, optim_tensors, saved = read_checkpoint(checkpoint)
    params = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    wrong = sorted(set(saved) ^ set(params)) + [n for n in saved if n in params and saved[n].shape != params[n].shape]
    if wrong or len(trainer_state["rng"]) != run.dist_ctx.world:
        raise TrainingError(
            f"{checkpoint} does not fit this run (it was written with other LoRA settings or "
            f"{len(trainer_state['rng'])} ranks, this run has {run.dist_ctx.world}): differing LoRA tensors {wrong[:6]}"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    run.log(f"resuming from {checkpoint} (step {trainer_state['step']})")
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
        shard(model, run.dist_ctx, parse_dtype(config.dtype))
    else:
        model.to(run.dist_ctx.device)
    # The sharded parameters, by name, taken now: FSDP2 swaps in unsharded ones between forward and backward.
    run.trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    run.optimizer = torch.optim.AdamW(list(run.trainable.values()), lr=config.lr, weight_decay=config.weight_decay)
    warmup, total = math.ceil(config.warmup_ratio * run.total_steps), run.total_steps
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: cosine_with_warmup(s, warmup, total))


def restore_trainer_state(run: Run, trainer_state: dict, optim_tensors: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's optimizer, scheduler, progress and this rank's RNG states back (see `save_checkpoint`)."""
    load_optimizer_state(run.trainable, run.optimizer, optim_tensors, trainer_state["param_groups"])
    run.scheduler.load_state_dict(trainer_state["scheduler"])
    run.step, run.best_step = trainer_state["step"], trainer_state["best_step"]
    run.best_val = math.inf if trainer_state["best_val"] is None else trainer_state["best_val"]
    run.tokens_seen = trainer_state["tokens_seen"]
    last_loss = trainer_state.get("last_loss")  # absent from checkpoints of older versions
    run.last_loss = math.nan if last_loss is None else last_loss
    set_rng_state(trainer_state["rng"][run.dist_ctx.rank])


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
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.tokens_seen += int(run.dist_ctx.all_reduce_sum(sum(len(ex["input_ids"]) for b in batches for ex in b))[0])
    elapsed, speed = run.speed()
    return {"type": "step", "step": run.step, "epoch": epoch + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "loss_tokens": int(loss_tokens), "tokens_per_s": speed, "elapsed_s": elapsed,
            **({"skipped": skipped} if skipped else {})}


@torch.no_grad()
def validation_loss(run: Run) -> float:
    """The loss on the validation examples, averaged like the training loss, over all ranks. Collective."""
    dist_ctx, model = run.dist_ctx, run.model
    model.eval()
    mine = list(range(dist_ctx.rank, len(run.val_examples), dist_ctx.world))
    batches = micro_batches(run.val_examples, mine, run.config.micro_batch, run.config.pack_tokens, run.seq2seq)
    total_loss = total_weight = 0.0
    for i in range(forward_passes(dist_ctx, len(batches))):  # the same number on every rank (FSDP needs it)
        if i < len(batches):
            total_loss += loss_sum(model, device_batch(run, batches[i])).item()
            total_weight += sum(ex["loss_weight"] for ex in batches[i])
        else:
            loss_sum(model, device_batch(run, run.val_examples[:1]))
    if dist_ctx.mesh is not None:
        model.reshard()  # no backward follows to free the root's gathered parameters
    model.train()
    total_loss, total_weight = dist_ctx.all_reduce_sum(total_loss, total_weight)
    return total_loss / max(total_weight, 1.0)


def validate(run: Run, epoch: int) -> None:
    """Log the validation loss; a new best keeps its adapter in `out/best_adapter`. Collective."""
    val = validation_loss(run)
    improved = val < run.best_val
    weights = lora_weights(run.trainable) if improved else None
    if improved:
        run.best_val, run.best_step = val, run.step
        if run.dist_ctx.is_main:
            write_adapter(run.model, run.model_dir, run.out / "best_adapter", weights)
    run.dist_ctx.barrier()
    write_log(run, {"type": "eval", "step": run.step, "epoch": epoch, "val_loss": val, "best_val_loss": run.best_val})
    run.log(f"step {run.step}: validation loss {val:.4f}" + (" (best so far, adapter kept)" if improved else ""))


def write_log(run: Run, record: dict) -> None:
    """Append one record to `out/log.jsonl` (main rank only)."""
    if run.dist_ctx.is_main:
        with open(run.out / "log.jsonl", "a") as f:
            f.write(strict_json(record) + "\n")


# --- checkpointing ------------------------------------------------------------------------------------------------


def lora_weights(trainable: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters as full CPU tensors, by name. Collective under FSDP: call on every rank."""
    return {name: full_tensor(p) for name, p in trainable.items()}


def gather_rng_states(dist_ctx: DistContext) -> list[dict[str, list]]:
    """Every rank's RNG states (`rng_state`), in rank order. Collective."""
    if dist_ctx.mesh is None:
        return [rng_state()]
    states = [None] * dist_ctx.world
    dist.all_gather_object(states, rng_state())
    return states


def save_checkpoint(run: Run) -> Path:
    """Checkpoint the run at its current step (`ecellm.checkpoints.write_checkpoint`); collective (every rank calls
    it, the main rank writes). Returns the checkpoint directory.

    It holds the adapter, AdamW's tensors and the trainer state: step, scheduler, optimizer hyper-parameters, every
    rank's RNG states, best validation loss and step, tokens seen, the latest training loss. Older checkpoints beyond
    `keep_checkpoints` are deleted. Weights that are not finite are never written: the run ends with a
    `TrainingError` naming the last good checkpoint (which pruning therefore never removes)."""
    weights = lora_weights(run.trainable)
    bad = [name for name, t in weights.items() if not torch.isfinite(t).all()]
    if bad:  # every rank holds the full weights: all raise together
        last, _ = latest_checkpoint(run.out)
        raise TrainingError(f"step {run.step}: the LoRA weights are no longer finite ({', '.join(bad[:3])}); no "
                            f"checkpoint written. Last good checkpoint: {last or 'none yet'}")
    optim_tensors, optim_groups = optimizer_state(run.trainable, run.optimizer)
    rngs = gather_rng_states(run.dist_ctx)
    if run.dist_ctx.is_main:
        trainer = {"step": run.step, "scheduler": run.scheduler.state_dict(), "param_groups": optim_groups,
                   "rng": rngs, "best_val": run.best_val, "best_step": run.best_step, "tokens_seen": run.tokens_seen,
                   "last_loss": run.last_loss}
        write_checkpoint(run.out, run.model, run.model_dir, weights, optim_tensors, trainer,
                         run.config.keep_checkpoints)
    run.dist_ctx.barrier()
    return checkpoint_dir(run.out, run.step)


# --- the run ------------------------------------------------------------------------------------------------------


class _Stop:
    """Set by SIGTERM or SIGINT (Ctrl-C); checked between steps. A second Ctrl-C stops at once, without saving."""

    received: str | None = None  # the signal's name

    @classmethod
    def handler(cls, signum, frame) -> None:
        if cls.received == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        cls.received = signal.Signals(signum).name


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
OUT_OF_TIME = "time limit"  # `fit`'s reason when `config.minutes` ran out


def stop_requested(run: Run) -> str | None:
    """Why the run stops after this step: the name of the stop signal this rank received ("a signal to another rank"
    for another's), `OUT_OF_TIME` when a rank's clock passed `config.minutes`, or None. Collective: every rank stops
    at the same step."""
    out_of_time = run.config.minutes > 0 and time.perf_counter() - run.started >= 60 * run.config.minutes
    signalled, timed_out = run.dist_ctx.all_reduce_sum(float(_Stop.received is not None), float(out_of_time))
    if signalled:
        return _Stop.received or "a signal to another rank"
    return OUT_OF_TIME if timed_out else None


def note_step_time(run: Run, seconds: float) -> None:
    """Keep the first step's wall time and, with `--compile`, the compilation's (the first step's time minus the
    second's), shown once on the progress line."""
    if run.first_step_s is None:
        run.first_step_s = seconds
    elif run.config.compile and run.compile_s is None:
        run.compile_s = max(run.first_step_s - seconds, 0.0)
        run.log(f"--compile: the first step took {run.first_step_s:.1f}s, {run.compile_s:.1f}s of it compiling")


def fit(run: Run) -> str | None:
    """The training loop: optimizer steps until the last one, a stop signal or the time limit, validating and
    checkpointing on schedule (and when the time is up). SIGTERM and SIGINT are handled here and their previous
    handlers restored after. Returns what stopped the run early (a signal's name or `OUT_OF_TIME`), if anything."""
    config = run.config
    previous_handlers = {s: signal.signal(s, _Stop.handler) for s in STOP_SIGNALS}
    _Stop.received, stopped_by = None, None
    run.model.train()
    bar = tqdm(total=run.total_steps, initial=run.step, disable=not run.dist_ctx.is_main, desc="train", unit="step",
               dynamic_ncols=True)
    run.started, run.tokens_at_start = time.perf_counter(), run.tokens_seen
    try:
        while run.step < run.total_steps and not stopped_by:
            step_started = time.perf_counter()
            record = train_step(run)
            note_step_time(run, time.perf_counter() - step_started)
            write_log(run, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            epoch_end = run.step % run.steps_per_epoch == 0 or run.step == run.total_steps
            stopped_by = stop_requested(run)
            if (config.eval_every and run.step % config.eval_every == 0) or (not config.eval_every and epoch_end) \
                    or stopped_by == OUT_OF_TIME:
                validate(run, record["epoch"])
            if stopped_by or epoch_end or (config.checkpoint_every and run.step % config.checkpoint_every == 0):
                save_checkpoint(run)
    finally:
        bar.close()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    if stopped_by == OUT_OF_TIME:
        run.log(f"time limit of {config.minutes:g} minutes reached after step {run.step} of {run.total_steps}: "
                "checkpoint saved (--resume with a larger --minutes continues)")
    elif stopped_by:
        run.log(f"{stopped_by}: checkpoint saved at step {run.step}; resume with --resume")
    return stopped_by


def finish(run: Run, stopped_by: str | None) -> dict:
    """Write the final adapter (unless a signal stopped the run) and `out/summary.json`; returns the summary."""
    weights = lora_weights(run.trainable)
    if run.dist_ctx.is_main and stopped_by in (None, OUT_OF_TIME):
        write_adapter(run.model, run.model_dir, run.out / "adapter", weights)
    elapsed, speed = run.speed()
    summary = {
        "steps": run.step,
        "total_steps": run.total_steps,
        "epochs": run.step / run.steps_per_epoch,
        "final_train_loss": run.last_loss,
        "best_val_loss": run.best_val,
        "best_step": run.best_step,
        "world_size": run.dist_ctx.world,
        "elapsed_s": elapsed,
        "tokens_per_s": speed,
        "trainable_parameters": run.n_trainable,
        "first_step_s": run.first_step_s,
        "compile_s": run.compile_s,
        "stopped_by": stopped_by,
        "adapter": str(run.out / "adapter"),
        "best_adapter": str(run.out / "best_adapter"),
    }
    if run.dist_ctx.is_main:
        write_json(run.out / "summary.json", summary, strict=True)
        run.log(
            f"done: {run.step}/{run.total_steps} steps in {elapsed:.0f}s ({speed:.0f} tokens/s), final train loss "
            f"{run.last_loss:.4f}, best validation loss {run.best_val:.4f} at step {run.best_step}"
        )
    run.dist_ctx.barrier()
    return summary


def _communication_failed(error: RuntimeError) -> bool:
    """Whether a collective failed: timed out, or a peer's connection closed (gloo names itself in its errors)."""
    return isinstance(error, dist.DistError) or "gloo" in str(error)


def train(config: TrainConfig) -> dict:
    """Fine-tune with LoRA as `config` says; returns the run's summary (also written to `out/summary.json`).

    Joins the process group when launched by torchrun and leaves it at the end if it created it; a collective that
    fails (a rank frozen for `dist_timeout_s`, or lost with its node) ends the run with an error naming the ranks that
    stopped answering. Global state it changes: torch's random generator is seeded with `config.seed` (and, on a
    resume, python's, numpy's and torch's generators get the checkpoint's states); SIGTERM's and SIGINT's handlers
    are replaced during the loop and restored after.

    Args:
        config: the run's settings (see `TrainConfig`).
    Returns:
        dict with steps, epochs, losses, best validation loss and its step, timing and output paths.
    """
    dist_ctx = setup_distributed(config.dist_timeout_s)
    try:
        return _train(config, dist_ctx)
    except RuntimeError as e:
        if dist_ctx.mesh is None or not _communication_failed(e):
            raise
        silent = dist_ctx.silent_ranks()
        if not silent:
            raise
        raise TrainingError(
            f"rank {dist_ctx.rank}: rank(s) {', '.join(map(str, silent))} stopped answering (no reply within "
            f"dist_timeout_s={config.dist_timeout_s}s: frozen, or lost with their node); the run ends. "
            f"Cause: {str(e).splitlines()[0]}"
        ) from e
    finally:
        if dist_ctx.owns_group:
            dist.destroy_process_group()


def _train(config: TrainConfig, dist_ctx: DistContext) -> dict:
    """The run itself, stage by stage, on the ranks of `dist_ctx`: see `train`."""
    check_config(config, dist_ctx.world)
    lock = FolderLock(config.out, "training run")  # taken by the main rank in prepare_out, for the run's life
    try:
        resume_from = dist_ctx.from_main(lambda: prepare_out(Path(config.out), dataclasses.asdict(config), lock, log))
        run = setup_model(config, dist_ctx)
        setup_data(run)
        resume_step = int(resume_from.split("_")[1]) if resume_from else 0 if config.resume else None
        dist_ctx.from_main(lambda: check_data(run.out, run.data_fingerprint, resume_step, config.allow_data_change,
                                              log))
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
