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

``fmix32`` is MurmurHash3's 32-bit finaliser. Kernels implement the same
arithmetic in uint32 (which wraps); this module does it in int64 with exact
16-bit split multiplies so it never overflows.

The seed is an integer or, as the op passes it, a 0-dim integer tensor (on x's device,
drawn there by the layer): it is used as ``seed mod 2**32`` and read by tensor
arithmetic only, never with ``.item()``, so no host sync happens and a captured CUDA
graph (or ``torch.compile(mode="reduce-overhead")``) sees a new mask when the seed
tensor's contents change between replays. The kernels read it from device memory too.
"""

from __future__ import annotations

from typing import Union

import torch

Seed = Union[int, torch.Tensor]

MASK32 = 0xFFFFFFFF
SEED_XOR = 0x5BD1E995
ROW_MUL = 0x9E3779B1
COL_MUL = 0x85EBCA77
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35


def threshold24(p: float) -> int:
    """Integer threshold on the hash's top 24 bits: keep iff ``(h >> 8) >= threshold24(p)``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return int(round(p * (1 << 24)))


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # (h * c) mod 2**32 for 0 <= h < 2**32, exact in int64 (no overflow).
    lo = h * (c & 0xFFFF)
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    return h ^ (h >> 16)


def _seed_key(seed: Seed, device) -> Union[int, torch.Tensor]:
    """``(seed mod 2**32) ^ SEED_XOR``: a host int for an int seed, a 0-dim int64 tensor on
    ``device`` for a tensor seed (tensor arithmetic: no ``.item()``, no host sync)."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex():
            raise ValueError(f"the dropout seed must be one integer, got a {seed.dtype} tensor of shape "
                             f"{tuple(seed.shape)}")
        s = seed.reshape(()).to(device=device, dtype=torch.int64)
        return (s & MASK32) ^ SEED_XOR
    return (int(seed) & MASK32) ^ SEED_XOR


def keep_mask(seed: Seed, rows: torch.Tensor, cols: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean keep-mask for the broadcast of ``rows[:, None]`` and ``cols[None, :]``."""
    key = _seed_key(seed, rows.device)
    rows = rows.to(torch.int64)[:, None]
    cols = cols.to(torch.int64)[None, :]
    k = fmix32((key + _mul32(rows, ROW_MUL)) & MASK32)
    h = fmix32(k ^ _mul32(cols, COL_MUL))
    return (h >> 8) >= threshold24(p)


def dropout_mask(seed: Seed, num_rows: int, num_cols: int, p: float, device=None) -> torch.Tensor:
    rows = torch.arange(num_rows, device=device, dtype=torch.int64)
    cols = torch.arange(num_cols, device=device, dtype=torch.int64)
    return keep_mask(seed, rows, cols, p)


def dropout_scale(x: torch.Tensor, p: float, seed: Seed) -> torch.Tensor | None:
    """``keep / (1 - p)`` in x's dtype for a 2-D ``x`` (rows = x's rows), or None when p == 0.

    Build it once and multiply every tensor that needs the same mask with it."""
    if p == 0.0:
        return None
    keep = dropout_mask(seed, x.shape[0], x.shape[1], p, device=x.device)
    return keep.to(x.dtype) * (1.0 / (1.0 - p))


def apply_dropout(x: torch.Tensor, p: float, seed: Seed) -> torch.Tensor:
    """``x * keep / (1 - p)`` for a 2-D ``x`` whose rows are tokens 0..T-1."""
    scale = dropout_scale(x, p, seed)
    return x if scale is None else x * scale
