"""This process's place in a run: its rank, the number of ranks, its device and the process group, set up when
torchrun launched it and torn down at the end; and the placing of a model on them (its blocks compiled,
checkpointed, sharded with FSDP2).

    with distributed(timeout_s) as dist_ctx:     # a single process when not launched by torchrun
        ... dist_ctx.rank, dist_ctx.world, dist_ctx.device, dist_ctx.all_reduce_sum(x) ...

A collective that fails because ranks stopped answering (frozen for `timeout_s`, or lost with their node) ends the
block with a `DistributedError` naming those ranks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import EcellmError

T = TypeVar("T")


class DistributedError(EcellmError, RuntimeError):
    """Ranks that stopped answering, or a failure on rank 0 told to the other ranks."""


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
        """Wait for every rank."""
        if self.mesh is not None:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (any picklable object), in rank order. Collective."""
        if self.mesh is None:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def from_main(self, fn: Callable[[], T]) -> T:
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
                raise DistributedError(f"rank 0 failed: {message}")
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


def _communication_failed(error: RuntimeError) -> bool:
    """Whether a collective failed: timed out, or a peer's connection closed (gloo names itself in its errors)."""
    return isinstance(error, dist.DistError) or "gloo" in str(error)


@contextmanager
def distributed(timeout_s: int) -> Iterator[DistContext]:
    """`setup_distributed(timeout_s)` for the block, the process group destroyed after it if created here; a failed
    collective whose cause is ranks that stopped answering becomes a `DistributedError` naming them."""
    dist_ctx = setup_distributed(timeout_s)
    try:
        yield dist_ctx
    except RuntimeError as e:
        if dist_ctx.mesh is None or not _communication_failed(e):
            raise
        silent = dist_ctx.silent_ranks()
        if not silent:
            raise
        raise DistributedError(
            f"rank {dist_ctx.rank}: rank(s) {', '.join(map(str, silent))} stopped answering (no reply within "
            f"dist_timeout_s={timeout_s}s: frozen, or lost with their node); the run ends. "
            f"Cause: {str(e).splitlines()[0]}"
        ) from e
    finally:
        if dist_ctx.owns_group:
            dist.destroy_process_group()


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


def reshard_all(model: nn.Module) -> None:
    """Free the gathered weights of every FSDP2 unit of `model` after forward passes with no backward (a validation):
    otherwise a unit sharded with `reshard_after_forward=False` keeps them, and its next forward would use them
    after the optimizer changed the sharded LoRA weights."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def shard(model: nn.Module, blocks: list[nn.Module], dist_ctx: DistContext, dtype: torch.dtype,
          reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: shard each of `blocks`, then the root, over the device mesh.

    Compute runs in `dtype` (FSDP2 casts every parameter of a unit, LoRA's included, to it); gradients are reduced
    and kept in fp32 for the fp32 LoRA weights and optimizer state.

    Args:
        model: the model to shard in place.
        blocks: its units besides the root (the transformer blocks; none for one unit at the root).
        dist_ctx: the run's ranks.
        dtype: the compute dtype.
        reshard_after_forward: free a block's gathered weights after its forward (and gather them again for its
            backward); False keeps them, one all-gather a step instead of two for more memory.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=dist_ctx.mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dist_ctx.mesh, mp_policy=mp)
    return model
