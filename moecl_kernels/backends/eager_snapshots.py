"""The eager backend's path for calls in which frozen tasks' tokens take part (``mk.freeze_task``;
the semantics are in ``contract.args`` and ``contract.ffn_args``), both levels.

The tokens are taken in their routing groups (one group per task present, then the tokens
without a task, ``expert_groups``): every token of a group uses the same task expert and the
same shared expert and gate (the live ones, or its task's snapshot slot), so each group is a
few dense GEMMs on its rows -- one call for the whole mixed batch, no per-token gathers. The
dropout masks are those of the whole call (built once, rows taken per group), so every token
sees exactly the mask the other paths give it.

The backward recomputes the forward of the groups under autograd and differentiates it (the
live parameters are its leaves; the snapshots are constants and get nothing): the plainest
correct backward, at about twice a forward's cost. Calls without a frozen task's token never
come here (``ops.snapshots`` drops the snapshot fields), so training the live task costs
nothing extra.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..contract import SINGLE_NONE, acc_dtype, host_offsets
from ..contract.activations import activation as _act
from ..contract.ffn_args import FFN_GRAD_INPUTS, PROJECTIONS, down_seed, ffn_grad_flag
from ..contract.ffn_reference import differentiated_outputs
from ..contract.reference import _autograd_enabled, leaf_grads
from .eager_parts import Dropout, expert_groups, rows


def groups(a, num_experts: int) -> list[tuple[int, int, Optional[Tensor]]]:
    """(task, snapshot slot, token index or None = all tokens) of every routing group with tokens;
    task -1 (no task) always uses the live shared expert and gate (slot -1)."""
    slots = [int(v) for v in a.task_slot_cpu.tolist()]
    out = [(e, slots[e], idx) for e, idx in expert_groups(a, num_experts)]
    if a.single_task == SINGLE_NONE:
        out.append((-1, -1, None))
    elif a.single_task < 0:
        off = host_offsets(a)
        if a.x.shape[0] > off[num_experts]:
            out.append((-1, -1, a.sorted_idx[off[num_experts]:].long()))
    return out


def _coef(x: Tensor, gate: Optional[Tensor], has_task: bool, acc: torch.dtype) -> Tensor:
    """coef [n, 2] of a group's rows (``contract.args``)."""
    n = x.shape[0]
    if not has_task:
        return torch.cat([x.new_ones((n, 1), dtype=acc), x.new_zeros((n, 1), dtype=acc)], 1)
    if gate is None:
        return x.new_ones((n, 2), dtype=acc)
    return torch.softmax(F.linear(x, gate).to(acc), dim=-1)


def _place(out: Tensor, idx: Optional[Tensor], value: Tensor) -> Tensor:
    """``out`` with rows ``idx`` (all: None) replaced by ``value``, out of place (autograd-safe)."""
    return value if idx is None else out.index_copy(0, idx, value)


# --------------------------------------------------------------------------- the linear op
_LINEAR_LEAVES = (("x", "needs_dx"), ("shared_A", "needs_shared"), ("shared_B", "needs_shared"),
                  ("task_A", "needs_task"), ("task_B", "needs_task"), ("gate_weight", "needs_gate"))


def _linear(a, p: dict) -> tuple:
    """(y, h_s, h_t, coef) of the linear op for the tensors ``p`` (``a``'s, or autograd leaves)."""
    x = p["x"]
    dt, acc, s = x.dtype, acc_dtype(x.dtype), a.scale
    T, r = x.shape[0], a.shared_A.shape[0]
    xd = Dropout(x, a.dropout_p, a.seed).apply(x)
    y = F.linear(x, a.weight, a.bias)
    h_s, h_t, coef = x.new_zeros((T, r), dtype=acc), x.new_zeros((T, r), dtype=acc), x.new_zeros((T, 2), dtype=acc)
    for e, f, idx in groups(a, a.task_A.shape[0]):
        xs, xds = rows(x, idx), rows(xd, idx)
        As, Bs, G = (p["shared_A"], p["shared_B"], p["gate_weight"]) if f < 0 else \
            (a.snap_shared_A[f], a.snap_shared_B[f], a.snap_gate[f] if a.snap_gate is not None else None)
        c = _coef(xs, G, e >= 0, acc)
        hs = F.linear(xds, As).to(acc)
        part = F.linear((hs * (s * c[:, :1])).to(dt), Bs)
        h_s, coef = _place(h_s, idx, hs.detach()), _place(coef, idx, c.detach())
        if e >= 0:
            ht = F.linear(xds, p["task_A"][e]).to(acc)
            part = part + F.linear((ht * (s * c[:, 1:])).to(dt), p["task_B"][e])
            h_t = _place(h_t, idx, ht.detach())
        y = y.index_add(0, idx, part) if idx is not None else y + part
    return y, h_s, h_t, coef


def linear_forward(a) -> tuple:
    with torch.no_grad():
        return _linear(a, {n: getattr(a, n) for n, _ in _LINEAR_LEAVES})


def linear_backward(a) -> tuple:
    with _autograd_enabled():
        p = {n: getattr(a, n) for n, _ in _LINEAR_LEAVES}
        leaves = {n: p[n].detach().requires_grad_(True) for n, flag in _LINEAR_LEAVES
                  if p[n] is not None and getattr(a, flag)}
        p.update(leaves)
        y = _linear(a, p)[0]
        return leaf_grads(leaves, [y], [a.grad_y], tuple(n for n, _ in _LINEAR_LEAVES), a.expert_trainable)


# --------------------------------------------------------------------------- the FFN op
def _ffn(a, p: dict) -> dict:
    """y, the saved tensors and the pooled outputs of the FFN op for the tensors ``p``."""
    x = p["x"]
    dt, acc, s = x.dtype, acc_dtype(x.dtype), a.scale
    T, r, gated = x.shape[0], a.rank, a.gated_mlp
    projs = ("gate_proj", "up_proj") if gated else ("up_proj",)
    xd = Dropout(x, a.dropout_p, a.seed).apply(x)
    d_ff = a.up_proj_weight.shape[0]
    mask_h = Dropout(x.new_empty((T, d_ff)), a.dropout_p, down_seed(a.seed) if a.seed is not None else None)
    g = F.linear(x, a.gate_proj_weight, a.gate_proj_bias) if gated else None
    u = F.linear(x, a.up_proj_weight, a.up_proj_bias)
    y = x.new_zeros((T, a.down_proj_weight.shape[0]))
    n_pre = len(projs)
    saved = {"a_s": x.new_zeros((T, n_pre * r), dtype=acc), "a_t": x.new_zeros((T, n_pre * r), dtype=acc),
             "z_s": x.new_zeros((T, r), dtype=acc), "z_t": x.new_zeros((T, r), dtype=acc),
             "coef": x.new_zeros((T, 2), dtype=acc)}
    pooled = {"h": x.new_zeros((T, d_ff)), "z": x.new_zeros((T, r))} if a.pool is not None else None
    for e, f, idx in groups(a, a.num_experts):
        xs, xds, mh = rows(x, idx), rows(xd, idx), (rows(mask_h.mask, idx) if mask_h.mask is not None else None)
        shared = {pj: (p[f"{pj}_shared_A"], p[f"{pj}_shared_B"]) if f < 0 else
                  tuple(t[f] for t in a.snapshots(pj)) for pj in PROJECTIONS if p.get(f"{pj}_shared_A") is not None}
        task = {pj: (p[f"{pj}_task_A"][e], p[f"{pj}_task_B"][e]) for pj in shared} if e >= 0 else {}
        G = p["moe_gate"] if f < 0 else (a.snap_gate[f] if a.snap_gate is not None else None)
        c = _coef(xs, G, e >= 0, acc)

        def lora(z, zd, pj, experts):
            out = z
            for ex in experts:
                A, B = ex[pj]
                out = out + s * F.linear(F.linear(zd, A), B)
            return out

        def mlp(experts):
            pu = lora(rows(u, idx), xds, "up_proj", experts)
            h = _act(a.activation, lora(rows(g, idx), xds, "gate_proj", experts)) * pu if gated else \
                _act(a.activation, pu)
            hd = h * mh if mh is not None else h
            return lora(F.linear(h, a.down_proj_weight, a.down_proj_bias), hd, "down_proj", experts), h, hd

        def shrink(zd, pj, ex):
            return F.linear(zd, ex[pj][0]).to(acc).detach()

        if a.moe_gate is not None and e >= 0:
            (y_s, h_s, hd_s), (y_t, _, hd_t) = mlp([shared]), mlp([task])
            part = c[:, :1].to(dt) * y_s + c[:, 1:].to(dt) * y_t
        else:
            part, h_s, hd_s = mlp([shared, task] if e >= 0 else [shared])
            hd_t = hd_s
        y = _place(y, idx, part)
        saved["coef"] = _place(saved["coef"], idx, c.detach())
        saved["a_s"] = _place(saved["a_s"], idx, torch.cat([shrink(xds, pj, shared) for pj in projs], 1))
        saved["z_s"] = _place(saved["z_s"], idx, shrink(hd_s, "down_proj", shared))
        if e >= 0:
            saved["a_t"] = _place(saved["a_t"], idx, torch.cat([shrink(xds, pj, task) for pj in projs], 1))
            saved["z_t"] = _place(saved["z_t"], idx, shrink(hd_t, "down_proj", task))
        if pooled is not None:  # FFN_s's h and z of these rows, differentiable
            pooled["h"] = _place(pooled["h"], idx, h_s)
            pooled["z"] = _place(pooled["z"], idx, F.linear(hd_s, shared["down_proj"][0]))
    out = dict(y=y, g=g if gated else x.new_empty((0,)), u=u, **saved,
               h_pool=x.new_empty((0,), dtype=acc), z_pool=x.new_empty((0,), dtype=acc))
    if a.pool is not None:
        B, S = a.pool.shape
        w = a.pool.to(dt)
        out["h_pool"] = torch.einsum("bs,bsf->bf", w, pooled["h"].view(B, S, -1)).to(acc)
        out["z_pool"] = torch.einsum("bs,bsr->br", w, pooled["z"].view(B, S, -1)).to(acc)
    return out


_FFN_OUTPUTS = ("y", "g", "u", "a_s", "a_t", "z_s", "z_t", "coef", "h_pool", "z_pool")


def _ffn_tensors(a) -> dict:
    return {n: getattr(a, n) for n in FFN_GRAD_INPUTS}


def ffn_forward(a) -> tuple:
    with torch.no_grad():
        out = _ffn(a, _ffn_tensors(a))
    return tuple(out[n] for n in _FFN_OUTPUTS)


def ffn_backward(a) -> tuple:
    with _autograd_enabled():
        p = _ffn_tensors(a)
        leaves = {n: t.detach().requires_grad_(True) for n, t in p.items()
                  if t is not None and getattr(a, ffn_grad_flag(n))}
        p.update(leaves)
        out = _ffn(a, p)
        outs, grads_out = differentiated_outputs(a, out)
        return leaf_grads(leaves, outs, grads_out, FFN_GRAD_INPUTS, a.expert_trainable)


__all__ = ["groups", "linear_forward", "linear_backward", "ffn_forward", "ffn_backward"]
