"""The ``cuda`` backend: cuBLAS for the two big GEMMs, the ``moecl_kernels._C`` kernels for the rest.

Forward (docs/spec.md §1, semantics in ``base.py``):

1. ``y = F.linear(x, W, b)`` (cuBLAS).
2. ``shrink``: one read of each x tile gives ``h_s = x~ A_s^T``, ``h_t = x~ A_{t_i}^T`` (the
   routed expert of each token, via the routing's sorted order or its single task) and the
   gate logits ``x W_g^T``; the dropout mask is regenerated in-kernel from the seed. fp32
   accumulation; split over d_in when there are few tokens (decode).
3. ``shrink_forward_finalize``: sums the splits in a fixed order, softmax -> ``coef``.
4. ``expand``: ``y += s coef_s h_s B_s^T + s coef_t h_t B_t^T`` in place (tensor cores).

Backward: ``dx = grad_y W`` (cuBLAS); ``shrink`` of grad_y with B_s / B_t and its finalize
give ``dh = s coef (grad_y B)`` and the gate's logit gradient; ``expand`` adds
``dropout(dh A) + dlogits W_g`` into dx; ``wgrad`` computes dB_s, dA_s, dB, dA (trainable
experts only; frozen ones get zeros at no compute) and dW_g. Every reduction is a fixed-order
sum without atomics, so results are bitwise reproducible and ``deterministic=True`` costs nothing.
The per-expert weight gradients split each expert's tokens over enough blocks to fill the GPU,
counting only the trainable experts that have tokens (known on the host when the task ids were).

Token matrices (x, grad_y) need a unit feature stride: one that has another layout is copied
once per forward / backward call (weights are read through their strides, no copy). The dropout
seed is passed as a device pointer (``launch.kernel_seed``), and launches run under
``torch.cuda.device(x.device)`` (``launch.device_guard``).

The extension is torch-free (raw pointers, sizes, strides and the stream handle as ints),
so it has no ABI coupling to the installed torch; it is imported on first use. fp64 is not
supported (the eager backend handles it).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._version import __version__
from ..contract.dropout import threshold24
from . import launch
from ..contract import SINGLE_MIXED, SINGLE_NONE, BwdArgs, FwdArgs

NOT_BUILT = (
    "the CUDA extension moecl_kernels._C is not built (reinstall with a CUDA torch and nvcc: "
    "pip install --no-build-isolation . ; MOECL_FORCE_CUDA_BUILD=1 to make failures loud)"
)

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_NO_DROPOUT = (False, 0, 0, 1.0)

_extension_state: Optional[tuple[Optional[ModuleType], Optional[str]]] = None


def load_extension() -> tuple[Optional[ModuleType], Optional[str]]:
    """(module, None) if ``moecl_kernels._C`` loads and matches this package, else (None, reason)."""
    global _extension_state
    if _extension_state is None:
        try:
            from .. import _C
        except ImportError as e:
            missing = importlib.util.find_spec("moecl_kernels._C") is None
            _extension_state = (None, NOT_BUILT if missing else f"{NOT_BUILT}; loading it failed: {e}")
        else:
            built = getattr(_C, "__version__", "unknown")
            if built != __version__:
                _extension_state = (None, (
                    f"the CUDA extension moecl_kernels._C was built for moecl-kernels {built} but the package is "
                    f"{__version__}; rebuild it: pip install --no-build-isolation ."
                ))
            else:
                _extension_state = (_C, None)
    return _extension_state


def arch_supported(archs: list[str], capability: tuple[int, int]) -> bool:
    """Whether code built for ``archs`` (build_info names: sm_80, sm_90a, compute_80) runs on ``capability``.

    SASS (sm_XY) runs on the same major with minor >= Y; arch-specific SASS (sm_XYa) only on
    exactly X.Y; PTX (compute_XY) JIT-compiles for any X.Y or newer (compute_XYa: exactly X.Y).
    """
    for name in archs:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)(a?)", name)
        if m is None:
            continue
        kind, major, minor, specific = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4) == "a"
        if specific:
            ok = (major, minor) == capability
        elif kind == "sm":
            ok = major == capability[0] and minor <= capability[1]
        else:
            ok = (major, minor) <= capability
        if ok:
            return True
    return False


@functools.cache
def _device_info(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


@functools.cache
def _build_info() -> dict:
    """The loaded extension's build_info(): archs and kernel geometry (tile sizes, limits)."""
    ext, _ = load_extension()
    return dict(ext.build_info())


def _splits(blocks: int, length: int, min_len: int, sms: int) -> int:
    """Split factor giving about two waves of blocks on ``sms`` SMs, each split >= ``min_len`` long."""
    want = -(-2 * sms // max(1, blocks))
    return max(1, min(want, length // min_len, _build_info()["max_splits"]))


def _ld(t: Tensor) -> tuple[Tensor, int]:
    """(t or a copy with unit feature stride, its row stride) for a 2-D token matrix: what the
    kernels take. Called once per token matrix and call, so a strided x is copied once."""
    if t.stride(1) != 1 or (t.shape[0] > 1 and t.stride(0) < t.shape[1]):
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else t.shape[1])


def _matrix(t: Tensor, n_dim: int, k_dim: int, e_dim: Optional[int] = None) -> tuple[int, int, int, int]:
    """A weight view W(e, n, k) as (pointer, stride_n, stride_k, stride_e), in elements."""
    return (t.data_ptr(), t.stride(n_dim), t.stride(k_dim), t.stride(e_dim) if e_dim is not None else 0)


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def _dropout(a: FwdArgs) -> tuple[bool, int, int, float]:
    """The launchers' dropout tuple: (enabled, device pointer of the int64 seed, threshold, 1/(1-p))."""
    seed = launch.kernel_seed(a)
    if seed is None:
        return _NO_DROPOUT
    return (True, seed.data_ptr(), threshold24(a.dropout_p), 1.0 / (1.0 - a.dropout_p))


def _expert_tokens(a: FwdArgs, T: int, E: int) -> Optional[list[int]]:
    """Tokens of each expert when known on the host (host offsets or a single-task hint), else None."""
    if a.single_task >= 0:
        return [T if e == a.single_task else 0 for e in range(E)]
    if a.single_task == SINGLE_NONE:
        return [0] * E
    if a.offsets_cpu is None:
        return None
    off = [int(v) for v in a.offsets_cpu.tolist()]
    return [off[e + 1] - off[e] for e in range(E)]


def wgrad_jobs(expert_tokens: Optional[list[int]], trainable: Optional[int], T: int) -> tuple[int, int]:
    """(jobs that have work, tokens of the longest) for sizing a wgrad's splits.

    ``trainable`` None: one job over all T tokens (shared expert, gate). Else the trainable
    experts (a bit mask) with tokens: counted exactly when the token counts are known on the
    host; otherwise (task ids on the device) every trainable expert is assumed to hold an
    equal share. Sizing from every trainable expert instead would, for a one-task batch,
    leave E-1 blocks of every column tile idle and the one expert's blocks walking all T
    tokens unsplit."""
    if trainable is None:
        return 1, T
    if expert_tokens is None:
        jobs = trainable.bit_count()
        return jobs, -(-T // max(jobs, 1))
    active = [n for e, n in enumerate(expert_tokens) if (trainable >> e) & 1 and n > 0]
    return len(active), max(active, default=0)


class _Call:
    """Per-call launch context: extension, stream, routing, dtype, SM count."""

    def __init__(self, ext: ModuleType, a: FwdArgs):
        x = a.x
        self.ext = ext
        self.T, self.E, self.r = x.shape[0], a.task_A.shape[0], a.shared_A.shape[0]
        self.dtype = _DTYPE_CODES[x.dtype]
        self.stream = torch.cuda.current_stream(x.device).cuda_stream
        _, self.sms = _device_info(x.device.index if x.device.index is not None else torch.cuda.current_device())
        self.token_task = a.token_task.to(torch.int32).contiguous()
        self.expert_tokens = _expert_tokens(a, self.T, self.E)
        if a.single_task == SINGLE_MIXED:
            self._sorted = a.sorted_idx.to(torch.int32).contiguous()
            self._offsets = a.expert_offsets.to(torch.int32).contiguous()
            self.route = (self._sorted.data_ptr(), self._offsets.data_ptr(), -1, self.T, self.E)
        else:
            self.route = (0, 0, a.single_task, self.T, self.E)
        info = _build_info()
        self.tile, self.rank_chunk = info["tile"], info["rank_chunk"]
        self.tiles = self._tile_count(a)

    def _tile_count(self, a: FwdArgs) -> int:
        """Token tiles of the shrink/expand grids: exact when the offsets are on the host, else a bound."""
        T, E = self.T, self.E
        if a.single_task != SINGLE_MIXED:
            return math.ceil(T / self.tile)
        if self.expert_tokens is None:
            return math.ceil(T / self.tile) + E + 1
        sizes = [*self.expert_tokens, T - sum(self.expert_tokens)]  # + the tokens without a task
        return sum(math.ceil(n / self.tile) for n in sizes)

    def shrink(self, rows: tuple[Tensor, int], shared: tuple, task: tuple, gate: Optional[Tensor],
               dropout: tuple) -> tuple[Tensor, int]:
        """Per-split partials [splits, T, 2r + 2] of the rank-r projections (and gate logits) of
        the token matrix ``rows`` = (tensor, row stride) from ``_ld``."""
        inp, ld = rows
        K = inp.shape[1]
        blocks = self.tiles * math.ceil(self.r / self.rank_chunk)
        splits = _splits(blocks, K, 256, self.sms)
        partial = torch.empty((splits, self.T, 2 * self.r + 2), dtype=torch.float32, device=inp.device)
        self.ext.shrink(
            dtype=self.dtype, input=inp.data_ptr(), ld_input=ld, K=K, shared=shared, task=task, r=self.r,
            gate=_ptr(gate), route=self.route, dropout=dropout, partial=partial.data_ptr(),
            partial_elems=partial.numel(), splits=splits, stream=self.stream,
        )
        return partial, splits

    def expand(self, out: Tensor, h_s: Tensor, h_t: Tensor, coef: Optional[Tensor], scale: float, shared: tuple,
               task: tuple, dropout: tuple, dlogits: Optional[Tensor], gate: Optional[Tensor]) -> None:
        ld = out.stride(0) if out.shape[0] > 1 else out.shape[1]  # out: a fresh row-major GEMM result
        self.ext.expand(
            dtype=self.dtype, out=out.data_ptr(), ld_out=ld, N=out.shape[1], h_shared=h_s.data_ptr(),
            h_task=h_t.data_ptr(), r=self.r, coef=_ptr(coef), scale=scale, shared=shared, task=task,
            route=self.route, dropout=dropout, dlogits=_ptr(dlogits), gate=_ptr(gate), stream=self.stream,
        )

    def wgrad(self, out: Tensor, out_strides: tuple[int, int, int], p: Optional[Tensor], rows: int,
              coef: Optional[Tensor], coef_col: int, scale: float, q_rows: tuple[Tensor, int], dropout: tuple,
              trainable: Optional[int] = None) -> None:
        """out_e[m, c] = sum over the group's tokens of scale coef p[t, m] dropout(q)[t, c].

        ``q_rows`` = (q, row stride) from ``_ld``. ``trainable`` None: one output over all
        tokens; else a bit mask over the E experts.
        """
        if trainable == 0:  # every expert frozen: zero gradients, nothing to compute
            out.zero_()
            return
        q, ldq = q_rows
        C = q.shape[1]
        jobs, length = wgrad_jobs(self.expert_tokens, trainable, self.T)
        blocks = math.ceil(C / self.tile) * math.ceil(rows / self.tile) * max(jobs, 1)
        splits = _splits(blocks, length, 256, self.sms) if jobs > 0 else 1
        workspace = None
        if splits > 1:  # sized for every trainable expert (the launcher's slot layout)
            slots = 1 if trainable is None else trainable.bit_count()
            workspace = torch.empty((slots * splits * rows * C,), dtype=torch.float32, device=q.device)
        self.ext.wgrad(
            dtype=self.dtype, p=_ptr(p), ld_p=rows, rows=rows, coef=_ptr(coef), coef_col=coef_col, scale=scale,
            q=q.data_ptr(), ld_q=ldq, C=C, dropout=dropout, route=self.route, per_expert=trainable is not None,
            trainable=trainable or 0, out=out.data_ptr(), out_stride_m=out_strides[0], out_stride_c=out_strides[1],
            out_stride_e=out_strides[2], workspace=_ptr(workspace),
            workspace_elems=0 if workspace is None else workspace.numel(), splits=splits, stream=self.stream,
        )


class CudaBackend:
    name = "cuda"
    priority = 30

    def unavailable_reason(self, x: Tensor) -> Optional[str]:
        if x.device.type != "cuda":
            return f"x is on {x.device.type}; the cuda backend needs CUDA tensors"
        if x.dtype not in _DTYPE_CODES:
            return f"x has dtype {x.dtype}; the cuda backend supports fp32, fp16 and bf16 (the eager backend runs fp64)"
        ext, why = load_extension()
        if ext is None:
            return why
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        capability, _ = _device_info(index)
        archs = list(_build_info()["archs"])
        if not arch_supported(archs, capability):
            return (
                f"moecl_kernels._C was built for {archs}, which cannot run on this GPU (compute capability "
                f"{capability[0]}.{capability[1]}); rebuild with TORCH_CUDA_ARCH_LIST="
                f"\"{capability[0]}.{capability[1]}\" pip install --no-build-isolation ."
            )
        return None

    def shape_unsupported_reason(self, rank: int, num_experts: int) -> Optional[str]:
        """The kernels' limits (from the built extension): the op falls back beyond them."""
        info = _build_info()
        if rank > info["max_rank"]:
            return f"r={rank} is above the cuda kernels' limit of {info['max_rank']}"
        if num_experts > info["max_experts"]:
            return f"num_tasks={num_experts} is above the cuda kernels' limit of {info['max_experts']}"
        return None

    def forward(self, a: FwdArgs):
        ext, why = load_extension()
        if ext is None:
            raise RuntimeError(why)
        x = a.x
        T, r, dev = x.shape[0], a.shared_A.shape[0], x.device
        with launch.device_guard(dev):
            y = F.linear(x, a.weight, a.bias)
            h_s = torch.empty((T, r), dtype=torch.float32, device=dev)
            h_t = torch.empty((T, r), dtype=torch.float32, device=dev)
            coef = torch.empty((T, 2), dtype=torch.float32, device=dev)
            if T == 0:
                return y, h_s, h_t, coef
            c = _Call(ext, a)
            gate = a.gate_weight.contiguous() if a.gate_weight is not None else None
            partial, splits = c.shrink(_ld(x), _matrix(a.shared_A, 0, 1), _matrix(a.task_A, 1, 2, 0), gate,
                                       _dropout(a))
            ext.shrink_forward_finalize(
                partial=partial.data_ptr(), splits=splits, num_tokens=T, r=r, token_task=c.token_task.data_ptr(),
                gate=gate is not None, h_shared=h_s.data_ptr(), h_task=h_t.data_ptr(), coef=coef.data_ptr(),
                stream=c.stream,
            )
            c.expand(y, h_s, h_t, coef, float(a.scale), _matrix(a.shared_B, 0, 1), _matrix(a.task_B, 1, 2, 0),
                     _NO_DROPOUT, None, None)
        return y, h_s, h_t, coef

    def backward(self, a: BwdArgs):
        ext, why = load_extension()
        if ext is None:
            raise RuntimeError(why)
        x, gy, s = a.x, a.grad_y, float(a.scale)
        T, r, E, dt, dev = x.shape[0], a.shared_A.shape[0], a.task_A.shape[0], x.dtype, x.device
        gate = a.gate_weight.contiguous() if a.gate_weight is not None else None
        need_dgate = a.needs_gate and gate is not None
        trainable = sum(1 << e for e in range(E) if a.trainable(e)) if a.needs_task else 0
        # The gate's logit gradient feeds dW_g and, whenever the gate is on, dx.
        need_dlogits = gate is not None and (need_dgate or a.needs_dx)
        need_dh = a.needs_dx or a.needs_shared or trainable != 0 or need_dgate
        dropout = _dropout(a)
        with launch.device_guard(dev):
            c = _Call(ext, a)
            x_rows, gy_rows = _ld(x), _ld(gy)  # each token matrix copied at most once
            h_s, h_t, coef = _f32(a.h_s), _f32(a.h_t), _f32(a.coef)
            dx = torch.mm(gy, a.weight) if a.needs_dx else None  # base dgrad: grad_y @ W
            dh_s = dh_t = dlogits = None
            if need_dh and T > 0:
                partial, splits = c.shrink(gy_rows, _matrix(a.shared_B, 1, 0), _matrix(a.task_B, 2, 1, 0), None,
                                           _NO_DROPOUT)
                dh_s = torch.empty((T, r), dtype=torch.float32, device=dev)
                dh_t = torch.empty((T, r), dtype=torch.float32, device=dev)
                dlogits = torch.empty((T, 2), dtype=torch.float32, device=dev) if need_dlogits else None
                ext.shrink_backward_finalize(
                    partial=partial.data_ptr(), splits=splits, num_tokens=T, r=r, token_task=c.token_task.data_ptr(),
                    h_shared=h_s.data_ptr(), h_task=h_t.data_ptr(), coef=coef.data_ptr(), scale=s,
                    dh_shared=dh_s.data_ptr(), dh_task=dh_t.data_ptr(), dlogits=_ptr(dlogits), stream=c.stream,
                )
            if a.needs_dx and T > 0:
                c.expand(dx, dh_s, dh_t, None, 1.0, _matrix(a.shared_A, 1, 0), _matrix(a.task_A, 2, 1, 0), dropout,
                         dlogits, gate)
            dA_s = dB_s = dA = dB = dgate = None
            if a.needs_shared:
                dB_s = torch.empty(tuple(a.shared_B.shape), dtype=dt, device=dev)  # [d_out, r] = out(m=rank, c=d_out)^T
                c.wgrad(dB_s, (dB_s.stride(1), dB_s.stride(0), 0), h_s, r, coef, 0, s, gy_rows, _NO_DROPOUT)
                dA_s = torch.empty(tuple(a.shared_A.shape), dtype=dt, device=dev)  # [r, d_in]
                c.wgrad(dA_s, (dA_s.stride(0), dA_s.stride(1), 0), dh_s, r, None, 0, 1.0, x_rows, dropout)
            if a.needs_task:
                dB = torch.empty(tuple(a.task_B.shape), dtype=dt, device=dev)  # [E, d_out, r]
                c.wgrad(dB, (dB.stride(2), dB.stride(1), dB.stride(0)), h_t, r, coef, 1, s, gy_rows, _NO_DROPOUT,
                        trainable)
                dA = torch.empty(tuple(a.task_A.shape), dtype=dt, device=dev)  # [E, r, d_in]
                c.wgrad(dA, (dA.stride(1), dA.stride(2), dA.stride(0)), dh_t, r, None, 0, 1.0, x_rows, dropout,
                        trainable)
            if need_dgate:
                dgate = torch.empty((2, x.shape[1]), dtype=dt, device=dev)
                c.wgrad(dgate, (dgate.stride(0), dgate.stride(1), 0), dlogits, 2, None, 0, 1.0, x_rows, _NO_DROPOUT)
        return dx, dA_s, dB_s, dA, dB, dgate
