"""The pooled shared path p_n of docs/spec.md §1 (the discriminator's input).

Pooling commutes with the linear shared path, so p_n costs one T x d_in reduction
(a batched [1, S] x [S, d_in] product per sequence, no T x d_in temporary) and
matmuls on B rows -- never a second full GEMM. Plain differentiable torch ops.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def pooled_shared_path(
    x: Tensor, pool: Tensor, weight: Tensor, bias: Optional[Tensor], shared_A: Tensor, shared_B: Tensor, scale: float
) -> Tensor:
    """p [B, d_out] for x [B, S, d_in] and pooling weights pool [B, S] (rows sum to 1)."""
    xbar = torch.bmm(pool.to(x.dtype).unsqueeze(1), x).squeeze(1)  # [B, d_in]
    return F.linear(xbar, weight, bias) + scale * F.linear(F.linear(xbar, shared_A), shared_B)
