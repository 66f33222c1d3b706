"""Data-parallel helpers: init from torchrun's environment, rank/world queries, samplers, reductions.

Single-process runs never call `init_process_group`; every helper then degrades to the trivial answer,
so the training and evaluation code is the same with or without torchrun.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as td

from catnet.errors import CatnetError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1); otherwise return a 1-process info.

    Backend: NCCL when this rank gets a GPU, gloo on CPU (NCCL cannot reduce CPU tensors).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CatnetError(f"device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CatnetError("device cuda requested but no GPU is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not td.is_initialized():
        td.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def is_initialized() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_initialized() else 0


def world_size() -> int:
    return td.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        td.barrier()


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[DistInfo]:
    """`with session(device) as info:` join the process group for the block, leave it after (see cleanup)."""
    info = init_distributed(device)
    ok = False
    try:
        yield info
        ok = True
    finally:
        cleanup(ok)


def cleanup(ok: bool = True) -> None:
    """Tear down the process group. After success (`ok`), ranks first wait for each other: a rank that
    destroys its gloo group while a peer is still writing its last files can abort at exit."""
    if is_initialized():
        if ok:
            td.barrier()
        td.destroy_process_group()


def _backend_device() -> torch.device:
    if td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (a new tensor on t's device); `t` itself when not distributed."""
    if not is_initialized():
        return t
    out = t.detach().to(_backend_device()).clone()
    td.all_reduce(out, op=td.ReduceOp.SUM)
    return out.to(t.device)


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] when not distributed."""
    if not is_initialized():
        return [obj]
    out: list = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm running statistics) into every rank's `model`, in place."""
    if not is_initialized():
        return
    for b in model.buffers():
        td.broadcast(b.data, src=src)


def broadcast_object(obj, src: int = 0):
    if not is_initialized():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


class ShardSampler(torch.utils.data.Sampler[int]):
    """Evaluation sampler: rank r gets items r, r + W, r + 2W, ... of `indices`.

    Unlike torch's DistributedSampler it neither pads (duplicating videos) nor drops the tail, so the
    ranks' shards are disjoint and together exactly `indices`; ranks may get one item more or less.
    """

    def __init__(self, indices: list[int], rank: int | None = None, world: int | None = None):
        self.indices = list(indices)
        self.rank = globals()["rank"]() if rank is None else rank
        self.world = world_size() if world is None else world

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices[self.rank:: self.world])

    def __len__(self) -> int:
        return len(range(self.rank, len(self.indices), self.world))


class TrainSampler(torch.utils.data.Sampler[int]):
    """Training sampler: a fresh permutation of `indices` per epoch from a persistent generator.

    The generator's state is part of a checkpoint, so a resumed run draws the same orders. With W ranks
    the permutation is padded by wrapping to a multiple of W: every rank then runs the same number of
    steps, which DDP's gradient all-reduce requires.
    """

    def __init__(self, indices: list[int], generator: torch.Generator, rank: int = 0, world: int = 1):
        self.indices = list(indices)
        self.generator = generator
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return -(-len(self.indices) // self.world)

    def epoch_order(self) -> list[int]:
        """Draw this epoch's order (advances the generator once; call once per epoch on every rank)."""
        perm = torch.randperm(len(self.indices), generator=self.generator).tolist()
        total = len(self) * self.world
        perm = (perm * (total // max(1, len(perm)) + 1))[:total]
        return [self.indices[i] for i in perm[self.rank:: self.world]]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order())
