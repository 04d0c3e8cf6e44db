"""The dropout hash of ``ops/dropout.py`` as Triton device functions (uint32 arithmetic, bit-exact
with it; constants cast explicitly so they stay 32-bit). The seed is read from device memory."""

from __future__ import annotations

import triton
import triton.language as tl

from ...contract import dropout as _d

_SEED_XOR = tl.constexpr(_d.SEED_XOR)
_ROW_MUL = tl.constexpr(_d.ROW_MUL)
_COL_MUL = tl.constexpr(_d.COL_MUL)
_FMIX_C1 = tl.constexpr(_d.FMIX_C1)
_FMIX_C2 = tl.constexpr(_d.FMIX_C2)



@triton.jit
def _mul32(h, c: tl.constexpr):
    return h * tl.full([1], c, tl.uint32)


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = _mul32(h, _FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, _FMIX_C2)
    return h ^ (h >> 16)


@triton.jit
def _seed_key(SEED):
    """``(seed mod 2**32) ^ SEED_XOR`` from the int64 seed at ``SEED`` (device memory)."""
    return tl.load(SEED).to(tl.uint32) ^ tl.full([1], _SEED_XOR, tl.uint32)


@triton.jit
def _row_keys(rows, key):
    """Per-row hash keys from the seed key (``_seed_key``)."""
    return _fmix32(key + _mul32(rows.to(tl.uint32), _ROW_MUL))


@triton.jit
def _keep(keys, cols, thr):
    """Boolean keep-mask [len(keys), len(cols)]: ``(fmix32(key ^ col * COL_MUL) >> 8) >= thr``."""
    h = _fmix32(keys[:, None] ^ _mul32(cols.to(tl.uint32), _COL_MUL)[None, :])
    return (h >> 8) >= thr.to(tl.uint32)


@triton.jit
def _drop(z, keys, cols, thr):
    """``z * keep`` (exact in z's dtype); callers apply the 1 / (1 - p) scale to their fp32
    accumulators, which saves a rounding of the scaled input to z's dtype."""
    return tl.where(_keep(keys, cols, thr), z, 0.0).to(z.dtype)
