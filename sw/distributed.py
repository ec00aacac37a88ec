"""Multi-process (data-parallel) training under ``torchrun``: the pieces :func:`train` uses.

``torchrun --standalone --nproc-per-node N -m bitdet.sw train ...`` (or multi-node, through
torchrun's rendezvous) starts N copies of ``bitdet train``; each finds its place from
torchrun's variables ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (:func:`from_env`). With
``WORLD_SIZE`` unset or 1 none of this is used and training is the single-process path.

* Process group: ``gloo`` on the CPU, ``nccl`` on CUDA (one GPU per process,
  ``cuda:LOCAL_RANK``), initialised from torchrun's ``env://`` variables
  (:func:`process_group`).
* Data: rank ``r`` generates images ``[r·N/W, (r+1)·N/W)`` of the run's ``N`` training
  images, image ``i`` being ``make_digitscenes("train", count=1, seed=scene_seed(seed, i))``
  (:func:`scene_shard`). The shards are disjoint and their union is the same set for any
  number of processes (for a given seed and image count); it is *not* the single-process
  set, whose one random stream cannot be split without generating all of it.
* Gradients: :class:`StepLoss` puts the whole loss of a step (the model and a method's
  extra terms) in one module that ``DistributedDataParallel`` wraps, so the distillation
  methods, which call the student's submodules directly, are synchronised too.
* Rank 0 alone checks the output folder (its verdict is broadcast: :func:`agree`), writes
  checkpoints and logs, and validates; the epoch's history entry is broadcast from it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .data import make_digitscenes

__all__ = ["World", "agree", "all_mean", "broadcast", "from_env", "process_group",
           "scene_seed", "scene_shard", "wrap"]


@dataclass(frozen=True)
class World:
    """This process's place in a multi-process run: ``rank`` of ``size``, ``local_rank``
    on its machine."""

    rank: int
    size: int
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this is rank 0, which writes checkpoints, logs and validates."""
        return self.rank == 0

    def device(self, dev: torch.device) -> torch.device:
        """``cuda`` means this process's GPU, ``cuda:LOCAL_RANK``."""
        if dev.type == "cuda" and dev.index is None:
            return torch.device("cuda", self.local_rank)
        return dev

    def backend(self, dev: torch.device) -> str:
        return "nccl" if dev.type == "cuda" else "gloo"


def from_env() -> World | None:
    """The running process group's world, or torchrun's (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``); ``None`` for a single process (``WORLD_SIZE`` unset or 1)."""
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if dist.is_available() and dist.is_initialized():
        size = dist.get_world_size()
        return World(dist.get_rank(), size, local) if size > 1 else None
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return None
    return World(int(os.environ.get("RANK", "0")), size, local)


@contextlib.contextmanager
def process_group(world: World, dev: torch.device) -> Iterator[None]:
    """Initialise the default process group from torchrun's variables for the block."""
    dev = world.device(dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(world.backend(dev), rank=world.rank, world_size=world.size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def agree(world: World, check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0 only and raise its exception on every rank (no rank is left
    waiting for one that gave up)."""
    error = None
    if world.main:
        try:
            check()
        except Exception as e:       # broadcast, then raised on every rank
            error = e
    error = broadcast(error)
    if error is not None:
        raise error


def broadcast(obj):
    """Rank 0's ``obj`` (a picklable object) on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_mean(values: dict[str, float], world: World) -> dict[str, float]:
    """The mean over the ranks of each value (every rank passes the same keys)."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: float(v) / world.size for k, v in zip(keys, t.tolist(), strict=True)}


def scene_seed(seed: int, index: int) -> int:
    """The scene seed of training image ``index`` of a multi-process run of seed ``seed``."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0 for multi-process training, not {seed}")
    return (seed + 1) * 2**32 + index


def shard_range(count: int, world: World) -> range:
    """The images of rank ``world.rank``: a contiguous slice, sizes differing by at most 1."""
    return range(count * world.rank // world.size, count * (world.rank + 1) // world.size)


def scene_shard(count: int, image_size: int, seed: int, world: World
                ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """This rank's training images: pixels ``n×1×H×W`` float32 and their targets."""
    images, targets = [], []
    for i in shard_range(count, world):
        one = make_digitscenes("train", count=1, image_size=image_size,
                               seed=scene_seed(seed, i))
        images.append(one.images[0])
        a = one.annotations[0]
        targets.append({"boxes": torch.from_numpy(a.boxes), "labels": torch.from_numpy(a.labels)})
    pixels = torch.from_numpy(np.stack(images)).to(torch.float32)[:, None]
    return pixels, targets


class StepLoss(nn.Module):
    """One training step's loss as a module, ``forward(*args) -> step(model, *args)``, so
    that ``DistributedDataParallel`` sees every use of the model's parameters."""

    def __init__(self, model: nn.Module, step: Callable):
        super().__init__()
        self.model = model
        self._step = step

    def forward(self, *args):
        return self._step(self.model, *args)


def wrap(model: nn.Module, step: Callable, dev: torch.device, *,
         find_unused: bool = False) -> nn.Module:
    """``DistributedDataParallel(StepLoss(model, step))``: calling it runs ``step(model,
    ...)`` and its backward averages the gradients over the ranks. ``find_unused``: some
    parameters may get no gradient in a step (DDP then looks for them in every step)."""
    return nn.parallel.DistributedDataParallel(
        StepLoss(model, step), device_ids=[dev.index] if dev.type == "cuda" else None,
        find_unused_parameters=find_unused)
