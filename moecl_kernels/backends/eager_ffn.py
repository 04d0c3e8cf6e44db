"""The eager PyTorch implementation of the FFN-level op (docs/spec.md §1.3), the baseline the
FFN kernels are measured against and the reference for the rest.

Forward: the base gate/up GEMMs once; the rank-r shrinks of x~ (both projections of an expert in
one GEMM); per expert its rank-r terms added to g and u, h_e = act(pg_e) * pu_e (the routed
expert per task group, as the linear eager backend does), the mixed h; ONE base down GEMM on h;
the down LoRA terms from rank-r shrinks of h~_s and h~_t. Saved: g, u and rank-r factors only.

Backward (explicit): recomputes h_e from the saved g, u and rank-r factors, runs the base dgrad
GEMMs (gy W_down, then dg W_gate + du W_up) once, and the LoRA, gate and pooled-output terms
from rank-r shrinks and expands. Frozen experts' weight gradients cost no compute.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..contract import SINGLE_NONE, acc_dtype, coefficients, dropout_scale, host_offsets
from ..contract.activations import activation, activation_grad
from ..contract.ffn_args import FFN_GRAD_INPUTS, FfnBwdArgs, FfnFwdArgs, down_seed


def expert_groups(a, num_experts: int) -> list[tuple[int, Optional[Tensor]]]:
    """(expert, token index or None = all tokens) for every expert with tokens (routing fields of ``a``)."""
    if a.single_task >= 0:
        return [(a.single_task, None)]
    if a.single_task == SINGLE_NONE:
        return []
    off = host_offsets(a)
    return [(e, a.sorted_idx[off[e]: off[e + 1]].long()) for e in range(num_experts) if off[e + 1] > off[e]]


def _rows(t: Optional[Tensor], idx: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or idx is None else t.index_select(0, idx)


def _add_rows(out: Tensor, idx: Optional[Tensor], value: Tensor) -> None:
    if idx is None:
        out.add_(value)
    else:
        out.index_add_(0, idx, value)


def _set_rows(out: Tensor, idx: Optional[Tensor], value: Tensor) -> None:
    if idx is None:
        out.copy_(value)
    else:
        out.index_copy_(0, idx, value)


class _Ffn:
    """Per-call constants of the op: which projections carry LoRA before the activation, the
    experts' weights by projection, the masks and the rank."""

    def __init__(self, a: FfnFwdArgs) -> None:
        self.a = a
        self.dt = a.x.dtype
        self.acc = acc_dtype(self.dt)
        self.s = a.scale
        self.r = a.rank
        self.E = a.num_experts
        self.gated_mlp = a.gated_mlp
        self.pre = ("gate_proj", "up_proj") if self.gated_mlp else ("up_proj",)
        self.moe_gated = a.moe_gate is not None
        self.groups = expert_groups(a, self.E)

    def A_cat(self, e: Optional[int]) -> Tensor:
        """The pre-activation projections' A matrices of expert e (None = shared), stacked [n r, d]."""
        a = self.a
        if e is None:
            return torch.cat([getattr(a, f"{p}_shared_A") for p in self.pre])
        return torch.cat([getattr(a, f"{p}_task_A")[e] for p in self.pre])

    def B(self, proj: str, e: Optional[int]) -> Tensor:
        return getattr(self.a, f"{proj}_shared_B") if e is None else getattr(self.a, f"{proj}_task_B")[e]

    def lora_terms(self, e: Optional[int], a_rows: Tensor) -> tuple[Optional[Tensor], Tensor]:
        """s a B^T of expert e (None = shared) for the gate and up projections (gate: None for a plain MLP)."""
        sa = (self.s * a_rows).to(self.dt)
        t_g = F.linear(sa[:, :self.r], self.B("gate_proj", e)) if self.gated_mlp else None
        return t_g, F.linear(sa[:, -self.r:], self.B("up_proj", e))

    def shared_pre_acts(self, g: Optional[Tensor], u: Tensor, a_s: Tensor) -> tuple[Optional[Tensor], Tensor]:
        """(pg_s, pu_s): the base pre-activations plus the shared expert's s a B^T (gate: None for a plain MLP)."""
        sa = (self.s * a_s).to(self.dt)
        pg = torch.addmm(g, sa[:, :self.r], self.B("gate_proj", None).t()) if self.gated_mlp else None
        return pg, torch.addmm(u, sa[:, -self.r:], self.B("up_proj", None).t())

    def task_terms(self, a_t: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """s a_t B_t^T of every token's routed expert for the gate and up projections, [T, d_ff]
        each (0 for tokens without a task; None when no token has one). The routed expert's
        evaluation then runs over all tokens at once, laid out like the shared one, so that with
        B = 0 both are bitwise the base MLP's (elementwise kernels may round a row subset
        differently)."""
        if not self.groups:
            return None, None
        out = [None, None]
        for e, idx in self.groups:
            for i, term in enumerate(self.lora_terms(e, _rows(a_t, idx))):
                if term is None:
                    continue
                if idx is None:
                    out[i] = term
                    continue
                if out[i] is None:
                    out[i] = term.new_zeros((a_t.shape[0], term.shape[1]))
                out[i].index_copy_(0, idx, term)
        return out[0], out[1]

    def hidden(self, pg: Optional[Tensor], pu: Tensor, need_grad: bool = False):
        """h = act(pg) * pu (plain MLP: act(pu)); with ``need_grad`` also (act, act') of the activation's input."""
        kind = self.a.activation
        z = pg if self.gated_mlp else pu
        act = activation(kind, z)
        h = act * pu if self.gated_mlp else act
        return (h, act, activation_grad(kind, z)) if need_grad else h

    def down_mask(self, like: Tensor) -> Optional[Tensor]:
        a = self.a
        return dropout_scale(like, a.dropout_p, down_seed(a.seed)) if a.dropout_p > 0.0 else None


class EagerFFN:
    """``ffn_forward`` / ``ffn_backward`` of the eager backend (mixed into ``EagerBackend``)."""

    def ffn_forward(self, a: FfnFwdArgs):
        c = _Ffn(a)
        x, s, dt, acc, r = a.x, c.s, c.dt, c.acc, c.r
        T = x.shape[0]
        g = F.linear(x, a.gate_proj_weight, a.gate_proj_bias) if c.gated_mlp else x.new_empty((0,))
        u = F.linear(x, a.up_proj_weight, a.up_proj_bias)
        coef = coefficients(x, a.moe_gate, a.token_task)
        xd = _masked(x, dropout_scale(x, a.dropout_p, a.seed) if a.dropout_p > 0.0 else None)
        a_s = F.linear(xd, c.A_cat(None)).to(acc)  # both pre-activation projections in one GEMM
        a_t = torch.zeros(T, len(c.pre) * r, device=x.device, dtype=acc)
        for e, idx in c.groups:
            _set_rows(a_t, idx, F.linear(_rows(xd, idx), c.A_cat(e)).to(acc))
        gg = g if c.gated_mlp else None
        pg_s, pu_s = c.shared_pre_acts(gg, u, a_s)
        t_g, t_u = c.task_terms(a_t)
        if c.moe_gated:  # two FFN evaluations mixed by the gate: h = h_s + c_t (h_t - h_s)
            h_s, h_t = c.hidden(pg_s, pu_s), c.hidden(_plus(gg, t_g), _plus(u, t_u))
            h = h_s + coef[:, 1:].to(dt) * (h_t - h_s)
        else:  # one FFN carrying both experts' LoRA terms (what three ungated linears compute)
            h = h_s = h_t = c.hidden(_plus(pg_s, t_g), _plus(pu_s, t_u))
        mask = c.down_mask(h_s)
        z_s = F.linear(_masked(h_s, mask), a.down_proj_shared_A).to(acc)
        z_t = torch.zeros(T, r, device=x.device, dtype=acc)
        for e, idx in c.groups:
            _set_rows(z_t, idx, F.linear(_masked(_rows(h_t, idx), _rows(mask, idx)), a.down_proj_task_A[e]).to(acc))
        y = F.linear(h, a.down_proj_weight, a.down_proj_bias)  # ONE base down GEMM on the mixed h
        y.addmm_((z_s * (s * coef[:, :1])).to(dt), a.down_proj_shared_B.t())
        for e, idx in c.groups:
            _add_rows(y, idx, F.linear((_rows(z_t, idx) * (s * _rows(coef, idx)[:, 1:])).to(dt), a.down_proj_task_B[e]))
        h_pool, z_pool = x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc)
        if a.pool is not None:  # the shared expert's h and z, pooled per sequence (docs/spec.md §1.3)
            B, S = a.pool.shape
            w = a.pool.to(acc).unsqueeze(1)
            h_pool = torch.bmm(w, h_s.view(B, S, -1).to(acc)).squeeze(1)
            z_pool = torch.bmm(w, z_s.view(B, S, r)).squeeze(1)
        return y, g, u, a_s, a_t, z_s, z_t, coef, h_pool, z_pool

    def ffn_backward(self, a: FfnBwdArgs):
        c = _Ffn(a)
        x, gy, s, dt, acc, r = a.x, a.grad_y, c.s, c.dt, c.acc, c.r
        coef, a_s, a_t, z_s, z_t = a.coef, a.a_s, a.a_t, a.z_s, a.z_t
        g, u = (a.g if c.gated_mlp else None), a.u
        need_gate = c.moe_gated and (a.needs_gate or a.needs_dx)  # the logits feed dx too
        need_xd = a.needs_shared or any(a.trainable(e) for e, _ in c.groups)
        grads: dict = {n: None for n in FFN_GRAD_INPUTS}
        for n in grads:
            t = getattr(a, n)
            if t is not None and (("_shared_" in n and a.needs_shared) or ("_task_" in n and a.needs_task)):
                grads[n] = torch.zeros_like(t)
        xmask = dropout_scale(x, a.dropout_p, a.seed) if a.dropout_p > 0.0 and (need_xd or a.needs_dx) else None
        xd = _masked(x, xmask) if need_xd else None
        dh = F.linear(gy, a.down_proj_weight.t())  # the base dgrad of the down projection: [T, d_ff]
        q_s = F.linear(gy, a.down_proj_shared_B.t()).to(acc)  # gy B_down: [T, r]
        q_t = torch.zeros_like(q_s)
        for e, idx in c.groups:
            _set_rows(q_t, idx, F.linear(_rows(gy, idx), a.down_proj_task_B[e].t()).to(acc))
        dz_s, dz_t = s * coef[:, :1] * q_s, s * coef[:, 1:] * q_t  # dL/dz of each expert
        if a.pool is not None and a.grad_z_pool is not None:  # the pooled outputs' gradients reach every token
            dz_s = dz_s + _unpool(a.pool, a.grad_z_pool, acc)
        back_s = F.linear(dz_s.to(dt), a.down_proj_shared_A.t())  # dz A_down: [T, d_ff]
        back_t = torch.zeros_like(back_s)
        for e, idx in c.groups:
            _set_rows(back_t, idx, F.linear(_rows(dz_t, idx).to(dt), a.down_proj_task_A[e].t()))

        pg_s, pu_s = c.shared_pre_acts(g, u, a_s)
        t_g, t_u = c.task_terms(a_t)
        dg = torch.zeros_like(dh) if c.gated_mlp else None
        du = torch.zeros_like(dh)

        def backprop(pg, pu, dh_e):
            """(h, dpg, dpu) of one FFN evaluation (recomputed) from dL/dh; added into dg, du."""
            h, act, dact = c.hidden(pg, pu, need_grad=True)
            dpg = dh_e * pu * dact if c.gated_mlp else None
            dpu = dh_e * act if c.gated_mlp else dh_e * dact
            if c.gated_mlp:
                dg.add_(dpg)
            du.add_(dpu)
            return h, dpg, dpu

        gbeta = None
        if c.moe_gated:
            mask = c.down_mask(dh)
            dh_s = coef[:, :1].to(dt) * dh + _masked(back_s, mask)
            if a.pool is not None and a.grad_h_pool is not None:
                dh_s = dh_s + _unpool(a.pool, a.grad_h_pool, acc).to(dt)
            h_s, dpg_s, dpu_s = backprop(pg_s, pu_s, dh_s)
            h_t, dpg_t, dpu_t = backprop(_plus(g, t_g), _plus(u, t_u), coef[:, 1:].to(dt) * dh + _masked(back_t, mask))
            if need_gate:  # dL/dc_e = <gy, FFN_e(x)> (the down bias cancels in the softmax backward)
                gbeta = torch.stack([(dh * h).sum(1).to(acc) + s * (q * z).sum(1)
                                     for h, q, z in ((h_s, q_s, z_s), (h_t, q_t, z_t))], 1)
        else:
            mask = c.down_mask(dh)
            h_s, dpg_s, dpu_s = backprop(_plus(pg_s, t_g), _plus(pu_s, t_u), dh + _masked(back_s + back_t, mask))
            h_t, dpg_t, dpu_t = h_s, dpg_s, dpu_s

        da_s, da_t = torch.zeros_like(a_s), torch.zeros_like(a_t)

        def lora_grads(e, idx, dpg, dpu, h, mask_rows, dz):
            """Through expert e's (None = shared) LoRA terms on tokens ``idx``: da, and its weight
            gradients if it trains (frozen experts cost nothing here)."""
            d_a = [F.linear(dpg, c.B("gate_proj", e).t())] if c.gated_mlp else []
            d_a = s * torch.cat(d_a + [F.linear(dpu, c.B("up_proj", e).t())], 1).to(acc)
            _set_rows(da_s if e is None else da_t, idx, d_a)
            if not (a.needs_shared if e is None else a.trainable(e)):
                return
            a_rows, z_rows = _rows(a_s if e is None else a_t, idx), _rows(z_s if e is None else z_t, idx)
            col = 0 if e is None else 1
            c_rows = _rows(coef, idx)[:, col:col + 1]
            dA = F.linear(d_a.to(dt).t(), _rows(xd, idx).t())  # [nproj r, d]
            out = {}
            for i, p in enumerate(c.pre):
                out[f"{p}_A"] = dA[i * r:(i + 1) * r]
                dp = dpg if p == "gate_proj" else dpu
                out[f"{p}_B"] = F.linear(dp.t(), (s * a_rows[:, i * r:(i + 1) * r]).to(dt).t())
            out["down_proj_A"] = F.linear(dz.to(dt).t(), _masked(h, mask_rows).t())
            out["down_proj_B"] = F.linear(_rows(gy, idx).t(), (z_rows * (s * c_rows)).to(dt).t())
            for key, val in out.items():
                p, part = key.rsplit("_", 1)
                target = grads[f"{p}_{'shared' if e is None else 'task'}_{part}"]
                (target if e is None else target[e]).add_(val)

        lora_grads(None, None, dpg_s, dpu_s, h_s, mask, dz_s)
        for e, idx in c.groups:
            lora_grads(e, idx, _rows(dpg_t, idx), _rows(dpu_t, idx), _rows(h_t, idx), _rows(mask, idx), _rows(dz_t, idx))

        dx = dmoe = None
        if a.needs_dx:
            dx = F.linear(du, a.up_proj_weight.t())
            if c.gated_mlp:
                dx.addmm_(dg, a.gate_proj_weight)
            lora_in = F.linear(da_s.to(dt), c.A_cat(None).t())
            for e, idx in c.groups:
                _add_rows(lora_in, idx, F.linear(_rows(da_t, idx).to(dt), c.A_cat(e).t()))
            dx.add_(_masked(lora_in, xmask))
        if need_gate:
            has = (a.token_task >= 0).unsqueeze(1)
            dlog = coef * (gbeta - (coef * gbeta).sum(1, keepdim=True))
            dlog = torch.where(has, dlog, torch.zeros_like(dlog))
            if a.needs_gate:
                dmoe = dlog.to(dt).t() @ x
            if a.needs_dx:
                dx.add_(F.linear(dlog.to(dt), a.moe_gate.t()))
        grads["x"], grads["moe_gate"] = dx, dmoe
        return tuple(grads[n] for n in FFN_GRAD_INPUTS)


def _plus(t: Optional[Tensor], term: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or term is None else t + term


def _unpool(pool: Tensor, grad: Tensor, acc: torch.dtype) -> Tensor:
    """The gradient of a pooled output [B, n] on every token: pool[b, s] * grad[b], [B * S, n]."""
    return (pool.to(acc).unsqueeze(2) * grad.to(acc).unsqueeze(1)).flatten(0, 1)


def _masked(t: Optional[Tensor], mask: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or mask is None else t * mask
