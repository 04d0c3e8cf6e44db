"""The eager PyTorch implementation of the FFN-level op (docs/spec.md §1.3), the baseline the
FFN kernels are measured against and the reference for the rest.

Forward: the base gate/up GEMMs once; the rank-r shrinks of x~ (every projection of both
experts in one GEMM when the batch has one task); each expert's rank-r terms added to g and u
by ``addmm`` (one per projection and expert), h_e = act(pg_e) * pu_e evaluated over all tokens
(the routed expert's terms assembled per task group in a mixed batch, or densely under a
one-hot of each token's task at decode sizes), the mixed h by one
``lerp``; ONE base down GEMM on h; the down LoRA terms from rank-r shrinks of h~_s and h~_t.
Saved: g, u and rank-r factors only.

Backward (explicit): recomputes h_e from the saved g, u and rank-r factors, runs the base dgrad
GEMMs (gy W_down, then du W_up + dg W_gate) once, and the LoRA, gate and pooled-output terms
from rank-r shrinks and expands; the activation's gradient is PyTorch's own fused kernel
(``activation_backward``). Frozen experts' weight gradients cost no compute. Each dropout mask
is built once per call (``eager_parts.Dropout``); weight gradients run in the orientation CPU
BLAS is fast at.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..contract import SINGLE_MIXED, SINGLE_NONE, acc_dtype, coefficients
from ..contract.activations import activation_, activation_backward_, activation_into
from . import eager_snapshots
from ..contract.ffn_args import FFN_GRAD_INPUTS, FfnBwdArgs, FfnFwdArgs, down_seed
from .eager_parts import (DENSE_ELEMENTS, Dropout, Workspace, dense_expand, dense_shrink,
                          expert_groups, gate_logit_grad, rows, set_rows, task_one_hot, thin, wgrad, wgrad_t)


class _Ffn:
    """Per-call constants of the op: which projections carry LoRA before the activation, the
    experts' weights by projection, the token groups and the rank."""

    def __init__(self, a: FfnFwdArgs, ws: Workspace) -> None:
        self.a = a
        self.ws = ws
        self.dt = a.x.dtype
        self.acc = acc_dtype(self.dt)
        self.s = a.scale
        self.r = a.rank
        self.E = a.num_experts
        self.gated_mlp = a.gated_mlp
        self.pre = ("gate_proj", "up_proj") if self.gated_mlp else ("up_proj",)
        self.moe_gated = a.moe_gate is not None
        self.single = a.single_task if a.single_task >= 0 else None
        self.any_task = a.single_task != SINGLE_NONE
        self._groups: Optional[list] = None
        T, d, d_ff = a.x.shape[0], a.x.shape[1], a.up_proj_weight.shape[0]
        volume = T * self.E * self.r * (len(self.pre) * (d + d_ff) + d_ff + a.down_proj_weight.shape[0])
        self.dense = a.single_task == SINGLE_MIXED and volume <= DENSE_ELEMENTS  # decode: eager_parts
        self.hot = task_one_hot(a.token_task, self.E, self.acc) if self.dense else None

    @property
    def groups(self) -> list:
        """(expert, token index or None) of every expert with tokens (host offsets: computed once, when needed)."""
        if self._groups is None:
            self._groups = expert_groups(self.a, self.E)
        return self._groups

    def A_cat(self, e: Optional[int]) -> Tensor:
        """The pre-activation projections' A matrices of expert e (None = shared), stacked [n r, d]."""
        a = self.a
        if e is None:
            return torch.cat([getattr(a, f"{p}_shared_A") for p in self.pre])
        return torch.cat([getattr(a, f"{p}_task_A")[e] for p in self.pre])

    def B(self, proj: str, e: Optional[int]) -> Tensor:
        return getattr(self.a, f"{proj}_shared_B") if e is None else getattr(self.a, f"{proj}_task_B")[e]

    def shrink(self, xd: Tensor) -> tuple[Tensor, Tensor]:
        """(a_s, a_t) = x~ A^T of the shared and each token's routed expert, [T, n r] each in acc
        (a_t is 0 for tokens without a task)."""
        T, n = xd.shape[0], len(self.pre) * self.r
        if self.single is not None:  # one GEMM for every projection of both experts
            both = thin(xd, torch.cat([self.A_cat(None), self.A_cat(self.single)])).to(self.acc)
            return both[:, :n].clone(), both[:, n:].clone()  # outputs must not alias
        a_s = thin(xd, self.A_cat(None)).to(self.acc).contiguous()
        if self.dense:
            return a_s, dense_shrink(torch.cat([getattr(self.a, f"{p}_task_A") for p in self.pre], 1), xd, self.hot)
        a_t = xd.new_zeros((T, n), dtype=self.acc)
        for e, idx in self.groups:
            set_rows(a_t, idx, F.linear(rows(xd, idx), self.A_cat(e)).to(self.acc))
        return a_s, a_t

    def pre_acts(self, g: Optional[Tensor], u: Tensor, a_s: Tensor, a_t: Tensor, experts: tuple) -> tuple:
        """(pg, pu), workspace tensors: the base pre-activations plus the rank-r terms of ``experts`` (a
        subset of ("s", "t")); pg is None for a plain MLP. The routed expert's terms come from one
        addmm per projection in a one-task batch, else are added per task group."""
        r, s, dt = self.r, self.s, self.dt
        out = []
        for i, (base, proj) in enumerate(((g, "gate_proj"), (u, "up_proj")) if self.gated_mlp else ((u, "up_proj"),)):
            cols = slice(i * r, (i + 1) * r)
            left, right = [], []
            if "s" in experts:
                left.append(a_s[:, cols]), right.append(self.B(proj, None))
            if "t" in experts and self.single is not None:
                left.append(a_t[:, cols]), right.append(self.B(proj, self.single))
            p = self.ws.like(base)
            dense = dense_expand(getattr(self.a, f"{proj}_task_B"), s * a_t[:, cols], self.hot) \
                if "t" in experts and self.dense else None
            if len(left) == 1:
                torch.addmm(base, (s * left[0]).to(dt), right[0].t(), out=p)
            elif left:
                torch.addmm(base, (s * torch.cat(left, 1)).to(dt), torch.cat(right, 1).t(), out=p)
            elif dense is not None:
                torch.add(base, dense, out=p)
                dense = None
            else:
                p.copy_(base)
            if dense is not None:
                p.add_(dense)
            elif "t" in experts and self.single is None and not self.dense:
                for e, idx in self.groups:
                    p.index_add_(0, idx, F.linear((s * rows(a_t, idx)[:, cols]).to(dt), self.B(proj, e)))
            out.append(p)
        return (out[0], out[1]) if self.gated_mlp else (None, out[0])

    def hidden_(self, pg: Optional[Tensor], pu: Tensor) -> Tensor:
        """h = act(pg) * pu (plain MLP: act(pu)), written into pg (plain: pu), which it returns."""
        kind = self.a.activation
        if not self.gated_mlp:
            return activation_(kind, pu)
        return activation_(kind, pg).mul_(pu)

    def backprop_(self, pg: Optional[Tensor], pu: Tensor, dh: Tensor, need_h: bool) -> tuple:
        """(h or None, dpg, dpu) of one FFN evaluation, recomputed from its pre-activations (which
        it overwrites), given dL/dh (overwritten too: it becomes dpg, or dpu for a plain MLP)."""
        kind = self.a.activation
        if not self.gated_mlp:
            dpu = activation_backward_(kind, dh, pu)
            return (activation_(kind, pu) if need_h else None), None, dpu
        act = activation_into(kind, pg, self.ws.like(pg))
        dpu = torch.mul(dh, act, out=self.ws.like(dh))
        dpg = activation_backward_(kind, dh.mul_(pu), pg)
        return (act.mul_(pu) if need_h else None), dpg, dpu


class EagerFFN:
    """``ffn_forward`` / ``ffn_backward`` of the eager backend (mixed into ``EagerBackend``)."""

    def ffn_forward(self, a: FfnFwdArgs):
        if a.task_slot is not None:  # frozen tasks' tokens in this call (backends/eager_snapshots.py)
            return eager_snapshots.ffn_forward(a)
        with Workspace(a.x.device) as ws:
            return self._ffn_forward(a, ws)

    def _ffn_forward(self, a: FfnFwdArgs, ws: Workspace):
        c = _Ffn(a, ws)
        x, s, dt, acc, r = a.x, c.s, c.dt, c.acc, c.r
        T = x.shape[0]
        g = F.linear(x, a.gate_proj_weight, a.gate_proj_bias) if c.gated_mlp else None
        u = F.linear(x, a.up_proj_weight, a.up_proj_bias)
        coef = coefficients(x, a.moe_gate, a.token_task, a.single_task)
        drop_x = Dropout(x, a.dropout_p, a.seed, ws)
        a_s, a_t = c.shrink(drop_x.into(x, ws.like(x) if drop_x.mask is not None else None))
        if c.moe_gated:  # two FFN evaluations mixed by the gate: h = h_s + c_t (h_t - h_s)
            h_s = c.hidden_(*c.pre_acts(g, u, a_s, a_t, ("s",)))
            h_t = c.hidden_(*c.pre_acts(g, u, a_s, a_t, ("t",))) if c.any_task else h_s
        else:  # one FFN carrying both experts' LoRA terms (what three ungated linears compute)
            h_s = h_t = c.hidden_(*c.pre_acts(g, u, a_s, a_t, ("s", "t")))
        h_pool, z_pool = x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc)
        if a.pool is not None:  # the shared expert's h, pooled per sequence (docs/spec.md §1.3)
            B, S = a.pool.shape
            w = a.pool.to(acc).unsqueeze(1)
            h_pool = torch.bmm(w, h_s.view(B, S, -1).to(acc)).squeeze(1)
        drop_h = Dropout(h_s, a.dropout_p, down_seed(a.seed) if a.seed is not None else None, ws)
        z_s, z_t = self._down_shrink(c, drop_h, h_s, h_t)
        if a.pool is not None:
            z_pool = torch.bmm(w, z_s.view(B, S, r)).squeeze(1)
        h = h_s.lerp_(h_t, coef[:, 1:].to(dt)) if h_t is not h_s else h_s  # the mixed h, in h_s's memory
        y = F.linear(h, a.down_proj_weight, a.down_proj_bias)  # ONE base down GEMM on the mixed h
        sc = s * coef
        if c.single is not None:
            y.addmm_(torch.cat([z_s * sc[:, :1], z_t * sc[:, 1:]], 1).to(dt),
                     torch.cat([a.down_proj_shared_B, a.down_proj_task_B[c.single]], 1).t())
        else:
            y.addmm_((z_s * sc[:, :1]).to(dt), a.down_proj_shared_B.t())
            if c.dense:
                y.add_(dense_expand(a.down_proj_task_B, z_t * sc[:, 1:], c.hot))
            for e, idx in ([] if c.dense else c.groups):
                y.index_add_(0, idx, F.linear((rows(z_t, idx) * rows(sc, idx)[:, 1:]).to(dt), a.down_proj_task_B[e]))
        return y, (g if g is not None else x.new_empty((0,))), u, a_s, a_t, z_s, z_t, coef, h_pool, z_pool

    @staticmethod
    def _down_shrink(c: _Ffn, drop: Dropout, h_s: Tensor, h_t: Tensor) -> tuple[Tensor, Tensor]:
        """(z_s, z_t) = h~_e A_down,e^T [T, r] in acc (z_t 0 without a task); one scratch buffer
        holds each masked h in turn."""
        a, acc, T = c.a, c.acc, h_s.shape[0]
        A_s = a.down_proj_shared_A
        scratch = drop.into(h_s, c.ws.like(h_s) if drop.mask is not None else None)
        if c.single is not None and h_t is h_s:  # ungated: one shrink of h~ for both experts
            z = thin(scratch, torch.cat([A_s, a.down_proj_task_A[c.single]])).to(acc)
            return z[:, :c.r].clone(), z[:, c.r:].clone()
        z_s = thin(scratch, A_s).to(acc).contiguous()
        if c.single is not None:
            return z_s, thin(drop.into(h_t, scratch), a.down_proj_task_A[c.single]).to(acc).contiguous()
        if c.dense:
            return z_s, dense_shrink(a.down_proj_task_A, drop.into(h_t, scratch), c.hot)
        z_t = z_s.new_zeros((T, c.r))
        for e, idx in c.groups:
            set_rows(z_t, idx, F.linear(drop.apply(rows(h_t, idx), idx), a.down_proj_task_A[e]).to(acc))
        return z_s, z_t

    def ffn_backward(self, a: FfnBwdArgs):
        if a.task_slot is not None:
            return eager_snapshots.ffn_backward(a)
        with Workspace(a.x.device) as ws:
            return self._ffn_backward(a, ws)

    def _ffn_backward(self, a: FfnBwdArgs, ws: Workspace):
        c = _Ffn(a, ws)
        x, gy, s, dt, acc, r = a.x, a.grad_y, c.s, c.dt, c.acc, c.r
        coef, a_s, a_t, z_s, z_t = a.coef, a.a_s, a.a_t, a.z_s, a.z_t
        g, u = (a.g if c.gated_mlp else None), a.u
        sc = s * coef
        need_gate = c.moe_gated and (a.needs_gate or a.needs_dx) and c.any_task  # the logits feed dx too
        task_train = [e for e, _ in c.groups if a.trainable(e)]
        need_xd = a.needs_shared or bool(task_train)
        grads: dict = {n: None for n in FFN_GRAD_INPUTS}
        for n in grads:
            t = getattr(a, n)
            if t is not None and (("_shared_" in n and a.needs_shared) or ("_task_" in n and a.needs_task)):
                grads[n] = None if "_shared_" in n else torch.zeros_like(t)
        drop_x = Dropout(x, a.dropout_p if (need_xd or a.needs_dx) else 0.0, a.seed, ws)
        drop_h = Dropout(u, a.dropout_p, down_seed(a.seed) if a.seed is not None else None, ws)  # [T, d_ff]
        dh = torch.mm(gy, a.down_proj_weight, out=ws.like(u))  # the base dgrad of the down projection: [T, d_ff]

        # the down projection's LoRA: q = gy B_down, dz = s c q, back = dz A_down (before the mask)
        if c.single is not None:
            q = thin(gy, torch.cat([a.down_proj_shared_B, a.down_proj_task_B[c.single]], 1).t()).to(acc)
            q_s, q_t = q[:, :r], q[:, r:]
        else:
            q_s, q_t = thin(gy, a.down_proj_shared_B.t()).to(acc), torch.zeros_like(z_s)
            for e, idx in c.groups:
                set_rows(q_t, idx, (rows(gy, idx) @ a.down_proj_task_B[e]).to(acc))
        dz_s, dz_t = sc[:, :1] * q_s, sc[:, 1:] * q_t  # dL/dz of each expert
        if a.pool is not None and a.grad_z_pool is not None:  # the pooled outputs' gradients reach every token
            dz_s = dz_s + _unpool(a.pool, a.grad_z_pool, acc)
        back_s, back_t = self._down_back(c, dz_s, dz_t)

        dg = du = None
        gbeta = None
        if c.moe_gated:
            dh_s = drop_h.apply_(back_s).addcmul_(dh, coef[:, :1].to(dt))  # c_s dh + the down LoRA's term
            if a.pool is not None and a.grad_h_pool is not None:
                dh_s.add_(_unpool(a.pool, a.grad_h_pool, acc).to(dt))
            need_h_s = need_gate or a.needs_shared
            h_s, dpg_s, dpu_s = c.backprop_(*c.pre_acts(g, u, a_s, a_t, ("s",)), dh_s, need_h_s)
            h_t = dpg_t = dpu_t = None
            if c.any_task:
                dh_t = drop_h.apply_(back_t).addcmul_(dh, coef[:, 1:].to(dt))
                h_t, dpg_t, dpu_t = c.backprop_(*c.pre_acts(g, u, a_s, a_t, ("t",)), dh_t, need_gate or bool(task_train))
            if need_gate:  # dL/dc_e = <gy, FFN_e(x)> (the down bias cancels in the softmax backward)
                prod = ws.like(dh)  # <dh, h_e> per token through one scratch buffer
                gbeta = torch.stack([torch.mul(dh, he, out=prod).sum(1, dtype=acc) + s * (qe * ze).sum(1)
                                     for he, qe, ze in ((h_s, q_s, z_s), (h_t, q_t, z_t))], 1)
        else:
            back = back_s if back_t is None else back_s.add_(back_t)
            h_s, dpg_s, dpu_s = c.backprop_(*c.pre_acts(g, u, a_s, a_t, ("s", "t")), drop_h.apply_(back).add_(dh),
                                            a.needs_shared or bool(task_train))
            h_t, dpg_t, dpu_t = h_s, dpg_s, dpu_s

        lora_in = self._lora_grads(c, grads, drop_x, drop_h, x, gy, (dpg_s, dpu_s, h_s, dz_s),
                                   (dpg_t, dpu_t, h_t, dz_t), task_train)
        dg, du = dpg_s, dpu_s
        if c.moe_gated and dpu_t is not None:  # both evaluations' pre-activation gradients (after their LoRA use)
            du = du.add_(dpu_t)
            dg = dg.add_(dpg_t) if dg is not None else None
        dx = dmoe = None
        if a.needs_dx:
            dx = du @ a.up_proj_weight
            if c.gated_mlp:
                dx.addmm_(dg, a.gate_proj_weight)
            if lora_in is not None:
                dx.add_(drop_x.apply_(lora_in))
        if need_gate:
            dlog = gate_logit_grad(coef, gbeta, a.token_task, a.single_task).to(dt)
            if a.needs_gate:
                dmoe = wgrad(dlog, x)
            if a.needs_dx:
                dx.addmm_(dlog, a.moe_gate)
        elif c.moe_gated and a.needs_gate:
            dmoe = torch.zeros_like(a.moe_gate)
        grads["x"], grads["moe_gate"] = dx, dmoe
        return tuple(grads[n] for n in FFN_GRAD_INPUTS)

    @staticmethod
    def _down_back(c: _Ffn, dz_s: Tensor, dz_t: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(dz_s A_down,s, dz_t A_down,t), [T, d_ff] each (the second None without a task;
        ungated and one task: their sum in one GEMM, the second None)."""
        a, dt = c.a, c.dt
        A_s = a.down_proj_shared_A

        def mm(left: Tensor, right: Tensor) -> Tensor:
            return torch.mm(left.to(dt), right, out=c.ws.empty((left.shape[0], right.shape[1]), dt))

        if not c.any_task:
            return mm(dz_s, A_s), None
        if c.single is not None:
            A_t = a.down_proj_task_A[c.single]
            if not c.moe_gated:
                return mm(torch.cat([dz_s, dz_t], 1), torch.cat([A_s, A_t])), None
            return mm(dz_s, A_s), mm(dz_t, A_t)
        back_t = c.ws.empty((dz_s.shape[0], A_s.shape[1]), dt).zero_()
        for e, idx in c.groups:
            set_rows(back_t, idx, rows(dz_t, idx).to(dt) @ a.down_proj_task_A[e])
        return mm(dz_s, A_s), back_t

    @staticmethod
    def _lora_grads(c: _Ffn, grads: dict, drop_x: Dropout, drop_h: Dropout, x: Tensor, gy: Tensor,
                    shared: tuple, task: tuple, task_train: list) -> Optional[Tensor]:
        """The LoRA weight gradients of the trained experts (into ``grads``) and, when dx is needed,
        the LoRA path's dL/dx~ [T, d] before the mask (None when no dx)."""
        a, s, dt, r = c.a, c.s, c.dt, c.r
        xd = drop_x.into(x, c.ws.like(x) if drop_x.mask is not None else None) if (a.needs_shared or task_train) else None
        lora_in = None
        scratch: list = [c.ws.like(a.u) if drop_h.mask is not None else None]  # each full-batch masked h in turn

        def expert(e: Optional[int], idx: Optional[Tensor], dpg, dpu, h, dz, trains: bool) -> None:
            nonlocal lora_in
            if not (a.needs_dx or trains):
                return
            a_rows = rows(a.a_s if e is None else a.a_t, idx)
            d_a = ([thin(dpg, c.B("gate_proj", e).t())] if c.gated_mlp else []) + [thin(dpu, c.B("up_proj", e).t())]
            d_a = s * torch.cat(d_a, 1).to(c.acc)  # dL/da (a = x~ A^T): [n, n_pre r]
            if a.needs_dx:
                da, A = d_a.to(dt), c.A_cat(e)
                if lora_in is None and idx is None:
                    lora_in = torch.mm(da, A, out=c.ws.like(x))
                elif idx is None:
                    lora_in.addmm_(da, A)
                else:
                    if lora_in is None:
                        lora_in = c.ws.like(x).zero_()
                    lora_in.index_add_(0, idx, da @ A)
            if not trains:
                return
            key = "shared" if e is None else "task"
            out = {}
            dA = wgrad(d_a.to(dt), rows(xd, idx))  # [n_pre r, d]
            for i, p in enumerate(c.pre):
                out[f"{p}_A"] = dA[i * r:(i + 1) * r] if len(c.pre) == 1 else dA[i * r:(i + 1) * r].clone()
                dp = dpg if p == "gate_proj" else dpu
                out[f"{p}_B"] = wgrad_t(dp, (s * a_rows[:, i * r:(i + 1) * r]).to(dt))
            if idx is None:
                scratch[0] = hm = drop_h.into(h, scratch[0])
            else:
                hm = drop_h.apply(rows(h, idx), idx)
            out["down_proj_A"] = wgrad(rows(dz, idx).to(dt), hm)
            col = 0 if e is None else 1
            out["down_proj_B"] = wgrad_t(rows(gy, idx), (rows(a.z_s if e is None else a.z_t, idx)
                                                         * (s * rows(a.coef, idx)[:, col:col + 1])).to(dt))
            for k, v in out.items():
                p, part = k.rsplit("_", 1)
                name = f"{p}_{key}_{part}"
                if e is None:
                    grads[name] = v if grads[name] is None else grads[name].add_(v)
                else:
                    grads[name][e].add_(v)

        dpg_s, dpu_s, h_s, dz_s = shared
        dpg_t, dpu_t, h_t, dz_t = task
        expert(None, None, dpg_s, dpu_s, h_s, dz_s, a.needs_shared)
        for e, idx in c.groups:  # ungated: one FFN, the routed expert's dpg/dpu are the shared expert's tensors
            expert(e, idx, rows(dpg_t, idx), rows(dpu_t, idx), h_t, dz_t, a.trainable(e))
        return lora_in


def _unpool(pool: Tensor, grad: Tensor, acc: torch.dtype) -> Tensor:
    """The gradient of a pooled output [B, n] on every token: pool[b, s] * grad[b], [B * S, n]."""
    return (pool.to(acc).unsqueeze(2) * grad.to(acc).unsqueeze(1)).flatten(0, 1)
