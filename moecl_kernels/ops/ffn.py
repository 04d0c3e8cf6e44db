"""The Python entry point of the FFN-level op (docs/spec.md §1.3): :func:`moe_lora_mlp`
validates every argument (errors name the argument), resolves the backend (one without FFN
kernels falls back to eager, saying so once) and calls ``moecl::moe_lora_mlp_fwd``."""

from __future__ import annotations

from dataclasses import fields
from typing import Optional

import torch
from torch import Tensor

from .. import backends as _bk
from ..contract import OpOptions, acc_dtype
from ..contract.ffn_args import ACTIVATIONS, FFN_SNAPSHOTS, PROJECTIONS, FfnFwdArgs
from ..routing import Routing
from .custom_ops import moe_lora_mlp_fwd
from .linear import _FLOAT_DTYPES, _check, _needs_custom_op, astuple_shallow, check_like_x, check_routing
from .snapshots import check_snapshots, frozen_tokens, host_slots, snapshot_backend

_TENSOR_ARGS = tuple(f.name for f in fields(FfnFwdArgs) if "Tensor" in str(f.type)
                     and f.name not in ("x", "token_task", "sorted_idx", "expert_offsets", "offsets_cpu", "pool", "seed",
                                        "task_slot", "task_slot_cpu"))


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, Tensor) else t


def validate_ffn(x: Tensor, t: dict, routing: Routing, activation: str, dropout_p: float, pool: Optional[Tensor]) -> None:
    """Shape/dtype/device checks of the FFN op's arguments ``t`` (by field name); every error
    names the offending argument."""
    _check(isinstance(x, Tensor) and x.dim() == 2, f"x must be a 2-D [tokens, d] tensor, got shape {_shape(x)}")
    _check(x.dtype in _FLOAT_DTYPES, f"x has dtype {x.dtype}; supported: fp16, bf16, fp32, fp64")
    T, d = x.shape
    for name in ("up_proj_weight", "down_proj_weight", "up_proj_shared_A", "down_proj_shared_A"):
        _check(isinstance(t.get(name), Tensor), f"{name} is required (a tensor)")
    up = t["up_proj_weight"]
    _check(up.dim() == 2 and up.shape[1] == d, f"up_proj_weight must be [d_ff, d={d}], got {_shape(up)}")
    d_ff = up.shape[0]
    down = t["down_proj_weight"]
    _check(down.dim() == 2 and down.shape[1] == d_ff, f"down_proj_weight must be [d_out, d_ff={d_ff}], got {_shape(down)}")
    d_out = down.shape[0]
    r = t["up_proj_shared_A"].shape[0] if t["up_proj_shared_A"].dim() == 2 else -1
    _check(r >= 1, f"up_proj_shared_A must be [r >= 1, d={d}], got {_shape(t['up_proj_shared_A'])}")
    E = t["up_proj_task_A"].shape[0] if isinstance(t.get("up_proj_task_A"), Tensor) else 0
    gated = t.get("gate_proj_weight") is not None
    dims = {"gate_proj": (d, d_ff), "up_proj": (d, d_ff), "down_proj": (d_ff, d_out)}
    for proj in PROJECTIONS:
        d_in, d_o = dims[proj]
        want = {"weight": (d_o, d_in), "bias": (d_o,), "shared_A": (r, d_in), "shared_B": (d_o, r),
                "task_A": (E, r, d_in), "task_B": (E, d_o, r)}
        for part, shape in want.items():
            name = f"{proj}_{part}"
            v = t.get(name)
            if proj == "gate_proj" and not gated:
                _check(v is None, f"{name} is given but gate_proj_weight is None (a plain MLP has no gate projection)")
            elif v is None:
                _check(part == "bias", f"{name} is required" + (" (the gate projection's LoRA)" if proj == "gate_proj" else ""))
            else:
                _check(_shape(v) == shape, f"{name} must be {list(shape)}, got {list(_shape(v))}")
    g = t.get("moe_gate")
    if g is not None:
        _check(_shape(g) == (2, d), f"moe_gate must be [2, d={d}], got {list(_shape(g))}")
    check_like_x(x, [(n, t.get(n)) for n in _TENSOR_ARGS])
    check_routing(routing, x, E, "up_proj_task_A")
    _check(activation in ACTIVATIONS, f"activation={activation!r} is not supported; supported: {list(ACTIVATIONS)}")
    _check(0.0 <= dropout_p < 1.0, f"dropout_p must be in [0, 1), got {dropout_p}")
    if pool is not None:
        _check(isinstance(pool, Tensor) and pool.dim() == 2 and pool.shape[0] * pool.shape[1] == T,
               f"pool must be [B, S] pooling weights with B * S = {T} tokens, got {_shape(pool)}")
        _check(pool.device == x.device, f"pool is on {pool.device} but x is on {x.device}")
        _check(g is not None, "pool needs a gated MLP (moe_gate): without a gate FFN_shared is not evaluated")


def moe_lora_mlp(
    x: Tensor,
    routing: Routing,
    *,
    activation: str,
    scale: float,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
    pool: Optional[Tensor] = None,
    expert_trainable: Optional[list[bool]] = None,
    deterministic: bool = False,
    backend: Optional[str] = None,
    task_slot: Optional[Tensor] = None,
    task_slot_cpu: Optional[Tensor] = None,
    **tensors: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, h_pool, z_pool) of the FFN-level op (docs/spec.md §1.3) for x [T, d].

    ``tensors``: the base weights and LoRA factors by their ``contract.ffn_args.FfnFwdArgs``
    names (``gate_proj_weight``, ``up_proj_shared_A``, ``down_proj_task_B``, ``moe_gate``, ...;
    leave the ``gate_proj_*`` out for a plain two-layer MLP). ``pool`` [B, S]: pooling weights
    for the pooled shared-expert outputs (empty tensors without it). Frozen tasks (``mk.freeze_task``,
    ``contract.ffn_args``): ``task_slot`` [E] (``task_slot_cpu``: its host copy) with the slots'
    ``<proj>_snap_shared_A/B`` and ``snap_gate``."""
    unknown = sorted(set(tensors) - set(_TENSOR_ARGS))
    if unknown:
        raise TypeError(f"moe_lora_mlp got unexpected arguments {unknown}; tensors are named {list(_TENSOR_ARGS)}")
    validate_ffn(x, tensors, routing, activation, dropout_p, pool)
    if dropout_p > 0.0 and seed is None:
        raise ValueError("seed is required when dropout_p > 0 (a 0-dim int64 tensor on x's device)")
    r, E = tensors["up_proj_shared_A"].shape[0], tensors["up_proj_task_A"].shape[0]
    n_pre = 2 if tensors.get("gate_proj_weight") is not None else 1
    name = _bk.choose_ffn_backend(backend, x, n_pre * r, E)  # the x shrink runs both projections' ranks at once
    snap_names = [n for n in FFN_SNAPSHOTS if tensors.get(n) is not None]
    slots = {}
    if task_slot is not None:
        task_slot_cpu = host_slots(task_slot, task_slot_cpu, E)
        named = []
        for proj in PROJECTIONS:
            A, B = tensors.get(f"{proj}_shared_A"), tensors.get(f"{proj}_shared_B")
            named += [(f"{proj}_snap_shared_A", tensors.get(f"{proj}_snap_shared_A"), tuple(A.shape) if A is not None else None),
                      (f"{proj}_snap_shared_B", tensors.get(f"{proj}_snap_shared_B"), tuple(B.shape) if B is not None else None)]
        gate = tensors.get("moe_gate")
        named.append(("snap_gate", tensors.get("snap_gate"), tuple(gate.shape) if gate is not None else None))
        check_snapshots(named, task_slot_cpu, x)
        if frozen_tokens(task_slot_cpu, routing):
            slots = dict(task_slot=task_slot.to(device=x.device, dtype=torch.int32), task_slot_cpu=task_slot_cpu)
            name = snapshot_backend(name)
    if not slots:  # an ordinary call: no frozen task's token
        tensors = {n: t for n, t in tensors.items() if n not in snap_names}
    a = FfnFwdArgs(x=x, **{n: tensors.get(n) for n in _TENSOR_ARGS}, **slots, token_task=routing.token_task,
                   sorted_idx=routing.sorted_idx, expert_offsets=routing.expert_offsets,
                   offsets_cpu=routing.offsets_cpu, single_task=routing.single_task,
                   pool=pool.to(acc_dtype(x.dtype)) if pool is not None else None, activation=activation,
                   scale=float(scale), dropout_p=float(dropout_p), seed=seed if dropout_p > 0.0 else None)
    if not _needs_custom_op(x, *tensors.values()):
        # inference (decode): nothing to differentiate or trace -- the backend directly, without the
        # custom op's dispatch (as moe_lora_linear does)
        out = _bk.backend(name).ffn_forward(a)
        return out[0], out[-2], out[-1]
    opts = OpOptions(expert_trainable=list(expert_trainable) if expert_trainable is not None else [],
                     deterministic=bool(deterministic), backend=name)
    out = moe_lora_mlp_fwd(*astuple_shallow(a), *astuple_shallow(opts))
    return out[0], out[-2], out[-1]


__all__ = ["moe_lora_mlp", "validate_ffn"]
