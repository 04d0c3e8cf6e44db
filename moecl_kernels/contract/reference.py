"""The reference: the plainest, obviously-right formula of the linear op (docs/spec.md,
"The linear op") -- the float64 oracle of every test -- and the ``reference`` backend that
puts it behind the op.

Per-token gather of the routed expert and einsums; differentiable through autograd, which
is the reference backend's backward. It also computes the saved tensors (h_s, h_t, coef)
exactly as ``args`` defines them. Memory is O(T * r * (d_in + d_out)): tests and small
shapes only; ``auto`` never picks it.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .args import BwdArgs, FwdArgs, acc_dtype, coefficients
from .dropout import apply_dropout_reference as apply_dropout


def moe_lora_reference(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    shared_A: Tensor,
    shared_B: Tensor,
    task_A: Tensor,
    task_B: Tensor,
    gate_weight: Optional[Tensor],
    token_task: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed=0,
    snap_shared_A: Optional[Tensor] = None,
    snap_shared_B: Optional[Tensor] = None,
    snap_gate: Optional[Tensor] = None,
    task_slot: Optional[Tensor] = None,
) -> Tensor:
    """y for x [T, d_in] (token_task [T], -1 = no task), computed token by token. With
    ``task_slot`` [E] (frozen tasks, ``contract.args``): a token of a task in slot f >= 0 uses
    ``snap_shared_A/B[f]`` and ``snap_gate[f]`` instead of the live shared expert and gate."""
    tt = token_task.to(device=x.device, dtype=torch.long)
    has = tt >= 0
    xd = apply_dropout(x, dropout_p, seed)
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    if task_slot is not None:  # per token: 0 = live, 1 + f = slot f
        sidx = token_slots(tt, task_slot) + 1
        shared_A, shared_B = per_token(shared_A, snap_shared_A, sidx), per_token(shared_B, snap_shared_B, sidx)
        gate_weight = per_token(gate_weight, snap_gate, sidx) if gate_weight is not None else None
    if shared_A.dim() == 3:
        shared = torch.einsum("tr,tor->to", torch.einsum("ti,tri->tr", xd, shared_A), shared_B)
    else:
        shared = (xd @ shared_A.T) @ shared_B.T
    idx = tt.clamp(min=0)
    At = task_A[idx]  # [T, r, d_in]
    Bt = task_B[idx]  # [T, d_out, r]
    ht = torch.einsum("ti,tri->tr", xd, At)
    task = torch.einsum("tr,tor->to", ht, Bt)
    coef = coefficients(x, gate_weight, tt).to(x.dtype)
    return y + scale * coef[:, :1] * shared + scale * coef[:, 1:] * task


def token_slots(tt: Tensor, task_slot: Tensor) -> Tensor:
    """The snapshot slot of every token (long [T]; -1: the live shared expert and gate)."""
    slot = task_slot.to(device=tt.device, dtype=torch.long)[tt.clamp(min=0)]
    return torch.where(tt >= 0, slot, -1)


def leaf_grads(leaves: dict, outputs: list, grad_outputs: list, names: tuple, trainable) -> tuple:
    """autograd.grad of ``outputs`` for the ``leaves`` (name -> tensor), in ``names`` order (None
    where not asked); the task experts' stacks zeroed for frozen experts."""
    got = dict(zip(leaves, torch.autograd.grad(outputs, list(leaves.values()), grad_outputs, allow_unused=True)))
    out = []
    for n in names:
        g = got.get(n)
        if n in leaves and g is None:
            g = torch.zeros_like(leaves[n])
        if g is not None and n.endswith(("task_A", "task_B")) and trainable is not None:
            frozen = torch.tensor([not t for t in trainable], device=g.device)
            g = g.masked_fill(frozen[:, None, None], 0)
        out.append(g)
    return tuple(out)


def per_token(live: Tensor, snaps: Tensor, sidx: Tensor) -> Tensor:
    """[T, *live.shape]: the live tensor (sidx 0) or snapshot ``sidx - 1`` of every token."""
    return torch.cat([live.unsqueeze(0), snaps.to(live.dtype)])[sidx]


def pooled_shared_reference(
    x: Tensor, pool: Tensor, weight: Tensor, bias: Optional[Tensor], shared_A: Tensor, shared_B: Tensor, scale: float
) -> Tensor:
    """p_n of docs/spec.md §1: x [B, S, d_in], pool [B, S] (rows sum to 1)."""
    xbar = torch.einsum("bs,bsd->bd", pool.to(x.dtype), x)
    p = xbar @ weight.T + scale * (xbar @ shared_A.T) @ shared_B.T
    return p + bias if bias is not None else p


# ---------------------------------------------------------------------------- the reference backend
@contextlib.contextmanager
def _autograd_enabled():
    keys = [torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView]
    guards = [torch._C._SetExcludeDispatchKeyGuard(k, False) for k in keys]
    for g in guards:
        g.__enter__()
    try:
        with torch.enable_grad():
            yield
    finally:
        for g in reversed(guards):
            g.__exit__(None, None, None)


class ReferenceBackend:
    name = "reference"
    priority = -10
    serves_snapshots = True  # takes frozen tasks' snapshots (contract.args); others fall back to eager

    def unavailable_reason(self, x: Tensor) -> Optional[str]:
        return None

    @staticmethod
    def _call(a: FwdArgs, x, As, Bs, A, B, G) -> Tensor:
        return moe_lora_reference(x, a.weight, a.bias, As, Bs, A, B, G, a.token_task, a.scale, a.dropout_p, a.seed,
                                  a.snap_shared_A, a.snap_shared_B, a.snap_gate, a.task_slot)

    def forward(self, a: FwdArgs):
        acc = acc_dtype(a.x.dtype)
        y = self._call(a, a.x, a.shared_A, a.shared_B, a.task_A, a.task_B, a.gate_weight)
        xd = apply_dropout(a.x, a.dropout_p, a.seed).to(acc)
        tt = a.token_task.long()
        has = tt >= 0
        As, G = a.shared_A.to(acc), a.gate_weight.to(acc) if a.gate_weight is not None else None
        if a.task_slot is not None:
            sidx = token_slots(tt, a.task_slot) + 1
            As, G = per_token(As, a.snap_shared_A, sidx), per_token(G, a.snap_gate, sidx) if G is not None else None
        h_s = torch.einsum("ti,tri->tr", xd, As) if As.dim() == 3 else xd @ As.T
        h_t = torch.einsum("ti,tri->tr", xd, a.task_A.to(acc)[tt.clamp(min=0)]) * has[:, None]
        return y, h_s, h_t, coefficients(a.x.to(acc), G, tt)

    def backward(self, a: BwdArgs):
        # The op's backward runs below the Autograd dispatch key; re-enable it for the
        # nested autograd.grad over the reference formula.
        with _autograd_enabled():
            leaves = [t.detach().requires_grad_(True) if t is not None else None
                      for t in (a.x, a.shared_A, a.shared_B, a.task_A, a.task_B, a.gate_weight)]
            y = self._call(a, *leaves)
            want = [a.needs_dx, a.needs_shared, a.needs_shared, a.needs_task, a.needs_task,
                    a.needs_gate and a.gate_weight is not None]
            inputs = [t for t, w in zip(leaves, want) if w]
            grads = iter(torch.autograd.grad(y, inputs, a.grad_y, allow_unused=True) if inputs else [])
            out = [next(grads) if w else None for w in want]
        dx, dAs, dBs, dA, dB, dg = out
        if dA is not None and a.expert_trainable is not None:
            frozen = torch.tensor([not t for t in a.expert_trainable], device=dA.device)
            dA = dA.masked_fill(frozen[:, None, None], 0)
            dB = dB.masked_fill(frozen[:, None, None], 0)
        return dx, dAs, dBs, dA, dB, dg

    def ffn_forward(self, a):
        from .ffn_reference import reference_ffn_forward  # (it imports this module)

        return reference_ffn_forward(a)

    def ffn_backward(self, a):
        from .ffn_reference import reference_ffn_backward

        return reference_ffn_backward(a)
