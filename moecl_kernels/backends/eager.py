"""The eager PyTorch backend: what a good PyTorch user would write.

Forward: base GEMM, then the LoRA terms accumulated into the base output with ``addmm_``:
a batch of one task runs the shared and the task expert as one rank-2r LoRA (one shrink,
one expand); a mixed batch runs the shared expert on the whole batch and the routed experts
densely when there are few tokens (decode: every task expert on every token, kept by a one-hot
of its task; ``eager_parts.dense_shrink/dense_expand``), else by one GEMM pair per task present
(``index_select`` / ``index_add_``, like PEFT's mixed-batch path).

Backward is explicit: it saves only x (shared with the base), the rank-r intermediates and
the gates, regenerates the dropout mask (``contract.dropout``'s int32 hash) and skips weight
gradients of frozen experts. Weight gradients run in the orientation CPU BLAS is fast at
(``eager_parts.wgrad``).

This is the baseline the kernels are measured against: honest, not slow on purpose.
The one host sync it makes is reading the expert offsets when the router could not
provide them on the host (task ids given on the device).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..contract import SINGLE_NONE, BwdArgs, FwdArgs, acc_dtype, coefficients
from . import eager_snapshots
from .eager_ffn import EagerFFN
from .eager_parts import (DENSE_ELEMENTS, Dropout, Workspace, add_rows, dense_expand, dense_shrink,
                          expert_groups, gate_logit_grad, rows, task_one_hot, thin, wgrad, wgrad_t)


class EagerBackend(EagerFFN):
    name = "eager"
    priority = 0
    serves_snapshots = True  # takes frozen tasks' snapshots (contract.args); others fall back to eager

    def unavailable_reason(self, x: Tensor) -> Optional[str]:
        return None

    def forward(self, a: FwdArgs):
        if a.task_slot is not None:  # frozen tasks' tokens in this call (backends/eager_snapshots.py)
            return eager_snapshots.linear_forward(a)
        with Workspace(a.x.device) as ws:
            return self._forward(a, ws)

    def _forward(self, a: FwdArgs, ws: Workspace):
        x, s = a.x, a.scale
        dt, acc = x.dtype, acc_dtype(x.dtype)
        T, r = x.shape[0], a.shared_A.shape[0]
        y = F.linear(x, a.weight, a.bias)
        drop = Dropout(x, a.dropout_p, a.seed, ws)
        xd = drop.into(x, ws.like(x) if drop.mask is not None else None)
        coef = coefficients(x, a.gate_weight, a.token_task, a.single_task)
        sc = coef * s
        if a.single_task >= 0:
            # one task: shared and task expert as one rank-2r LoRA (one shrink, one addmm into y)
            k = a.single_task
            h = thin(xd, torch.cat([a.shared_A, a.task_A[k]])).to(acc)  # [T, 2r]
            g = (h.view(T, 2, r) * sc.unsqueeze(2)).view(T, 2 * r).to(dt)
            y.addmm_(g, torch.cat([a.shared_B, a.task_B[k]], dim=1).t())
            return y, h[:, :r].clone(), h[:, r:].clone(), coef  # outputs must not alias
        h_s = thin(xd, a.shared_A).to(acc).contiguous()
        y.addmm_((h_s * sc[:, :1]).to(dt), a.shared_B.t())  # y += s c_s h_s B_s^T
        h_t = x.new_zeros((T, r), dtype=acc)
        if a.single_task == SINGLE_NONE:
            return y, h_s, h_t, coef
        E, d_in, d_out = a.task_A.shape[0], x.shape[1], y.shape[1]
        if T * E * r * (d_in + d_out) <= DENSE_ELEMENTS:  # few tokens (decode): see eager_parts
            hot = task_one_hot(a.token_task, E, acc)
            h_t = dense_shrink(a.task_A, xd, hot)
            y.add_(dense_expand(a.task_B, h_t * sc[:, 1:], hot))
            return y, h_s, h_t, coef
        for e, idx in expert_groups(a, E):  # PEFT-style mixed batch: one GEMM pair per task present
            he = F.linear(xd.index_select(0, idx), a.task_A[e]).to(acc)
            h_t.index_copy_(0, idx, he)
            y.index_add_(0, idx, F.linear((he * sc.index_select(0, idx)[:, 1:]).to(dt), a.task_B[e]))
        return y, h_s, h_t, coef

    def backward(self, a: BwdArgs):
        if a.task_slot is not None:
            return eager_snapshots.linear_backward(a)
        with Workspace(a.x.device) as ws:
            return self._backward(a, ws)

    def _backward(self, a: BwdArgs, ws: Workspace):
        x, gy, s = a.x, a.grad_y, a.scale
        dt, acc = x.dtype, acc_dtype(x.dtype)
        T, r, E = x.shape[0], a.shared_A.shape[0], a.task_A.shape[0]
        coef, h_s, h_t = a.coef, a.h_s, a.h_t
        sc = coef * s
        groups = expert_groups(a, E)
        # logit gradients: for dW_g, and for dx (the gate sees x) even when W_g is frozen
        need_gate = a.gate_weight is not None and (a.needs_gate or a.needs_dx) and a.single_task != SINGLE_NONE
        need_xd = a.needs_shared or any(a.trainable(e) for e, _ in groups)
        drop = Dropout(x, a.dropout_p if (need_xd or a.needs_dx) else 0.0, a.seed, ws)  # one hash pass
        xd = drop.into(x, ws.like(x) if drop.mask is not None else None) if need_xd else None
        dx = gy @ a.weight if a.needs_dx else None  # base dgrad
        dA_s = dB_s = dA = dB = dxd = None
        gbeta = x.new_zeros((T, 2), dtype=acc) if need_gate else None  # dL/dbeta
        if a.needs_task:
            dA, dB = torch.zeros_like(a.task_A), torch.zeros_like(a.task_B)

        if a.single_task >= 0:  # shared + task expert as one rank-2r LoRA
            k = a.single_task
            g = thin(gy, torch.cat([a.shared_B, a.task_B[k]], dim=1).t()).to(acc).contiguous()  # [T, 2r]
            h = torch.cat([h_s, h_t], dim=1)
            sc2 = sc.repeat_interleave(r, dim=1)
            dh = g * sc2
            if need_gate:
                gbeta = s * (g * h).view(T, 2, r).sum(2)
            trained = [a.needs_shared, a.trainable(k)]
            if any(trained):
                lo, hi = (0 if trained[0] else r), (2 * r if trained[1] else r)
                dBc = wgrad((h[:, lo:hi] * sc2[:, lo:hi]).to(dt), gy)  # [n r, d_out]
                dAc = wgrad(dh[:, lo:hi].to(dt), xd)  # [n r, d_in]
                if trained[0]:
                    dB_s, dA_s = dBc[:r].t().contiguous(), dAc[:r].clone()
                if trained[1]:
                    dB[k], dA[k] = dBc[-r:].t(), dAc[-r:]
            if a.needs_dx:
                dxd = torch.mm(dh.to(dt), torch.cat([a.shared_A, a.task_A[k]]), out=ws.like(x))
        else:
            g_s = thin(gy, a.shared_B.t()).to(acc).contiguous()  # [T, r]
            dhs = g_s * sc[:, :1]
            if need_gate:
                gbeta[:, 0] = s * (g_s * h_s).sum(1)
            if a.needs_shared:
                dB_s = wgrad_t(gy, (h_s * sc[:, :1]).to(dt))
                dA_s = wgrad(dhs.to(dt), xd)
            if a.needs_dx:
                dxd = torch.mm(dhs.to(dt), a.shared_A, out=ws.like(x))
            for e, idx in groups:
                gy_e, ht_e, sc_e = gy.index_select(0, idx), h_t.index_select(0, idx), sc.index_select(0, idx)[:, 1:]
                g_t = (gy_e @ a.task_B[e]).to(acc)  # [n, r]
                dht = g_t * sc_e
                if need_gate:
                    gbeta[:, 1].index_copy_(0, idx, s * (g_t * ht_e).sum(1))
                if a.trainable(e):
                    dB[e] = wgrad_t(gy_e, (ht_e * sc_e).to(dt))
                    dA[e] = wgrad(dht.to(dt), rows(xd, idx))
                if a.needs_dx:
                    add_rows(dxd, idx, dht.to(dt) @ a.task_A[e])

        dgate = None
        if dxd is not None:
            dx.add_(drop.apply_(dxd))
        if need_gate:
            dlog = gate_logit_grad(coef, gbeta, a.token_task, a.single_task).to(dt)
            dgate = wgrad(dlog, x) if a.needs_gate else None  # [2, d_in]
            if a.needs_dx:
                dx.addmm_(dlog, a.gate_weight)
        elif a.needs_gate and a.gate_weight is not None:
            dgate = torch.zeros_like(a.gate_weight)
        return dx, dA_s, dB_s, dA, dB, dgate
