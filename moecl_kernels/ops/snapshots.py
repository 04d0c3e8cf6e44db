"""Frozen tasks' snapshots at the op level (``mk.freeze_task``; semantics in ``contract.args``):
their validation (errors name the argument), whether a call's tokens reach a frozen task (read
on the host, no device sync) and the backend that serves them.

A call in which no token belongs to a frozen task is an ordinary call: its snapshot fields are
dropped, so every backend runs its usual kernels and the numbers are those of a model without
snapshots. A call that has such tokens runs on a backend that declares ``serves_snapshots``
(eager, reference); any other falls back to eager for it, saying so once.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends as _bk
from ..contract import SINGLE_NONE
from ..routing import Routing


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def host_slots(task_slot: Tensor, task_slot_cpu: Optional[Tensor], num_tasks: int) -> Tensor:
    """The task -> slot map on the host (int64 [E]); checked against ``task_slot``'s shape."""
    _check(isinstance(task_slot, Tensor) and task_slot.dim() == 1 and task_slot.shape[0] == num_tasks
           and not task_slot.is_floating_point(),
           f"task_slot must be an integer [E={num_tasks}] tensor (slot of each task, -1 = live), "
           f"got {tuple(getattr(task_slot, 'shape', ())) or type(task_slot).__name__}")
    if task_slot_cpu is None:
        task_slot_cpu = task_slot.to("cpu", torch.int64)  # one sync: pass task_slot_cpu to avoid it
    _check(isinstance(task_slot_cpu, Tensor) and tuple(task_slot_cpu.shape) == (num_tasks,)
           and task_slot_cpu.device.type == "cpu", f"task_slot_cpu must be an int64 [E={num_tasks}] host tensor")
    return task_slot_cpu


def check_snapshots(named: list, task_slot_cpu: Tensor, x: Tensor) -> int:
    """``named``: (name, tensor, trailing shape or None for an optional one) of the snapshot stacks;
    every one [F, *shape] with x's dtype and device, and every slot in ``task_slot_cpu`` < F.
    Returns F."""
    counts = set()
    for name, t, shape in named:
        if t is None:
            _check(shape is None, f"{name} is required with task_slot (a [F, ...] stack of snapshots)")
            continue
        _check(isinstance(t, Tensor) and t.dim() >= 1 and (shape is None or tuple(t.shape[1:]) == tuple(shape)),
               f"{name} must be [F, {', '.join(map(str, shape or ()))}], got {tuple(getattr(t, 'shape', ()))}")
        _check(t.dtype == x.dtype, f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
        _check(t.device == x.device, f"{name} is on {t.device} but x is on {x.device}")
        counts.add(t.shape[0])
    _check(len(counts) <= 1, f"the snapshot stacks disagree on the slot count F: {sorted(counts)}")
    F = counts.pop() if counts else 0
    slots = task_slot_cpu.tolist()
    bad = [(e, f) for e, f in enumerate(slots) if not -1 <= f < F]
    _check(not bad, f"task_slot has slots out of range [-1, F={F}): (task, slot) {bad[:5]}")
    live = [f for f in slots if f >= 0]
    _check(len(live) == len(set(live)), f"task_slot gives one slot to several tasks: {slots}")
    return F


def frozen_tokens(task_slot_cpu: Tensor, routing: Routing) -> bool:
    """Whether any token of the call belongs to a frozen task (from the host offsets when the
    routing has them; True when unknown)."""
    if torch.compiler.is_compiling():
        return True
    slots = task_slot_cpu.tolist()
    if all(f < 0 for f in slots) or routing.single_task == SINGLE_NONE:
        return False
    if routing.single_task >= 0:
        return slots[routing.single_task] >= 0
    if routing.offsets_cpu is None:
        return True
    off = routing.offsets_cpu.tolist()
    return any(f >= 0 and off[e + 1] > off[e] for e, f in enumerate(slots))


def snapshot_backend(name: str) -> str:
    """``name`` if it serves frozen tasks' tokens, else eager (said once)."""
    if getattr(_bk.backend(name), "serves_snapshots", False):
        return name
    _bk.warn_once(f"snap-{name}", f"moecl_kernels: backend {name!r} has no frozen-task (mk.freeze_task) kernels; "
                                  "calls with frozen tasks' tokens run on 'eager'")
    return "eager"
