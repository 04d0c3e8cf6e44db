"""The plainest, obviously-right formula of SPEC §1: the float64 oracle of every test.

Per-token gather of the routed expert and einsums; differentiable through autograd.
Memory is O(T * r * (d_in + d_out)) so it is for tests and small shapes only.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .dropout import apply_dropout


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
    seed: Union[int, Tensor] = 0,
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
    """p_n of SPEC §1: x [B, S, d_in], pool [B, S] (rows sum to 1)."""
    xbar = torch.einsum("bs,bsd->bd", pool.to(x.dtype), x)
    p = xbar @ weight.T + scale * (xbar @ shared_A.T) @ shared_B.T
    return p + bias if bias is not None else p
