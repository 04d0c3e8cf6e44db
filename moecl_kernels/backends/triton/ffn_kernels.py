"""Triton kernels of the FFN-level op (docs/spec.md §1.3; ``contract/ffn_args.py``).

The base GEMMs stay with cuBLAS and the rank-r shrinks/expands of x, gy and y/dx with the
linear op's kernels (``kernels.py``); these kernels are the passes over the [T, d_ff] tiles of
the base pre-activations g and u, where the experts differ:

``_ffn_fwd_kernel``   programs = token blocks (grouped by expert as in ``kernels.py``) x
    d_ff splits; each walks its d_ff range in BLOCK_F chunks: adds the rank-r terms of the
    shared and the routed expert to g and u (s a B^T), applies the activation per expert,
    writes the mixed h = h_s + c_t (h_t - h_s) once and accumulates the down-LoRA shrinks
    z_e = h~_e A_down,e^T (h~: the down dropout mask) in registers.
``_ffn_bwd_kernel``   the mirror: from dh = gy W_down (cuBLAS) and q = s gy B_down (the linear
    shrink) it recomputes h_e, forms dL/dh_e = c_e dh + keep(dz_e A_down,e) / (1 - p) (+ the
    pooled-output gradient), writes dg and du once (for the cuBLAS dgrad GEMMs) and
    accumulates da = s [dpg B_gate, dpu B_up] per expert and the gate's dL/dc_e.
``_ffn_wgrad_kernel`` programs = d_ff blocks, each walking every token once (grouped by
    expert): the same recomputation, reduced over tokens into dB_gate, dB_up (rows of the
    block) and dA_down (columns of the block) of the shared expert and of each trainable
    expert. Deterministic (no atomics), every output element written (zeros included).

The device functions they share (activations, the per-tile recomputation and its backward,
token blocks, rank-r loads) are in ``ffn_tiles.py``.

Without a gate both experts' terms go into one evaluation (``MOE_GATE=False``). A d_ff split
(``PARTIAL``) writes fp32 partials that the host sums (decode: few token blocks).

GPU safety (as the linear kernels after issue 15): the dropout seed is read from device memory
(``SEED``), token rows read through ``sorted_idx`` are bounds-checked, block ranges clamped to
[0, T], row offsets are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .ffn_tiles import (  # noqa: F401  (ACT_CODES: the host side reads it here)
    ACT_CODES, _block_ranks, _chunk_fr, _down_keys, _hidden, _load_tiles, _pool_rows, _pre_acts, _rank_cols,
    _store_fr, _tile_backward, _token_block,
)
from .kernels import ROUTE_SINGLE, _keep, _rows


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit(do_not_specialize=["single"])
def _ffn_fwd_kernel(
    G, U, H, HS, A_S, A_T, COEF, Z_S, Z_T, WS,
    BGS, BGT, BUS, BUT, s_be, s_bf, s_br,
    ADS, ADT, s_ae, s_ar, s_af,
    SEED, sorted_ptr, offsets_ptr, single, T, E, F, r, f_per_split, scale, thr, inv_keep,
    ACT: tl.constexpr, ROUTE: tl.constexpr, TASK: tl.constexpr, MOE_GATE: tl.constexpr, GATED_MLP: tl.constexpr,
    DROPOUT: tl.constexpr, POOL: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr, R_PAD: tl.constexpr, G_PAD: tl.constexpr, PREC: tl.constexpr,
):
    """h (and h_s with POOL) over this program's d_ff range; z_s, z_t (or PARTIAL fp32 sums in WS)."""
    pid_f = tl.program_id(1)
    expert, rr, valid = _token_block(tl.program_id(0), sorted_ptr, offsets_ptr, single, T, E, BLOCK_T, G_PAD, ROUTE)
    if tl.max(valid.to(tl.int32), 0) == 0:
        return
    has, j, jm, jm_t, ex, sa_gs, sa_us, sa_gt, sa_ut = _block_ranks(expert, rr, valid, A_S, A_T, BUS, r, scale,
                                                                    BLOCK_T, R_PAD, GATED_MLP)
    NPRE: tl.constexpr = 2 if GATED_MLP else 1
    dt = BUS.dtype.element_ty
    c_t = tl.load(COEF + rr * 2 + 1, mask=valid, other=0.0)
    if DROPOUT:
        keys = _down_keys(SEED, rr)
    z_s = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    z_t = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    f_lo = pid_f * f_per_split
    f_hi = tl.minimum(f_lo + f_per_split, F)
    for f0 in range(f_lo, f_hi, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        fm = f < f_hi
        f64 = f.to(tl.int64)
        g, u, _ = _load_tiles(G, U, U, rr, valid, f64, fm, F, GATED_MLP, False)
        bgs = _chunk_fr(BGS, 0, 0, s_bf, s_br, f64, fm, jm, R_PAD)
        bus = _chunk_fr(BUS, 0, 0, s_bf, s_br, f64, fm, jm, R_PAD)
        ads = _chunk_fr(ADS, 0, 0, s_af, s_ar, f64, fm, jm, R_PAD)
        pg, pu = _pre_acts(g, u, sa_gs, sa_us, bgs, bus, GATED_MLP, PREC)
        if TASK:
            bgt = _chunk_fr(BGT, ex, s_be, s_bf, s_br, f64, fm, jm_t, R_PAD)
            but = _chunk_fr(BUT, ex, s_be, s_bf, s_br, f64, fm, jm_t, R_PAD)
            adt = _chunk_fr(ADT, ex, s_ae, s_af, s_ar, f64, fm, jm_t, R_PAD)
        if MOE_GATE:  # h = h_s + c_t (h_t - h_s)
            h_s, _a, _d = _hidden(pg, pu, ACT, GATED_MLP)
            h_t = h_s
            h = h_s
            if TASK:
                pg_t, pu_t = _pre_acts(g, u, sa_gt, sa_ut, bgt, but, GATED_MLP, PREC)
                h_t, _a, _d = _hidden(pg_t, pu_t, ACT, GATED_MLP)
                h = h_s + c_t[:, None] * (h_t - h_s)
        else:  # one MLP carrying both experts' terms
            if TASK:
                pg += tl.dot(sa_gt, tl.trans(bgt), input_precision=PREC)
                pu += tl.dot(sa_ut, tl.trans(but), input_precision=PREC)
            h_s, _a, _d = _hidden(pg, pu, ACT, GATED_MLP)
            h_t = h_s
            h = h_s
        off = rr[:, None] * F + f64[None, :]
        m2 = valid[:, None] & fm[None, :]
        tl.store(H + off, h.to(H.dtype.element_ty), mask=m2)
        if POOL:
            tl.store(HS + off, h_s.to(HS.dtype.element_ty), mask=m2)
        if DROPOUT:
            keep = _keep(keys, f, thr)
            h_s = tl.where(keep, h_s, 0.0)
            h_t = tl.where(keep, h_t, 0.0)
        z_s = tl.dot(h_s.to(dt), ads, z_s, input_precision=PREC)
        if TASK:
            z_t = tl.dot(h_t.to(dt), adt, z_t, input_precision=PREC)
    if DROPOUT:
        z_s *= inv_keep
        z_t *= inv_keep
    z_t = tl.where(has[:, None], z_t, 0.0)
    m2 = valid[:, None] & jm[None, :]
    if PARTIAL:
        base = WS + (pid_f * T + rr) * (2 * R_PAD)
        tl.store(base[:, None] + j[None, :], z_s, mask=m2)
        tl.store(base[:, None] + R_PAD + j[None, :], z_t, mask=m2)
    else:
        tl.store(Z_S + rr[:, None] * r + j[None, :], z_s, mask=m2)
        tl.store(Z_T + rr[:, None] * r + j[None, :], z_t, mask=m2)


# ---------------------------------------------------------------------------------------------
# backward: dg, du, da, dlog


@triton.jit(do_not_specialize=["single"])
def _ffn_bwd_kernel(
    G, U, DH, DG, DU, A_S, A_T, COEF, QS, QT, Z_S, Z_T, DA_S, DA_T, DLOG, WS,
    POOLW, GHP, GZP, S,
    BGS, BGT, BUS, BUT, s_be, s_bf, s_br,
    ADS, ADT, s_ae, s_ar, s_af,
    SEED, sorted_ptr, offsets_ptr, single, T, E, F, r, f_per_split, scale, thr, inv_keep,
    ACT: tl.constexpr, ROUTE: tl.constexpr, TASK: tl.constexpr, MOE_GATE: tl.constexpr, GATED_MLP: tl.constexpr,
    DROPOUT: tl.constexpr, POOL_H: tl.constexpr, POOL_Z: tl.constexpr, NEED_GATE: tl.constexpr,
    PARTIAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, R_PAD: tl.constexpr, G_PAD: tl.constexpr,
    PREC: tl.constexpr,
):
    """dg, du over this program's d_ff range; da_s, da_t, dlog (or PARTIAL fp32 sums in WS:
    [da_gs, da_us, da_gt, da_ut (R_PAD each), gbeta_s, gbeta_t])."""
    pid_f = tl.program_id(1)
    expert, rr, valid = _token_block(tl.program_id(0), sorted_ptr, offsets_ptr, single, T, E, BLOCK_T, G_PAD, ROUTE)
    if tl.max(valid.to(tl.int32), 0) == 0:
        return
    has, j, jm, jm_t, ex, sa_gs, sa_us, sa_gt, sa_ut = _block_ranks(expert, rr, valid, A_S, A_T, BUS, r, scale,
                                                                    BLOCK_T, R_PAD, GATED_MLP)
    NPRE: tl.constexpr = 2 if GATED_MLP else 1
    dt = BUS.dtype.element_ty
    c_s = tl.load(COEF + rr * 2, mask=valid, other=0.0)
    c_t = tl.load(COEF + rr * 2 + 1, mask=valid, other=0.0)
    qs_s = _rank_cols(QS, rr, valid, r, 0, r, R_PAD)
    qs_t = _rank_cols(QT, rr, valid, r, 0, r, R_PAD)
    dz_s = c_s[:, None] * qs_s
    dz_t = c_t[:, None] * qs_t
    w = c_s * 0.0
    if POOL_Z:
        w, gz = _pool_rows(POOLW, GZP, rr, valid, S, r, R_PAD)
        dz_s += w[:, None] * gz
    if POOL_H:
        w = tl.load(POOLW + rr, mask=valid, other=0.0)
    keys = rr.to(tl.uint32)
    if DROPOUT:
        keys = _down_keys(SEED, rr)
    da_gs = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    da_us = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    da_gt = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    da_ut = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    gb_s = tl.zeros([BLOCK_T], tl.float32)
    gb_t = tl.zeros([BLOCK_T], tl.float32)
    f_lo = pid_f * f_per_split
    f_hi = tl.minimum(f_lo + f_per_split, F)
    for f0 in range(f_lo, f_hi, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        fm = f < f_hi
        f64 = f.to(tl.int64)
        m2 = valid[:, None] & fm[None, :]
        off = rr[:, None] * F + f64[None, :]
        g, u, dh = _load_tiles(G, U, DH, rr, valid, f64, fm, F, GATED_MLP, True)
        bgs = _chunk_fr(BGS, 0, 0, s_bf, s_br, f64, fm, jm, R_PAD)
        bus = _chunk_fr(BUS, 0, 0, s_bf, s_br, f64, fm, jm, R_PAD)
        ads = _chunk_fr(ADS, 0, 0, s_af, s_ar, f64, fm, jm, R_PAD)
        bgt, but, adt = bgs, bus, ads
        if TASK:
            bgt = _chunk_fr(BGT, ex, s_be, s_bf, s_br, f64, fm, jm_t, R_PAD)
            but = _chunk_fr(BUT, ex, s_be, s_bf, s_br, f64, fm, jm_t, R_PAD)
            adt = _chunk_fr(ADT, ex, s_ae, s_af, s_ar, f64, fm, jm_t, R_PAD)
        keep = m2
        if DROPOUT:
            keep = _keep(keys, f, thr)
        extra = dh * 0.0
        if POOL_H:
            extra = w[:, None] * tl.load(GHP + (rr // S)[:, None] * F + f64[None, :], mask=m2, other=0.0)
        h_s, h_t, dpg_s, dpu_s, dpg_t, dpu_t = _tile_backward(
            g, u, dh, sa_gs, sa_us, sa_gt, sa_ut, bgs, bus, bgt, but, ads, adt, dz_s, dz_t, c_s, c_t, keep, extra,
            inv_keep, ACT, GATED_MLP, MOE_GATE, TASK, DROPOUT, PREC)
        if MOE_GATE:
            dpg, dpu = dpg_s + dpg_t, dpu_s + dpu_t
        else:
            dpg, dpu = dpg_s, dpu_s
        tl.store(DU + off, dpu.to(DU.dtype.element_ty), mask=m2)
        if GATED_MLP:
            tl.store(DG + off, dpg.to(DG.dtype.element_ty), mask=m2)
            da_gs = tl.dot(dpg_s.to(dt), bgs, da_gs, input_precision=PREC)
        da_us = tl.dot(dpu_s.to(dt), bus, da_us, input_precision=PREC)
        if TASK:
            if GATED_MLP:
                da_gt = tl.dot(dpg_t.to(dt), bgt, da_gt, input_precision=PREC)
            da_ut = tl.dot(dpu_t.to(dt), but, da_ut, input_precision=PREC)
        if NEED_GATE:  # dL/dc_e = <dh, h_e> + s <q_e, z_e>: the first term here
            gb_s += tl.sum(tl.where(m2, dh * h_s, 0.0), 1)
            gb_t += tl.sum(tl.where(m2, dh * h_t, 0.0), 1)
    da_gs *= scale
    da_us *= scale
    da_gt = tl.where(has[:, None], da_gt * scale, 0.0)
    da_ut = tl.where(has[:, None], da_ut * scale, 0.0)
    if PARTIAL:
        W: tl.constexpr = 4 * R_PAD + 2
        base = WS + (pid_f * T + rr) * W
        m2 = valid[:, None] & (j < R_PAD)[None, :]
        tl.store(base[:, None] + j[None, :], da_gs, mask=m2)
        tl.store(base[:, None] + R_PAD + j[None, :], da_us, mask=m2)
        tl.store(base[:, None] + 2 * R_PAD + j[None, :], da_gt, mask=m2)
        tl.store(base[:, None] + 3 * R_PAD + j[None, :], da_ut, mask=m2)
        tl.store(base + 4 * R_PAD, gb_s, mask=valid)
        tl.store(base + 4 * R_PAD + 1, gb_t, mask=valid)
    else:
        _bwd_epilogue(da_gs, da_us, da_gt, da_ut, gb_s, gb_t, rr, valid, has, qs_s, qs_t, Z_S, Z_T, COEF, DA_S, DA_T,
                      DLOG, r, GATED_MLP, NEED_GATE, R_PAD)


@triton.jit
def _bwd_epilogue(da_gs, da_us, da_gt, da_ut, gb_s, gb_t, rr, valid, has, qs_s, qs_t, Z_S, Z_T, COEF, DA_S, DA_T,
                  DLOG, r, GATED_MLP: tl.constexpr, NEED_GATE: tl.constexpr, R_PAD: tl.constexpr):
    """Store da_s = [da_gs | da_us], da_t likewise, and with NEED_GATE the logit gradients
    dlog = c (gbeta - <c, gbeta>) (0 without a task), gbeta_e += s <q_e, z_e>."""
    j = tl.arange(0, R_PAD)
    m2 = valid[:, None] & (j < r)[None, :]
    NPRE: tl.constexpr = 2 if GATED_MLP else 1
    row = rr[:, None] * (NPRE * r)
    if GATED_MLP:
        tl.store(DA_S + row + j[None, :], da_gs, mask=m2)
        tl.store(DA_T + row + j[None, :], da_gt, mask=m2)
    tl.store(DA_S + row + (NPRE - 1) * r + j[None, :], da_us, mask=m2)
    tl.store(DA_T + row + (NPRE - 1) * r + j[None, :], da_ut, mask=m2)
    if NEED_GATE:
        z_s = _rank_cols(Z_S, rr, valid, r, 0, r, R_PAD)
        z_t = _rank_cols(Z_T, rr, valid, r, 0, r, R_PAD)
        gb_s += tl.sum(qs_s * z_s, 1)
        gb_t += tl.sum(qs_t * z_t, 1)
        c0 = tl.load(COEF + rr * 2, mask=valid, other=0.0)
        c1 = tl.load(COEF + rr * 2 + 1, mask=valid, other=0.0)
        dot = c0 * gb_s + c1 * gb_t
        tl.store(DLOG + rr * 2, tl.where(has, c0 * (gb_s - dot), 0.0), mask=valid)
        tl.store(DLOG + rr * 2 + 1, tl.where(has, c1 * (gb_t - dot), 0.0), mask=valid)


@triton.jit
def _ffn_bwd_finalize_kernel(
    WS, splits, token_task, QS, QT, Z_S, Z_T, COEF, DA_S, DA_T, DLOG, T, r,
    GATED_MLP: tl.constexpr, NEED_GATE: tl.constexpr, BLOCK_T: tl.constexpr, R_PAD: tl.constexpr,
):
    """Sum the d_ff splits of ``_ffn_bwd_kernel`` (fixed order) and run its epilogue."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = rows < T
    rr = rows.to(tl.int64)
    j = tl.arange(0, R_PAD)
    W: tl.constexpr = 4 * R_PAD + 2
    da_gs = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    da_us = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    da_gt = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    da_ut = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    gb_s = tl.zeros([BLOCK_T], tl.float32)
    gb_t = tl.zeros([BLOCK_T], tl.float32)
    for s in range(splits):
        base = WS + (s * T + rr) * W
        da_gs += tl.load(base[:, None] + j[None, :], mask=valid[:, None], other=0.0)
        da_us += tl.load(base[:, None] + R_PAD + j[None, :], mask=valid[:, None], other=0.0)
        da_gt += tl.load(base[:, None] + 2 * R_PAD + j[None, :], mask=valid[:, None], other=0.0)
        da_ut += tl.load(base[:, None] + 3 * R_PAD + j[None, :], mask=valid[:, None], other=0.0)
        gb_s += tl.load(base + 4 * R_PAD, mask=valid, other=0.0)
        gb_t += tl.load(base + 4 * R_PAD + 1, mask=valid, other=0.0)
    has = tl.load(token_task + rows, mask=valid, other=-1) >= 0
    qs_s = _rank_cols(QS, rr, valid, r, 0, r, R_PAD)
    qs_t = _rank_cols(QT, rr, valid, r, 0, r, R_PAD)
    _bwd_epilogue(da_gs, da_us, da_gt, da_ut, gb_s, gb_t, rr, valid, has, qs_s, qs_t, Z_S, Z_T, COEF, DA_S, DA_T,
                  DLOG, r, GATED_MLP, NEED_GATE, R_PAD)


# ---------------------------------------------------------------------------------------------
# weight gradients of the gate/up B and the down A: per d_ff block and token chunk, fp32 partial
# sums in fixed slots, then one reduce launch that adds them in chunk order (no atomics)


@triton.jit
def _part_ptrs(P, slot, which, f64, F, R_PAD: tl.constexpr):
    """Pointers of rows f of partial ``which`` (0 gate dB, 1 up dB, 2 down dA^T) in slot ``slot`` of a
    [slots, 3, F, R_PAD] fp32 buffer."""
    row = f64 + (slot * 3 + which) * F  # int64 from here (f64); slots x 3 x F < 2^31 (the host checks)
    return P + row[:, None] * R_PAD + tl.arange(0, R_PAD)[None, :]


@triton.jit
def _store_parts(P, slot, acc_g, acc_u, acc_d, f64, fm, F, R_PAD: tl.constexpr):
    tl.store(_part_ptrs(P, slot, 0, f64, F, R_PAD), acc_g, mask=fm[:, None])
    tl.store(_part_ptrs(P, slot, 1, f64, F, R_PAD), acc_u, mask=fm[:, None])
    tl.store(_part_ptrs(P, slot, 2, f64, F, R_PAD), acc_d, mask=fm[:, None])


# ---------------------------------------------------------------------------------------------
# weight gradients of the gate/up B and the down A, per d_ff block, over every token


@triton.jit(do_not_specialize=["single"])
def _ffn_wgrad_kernel(
    G, U, DH, A_S, A_T, COEF, QS, QT, POOLW, GHP, GZP, S,
    BGS, BGT, BUS, BUT, s_be, s_bf, s_br,
    ADS, ADT, s_ae, s_ar, s_af,
    PART_S, PART_T, CHUNK, TRAIN,
    SEED, offsets_ptr, sorted_ptr, single, T, E, F, r, scale, thr, inv_keep,
    ACT: tl.constexpr, ROUTE: tl.constexpr, TASK: tl.constexpr, MOE_GATE: tl.constexpr, GATED_MLP: tl.constexpr,
    DROPOUT: tl.constexpr, POOL_H: tl.constexpr, POOL_Z: tl.constexpr, DO_SHARED: tl.constexpr,
    DO_TASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, R_PAD: tl.constexpr,
    PREC: tl.constexpr,
):
    """For the d_ff block (axis 0) and the token chunk c (axis 1: grouped positions [c CHUNK,
    (c + 1) CHUNK), expert 0..E-1, then no task) of this program: fp32 partial sums of dB_gate,
    dB_up (rows) and dA_down^T of the shared expert (DO_SHARED) into slot c of PART_S (always
    written), and of every trainable task expert e with tokens in the chunk (DO_TASK, TRAIN[e] >= 0)
    into slot c + e of PART_T -- unique: a later chunk can only hold the same or a later expert.
    ``_ffn_wgrad_reduce_kernel`` adds the slots in chunk order and writes the gradients."""
    f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    c_lo = tl.program_id(1) * CHUNK
    c_hi = tl.minimum(c_lo + CHUNK, T)
    fm = f < F
    f64 = f.to(tl.int64)
    j = tl.arange(0, R_PAD)
    jm = j < r
    NPRE: tl.constexpr = 2 if GATED_MLP else 1
    dt = BUS.dtype.element_ty
    bgs = _chunk_fr(BGS, 0, 0, s_bf, s_br, f64, fm, jm, R_PAD)
    bus = _chunk_fr(BUS, 0, 0, s_bf, s_br, f64, fm, jm, R_PAD)
    ads = _chunk_fr(ADS, 0, 0, s_af, s_ar, f64, fm, jm, R_PAD)
    acc_gs = tl.zeros([BLOCK_F, R_PAD], tl.float32)
    acc_us = tl.zeros([BLOCK_F, R_PAD], tl.float32)
    acc_ds = tl.zeros([BLOCK_F, R_PAD], tl.float32)  # dA_down^T
    n_groups = E + 1
    if ROUTE == ROUTE_SINGLE:
        n_groups = 1
    for grp in range(0, n_groups):
        if ROUTE == ROUTE_SINGLE:
            expert = single
            lo = 0
            hi = T
        else:
            expert = tl.where(grp < E, grp, -1)
            lo = tl.minimum(tl.maximum(tl.load(offsets_ptr + grp), 0), T)
            hi = tl.where(grp < E, tl.load(offsets_ptr + tl.minimum(grp + 1, E)), T)
            hi = tl.minimum(tl.maximum(hi, lo), T)
        lo = tl.maximum(lo, c_lo)  # this chunk's part of the group (empty when hi <= lo)
        hi = tl.minimum(hi, c_hi)
        ex = tl.maximum(expert, 0).to(tl.int64)
        train = expert < -1  # False
        if DO_TASK:
            train = (expert >= 0) & (tl.load(TRAIN + ex) >= 0)
        todo = train
        if DO_SHARED:
            todo = expert > -2  # True: the shared expert needs every token
        # the routed expert's weights: needed to recompute its evaluation (and, ungated, the shared one's)
        jm_t = jm & ((tl.zeros_like(j) + expert) >= 0)
        bgt, but, adt = bgs * 0, bus * 0, ads * 0
        if TASK:
            bgt = _chunk_fr(BGT, ex, s_be, s_bf, s_br, f64, fm, jm_t, R_PAD)
            but = _chunk_fr(BUT, ex, s_be, s_bf, s_br, f64, fm, jm_t, R_PAD)
            adt = _chunk_fr(ADT, ex, s_ae, s_af, s_ar, f64, fm, jm_t, R_PAD)
        acc_gt = tl.zeros([BLOCK_F, R_PAD], tl.float32)
        acc_ut = tl.zeros([BLOCK_F, R_PAD], tl.float32)
        acc_dt = tl.zeros([BLOCK_F, R_PAD], tl.float32)
        if todo & (lo < hi):
            for p0 in range(lo, hi, BLOCK_T):
                pos = p0 + tl.arange(0, BLOCK_T)
                rows, valid = _rows(sorted_ptr, pos, pos < hi, T, ROUTE)
                rr = rows.to(tl.int64)
                a_gs = scale * _rank_cols(A_S, rr, valid, NPRE * r, 0, r, R_PAD)
                a_us = scale * _rank_cols(A_S, rr, valid, NPRE * r, (NPRE - 1) * r, r, R_PAD)
                a_gt = scale * _rank_cols(A_T, rr, valid, NPRE * r, 0, r, R_PAD)
                a_ut = scale * _rank_cols(A_T, rr, valid, NPRE * r, (NPRE - 1) * r, r, R_PAD)
                c_s = tl.load(COEF + rr * 2, mask=valid, other=0.0)
                c_t = tl.load(COEF + rr * 2 + 1, mask=valid, other=0.0)
                dz_s = c_s[:, None] * _rank_cols(QS, rr, valid, r, 0, r, R_PAD)
                dz_t = c_t[:, None] * _rank_cols(QT, rr, valid, r, 0, r, R_PAD)
                w = c_s * 0.0
                if POOL_Z:
                    w, gz = _pool_rows(POOLW, GZP, rr, valid, S, r, R_PAD)
                    dz_s += w[:, None] * gz
                if POOL_H:
                    w = tl.load(POOLW + rr, mask=valid, other=0.0)
                m2 = valid[:, None] & fm[None, :]
                g, u, dh = _load_tiles(G, U, DH, rr, valid, f64, fm, F, GATED_MLP, True)
                keep = m2
                if DROPOUT:
                    keep = _keep(_down_keys(SEED, rr), f, thr)
                extra = dh * 0.0
                if POOL_H:
                    extra = w[:, None] * tl.load(GHP + (rr // S)[:, None] * F + f64[None, :], mask=m2, other=0.0)
                h_s, h_t, dpg_s, dpu_s, dpg_t, dpu_t = _tile_backward(
                    g, u, dh, a_gs.to(dt), a_us.to(dt), a_gt.to(dt), a_ut.to(dt), bgs, bus, bgt, but, ads, adt,
                    dz_s, dz_t, c_s, c_t, keep, extra, inv_keep, ACT, GATED_MLP, MOE_GATE, TASK, DROPOUT, PREC)
                if DROPOUT:
                    h_s = tl.where(keep, h_s, 0.0)
                    h_t = tl.where(keep, h_t, 0.0)
                h_s = tl.where(m2, h_s, 0.0)
                h_t = tl.where(m2, h_t, 0.0)
                if DO_SHARED:
                    if GATED_MLP:
                        acc_gs = tl.dot(tl.trans(dpg_s.to(dt)), a_gs.to(dt), acc_gs, input_precision=PREC)
                    acc_us = tl.dot(tl.trans(dpu_s.to(dt)), a_us.to(dt), acc_us, input_precision=PREC)
                    acc_ds = tl.dot(tl.trans(h_s.to(dt)), dz_s.to(dt), acc_ds, input_precision=PREC)
                if train:
                    if GATED_MLP:
                        acc_gt = tl.dot(tl.trans(dpg_t.to(dt)), a_gt.to(dt), acc_gt, input_precision=PREC)
                    acc_ut = tl.dot(tl.trans(dpu_t.to(dt)), a_ut.to(dt), acc_ut, input_precision=PREC)
                    acc_dt = tl.dot(tl.trans(h_t.to(dt)), dz_t.to(dt), acc_dt, input_precision=PREC)
        if DO_TASK:
            if train & (lo < hi):
                _store_parts(PART_T, tl.program_id(1) + grp, acc_gt, acc_ut, acc_dt, f64, fm, F, R_PAD)
    if DO_SHARED:
        _store_parts(PART_S, tl.program_id(1), acc_gs, acc_us, acc_ds, f64, fm, F, R_PAD)


@triton.jit(do_not_specialize=["single"])
def _ffn_wgrad_reduce_kernel(
    PART_S, PART_T, O_BGS, O_BUS, O_ADS, O_BGT, O_BUT, O_ADT, so_be, so_bf, so_br, so_ae, so_ar, so_af, TRAIN,
    offsets_ptr, single, n_chunks, CHUNK, T, E, F, r, inv_keep,
    ROUTE: tl.constexpr, GATED_MLP: tl.constexpr, DROPOUT: tl.constexpr, DO_SHARED: tl.constexpr,
    DO_TASK: tl.constexpr, BLOCK_F: tl.constexpr, R_PAD: tl.constexpr,
):
    """Program (d_ff block, k): k = 0 the shared expert (every chunk's slot), k = 1 + e task expert e
    (the slots of the chunks that hold its tokens; zeros for a frozen expert or one without tokens),
    added in chunk order and written in the gradients' dtype (dA_down / (1 - p) under dropout)."""
    f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    fm = f < F
    f64 = f.to(tl.int64)
    k = tl.program_id(1)
    acc_g = tl.zeros([BLOCK_F, R_PAD], tl.float32)
    acc_u = tl.zeros([BLOCK_F, R_PAD], tl.float32)
    acc_d = tl.zeros([BLOCK_F, R_PAD], tl.float32)
    m = fm[:, None]
    if k == 0:
        if DO_SHARED:
            for cc in range(0, n_chunks):
                acc_g += tl.load(_part_ptrs(PART_S, cc, 0, f64, F, R_PAD), mask=m, other=0.0)
                acc_u += tl.load(_part_ptrs(PART_S, cc, 1, f64, F, R_PAD), mask=m, other=0.0)
                acc_d += tl.load(_part_ptrs(PART_S, cc, 2, f64, F, R_PAD), mask=m, other=0.0)
            if DROPOUT:
                acc_d *= inv_keep
            if GATED_MLP:
                _store_fr(O_BGS, 0, 0, so_bf, so_br, acc_g, f64, fm, r, R_PAD)
            _store_fr(O_BUS, 0, 0, so_bf, so_br, acc_u, f64, fm, r, R_PAD)
            _store_fr(O_ADS, 0, 0, so_af, so_ar, acc_d, f64, fm, r, R_PAD)
    else:
        if DO_TASK:
            e = k - 1
            if ROUTE == ROUTE_SINGLE:  # one group, slot c + 0
                lo = 0
                hi = tl.where(e == single, T, 0)
                grp = 0
            else:  # the bounds the wgrad kernel clamped
                lo = tl.minimum(tl.maximum(tl.load(offsets_ptr + e), 0), T)
                hi = tl.minimum(tl.maximum(tl.load(offsets_ptr + e + 1), lo), T)
                grp = e
            hi = tl.where(tl.load(TRAIN + e) >= 0, hi, lo)  # frozen: no slot read, zeros written
            for cc in range(0, n_chunks):  # a slot is read only where the chunk holds the expert's tokens
                ok = (tl.maximum(lo, cc * CHUNK) < tl.minimum(hi, cc * CHUNK + CHUNK)).to(tl.int32)
                mc = m & ((tl.zeros_like(f)[:, None] + ok) != 0)
                acc_g += tl.load(_part_ptrs(PART_T, cc + grp, 0, f64, F, R_PAD), mask=mc, other=0.0)
                acc_u += tl.load(_part_ptrs(PART_T, cc + grp, 1, f64, F, R_PAD), mask=mc, other=0.0)
                acc_d += tl.load(_part_ptrs(PART_T, cc + grp, 2, f64, F, R_PAD), mask=mc, other=0.0)
            if DROPOUT:
                acc_d *= inv_keep
            e64 = e.to(tl.int64)
            if GATED_MLP:
                _store_fr(O_BGT, e64, so_be, so_bf, so_br, acc_g, f64, fm, r, R_PAD)
            _store_fr(O_BUT, e64, so_be, so_bf, so_br, acc_u, f64, fm, r, R_PAD)
            _store_fr(O_ADT, e64, so_ae, so_af, so_ar, acc_d, f64, fm, r, R_PAD)
