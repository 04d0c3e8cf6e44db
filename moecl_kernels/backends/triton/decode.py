"""Decode forward of the ``gemm`` variants (T <= ``configs.DECODE_T``): two launches, no host sync.

``_decode_gemv_kernel``  split-K GEMV over the stacked matrix [W; A_s + W_g; A_0 .. A_{E-1}]:
    program (column block, split) streams its slice of that matrix once and writes fp32
    partials: x W^T into WS_Y [splits, T, d_out], x~ A_s^T, x W_g^T and x~ A_e^T (rows of
    expert e only; programs of experts without tokens return at once) into WS_H
    [splits, T, 2 R_PAD + 2]. The W blocks are computed as W x^T (weights as the MMA's
    M side, tokens as N), so a handful of tokens still feeds full-height tensor-core tiles.
``_decode_finalize_kernel``  per output column block: sums the partials (fixed order:
    deterministic), runs the gate softmax, writes h_s, h_t, coef (program 0) and
    y = x W^T + b + s c_s h_s B_s^T + s c_t h_t B_e^T (``fused_gemm._lora_tile``) once.

W is read once from DRAM; the workspaces (a few MB) stay in L2. Graph-capturable: the
seed is read on the device, the grid depends on shapes only.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import kernels as K
from .fused_gemm import _lora_tile
from .dropout_hash import _drop, _keep, _row_keys
from .dropout_hash import _seed_key as seed_key

GATE_PAD = K.GATE_PAD
ROUTE_SINGLE = K.ROUTE_SINGLE


@triton.jit
def _has_task(TT, rows, valid, single, E, ROUTE: tl.constexpr):
    """(task id clamped to [-1, E), has a task) per row."""
    if ROUTE == ROUTE_SINGLE:
        tt = tl.zeros_like(rows) + single
    else:
        tt = tl.load(TT + rows, mask=valid, other=-1)
    tt = tl.where(valid & (tt >= 0) & (tt < E), tt, -1)
    return tt, tt >= 0


@triton.jit(do_not_specialize=["single", "thr"])
def _decode_gemv_kernel(
    X, stride_xt, stride_xk, W, stride_wn, stride_wk,
    AS, stride_as_r, stride_as_k, AT, stride_at_e, stride_at_r, stride_at_k, GW, stride_gw_j, stride_gw_k,
    WS_Y, WS_H, TT, SEED, single, T, E, N, K_, r, k_per_split, thr, inv_keep,
    ROUTE: tl.constexpr, TASK: tl.constexpr, GATE: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_wblocks = tl.cdiv(N, BLOCK_N)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K_)
    rows = tl.arange(0, BLOCK_T)
    valid = rows < T
    rr = rows.to(tl.int64)
    HW: tl.constexpr = 2 * R_PAD + 2
    split_rows = pid_k.to(tl.int64) * T + rr  # row index into the [splits * T, ...] workspaces
    if pid_n < n_wblocks:  # base columns: acc[n, t] = sum_k W[n, k] x[t, k]
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < N
        n64 = n.to(tl.int64)
        acc = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < k_hi
            w = tl.load(W + n64[:, None] * stride_wn + kk[None, :].to(tl.int64) * stride_wk,
                        mask=nm[:, None] & km[None, :], other=0.0)
            xt = tl.load(X + rr[None, :] * stride_xt + kk[:, None] * stride_xk, mask=km[:, None] & valid[None, :],
                         other=0.0)
            acc = tl.dot(w, xt, acc, input_precision=PREC)
        tl.store(WS_Y + split_rows[None, :] * N + n64[:, None], acc, mask=nm[:, None] & valid[None, :])
    else:  # rank-r columns: the shared expert + gate logits (e = -1), or one task expert
        e = pid_n - n_wblocks - 1
        tt, has = _has_task(TT, rows, valid, single, E, ROUTE)
        if ROUTE == ROUTE_SINGLE:
            e = tl.where(e >= 0, single, e)  # the grid has one expert column block: the batch's
        mine = valid
        if e >= 0:
            mine = tt == e
        if tl.max(mine.to(tl.int32), 0) > 0:
            j = tl.arange(0, R_PAD)
            gj = tl.arange(0, GATE_PAD)
            if e >= 0:
                acc, acc_g = _rank_cols(X, stride_xt, stride_xk, AT + tl.maximum(e, 0).to(tl.int64) * stride_at_e,
                                        stride_at_r, stride_at_k, GW, stride_gw_j, stride_gw_k, SEED, rr, mine, r,
                                        k_lo, k_hi, thr, inv_keep, False, DROPOUT, BLOCK_T, BLOCK_K, R_PAD, PREC)
            else:
                acc, acc_g = _rank_cols(X, stride_xt, stride_xk, AS, stride_as_r, stride_as_k, GW, stride_gw_j,
                                        stride_gw_k, SEED, rr, mine, r, k_lo, k_hi, thr, inv_keep, GATE, DROPOUT,
                                        BLOCK_T, BLOCK_K, R_PAD, PREC)
            col = tl.where(e >= 0, R_PAD, 0)
            tl.store(WS_H + split_rows[:, None] * HW + col + j[None, :], acc, mask=mine[:, None])
            if e < 0:
                tl.store(WS_H + split_rows[:, None] * HW + 2 * R_PAD + gj[None, :], acc_g,
                         mask=mine[:, None] & (gj < 2)[None, :])


@triton.jit
def _rank_cols(X, stride_xt, stride_xk, M, stride_m_r, stride_m_k, GW, stride_gw_j, stride_gw_k, SEED, rr, mine, r,
               k_lo, k_hi, thr, inv_keep, LOGITS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, PREC: tl.constexpr):
    """(x~ M^T, x W_g^T if LOGITS) over k in [k_lo, k_hi) for the rows ``mine``; M is [r, K]."""
    j = tl.arange(0, R_PAD)
    jm = j < r
    gj = tl.arange(0, GATE_PAD)
    if DROPOUT:
        keys = _row_keys(rr, seed_key(SEED))
    acc = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    acc_g = tl.zeros([BLOCK_T, GATE_PAD], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < k_hi
        x = tl.load(X + rr[:, None] * stride_xt + kk[None, :] * stride_xk, mask=mine[:, None] & km[None, :], other=0.0)
        if LOGITS:
            gw = tl.load(GW + gj[None, :] * stride_gw_j + kk[:, None] * stride_gw_k,
                         mask=km[:, None] & (gj < 2)[None, :], other=0.0)
            acc_g = tl.dot(x, gw, acc_g, input_precision=PREC)
        if DROPOUT:
            x = _drop(x, keys, kk, thr)
        a = tl.load(M + j[None, :] * stride_m_r + kk[:, None] * stride_m_k, mask=km[:, None] & jm[None, :], other=0.0)
        acc = tl.dot(x, a, acc, input_precision=PREC)
    if DROPOUT:
        acc *= inv_keep
    return acc, acc_g


@triton.jit(do_not_specialize=["single"])
def _decode_finalize_kernel(
    WS_Y, WS_H, Y, stride_yt, stride_yn, H_S, H_T, COEF,
    NS, stride_ns_r, stride_ns_n, NT, stride_nt_e, stride_nt_r, stride_nt_n, BIAS, TT,
    single, T, E, N, r, splits, scale,
    ROUTE: tl.constexpr, TASK: tl.constexpr, GATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_T)
    valid = rows < T
    rr = rows.to(tl.int64)
    j = tl.arange(0, R_PAD)
    jm = j < r
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    n64 = n.to(tl.int64)
    HW: tl.constexpr = 2 * R_PAD + 2
    tt, has = _has_task(TT, rows, valid, single, E, ROUTE)
    acc_s = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    acc_t = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    l0 = tl.zeros([BLOCK_T], tl.float32)
    l1 = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    for s in range(0, splits):
        sr = tl.cast(s, tl.int64) * T + rr
        hrow = WS_H + sr * HW
        acc_s += tl.load(hrow[:, None] + j[None, :], mask=valid[:, None], other=0.0)
        if TASK:
            acc_t += tl.load(hrow[:, None] + R_PAD + j[None, :], mask=has[:, None], other=0.0)
        if GATE:
            l0 += tl.load(hrow + 2 * R_PAD, mask=valid & has, other=0.0)
            l1 += tl.load(hrow + 2 * R_PAD + 1, mask=valid & has, other=0.0)
        acc += tl.load(WS_Y + sr[:, None] * N + n64[None, :], mask=valid[:, None] & nm[None, :], other=0.0)
    if GATE:
        mx = tl.maximum(l0, l1)
        e0 = tl.exp(l0 - mx)
        e1 = tl.exp(l1 - mx)
        c0 = tl.where(has, e0 / (e0 + e1), 1.0)
        c1 = tl.where(has, e1 / (e0 + e1), 0.0)
    else:
        c0 = tl.full([BLOCK_T], 1.0, tl.float32)
        c1 = tl.where(has, 1.0, 0.0)
    if pid == 0:
        off = rr[:, None] * r + j[None, :]
        m2 = valid[:, None] & jm[None, :]
        tl.store(H_S + off, acc_s, mask=m2)
        tl.store(H_T + off, acc_t, mask=m2)
        tl.store(COEF + rr * 2, c0, mask=valid)
        tl.store(COEF + rr * 2 + 1, c1, mask=valid)
    if HAS_BIAS:
        acc += tl.load(BIAS + n64, mask=nm, other=0.0).to(tl.float32)[None, :]
    acc = _lora_tile(acc, acc_s * (scale * c0)[:, None], acc_t * (scale * c1)[:, None], rows, valid, n, nm, TT,
                     NS, stride_ns_r, stride_ns_n, NT, stride_nt_e, stride_nt_r, stride_nt_n, single, E, r,
                     ROUTE, TASK, R_PAD, PREC)
    tl.store(Y + rr[:, None] * stride_yt + n64[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=valid[:, None] & nm[None, :])
