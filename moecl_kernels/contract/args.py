"""The contract every backend of the fused MoE-LoRA op implements: its arguments (whose
field order *is* the custom ops' schema order, see ``ops.custom_ops``), the saved tensors
and the routing constants.

A backend is an object with ``name``, ``priority``, ``unavailable_reason(x)``,
``forward(FwdArgs)`` and ``backward(BwdArgs)``. The op (``moecl_kernels.ops``)
validates inputs, resolves the backend and calls it; backends never see bad input.

Semantics (docs/spec.md, "The linear op"), for token i with task ``t_i`` (-1 = no task):

    beta_i = softmax(x_i W_g^T)            (fp32)
    coef_i = [beta_s, beta_t] if gate and t_i >= 0
             [1, 1]           if no gate and t_i >= 0
             [1, 0]           if t_i == -1
    x~     = dropout(x)  (``contract.dropout``: seeded hash, regenerated in backward)
    h_s    = x~ A_s^T,   h_t = x~ A_{t_i}^T  (0 for t_i = -1)       -- unscaled, ungated
    y      = x W^T + b + s*coef_s*h_s B_s^T + s*coef_t*h_t B_{t_i}^T

Forward returns ``(y, h_s, h_t, coef)``: y in x's dtype [T, d_out]; h_s, h_t [T, r] and
coef [T, 2] in ``acc_dtype(x.dtype)`` (fp32, or fp64 for fp64 inputs). These are what the backward consumes (any backend's backward
must accept any backend's forward outputs: they are fully specified above).

Routing tensors (built once per model forward by ``moecl_kernels.routing``):
  token_task      int32 [T]      task of each token, -1 = none
  sorted_idx      int32 [T]      token indices grouped by task 0..E-1, then no-task tokens;
                                 stable (ascending token index within a group)
  expert_offsets  int32 [E+1]    tokens of expert e are sorted_idx[off[e]:off[e+1]];
                                 sorted_idx[off[E]:] are the no-task tokens
  offsets_cpu     int64 [E+1] or None   the same offsets on the host when known without a sync
  single_task     int            >= 0: every token has this task; -1: no token has a task;
                                 -2: mixed or unknown (read the offsets)

Frozen tasks (``mk.freeze_task``; docs/spec.md §1.4), all None when no task is frozen:
  snap_shared_A   [F, r, d_in]    the shared expert of snapshot slot f (frozen with its task)
  snap_shared_B   [F, d_out, r]
  snap_gate       [F, 2, d_in]    the gate of slot f (None without a gate)
  task_slot       int32 [E]       slot of each task, -1 = live (x's device)
  task_slot_cpu   int64 [E]       the same on the host (no device sync to read it)
A token of task t with ``task_slot[t] = f >= 0`` uses ``snap_gate[f]`` and ``snap_shared_A/B[f]``
in place of ``gate_weight`` and ``shared_A/B`` (h_s and coef are then of the snapshot); every
other token uses the live ones. Snapshots get no gradient.

Backward returns ``(dx, dA_s, dB_s, dA, dB, dgate)``; each may be None when not
needed (``needs_*`` flags). ``dA``/``dB`` are stacked [E, r, d_in]/[E, d_out, r] with
zeros for experts that are not trainable (``expert_trainable[e] is False``), whose
weight gradients must cost no compute. With ``deterministic=True`` the reductions
must not use atomics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import Tensor

SINGLE_MIXED = -2
SINGLE_NONE = -1


@dataclass
class FwdArgs:
    x: Tensor                    # [T, d_in]
    weight: Tensor               # [d_out, d_in]
    bias: Optional[Tensor]       # [d_out]
    shared_A: Tensor             # [r, d_in]
    shared_B: Tensor             # [d_out, r]
    task_A: Tensor               # [E, r, d_in]
    task_B: Tensor               # [E, d_out, r]
    gate_weight: Optional[Tensor]  # [2, d_in]
    token_task: Tensor           # int32 [T]     (routing tensors: see the module docstring)
    sorted_idx: Tensor           # int32 [T]
    expert_offsets: Tensor       # int32 [E+1]
    offsets_cpu: Optional[Tensor]  # int64 [E+1] on the host, or None
    single_task: int             # >= 0, SINGLE_NONE or SINGLE_MIXED
    scale: float
    dropout_p: float
    seed: Optional[Tensor]       # 0-dim int64 on x's device (None: no dropout); kernels read it on the device
    snap_shared_A: Optional[Tensor] = None   # [F, r, d_in]   (frozen tasks: see the module docstring)
    snap_shared_B: Optional[Tensor] = None   # [F, d_out, r]
    snap_gate: Optional[Tensor] = None       # [F, 2, d_in]
    task_slot: Optional[Tensor] = None       # int32 [E], -1 = live
    task_slot_cpu: Optional[Tensor] = None   # int64 [E] on the host


@dataclass
class BwdArgs(FwdArgs):
    grad_y: Tensor = None        # [T, d_out]
    h_s: Tensor = None
    h_t: Tensor = None
    coef: Tensor = None
    needs_dx: bool = True
    needs_shared: bool = True    # dA_s and dB_s
    needs_task: bool = True      # dA and dB (for trainable experts)
    needs_gate: bool = True
    expert_trainable: Optional[list] = None  # list[bool] of length E; None = all
    deterministic: bool = False

    def trainable(self, e: int) -> bool:
        return self.needs_task and (self.expert_trainable is None or bool(self.expert_trainable[e]))


@dataclass
class OpOptions:
    """What the custom ops carry besides a backend's arguments (the last schema arguments)."""

    expert_trainable: list[bool]   # per task expert; [] = all trainable
    deterministic: bool
    backend: str                   # the resolved backend name


SNAPSHOT_FIELDS = ("snap_shared_A", "snap_shared_B", "snap_gate", "task_slot", "task_slot_cpu")  # frozen tasks
SAVED = ("h_s", "h_t", "coef")  # forward outputs besides y that the backward consumes
NEEDS = ("needs_dx", "needs_shared", "needs_task", "needs_gate")  # which gradients the backward computes
GRADS = ("dx", "dA_s", "dB_s", "dA", "dB", "dgate")  # what a backend's backward returns, in order


class Backend(Protocol):
    name: str
    priority: int  # higher wins under MOECL_BACKEND=auto

    def unavailable_reason(self, x: Tensor) -> Optional[str]:
        """None if this backend can run on x's device/dtype, else a human-readable reason."""

    def forward(self, a: FwdArgs) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...

    def backward(self, a: BwdArgs) -> tuple: ...


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the saved rank-r intermediates and gates: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def coefficients(x: Tensor, gate_weight: Optional[Tensor], token_task: Tensor, single_task: int = SINGLE_MIXED) -> Tensor:
    """coef [T, 2] in ``acc_dtype(x.dtype)`` (see the module docstring): softmax(x W_g^T) or
    [1, 1] for tokens with a task, [1, 0] for tokens without one. ``gate_weight``: [2, d_in], or
    [T, 2, d_in] (every token's own gate: frozen tasks). ``single_task``: the routing's hint
    (>= 0: every token has that task; SINGLE_NONE: none has one) skips the per-token task mask."""
    acc = acc_dtype(x.dtype)
    T = x.shape[0]
    if single_task == SINGLE_NONE:
        return torch.cat([x.new_ones((T, 1), dtype=acc), x.new_zeros((T, 1), dtype=acc)], 1)
    if gate_weight is not None:
        logits = torch.einsum("ti,tki->tk", x, gate_weight) if gate_weight.dim() == 3 else x @ gate_weight.T
        beta = torch.softmax(logits.to(acc), dim=-1)
    else:
        beta = torch.ones(T, 2, device=x.device, dtype=acc)
    if single_task >= 0:
        return beta
    has = (token_task >= 0).unsqueeze(1).to(device=x.device, dtype=acc)
    return torch.cat([beta[:, :1] * has + (1.0 - has), beta[:, 1:] * has], dim=1)


def host_offsets(a: FwdArgs) -> list[int]:
    """Expert offsets on the host (one device sync if they were not known on the host)."""
    off = a.offsets_cpu if a.offsets_cpu is not None else a.expert_offsets
    return [int(v) for v in off.tolist()]
