"""Device functions of the FFN-level Triton kernels (``ffn_kernels.py``): activations and their
derivatives, the per-tile recomputation of both experts and its backward, routed token blocks,
rank-r loads and stores, the down LoRA's dropout keys (seed read from device memory)."""

from __future__ import annotations

import triton
import triton.language as tl

from ...contract import dropout as _d
from ...contract.ffn_args import DOWN_SEED_XOR
from .kernels import _block_of, _row_keys, _rows

ACT_SILU = tl.constexpr(0)
ACT_GELU = tl.constexpr(1)
ACT_GELU_TANH = tl.constexpr(2)
ACT_RELU = tl.constexpr(3)
ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}

_DOWN_KEY = tl.constexpr((DOWN_SEED_XOR ^ _d.SEED_XOR) & 0xFFFFFFFF)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # (constexprs go right of tensors: the interpreter needs it)
_TWO_SQRT_2_OVER_PI = tl.constexpr(2 * 0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _act(z, ACT: tl.constexpr):
    """(act(z), act'(z)) in fp32 (the derivative is dead code where unused)."""
    if ACT == ACT_SILU:
        s = tl.sigmoid(z)
        a = z * s
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == ACT_GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT_2))
        a = z * cdf
        d = cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACT == ACT_GELU_TANH:
        t = 2.0 * tl.sigmoid((z + 0.044715 * z * z * z) * _TWO_SQRT_2_OVER_PI) - 1.0  # tanh(sqrt(2/pi) (z + c z^3))
        a = 0.5 * z * (1.0 + t)
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z)
    else:
        a = tl.maximum(z, 0.0)
        d = (z > 0.0).to(tl.float32)
    return a, d


@triton.jit
def _down_keys(SEED, rows):
    """Per-row hash keys of the down LoRA's dropout mask: seed ^ DOWN_SEED_XOR, read on the device."""
    key = tl.load(SEED).to(tl.uint32) ^ tl.full([1], _DOWN_KEY, tl.uint32)
    return _row_keys(rows, key)


@triton.jit
def _token_block(pid, sorted_ptr, offsets_ptr, single, T, E, BLOCK_T: tl.constexpr, G_PAD: tl.constexpr,
                 ROUTE: tl.constexpr):
    """(expert or -1, rows int64, valid) of token block ``pid``: ranges clamped to [0, T]
    (``_block_of``), rows read through sorted_idx checked to lie in [0, T) (``_rows``)."""
    expert, start, end = _block_of(pid, offsets_ptr, single, T, E, BLOCK_T, G_PAD, ROUTE)
    pos = start + tl.arange(0, BLOCK_T)
    rows, valid = _rows(sorted_ptr, pos, pos < end, T, ROUTE)
    return expert, rows.to(tl.int64), valid


@triton.jit
def _rank_cols(P, rr, valid, width, col0, r, R_PAD: tl.constexpr):
    """P[rows, col0:col0 + r] of a row-major [T, width] fp32 tensor as a [BT, R_PAD] tile."""
    j = tl.arange(0, R_PAD)
    return tl.load(P + rr[:, None] * width + col0 + j[None, :], mask=valid[:, None] & (j < r)[None, :], other=0.0)


@triton.jit
def _chunk_fr(W, e64, stride_e, stride_f, stride_r, f64, fm, jm, R_PAD: tl.constexpr):
    """A [BF, R_PAD] chunk of a [.., d_ff, r] (B) or [.., r, d_ff] (A, strides swapped) matrix."""
    return tl.load(W + e64 * stride_e + f64[:, None] * stride_f + tl.arange(0, R_PAD)[None, :] * stride_r,
                   mask=fm[:, None] & jm[None, :], other=0.0)


@triton.jit
def _pre_acts(g, u, sa_g, sa_u, bg, bu, GATED_MLP: tl.constexpr, PREC: tl.constexpr):
    """(pg, pu): g + sa_g B_g^T, u + sa_u B_u^T for one expert ([BT, BF] fp32; B chunks [BF, R_PAD])."""
    pu = u + tl.dot(sa_u, tl.trans(bu), input_precision=PREC)
    pg = pu
    if GATED_MLP:
        pg = g + tl.dot(sa_g, tl.trans(bg), input_precision=PREC)
    return pg, pu


@triton.jit
def _hidden(pg, pu, ACT: tl.constexpr, GATED_MLP: tl.constexpr):
    """(h, act, act') of pre-activations: h = act(pg) * pu, or act(pu) for a plain MLP."""
    if GATED_MLP:
        a, d = _act(pg, ACT)
        h = a * pu
    else:
        a, d = _act(pu, ACT)
        h = a
    return h, a, d


@triton.jit
def _dpre(dh_e, pu, a, d, GATED_MLP: tl.constexpr):
    """(dpg, dpu) from dL/dh of one evaluation."""
    if GATED_MLP:
        return dh_e * pu * d, dh_e * a
    return dh_e * d, dh_e * d


@triton.jit
def _load_tiles(G, U, DH, rr, valid, f64, fm, F, GATED_MLP: tl.constexpr, WITH_DH: tl.constexpr):
    m2 = valid[:, None] & fm[None, :]
    off = rr[:, None] * F + f64[None, :]
    u = tl.load(U + off, mask=m2, other=0.0).to(tl.float32)
    g = u
    if GATED_MLP:
        g = tl.load(G + off, mask=m2, other=0.0).to(tl.float32)
    dh = u
    if WITH_DH:
        dh = tl.load(DH + off, mask=m2, other=0.0).to(tl.float32)
    return g, u, dh


@triton.jit
def _tile_backward(g, u, dh, sa_gs, sa_us, sa_gt, sa_ut, bgs, bus, bgt, but, ads, adt, dz_s, dz_t, c_s, c_t, keep,
                   extra_s, inv_keep, ACT: tl.constexpr, GATED_MLP: tl.constexpr, MOE_GATE: tl.constexpr,
                   TASK: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """Recompute one [BT, BF] tile of both experts and backpropagate dh through it:
    (h_s, h_t, dpg_s, dpu_s, dpg_t, dpu_t). ``extra_s``: more dL/dh_s (pooled outputs)."""
    dt = bgs.dtype
    back_s = tl.dot(dz_s.to(dt), tl.trans(ads), input_precision=PREC)
    back_t = back_s * 0.0
    if TASK:
        back_t = tl.dot(dz_t.to(dt), tl.trans(adt), input_precision=PREC)
    pg_s, pu_s = _pre_acts(g, u, sa_gs, sa_us, bgs, bus, GATED_MLP, PREC)
    if MOE_GATE:  # two evaluations, each with its own dL/dh
        h_s, a_s, d_s = _hidden(pg_s, pu_s, ACT, GATED_MLP)
        if DROPOUT:
            back_s = tl.where(keep, back_s * inv_keep, 0.0)
            back_t = tl.where(keep, back_t * inv_keep, 0.0)
        dpg_s, dpu_s = _dpre(c_s[:, None] * dh + back_s + extra_s, pu_s, a_s, d_s, GATED_MLP)
        h_t, dpg_t, dpu_t = h_s, dpg_s * 0.0, dpu_s * 0.0
        if TASK:
            pg_t, pu_t = _pre_acts(g, u, sa_gt, sa_ut, bgt, but, GATED_MLP, PREC)
            h_t, a_t, d_t = _hidden(pg_t, pu_t, ACT, GATED_MLP)
            dpg_t, dpu_t = _dpre(c_t[:, None] * dh + back_t, pu_t, a_t, d_t, GATED_MLP)
    else:  # one evaluation carrying both experts' terms
        if TASK:
            pg_s += tl.dot(sa_gt, tl.trans(bgt), input_precision=PREC)
            pu_s += tl.dot(sa_ut, tl.trans(but), input_precision=PREC)
        h_s, a_s, d_s = _hidden(pg_s, pu_s, ACT, GATED_MLP)
        back = back_s + back_t
        if DROPOUT:
            back = tl.where(keep, back * inv_keep, 0.0)
        dpg_s, dpu_s = _dpre(dh + back, pu_s, a_s, d_s, GATED_MLP)
        h_t, dpg_t, dpu_t = h_s, dpg_s, dpu_s
    return h_s, h_t, dpg_s, dpu_s, dpg_t, dpu_t


@triton.jit
def _pool_rows(POOLW, GZP, rr, valid, S, r, R_PAD: tl.constexpr):
    """(pool weight of each row [BT], the pooled z gradient of its sequence [BT, R_PAD])."""
    w = tl.load(POOLW + rr, mask=valid, other=0.0)
    j = tl.arange(0, R_PAD)
    gz = tl.load(GZP + (rr // S)[:, None] * r + j[None, :], mask=valid[:, None] & (j < r)[None, :], other=0.0)
    return w, gz


@triton.jit
def _store_fr(OUT, e64, stride_e, stride_f, stride_r, acc, f64, fm, r, R_PAD: tl.constexpr):
    """acc [BF, R_PAD] into rows f of OUT[e] (a [d_ff, r] B gradient, or [r, d_ff] with strides swapped)."""
    j = tl.arange(0, R_PAD)
    tl.store(OUT + e64 * stride_e + f64[:, None] * stride_f + j[None, :] * stride_r,
             acc.to(OUT.dtype.element_ty), mask=fm[:, None] & (j < r)[None, :])


@triton.jit
def _block_ranks(expert, rr, valid, A_S, A_T, BUS, r, scale, BLOCK_T: tl.constexpr, R_PAD: tl.constexpr,
                 GATED_MLP: tl.constexpr):
    """What the forward and backward passes of a token block share: per-row "has a task",
    the rank lanes (all, valid, valid with a task), the expert as an int64 index and the scaled
    gate/up rank inputs s * a (shared, task) in the weights' dtype (BUS's)."""
    dt = BUS.dtype.element_ty
    has = (tl.zeros([BLOCK_T], tl.int32) + expert) >= 0
    j = tl.arange(0, R_PAD)
    jm = j < r
    jm_t = jm & ((tl.zeros_like(j) + expert) >= 0)
    ex = tl.maximum(expert, 0).to(tl.int64)
    NPRE: tl.constexpr = 2 if GATED_MLP else 1
    sa_gs = (scale * _rank_cols(A_S, rr, valid, NPRE * r, 0, r, R_PAD)).to(dt)
    sa_us = (scale * _rank_cols(A_S, rr, valid, NPRE * r, (NPRE - 1) * r, r, R_PAD)).to(dt)
    sa_gt = (scale * _rank_cols(A_T, rr, valid, NPRE * r, 0, r, R_PAD)).to(dt)
    sa_ut = (scale * _rank_cols(A_T, rr, valid, NPRE * r, (NPRE - 1) * r, r, R_PAD)).to(dt)
    return has, j, jm, jm_t, ex, sa_gs, sa_us, sa_gt, sa_ut
