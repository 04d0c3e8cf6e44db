"""How a run uses several processes (``torchrun`` / ``accelerate launch``).

* ``ddp``: every process holds the whole model; :class:`~torch.nn.parallel.DistributedDataParallel`
  averages the trainable parameters' gradients.
* ``fsdp``: FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) shards the frozen backbone
  (each transformer block, then the rest) over the processes, so each holds 1/world of
  the base weights and gathers a block's weights only while it runs. The adapters (LoRA
  experts, gates: ``ignored_params``), the heads and the discriminators stay whole on every
  process, and their gradients are averaged here after each backward, exactly as DDP
  would. The sharded weights are frozen, so FSDP never reduces a gradient; checkpoints
  hold the same whole adapter tensors as a 1-process run and load in one.

``train.parallel=auto`` is ``fsdp`` under ``accelerate launch --use_fsdp`` (which sets
``ACCELERATE_USE_FSDP``), else ``ddp``; a 1-process run uses neither.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from .distributed import DistInfo


def parallel_kind(requested: str, info: DistInfo) -> str:
    """``single``, ``ddp`` or ``fsdp`` for ``train.parallel=requested`` in this process group."""
    if not info.enabled:
        return "single"
    if requested == "auto":
        return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes") else "ddp"
    return requested


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer: the children of the ``nn.ModuleList`` of
    same-class modules holding the most parameters (Llama ``model.layers``, BERT
    ``encoder.layer``, GPT-2 ``h``)."""
    best, best_n = [], 0
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1:
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = list(m), n
    return best


def shard_backbone(backbone: nn.Module, replicated: Iterable[nn.Parameter], info: DistInfo) -> int:
    """FSDP2-shard ``backbone`` in place over the process group, keeping ``replicated``
    (the adapter parameters) whole and out of FSDP. Returns the number of blocks sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    keep = set(replicated)
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    blocks = transformer_blocks(backbone)
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=keep)
    fully_shard(backbone, mesh=mesh, ignored_params=keep)
    return len(blocks)


def average_gradients(params: list[nn.Parameter], info: DistInfo) -> None:
    """All-reduce (mean over processes) the gradients of replicated ``params`` in one buffer,
    as DDP does; a missing gradient counts as zero on that process."""
    if not info.enabled or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def reshard(backbone: nn.Module) -> None:
    """Drop any gathered (unsharded) weights so that the next forward gathers fresh ones."""
    from torch.distributed.fsdp import FSDPModule

    for m in backbone.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
