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
Backward (7 launches; +1 with split-K):
    shrink(gy) -> dh_s, dh_t, dlogits    gy read once for both experts
    expand     -> dx = keep*(dh_s A_s + dh_t A_t)/(1-p) + dlog W_g, then dx.addmm_(gy, W)
                  (or fused, as in the forward)
    wgrad(x)   -> dA_s, dA_t (trainable experts only), dW_g       x read once
    wgrad(gy)  -> dB_s, dB_t (trainable experts only)             gy read once
    each wgrad + one reduce launch that writes all its gradients in their final dtype
    (zeros for frozen experts and experts without tokens): no zero-fill or cast launches.
The reductions are always in a fixed order (no atomics), so ``deterministic=True`` costs
nothing here and results are bitwise reproducible.

``expand``: ``addmm`` (default) or ``fused``, by ``MOECL_TRITON_EXPAND`` or
``TritonBackend(expand=...)``; which wins is for the GPU benchmark to decide (both are
providers of ``benchmarks/bench_op.py``; design notes and predictions in
``benchmarks/NOTES.md``).

Inputs may have any strides (x, grad_y and the weights are read through their strides,
with int64 addressing: no copy); outputs are fresh contiguous tensors.

No host syncs: routing runs on the device (``kernels._block_of``), the grids are sized
from host-side shapes only, ``single_task`` is a host hint and the dropout seed is read by
the kernels from device memory. Every launch runs under ``torch.cuda.device(x.device)``
(``launch.device_guard``). Everything is CUDA-graph capturable once warmed up: kernels
compiled (and, if enabled, autotuned) and the device copy of each ``expert_trainable``
pattern cached (its first use copies it to the device).
"""

from __future__ import annotations

import os
import threading
from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from ...contract.dropout import threshold24
from .. import launch
from ...contract import SINGLE_MIXED, BwdArgs, FwdArgs, acc_dtype
from . import configs
from . import kernels
from .configs import Tile, TileTable

EXPAND_ENV = "MOECL_TRITON_EXPAND"
EXPAND_MODES = ("addmm", "fused")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Triton picks the interpreter when a kernel is *defined*; record how ours were built.
INTERPRETED = isinstance(kernels._shrink_kernel, InterpretedFunction)

_REDUCE_BLOCK = 1024  # elements per program of the wgrad reduction
ROUTE_SINGLE, ROUTE_GROUPED = kernels.ROUTE_SINGLE.value, kernels.ROUTE_GROUPED.value
MODE_FWD, MODE_BWD = kernels.MODE_FWD.value, kernels.MODE_BWD.value


def _pow2(n: int, lo: int) -> int:
    """max(lo, next power of two >= n) (plain Python: ``triton.next_power_of_2`` costs
    microseconds per host call)."""
    return max(lo, 1 << (n - 1).bit_length()) if n > 1 else lo


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Route(NamedTuple):
    """Host-side description of the routing: which kernel path and the grid sizes."""

    mode: int  # ROUTE_SINGLE or ROUTE_GROUPED
    single: int  # ROUTE_SINGLE: the expert of every token, or -1 (no token has a task)
    task: bool  # some token may have a task expert
    token_task: Tensor
    sorted_idx: Tensor
    offsets: Tensor
    T: int
    E: int

    @classmethod
    def of(cls, a: FwdArgs) -> "_Route":
        T, E, st = a.x.shape[0], a.task_A.shape[0], a.single_task
        if not SINGLE_MIXED <= st < E:  # an expert index the kernels would read weights at
            raise ValueError(f"single_task={st} is outside [-2, {E - 1}] (num_tasks={E}; -1 = no task, -2 = mixed)")
        if st == SINGLE_MIXED:
            return cls(ROUTE_GROUPED, -1, True, a.token_task, a.sorted_idx, a.expert_offsets, T, E)
        return cls(ROUTE_SINGLE, st, st >= 0, a.token_task, a.sorted_idx, a.expert_offsets, T, E)

    def blocks(self, block: int) -> int:
        """Programs along the token axis: exact for one expert, the worst case when grouped."""
        n = _cdiv(self.T, block)
        return n if self.mode == ROUTE_SINGLE else n + self.E + 1

    @property
    def g_pad(self) -> int:
        return _pow2(self.E + 1, 2)

    def args(self) -> tuple:
        return self.sorted_idx, self.offsets, self.single, self.T, self.E


class _Dropout(NamedTuple):
    """The kernels' dropout arguments: the seed tensor (read on the device), the keep
    threshold and 1 / (1 - p). Disabled: any pointer stands in for the seed (never read)."""

    enabled: bool
    seed: Optional[Tensor]
    thr: int
    inv_keep: float

    @classmethod
    def of(cls, a: FwdArgs) -> "_Dropout":
        seed = launch.kernel_seed(a)
        if seed is None:
            return _NO_DROPOUT
        return cls(True, seed, threshold24(a.dropout_p), 1.0 / (1.0 - a.dropout_p))

    def args(self, placeholder: Tensor) -> tuple:
        return (self.seed if self.enabled else placeholder), self.thr, self.inv_keep


_NO_DROPOUT = _Dropout(False, None, 0, 1.0)


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (TF32 would miss the 1e-5 accuracy contract).
    return "ieee" if dtype == torch.float32 else "tf32"


def _split_k(tile: Tile, n_blocks: int, K_: int, device: torch.device) -> int:
    """split_k == 0: split the reduction until about one program per SM (decode / small T),
    keeping at least two K tiles per split; rounded down to a power of two."""
    if tile.split_k > 0:
        return max(1, min(tile.split_k, _cdiv(K_, tile.block_k)))
    if device.type != "cuda":
        return 1
    s = max(1, min(configs.sm_count(device) // max(n_blocks, 1), K_ // (2 * tile.block_k)))
    return 1 << (s.bit_length() - 1)


def _k_by_r(w: Tensor, transposed: bool) -> tuple:
    """A shrink operand as a [K, r] matrix: (w, stride along K, stride along r). ``w`` is
    [r, K] (an A matrix: ``transposed``) or [K, r] (a B matrix)."""
    s = w.stride()
    return (w, s[1], s[0]) if transposed else (w, s[0], s[1])


def _stack_k_by_r(w: Tensor, transposed: bool) -> tuple:
    """The same for the stacked task experts [E, ...]: (w, expert stride, K stride, r stride)."""
    s = w.stride()
    return (w, s[0], s[2], s[1]) if transposed else (w, s[0], s[1], s[2])


class _ShrinkPlan(NamedTuple):
    grid: tuple
    split: int
    k_per_split: int
    R_PAD: int
    meta: dict
    finalize_grid: tuple
    finalize_meta: dict


class _ExpandPlan(NamedTuple):
    grid: tuple
    grid_t: int
    meta: dict


_MAX_PLANS = 4096  # cached launch plans per backend (one per stage and shape); cleared when full


def _rank_view(t: Tensor, transposed: bool) -> Tensor:
    """The [..., r, N] view of a LoRA gradient: dA ([..., r, d_in]) as is, dB ([..., d_out, r]) transposed."""
    return t.transpose(-1, -2) if transposed else t


class TritonBackend:
    """Triton implementation of the fused MoE-LoRA op (``backend="triton"``).

    ``expand``: ``"addmm"`` or ``"fused"`` (default: ``$MOECL_TRITON_EXPAND`` or addmm).
    ``tiles``: per-kernel Tile overrides (see ``configs``), for experiments and tests."""

    name = "triton"
    priority = 20

    def __init__(self, expand: Optional[str] = None, tiles: Optional[dict[str, Tile]] = None):
        mode = (expand or os.environ.get(EXPAND_ENV, "") or "addmm").strip().lower()
        if mode not in EXPAND_MODES:
            raise ValueError(f"expand={mode!r} (or ${EXPAND_ENV}) must be one of {EXPAND_MODES}")
        self.expand = mode
        self.tiles = TileTable(tiles)
        self._train_idx: dict = {}
        self._plans: dict = {}  # launch geometry and constexprs per (stage, device, shape, flags)
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
        x = a.x
        T, r, d_out = x.shape[0], a.shared_A.shape[0], a.weight.shape[0]
        dev, acc = x.device, acc_dtype(x.dtype)
        route, drop = _Route.of(a), _Dropout.of(a)
        with launch.device_guard(dev):
            h_s, h_t = torch.empty((T, r), dtype=acc, device=dev), torch.empty((T, r), dtype=acc, device=dev)
            coef = torch.empty((T, 2), dtype=acc, device=dev)
            gate_w = a.gate_weight
            self._shrink(
                MODE_FWD, route, drop, x, _k_by_r(a.shared_A, True), _stack_k_by_r(a.task_A, True),
                (gate_w, *gate_w.stride()) if gate_w is not None else None,
                (h_s, h_t, coef, h_s, h_t, coef), r, a.scale, gate=gate_w is not None,
            )
            y = torch.empty((T, d_out), dtype=x.dtype, device=dev)
            W = a.weight
            fused = self._fuse_base(route)
            self._expand(
                y, route, _NO_DROPOUT, (h_s, h_t), coef, _k_by_r(a.shared_B, True), _stack_k_by_r(a.task_B, True),
                bias=a.bias, gate_term=None, base=(x, W, W.stride(1), W.stride(0)) if fused else None, scale=a.scale,
            )
            if not fused:
                y.addmm_(x, W.t())
        return y, h_s, h_t, coef

    def backward(self, a: BwdArgs):
        x, gy, W = a.x, a.grad_y, a.weight
        T, r, E = x.shape[0], a.shared_A.shape[0], a.task_A.shape[0]
        acc = dict(device=x.device, dtype=acc_dtype(x.dtype))
        route, drop = _Route.of(a), _Dropout.of(a)
        gate = a.gate_weight is not None
        train = [e for e in range(E) if a.trainable(e)] if route.task else []
        need_gate = gate and a.needs_gate
        # The logit gradients feed dx (the gate sees x) as well as dW_g.
        need_dlog = gate and (a.needs_gate or a.needs_dx)
        with launch.device_guard(x.device):
            h_s, h_t, coef = a.h_s.contiguous(), a.h_t.contiguous(), a.coef.contiguous()
            dh_s, dh_t = x.new_empty((T, r), **acc), x.new_empty((T, r), **acc)
            dlog = x.new_empty((T, 2), **acc) if need_dlog else None
            self._shrink(
                MODE_BWD, route, _NO_DROPOUT, gy, _k_by_r(a.shared_B, False), _stack_k_by_r(a.task_B, False),
                None, (h_s, h_t, coef, dh_s, dh_t, dlog if need_dlog else dh_s), r, a.scale, gate=need_dlog,
            )

            dx = None
            if a.needs_dx:
                dx = torch.empty_like(x, memory_format=torch.contiguous_format)
                fused = self._fuse_base(route)
                self._expand(
                    dx, route, drop, (dh_s, dh_t), None, _k_by_r(a.shared_A, False), _stack_k_by_r(a.task_A, False),
                    bias=None, gate_term=(dlog, a.gate_weight) if need_dlog else None,
                    base=(gy, W, W.stride(0), W.stride(1)) if fused else None, scale=1.0,
                )
                if not fused:
                    dx.addmm_(gy, W)

            dA_s = dB_s = dA = dB = dgate = None
            if a.needs_shared or a.needs_task or need_gate:
                dA_s, dA, dgate = self._wgrad(
                    route, drop, x, (dh_s, dh_t), None, dlog if need_gate else None, a.needs_shared, a.needs_task,
                    train, a.scale, shared_like=a.shared_A, task_like=a.task_A, gate_like=a.gate_weight,
                    transposed=False,
                )
            if a.needs_shared or a.needs_task:
                dB_s, dB, _ = self._wgrad(
                    route, _NO_DROPOUT, gy, (h_s, h_t), coef, None, a.needs_shared, a.needs_task, train, a.scale,
                    shared_like=a.shared_B, task_like=a.task_B, gate_like=None, transposed=True,
                )
        return dx, dA_s, dB_s, dA, dB, dgate

    # -----------------------------------------------------------------------------------------
    # stages

    def _fuse_base(self, route: _Route) -> bool:
        """Run the base GEMM inside the expand kernel? Only in ``fused`` mode, and never for
        grouped decode batches: their token blocks are per expert, so a fused base GEMM would
        stream W once per expert present where cuBLAS streams it once."""
        return self.expand == "fused" and (route.mode == ROUTE_SINGLE or route.T > configs.DECODE_T)

    def _plan(self, key: tuple, make):
        """The cached launch plan of ``key``, made by ``make()`` on first use."""
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = make()
        return plan

    def _shrink(self, mode: int, route: _Route, drop: _Dropout, X: Tensor, shared_w: tuple, task_w: tuple,
                gate_w: Optional[tuple], outputs: tuple, r: int, scale: float, *, gate: bool):
        """X [T, K] times ``shared_w`` and ``task_w[expert]`` ([K, r] views, ``_k_by_r``) and, in
        the forward with ``gate_w`` = (W_g, stride_j, stride_k), the gate weight; then the mode's
        epilogue into ``outputs`` = (H_S, H_T, COEF, DH_S, DH_T, DLOG) (+ finalize if split)."""
        T, Kd = X.shape
        if T == 0:
            return
        dev = X.device

        def plan_of(tile: Tile) -> _ShrinkPlan:
            R_PAD = _pow2(r, 16)
            n_blocks = route.blocks(tile.block_t)
            split = _split_k(tile, n_blocks, Kd, dev)
            meta = dict(MODE=mode, ROUTE=route.mode, TASK=route.task, GATE=gate, DROPOUT=drop.enabled,
                        PARTIAL=split > 1, BLOCK_T=tile.block_t, BLOCK_K=tile.block_k, R_PAD=R_PAD,
                        G_PAD=route.g_pad, PREC=_prec(X.dtype), num_warps=tile.num_warps, num_stages=tile.num_stages)
            return _ShrinkPlan((n_blocks, split), split, _cdiv(_cdiv(Kd, split), tile.block_k) * tile.block_k, R_PAD,
                               meta, (_cdiv(T, tile.block_t),),
                               dict(MODE=mode, GATE=gate, BLOCK_T=tile.block_t, R_PAD=R_PAD))

        def run(plan: _ShrinkPlan):
            ws = (torch.empty((plan.split, T, 2 * plan.R_PAD + 2), dtype=torch.float32, device=dev)
                  if plan.split > 1 else outputs[0])
            kernels._shrink_kernel[plan.grid](
                X, *X.stride(), *shared_w, *task_w, *(gate_w or (X, 0, 0)), *outputs, ws,
                *route.args(), Kd, r, plan.k_per_split, scale, *drop.args(X), **plan.meta,
            )
            if plan.split > 1:
                kernels._shrink_finalize_kernel[plan.finalize_grid](
                    ws, route.token_task, *outputs, T, r, scale, plan.split, **plan.finalize_meta)

        def make() -> _ShrinkPlan:
            key = (X.dtype, route.mode, _pow2(T, 1), Kd, _pow2(r, 16), mode, gate, drop.enabled)
            return plan_of(self.tiles.pick("shrink", dev, T, r, key, lambda tile: run(plan_of(tile))))

        run(self._plan(("shrink", dev, X.dtype, route.mode, route.task, route.E, T, Kd, r, mode, gate,
                        drop.enabled), make))

    def _expand(self, out: Tensor, route: _Route, drop: _Dropout, rank_in: tuple, coef: Optional[Tensor],
                shared_w: tuple, task_w: tuple, *, bias: Optional[Tensor], gate_term, base, scale: float):
        """out = keep?(P_s N_s + P_t N_t[expert]) (+ dlog W_g) (+ bias) (+ X WB, the base GEMM).

        ``rank_in`` = (P_s, P_t) [T, r] fp32; ``shared_w``/``task_w`` the [r, N] weight views
        (``_k_by_r`` layout, K = r). ``coef`` given: P rows are scaled by ``scale * coef``
        (forward). ``gate_term`` = (dlog, W_g); ``base`` = (X, WB, stride_k, stride_n) of the
        base GEMM to fuse, or None."""
        T, N = out.shape
        if T == 0:
            return
        p_s, p_t = rank_in
        r = p_s.shape[1]
        fused = base is not None
        X, WB, s_wk, s_wn = base if fused else (p_s, p_s, 0, 0)
        Kd = X.shape[1]
        dlog, gate_w = gate_term if gate_term is not None else (p_s, None)
        gate_args = (gate_w, *gate_w.stride()) if gate_w is not None else (p_s, 0, 0)
        kernel = "fused" if fused else "expand"
        flags = (coef is not None, drop.enabled, gate_term is not None, bias is not None)

        def plan_of(tile: Tile) -> _ExpandPlan:
            grid_t = route.blocks(tile.block_t)
            meta = dict(ROUTE=route.mode, TASK=route.task, ROW_SCALE=flags[0], DROPOUT=flags[1], GATE_TERM=flags[2],
                        HAS_BIAS=flags[3], FUSED_BASE=fused, BLOCK_T=tile.block_t, BLOCK_N=tile.block_n,
                        BLOCK_K=tile.block_k, GROUP=tile.group, R_PAD=_pow2(r, 16), G_PAD=route.g_pad,
                        PREC=_prec(out.dtype), num_warps=tile.num_warps, num_stages=tile.num_stages)
            return _ExpandPlan((grid_t * _cdiv(N, tile.block_n),), grid_t, meta)

        def run(plan: _ExpandPlan):
            kernels._expand_kernel[plan.grid](
                out, *out.stride(), p_s, p_t, coef if coef is not None else p_s,
                *shared_w, *task_w, bias if bias is not None else out, dlog, *gate_args,
                X, *X.stride(), WB, s_wk, s_wn,
                *route.args(), N, Kd, r, plan.grid_t, scale, *drop.args(out), **plan.meta,
            )

        def make() -> _ExpandPlan:
            key = (out.dtype, route.mode, _pow2(T, 1), N, Kd if fused else 0, _pow2(r, 16), flags[2], flags[1])
            return plan_of(self.tiles.pick(kernel, out.device, T, r, key, lambda tile: run(plan_of(tile))))

        run(self._plan((kernel, out.device, out.dtype, route.mode, route.task, route.E, T, N, Kd, r, *flags), make))

    def _wgrad(self, route: _Route, drop: _Dropout, Z: Tensor, rank_in: tuple, coef: Optional[Tensor],
               dlog: Optional[Tensor], out_shared: bool, out_task: bool, train: list, scale: float, *,
               shared_like: Tensor, task_like: Tensor, gate_like: Optional[Tensor], transposed: bool):
        """(shared grad, stacked task grads, gate grad): per-expert reductions P^T Z~ over tokens.

        Gradients are shaped like ``shared_like`` / ``task_like`` / ``gate_like`` ([r, N] or,
        ``transposed``, [N, r]) in their dtype; each is None when not wanted (``out_shared``,
        ``out_task``, ``dlog``). ``train`` lists the trainable experts with possible tokens:
        only those are computed; the other experts' gradients are written as zeros."""
        T, N = Z.shape
        p_s, p_t = rank_in
        r = p_s.shape[1]
        R_PAD = _pow2(r, 16)
        dev = Z.device
        do_task, do_gate = bool(train) and out_task, dlog is not None
        slot_of = self._train_index(train if do_task else [], route.E, dev)
        outs = [torch.empty(like.shape, dtype=like.dtype, device=dev) if on else None
                for on, like in ((out_shared, shared_like), (out_task, task_like), (do_gate, gate_like))]
        key = (Z.dtype, route.mode, _pow2(max(T, 1), 1), N, R_PAD, out_shared, do_task, do_gate, drop.enabled)

        def run(tile: Tile):
            n_slots = route.blocks(tile.chunk)
            # fp32 partials per chunk: rows [0, r) shared, [r, 2r) task, [2r, 2r + 2) gate
            row_t, row_g = r * out_shared, r * (out_shared + do_task)
            rows = row_g + 2 * do_gate
            ws = Z.new_empty((max(n_slots, 1), max(rows, 1), N), dtype=torch.float32)
            ws_s, ws_t, ws_g = ws, ws[:, row_t:], ws[:, row_g:]
            if T > 0 and (out_shared or do_task or do_gate):
                kernels._wgrad_kernel[(n_slots, _cdiv(N, tile.block_n))](
                    Z, Z.stride(0), Z.stride(1), p_s, p_t, coef if coef is not None else p_s,
                    dlog if do_gate else p_s, ws_s, ws_t, ws_g, ws.stride(0), slot_of,
                    *route.args(), N, r, scale, *drop.args(Z),
                    ROUTE=route.mode, DO_SHARED=out_shared, DO_TASK=do_task, DO_GATE=do_gate,
                    ROW_SCALE=coef is not None, DROPOUT=drop.enabled,
                    CHUNK=tile.chunk, BLOCK_T=tile.block_t, BLOCK_N=tile.block_n, R_PAD=R_PAD, G_PAD=route.g_pad,
                    PREC=_prec(Z.dtype), num_warps=tile.num_warps, num_stages=tile.num_stages,
                )
            self._reduce(ws_s, ws_t, ws_g, ws.stride(0), outs, transposed, route, tile, n_slots, slot_of, r, N)

        run(self.tiles.pick("wgrad", dev, T, r, key, run))
        return tuple(outs)

    @staticmethod
    def _reduce(ws_s: Tensor, ws_t: Tensor, ws_g: Tensor, stride_ws: int, outs: list, transposed: bool,
                route: _Route, tile: Tile, n_slots: int, slot_of: Tensor, r: int, N: int) -> None:
        """One launch: every wanted gradient of a wgrad from its fp32 slots, in its dtype."""
        shared, task, gate_ = outs
        out_s = _rank_view(shared, transposed) if shared is not None else ws_s  # (placeholders: never written)
        out_t = _rank_view(task, transposed) if task is not None else ws_t
        out_g = gate_ if gate_ is not None else ws_g
        n_out = (shared is not None) + route.E * (task is not None) + (gate_ is not None)
        rows = max(r if (shared is not None or task is not None) else 0, 2 if gate_ is not None else 0)
        kernels._wgrad_reduce_kernel[(n_out, _cdiv(rows * N, _REDUCE_BLOCK))](
            ws_s, ws_t, ws_g, stride_ws, out_s, out_s.stride(-2), out_s.stride(-1),
            out_t, out_t.stride(0), out_t.stride(1), out_t.stride(2), out_g, out_g.stride(-2), out_g.stride(-1),
            slot_of, route.offsets, route.single, route.T, route.E, N, r, n_slots, n_out - 1,
            ROUTE=route.mode, OUT_SHARED=shared is not None, OUT_TASK=task is not None, OUT_GATE=gate_ is not None,
            TASK_M0=int(shared is not None), CHUNK=tile.chunk, BLOCK=_REDUCE_BLOCK, G_PAD=route.g_pad,
        )

    def _train_index(self, train: list, E: int, device: torch.device) -> Tensor:
        """Cached device tensor: int32 [E], each expert's index among the trainable ones (-1 = frozen)."""
        key = (tuple(train), E, device)
        hit = self._train_idx.get(key)
        if hit is None:
            slot_of = torch.full((max(E, 1),), -1, dtype=torch.int32)
            slot_of[train] = torch.arange(len(train), dtype=torch.int32)
            hit = slot_of.to(device)
            with self._lock:
                self._train_idx[key] = hit
        return hit
