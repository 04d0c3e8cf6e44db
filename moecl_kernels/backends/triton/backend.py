"""The ``triton`` backend: launches the kernels of ``kernels.py`` (see its docstring).

Forward (3 launches; +1 with split-K):
    shrink(x)  -> h_s, h_t, coef         x read once: shared + routed expert + gate logits
    expand     -> y = b + gated LoRA     one write of y
    y.addmm_(x, W^T)                     cuBLAS base GEMM accumulating on top (beta = 1)
  or, with ``expand="fused"``, the expand kernel runs the base GEMM itself with the LoRA
  tile as its accumulator's start value (one write of y, no cuBLAS) -- except for mixed
  decode batches (T <= 64), whose per-expert token blocks would each stream all of W.
Decode (T <= 64): the shrink splits K across programs (fp32 partials + a finalize
kernel) so that a handful of tokens still spreads the weight reads over the SMs.
Backward:
    shrink(gy) -> dh_s, dh_t, dlogits    gy read once for both experts
    expand     -> dx = keep*(dh_s A_s + dh_t A_t)/(1-p) + dlog W_g, then dx.addmm_(gy, W)
                  (or fused, as in the forward)
    wgrad(x)   -> dA_s, dA_t (trainable experts only), dW_g       x read once
    wgrad(gy)  -> dB_s, dB_t (trainable experts only)             gy read once
    (+ reduce kernels with ``deterministic=True``; atomics otherwise)

Which expand wins -- cuBLAS accumulate (its epilogue reads the LoRA term: one extra
T x d_out read hidden under a compute-bound GEMM, but one extra T x d_out write by the
expand) or the fused Triton GEMM (no extra pass, but a Triton GEMM against cuBLAS) -- is
for the GPU measurement to decide (benchmarks/NOTES.md has the predictions); no GPU was
available when this was written. Select with ``MOECL_TRITON_EXPAND=addmm|fused``
(default ``addmm``) or ``TritonBackend(expand=...)``.

No host syncs: routing runs on the device (``kernels._block_of``), the grids are sized
from host-side shapes only, and ``single_task`` is a host hint. Everything is CUDA-graph
capturable once warmed up: kernels compiled (and, if enabled, autotuned) and the device
copy of each ``expert_trainable`` pattern cached (its first use copies it to the device).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from ...ops.dropout import MASK32, SEED_XOR, threshold24
from ..base import SINGLE_MIXED, BwdArgs, FwdArgs, acc_dtype
from . import configs
from . import kernels as K
from .configs import Tile, TileTable

EXPAND_ENV = "MOECL_TRITON_EXPAND"
EXPAND_MODES = ("addmm", "fused")
VARIANT_ENV = "MOECL_TRITON_VARIANT"
GEMM_VARIANTS = ("gemm", "gemm-ptr", "gemm-tma")  # variants.py: the LoRA terms inside the base GEMM
VARIANTS = EXPAND_MODES + GEMM_VARIANTS
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Triton picks the interpreter when a kernel is *defined*; record how ours were built.
INTERPRETED = isinstance(K._shrink_kernel, InterpretedFunction)


def _pow2(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(n))


@dataclass
class _Route:
    """Host-side description of the routing: which kernel path and the grid sizes."""

    mode: int  # K.ROUTE_SINGLE or K.ROUTE_GROUPED
    single: int  # ROUTE_SINGLE: the expert of every token, or -1 (no token has a task)
    task: bool  # some token may have a task expert
    token_task: Tensor
    sorted_idx: Tensor
    offsets: Tensor
    T: int
    E: int

    @classmethod
    def of(cls, a: FwdArgs) -> "_Route":
        T, E = a.x.shape[0], a.task_A.shape[0]
        tensors = (a.token_task, a.sorted_idx, a.expert_offsets, T, E)
        if a.single_task == SINGLE_MIXED:
            return cls(K.ROUTE_GROUPED.value, -1, True, *tensors)
        return cls(K.ROUTE_SINGLE.value, a.single_task, a.single_task >= 0, *tensors)

    def blocks(self, block: int) -> int:
        """Programs along the token axis: exact for one expert, the worst case when grouped."""
        n = triton.cdiv(self.T, block)
        return n if self.mode == K.ROUTE_SINGLE.value else n + self.E + 1

    @property
    def g_pad(self) -> int:
        return _pow2(self.E + 1, 2)

    def args(self) -> tuple:
        return self.sorted_idx, self.offsets, self.single, self.T, self.E


@dataclass
class _Dropout:
    enabled: bool
    seed: int  # (seed ^ SEED_XOR) mod 2**32 as a signed int32, so the kernel signature never changes
    thr: int
    inv_keep: float

    @classmethod
    def of(cls, a: FwdArgs) -> "_Dropout":
        if a.dropout_p == 0.0:
            return cls(False, 0, 0, 1.0)
        s = ((int(a.seed) & MASK32) ^ SEED_XOR) & MASK32
        return cls(True, s - (1 << 32) if s >= (1 << 31) else s, threshold24(a.dropout_p), 1.0 / (1.0 - a.dropout_p))

    def args(self) -> tuple:
        return self.seed, self.thr, self.inv_keep


_NO_DROPOUT = _Dropout(False, 0, 0, 1.0)


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (TF32 would miss the 1e-5 accuracy contract).
    return "ieee" if dtype == torch.float32 else "tf32"


def _split_k(tile: Tile, n_blocks: int, K_: int, device: torch.device) -> int:
    """split_k == 0: split the reduction until about one program per SM (decode / small T),
    keeping at least two K tiles per split; rounded down to a power of two."""
    if tile.split_k > 0:
        return max(1, min(tile.split_k, triton.cdiv(K_, tile.block_k)))
    if device.type != "cuda":
        return 1
    sms = _sm_count(device)
    s = max(1, min(sms // max(n_blocks, 1), K_ // (2 * tile.block_k)))
    return 1 << (s.bit_length() - 1)


_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _rank_view(t: Tensor, transposed: bool) -> Tensor:
    """The [..., r, N] view of a LoRA gradient: dA ([..., r, d_in]) as is, dB ([..., d_out, r]) transposed."""
    return t.transpose(-1, -2) if transposed else t


class TritonBackend:
    """Triton implementation of the fused MoE-LoRA op (``backend="triton"``).

    ``variant``: one of ``VARIANTS`` -- ``addmm`` (default) and ``fused`` are the expand modes
    below, ``gemm`` / ``gemm-ptr`` / ``gemm-tma`` the fused-GEMM variants of ``variants.py``
    (default: ``$MOECL_TRITON_VARIANT``). ``expand``: ``"addmm"`` or ``"fused"`` (default:
    ``$MOECL_TRITON_EXPAND`` or addmm), used when no variant is given.
    ``tiles``: per-kernel Tile overrides (see ``configs``, ``variants.KERNELS``), for experiments and tests."""

    name = "triton"
    priority = 20

    def __init__(self, expand: Optional[str] = None, tiles: Optional[dict[str, Tile]] = None,
                 variant: Optional[str] = None):
        v = (variant or ("" if expand else os.environ.get(VARIANT_ENV, "")) or "").strip().lower()
        if v and v not in VARIANTS:
            raise ValueError(f"variant={v!r} (or ${VARIANT_ENV}) must be one of {VARIANTS}")
        mode = (v if v in EXPAND_MODES else expand or os.environ.get(EXPAND_ENV, "") or "addmm").strip().lower()
        if mode not in EXPAND_MODES:
            raise ValueError(f"expand={mode!r} (or ${EXPAND_ENV}) must be one of {EXPAND_MODES}")
        self.expand = mode
        self.variant = v if v in GEMM_VARIANTS else mode
        tiles = dict(tiles or {})
        self._gemm = None
        if self.variant in GEMM_VARIANTS:
            from .variants import KERNELS as GEMM_KERNELS, GemmVariant

            self._gemm = GemmVariant(self.variant, {k: tiles.pop(k) for k in GEMM_KERNELS if k in tiles})
        self.tiles = TileTable(tiles)
        self._train_idx: dict = {}
        self._lock = threading.Lock()

    def unavailable_reason(self, x: Tensor) -> Optional[str]:
        if x.dtype == torch.float64:
            return "fp64 is not supported by the triton backend"
        if x.dtype not in _KERNEL_DTYPES:
            return f"dtype {x.dtype} is not supported by the triton backend (fp16, bf16, fp32)"
        if x.device.type == "cuda":
            return None
        if x.device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1" or not INTERPRETED:
                return ("CPU tensors run only under the Triton interpreter: set TRITON_INTERPRET=1 "
                        "before triton is imported (tests only; use a CUDA device)")
            if x.dtype == torch.bfloat16:
                return "bf16 needs a GPU: the Triton interpreter has no bf16 matmul"
            return None
        return f"tensors on {x.device.type} are not supported by the triton backend (CUDA only)"

    # -----------------------------------------------------------------------------------------
    # forward / backward

    def forward(self, a: FwdArgs):
        if self._gemm is not None:
            return self._gemm.forward(a)
        x = a.x
        T, r, d_out = x.shape[0], a.shared_A.shape[0], a.weight.shape[0]
        acc = dict(device=x.device, dtype=acc_dtype(x.dtype))
        route, drop = _Route.of(a), _Dropout.of(a)
        h_s, h_t, coef = x.new_empty((T, r), **acc), x.new_empty((T, r), **acc), x.new_empty((T, 2), **acc)
        A_s, tA, Wg = a.shared_A, a.task_A, a.gate_weight
        self._shrink(
            K.MODE_FWD.value, route, drop, x,
            (A_s, A_s.stride(1), A_s.stride(0)), (tA, tA.stride(0), tA.stride(2), tA.stride(1)),
            (Wg, Wg.stride(0), Wg.stride(1)) if Wg is not None else None,
            (h_s, h_t, coef, h_s, h_t, coef), r, a.scale, gate=Wg is not None,
        )
        y = x.new_empty((T, d_out))
        W, B_s, tB = a.weight, a.shared_B, a.task_B
        fused = self._fuse_base(route)
        self._expand(
            y, route, _NO_DROPOUT, (h_s, h_t), coef,
            (B_s, B_s.stride(1), B_s.stride(0)), (tB, tB.stride(0), tB.stride(2), tB.stride(1)),
            bias=a.bias, gate_term=None, base=(x, W, W.stride(1), W.stride(0)) if fused else None, scale=a.scale,
        )
        if not fused:
            y.addmm_(x, W.t())
        return y, h_s, h_t, coef

    def backward(self, a: BwdArgs):
        if self._gemm is not None:
            return self._gemm.backward(a)
        x, gy, W = a.x, a.grad_y, a.weight
        T, r, E = x.shape[0], a.shared_A.shape[0], a.task_A.shape[0]
        acc = dict(device=x.device, dtype=acc_dtype(x.dtype))
        route, drop = _Route.of(a), _Dropout.of(a)
        h_s, h_t, coef = a.h_s.contiguous(), a.h_t.contiguous(), a.coef.contiguous()
        gate = a.gate_weight is not None
        trainable = [e for e in range(E) if a.trainable(e)]
        need_gate = gate and a.needs_gate
        # The logit gradients feed dx (the gate sees x) as well as dW_g.
        need_dlog = gate and (a.needs_gate or a.needs_dx)

        dh_s, dh_t = x.new_empty((T, r), **acc), x.new_empty((T, r), **acc)
        dlog = x.new_empty((T, 2), **acc) if need_dlog else None
        B_s, tB = a.shared_B, a.task_B
        self._shrink(
            K.MODE_BWD.value, route, _NO_DROPOUT, gy,
            (B_s, B_s.stride(0), B_s.stride(1)), (tB, tB.stride(0), tB.stride(1), tB.stride(2)),
            None, (h_s, h_t, coef, dh_s, dh_t, dlog if need_dlog else dh_s), r, a.scale, gate=need_dlog,
        )

        dx = None
        if a.needs_dx:
            dx = torch.empty_like(x, memory_format=torch.contiguous_format)
            A_s, tA, Wg = a.shared_A, a.task_A, a.gate_weight
            fused = self._fuse_base(route)
            self._expand(
                dx, route, drop, (dh_s, dh_t), None,
                (A_s, A_s.stride(0), A_s.stride(1)), (tA, tA.stride(0), tA.stride(1), tA.stride(2)),
                bias=None, gate_term=(dlog, Wg) if need_dlog else None,
                base=(gy, W, W.stride(0), W.stride(1)) if fused else None, scale=1.0,
            )
            if not fused:
                dx.addmm_(gy, W)

        train = trainable if route.task else []
        dA_s = dB_s = dA = dB = dgate = None
        if a.needs_shared or train or need_gate:
            dA_s, dA, dgate = self._wgrad(
                route, drop, x, (dh_s, dh_t), None, dlog if need_gate else None, a.needs_shared, train, a.scale,
                shared_like=a.shared_A, task_like=a.task_A, gate_like=a.gate_weight, transposed=False,
                deterministic=a.deterministic,
            )
        if a.needs_shared or train:
            dB_s, dB, _ = self._wgrad(
                route, _NO_DROPOUT, gy, (h_s, h_t), coef, None, a.needs_shared, train, a.scale,
                shared_like=a.shared_B, task_like=a.task_B, gate_like=None, transposed=True,
                deterministic=a.deterministic,
            )
        if a.needs_task and dA is None:  # no trainable expert has tokens here: zero gradients
            dA, dB = torch.zeros_like(a.task_A), torch.zeros_like(a.task_B)
        return dx, dA_s, dB_s, dA, dB, dgate

    # -----------------------------------------------------------------------------------------
    # stages

    def _fuse_base(self, route: _Route) -> bool:
        """Run the base GEMM inside the expand kernel? Only in ``fused`` mode, and never for
        grouped decode batches: their token blocks are per expert, so a fused base GEMM would
        stream W once per expert present where cuBLAS streams it once."""
        return self.expand == "fused" and (route.mode == K.ROUTE_SINGLE.value or route.T > configs.DECODE_T)

    def _shrink(self, mode, route: _Route, drop: _Dropout, X: Tensor, ms, mt, gw, outs, r: int, scale: float, *,
                gate: bool):
        """X [T, K] times (ms, mt[expert]) and, forward with ``gw``, the gate weight; then the
        MODE epilogue into ``outs`` = (H_S, H_T, COEF, DH_S, DH_T, DLOG) (+ finalize if split)."""
        T, Kd = X.shape
        if T == 0:
            return
        R_PAD = _pow2(r, 16)
        key = (X.dtype, route.mode, triton.next_power_of_2(T), Kd, R_PAD, mode, gate, drop.enabled)

        def run(tile: Tile):
            n_blocks = route.blocks(tile.block_t)
            split = _split_k(tile, n_blocks, Kd, X.device)
            k_per_split = triton.cdiv(triton.cdiv(Kd, split), tile.block_k) * tile.block_k
            ws = X.new_empty((split, T, 2 * R_PAD + 2), dtype=torch.float32) if split > 1 else outs[0]
            g = gw if gw is not None else (X, 0, 0)
            K._shrink_kernel[(n_blocks, split)](
                X, X.stride(0), X.stride(1), *ms, *mt, *g, *outs, ws,
                *route.args(), Kd, r, k_per_split, scale, *drop.args(),
                MODE=mode, ROUTE=route.mode, TASK=route.task, GATE=gate, DROPOUT=drop.enabled,
                PARTIAL=split > 1, BLOCK_T=tile.block_t, BLOCK_K=tile.block_k, R_PAD=R_PAD, G_PAD=route.g_pad,
                PREC=_prec(X.dtype), num_warps=tile.num_warps, num_stages=tile.num_stages,
            )
            if split > 1:
                K._shrink_finalize_kernel[(triton.cdiv(T, tile.block_t),)](
                    ws, route.token_task, *outs, T, r, scale, split,
                    MODE=mode, GATE=gate, BLOCK_T=tile.block_t, R_PAD=R_PAD,
                )

        run(self.tiles.pick("shrink", X.device, T, r, key, run))

    def _expand(self, out: Tensor, route: _Route, drop: _Dropout, p, coef: Optional[Tensor], ns, nt, *,
                bias: Optional[Tensor], gate_term, base, scale: float):
        """out = keep?(P_s N_s + P_t N_t) (+ dlog W_g) (+ bias) (+ X WB, the base GEMM).

        ``coef`` given: P rows are scaled by ``scale * coef`` (forward). ``gate_term`` =
        (dlog, W_g); ``base`` = (X, WB, stride_k, stride_n) of the base GEMM to fuse, or None."""
        T, N = out.shape
        if T == 0:
            return
        r = p[0].shape[1]
        R_PAD = _pow2(r, 16)
        fused = base is not None
        X, WB, s_wk, s_wn = base if fused else (p[0], p[0], 0, 0)
        Kd = X.shape[1]
        dlog, gw = gate_term if gate_term is not None else (p[0], None)
        gw_args = (gw, gw.stride(0), gw.stride(1)) if gw is not None else (p[0], 0, 0)
        kernel = "fused" if fused else "expand"
        key = (out.dtype, route.mode, triton.next_power_of_2(T), N, Kd if fused else 0, R_PAD,
               gate_term is not None, drop.enabled)

        def run(tile: Tile):
            grid_t = route.blocks(tile.block_t)
            grid = (grid_t * triton.cdiv(N, tile.block_n),)
            K._expand_kernel[grid](
                out, out.stride(0), out.stride(1), p[0], p[1], coef if coef is not None else p[0],
                *ns, *nt, bias if bias is not None else out, dlog, *gw_args,
                X, X.stride(0), X.stride(1), WB, s_wk, s_wn,
                *route.args(), N, Kd, r, grid_t, scale, *drop.args(),
                ROUTE=route.mode, TASK=route.task, ROW_SCALE=coef is not None, DROPOUT=drop.enabled,
                GATE_TERM=gate_term is not None, HAS_BIAS=bias is not None, FUSED_BASE=fused,
                BLOCK_T=tile.block_t, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP=tile.group,
                R_PAD=R_PAD, G_PAD=route.g_pad, PREC=_prec(out.dtype),
                num_warps=tile.num_warps, num_stages=tile.num_stages,
            )

        run(self.tiles.pick(kernel, out.device, T, r, key, run))

    def _wgrad(self, route: _Route, drop: _Dropout, Z: Tensor, p, coef: Optional[Tensor], dlog: Optional[Tensor],
               do_shared: bool, train: list, scale: float, *, shared_like: Tensor, task_like: Tensor,
               gate_like: Optional[Tensor], transposed: bool, deterministic: bool):
        """(shared grad, stacked task grads, gate grad) = per-expert reductions P^T Z~ over tokens.

        Gradients are shaped like ``shared_like`` / ``task_like`` / ``gate_like`` ([r, N] or,
        ``transposed``, [N, r]); each is None when not computed (no ``do_shared``, empty
        ``train`` -- the trainable experts --, no ``dlog``)."""
        T, N = Z.shape
        r = p[0].shape[1]
        R_PAD = _pow2(r, 16)
        dev, dt = Z.device, Z.dtype
        do_task, do_gate = bool(train), dlog is not None
        slot_of, experts = self._train_index(train, route.E, dev)
        key = (dt, route.mode, triton.next_power_of_2(max(T, 1)), N, R_PAD, do_shared, do_task, do_gate,
               drop.enabled, deterministic)

        def run(tile: Tile):
            n_slots = route.blocks(tile.chunk)
            if deterministic:  # fp32 tile per (chunk, output), summed in a fixed order below
                bufs = [Z.new_empty((n_slots, rows, N), dtype=torch.float32) if on else None
                        for on, rows in ((do_shared, r), (do_task, r), (do_gate, 2))]
                views = bufs
            else:  # fp32 accumulators laid out like the gradients, atomically added into
                bufs = [torch.zeros(shape, dtype=torch.float32, device=dev) if on else None
                        for on, shape in ((do_shared, shared_like.shape), (do_task, (len(train), *task_like.shape[1:])),
                                          (do_gate, (2, N)))]
                views = [_rank_view(b, transposed and i < 2) if b is not None else None for i, b in enumerate(bufs)]
            dummy = p[0]
            vs, vt, vg = (v if v is not None else dummy for v in views)
            st_s = (vs.stride(-2), vs.stride(-1))
            st_t = (vt.stride(0) if vt.dim() == 3 else 0, vt.stride(-2), vt.stride(-1))
            st_g = (vg.stride(-2), vg.stride(-1))
            if T > 0:
                K._wgrad_kernel[(n_slots, triton.cdiv(N, tile.block_n))](
                    Z, Z.stride(0), Z.stride(1), p[0], p[1], coef if coef is not None else dummy,
                    dlog if do_gate else dummy, vs, *st_s, vt, *st_t, vg, *st_g, slot_of,
                    *route.args(), N, r, scale, *drop.args(),
                    ROUTE=route.mode, DO_SHARED=do_shared, DO_TASK=do_task, DO_GATE=do_gate,
                    ROW_SCALE=coef is not None, DROPOUT=drop.enabled,
                    STORE=(K.STORE_SLOTS if deterministic else K.STORE_ATOMIC).value,
                    CHUNK=tile.chunk, BLOCK_T=tile.block_t, BLOCK_N=tile.block_n, R_PAD=R_PAD, G_PAD=route.g_pad,
                    PREC=_prec(dt), num_warps=tile.num_warps, num_stages=tile.num_stages,
                )
            if deterministic:
                reduce = self._reduce
                return (reduce(bufs[0], shared_like, transposed, route, tile, n_slots, slot_of, False)
                        if do_shared else None,
                        reduce(bufs[1], task_like, transposed, route, tile, n_slots, slot_of, True)
                        if do_task else None,
                        reduce(bufs[2], gate_like, False, route, tile, n_slots, slot_of, False) if do_gate else None)
            g_t = None
            if do_task:
                if len(train) == route.E:
                    g_t = bufs[1].to(dt)
                else:
                    g_t = torch.zeros_like(task_like).index_copy_(0, experts, bufs[1].to(dt))
            return (bufs[0].to(dt) if do_shared else None, g_t, bufs[2].to(dt) if do_gate else None)

        return run(self.tiles.pick("wgrad", dev, T, r, key, run))

    @staticmethod
    def _reduce(ws: Tensor, like: Tensor, transposed: bool, route: _Route, tile: Tile, n_slots: int,
                slot_of: Tensor, per_expert: bool) -> Tensor:
        """Deterministic sum of the wgrad slots into a gradient shaped like ``like``."""
        out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        view = _rank_view(out, transposed)
        if not per_expert:
            view = view.unsqueeze(0)
        rows, N = ws.shape[1], ws.shape[2]
        BLOCK = 1024 if ws.device.type == "cuda" else 256
        K._wgrad_reduce_kernel[(view.shape[0], triton.cdiv(rows * N, BLOCK))](
            ws, view, view.stride(0), view.stride(1), view.stride(2), slot_of,
            route.offsets, route.single, route.T, route.E, N, rows, n_slots,
            ROUTE=route.mode, PER_EXPERT=per_expert, CHUNK=tile.chunk, BLOCK=BLOCK, G_PAD=route.g_pad,
        )
        return out

    def _train_index(self, train: list, E: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Cached device tensors: int32 [E] index of each expert among the trainable ones
        (-1 = frozen), and int64 [len(train)] the trainable experts."""
        key = (tuple(train), E, device)
        hit = self._train_idx.get(key)
        if hit is None:
            slot_of = torch.full((max(E, 1),), -1, dtype=torch.int32)
            slot_of[train] = torch.arange(len(train), dtype=torch.int32)
            hit = (slot_of.to(device), torch.tensor(train, dtype=torch.int64).to(device))
            with self._lock:
                self._train_idx[key] = hit
        return hit
