"""Per-task snapshots of the gate and the shared expert in the MoE-CL modules (``mk.freeze_task``).

Freezing task k in a module copies its gate and its shared expert (every projection's A and B)
into snapshot slot f: from then on the op gives task k's tokens that gate and shared expert
(``contract.args``: ``task_slot``), whatever later training does to the live ones; task k's own
expert is left as it is. Tokens of other tasks and of no task use the live gate and shared expert.

Storage (non-trainable buffers, kept by ``state_dict``, ``mk.save`` / ``mk.load``):

    <module>.moe_snap_tasks   int64 [F]          the task of each slot
    <module>.moe_snap_gate    [F, 2, d_in]       the gate of each slot (gated modules)
    <projection>.moe_snap_A   [F, r, d_in_p]     the shared expert of each slot, per projection
    <projection>.moe_snap_B   [F, d_out_p, r]

(the linear level's module is its own projection). Memory per frozen task: one shared expert
and one gate, ``r (d_in + d_out) + 2 d_in`` values per linear layer and ``r (d_in + d_ff) * 2
+ r (d_ff + d_out) + 2 d_in`` per gated MLP (Llama-2-7B, r = 8, FFN level: 0.37 M values per
layer, 11.9 M for the 32 layers: 24 MB in bf16).

The task -> slot map is kept on the host (``frozen_tasks``), so a call needs no device sync
to know which slots its tokens use; its device copy is cached until the map or the task count
changes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

TASKS, GATE, SNAP_A, SNAP_B = "moe_snap_tasks", "moe_snap_gate", "moe_snap_A", "moe_snap_B"
_HOST = "_moecl_frozen"    # the host copy of moe_snap_tasks (a list; slot order)
_CACHE = "_moecl_slot_cache"


def frozen_tasks(module: nn.Module) -> list[int]:
    """The frozen tasks of a module, in slot order."""
    return list(module.__dict__.get(_HOST, ()))


def _put(module: nn.Module, name: str, value: Optional[Tensor]) -> None:
    if value is None:
        module._buffers.pop(name, None)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        module.register_buffer(name, value)


def _stacks(module: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    """(owner, buffer name, live tensor) of everything a slot holds."""
    out = [(p, SNAP_A, p.lora_shared_A) for p in module.lora_projections()]
    out += [(p, SNAP_B, p.lora_shared_B) for p in module.lora_projections()]
    if module.moe_gate is not None:
        out.append((module, GATE, module.moe_gate))
    return out


def _set_tasks(module: nn.Module, tasks: list[int], device) -> None:
    module.__dict__[_HOST] = list(tasks)
    module.__dict__[_CACHE] = None
    _put(module, TASKS, torch.tensor(tasks, dtype=torch.int64, device=device) if tasks else None)


@torch.no_grad()
def freeze(module: nn.Module, k: int) -> None:
    """Snapshot the module's gate and shared expert for task ``k`` (again: the snapshot is retaken)."""
    k = module.check_task(k, "freeze_task")
    tasks = frozen_tasks(module)
    f = tasks.index(k) if k in tasks else len(tasks)
    for owner, name, live in _stacks(module):
        old = owner._buffers.get(name)
        snap = live.detach().clone().unsqueeze(0)
        if old is None:
            new = snap
        elif f < old.shape[0]:
            new = old.clone()
            new[f] = snap[0]
        else:
            new = torch.cat([old, snap.to(old.dtype)])
        _put(owner, name, new)
    if f == len(tasks):
        tasks.append(k)
    _set_tasks(module, tasks, module.lora_projections()[0].lora_shared_A.device)


def unfreeze(module: nn.Module, k: int) -> None:
    """Drop task ``k``'s snapshot: its tokens use the live gate and shared expert again."""
    k = module.check_task(k, "unfreeze_task")
    tasks = frozen_tasks(module)
    if k not in tasks:
        return
    f = tasks.index(k)
    keep = [i for i in range(len(tasks)) if i != f]
    for owner, name, _ in _stacks(module):
        old = owner._buffers[name]
        _put(owner, name, old[keep].clone() if keep else None)
    _set_tasks(module, [tasks[i] for i in keep], module.lora_projections()[0].lora_shared_A.device)


def owners(module: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    """(module holding it, buffer name, the live tensor it snapshots) of every snapshot stack."""
    return _stacks(module)


@torch.no_grad()
def restore(module: nn.Module, tasks: list[int], value=None) -> None:
    """Set the module's frozen tasks to ``tasks`` (slot order) with the stacks ``value(owner, name)``
    ([F, ...] tensors; None: zeros, to be filled by a load)."""
    for owner, name, live in _stacks(module):
        t = value(owner, name) if value is not None else None
        t = t.to(device=live.device, dtype=live.dtype).clone() if t is not None else \
            live.new_zeros((len(tasks), *live.shape))
        _put(owner, name, t if tasks else None)
    _set_tasks(module, tasks, module.lora_projections()[0].lora_shared_A.device)


def prepare_load(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Before ``load_state_dict`` fills this module: take the slot count (and task map) of the
    incoming ``<prefix>moe_snap_tasks`` -- buffers of the right shapes, so the load copies into
    them (a projection outside the module, a BERT layer's down projection, loads later)."""
    tasks = state_dict.get(prefix + TASKS)
    if tasks is not None:
        restore(module, [int(v) for v in tasks.tolist()])


def warn_frozen(modules, tasks) -> None:
    """``set_trainable`` of a frozen task: its tokens use the snapshots, so the live gate and shared
    expert learn nothing from them (its own expert still trains)."""
    frozen = sorted({k for m in modules for k in frozen_tasks(m)} & set(tasks))
    if frozen:
        import warnings

        warnings.warn(f"tasks {frozen} are frozen (mk.freeze_task): their tokens use their snapshots of the gate and "
                      "shared expert, which get no gradient; mk.unfreeze_task first to train those", RuntimeWarning,
                      stacklevel=3)


def _slots(module: nn.Module, device) -> tuple[Tensor, Tensor]:
    """(task_slot int32 [E] on ``device``, task_slot_cpu int64 [E]), cached."""
    tasks, E = frozen_tasks(module), module.num_tasks
    key = (E, tuple(tasks), device)
    cached = module.__dict__.get(_CACHE)
    if cached is None or cached[0] != key:
        slot = [-1] * E
        for f, k in enumerate(tasks):
            slot[k] = f
        cpu = torch.tensor(slot, dtype=torch.int64)
        cached = (key, cpu.to(device=device, dtype=torch.int32), cpu)
        module.__dict__[_CACHE] = cached
    return cached[1], cached[2]


def linear_args(layer: nn.Module, dtype: torch.dtype) -> dict:
    """The frozen-task keyword arguments of ``moe_lora_linear`` for a linear-level layer ({} when none)."""
    if not frozen_tasks(layer):
        return {}
    task_slot, task_slot_cpu = _slots(layer, layer.lora_shared_A.device)
    gate = layer._buffers.get(GATE)
    return dict(snap_shared_A=layer._buffers[SNAP_A].to(dtype), snap_shared_B=layer._buffers[SNAP_B].to(dtype),
                snap_gate=gate.to(dtype) if gate is not None else None, task_slot=task_slot,
                task_slot_cpu=task_slot_cpu)


def ffn_args(mlp: nn.Module, dtype: torch.dtype) -> dict:
    """The frozen-task keyword arguments of ``moe_lora_mlp`` for an FFN-level module ({} when none)."""
    if not frozen_tasks(mlp):
        return {}
    out = {}
    for role in ("gate", "up", "down"):
        proj = mlp.projection(role)
        if proj is not None:
            out[f"{role}_proj_snap_shared_A"] = proj._buffers[SNAP_A].to(dtype)
            out[f"{role}_proj_snap_shared_B"] = proj._buffers[SNAP_B].to(dtype)
    gate = mlp._buffers.get(GATE)
    out["snap_gate"] = gate.to(dtype) if gate is not None else None
    out["task_slot"], out["task_slot_cpu"] = _slots(mlp, mlp.projection("up").lora_shared_A.device)
    return out


def snapshot_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every snapshot buffer of a module (its projections' included), by name relative to the module
    (a BERT layer's down projection: ``../output.dense.<name>``, as ``adapter_parameters`` names it)."""
    if not frozen_tasks(module):
        return {}
    names = {id(p): n for n, p in module.named_modules()}
    out = {TASKS: module._buffers[TASKS]}
    for owner, name, _ in _stacks(module):
        where = names.get(id(owner))
        if where is None:  # a BERT layer's down projection lives at the layer's output.dense
            where = "../output.dense"
        out[f"{where}.{name}" if where else name] = owner._buffers[name]
    return out
