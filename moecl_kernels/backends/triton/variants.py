"""Host side of the ``gemm`` variants of the triton backend (``TritonBackend(variant=...)``).

The LoRA terms ride inside the base GEMM as extra K-steps, tokens in natural order
(``fused_gemm.py``); the rank-r work is one pass per tensor (``lora_passes.py``); decode
batches take a two-launch split-K path (``decode.py``).

Forward (T > decode_t, 2 launches)      shrink(x) -> h_s, h_t, coef;  GEMM -> y (written once)
Forward (T <= decode_t, 2 launches)     stacked split-K GEMV -> fp32 partials;  finalize -> y, h_s, h_t, coef
Backward (4 launches + 1 fill)          shrink(gy) -> dh_s, dh_t, dlog and dB;  dgrad GEMM -> dx;
                                        wgrad(x) -> dA_s, dA_e, dW_g;  finalize -> gradients in final dtype
                                        (atomic mode: one ``torch.zeros`` of the fp32 accumulators;
                                        ``deterministic=True``: per-block slots, no fill, no atomics)

Variants: ``gemm`` picks the GEMM per architecture (``gemm-tma`` on sm_90+ for 16-bit,
16-byte aligned operands, else ``gemm-ptr``); ``gemm-ptr`` and ``gemm-tma`` force one
(``gemm-tma`` falls back to pointers, saying so once, when the operands do not allow TMA).

Safety (the issue-15 conventions): launches run under the tensors' device; the dropout seed
is a device tensor read by the kernels; routing is clamped in the kernels; offsets are int64.
No host sync; grids depend on shapes only, so a warmed-up call is CUDA-graph capturable.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
from torch import Tensor

from ...contract.dropout import threshold24
from .. import launch, warn_once
from ...contract import BwdArgs, FwdArgs, acc_dtype
from . import configs
from . import decode as D
from . import fused_gemm as G
from . import kernels as K
from . import lora_passes as L
from .backend import _pow2, _prec, _Route
from .configs import sm_count as _sm_count
from .configs import Tile

try:  # host-side TMA descriptors: Triton >= 3.3 (the GPU image has 3.6; checked on 3.6 and 3.9)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: gemm-tma runs as gemm-ptr
    TensorDescriptor = None

VARIANTS = ("gemm", "gemm-ptr", "gemm-tma")
KERNELS = ("g_shrink", "g_dbshrink", "g_gemm", "g_tma", "g_wgrad", "g_decode")

T_ = Tile
# g_dbshrink: the gy shrink that also sums dB -- tall token blocks, fewer dB partial sums to add
_SM90 = dict(g_shrink=T_(block_t=64, block_k=128, num_warps=4, num_stages=3),
             g_dbshrink=T_(block_t=128, block_k=64, num_warps=8, num_stages=3),
             g_gemm=T_(block_t=128, block_n=128, block_k=64, group=8, num_warps=8, num_stages=3),
             g_tma=T_(block_t=128, block_n=256, block_k=64, group=8, num_warps=8, num_stages=3),
             g_wgrad=T_(chunk=512, block_t=64, block_n=128, num_warps=8, num_stages=3),
             g_decode=T_(block_n=128, block_k=128, num_warps=4, num_stages=4))
_SM80 = dict(_SM90, g_shrink=T_(block_t=64, block_k=64, num_warps=4, num_stages=3),
             g_gemm=T_(block_t=128, block_n=128, block_k=64, group=8, num_warps=8, num_stages=3),
             g_decode=T_(block_n=128, block_k=64, num_warps=4, num_stages=4))
# r > 32: smaller tiles so the rank-r operands and the accumulators stay in registers
_HI = dict(g_shrink=dict(block_t=32, block_k=32, num_warps=8), g_dbshrink=dict(block_t=32, block_k=32),
           g_gemm=dict(block_n=64),
           g_tma=dict(block_n=128), g_wgrad=dict(block_t=32, block_n=64), g_decode=dict(block_n=64))
_INTERP = {k: T_(block_t=16, block_n=16, block_k=16, split_k=2, chunk=32, group=2) for k in KERNELS}
# Extra tiles that the benchmark times as providers of their own (issue 25: one GPU call picks the
# faster; the table above stays the default until a measurement says otherwise):
# - gemm-tma-2cta: 128 x 128 x 64 in 2 stages (64 KiB of operand stages + the epilogue's staging),
#   so two CTAs fit an SM and one CTA's LoRA prologue / epilogue overlaps the other's K loop
#   (the table's 128 x 256 x 64 fills an SM's shared memory alone);
# - gemm-decode-1wave: the split-K decode GEMV planned for at most one program per SM (no tail wave;
#   the table plans two per SM, 1 CTA/SM by shared memory, so two waves).
TILE_PROVIDERS = {
    "gemm-tma-2cta": ("gemm-tma", dict(g_tma=T_(block_t=128, block_n=128, block_k=64, group=8, num_warps=8,
                                                num_stages=2))),
    "gemm-decode-1wave": ("gemm", dict(g_decode=T_(block_n=128, block_k=128, split_k=0, waves=1, num_warps=4,
                                                   num_stages=4))),
}
del T_
INTERP_PROGS = 3  # persistent programs of the TMA GEMM under the interpreter (exercises the tile loop)


def arch_of(t: Tensor) -> str:
    """``sm_XY`` or ``interpreter`` (``compile_check`` replaces this and ``sms_of`` to plan for a GPU)."""
    return configs.arch_of(t.device)


def sms_of(t: Tensor) -> Optional[int]:
    """SM count of t's GPU; None on the CPU (interpreter: grids are not sized to a machine)."""
    return _sm_count(t.device) if t.is_cuda else None


def _major(arch: str) -> int:
    """Compute-capability major of ``sm_XY`` (0 for the interpreter)."""
    return int(arch[3:-1]) if arch.startswith("sm_") and arch[3:-1].isdigit() else 0


def decode_splits(sms: int, cols: int, d_in: int, block_k: int, waves: int) -> int:
    """Split-K count of the decode GEMV planned for the machine: about ``waves`` programs per SM
    (``cols`` column blocks each), >= 2 K tiles per split. Two waves (the table): rounded down to a
    power of 2; one wave: as many as fit, so the grid is never over one program per SM."""
    s = max(1, min(waves * sms // cols, d_in // (2 * block_k)))
    return 1 << (s.bit_length() - 1) if waves > 1 else s


def tile_for(kernel: str, arch: str, r: int, overrides: Optional[dict] = None) -> Tile:
    if overrides and kernel in overrides:
        return overrides[kernel]
    if arch == "interpreter":
        return _INTERP[kernel]
    major = _major(arch)
    t = (_SM90 if major >= 9 else _SM80)[kernel]
    if major not in (8, 9):  # consumer / sm_12x parts: ~100 KB of shared memory per block
        t = dataclasses.replace(t, num_stages=min(t.num_stages, 2))
    return dataclasses.replace(t, **_HI.get(kernel, {})) if r > 32 else t


def _fit(kernel: str, t: Tile, *, ieee: bool, aligned: bool, dropout: bool = False) -> Tile:
    """A table tile narrowed where the table's would spill registers: fp32 (exact products
    without tensor cores), operands whose rows are not 16-byte aligned (element-wise loads), and
    the dgrad's dropout mask (a hash per output element) on 256-wide tiles."""
    if kernel in ("g_shrink", "g_dbshrink"):
        return t if aligned and not ieee else dataclasses.replace(t, block_t=min(t.block_t, 64),
                                                                  block_k=min(t.block_k, 64))
    if ieee or not aligned:
        return dataclasses.replace(t, block_t=min(t.block_t, 64), block_n=min(t.block_n, 64),
                                   block_k=min(t.block_k, 32), num_warps=4)
    if dropout and t.block_n > 128:
        return dataclasses.replace(t, block_n=128)
    return t


def _tma_ok(*ts: Tensor) -> bool:
    """Every tensor can be a TMA descriptor's base: 2-D, unit inner stride, 16-byte aligned base and rows."""
    for t in ts:
        el = t.element_size()
        if (t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * el) % 16 or t.data_ptr() % 16
                or t.shape[1] * el < 16):
            return False
    return True


def _aligned(*ts: Tensor) -> bool:
    """Rows of every tensor start 16-byte aligned (vector loads, cp.async) -- its last dim is unit-stride."""
    return all(t.stride(-1) == 1 and all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])
               and t.data_ptr() % 16 == 0 for t in ts)


@dataclasses.dataclass
class _Call:
    """Per-call launch facts shared by every stage."""

    route: _Route
    seed: Tensor  # int64 0-dim on the device (a dummy pointer when dropout is off)
    drop: bool
    thr: int
    inv_keep: float
    prec: str
    r: int
    R_PAD: int

    @classmethod
    def of(cls, a: FwdArgs) -> "_Call":
        E = a.task_A.shape[0]
        if a.single_task >= E:
            raise ValueError(f"single_task={a.single_task} is not a task of this layer (E={E}): rebuild the routing")
        route, x, r = _Route.of(a), a.x, a.shared_A.shape[0]
        drop = a.dropout_p > 0.0
        if not drop:
            return cls(route, a.token_task, False, 0, 1.0, _prec(x.dtype), r, _pow2(r, 16))
        seed = launch.kernel_seed(a)  # the issue-15 convention: int64 on x's device, read by the kernels
        return cls(route, seed, True, threshold24(a.dropout_p), 1.0 / (1.0 - a.dropout_p), _prec(x.dtype), r,
                   _pow2(r, 16))

    def routing(self) -> tuple:
        return self.route.sorted_idx, self.route.offsets, self.route.single, self.route.T, self.route.E


class GemmVariant:
    """The ``gemm`` / ``gemm-ptr`` / ``gemm-tma`` variants: ``forward(FwdArgs)``, ``backward(BwdArgs)``.

    ``tiles``: per-kernel Tile overrides (``KERNELS``); ``decode_t``: largest T that takes the
    decode path (tests set 0 to run the GEMM path on small inputs)."""

    def __init__(self, mode: str = "gemm", tiles: Optional[dict] = None, decode_t: int = configs.DECODE_T):
        if mode not in VARIANTS:
            raise ValueError(f"variant={mode!r} must be one of {VARIANTS}")
        unknown = set(tiles or ()) - set(KERNELS)
        if unknown:
            raise ValueError(f"unknown kernel(s) in tile overrides: {sorted(unknown)}; known: {KERNELS}")
        self.mode, self.tiles, self.decode_t = mode, dict(tiles or {}), decode_t
        self._train_idx: dict = {}

    def _tile(self, kernel: str, x: Tensor, r: int, **fit) -> Tile:
        """The tile of ``kernel`` for x; ``fit`` (see ``_fit``) narrows a table tile, never an override."""
        t = tile_for(kernel, arch_of(x), r, self.tiles)
        return _fit(kernel, t, **fit) if fit and kernel not in self.tiles else t

    # -----------------------------------------------------------------------------------------

    def forward(self, a: FwdArgs):
        x, W = a.x, a.weight
        T, r, d_out = x.shape[0], a.shared_A.shape[0], W.shape[0]
        acc = dict(device=x.device, dtype=acc_dtype(x.dtype))
        h_s, h_t, coef = x.new_empty((T, r), **acc), x.new_empty((T, r), **acc), x.new_empty((T, 2), **acc)
        y = x.new_empty((T, d_out))
        if T == 0:
            return y, h_s, h_t, coef
        with launch.device_guard(x.device):
            c = _Call.of(a)
            if T <= self.decode_t:
                self._decode(a, c, y, h_s, h_t, coef)
                return y, h_s, h_t, coef
            A_s, tA, Wg = a.shared_A, a.task_A, a.gate_weight
            self._shrink(c, x, K.MODE_FWD.value, (A_s, A_s.stride(1), A_s.stride(0)),
                         (tA, tA.stride(0), tA.stride(2), tA.stride(1)),
                         (Wg, Wg.stride(0), Wg.stride(1)) if Wg is not None else None,
                         (h_s, h_t, coef, h_s, h_t, coef), a.scale, gate=Wg is not None)
            B_s, tB = a.shared_B, a.task_B
            self._gemm(c, y, x, W, True, (h_s, h_t, coef), (B_s, B_s.stride(1), B_s.stride(0)),
                       (tB, tB.stride(0), tB.stride(2), tB.stride(1)), a.token_task, a.scale, bias=a.bias,
                       gate_term=None, dropout=False)
        return y, h_s, h_t, coef

    def backward(self, a: BwdArgs):
        x, gy, W = a.x, a.grad_y, a.weight
        T, r, E = x.shape[0], a.shared_A.shape[0], a.task_A.shape[0]
        gate = a.gate_weight is not None
        need_gate = gate and a.needs_gate
        need_dlog = gate and (a.needs_gate or a.needs_dx)
        with launch.device_guard(x.device):
            c = _Call.of(a)
            train = [e for e in range(E) if a.trainable(e)] if c.route.task else []
            acc = dict(device=x.device, dtype=acc_dtype(x.dtype))
            h_s, h_t, coef = a.h_s.contiguous(), a.h_t.contiguous(), a.coef.contiguous()
            dh_s, dh_t = x.new_empty((T, r), **acc), x.new_empty((T, r), **acc)
            dlog = x.new_empty((T, 2), **acc) if need_dlog else None
            db = a.needs_shared or bool(train)  # the gy shrink sums dB
            ws = _GradSpace(self, c, x, a, train, need_gate, self._shrink_tile(gy, c, db).block_t)
            B_s, tB = a.shared_B, a.task_B
            if T > 0:
                self._shrink(c, gy, K.MODE_BWD.value, (B_s, B_s.stride(0), B_s.stride(1)),
                             (tB, tB.stride(0), tB.stride(1), tB.stride(2)), None,
                             (h_s, h_t, coef, dh_s, dh_t, dlog if need_dlog else dh_s), a.scale, gate=need_dlog,
                             db=ws)
            dx = None
            if a.needs_dx:
                dx = torch.empty_like(x, memory_format=torch.contiguous_format)
                A_s, tA = a.shared_A, a.task_A
                if T > 0:
                    self._gemm(c, dx, gy, W, False, (dh_s, dh_t, None), (A_s, A_s.stride(0), A_s.stride(1)),
                               (tA, tA.stride(0), tA.stride(1), tA.stride(2)), a.token_task, 1.0, bias=None,
                               gate_term=(dlog, a.gate_weight) if need_dlog else None, dropout=c.drop)
            if T > 0:
                ws.wgrad_x(x, dh_s, dh_t, dlog if need_gate else None)
            grads = ws.finalize()
        return (dx, *grads)

    # -----------------------------------------------------------------------------------------
    # stages

    def _shrink_tile(self, X: Tensor, c: "_Call", db: bool) -> Tile:
        """Tile of a shrink over X: the table's (narrowed by ``_fit``), its token block halved
        (down to 16) until the grid has a program per SM -- a memory-bound pass needs every SM
        streaming -- except for the dB-summing shrink, whose blocks stay tall: each block adds a
        d_out x r partial sum per expert."""
        t, sms = self._tile("g_dbshrink" if db else "g_shrink", X, c.r, ieee=c.prec == "ieee",
                            aligned=_aligned(X)), sms_of(X)
        bt = t.block_t
        while not db and sms is not None and bt > 16 and triton.cdiv(X.shape[0], bt) < sms:
            bt //= 2
        return dataclasses.replace(t, block_t=bt)

    def _shrink(self, c: _Call, X: Tensor, mode: int, ms, mt, gw, outs, scale: float, *, gate: bool,
                db: Optional["_GradSpace"] = None):
        T, Kd = X.shape
        tile = self._shrink_tile(X, c, db is not None and (db.do_shared or db.do_task))
        bt = tile.block_t
        g = gw if gw is not None else (X, 0, 0)
        db_args = db.shrink_args() if db is not None else (outs[0], outs[0], 0, 0, c.route.offsets)
        db_flags = db.shrink_flags() if db is not None else (False, False, L.STORE_ATOMIC.value)
        L._lora_shrink_kernel[(c.route.blocks(bt),)](
            X, X.stride(0), X.stride(1), *ms, *mt, *g, *outs, *db_args,
            c.seed, *c.routing(), Kd, c.r, scale, c.thr, c.inv_keep,
            MODE=mode, ROUTE=c.route.mode, TASK=c.route.task, GATE=gate, DROPOUT=c.drop and mode == K.MODE_FWD.value,
            DB_SHARED=db_flags[0], DB_TASK=db_flags[1], STORE=db_flags[2],
            BLOCK_T=bt, BLOCK_K=tile.block_k, R_PAD=c.R_PAD, G_PAD=c.route.g_pad, PREC=c.prec,
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )

    def use_tma(self, out: Tensor, A: Tensor, W: Tensor) -> bool:
        """TMA GEMM for this call? ``gemm``: on sm_90+ for 16-bit aligned operands; ``gemm-tma``:
        whenever the operands and the GPU allow it (the interpreter emulates TMA)."""
        if self.mode == "gemm-ptr":
            return False
        arch = arch_of(A)
        ok = TensorDescriptor is not None and _tma_ok(out, A, W) and (_major(arch) >= 9 or arch == "interpreter")
        if self.mode == "gemm-tma":
            if not ok:
                warn_once(f"gemm-tma-{arch}-{A.dtype}", f"moecl_kernels: variant 'gemm-tma' needs sm_90+ and "
                          f"16-byte aligned, row-major operands ({arch}, {A.dtype}); this call runs 'gemm-ptr'")
            return ok
        return ok and A.dtype != torch.float32 and arch != "interpreter"

    def _gemm(self, c: _Call, out: Tensor, A: Tensor, W: Tensor, fwd: bool, p, ns, nt, token_task: Tensor,
              scale: float, *, bias: Optional[Tensor], gate_term, dropout: bool):
        """out = LoRA K-steps (+ mask, gate term, bias) + A W^T (fwd) or A W (dgrad)."""
        T, N = out.shape
        Kd = A.shape[1]
        dlog, gw = gate_term if gate_term is not None else (p[0], None)
        gw_args = (gw, gw.stride(0), gw.stride(1)) if gw is not None else (p[0], 0, 0)
        lora = (p[0], p[1], p[2] if p[2] is not None else p[0], *ns, *nt,
                bias if bias is not None else out, dlog, *gw_args, token_task, c.seed,
                c.route.single, T, c.route.E, N, Kd, c.r, scale, c.thr, c.inv_keep)
        tma = self.use_tma(out, A, W)
        tile = self._tile("g_tma" if tma else "g_gemm", A, c.r, ieee=c.prec == "ieee", aligned=_aligned(out, A, W),
                          dropout=dropout)
        BM, BN, BK = tile.block_t, tile.block_n, tile.block_k
        meta = dict(ROUTE=c.route.mode, TASK=c.route.task, ROW_SCALE=p[2] is not None, DROPOUT=dropout,
                    GATE_TERM=gate_term is not None, HAS_BIAS=bias is not None, BLOCK_M=BM, BLOCK_N=BN,
                    BLOCK_K=BK, GROUP=tile.group, R_PAD=c.R_PAD, R_CHUNK=min(c.R_PAD, 32), PREC=c.prec,
                    num_warps=tile.num_warps, num_stages=tile.num_stages)
        n_tiles = triton.cdiv(T, BM) * triton.cdiv(N, BN)
        if tma:
            progs = min(n_tiles, sms_of(A) or INTERP_PROGS)
            b_desc = TensorDescriptor.from_tensor(W, [BN, BK] if fwd else [BK, BN])
            G._gemm_tma_kernel[(progs,)](
                TensorDescriptor.from_tensor(A, [BM, BK]), b_desc, TensorDescriptor.from_tensor(out, [BM, BN]),
                *lora, B_TRANS=fwd, NUM_PROGS=progs, **meta)
        else:
            wk, wn = (W.stride(1), W.stride(0)) if fwd else (W.stride(0), W.stride(1))
            G._gemm_ptr_kernel[(n_tiles,)](out, out.stride(0), out.stride(1), A, A.stride(0), A.stride(1), W, wk, wn,
                                           *lora, **meta)

    def _decode(self, a: FwdArgs, c: _Call, y: Tensor, h_s: Tensor, h_t: Tensor, coef: Tensor):
        x, W, A_s, tA, Wg, B_s, tB = a.x, a.weight, a.shared_A, a.task_A, a.gate_weight, a.shared_B, a.task_B
        T, d_in = x.shape
        d_out = W.shape[0]
        tile = self._tile("g_decode", x, c.r)
        BT, BN, BK = _pow2(T, 16), tile.block_n, tile.block_k
        n_wblocks = triton.cdiv(d_out, BN)
        n_exp = 0 if not c.route.task else (1 if c.route.mode == K.ROUTE_SINGLE.value else c.route.E)
        cols = n_wblocks + 1 + n_exp
        sms = sms_of(x)
        if sms is not None and ("g_decode" not in self.tiles or tile.split_k == 0):
            splits = decode_splits(sms, cols, d_in, BK, tile.waves)
        else:
            splits = max(1, min(tile.split_k, triton.cdiv(d_in, BK)))
        k_per = triton.cdiv(triton.cdiv(d_in, splits), BK) * BK
        splits = triton.cdiv(d_in, k_per)
        HW = 2 * c.R_PAD + 2
        ws_y = x.new_empty((splits, T, d_out), dtype=torch.float32)
        ws_h = x.new_empty((splits, T, HW), dtype=torch.float32)
        gw = (Wg, Wg.stride(0), Wg.stride(1)) if Wg is not None else (x, 0, 0)
        common = dict(ROUTE=c.route.mode, TASK=c.route.task, GATE=Wg is not None, R_PAD=c.R_PAD, PREC=c.prec,
                      BLOCK_T=BT, BLOCK_N=BN, num_warps=tile.num_warps)
        D._decode_gemv_kernel[(cols, splits)](
            x, x.stride(0), x.stride(1), W, W.stride(0), W.stride(1), A_s, A_s.stride(0), A_s.stride(1),
            tA, tA.stride(0), tA.stride(1), tA.stride(2), *gw, ws_y, ws_h, a.token_task, c.seed,
            c.route.single, T, c.route.E, d_out, d_in, c.r, k_per, c.thr, c.inv_keep,
            DROPOUT=c.drop, BLOCK_K=BK, num_stages=tile.num_stages, **common)
        D._decode_finalize_kernel[(n_wblocks,)](
            ws_y, ws_h, y, y.stride(0), y.stride(1), h_s, h_t, coef, B_s, B_s.stride(1), B_s.stride(0),
            tB, tB.stride(0), tB.stride(2), tB.stride(1), a.bias if a.bias is not None else y, a.token_task,
            c.route.single, T, c.route.E, d_out, c.r, splits, a.scale, HAS_BIAS=a.bias is not None, **common)

    def train_index(self, train: list, E: int, device: torch.device) -> Tensor:
        """Cached int32 [E] device tensor: each expert's index among the trainable ones, or -1."""
        key = (tuple(train), E, device)
        hit = self._train_idx.get(key)
        if hit is None:
            slot_of = torch.full((max(E, 1),), -1, dtype=torch.int32)
            slot_of[train] = torch.arange(len(train), dtype=torch.int32)
            hit = self._train_idx[key] = slot_of.to(device)
        return hit



class _GradSpace:
    """The fp32 accumulators of the LoRA gradients, laid out like the gradients (task parts
    indexed by trainable expert), or, ``deterministic``, one copy per block/chunk slot; and the
    launches that fill (shrink dB, ``wgrad_x``) and finalize them."""

    def __init__(self, v: GemmVariant, c: _Call, x: Tensor, a: BwdArgs, train: list, need_gate: bool, shrink_t: int):
        T, d_in = x.shape
        d_out, r, E = a.weight.shape[0], c.r, c.route.E
        self.v, self.c, self.a = v, c, a
        self.det = a.deterministic
        self.do_shared, self.do_task, self.do_gate = a.needs_shared, bool(train), need_gate
        self.wt = v._tile("g_wgrad", x, r)
        self.chunk_b = shrink_t
        self.slots_a = c.route.blocks(self.wt.chunk) if self.det else 1
        self.slots_b = c.route.blocks(shrink_t) if self.det else 1
        self.n_a, self.n_b, self.n_g = r * d_in, d_out * r, 2 * d_in
        n_task_a = self.slots_a if self.det else len(train)
        n_task_b = self.slots_b if self.det else len(train)
        sizes = dict(as_=self.slots_a * self.n_a * self.do_shared, bs=self.slots_b * self.n_b * self.do_shared,
                     g=self.slots_a * self.n_g * self.do_gate, a=n_task_a * self.n_a * self.do_task,
                     b=n_task_b * self.n_b * self.do_task)
        self.off, total = {}, 0
        for k, n in sizes.items():
            self.off[k] = total
            total += n
        make = torch.empty if self.det else torch.zeros
        self.ws = make((max(total, 1),), dtype=torch.float32, device=x.device)
        self.store = (L.STORE_SLOTS if self.det else L.STORE_ATOMIC).value
        self.slot_of = v.train_index(train, E, x.device)

    def _part(self, k: str) -> Tensor:
        return self.ws[self.off[k]:]

    def shrink_args(self) -> tuple:
        return self._part("bs"), self._part("b"), self.n_b, self.n_b, self.slot_of

    def shrink_flags(self) -> tuple:
        return self.do_shared, self.do_task, self.store

    def wgrad_x(self, x: Tensor, dh_s: Tensor, dh_t: Tensor, dlog: Optional[Tensor]):
        if not (self.do_shared or self.do_task or self.do_gate):
            return
        c, t = self.c, self.wt
        T, N = x.shape
        L._lora_wgrad_x_kernel[(c.route.blocks(t.chunk), triton.cdiv(N, t.block_n))](
            x, x.stride(0), x.stride(1), dh_s, dh_t, dlog if dlog is not None else dh_s,
            self._part("as_"), self._part("a"), self._part("g"), self.n_a, self.n_a, self.n_g, self.slot_of,
            c.seed, *c.routing(), N, c.r, c.thr, c.inv_keep,
            ROUTE=c.route.mode, DO_SHARED=self.do_shared, DO_TASK=self.do_task, DO_GATE=self.do_gate,
            DROPOUT=c.drop, STORE=self.store, CHUNK=t.chunk, BLOCK_T=t.block_t, BLOCK_N=t.block_n,
            R_PAD=c.R_PAD, G_PAD=c.route.g_pad, PREC=c.prec, num_warps=t.num_warps, num_stages=t.num_stages,
        )

    def finalize(self) -> tuple:
        """(dA_s, dB_s, dA, dB, dgate) in the weights' dtype, each None when not wanted."""
        a, c = self.a, self.c

        def out(like: Optional[Tensor], on: bool) -> Optional[Tensor]:
            return torch.empty(like.shape, dtype=like.dtype, device=like.device) if on and like is not None else None

        dA_s, dB_s = out(a.shared_A, a.needs_shared), out(a.shared_B, a.needs_shared)
        dA, dB = out(a.task_A, a.needs_task), out(a.task_B, a.needs_task)
        dgate = out(a.gate_weight, self.do_gate)
        outs = [t for t in (dA_s, dB_s, dA, dB, dgate) if t is not None]
        if not outs:
            return dA_s, dB_s, dA, dB, dgate
        dummy = outs[0]
        ns = tuple(n if t is not None else 0 for n, t in ((self.n_a, dA_s), (self.n_b, dB_s), (self.n_g, dgate),
                                                           (self.n_a, dA), (self.n_b, dB)))
        BLOCK = 1024 if self.ws.is_cuda else 256
        units = 3 + (2 * c.route.E if dA is not None else 0)
        L._grad_finalize_kernel[(triton.cdiv(max(ns), BLOCK), units)](
            self.ws, *(t if t is not None else dummy for t in (dA_s, dB_s, dgate, dA, dB)), self.slot_of,
            *(self.off[k] for k in ("as_", "bs", "g", "a", "b")), *ns, self.slots_a, self.slots_b,
            c.route.offsets, c.route.single, c.route.T, c.route.E,
            ROUTE=c.route.mode, STORE=self.store, CHUNK_A=self.wt.chunk, CHUNK_B=self.chunk_b,
            G_PAD=c.route.g_pad, BLOCK=BLOCK,
        )
        return dA_s, dB_s, dA, dB, dgate
