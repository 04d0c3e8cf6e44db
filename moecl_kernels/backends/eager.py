"""The eager PyTorch backend: what a good PyTorch user would write.

Forward: base GEMM, shared shrink on the whole batch, one task-expert GEMM pair per
task present (``index_select`` / ``index_add_``, like PEFT's mixed-batch path), the
gated LoRA terms accumulated into the base output with ``addmm_``. Backward is
explicit: it saves only x (shared with the base), the rank-r intermediates and the
gates, regenerates the dropout mask, and skips weight gradients of frozen experts.

This is the baseline the kernels are measured against: honest, not slow on purpose.
The one host sync it makes is reading the expert offsets when the router could not
provide them on the host (task ids given on the device).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..contract import BwdArgs, FwdArgs, acc_dtype, apply_dropout, coefficients, dropout_scale
from .eager_ffn import EagerFFN, expert_groups


def _coef(a: FwdArgs, x: Tensor) -> Tensor:
    """[T, 2] effective coefficients (``contract.args``)."""
    return coefficients(x, a.gate_weight, a.token_task)


def _groups(a: FwdArgs) -> list[tuple[int, Optional[Tensor]]]:
    """(expert, token index or None=all tokens) for every expert with tokens."""
    return expert_groups(a, a.task_A.shape[0])


class EagerBackend(EagerFFN):
    name = "eager"
    priority = 0

    def unavailable_reason(self, x: Tensor) -> Optional[str]:
        return None

    def forward(self, a: FwdArgs):
        x, s = a.x, a.scale
        acc = acc_dtype(x.dtype)
        T, r = x.shape[0], a.shared_A.shape[0]
        y = F.linear(x, a.weight, a.bias)
        xd = apply_dropout(x, a.dropout_p, a.seed)
        coef = _coef(a, x)
        if a.single_task >= 0:
            # one task: shared and task expert as one rank-2r LoRA (one shrink, one addmm into y)
            k = a.single_task
            h = F.linear(xd, torch.cat([a.shared_A, a.task_A[k]])).to(acc)  # [T, 2r]
            g = (h * (s * coef).repeat_interleave(r, dim=1)).to(x.dtype)
            y.addmm_(g, torch.cat([a.shared_B, a.task_B[k]], dim=1).t())
            return y, h[:, :r].clone(), h[:, r:].clone(), coef  # outputs must not alias
        h_s = F.linear(xd, a.shared_A).to(acc)
        y.addmm_((h_s * (s * coef[:, :1])).to(x.dtype), a.shared_B.t())  # y += s c_s h_s B_s^T
        h_t = torch.zeros(T, r, device=x.device, dtype=acc)
        for e, idx in _groups(a):  # PEFT-style mixed batch: one GEMM pair per task present
            he = F.linear(xd.index_select(0, idx), a.task_A[e]).to(acc)
            h_t.index_copy_(0, idx, he)
            ge = (he * (s * coef.index_select(0, idx)[:, 1:])).to(x.dtype)
            y.index_add_(0, idx, F.linear(ge, a.task_B[e]))
        return y, h_s, h_t, coef

    def backward(self, a: BwdArgs):
        x, gy, s = a.x, a.grad_y, a.scale
        dt = x.dtype
        acc = acc_dtype(dt)
        E = a.task_A.shape[0]
        coef, h_s, h_t = a.coef, a.h_s, a.h_t
        # logit gradients: for dW_g, and for dx (the gate sees x) even when W_g is frozen
        need_gate = a.gate_weight is not None and (a.needs_gate or a.needs_dx)
        any_task_grad = a.needs_task and any(a.trainable(e) for e in range(E))
        need_xd = a.needs_shared or any_task_grad
        mask = dropout_scale(x, a.dropout_p, a.seed) if (need_xd or a.needs_dx) else None  # one hash pass
        xd = (x if mask is None else x * mask) if need_xd else None
        need_dxd = a.needs_dx
        dx = F.linear(gy, a.weight.t()) if a.needs_dx else None  # base dgrad: gy @ W
        gbeta = torch.zeros_like(coef) if need_gate else None  # dL/dbeta (fp32)

        # shared expert
        g_hs = F.linear(gy, a.shared_B.t()).to(acc)  # gy @ B_s: [T, r]
        dhs = g_hs * (s * coef[:, :1])  # dL/dh_s
        dA_s = dB_s = None
        if a.needs_shared:
            dB_s = F.linear(gy.t(), (h_s * (s * coef[:, :1])).to(dt).t())  # gy^T @ (s c h_s): [d_out, r]
            dA_s = F.linear(dhs.to(dt).t(), xd.t())  # dhs^T @ xd: [r, d_in]
        if need_gate:
            gbeta[:, 0] = s * (g_hs * h_s).sum(1)
        dxd = F.linear(dhs.to(dt), a.shared_A.t()) if need_dxd else None  # [T, d_in]

        dA = dB = None
        if a.needs_task:
            dA = torch.zeros_like(a.task_A)
            dB = torch.zeros_like(a.task_B)
        for e, idx in _groups(a):
            gy_e = gy if idx is None else gy.index_select(0, idx)
            ht_e = h_t if idx is None else h_t.index_select(0, idx)
            c_e = coef[:, 1:] if idx is None else coef.index_select(0, idx)[:, 1:]
            g_ht = F.linear(gy_e, a.task_B[e].t()).to(acc)  # [n, r]
            dht = g_ht * (s * c_e)
            if need_gate:
                gb = s * (g_ht * ht_e).sum(1)
                if idx is None:
                    gbeta[:, 1] = gb
                else:
                    gbeta[:, 1].index_copy_(0, idx, gb)
            if a.trainable(e):
                xd_e = xd if idx is None else xd.index_select(0, idx)
                dB[e] = F.linear(gy_e.t(), (ht_e * (s * c_e)).to(dt).t())
                dA[e] = F.linear(dht.to(dt).t(), xd_e.t())
            if need_dxd:
                contrib = F.linear(dht.to(dt), a.task_A[e].t())
                if idx is None:
                    dxd.add_(contrib)
                else:
                    dxd.index_add_(0, idx, contrib)

        dgate = None
        if need_dxd:
            dx.add_(dxd if mask is None else dxd * mask)
        if need_gate:
            beta = coef  # for tokens with a task and gate on, coef == beta
            has = (a.token_task >= 0).unsqueeze(1)
            dlog = beta * (gbeta - (beta * gbeta).sum(1, keepdim=True))
            dlog = torch.where(has, dlog, torch.zeros_like(dlog))
            dgate = dlog.to(dt).t() @ x if a.needs_gate else None  # [2, d_in]
            if a.needs_dx:
                dx.add_(F.linear(dlog.to(dt), a.gate_weight.t()))
        return dx, dA_s, dB_s, dA, dB, dgate
