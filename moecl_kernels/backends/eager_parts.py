"""What the eager implementations of both ops (``eager.py``, ``eager_ffn.py``) share: token
groups by expert, row gathers and scatters, the dropout mask (a float ``keep / (1 - p)`` built
once per call and multiplied in: ``where`` on a boolean is twice as slow), weight-gradient GEMMs in the
orientation the CPU BLAS runs fast, and the dense decode path.

Why the orientation matters: a rank-r weight gradient computed as the [n, r] product ``h^T a``
(h [T, n], a [T, r]) runs ~5x slower on CPU BLAS than the [r, n] product ``a^T h`` (7.0 vs 1.4 ms for
T = 2048, n = 1536, r = 8), and a thin [T, r] output ``big @ w^T`` ~1.8x slower than ``(w big^T)^T``;
:func:`wgrad` and :func:`thin` always take the fast form.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..contract import SINGLE_NONE, host_offsets
from ..contract.dropout import dropout_scale

# few tokens of several tasks (decode): every task expert evaluated on every token and kept by a
# one-hot of the token's task, when T * E * r * (d_in + d_out, summed over the projections) is at
# most this: a handful of small GEMMs instead of a GEMM pair per task present (no host work per task)
DENSE_ELEMENTS = 1 << 20
WORKSPACE_ENV = "MOECL_CPU_WORKSPACE_MB"  # the CPU workspace's bound in MiB (0: off); default 1024
_MIN_CACHED = 1 << 16  # bytes: smaller temporaries are plain allocations


class Workspace:
    """Buffers for the large temporaries of one eager op call, reused by the next call on the CPU.

    A fresh multi-megabyte CPU tensor costs a page fault per 4 KiB page the first time it is
    written (the allocator hands large blocks back to the OS when they are freed); on this
    project's CI machines (virtual machines) that is ~8 ms for a 12 MB [T, d_ff] tensor, more
    than the elementwise pass that fills it. The temporaries of the FFN op (pre-activations,
    masked hidden states, dropout masks, gradient buffers) come from here instead: per thread, a
    pool of byte buffers of at most ``$MOECL_CPU_WORKSPACE_MB`` MiB (default 1024; 0 turns it
    off), each handed out once per call (``with Workspace(device) as ws: ws.empty(...)``) and
    returned when the call ends. Nothing handed out may outlive the call: outputs and saved
    tensors are ordinary allocations. On CUDA the caching allocator already reuses memory, so
    ``empty`` is ``torch.empty``."""

    _local = threading.local()

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.limit = _workspace_limit() if device.type == "cpu" else 0
        self.taken: list[Tensor] = []

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc) -> None:
        if self.taken:
            pool = self._pool()
            pool.extend(self.taken)
            pool.sort(key=Tensor.numel)
            while pool and sum(b.numel() for b in pool) > self.limit:
                pool.pop(0)  # the smallest go first: the large ones are what is worth keeping
            self.taken = []

    def _pool(self) -> list[Tensor]:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = []
        return pool

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """An uninitialised tensor for this call only (like ``torch.empty``)."""
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self.limit <= 0 or n < _MIN_CACHED or n > self.limit:
            return torch.empty(shape, dtype=dtype, device=self.device)
        pool = self._pool()
        i = next((i for i, b in enumerate(pool) if b.numel() >= n), None)  # the pool is sorted by size
        buf = pool.pop(i) if i is not None else torch.empty(n, dtype=torch.uint8, device=self.device)
        self.taken.append(buf)
        return buf[:n].view(dtype).view(shape)

    def like(self, t: Tensor) -> Tensor:
        return self.empty(t.shape, t.dtype)


def _workspace_limit() -> int:
    raw = os.environ.get(WORKSPACE_ENV, "1024")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"{WORKSPACE_ENV}={raw!r} is not a number of MiB") from None
    return int(mb * (1 << 20))


def expert_groups(a, num_experts: int) -> list[tuple[int, Optional[Tensor]]]:
    """(expert, token index or None = all tokens) for every expert with tokens (routing fields of ``a``)."""
    if a.single_task >= 0:
        return [(a.single_task, None)]
    if a.single_task == SINGLE_NONE:
        return []
    off = host_offsets(a)
    return [(e, a.sorted_idx[off[e]: off[e + 1]].long()) for e in range(num_experts) if off[e + 1] > off[e]]


def rows(t: Optional[Tensor], idx: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or idx is None else t.index_select(0, idx)


def add_rows(out: Tensor, idx: Optional[Tensor], value: Tensor) -> None:
    if idx is None:
        out.add_(value)
    else:
        out.index_add_(0, idx, value)


def set_rows(out: Tensor, idx: Optional[Tensor], value: Tensor) -> None:
    if idx is None:
        out.copy_(value)
    else:
        out.index_copy_(0, idx, value)


class Dropout:
    """The op's dropout on one [T, n] tensor: ``mask = keep / (1 - p)`` in the tensor's dtype (None
    without dropout), built once per call and multiplied into every tensor that needs it."""

    __slots__ = ("mask",)

    def __init__(self, like: Tensor, p: float, seed, ws: Optional[Workspace] = None) -> None:
        self.mask = None
        if p > 0.0:
            self.mask = dropout_scale(like, p, seed, alloc=ws.empty if ws is not None else None)

    def apply(self, t: Optional[Tensor], idx: Optional[Tensor] = None) -> Optional[Tensor]:
        """``t * mask`` on the rows ``idx`` of the mask (all rows: None); t itself without dropout."""
        if t is None or self.mask is None:
            return t
        return t * rows(self.mask, idx)

    def into(self, t: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """``t * mask`` written into ``out`` (a new buffer when None); t itself without dropout."""
        if self.mask is None:
            return t
        return torch.mul(t, self.mask, out=out) if out is not None else t * self.mask

    def apply_(self, t: Tensor) -> Tensor:
        """``t *= mask`` in place (t returned)."""
        return t if self.mask is None else t.mul_(self.mask)


def task_one_hot(token_task: Tensor, num_experts: int, dtype: torch.dtype) -> Tensor:
    """[T, E] one-hot of each token's task (a zero row for a token without one)."""
    hot = torch.nn.functional.one_hot(token_task.long().clamp(min=0), num_experts).to(dtype)
    return hot * (token_task >= 0).unsqueeze(1).to(dtype)


def dense_shrink(A: Tensor, v: Tensor, hot: Tensor) -> Tensor:
    """``v[t] @ A[task(t)]^T`` [T, m] in hot's dtype for A [E, m, n], v [T, n] (0 without a task)."""
    # one batch per expert (not one [T, E m] GEMM): a token's result does not depend on how many
    # experts there are, so add_tasks leaves the outputs bit-for-bit as they were
    every = torch.bmm(v.unsqueeze(0).expand(A.shape[0], -1, -1), A.transpose(1, 2)).to(hot.dtype)  # [E, T, m]
    return (every * hot.t().unsqueeze(2)).sum(0)


def dense_expand(B: Tensor, c: Tensor, hot: Tensor) -> Tensor:
    """``c[t] @ B[task(t)]^T`` [T, m] in B's dtype for B [E, m, r], c [T, r] (0 without a task)."""
    per_expert = (hot.unsqueeze(2) * c.to(hot.dtype).unsqueeze(1)).to(B.dtype).transpose(0, 1)  # [E, T, r]
    return torch.bmm(per_expert, B.transpose(1, 2)).sum(0)


def thin(big: Tensor, w: Tensor) -> Tensor:
    """``big @ w^T`` [T, r] for big [T, n] and w [r, n] with r small, computed as ``(w big^T)^T``: a
    thin output is the orientation CPU BLAS is slowest at (~1.5x); the result is a transposed
    view (``.contiguous()`` it where it leaves the op)."""
    if big.device.type != "cpu":
        return big @ w.t()
    return torch.mm(w.contiguous(), big.t()).t()


def wgrad(left: Tensor, right: Tensor) -> Tensor:
    """``left^T @ right`` [m, n] for left [T, m] with m small (a rank-r side): ``left^T`` made
    contiguous first (see the module docstring)."""
    return left.t().contiguous() @ right


def wgrad_t(right: Tensor, left: Tensor) -> Tensor:
    """``right^T @ left`` [n, m] (e.g. dB = gy^T (s c h), [d_out, r]) through :func:`wgrad`, contiguous."""
    return wgrad(left, right).t().contiguous()


def gate_logit_grad(coef: Tensor, gbeta: Tensor, token_task: Tensor, single_task: int) -> Tensor:
    """dL/dlogits [T, 2] of the softmax gate from dL/dbeta (0 for tokens without a task)."""
    dlog = coef * (gbeta - (coef * gbeta).sum(1, keepdim=True))
    if single_task >= 0:
        return dlog
    return torch.where((token_task >= 0).unsqueeze(1), dlog, 0)
