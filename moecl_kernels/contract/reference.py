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

from .args import BwdArgs, FwdArgs, acc_dtype
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
) -> Tensor:
    """y for x [T, d_in] (token_task [T], -1 = no task), computed token by token."""
    tt = token_task.to(device=x.device, dtype=torch.long)
    has = tt >= 0
    xd = apply_dropout(x, dropout_p, seed)
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    shared = (xd @ shared_A.T) @ shared_B.T
    idx = tt.clamp(min=0)
    At = task_A[idx]  # [T, r, d_in]
    Bt = task_B[idx]  # [T, d_out, r]
    ht = torch.einsum("ti,tri->tr", xd, At)
    task = torch.einsum("tr,tor->to", ht, Bt)
    one = torch.ones_like(x[:, 0])
    if gate_weight is not None:
        beta = torch.softmax(x @ gate_weight.T, dim=-1)
        cs = torch.where(has, beta[:, 0], one)
        ct = torch.where(has, beta[:, 1], 0 * one)
    else:
        cs = one
        ct = has.to(x.dtype)
    return y + scale * cs[:, None] * shared + scale * ct[:, None] * task


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

    def unavailable_reason(self, x: Tensor) -> Optional[str]:
        return None

    @staticmethod
    def _call(a: FwdArgs, x, As, Bs, A, B, G) -> Tensor:
        return moe_lora_reference(x, a.weight, a.bias, As, Bs, A, B, G, a.token_task, a.scale, a.dropout_p, a.seed)

    def forward(self, a: FwdArgs):
        acc = acc_dtype(a.x.dtype)
        y = self._call(a, a.x, a.shared_A, a.shared_B, a.task_A, a.task_B, a.gate_weight)
        xd = apply_dropout(a.x, a.dropout_p, a.seed).to(acc)
        tt = a.token_task.long()
        has = tt >= 0
        h_s = xd @ a.shared_A.to(acc).T
        h_t = torch.einsum("ti,tri->tr", xd, a.task_A.to(acc)[tt.clamp(min=0)]) * has[:, None]
        if a.gate_weight is not None:
            beta = torch.softmax(a.x.to(acc) @ a.gate_weight.to(acc).T, dim=-1)
        else:
            beta = torch.ones(a.x.shape[0], 2, dtype=acc, device=a.x.device)
        coef = torch.stack([torch.where(has, beta[:, 0], 1.0), torch.where(has, beta[:, 1], 0.0)], dim=1)
        return y, h_s, h_t, coef

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
