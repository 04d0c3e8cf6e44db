"""The FFN-level op on the ``triton`` backend (docs/spec.md §1.3): the launches, around the
kernels of ``ffn_kernels.py`` and the linear op's stages (``backend.py``).

Forward (T x d_ff passes: g, u written by cuBLAS; g, u read and h written by the fused pass):
    g, u = x W_gate^T + b, x W_up^T + b           two cuBLAS GEMMs, run once for both experts
    shrink(x)  -> a_s, a_t [T, 2r], coef          the linear shrink at rank 2r: x read once for the
                                                  gate and up LoRAs of both experts and the gate logits
    ffn_fwd    -> h, z_s, z_t                     the fused pass over g and u (``_ffn_fwd_kernel``)
    expand     -> y = b + s c z B_down^T, then y.addmm_(h, W_down^T)   ONE base down GEMM on the
                                                  mixed h (or fused into the expand: MOECL_TRITON_EXPAND)
Backward:
    dh = gy W_down                                cuBLAS
    shrink(gy) -> q_s, q_t (times s)              the linear shrink, gy read once for both experts
    ffn_bwd    -> dg, du, da_s, da_t, dlog        the mirror pass (h_e recomputed from g, u, a, B)
    expand     -> dx = keep (da A_cat) / (1 - p) + dlog W_g, then dx.addmm_(du, W_up), dx.addmm_(dg, W_gate)
    ffn_wgrad  -> dB_gate, dB_up, dA_down         per d_ff block and token chunk (g, u, dh re-read) into
                                                  fp32 slots, added in chunk order by one reduce launch
    wgrad(x)   -> dA_gate, dA_up, dW_g            the linear A-mode wgrad at rank 2r (x read once)
    wgrad(gy)  -> dB_down                         the linear B-mode wgrad

The linear stages are the ``TritonBackend`` methods ``_shrink``, ``_expand`` and ``_wgrad``; every
call to them is in :class:`_LinearStages` (one place to adapt when their signatures change).
Launches run under the tensors' device (``launch.device_guard``); the dropout seed stays a device
tensor the kernels read (``launch.kernel_seed``), as in the linear op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from ...contract import acc_dtype
from ...contract.dropout import threshold24
from ...contract.ffn_args import FFN_GRAD_INPUTS, FfnBwdArgs, FfnFwdArgs
from .. import launch
from . import configs
from . import ffn_kernels as FK
from . import kernels as K
from .backend import _NO_DROPOUT, _Dropout, _prec, _Route

SPLIT_ENV = "MOECL_TRITON_FFN_SPLIT"  # force the d_ff split of the fused passes (tests, experiments)


@dataclass(frozen=True)
class FfnTile:
    block_t: int
    block_f: int
    num_warps: int = 4
    num_stages: int = 2


def ffn_tile(device: torch.device, kernel: str, r_pad: int) -> FfnTile:
    """Tiles of the FFN kernels: small on the interpreter; on GPUs sized so that the ~15 live
    [block_t, block_f] fp32 tiles of the backward recomputation fit in registers (starting points,
    not measurements)."""
    if device.type != "cuda":
        return FfnTile(16, 16, 1, 1)
    if kernel == "wgrad":
        return FfnTile(32, 64 if r_pad <= 32 else 32, 8, 2)
    # the static report (compile_check, sm_80/sm_90, bf16) still shows spills at these tiles (fwd:
    # 255 registers + 8-300 B at 32 x 64, less than at 64 x 64; bwd / wgrad: local memory): a GPU
    # run must tune them (benchmarks/NOTES.md)
    return FfnTile(32, 64 if r_pad <= 32 else 32, 8 if kernel == "bwd" else 4, 2)


WGRAD_CHUNK_ENV = "MOECL_TRITON_FFN_WGRAD_CHUNK"  # force the wgrad's tokens per chunk (tests, experiments)


def wgrad_chunk(T: int, n_fblocks: int, block_t: int, device: torch.device) -> int:
    """Tokens per program of the FFN weight-gradient kernel (a multiple of ``block_t``): on a GPU, enough
    chunks that the d_ff blocks x chunks grid is about 4 programs per SM (the kernel holds one CTA per
    SM by registers; a token walk split over programs, not done serially by one); on the
    interpreter, two token blocks per chunk, so tests cross chunk and expert boundaries."""
    forced = int(os.environ.get(WGRAD_CHUNK_ENV, "0") or 0)
    if forced:
        return triton.cdiv(forced, block_t) * block_t
    if device.type != "cuda":
        return 2 * block_t
    n = max(1, min(triton.cdiv(4 * configs.sm_count(device), n_fblocks), triton.cdiv(T, block_t)))
    return triton.cdiv(triton.cdiv(T, n), block_t) * block_t


def _route(a: FfnFwdArgs) -> _Route:
    return _Route.of(SimpleNamespace(x=a.x, task_A=a.up_proj_task_A, token_task=a.token_task, sorted_idx=a.sorted_idx,
                                     expert_offsets=a.expert_offsets, single_task=a.single_task,
                                     dropout_p=a.dropout_p, seed=a.seed))


class _Ffn:
    """Per-call host state: shapes, flags, the cat-ed gate/up A matrices, the kernels' seed."""

    def __init__(self, a: FfnFwdArgs, split: Optional[int]) -> None:
        x = a.x
        self.a, self.T, self.r, self.E = a, x.shape[0], a.rank, a.num_experts
        self.F = a.up_proj_weight.shape[0]
        self.gated_mlp, self.moe_gate = a.gated_mlp, a.moe_gate is not None
        self.npre = 2 if self.gated_mlp else 1
        self.r_pad = max(16, triton.next_power_of_2(self.r))
        self.route = _route(a)
        self.dropout = a.dropout_p > 0.0
        self.thr = threshold24(a.dropout_p) if self.dropout else 0
        self.inv_keep = 1.0 / (1.0 - a.dropout_p)
        # the kernels read the seed from device memory (a 1-element int64 tensor on x's device)
        self.seed = launch.kernel_seed(a) if self.dropout else x
        self.split = split
        pre = ("gate_proj", "up_proj") if self.gated_mlp else ("up_proj",)
        # the gate and up LoRAs of an expert as one rank-(npre r) LoRA of x
        self.A_s = torch.cat([getattr(a, f"{p}_shared_A") for p in pre]) if self.gated_mlp else a.up_proj_shared_A
        self.A_t = torch.cat([getattr(a, f"{p}_task_A") for p in pre], 1) if self.gated_mlp else a.up_proj_task_A
        self.B_g = (a.gate_proj_shared_B if self.gated_mlp else a.up_proj_shared_B).contiguous()
        self.B_gt = (a.gate_proj_task_B if self.gated_mlp else a.up_proj_task_B).contiguous()
        self.B_u, self.B_ut = a.up_proj_shared_B.contiguous(), a.up_proj_task_B.contiguous()
        self.A_d, self.A_dt = a.down_proj_shared_A.contiguous(), a.down_proj_task_A.contiguous()

    def weights(self) -> tuple:
        """The gate/up B and down A arguments of the FFN kernels, with their strides."""
        bt, at = self.B_ut.stride(), self.A_dt.stride()
        return (self.B_g, self.B_gt, self.B_u, self.B_ut, bt[0], bt[1], bt[2],
                self.A_d, self.A_dt, at[0], at[1], at[2])

    def splits(self, tile: FfnTile, device: torch.device) -> tuple[int, int]:
        """(d_ff splits, d_ff columns per split) of a token-block pass: split d_ff when there are
        too few token blocks to fill the SMs (decode)."""
        s = self.split or int(os.environ.get(SPLIT_ENV, "0") or 0)
        if not s:
            s = 1
            if device.type == "cuda":
                sms = configs.sm_count(device)  # cached per device
                s = max(1, min(sms // max(self.route.blocks(tile.block_t), 1), triton.cdiv(self.F, 4 * tile.block_f)))
        per = triton.cdiv(triton.cdiv(self.F, s), tile.block_f) * tile.block_f
        return triton.cdiv(self.F, per), per

    def common(self, tile: FfnTile) -> dict:
        c = self
        return dict(ACT=FK.ACT_CODES[c.a.activation], ROUTE=c.route.mode, TASK=c.route.task, MOE_GATE=c.moe_gate,
                    GATED_MLP=c.gated_mlp, DROPOUT=c.dropout, BLOCK_T=tile.block_t, BLOCK_F=tile.block_f,
                    R_PAD=c.r_pad, PREC=_prec(c.a.x.dtype), num_warps=tile.num_warps, num_stages=tile.num_stages)


class _LinearStages:
    """The linear op's Triton stages the FFN op reuses (``TritonBackend._shrink/_expand/_wgrad``)."""

    def __init__(self, backend) -> None:
        self.b = backend

    def shrink_x(self, c: _Ffn, a_s: Tensor, a_t: Tensor, coef: Tensor) -> None:
        """a_s = x~ A_s^T, a_t = x~ A_t^T (rank npre r), coef from the gate logits."""
        a, drop = c.a, _Dropout.of(c.a)
        gw = a.moe_gate
        self.b._shrink(K.MODE_FWD.value, c.route, drop, a.x, (c.A_s, c.A_s.stride(1), c.A_s.stride(0)),
                       (c.A_t, c.A_t.stride(0), c.A_t.stride(2), c.A_t.stride(1)),
                       (gw, gw.stride(0), gw.stride(1)) if gw is not None else None,
                       (a_s, a_t, coef, a_s, a_t, coef), c.npre * c.r, a.scale, gate=gw is not None)

    def shrink_gy(self, c: _Ffn, gy: Tensor, qs_s: Tensor, qs_t: Tensor) -> None:
        """qs_e = s gy B_down,e (0 without a task): the bwd shrink with unit coefficients."""
        a = c.a
        ones = torch.ones(c.T, 2, dtype=qs_s.dtype, device=gy.device)
        B, Bt = a.down_proj_shared_B, a.down_proj_task_B
        self.b._shrink(K.MODE_BWD.value, c.route, _NO_DROPOUT, gy, (B, B.stride(0), B.stride(1)),
                       (Bt, Bt.stride(0), Bt.stride(1), Bt.stride(2)), None, (qs_s, qs_t, ones, qs_s, qs_t, qs_s),
                       c.r, a.scale, gate=False)

    def expand(self, out: Tensor, c: _Ffn, drop, rank_in: tuple, coef: Optional[Tensor], shared: tuple, task: tuple,
               bias: Optional[Tensor], gate_term, base: tuple, scale: float) -> None:
        """out = rank-r expansion (+ bias, gate term), plus the base GEMM ``base`` = (X, W, transposed)
        fused into the expand kernel or added by cuBLAS."""
        X, W, transposed = base
        fused = self.b._fuse_base(c.route)
        wk = (W, W.stride(1), W.stride(0)) if transposed else (W, W.stride(0), W.stride(1))
        self.b._expand(out, c.route, drop, rank_in, coef, shared, task, bias=bias, gate_term=gate_term,
                       base=(X, *wk) if fused else None, scale=scale)
        if not fused:
            out.addmm_(X, W.t() if transposed else W)

    def wgrad(self, c: _Ffn, drop, Z: Tensor, rank_in: tuple, coef, dlog, train: list, *,
              shared_like: Tensor, task_like: Tensor, gate_like, transposed: bool):
        """(shared, stacked task, gate) gradients; frozen experts and those without tokens get zeros
        (the linear reductions have a fixed order: deterministic always)."""
        a = c.a
        return self.b._wgrad(c.route, drop, Z, rank_in, coef, dlog, a.needs_shared, a.needs_task, train, a.scale,
                             shared_like=shared_like, task_like=task_like, gate_like=gate_like,
                             transposed=transposed)


class TritonFFN:
    """``ffn_forward`` / ``ffn_backward`` of the triton backend (mixed into ``TritonBackend``).
    ``ffn_split``: force the d_ff split of the fused passes (None: automatic)."""

    ffn_split: Optional[int] = None

    def ffn_forward(self, a: FfnFwdArgs):
        x = a.x
        c = _Ffn(a, self.ffn_split)
        T, r, F_ = c.T, c.r, c.F
        acc = dict(device=x.device, dtype=acc_dtype(x.dtype))
        stages = _LinearStages(self)
        with launch.device_guard(x.device):
            g = F.linear(x, a.gate_proj_weight, a.gate_proj_bias) if c.gated_mlp else x.new_empty((0,))
            u = F.linear(x, a.up_proj_weight, a.up_proj_bias)
            a_s, a_t = x.new_empty((T, c.npre * r), **acc), x.new_empty((T, c.npre * r), **acc)
            coef = x.new_empty((T, 2), **acc)
            z_s, z_t = x.new_empty((T, r), **acc), x.new_empty((T, r), **acc)
            h = x.new_empty((T, F_))
            pool = a.pool is not None
            hs = x.new_empty((T, F_), dtype=torch.float32) if pool else h
            if T > 0:
                stages.shrink_x(c, a_s, a_t, coef)
                tile = ffn_tile(x.device, "fwd", c.r_pad)
                split, per = c.splits(tile, x.device)
                ws = x.new_empty((split, T, 2 * c.r_pad), dtype=torch.float32) if split > 1 else z_s
                FK._ffn_fwd_kernel[(c.route.blocks(tile.block_t), split)](
                    g if c.gated_mlp else u, u, h, hs, a_s, a_t, coef, z_s, z_t, ws, *c.weights(),
                    c.seed, *c.route.args()[:2], c.route.single, T, c.E, F_, r, per, a.scale, c.thr, c.inv_keep,
                    POOL=pool, PARTIAL=split > 1, G_PAD=c.route.g_pad, **c.common(tile))
                if split > 1:
                    torch.sum(ws[:, :, :r], 0, out=z_s)
                    torch.sum(ws[:, :, c.r_pad:c.r_pad + r], 0, out=z_t)
            y = x.new_empty((T, a.down_proj_weight.shape[0]))
            Bd, Bdt = a.down_proj_shared_B, a.down_proj_task_B
            if T > 0:
                stages.expand(y, c, _NO_DROPOUT, (z_s, z_t), coef, (Bd, Bd.stride(1), Bd.stride(0)),
                              (Bdt, Bdt.stride(0), Bdt.stride(2), Bdt.stride(1)), a.down_proj_bias, None,
                              (h, a.down_proj_weight, True), a.scale)
            h_pool, z_pool = x.new_empty((0,), **acc), x.new_empty((0,), **acc)
            if pool:  # the shared expert's h and z pooled per sequence
                B, S = a.pool.shape
                w = a.pool.to(acc["dtype"]).unsqueeze(1)
                h_pool = torch.bmm(w, hs.view(B, S, F_).to(acc["dtype"])).squeeze(1)
                z_pool = torch.bmm(w, z_s.view(B, S, r)).squeeze(1)
        return y, g, u, a_s, a_t, z_s, z_t, coef, h_pool, z_pool

    def ffn_backward(self, a: FfnBwdArgs):
        x, gy = a.x, a.grad_y
        c = _Ffn(a, self.ffn_split)
        T, r, E, F_ = c.T, c.r, c.E, c.F
        acc = dict(device=x.device, dtype=acc_dtype(x.dtype))
        stages = _LinearStages(self)
        route, drop = c.route, _Dropout.of(a)
        need_dlog = c.moe_gate and (a.needs_gate or a.needs_dx)  # the logits feed dx too
        train = [e for e in range(E) if a.trainable(e)] if route.task else []
        grads = {n: None for n in FFN_GRAD_INPUTS}
        coef, a_s, a_t = a.coef.contiguous(), a.a_s.contiguous(), a.a_t.contiguous()
        z_s, z_t = a.z_s.contiguous(), a.z_t.contiguous()
        pool = a.pool is not None
        pool_h, pool_z = pool and a.grad_h_pool is not None, pool and a.grad_z_pool is not None
        S = a.pool.shape[1] if pool else 1
        poolw = a.pool.reshape(-1).contiguous() if pool else coef
        ghp = a.grad_h_pool.contiguous() if pool_h else coef
        gzp = a.grad_z_pool.contiguous() if pool_z else coef
        with launch.device_guard(x.device):
            dh = torch.mm(gy, a.down_proj_weight)  # the base dgrad of the down projection
            qs_s, qs_t = x.new_empty((T, r), **acc), x.new_empty((T, r), **acc)
            dg = x.new_empty((T, F_)) if c.gated_mlp else dh
            du = x.new_empty((T, F_))
            da_s, da_t = x.new_empty((T, c.npre * r), **acc), x.new_empty((T, c.npre * r), **acc)
            dlog = x.new_empty((T, 2), **acc) if need_dlog else coef
            g = a.g if c.gated_mlp else a.u
            if T > 0:
                stages.shrink_gy(c, gy, qs_s, qs_t)
                tile = ffn_tile(x.device, "bwd", c.r_pad)
                split, per = c.splits(tile, x.device)
                ws = x.new_empty((split, T, 4 * c.r_pad + 2), dtype=torch.float32) if split > 1 else da_s
                FK._ffn_bwd_kernel[(route.blocks(tile.block_t), split)](
                    g, a.u, dh, dg, du, a_s, a_t, coef, qs_s, qs_t, z_s, z_t, da_s, da_t, dlog, ws,
                    poolw, ghp, gzp, S, *c.weights(), c.seed, *route.args()[:2], route.single, T, E, F_, r, per,
                    a.scale, c.thr, c.inv_keep, POOL_H=pool_h, POOL_Z=pool_z, NEED_GATE=need_dlog,
                    PARTIAL=split > 1, G_PAD=route.g_pad, **c.common(tile))
                if split > 1:
                    FK._ffn_bwd_finalize_kernel[(triton.cdiv(T, tile.block_t),)](
                        ws, split, route.token_task, qs_s, qs_t, z_s, z_t, coef, da_s, da_t, dlog, T, r,
                        GATED_MLP=c.gated_mlp, NEED_GATE=need_dlog, BLOCK_T=tile.block_t, R_PAD=c.r_pad)
            if a.needs_dx:
                dx = torch.empty_like(x, memory_format=torch.contiguous_format)
                if T > 0:
                    stages.expand(dx, c, drop, (da_s, da_t), None, (c.A_s, c.A_s.stride(0), c.A_s.stride(1)),
                                  (c.A_t, c.A_t.stride(0), c.A_t.stride(1), c.A_t.stride(2)), None,
                                  (dlog, a.moe_gate) if need_dlog else None, (du, a.up_proj_weight, False), 1.0)
                    if c.gated_mlp:
                        dx.addmm_(dg, a.gate_proj_weight)
                grads["x"] = dx
            self._ffn_wgrads(c, grads, dh, qs_s, qs_t, poolw, ghp, gzp, S, pool_h, pool_z, train)
            need_gate = c.moe_gate and a.needs_gate
            if a.needs_shared or a.needs_task or need_gate:  # dA of the gate and up LoRAs (rank npre r), dW_g
                dA_s, dA_t, dgate = stages.wgrad(c, drop, x, (da_s, da_t), None, dlog if need_gate else None,
                                                 train, shared_like=c.A_s, task_like=c.A_t,
                                                 gate_like=a.moe_gate, transposed=False)
                grads["moe_gate"] = dgate
                for i, p in enumerate(("gate_proj", "up_proj") if c.gated_mlp else ("up_proj",)):
                    rows = slice(i * r, (i + 1) * r)
                    if dA_s is not None:
                        grads[f"{p}_shared_A"] = dA_s[rows].clone()
                    if dA_t is not None:
                        grads[f"{p}_task_A"] = dA_t[:, rows].clone()
            if a.needs_shared or a.needs_task:
                Bd, Bdt = a.down_proj_shared_B, a.down_proj_task_B
                grads["down_proj_shared_B"], grads["down_proj_task_B"], _ = stages.wgrad(
                    c, _NO_DROPOUT, gy, (z_s, z_t), coef, None, train, shared_like=Bd,
                    task_like=Bdt, gate_like=None, transposed=True)
            if a.needs_task:  # no trainable expert has tokens here: zero gradients
                for n in grads:
                    if "_task_" in n and grads[n] is None and getattr(a, n) is not None:
                        grads[n] = torch.zeros_like(getattr(a, n))
        return tuple(grads[n] for n in FFN_GRAD_INPUTS)

    def _ffn_wgrads(self, c: _Ffn, grads: dict, dh: Tensor, qs_s: Tensor, qs_t: Tensor, poolw, ghp, gzp, S: int,
                    pool_h: bool, pool_z: bool, train: list) -> None:
        """dB of the gate and up projections and dA of the down projection (``_ffn_wgrad_kernel``)."""
        a = c.a
        do_task = bool(train) and a.needs_task
        if not (a.needs_shared or do_task) or c.T == 0:
            return
        x = a.x
        outs = {}
        for n in ("gate_proj_shared_B", "up_proj_shared_B", "down_proj_shared_A", "gate_proj_task_B",
                  "up_proj_task_B", "down_proj_task_A"):
            like = getattr(a, n)
            on = like is not None and (a.needs_shared if "_shared_" in n else do_task)
            outs[n] = torch.empty_like(like, memory_format=torch.contiguous_format) if on else None
        ub, ut = outs["up_proj_shared_B"], outs["up_proj_task_B"]
        ds, dt_ = outs["down_proj_shared_A"], outs["down_proj_task_A"]
        o_bs = ub if ub is not None else c.B_u
        o_bt = ut if ut is not None else c.B_ut
        o_ad = ds if ds is not None else c.A_d
        o_at = dt_ if dt_ is not None else c.A_dt
        o_gs = outs["gate_proj_shared_B"] if outs["gate_proj_shared_B"] is not None else o_bs
        o_gt = outs["gate_proj_task_B"] if outs["gate_proj_task_B"] is not None else o_bt
        slot = self._train_index(train if do_task else [], c.E, x.device)  # cached on the device: -1 = frozen
        tile = ffn_tile(x.device, "wgrad", c.r_pad)
        n_fb = triton.cdiv(c.F, tile.block_f)
        chunk = wgrad_chunk(c.T, n_fb, tile.block_t, x.device)
        n_chunks = triton.cdiv(c.T, chunk)
        # fp32 partial sums, one slot per chunk (shared) and per (chunk, expert) pair a chunk can hold (task)
        part_s = x.new_empty((n_chunks if a.needs_shared else 1, 3, c.F, c.r_pad), dtype=torch.float32)
        part_t = x.new_empty((n_chunks + c.E if do_task else 1, 3, c.F, c.r_pad), dtype=torch.float32)
        assert (n_chunks + c.E) * 3 * c.F < 2**31, "FFN wgrad slots: the kernels index rows in int32"
        common = c.common(tile)
        FK._ffn_wgrad_kernel[(n_fb, n_chunks)](
            a.g if c.gated_mlp else a.u, a.u, dh, a.a_s.contiguous(), a.a_t.contiguous(), a.coef.contiguous(),
            qs_s, qs_t, poolw, ghp, gzp, S, *c.weights(), part_s, part_t, chunk, slot,
            c.seed, c.route.offsets, c.route.sorted_idx, c.route.single, c.T, c.E, c.F, c.r, a.scale, c.thr,
            c.inv_keep, POOL_H=pool_h, POOL_Z=pool_z, DO_SHARED=a.needs_shared, DO_TASK=do_task, **common)
        FK._ffn_wgrad_reduce_kernel[(n_fb, 1 + (c.E if do_task else 0))](
            part_s, part_t, o_gs, o_bs, o_ad, o_gt, o_bt, o_at, *o_bt.stride(), *o_at.stride(), slot,
            c.route.offsets, c.route.single, n_chunks, chunk, c.T, c.E, c.F, c.r, c.inv_keep,
            ROUTE=c.route.mode, GATED_MLP=c.gated_mlp, DROPOUT=c.dropout, DO_SHARED=a.needs_shared,
            DO_TASK=do_task, BLOCK_F=tile.block_f, R_PAD=c.r_pad, num_warps=4)
        for n, t in outs.items():
            if t is not None:
                grads[n] = t
