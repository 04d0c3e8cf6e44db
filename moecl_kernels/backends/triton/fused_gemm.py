"""The base GEMM with the LoRA terms as extra K-steps, tokens in natural order (``gemm`` variants).

    forward: y  = [x | s c_s h_s | s c_t h_t per expert] . [W | B_s | B_e]^T   (+ b)
    dgrad:   dx = keep * [dh_s | dh_t per expert] . [A_s ; A_e] / (1 - p) + dlog W_g  (+ gy W)

One output tile, one write, no gather, no per-expert padding, no sort: the rows of a tile
are consecutive tokens; each expert present among them adds one rank-r K-step whose rows
are masked to that expert's tokens (task ids are per sequence, so a tile holds one or two
experts: 2r-4r of K = 4096). The LoRA K-steps run first (in the backward the dropout mask
must apply to them only), then the base K loop accumulates on top.

``_gemm_ptr_kernel``   pointer loads, one program per output tile (sm_80, and any layout)
``_gemm_tma_kernel``   Hopper: host TMA descriptors (``TensorDescriptor``) for the base
                       operands and the output, persistent grid (one program per SM walking
                       the tiles), wgmma; needs 16-byte aligned rows (``variants._tma_ok``)

The rank-r operands (h or dh [T, r] fp32, coef [T, 2], B or A) are small and read with
pointer loads; dropout seed on the device, expert ids clamped to [-1, E), int64 offsets.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import kernels as K
from .dropout_hash import _drop, _keep, _row_keys
from .dropout_hash import _seed_key as seed_key

ROUTE_SINGLE = K.ROUTE_SINGLE


@triton.jit
def _task_span(TT, rows, valid, E):
    """Task id of each row (clamped: outside [0, E) -> -1) and the smallest / largest id present."""
    tt = tl.load(TT + rows, mask=valid, other=-1)
    tt = tl.where((tt >= 0) & (tt < E), tt, -1)
    return tt, tl.min(tl.where(tt >= 0, tt, E), 0), tl.max(tt, 0)


@triton.jit
def _lora_tile(acc, ps, pt, rows, valid, n, nm, TT, NS, stride_ns_r, stride_ns_n, NT, stride_nt_e, stride_nt_r,
               stride_nt_n, single, E, r, ROUTE: tl.constexpr, TASK: tl.constexpr, R_PAD: tl.constexpr,
               PREC: tl.constexpr):
    """acc + ps NS + (per expert e present in the rows) [rows of e] pt NT[e], from register tiles.

    ps, pt: fp32 [BM, R_PAD] rank rows (already scaled; pt zero on rows without a task);
    NS [r, N] and NT[e] [r, N] are addressed through strides; ROUTE_SINGLE: every row has
    expert ``single`` and no task id is read. (Decode; the GEMMs use ``_lora_steps``.)"""
    j = tl.arange(0, R_PAD)
    jm = j < r
    n64 = n.to(tl.int64)
    ns = tl.load(NS + j[:, None] * stride_ns_r + n64[None, :] * stride_ns_n, mask=jm[:, None] & nm[None, :], other=0.0)
    acc = tl.dot(ps.to(ns.dtype), ns, acc, input_precision=PREC)
    if TASK:
        if ROUTE == ROUTE_SINGLE:
            e_lo = single
            e_hi = single
            tt = tl.zeros_like(rows) + single
        else:
            tt, e_lo, e_hi = _task_span(TT, rows, valid, E)
        for e in range(e_lo, e_hi + 1):
            sel = tt == e
            if tl.max(sel.to(tl.int32), 0) > 0:
                nt = tl.load(NT + tl.cast(e, tl.int64) * stride_nt_e + j[:, None] * stride_nt_r
                             + n64[None, :] * stride_nt_n, mask=jm[:, None] & nm[None, :], other=0.0)
                acc = tl.dot(tl.where(sel[:, None], pt, 0.0).to(nt.dtype), nt, acc, input_precision=PREC)
    return acc


@triton.jit
def _rank_steps(acc, P, COEF, c_col: tl.constexpr, rows, mask_t, N_, stride_r, stride_n, n, nm, r, scale,
                ROW_SCALE: tl.constexpr, R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, PREC: tl.constexpr):
    """acc + P[rows] N_ over the rank in R_CHUNK-wide K-steps (bounded registers for any r):
    P [T, r] fp32 rows (times ``scale * coef[:, c_col]`` when ROW_SCALE; rows off ``mask_t`` read as 0),
    N_ [r, N] through strides."""
    n64 = n.to(tl.int64)
    for j0 in tl.static_range(0, R_PAD, R_CHUNK):
        j = j0 + tl.arange(0, R_CHUNK)
        nr = tl.load(N_ + j[:, None] * stride_r + n64[None, :] * stride_n, mask=(j < r)[:, None] & nm[None, :],
                     other=0.0)
        p = K._load_rank(P, COEF, rows, mask_t, j, r, scale, c_col, ROW_SCALE)
        acc = tl.dot(p.to(nr.dtype), nr, acc, input_precision=PREC)
    return acc


@triton.jit
def _lora_start(rows, valid, n, nm, PS, PT, COEF, NS, stride_ns_r, stride_ns_n, NT, stride_nt_e, stride_nt_r,
                stride_nt_n, BIAS, DLOG, GW, stride_gw_j, stride_gw_n, TT, SEED, single, E, r, scale, thr, inv_keep,
                ROUTE: tl.constexpr, TASK: tl.constexpr, ROW_SCALE: tl.constexpr, DROPOUT: tl.constexpr,
                GATE_TERM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, PREC: tl.constexpr):
    """The accumulator's start value: the LoRA K-steps (rows scaled by ``scale * coef`` when
    ROW_SCALE; per expert present, rows masked to its tokens), the dropout mask on them
    (backward), the gate term ``dlog W_g`` and the bias."""
    acc = _rank_steps(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), PS, COEF, 0, rows, valid, NS, stride_ns_r,
                      stride_ns_n, n, nm, r, scale, ROW_SCALE, R_PAD, R_CHUNK, PREC)
    if TASK:
        if ROUTE == ROUTE_SINGLE:
            acc = _rank_steps(acc, PT, COEF, 1, rows, valid, NT + single.to(tl.int64) * stride_nt_e, stride_nt_r,
                              stride_nt_n, n, nm, r, scale, ROW_SCALE, R_PAD, R_CHUNK, PREC)
        else:
            tt, e_lo, e_hi = _task_span(TT, rows, valid, E)
            for e in range(e_lo, e_hi + 1):
                sel = tt == e
                if tl.max(sel.to(tl.int32), 0) > 0:
                    acc = _rank_steps(acc, PT, COEF, 1, rows, sel, NT + tl.cast(e, tl.int64) * stride_nt_e,
                                      stride_nt_r, stride_nt_n, n, nm, r, scale, ROW_SCALE, R_PAD, R_CHUNK, PREC)
    if DROPOUT:
        keep = _keep(_row_keys(rows, seed_key(SEED)), n, thr)
        acc = tl.where(keep, acc * inv_keep, 0.0)
    n64 = n.to(tl.int64)
    if GATE_TERM:
        rr = rows.to(tl.int64)
        d0 = tl.load(DLOG + rr * 2, mask=valid, other=0.0)
        d1 = tl.load(DLOG + rr * 2 + 1, mask=valid, other=0.0)
        g0 = tl.load(GW + n64 * stride_gw_n, mask=nm, other=0.0).to(tl.float32)
        g1 = tl.load(GW + stride_gw_j + n64 * stride_gw_n, mask=nm, other=0.0).to(tl.float32)
        acc += d0[:, None] * g0[None, :] + d1[:, None] * g1[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + n64, mask=nm, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit(do_not_specialize=["single", "thr"])
def _gemm_ptr_kernel(
    OUT, stride_ot, stride_on, A, stride_at, stride_ak, WB, stride_wk, stride_wn,
    PS, PT, COEF, NS, stride_ns_r, stride_ns_n, NT, stride_nt_e, stride_nt_r, stride_nt_n,
    BIAS, DLOG, GW, stride_gw_j, stride_gw_n, TT, SEED,
    single, T, E, N, K_, r, scale, thr, inv_keep,
    ROUTE: tl.constexpr, TASK: tl.constexpr, ROW_SCALE: tl.constexpr, DROPOUT: tl.constexpr,
    GATE_TERM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP: tl.constexpr, R_PAD: tl.constexpr, R_CHUNK: tl.constexpr,
    PREC: tl.constexpr,
):
    """OUT[m, n] = LoRA start (``_lora_start``) + sum_k A[m, k] WB[k, n], natural row order."""
    grid_m = tl.cdiv(T, BLOCK_M)
    pid_m, pid_n = K._swizzle(tl.program_id(0), grid_m, tl.cdiv(N, BLOCK_N), GROUP)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < T
    rr = rows.to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    n64 = n.to(tl.int64)
    acc = _lora_start(rows, valid, n, nm, PS, PT, COEF, NS, stride_ns_r, stride_ns_n, NT, stride_nt_e, stride_nt_r,
                      stride_nt_n, BIAS, DLOG, GW, stride_gw_j, stride_gw_n, TT, SEED, single, E, r, scale, thr,
                      inv_keep, ROUTE, TASK, ROW_SCALE, DROPOUT, GATE_TERM, HAS_BIAS, BLOCK_M, BLOCK_N, R_PAD, R_CHUNK,
                      PREC)
    for k0 in range(0, K_, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K_
        a = tl.load(A + rr[:, None] * stride_at + kk[None, :] * stride_ak, mask=valid[:, None] & km[None, :],
                    other=0.0)
        b = tl.load(WB + kk[:, None].to(tl.int64) * stride_wk + n64[None, :] * stride_wn,
                    mask=km[:, None] & nm[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    tl.store(OUT + rr[:, None] * stride_ot + n64[None, :] * stride_on, acc.to(OUT.dtype.element_ty),
             mask=valid[:, None] & nm[None, :])


@triton.jit(do_not_specialize=["single", "thr", "NUM_PROGS"])
def _gemm_tma_kernel(
    a_desc, b_desc, o_desc,
    PS, PT, COEF, NS, stride_ns_r, stride_ns_n, NT, stride_nt_e, stride_nt_r, stride_nt_n,
    BIAS, DLOG, GW, stride_gw_j, stride_gw_n, TT, SEED,
    single, T, E, N, K_, r, scale, thr, inv_keep,
    ROUTE: tl.constexpr, TASK: tl.constexpr, ROW_SCALE: tl.constexpr, DROPOUT: tl.constexpr,
    GATE_TERM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP: tl.constexpr, R_PAD: tl.constexpr, R_CHUNK: tl.constexpr,
    PREC: tl.constexpr, B_TRANS: tl.constexpr, NUM_PROGS,
):
    """Persistent TMA version of ``_gemm_ptr_kernel``: program p handles tiles p, p + NUM_PROGS, ...
    ``NUM_PROGS`` (the grid) is a runtime argument, not specialised: one binary serves every grid.
    ``b_desc`` blocks are [BLOCK_N, BLOCK_K] of W (B_TRANS: forward, x W^T) or
    [BLOCK_K, BLOCK_N] of W (dgrad, gy W). Out-of-range rows and columns are zero-filled by
    the TMA loads and clipped by the TMA store."""
    grid_m = tl.cdiv(T, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K_, BLOCK_K)
    for tile in range(tl.program_id(0), grid_m * grid_n, NUM_PROGS):
        pid_m, pid_n = K._swizzle(tile, grid_m, grid_n, GROUP)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows = off_m + tl.arange(0, BLOCK_M)
        n = off_n + tl.arange(0, BLOCK_N)
        acc = _lora_start(rows, rows < T, n, n < N, PS, PT, COEF, NS, stride_ns_r, stride_ns_n, NT, stride_nt_e,
                          stride_nt_r, stride_nt_n, BIAS, DLOG, GW, stride_gw_j, stride_gw_n, TT, SEED, single, E, r,
                          scale, thr, inv_keep, ROUTE, TASK, ROW_SCALE, DROPOUT, GATE_TERM, HAS_BIAS, BLOCK_M,
                          BLOCK_N, R_PAD, R_CHUNK, PREC)
        for kt in range(0, k_tiles):
            a = a_desc.load([off_m, kt * BLOCK_K])
            if B_TRANS:
                b = b_desc.load([off_n, kt * BLOCK_K])
                acc = tl.dot(a, b.T, acc, input_precision=PREC)
            else:
                b = b_desc.load([kt * BLOCK_K, off_n])
                acc = tl.dot(a, b, acc, input_precision=PREC)
        o_desc.store([off_m, off_n], acc.to(o_desc.dtype))
