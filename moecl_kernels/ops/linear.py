"""The Python entry point of the fused linear op: :func:`moe_lora_linear` validates every
argument (errors name the argument), resolves the backend and calls the custom op."""

from __future__ import annotations

from dataclasses import fields
from typing import Optional

import torch
from torch import Tensor

from .. import backends as _bk
from ..contract import FwdArgs, OpOptions
from ..routing import Routing
from .custom_ops import moe_lora_fwd
from .snapshots import check_snapshots, frozen_tokens, host_slots, snapshot_backend

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def astuple_shallow(obj) -> tuple:
    """A dataclass's field values in order, without copying (``dataclasses.astuple`` deep-copies)."""
    return tuple(getattr(obj, f.name) for f in fields(obj))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _describe(t) -> str:
    return f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def _all_valid(x, weight, bias, shared_A, shared_B, task_A, task_B, gate_weight, routing, dropout_p) -> bool:
    """Every check of :func:`validate` as one cheap expression, no message built (the per-call
    host cost of decoding); False sends the call through the checks that name what is wrong."""
    try:
        if not (type(x) is Tensor and x.dim() == 2 and x.dtype in _FLOAT_DTYPES):
            return False
        (T, d_in), d_out, r, E = x.shape, weight.shape[0], shared_A.shape[0], task_A.shape[0]
        dt, dev = x.dtype, x.device
        for t in (weight, bias, shared_A, shared_B, task_A, task_B, gate_weight):
            if t is not None and (t.dtype != dt or t.device != dev):
                return False
        return (r >= 1 and weight.shape == (d_out, d_in) and shared_A.shape == (r, d_in)
                and shared_B.shape == (d_out, r) and task_A.shape == (E, r, d_in) and task_B.shape == (E, d_out, r)
                and (bias is None or bias.shape == (d_out,)) and (gate_weight is None or gate_weight.shape == (2, d_in))
                and routing.num_tokens == T and routing.num_tasks == E and routing.token_task.device == dev
                and 0.0 <= dropout_p < 1.0)
    except Exception:  # not tensors, say: the checks below say what
        return False


def validate(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], shared_A: Tensor, shared_B: Tensor, task_A: Tensor,
    task_B: Tensor, gate_weight: Optional[Tensor], routing: Routing, dropout_p: float,
) -> None:
    """Shape/dtype/device checks; every error names the offending argument."""
    if _all_valid(x, weight, bias, shared_A, shared_B, task_A, task_B, gate_weight, routing, dropout_p):
        return
    _check(isinstance(x, Tensor) and x.dim() == 2, f"x must be a 2-D [tokens, d_in] tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    _check(x.dtype in _FLOAT_DTYPES, f"x has dtype {x.dtype}; supported: fp16, bf16, fp32, fp64")
    T, d_in = x.shape
    _check(weight.dim() == 2 and weight.shape[1] == d_in,
           f"weight must be [d_out, d_in={d_in}], got {tuple(weight.shape)}")
    d_out = weight.shape[0]
    _check(shared_A.dim() == 2 and shared_A.shape[1] == d_in,
           f"shared_A must be [r, d_in={d_in}], got {tuple(shared_A.shape)}")
    r = shared_A.shape[0]
    _check(r >= 1, "shared_A has rank 0; r must be >= 1")
    _check(tuple(shared_B.shape) == (d_out, r), f"shared_B must be [d_out={d_out}, r={r}], got {tuple(shared_B.shape)}")
    _check(task_A.dim() == 3 and task_A.shape[1:] == (r, d_in),
           f"task_A must be [E, r={r}, d_in={d_in}], got {tuple(task_A.shape)}")
    E = task_A.shape[0]
    _check(tuple(task_B.shape) == (E, d_out, r), f"task_B must be [E={E}, d_out={d_out}, r={r}], got {tuple(task_B.shape)}")
    if bias is not None:
        _check(tuple(bias.shape) == (d_out,), f"bias must be [d_out={d_out}], got {tuple(bias.shape)}")
    if gate_weight is not None:
        _check(tuple(gate_weight.shape) == (2, d_in), f"gate_weight must be [2, d_in={d_in}], got {tuple(gate_weight.shape)}")
    named = [("weight", weight), ("bias", bias), ("shared_A", shared_A), ("shared_B", shared_B),
             ("task_A", task_A), ("task_B", task_B), ("gate_weight", gate_weight)]
    check_like_x(x, named)
    check_routing(routing, x, E, "task_A")
    _check(0.0 <= dropout_p < 1.0, f"dropout_p must be in [0, 1), got {dropout_p}")


def check_like_x(x: Tensor, named) -> None:
    """Every (name, tensor) of ``named`` (None skipped) has x's dtype and device."""
    for name, t in named:
        if t is None:
            continue
        _check(t.dtype == x.dtype, f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
        _check(t.device == x.device, f"{name} is on {t.device} but x is on {x.device}")


def check_routing(routing: Routing, x: Tensor, E: int, experts_name: str) -> None:
    """The routing was built for x's tokens, E experts (as ``experts_name`` has) and x's device."""
    T = x.shape[0]
    _check(routing.num_tokens == T,
           f"routing covers {routing.num_tokens} tokens but x has {T}: build it for this input (task_ids)")
    _check(routing.num_tasks == E,
           f"routing was built for num_tasks={routing.num_tasks} but {experts_name} has E={E} experts")
    _check(routing.token_task.device == x.device,
           f"routing tensors are on {routing.token_task.device} but x is on {x.device}")


def _needs_custom_op(x: Tensor, *params: Optional[Tensor]) -> bool:
    """The call must go through ``moecl::moe_lora_fwd``: autograd will differentiate it, a
    compiler or a dispatch mode (fake tensors, FlopCounterMode, ...) is watching, or x is a
    tensor subclass."""
    if type(x) is not Tensor or torch.compiler.is_compiling() or _dispatch_mode_active():
        return True
    return torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params))


def _dispatch_mode_active() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def moe_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    shared_A: Tensor,
    shared_B: Tensor,
    task_A: Tensor,
    task_B: Tensor,
    gate_weight: Optional[Tensor],
    routing: Routing,
    *,
    scale: float,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
    expert_trainable: Optional[list[bool]] = None,
    deterministic: bool = False,
    backend: Optional[str] = None,
    snap_shared_A: Optional[Tensor] = None,
    snap_shared_B: Optional[Tensor] = None,
    snap_gate: Optional[Tensor] = None,
    task_slot: Optional[Tensor] = None,
    task_slot_cpu: Optional[Tensor] = None,
) -> Tensor:
    """y = x W^T + b + gated shared LoRA + gated routed task LoRA (docs/spec.md, "The linear op"), for x [T, d_in].

    Frozen tasks (``mk.freeze_task``, ``contract.args``): ``task_slot`` [E] (slot of each task, -1 =
    live; ``task_slot_cpu`` its host copy saves a sync) and the slots' ``snap_shared_A`` [F, r, d_in],
    ``snap_shared_B`` [F, d_out, r] and ``snap_gate`` [F, 2, d_in] (with a gate)."""
    validate(x, weight, bias, shared_A, shared_B, task_A, task_B, gate_weight, routing, dropout_p)
    snaps = {}
    if task_slot is not None:
        task_slot_cpu = host_slots(task_slot, task_slot_cpu, task_A.shape[0])
        (r, d_in), d_out = shared_A.shape, weight.shape[0]
        check_snapshots([("snap_shared_A", snap_shared_A, (r, d_in)), ("snap_shared_B", snap_shared_B, (d_out, r)),
                         ("snap_gate", snap_gate, (2, d_in) if gate_weight is not None else None)], task_slot_cpu, x)
        _check(gate_weight is not None or snap_gate is None, "snap_gate is given but gate_weight is None")
        if frozen_tokens(task_slot_cpu, routing):  # otherwise an ordinary call
            snaps = dict(snap_shared_A=snap_shared_A, snap_shared_B=snap_shared_B, snap_gate=snap_gate,
                         task_slot=task_slot.to(device=x.device, dtype=torch.int32), task_slot_cpu=task_slot_cpu)
    if dropout_p > 0.0:
        _check(seed is not None, "seed is required when dropout_p > 0 (a 0-dim int64 tensor on x's device)")
        _check(isinstance(seed, Tensor) and seed.numel() == 1 and not seed.is_floating_point()
               and not seed.is_complex() and seed.dtype != torch.bool,
               f"seed must be a 0-dim integer tensor (int64, on x's device), got {_describe(seed)}")
        if seed.device != x.device:  # a host seed costs a copy per call; draw it on x's device instead
            seed = seed.to(x.device)
    name = _bk.choose_backend(backend, x, shared_A.shape[0], task_A.shape[0])
    if snaps:
        name = snapshot_backend(name)
    a = FwdArgs(x=x, weight=weight, bias=bias, shared_A=shared_A, shared_B=shared_B, task_A=task_A, task_B=task_B,
                gate_weight=gate_weight, token_task=routing.token_task, sorted_idx=routing.sorted_idx,
                expert_offsets=routing.expert_offsets, offsets_cpu=routing.offsets_cpu,
                single_task=routing.single_task, scale=float(scale), dropout_p=float(dropout_p),
                seed=seed if dropout_p > 0.0 else None, **snaps)
    if not _needs_custom_op(x, weight, bias, shared_A, shared_B, task_A, task_B, gate_weight):
        # eager inference (decode): nothing to differentiate, nothing to trace -- call the
        # backend directly and skip the custom op's dispatch (tens of microseconds a call)
        y, _, _, _ = _bk.backend(name).forward(a)
        return y
    opts = OpOptions(expert_trainable=list(expert_trainable) if expert_trainable is not None else [],
                     deterministic=bool(deterministic), backend=name)
    y, _, _, _ = moe_lora_fwd(*astuple_shallow(a), *astuple_shallow(opts))
    return y
