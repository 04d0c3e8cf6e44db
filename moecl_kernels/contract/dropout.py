"""Seeded, counter-based dropout mask shared by every backend.

The mask of element (row, col) of the flattened LoRA input is a pure function of
``(seed, row, col, p)``, so the backward pass regenerates it instead of storing a
T x d_in mask, and every backend (eager, Triton, CUDA) produces the *same* mask
for the same seed. ``row`` is the token's index in the flattened input (its
original order, independent of task grouping) and ``col`` the feature index.

    k    = fmix32((seed ^ 0x5BD1E995) + row * 0x9E3779B1)      (mod 2**32)
    h    = fmix32(k ^ (col * 0x85EBCA77))                        (mod 2**32)
    keep = (h >> 8) >= threshold(p),   threshold(p) = round(p * 2**24)
    x~   = x * keep / (1 - p)

``fmix32`` is MurmurHash3's 32-bit finaliser. Kernels implement the same arithmetic in
uint32 (which wraps). Here:

* :func:`keep_mask` (what the eager backend runs) hashes the T row keys and the d column
  keys once (T + d values, in exact int64), then runs the T x d part in **int32** with
  wrap-around multiplies, in place, in row chunks that stay in cache: about a dozen int32
  passes per mask instead of ~35 int64 ones. A logical right shift is an arithmetic shift
  masked to the low bits, and the final unsigned comparison ``(h >> 8) >= thr`` is a signed
  one of ``h ^ 0x80000000`` against ``(thr << 8) ^ 0x80000000``.
* :func:`keep_mask_reference` is the formula above in int64 with exact 16-bit split
  multiplies (never overflows): the oracle the tests hold every other implementation to,
  and what the float64 reference backend uses.

The seed is an integer or, as the op passes it, a 0-dim integer tensor (on x's device,
drawn there by the layer): it is used as ``seed mod 2**32`` and read by tensor
arithmetic only, never with ``.item()``, so no host sync happens and a captured CUDA
graph (or ``torch.compile(mode="reduce-overhead")``) sees a new mask when the seed
tensor's contents change between replays. The kernels read it from device memory too.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

Seed = Union[int, Tensor]

MASK32 = 0xFFFFFFFF
SEED_XOR = 0x5BD1E995
ROW_MUL = 0x9E3779B1
COL_MUL = 0x85EBCA77
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35
_CHUNK = 1 << 19  # elements hashed per pass of the int32 loop (2 MiB of int32: stays in L2/L3)


def _i32(c: int) -> int:
    """The int32 whose bits are those of the uint32 ``c``."""
    c &= MASK32
    return c - (1 << 32) if c >= (1 << 31) else c


def threshold24(p: float) -> int:
    """Integer threshold on the hash's top 24 bits: keep iff ``(h >> 8) >= threshold24(p)``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return int(round(p * (1 << 24)))


# ------------------------------------------------------------------------ exact int64 arithmetic
def _mul32(h: Tensor, c: int) -> Tensor:
    # (h * c) mod 2**32 for 0 <= h < 2**32, exact in int64 (no overflow).
    lo = h * (c & 0xFFFF)
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's finaliser of int64 values in [0, 2**32), exact."""
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    return h ^ (h >> 16)


def _seed_key(seed: Seed, device) -> Union[int, Tensor]:
    """``(seed mod 2**32) ^ SEED_XOR``: a host int for an int seed, a 0-dim int64 tensor on
    ``device`` for a tensor seed (tensor arithmetic: no ``.item()``, no host sync)."""
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex():
            raise ValueError(f"the dropout seed must be one integer, got a {seed.dtype} tensor of shape "
                             f"{tuple(seed.shape)}")
        s = seed.reshape(()).to(device=device, dtype=torch.int64)
        return (s & MASK32) ^ SEED_XOR
    return (int(seed) & MASK32) ^ SEED_XOR


def _row_keys(seed: Seed, rows: Tensor) -> Tensor:
    """k of every row, int64 in [0, 2**32)."""
    return fmix32((_seed_key(seed, rows.device) + _mul32(rows.to(torch.int64), ROW_MUL)) & MASK32)


def keep_mask_reference(seed: Seed, rows: Tensor, cols: Tensor, p: float) -> Tensor:
    """The keep-mask of the formula in exact int64 arithmetic, for the broadcast of ``rows[:, None]``
    and ``cols[None, :]`` (the tests' oracle; slow: ~35 int64 passes over the mask)."""
    k = _row_keys(seed, rows)[:, None]
    h = fmix32(k ^ _mul32(cols.to(torch.int64)[None, :], COL_MUL))
    return (h >> 8) >= threshold24(p)


# ------------------------------------------------------------------------ the fast int32 path
def _as_i32(t: Tensor) -> Tensor:
    """int64 values in [0, 2**32) as the int32 with the same bits (small tensors only)."""
    return torch.where(t >= (1 << 31), t - (1 << 32), t).to(torch.int32)


def _fmix_rows_(h: Tensor, tmp: Tensor) -> None:
    """fmix32 of the int32 tensor ``h`` in place (wrap-around multiplies; ``tmp`` like ``h``)."""
    for shift, mul in ((16, FMIX_C1), (13, FMIX_C2), (16, None)):
        torch.bitwise_right_shift(h, shift, out=tmp)
        tmp.bitwise_and_((1 << (32 - shift)) - 1)  # the arithmetic shift's sign bits cleared: a logical shift
        h.bitwise_xor_(tmp)
        if mul is not None:
            h.mul_(_i32(mul))


def _hashed(seed: Seed, rows: Tensor, cols: Tensor, p: float, out: Tensor, value: Optional[float],
            alloc: Optional[Callable] = None) -> Tensor:
    """Fill ``out`` [len(rows), len(cols)] with the keep mask: a boolean (``value`` None), or
    ``keep * value`` in ``out``'s floating dtype (one pass per chunk while it is in cache).
    ``alloc(shape, dtype)`` provides the chunk buffers (``torch.empty`` by default)."""
    thr = threshold24(p)
    rk = _as_i32(_row_keys(seed, rows))
    ck = _as_i32(_mul32(cols.to(torch.int64), COL_MUL))
    n, d = out.shape
    if n == 0 or d == 0:
        return out
    limit = _i32((thr << 8) ^ (1 << 31))
    step = max(1, _CHUNK // d)
    alloc = alloc or (lambda shape, dtype: torch.empty(shape, dtype=dtype, device=rows.device))
    hbuf = alloc((min(step, n), d), torch.int32)
    tmp = alloc((min(step, n), d), torch.int32)
    for r0 in range(0, n, step):
        h = torch.bitwise_xor(rk[r0:r0 + step, None], ck[None, :], out=hbuf[:min(step, n - r0)])
        t = tmp[:h.shape[0]]
        _fmix_rows_(h, t)
        if value is None:
            h.bitwise_xor_(-(1 << 31))
            torch.ge(h, limit, out=out[r0:r0 + step])
            continue
        # keep = [(h >>> 8) >= thr] = clamp((h >>> 8) - (thr - 1), 0, 1), all in int32 (the
        # vectorised passes; an int -> bool compare and a bool -> float copy are ~8x slower)
        h.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF).sub_(thr - 1).clamp_(0, 1)
        chunk = out[r0:r0 + step]
        chunk.copy_(h)
        if value != 1.0:
            chunk.mul_(value)
    return out


def keep_mask(seed: Seed, rows: Tensor, cols: Tensor, p: float) -> Tensor:
    """Boolean keep-mask for the broadcast of ``rows[:, None]`` and ``cols[None, :]``, bit for bit
    :func:`keep_mask_reference` (int32 arithmetic, see the module docstring)."""
    out = torch.empty(rows.shape[0], cols.shape[0], dtype=torch.bool, device=rows.device)
    return _hashed(seed, rows, cols, p, out, None)


def dropout_mask(seed: Seed, num_rows: int, num_cols: int, p: float, device=None) -> Tensor:
    """The [num_rows, num_cols] boolean keep-mask of rows and columns 0.. (the op's mask of a
    [T, d] input)."""
    rows = torch.arange(num_rows, device=device, dtype=torch.int64)
    cols = torch.arange(num_cols, device=device, dtype=torch.int64)
    return keep_mask(seed, rows, cols, p)


def dropout_scale(x: Tensor, p: float, seed: Seed, alloc: Optional[Callable] = None) -> Optional[Tensor]:
    """``keep / (1 - p)`` in x's dtype for a 2-D ``x`` (rows = x's rows), or None when p == 0:
    multiply every tensor that needs this mask by it (a multiply by a float mask is a plain
    vectorised pass; ``where`` on a boolean one is about twice as slow on the CPU).
    ``alloc(shape, dtype)``: where the mask and its chunk buffers come from (``torch.empty``)."""
    if p == 0.0:
        return None
    T, d = x.shape
    out = alloc((T, d), x.dtype) if alloc is not None else torch.empty(T, d, dtype=x.dtype, device=x.device)
    rows = torch.arange(T, device=x.device, dtype=torch.int64)
    return _hashed(seed, rows, torch.arange(d, device=x.device, dtype=torch.int64), p, out, 1.0 / (1.0 - p), alloc)


def apply_dropout(x: Tensor, p: float, seed: Seed) -> Tensor:
    """``x * keep / (1 - p)`` for a 2-D ``x`` whose rows are tokens 0..T-1."""
    scale = dropout_scale(x, p, seed)
    return x if scale is None else x * scale


def apply_dropout_reference(x: Tensor, p: float, seed: Seed) -> Tensor:
    """:func:`apply_dropout` on :func:`keep_mask_reference` (the float64 reference's dropout)."""
    if p == 0.0:
        return x
    rows = torch.arange(x.shape[0], device=x.device)
    keep = keep_mask_reference(seed, rows, torch.arange(x.shape[1], device=x.device), p)
    return x * (keep.to(x.dtype) * (1.0 / (1.0 - p)))
