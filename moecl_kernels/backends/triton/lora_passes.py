"""Rank-r passes of the ``gemm`` variants (``variants.py``): memory-bound, one pass each.

Tokens are visited in grouped order (one expert per block, rows read through ``sorted_idx``,
each row contiguous), so every block has exactly one task expert and no per-expert padding
or masking is needed; the GEMMs (``fused_gemm.py``) run in natural token order.

``_lora_shrink_kernel``
    MODE_FWD: x  -> h_s, h_t, coef         (x read once: shared + routed expert + gate logits)
    MODE_BWD: gy -> dh_s, dh_t, dlog, and with DB_SHARED / DB_TASK the dB of this block,
              dB_s += gy^T (s c_s h_s), dB_e += gy^T (s c_t h_t)   (gy read once for both)
``_lora_wgrad_x_kernel``
    x -> dA_s = dh_s^T x~, dA_e = dh_t^T x~ (trainable experts only), dW_g = dlog^T x   (x read once)
``_grad_finalize_kernel``
    fp32 accumulators (atomic mode: summed by ``atomic_add``) or per-block slots
    (deterministic mode: summed here in a fixed order) -> every LoRA gradient in its final
    dtype, zeros for frozen experts and experts without tokens, in one launch.

Conventions (issue 15): the dropout seed is read from a device pointer (``SEED``, a 0-dim
int64 tensor), block bounds and token rows from the routing are clamped to [0, T) and
expert ids to [-1, E) before any address is formed, and token-row offsets are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import kernels as K
from .dropout_hash import _drop, _row_keys
from .dropout_hash import _seed_key as seed_key

GATE_PAD = K.GATE_PAD
STORE_SLOTS = tl.constexpr(0)   # wgrad: per-chunk fp32 partials, summed in a fixed order by the finalize (deterministic)
STORE_ATOMIC = tl.constexpr(1)  # wgrad: atomic adds into fp32 accumulators
MODE_FWD = K.MODE_FWD
MODE_BWD = K.MODE_BWD
ROUTE_GROUPED = K.ROUTE_GROUPED

# unit ids of _grad_finalize_kernel (program axis 1): then 3 + e -> dA[e], 3 + E + e -> dB[e]
UNIT_A_S = tl.constexpr(0)
UNIT_B_S = tl.constexpr(1)
UNIT_GATE = tl.constexpr(2)


# ---------------------------------------------------------------------------------------------
# device-side seed and routing with bounds


@triton.jit
def safe_block(pid, offsets_ptr, single, T, E, BLOCK: tl.constexpr, G_PAD: tl.constexpr, ROUTE: tl.constexpr):
    """``kernels._block_of`` with its positions clamped to [0, T) and its expert to [-1, E):
    stale or corrupt offsets can idle a block or mis-route it, never address out of bounds."""
    expert, start, end = K._block_of(pid, offsets_ptr, single, T, E, BLOCK, G_PAD, ROUTE)
    start = tl.maximum(start, 0)
    end = tl.minimum(end, T)
    expert = tl.where((expert >= 0) & (expert < E), expert, -1)
    return expert, start, end


@triton.jit
def safe_rows(sorted_ptr, pos, valid, T, ROUTE: tl.constexpr):
    """Token rows of sorted positions; rows outside [0, T) are masked off (and read as 0)."""
    return K._rows(sorted_ptr, pos, valid, T, ROUTE)


@triton.jit
def _grad_tile(G, base, ii, jj, mask, stride_i, stride_j, val, STORE: tl.constexpr):
    """Add (atomic, relaxed: a sum needs no ordering) or store ``val`` at G[base + i*si + j*sj]."""
    ptrs = G + base + ii.to(tl.int64)[:, None] * stride_i + jj.to(tl.int64)[None, :] * stride_j
    if STORE == STORE_ATOMIC:
        tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, val, mask=mask)


# ---------------------------------------------------------------------------------------------
# shrink (forward x / backward gy with the dB partials)


@triton.jit(do_not_specialize=["single", "thr"])
def _lora_shrink_kernel(
    X, stride_xt, stride_xk,
    MS, stride_ms_k, stride_ms_r,
    MT, stride_mt_e, stride_mt_k, stride_mt_r,
    GW, stride_gw_j, stride_gw_k,
    H_S, H_T, COEF, DH_S, DH_T, DLOG,
    GB_S, GB_T, stride_gbs_slot, stride_gbt_slot, TRAIN,
    SEED, sorted_ptr, offsets_ptr, single, T, E, K_, r,
    scale, thr, inv_keep,
    MODE: tl.constexpr, ROUTE: tl.constexpr, TASK: tl.constexpr, GATE: tl.constexpr, DROPOUT: tl.constexpr,
    DB_SHARED: tl.constexpr, DB_TASK: tl.constexpr, STORE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, G_PAD: tl.constexpr, PREC: tl.constexpr,
):
    """acc_s = X~ MS, acc_t = X~ MT[expert], logits = X GW^T (MODE_FWD), then the MODE
    epilogue of ``kernels._epilogue``. MODE_BWD with DB_*: per K chunk also the chunk's
    dB rows, ``X^T (s c h)``, into GB_S ([K, r], or slot ``pid`` of [slots, K, r]) and GB_T
    (the expert's trainable index, or slot ``pid``); ``TRAIN[e]`` is that index or -1."""
    pid = tl.program_id(0)
    expert, start, end = safe_block(pid, offsets_ptr, single, T, E, BLOCK_T, G_PAD, ROUTE)
    if start >= end:
        return
    pos = start + tl.arange(0, BLOCK_T)
    rows, valid = safe_rows(sorted_ptr, pos, pos < end, T, ROUTE)
    rr = rows.to(tl.int64)
    has = (tl.zeros([BLOCK_T], tl.int32) + expert) >= 0
    j = tl.arange(0, R_PAD)
    jm = j < r
    jm_t = jm & ((tl.zeros_like(j) + expert) >= 0)
    ex = tl.maximum(expert, 0).to(tl.int64)
    gj = tl.arange(0, GATE_PAD)
    if DROPOUT:
        keys = _row_keys(rows, seed_key(SEED))
    LOGITS: tl.constexpr = GATE and MODE == MODE_FWD
    DB: tl.constexpr = MODE == MODE_BWD and (DB_SHARED or DB_TASK)
    slot_t = -1
    if DB_TASK:
        slot_t = tl.where(expert >= 0, tl.load(TRAIN + ex), -1)
    if DB:
        base_s = 0
        base_t = tl.maximum(slot_t, 0).to(tl.int64) * stride_gbt_slot
        if STORE == STORE_SLOTS:
            base_s = pid.to(tl.int64) * stride_gbs_slot
            base_t = pid.to(tl.int64) * stride_gbt_slot
        p_s = K._load_rank(H_S, COEF, rows, valid, j, r, scale, 0, True).to(X.dtype.element_ty)
        p_t = K._load_rank(H_T, COEF, rows, valid & has, j, r, scale, 1, True).to(X.dtype.element_ty)

    acc_s = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    acc_t = tl.zeros([BLOCK_T, R_PAD], tl.float32)
    acc_g = tl.zeros([BLOCK_T, GATE_PAD], tl.float32)
    for k0 in range(0, K_, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K_
        x = tl.load(X + rr[:, None] * stride_xt + kk[None, :].to(tl.int64) * stride_xk,
                    mask=valid[:, None] & km[None, :], other=0.0)
        if LOGITS:
            gw = tl.load(GW + gj[None, :] * stride_gw_j + kk[:, None].to(tl.int64) * stride_gw_k,
                         mask=km[:, None] & (gj < 2)[None, :], other=0.0)
            acc_g = tl.dot(x, gw, acc_g, input_precision=PREC)
        if DROPOUT:
            x = _drop(x, keys, kk, thr)
        ms = tl.load(MS + kk[:, None].to(tl.int64) * stride_ms_k + j[None, :] * stride_ms_r,
                     mask=km[:, None] & jm[None, :], other=0.0)
        acc_s = tl.dot(x, ms, acc_s, input_precision=PREC)
        if TASK:
            mt = tl.load(MT + ex * stride_mt_e + kk[:, None].to(tl.int64) * stride_mt_k + j[None, :] * stride_mt_r,
                         mask=km[:, None] & jm_t[None, :], other=0.0)
            acc_t = tl.dot(x, mt, acc_t, input_precision=PREC)
        if DB:
            xt = tl.trans(x)
            m_kr = km[:, None] & jm[None, :]
            if DB_SHARED:
                _grad_tile(GB_S, base_s, kk, j, m_kr, r, 1, tl.dot(xt, p_s, input_precision=PREC), STORE)
            if slot_t >= 0:
                _grad_tile(GB_T, base_t, kk, j, m_kr, r, 1, tl.dot(xt, p_t, input_precision=PREC), STORE)
    if DROPOUT:
        acc_s *= inv_keep
        acc_t *= inv_keep
    l0 = tl.sum(tl.where(gj[None, :] == 0, acc_g, 0.0), 1)
    l1 = tl.sum(tl.where(gj[None, :] == 1, acc_g, 0.0), 1)
    K._epilogue(acc_s, acc_t, l0, l1, rows, valid, has, H_S, H_T, COEF, DH_S, DH_T, DLOG, r, scale,
                MODE, GATE, R_PAD)


# ---------------------------------------------------------------------------------------------
# dA_s, dA_e, dW_g from one pass over x


@triton.jit(do_not_specialize=["single", "thr"])
def _lora_wgrad_x_kernel(
    Z, stride_zt, stride_zn, DH_S, DH_T, DLOG,
    GA_S, GA_T, GG, stride_gas_slot, stride_gat_slot, stride_gg_slot, TRAIN,
    SEED, sorted_ptr, offsets_ptr, single, T, E, N, r, thr, inv_keep,
    ROUTE: tl.constexpr, DO_SHARED: tl.constexpr, DO_TASK: tl.constexpr, DO_GATE: tl.constexpr,
    DROPOUT: tl.constexpr, STORE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, G_PAD: tl.constexpr, PREC: tl.constexpr,
):
    """Over chunk ``pid_c`` (CHUNK sorted positions of one expert) and columns block ``pid_n``:
    dh_s^T X~ into GA_S [r, N], dh_t^T X~ into GA_T (trainable experts), dlog^T X into GG [2, N];
    atomically, or into slot ``pid_c`` (STORE_SLOTS)."""
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, start, end = safe_block(pid_c, offsets_ptr, single, T, E, CHUNK, G_PAD, ROUTE)
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
        key = seed_key(SEED)
    acc_s = tl.zeros([R_PAD, BLOCK_N], tl.float32)
    acc_t = tl.zeros([R_PAD, BLOCK_N], tl.float32)
    acc_g = tl.zeros([GATE_PAD, BLOCK_N], tl.float32)
    for p0 in range(start, end, BLOCK_T):
        pos = p0 + tl.arange(0, BLOCK_T)
        rows, valid = safe_rows(sorted_ptr, pos, pos < end, T, ROUTE)
        rr = rows.to(tl.int64)
        z = tl.load(Z + rr[:, None] * stride_zt + n64[None, :] * stride_zn, mask=valid[:, None] & nm[None, :],
                    other=0.0)
        if DO_GATE:
            dl = tl.load(DLOG + rr[:, None] * 2 + gj[None, :], mask=valid[:, None] & (gj < 2)[None, :], other=0.0)
            acc_g = tl.dot(tl.trans(dl.to(z.dtype)), z, acc_g, input_precision=PREC)
        if DROPOUT:
            z = _drop(z, _row_keys(rows, key), n, thr)
        if DO_SHARED:
            ps = K._load_rank(DH_S, DH_S, rows, valid, j, r, 1.0, 0, False)
            acc_s = tl.dot(tl.trans(ps.to(z.dtype)), z, acc_s, input_precision=PREC)
        if slot_t >= 0:
            pt = K._load_rank(DH_T, DH_T, rows, valid, j, r, 1.0, 0, False)
            acc_t = tl.dot(tl.trans(pt.to(z.dtype)), z, acc_t, input_precision=PREC)
    if DROPOUT:
        acc_s *= inv_keep
        acc_t *= inv_keep
    m_r = (j < r)[:, None] & nm[None, :]
    c = pid_c.to(tl.int64)  # slot of this chunk (STORE_SLOTS)
    c_t = c
    if STORE == STORE_ATOMIC:
        c = c * 0
        c_t = tl.maximum(slot_t, 0).to(tl.int64)
    if DO_SHARED:
        _grad_tile(GA_S, c * stride_gas_slot, j, n, m_r, N, 1, acc_s, STORE)
    if slot_t >= 0:
        _grad_tile(GA_T, c_t * stride_gat_slot, j, n, m_r, N, 1, acc_t, STORE)
    if DO_GATE:
        _grad_tile(GG, c * stride_gg_slot, gj, n, (gj < 2)[:, None] & nm[None, :], N, 1, acc_g, STORE)


# ---------------------------------------------------------------------------------------------
# one launch: fp32 accumulators or slots -> gradients in their final dtype


@triton.jit
def _slot_range(unit_e, per_expert, offsets_ptr, single, T, E, n_slots, CHUNK: tl.constexpr, G_PAD: tl.constexpr,
                ROUTE: tl.constexpr):
    """(first, count) of the slots written for expert ``unit_e`` (per_expert) or for all tokens."""
    first = 0
    count = n_slots
    if ROUTE == ROUTE_GROUPED:
        g, _lo, _hi, nb, firsts = K._group_schedule(offsets_ptr, T, E, CHUNK, G_PAD)
        if per_expert:
            first = tl.sum(tl.where(g == unit_e, firsts, 0), 0)
            count = tl.sum(tl.where(g == unit_e, nb, 0), 0)
        else:  # surplus programs of the worst-case grid write no slot
            count = tl.sum(nb, 0)
    elif per_expert:
        count = tl.where(unit_e == single, n_slots, 0)
    first = tl.maximum(first, 0)
    count = tl.maximum(tl.minimum(count, n_slots - first), 0)
    return first, count


@triton.jit(do_not_specialize=["single"])
def _grad_finalize_kernel(
    WS, O_AS, O_BS, O_G, O_A, O_B, TRAIN,
    off_as, off_bs, off_g, off_a, off_b, n_as, n_bs, n_g, n_a, n_b, slots_a, slots_b,
    offsets_ptr, single, T, E,
    ROUTE: tl.constexpr, STORE: tl.constexpr, CHUNK_A: tl.constexpr, CHUNK_B: tl.constexpr,
    G_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Output unit ``program_id(1)``: 0 dA_s, 1 dB_s, 2 dW_g, 3 + e dA[e], 3 + E + e dB[e]
    (a unit whose output is not wanted has its element count ``n_*`` 0). STORE_ATOMIC: WS holds
    one fp32 copy per output (task ones indexed by ``TRAIN[e]``); STORE_SLOTS: one per slot,
    summed in slot order. Each output is contiguous; n_as = n_a = r*d_in, n_bs = n_b = d_out*r."""
    unit = tl.program_id(1)
    is_task = unit >= 3
    e = tl.where(unit >= 3 + E, unit - 3 - E, unit - 3)
    is_b = (unit == UNIT_B_S) | (unit >= 3 + E)
    is_g = unit == UNIT_GATE
    n = tl.where(is_g, n_g, tl.where(is_b, tl.where(is_task, n_b, n_bs), tl.where(is_task, n_a, n_as)))
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if tl.program_id(0) * BLOCK >= n:
        return
    m = idx < n
    slot = 0
    if is_task:
        slot = tl.load(TRAIN + e)
    src = tl.where(is_g, off_g, tl.where(is_b, tl.where(is_task, off_b, off_bs), tl.where(is_task, off_a, off_as)))
    acc = tl.zeros([BLOCK], tl.float32)
    if slot >= 0:
        if STORE == STORE_ATOMIC:
            acc = tl.load(WS + src + slot.to(tl.int64) * n + idx, mask=m, other=0.0)
        else:
            if is_b:
                first, count = _slot_range(e, is_task, offsets_ptr, single, T, E, slots_b, CHUNK_B, G_PAD, ROUTE)
            else:
                first, count = _slot_range(e, is_task, offsets_ptr, single, T, E, slots_a, CHUNK_A, G_PAD, ROUTE)
            for s in range(first, first + count):
                acc += tl.load(WS + src + tl.cast(s, tl.int64) * n + idx, mask=m, other=0.0)
    out = tl.where(is_task, e.to(tl.int64) * n, 0) + idx
    if unit == UNIT_A_S:
        tl.store(O_AS + out, acc.to(O_AS.dtype.element_ty), mask=m)
    elif unit == UNIT_B_S:
        tl.store(O_BS + out, acc.to(O_BS.dtype.element_ty), mask=m)
    elif unit == UNIT_GATE:
        tl.store(O_G + out, acc.to(O_G.dtype.element_ty), mask=m)
    elif is_b:
        tl.store(O_B + out, acc.to(O_B.dtype.element_ty), mask=m)
    else:
        tl.store(O_A + out, acc.to(O_A.dtype.element_ty), mask=m)
