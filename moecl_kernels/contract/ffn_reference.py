"""The reference of the FFN-level op (docs/spec.md §1.3): two whole FFN evaluations per token
mixed by the gate -- the plainest formula, the float64 oracle of every FFN test -- and the
``reference`` backend's FFN methods built on it.

Per-token gathers of the routed experts ([T, r, d_ff] and more: tests and small shapes only),
differentiable through autograd, which is the reference backend's backward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .activations import activation as _act
from .args import acc_dtype, coefficients
from .dropout import apply_dropout_reference as apply_dropout
from .ffn_args import (FFN_GRAD_INPUTS, FFN_POOLED, FFN_SAVED, FFN_SNAPSHOTS, LORA_PARTS, PROJECTIONS, FfnBwdArgs, FfnFwdArgs, down_seed,
                       ffn_grad_flag)
from .reference import _autograd_enabled, leaf_grads, per_token, token_slots


def moe_lora_mlp_reference(
    x: Tensor, *, gate_proj_weight: Optional[Tensor] = None, gate_proj_bias: Optional[Tensor] = None,
    up_proj_weight: Tensor, up_proj_bias: Optional[Tensor] = None, down_proj_weight: Tensor,
    down_proj_bias: Optional[Tensor] = None, moe_gate: Optional[Tensor] = None, token_task: Tensor,
    activation: str, scale: float, dropout_p: float = 0.0, seed=0, pool: Optional[Tensor] = None,
    parts: bool = False, task_slot: Optional[Tensor] = None, **lora: Optional[Tensor],
):
    """y [T, d_out] of the FFN-level op for x [T, d] (token_task [T], -1 = no task), computed as
    ``c_s FFN_shared(x) + c_t FFN_task(x)``, two whole MLP evaluations per token (ungated: one MLP
    carrying both experts' LoRA). ``lora``: ``<proj>_<part>`` for proj in gate_proj/up_proj/
    down_proj and part in shared_A/shared_B/task_A/task_B (the gate projection's may be None).

    ``parts=True`` returns a dict with y, the saved tensors of ``contract.ffn_args`` (in the
    accumulation dtype), ``ffn_s`` (FFN_shared(x) per token) and, with ``pool``, the pooled
    outputs. With ``task_slot`` [E] (frozen tasks, ``contract.ffn_args``): ``<proj>_snap_shared_A/B``
    and ``snap_gate`` give a frozen task's tokens their slot's shared expert and gate."""
    unknown = set(lora) - {f"{p}_{part}" for p in PROJECTIONS for part in LORA_PARTS} - set(FFN_SNAPSHOTS)
    if unknown:
        raise TypeError(f"unexpected arguments {sorted(unknown)}")
    tt = token_task.to(device=x.device, dtype=torch.long)
    has = (tt >= 0)[:, None].to(x.dtype)
    idx = tt.clamp(min=0)
    xd = apply_dropout(x, dropout_p, seed)
    base = {"gate_proj": (gate_proj_weight, gate_proj_bias), "up_proj": (up_proj_weight, up_proj_bias),
            "down_proj": (down_proj_weight, down_proj_bias)}
    if task_slot is not None:  # every token's own shared expert and gate: [T, ...] stacks
        sidx = token_slots(tt, task_slot) + 1
        for p in PROJECTIONS:
            for m in "AB":
                if lora.get(f"{p}_shared_{m}") is not None:
                    lora[f"{p}_shared_{m}"] = per_token(lora[f"{p}_shared_{m}"], lora[f"{p}_snap_shared_{m}"], sidx)
        moe_gate = per_token(moe_gate, lora["snap_gate"], sidx) if moe_gate is not None else None

    def shrink(zd: Tensor, proj: str, expert: str) -> Tensor:
        """zd A^T of the expert: [T, r] (the routed expert's gathered per token, 0 without a task)."""
        if expert == "shared":
            A = lora[f"{proj}_shared_A"]
            return torch.einsum("ti,tri->tr", zd, A) if A.dim() == 3 else zd @ A.T
        return torch.einsum("ti,tri->tr", zd, lora[f"{proj}_task_A"][idx]) * has

    def expand(a: Tensor, proj: str, expert: str) -> Tensor:
        if expert == "shared":
            B = lora[f"{proj}_shared_B"]
            return torch.einsum("tr,tor->to", a, B) if B.dim() == 3 else a @ B.T
        return torch.einsum("tr,tor->to", a, lora[f"{proj}_task_B"][idx])

    def project(z: Tensor, zd: Tensor, proj: str, experts: tuple) -> Tensor:
        w, b = base[proj]
        out = z @ w.T if b is None else z @ w.T + b
        for e in experts:
            out = out + scale * expand(shrink(zd, proj, e), proj, e)
        return out

    def ffn(experts: tuple) -> tuple[Tensor, Tensor, Tensor]:
        """(FFN(x), h, h~) of the MLP carrying ``experts``' LoRA terms."""
        up = project(x, xd, "up_proj", experts)
        h = _act(activation, up) if gate_proj_weight is None else _act(activation, project(x, xd, "gate_proj", experts)) * up
        hd = apply_dropout(h, dropout_p, down_seed(seed))
        return project(h, hd, "down_proj", experts), h, hd

    coef = coefficients(x, moe_gate, tt).to(x.dtype)
    if moe_gate is not None:
        (y_s, h_s, hd_s), (y_t, _, hd_t) = ffn(("shared",)), ffn(("task",))
        y = coef[:, :1] * y_s + coef[:, 1:] * y_t
    else:
        y, h_s, hd_s = ffn(("shared", "task"))
        y_s, hd_t = None, hd_s
    if not parts:
        return y
    projs = ("gate_proj", "up_proj") if gate_proj_weight is not None else ("up_proj",)
    acc = acc_dtype(x.dtype)
    out = dict(
        y=y, g=x @ gate_proj_weight.T + (gate_proj_bias if gate_proj_bias is not None else 0)
        if gate_proj_weight is not None else x.new_empty((0,)),
        u=x @ up_proj_weight.T + (up_proj_bias if up_proj_bias is not None else 0),
        a_s=torch.cat([shrink(xd, p, "shared") for p in projs], 1).to(acc),
        a_t=torch.cat([shrink(xd, p, "task") for p in projs], 1).to(acc),
        z_s=shrink(hd_s, "down_proj", "shared").to(acc), z_t=shrink(hd_t, "down_proj", "task").to(acc),
        coef=coef.to(acc), ffn_s=y_s,
        h_pool=x.new_empty((0,), dtype=acc), z_pool=x.new_empty((0,), dtype=acc),
    )
    if pool is not None:
        B, S = pool.shape
        w = pool.to(x.dtype)
        out["h_pool"] = torch.einsum("bs,bsf->bf", w, h_s.view(B, S, -1)).to(acc)
        out["z_pool"] = torch.einsum("bs,bsr->br", w, shrink(hd_s, "down_proj", "shared").view(B, S, -1)).to(acc)
    return out


def pooled_ffn_reference(ffn_s: Tensor, pool: Tensor) -> Tensor:
    """p_n of docs/spec.md §1.3: the pool-weighted mean over each sequence of FFN_shared(x) rows [B*S, d_out]."""
    B, S = pool.shape
    return torch.einsum("bs,bsd->bd", pool.to(ffn_s.dtype), ffn_s.view(B, S, -1))


# ---------------------------------------------------------------------------- the reference backend's FFN op
_FORMULA_FIELDS = ("gate_proj_weight", "gate_proj_bias", "up_proj_weight", "up_proj_bias", "down_proj_weight",
                   "down_proj_bias", "moe_gate", "task_slot") + tuple(f"{p}_{part}" for p in PROJECTIONS
                                                                        for part in LORA_PARTS) + FFN_SNAPSHOTS


def _call(a: FfnFwdArgs, **tensors) -> dict:
    kw = {n: getattr(a, n) for n in ("x",) + _FORMULA_FIELDS}
    kw.update(tensors)
    return moe_lora_mlp_reference(token_task=a.token_task, activation=a.activation, scale=a.scale,
                                  dropout_p=a.dropout_p, seed=a.seed if a.seed is not None else 0, pool=a.pool,
                                  parts=True, **kw)


def reference_ffn_forward(a: FfnFwdArgs) -> tuple:
    out = _call(a)
    return (out["y"],) + tuple(out[n] for n in FFN_SAVED + FFN_POOLED)


def differentiated_outputs(a: FfnBwdArgs, out: dict) -> tuple[list, list]:
    """(outputs, their incoming gradients) of an FFN evaluation ``out``: y, and the pooled outputs
    where the op pooled and they got a gradient."""
    outs, grads_out = [out["y"]], [a.grad_y]
    for name, g in (("h_pool", a.grad_h_pool), ("z_pool", a.grad_z_pool)):
        if g is not None and a.pool is not None:
            outs.append(out[name])
            grads_out.append(g)
    return outs, grads_out


def reference_ffn_backward(a: FfnBwdArgs) -> tuple:
    with _autograd_enabled():
        want = {n: getattr(a, n) is not None and getattr(a, ffn_grad_flag(n)) for n in FFN_GRAD_INPUTS}
        if a.moe_gate is None:
            want["moe_gate"] = False
        leaves = {n: getattr(a, n).detach().requires_grad_(True) for n, w in want.items() if w}
        out = _call(a, **leaves)
        outs, grads_out = differentiated_outputs(a, out)
        return leaf_grads(leaves, outs, grads_out, FFN_GRAD_INPUTS, a.expert_trainable)

