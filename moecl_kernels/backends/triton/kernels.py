"""Triton kernels of the fused MoE-LoRA op.

Three kernels do the work, each written once and used by both passes through its
``constexpr`` switches, plus two small reductions (``backend.py`` launches them):

``_shrink_kernel``   [T, K] x (shared, routed) [K, r]  (+ gate logits)   -> rank-r rows
    forward:  x  -> h_s, h_t, coef      (dropout in-kernel, gate softmax in the epilogue)
    backward: gy -> dh_s, dh_t, dlogits (gy B_s, gy B_t scaled by the gates; softmax backward)
    Split-K (the decode path) writes fp32 partials that ``_shrink_finalize_kernel`` sums
    before running the same epilogue.
``_expand_kernel``   rank-r rows x (shared, routed) [r, N] -> [T, N], written once
    forward:  y  = b + s c_s h_s B_s^T + s c_t h_t B_t^T      (+ x W^T when FUSED_BASE)
    backward: dx = keep * (dh_s A_s + dh_t A_t) / (1 - p) + dlog W_g  (+ gy W when FUSED_BASE)
    Without FUSED_BASE the base GEMM accumulates on top through cuBLAS (``addmm_``, beta = 1).
``_wgrad_kernel``    ragged per-expert reductions over tokens, fp32 accumulation
    A-mode: dA_s = dh_s^T x~, dA_t = dh_t^T x~ (per expert), dW_g = dlog^T x   (x read once)
    B-mode: dB_s = gy^T (s c_s h_s), dB_t = gy^T (s c_t h_t)                  (gy read once)
    Each chunk of tokens writes fp32 partials to its own slot; ``_wgrad_reduce_kernel`` (one
    launch per wgrad) sums them in a fixed order into every gradient in its final dtype, zeros
    included: no atomics, no zero-fill or cast launches, bitwise reproducible.

Routing (``ROUTE``): ``ROUTE_SINGLE`` when every token has the same expert (or none):
rows are 0..T-1 and no index is read. ``ROUTE_GROUPED`` otherwise: program ``pid`` finds
its expert and token block from ``expert_offsets`` on the device (``_block_of``), and
reads token rows through ``sorted_idx`` -- nothing is permuted in memory and nothing is
synchronised with the host. Blocks never straddle two experts; the grid is sized for the
worst case (``cdiv(T, BLOCK) + E + 1``) and surplus programs return at once.

Bounds: a stale or corrupt routing (replayed in a CUDA graph) gives wrong numbers, never an
out-of-bounds access: as in the CUDA kernels, offsets are clamped to [0, T] and made
non-decreasing, a ``sorted_idx`` entry outside [0, T) is skipped, and the wgrad reduction
never reads past its slots. Token rows and every stride product that can reach T x d_in are
int64 (a strided x with T * d_in >= 2**31 elements is addressed correctly).

Dropout is the counter hash of ``ops/dropout.py`` in uint32 arithmetic (bit-exact with it):
row = token index, col = feature index. The seed is read from device memory (``SEED``, int64,
used mod 2**32), never passed by value: a CUDA graph replays with the seed tensor's contents.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dropout_hash import _drop, _keep, _row_keys, _seed_key  # noqa: F401  (kernels and tests use them)

# Module constants a @triton.jit function reads must be tl.constexpr; launchers use ``.value``.
ROUTE_SINGLE = tl.constexpr(0)
ROUTE_GROUPED = tl.constexpr(1)

MODE_FWD = tl.constexpr(0)
MODE_BWD = tl.constexpr(1)

GATE_PAD = tl.constexpr(16)  # the two gate columns padded to the smallest tl.dot width


# ---------------------------------------------------------------------------------------------
# routing


@triton.jit
def _group_schedule(offsets_ptr, T, E, BLOCK: tl.constexpr, G_PAD: tl.constexpr):
    """Position ranges [lo, hi) of groups 0..E (E = tokens without a task), their block
    counts ``nb`` and the index of each group's first block (vectors of length G_PAD).
    Offsets are clamped like the CUDA kernels' (``find_tile``): 0 <= lo <= hi <= T."""
    g = tl.arange(0, G_PAD)
    lo = tl.load(offsets_ptr + g, mask=g <= E, other=T)
    hi = tl.load(offsets_ptr + g + 1, mask=g < E, other=T)
    lo = tl.minimum(tl.maximum(lo, 0), T)
    hi = tl.minimum(tl.maximum(hi, lo), T)
    nb = (hi - lo + BLOCK - 1) // BLOCK
    first = tl.cumsum(nb, 0) - nb
    return g, lo, hi, nb, first


@triton.jit
def _block_of(pid, offsets_ptr, single, T, E, BLOCK: tl.constexpr, G_PAD: tl.constexpr, ROUTE: tl.constexpr):
    """(expert or -1, start, end) of the pid-th block of sorted positions; start >= end when idle."""
    if ROUTE == ROUTE_SINGLE:
        start = pid * BLOCK
        end = tl.minimum(start + BLOCK, T)
        expert = single
    else:
        g, lo, hi, nb, first = _group_schedule(offsets_ptr, T, E, BLOCK, G_PAD)
        grp = tl.sum((first + nb <= pid).to(tl.int32), 0)
        sel = g == grp
        start = tl.sum(tl.where(sel, lo + (pid - first) * BLOCK, 0), 0)
        end = tl.minimum(start + BLOCK, tl.sum(tl.where(sel, hi, 0), 0))
        expert = tl.where(grp < E, grp, -1)
    return expert, start, end


@triton.jit
def _rows(sorted_ptr, pos, valid, T, ROUTE: tl.constexpr):
    """(token rows, valid) of sorted positions ``pos``: the identity for ROUTE_SINGLE; else
    ``sorted_idx[pos]``, an index outside [0, T) masked out (row 0, not valid)."""
    if ROUTE == ROUTE_SINGLE:
        rows = pos
        ok = valid
    else:
        rows = tl.load(sorted_ptr + pos, mask=valid, other=0)
        ok = valid & (rows >= 0) & (rows < T)
        rows = tl.where(ok, rows, 0)
    return rows, ok


@triton.jit
def _swizzle(pid, grid_t, grid_n, GROUP: tl.constexpr):
    """Grouped launch order: GROUP token blocks share each column sweep (L2 reuse)."""
    per_group = GROUP * grid_n
    first = (pid // per_group) * GROUP
    size = tl.minimum(grid_t - first, GROUP)
    pid_t = first + (pid % per_group) % size
    pid_n = (pid % per_group) // size
    return pid_t, pid_n


@triton.jit
def _load_rank(P, COEF, rows, mask_t, j, r, scale, c_col: tl.constexpr, ROW_SCALE: tl.constexpr):
    """Rank-r rows P[rows, :r] as an fp32 [BT, R_PAD] tile, times ``scale * coef[:, c_col]``
    when ROW_SCALE (the gated LoRA activations of the forward)."""
    rr = rows.to(tl.int64)
    p = tl.load(P + rr[:, None] * r + j[None, :], mask=mask_t[:, None] & (j < r)[None, :], other=0.0)
    if ROW_SCALE:
        c = tl.load(COEF + rr * 2 + c_col, mask=mask_t, other=0.0)
        p = p * (scale * c)[:, None]
    return p


# ---------------------------------------------------------------------------------------------
# shrink: [T, K] -> rank-r rows (and gate logits)


@triton.jit
def _fwd_epilogue(acc_s, acc_t, l0, l1, rows, valid, has, H_S, H_T, COEF, r, GATE: tl.constexpr,
                  R_PAD: tl.constexpr):
    """Store h_s, h_t (0 without a task) and coef (softmax of the logits, [1, 1] without a
    gate, [1, 0] without a task)."""
    rr = rows.to(tl.int64)
    j = tl.arange(0, R_PAD)
    m2 = valid[:, None] & (j < r)[None, :]
    off = rr[:, None] * r + j[None, :]
    tl.store(H_S + off, acc_s, mask=m2)
    tl.store(H_T + off, tl.where(has[:, None], acc_t, 0.0), mask=m2)
    if GATE:
        m = tl.maximum(l0, l1)
        e0 = tl.exp(l0 - m)
        e1 = tl.exp(l1 - m)
        b0 = e0 / (e0 + e1)
        b1 = e1 / (e0 + e1)
    else:
        b0 = tl.full(l0.shape, 1.0, tl.float32)
        b1 = b0
    tl.store(COEF + rr * 2, tl.where(has, b0, 1.0), mask=valid)
    tl.store(COEF + rr * 2 + 1, tl.where(has, b1, 0.0), mask=valid)


@triton.jit
def _bwd_epilogue(g_s, g_t, rows, valid, has, H_S, H_T, COEF, DH_S, DH_T, DLOG, r, scale,
                  GATE: tl.constexpr, R_PAD: tl.constexpr):
    """From g = gy B (per expert): dh = s c g (0 without a task) and, with a gate, the
    logit gradients dlog = beta * (gbeta - <beta, gbeta>), gbeta = s <g, h> (0 without a task)."""
    rr = rows.to(tl.int64)
    j = tl.arange(0, R_PAD)
    m2 = valid[:, None] & (j < r)[None, :]
    off = rr[:, None] * r + j[None, :]
    c0 = tl.load(COEF + rr * 2, mask=valid, other=0.0)
    c1 = tl.load(COEF + rr * 2 + 1, mask=valid, other=0.0)
    tl.store(DH_S + off, g_s * (scale * c0)[:, None], mask=m2)
    tl.store(DH_T + off, tl.where(has[:, None], g_t * (scale * c1)[:, None], 0.0), mask=m2)
    if GATE:
        h_s = tl.load(H_S + off, mask=m2, other=0.0)
        h_t = tl.load(H_T + off, mask=m2, other=0.0)
        gb0 = scale * tl.sum(g_s * h_s, 1)
        gb1 = scale * tl.sum(g_t * h_t, 1)
        dot = c0 * gb0 + c1 * gb1
        tl.store(DLOG + rr * 2, tl.where(has, c0 * (gb0 - dot), 0.0), mask=valid)
        tl.store(DLOG + rr * 2 + 1, tl.where(has, c1 * (gb1 - dot), 0.0), mask=valid)


@triton.jit
def _epilogue(acc_s, acc_t, l0, l1, rows, valid, has, H_S, H_T, COEF, DH_S, DH_T, DLOG, r, scale,
              MODE: tl.constexpr, GATE: tl.constexpr, R_PAD: tl.constexpr):
    if MODE == MODE_FWD:
        _fwd_epilogue(acc_s, acc_t, l0, l1, rows, valid, has, H_S, H_T, COEF, r, GATE, R_PAD)
    else:
        _bwd_epilogue(acc_s, acc_t, rows, valid, has, H_S, H_T, COEF, DH_S, DH_T, DLOG, r, scale, GATE, R_PAD)


@triton.jit(do_not_specialize=["single", "thr"])
def _shrink_kernel(
    X, stride_xt, stride_xk,
    MS, stride_ms_k, stride_ms_r,
    MT, stride_mt_e, stride_mt_k, stride_mt_r,
    GW, stride_gw_j, stride_gw_k,
    H_S, H_T, COEF, DH_S, DH_T, DLOG, WS,
    sorted_ptr, offsets_ptr, single, T, E, K, r, k_per_split,
    scale, SEED, thr, inv_keep,
    MODE: tl.constexpr, ROUTE: tl.constexpr, TASK: tl.constexpr, GATE: tl.constexpr,
    DROPOUT: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr, G_PAD: tl.constexpr, PREC: tl.constexpr,
):
    """acc_s = X~ MS, acc_t = X~ MT[expert], logits = X GW^T over this program's K range,
    then the MODE epilogue, or (PARTIAL: split-K, program axis 1 = split) fp32 partials
    into WS [splits, T, 2 R_PAD + 2]."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    expert, start, end = _block_of(pid, offsets_ptr, single, T, E, BLOCK_T, G_PAD, ROUTE)
    if start >= end:
        return
    pos = start + tl.arange(0, BLOCK_T)
    rows, valid = _rows(sorted_ptr, pos, pos < end, T, ROUTE)
    rr = rows.to(tl.int64)
    has = (tl.zeros([BLOCK_T], tl.int32) + expert) >= 0
    j = tl.arange(0, R_PAD)
    jm = j < r
    jm_t = jm & ((tl.zeros_like(j) + expert) >= 0)  # rank columns of the routed expert (none: -1)
    ex = tl.maximum(expert, 0).to(tl.int64)
    gj = tl.arange(0, GATE_PAD)
    if DROPOUT:
        keys = _row_keys(rows, _seed_key(SEED))
    LOGITS: tl.constexpr = GATE and MODE == MODE_FWD

    acc_s = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    acc_t = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    acc_g = tl.zeros([BLOCK_T, GATE_PAD], tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < k_hi
        x = tl.load(X + rr[:, None] * stride_xt + kk[None, :].to(tl.int64) * stride_xk,
                    mask=valid[:, None] & km[None, :], other=0.0)
        if LOGITS:
            gw = tl.load(GW + gj[None, :] * stride_gw_j + kk[:, None] * stride_gw_k,
                         mask=km[:, None] & (gj < 2)[None, :], other=0.0)
            acc_g = tl.dot(x, gw, acc_g, input_precision=PREC)
        if DROPOUT:
            x = _drop(x, keys, kk, thr)
        ms = tl.load(MS + kk[:, None] * stride_ms_k + j[None, :] * stride_ms_r, mask=km[:, None] & jm[None, :],
                     other=0.0)
        acc_s = tl.dot(x, ms, acc_s, input_precision=PREC)
        if TASK:
            mt = tl.load(MT + ex * stride_mt_e + kk[:, None] * stride_mt_k + j[None, :] * stride_mt_r,
                         mask=km[:, None] & jm_t[None, :], other=0.0)
            acc_t = tl.dot(x, mt, acc_t, input_precision=PREC)
    if DROPOUT:
        acc_s *= inv_keep
        acc_t *= inv_keep

    l0 = tl.sum(tl.where(gj[None, :] == 0, acc_g, 0.0), 1)
    l1 = tl.sum(tl.where(gj[None, :] == 1, acc_g, 0.0), 1)
    if not PARTIAL:
        _epilogue(acc_s, acc_t, l0, l1, rows, valid, has, H_S, H_T, COEF, DH_S, DH_T, DLOG, r, scale,
                  MODE, GATE, R_PAD)
    else:
        W: tl.constexpr = 2 * R_PAD + 2
        base = WS + (pid_k * T + rr) * W
        tl.store(base[:, None] + j[None, :], acc_s, mask=valid[:, None])
        tl.store(base[:, None] + R_PAD + j[None, :], acc_t, mask=valid[:, None])
        if LOGITS:
            tl.store(base + 2 * R_PAD, l0, mask=valid)
            tl.store(base + 2 * R_PAD + 1, l1, mask=valid)


@triton.jit
def _shrink_finalize_kernel(
    WS, token_task, H_S, H_T, COEF, DH_S, DH_T, DLOG, T, r, scale, splits,
    MODE: tl.constexpr, GATE: tl.constexpr, BLOCK_T: tl.constexpr, R_PAD: tl.constexpr,
):
    """Sum the ``splits`` partials of ``_shrink_kernel`` (fixed order) and run its epilogue."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = rows < T
    rr = rows.to(tl.int64)
    j = tl.arange(0, R_PAD)
    W: tl.constexpr = 2 * R_PAD + 2
    acc_s = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    acc_t = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    l0 = tl.zeros([BLOCK_T], tl.float32)
    l1 = tl.zeros([BLOCK_T], tl.float32)
    LOGITS: tl.constexpr = GATE and MODE == MODE_FWD
    for s in range(splits):
        base = WS + (s * T + rr) * W
        acc_s += tl.load(base[:, None] + j[None, :], mask=valid[:, None], other=0.0)
        acc_t += tl.load(base[:, None] + R_PAD + j[None, :], mask=valid[:, None], other=0.0)
        if LOGITS:
            l0 += tl.load(base + 2 * R_PAD, mask=valid, other=0.0)
            l1 += tl.load(base + 2 * R_PAD + 1, mask=valid, other=0.0)
    has = tl.load(token_task + rows, mask=valid, other=-1) >= 0
    _epilogue(acc_s, acc_t, l0, l1, rows, valid, has, H_S, H_T, COEF, DH_S, DH_T, DLOG, r, scale,
              MODE, GATE, R_PAD)


# ---------------------------------------------------------------------------------------------
# expand: rank-r rows -> [T, N] (optionally on top of the base GEMM)


@triton.jit(do_not_specialize=["single", "thr"])
def _expand_kernel(
    OUT, stride_ot, stride_on,
    PS, PT, COEF,
    NS, stride_ns_r, stride_ns_n,
    NT, stride_nt_e, stride_nt_r, stride_nt_n,
    BIAS, DLOG, GW, stride_gw_j, stride_gw_n,
    X, stride_xt, stride_xk, WB, stride_wb_k, stride_wb_n,
    sorted_ptr, offsets_ptr, single, T, E, N, K, r, grid_t,
    scale, SEED, thr, inv_keep,
    ROUTE: tl.constexpr, TASK: tl.constexpr, ROW_SCALE: tl.constexpr, DROPOUT: tl.constexpr,
    GATE_TERM: tl.constexpr, HAS_BIAS: tl.constexpr, FUSED_BASE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    R_PAD: tl.constexpr, G_PAD: tl.constexpr, PREC: tl.constexpr,
):
    """OUT[rows, n] = keep?(PS NS + PT NT[expert]) (+ DLOG GW) (+ X WB) (+ BIAS), one write.

    The LoRA tile is the accumulator's start value; with FUSED_BASE the base GEMM's K loop
    runs on top of it, otherwise cuBLAS adds the base afterwards (beta = 1)."""
    pid_t, pid_n = _swizzle(tl.program_id(0), grid_t, tl.cdiv(N, BLOCK_N), GROUP)
    expert, start, end = _block_of(pid_t, offsets_ptr, single, T, E, BLOCK_T, G_PAD, ROUTE)
    if start >= end:
        return
    pos = start + tl.arange(0, BLOCK_T)
    rows, valid = _rows(sorted_ptr, pos, pos < end, T, ROUTE)
    rr = rows.to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    n64 = n.to(tl.int64)
    j = tl.arange(0, R_PAD)
    jm = j < r

    ns = tl.load(NS + j[:, None] * stride_ns_r + n64[None, :] * stride_ns_n, mask=jm[:, None] & nm[None, :],
                 other=0.0)
    ps = _load_rank(PS, COEF, rows, valid, j, r, scale, 0, ROW_SCALE)
    acc = tl.dot(ps.to(ns.dtype), ns, input_precision=PREC)
    if TASK:
        # (scalar conditions are broadcast to vectors before combining: the interpreter needs it)
        jm_t = jm & ((tl.zeros_like(j) + expert) >= 0)
        ex = tl.maximum(expert, 0).to(tl.int64)
        nt = tl.load(NT + ex * stride_nt_e + j[:, None] * stride_nt_r + n64[None, :] * stride_nt_n,
                     mask=jm_t[:, None] & nm[None, :], other=0.0)
        pt = _load_rank(PT, COEF, rows, valid & ((tl.zeros_like(pos) + expert) >= 0), j, r, scale, 1, ROW_SCALE)
        acc = tl.dot(pt.to(nt.dtype), nt, acc, input_precision=PREC)
    if DROPOUT:
        keep = _keep(_row_keys(rows, _seed_key(SEED)), n, thr)
        acc = tl.where(keep, acc * inv_keep, 0.0)
    if GATE_TERM:
        d0 = tl.load(DLOG + rr * 2, mask=valid, other=0.0)
        d1 = tl.load(DLOG + rr * 2 + 1, mask=valid, other=0.0)
        g0 = tl.load(GW + n64 * stride_gw_n, mask=nm, other=0.0).to(tl.float32)
        g1 = tl.load(GW + stride_gw_j + n64 * stride_gw_n, mask=nm, other=0.0).to(tl.float32)
        acc += d0[:, None] * g0[None, :] + d1[:, None] * g1[None, :]
    if FUSED_BASE:
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < K
            x = tl.load(X + rr[:, None] * stride_xt + kk[None, :].to(tl.int64) * stride_xk,
                        mask=valid[:, None] & km[None, :], other=0.0)
            w = tl.load(WB + kk[:, None].to(tl.int64) * stride_wb_k + n64[None, :] * stride_wb_n,
                        mask=km[:, None] & nm[None, :], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + n, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rr[:, None] * stride_ot + n64[None, :] * stride_on, acc.to(OUT.dtype.element_ty),
             mask=valid[:, None] & nm[None, :])


# ---------------------------------------------------------------------------------------------
# weight gradients: ragged per-expert reductions over tokens


@triton.jit(do_not_specialize=["single", "thr"])
def _wgrad_kernel(
    Z, stride_zt, stride_zn,
    PS, PT, COEF, DLOG,
    WS_S, WS_T, WS_G, stride_ws,
    TRAIN,
    sorted_ptr, offsets_ptr, single, T, E, N, r,
    scale, SEED, thr, inv_keep,
    ROUTE: tl.constexpr, DO_SHARED: tl.constexpr, DO_TASK: tl.constexpr, DO_GATE: tl.constexpr,
    ROW_SCALE: tl.constexpr, DROPOUT: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    R_PAD: tl.constexpr, G_PAD: tl.constexpr, PREC: tl.constexpr,
):
    """Over the CHUNK token positions of program (chunk c, column block n) -- one expert's:
    acc_s = PS^T Z~, acc_t = PT^T Z~ (trainable experts only), acc_g = DLOG^T Z, stored as fp32
    tiles [r | r | 2, N] at ``WS_S/WS_T/WS_G + c * stride_ws``. ``TRAIN[e]``: expert e's index
    among the trainable experts, or -1 (frozen: no work, no write, no slot read)."""
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, start, end = _block_of(pid_c, offsets_ptr, single, T, E, CHUNK, G_PAD, ROUTE)
    if start >= end:
        return
    slot_t = -1
    if DO_TASK:
        slot_t = tl.where(expert >= 0, tl.load(TRAIN + tl.maximum(expert, 0)), -1)
    if not DO_SHARED and not DO_GATE:
        if slot_t < 0:
            return
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    n64 = n.to(tl.int64)
    j = tl.arange(0, R_PAD)
    gj = tl.arange(0, GATE_PAD)
    if DROPOUT:
        key = _seed_key(SEED)

    acc_s = tl.zeros([R_PAD, BLOCK_N], tl.float32)
    acc_t = tl.zeros([R_PAD, BLOCK_N], tl.float32)
    acc_g = tl.zeros([GATE_PAD, BLOCK_N], tl.float32)
    for p0 in range(start, end, BLOCK_T):
        pos = p0 + tl.arange(0, BLOCK_T)
        rows, valid = _rows(sorted_ptr, pos, pos < end, T, ROUTE)
        rr = rows.to(tl.int64)
        z = tl.load(Z + rr[:, None] * stride_zt + n64[None, :] * stride_zn, mask=valid[:, None] & nm[None, :],
                    other=0.0)
        if DO_GATE:
            dl = tl.load(DLOG + rr[:, None] * 2 + gj[None, :], mask=valid[:, None] & (gj < 2)[None, :], other=0.0)
            acc_g = tl.dot(tl.trans(dl.to(z.dtype)), z, acc_g, input_precision=PREC)
        if DROPOUT:
            z = _drop(z, _row_keys(rows, key), n, thr)
        if DO_SHARED:
            ps = _load_rank(PS, COEF, rows, valid, j, r, scale, 0, ROW_SCALE)
            acc_s = tl.dot(tl.trans(ps.to(z.dtype)), z, acc_s, input_precision=PREC)
        if slot_t >= 0:
            pt = _load_rank(PT, COEF, rows, valid, j, r, scale, 1, ROW_SCALE)
            acc_t = tl.dot(tl.trans(pt.to(z.dtype)), z, acc_t, input_precision=PREC)
    if DROPOUT:
        acc_s *= inv_keep
        acc_t *= inv_keep

    slot = pid_c.to(tl.int64) * stride_ws
    tile = j[:, None].to(tl.int64) * N + n64[None, :]
    m_r = (j < r)[:, None] & nm[None, :]
    if DO_SHARED:
        tl.store(WS_S + slot + tile, acc_s, mask=m_r)
    if slot_t >= 0:
        tl.store(WS_T + slot + tile, acc_t, mask=m_r)
    if DO_GATE:
        tl.store(WS_G + slot + gj[:, None] * N + n64[None, :], acc_g, mask=(gj < 2)[:, None] & nm[None, :])


@triton.jit
def _sum_slots(WS, stride_ws, first, count, idx, size, OUT, stride_r, stride_n, N):
    """OUT[i, n] = sum over slots first..first+count-1 (in order) of WS[slot][i, n], idx = i*N + n."""
    m = idx < size
    acc = tl.zeros(idx.shape, tl.float32)
    for s in range(first, first + count):
        acc += tl.load(WS + tl.cast(s, tl.int64) * stride_ws + idx, mask=m, other=0.0)
    i = (idx // N).to(tl.int64)
    n = (idx % N).to(tl.int64)
    tl.store(OUT + i * stride_r + n * stride_n, acc.to(OUT.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["single"])
def _wgrad_reduce_kernel(
    WS_S, WS_T, WS_G, stride_ws,
    OUT_S, stride_os_r, stride_os_n,
    OUT_T, stride_ot_e, stride_ot_r, stride_ot_n,
    OUT_G, stride_og_j, stride_og_n,
    TRAIN, offsets_ptr, single, T, E, N, r, n_slots, m_gate,
    ROUTE: tl.constexpr, OUT_SHARED: tl.constexpr, OUT_TASK: tl.constexpr, OUT_GATE: tl.constexpr,
    TASK_M0: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, G_PAD: tl.constexpr,
):
    """Every output of one ``_wgrad_kernel`` launch from its slots, in the outputs' dtype.
    Program axis 0 is the output: 0 the shared expert's, TASK_M0 + e expert e's (its chunks'
    slots; none -- zeros -- when frozen or without tokens), ``m_gate`` the gate's; axis 1 a
    block of elements. Slot ranges follow the wgrad grid's clamped schedule, within n_slots."""
    m = tl.program_id(0)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    total = n_slots
    if ROUTE == ROUTE_GROUPED:
        g, _lo, _hi, nb, firsts = _group_schedule(offsets_ptr, T, E, CHUNK, G_PAD)
        total = tl.minimum(tl.sum(nb, 0), n_slots)  # slots of surplus programs were never written
    if OUT_SHARED:
        if m == 0:
            _sum_slots(WS_S, stride_ws, 0, total, idx, r * N, OUT_S, stride_os_r, stride_os_n, N)
    if OUT_TASK:
        e = m - TASK_M0
        if (e >= 0) & (e < E):
            if ROUTE == ROUTE_GROUPED:
                first = tl.minimum(tl.sum(tl.where(g == e, firsts, 0), 0), n_slots)
                count = tl.minimum(tl.sum(tl.where(g == e, nb, 0), 0), n_slots - first)
            else:
                first = 0
                count = tl.where(e == single, n_slots, 0)
            count = tl.where(tl.load(TRAIN + e) >= 0, count, 0)
            _sum_slots(WS_T, stride_ws, first, count, idx, r * N, OUT_T + e.to(tl.int64) * stride_ot_e,
                       stride_ot_r, stride_ot_n, N)
    if OUT_GATE:
        if m == m_gate:
            _sum_slots(WS_G, stride_ws, 0, total, idx, 2 * N, OUT_G, stride_og_j, stride_og_n, N)
