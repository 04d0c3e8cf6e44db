"""Compile every Triton kernel variant the backend launches for real GPUs -- no GPU needed.

    python -m moecl_kernels.backends.triton.compile_check [--arch 90 80]

The backend's forward and backward run on small CPU tensors with the kernels replaced
by recorders (nothing executes; the values are garbage and unused). Each distinct
launch -- kernel, argument types, ``constexpr`` values, warps, stages; the FFN-level op's
kernels (``ffn_kernels.py``) with the GPU tiles of ``ffn.ffn_tile`` included -- is then
compiled to a cubin with Triton's ahead-of-time compiler for each target architecture,
using the launch configurations of that architecture's tile table, and its shared
memory is checked against the architecture's limit. This catches what the interpreter
cannot: code the GPU compiler rejects, and tiles that do not fit. Exit status 1 on failure.

Must run without ``TRITON_INTERPRET`` (kernels are then compiled, not interpreted).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction

from ...contract import SINGLE_MIXED, BwdArgs, FwdArgs
from ...contract.ffn_args import FFN_SAVED, FfnBwdArgs, FfnFwdArgs
from . import configs
from . import ffn as FFN
from . import ffn_kernels as FK
from . import kernels as K
from .backend import TritonBackend
from .ffn import TritonFFN

SMEM_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory per block (opt-in maximum)
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
        torch.int64: "*i64", torch.int8: "*i8"}
KERNEL_NAMES = ("_shrink_kernel", "_shrink_finalize_kernel", "_expand_kernel", "_wgrad_kernel",
                "_wgrad_reduce_kernel")
FFN_KERNEL_NAMES = ("_ffn_fwd_kernel", "_ffn_bwd_kernel", "_ffn_bwd_finalize_kernel", "_ffn_wgrad_kernel")


class _Recorder:
    def __init__(self, fn, seen: dict):
        self.fn, self.seen = fn, seen

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=2, **constexprs):
            sig, consts = {}, dict(constexprs)
            for name, v in zip(self.fn.arg_names, args):
                if isinstance(v, torch.Tensor):
                    sig[name] = _PTR[v.dtype]
                elif isinstance(v, float):
                    sig[name] = "fp32"
                elif v == 1 and name not in self.fn.do_not_specialize:  # Triton specialises ints equal to 1
                    sig[name], consts[name] = "constexpr", 1
                else:
                    sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            for name in constexprs:
                sig[name] = "constexpr"
            key = (self.fn.__name__, tuple(sig.items()), tuple(sorted(consts.items())), num_warps, num_stages)
            self.seen.setdefault(key, (self.fn, sig, consts, num_warps, num_stages))

        return launch


def _args(T: int, d_in: int, d_out: int, r: int, E: int, dtype, routing: str, gate: bool, p: float):
    g = torch.Generator().manual_seed(0)
    z = lambda *s: torch.zeros(*s, dtype=dtype)  # noqa: E731
    tt = {"single": torch.zeros(T, dtype=torch.long), "none": torch.full((T,), -1, dtype=torch.long),
          "mixed": torch.randint(-1, E, (T,), generator=g)}[routing]
    key = torch.where(tt < 0, E, tt)
    off = torch.zeros(E + 1, dtype=torch.int32)
    off[1:] = torch.cumsum(torch.bincount(key, minlength=E + 1)[:E], 0)
    single = {"single": 0, "none": -1, "mixed": SINGLE_MIXED}[routing]
    fa = FwdArgs(z(T, d_in), z(d_out, d_in), z(d_out), z(r, d_in), z(d_out, r), z(E, r, d_in), z(E, d_out, r),
                 z(2, d_in) if gate else None, tt.int(), torch.argsort(key, stable=True).int(), off, None, single,
                 2.0, p, torch.tensor(1234))
    return fa


def record(arch: int) -> dict:
    """The distinct launches of the matrix below, with ``arch``'s tile tables."""
    table = configs.table_for(f"sm_{arch}")
    seen: dict = {}
    real = {n: getattr(K, n) for n in KERNEL_NAMES}
    for n, fn in real.items():
        setattr(K, n, _Recorder(fn, seen))
    try:
        cases = [  # (T bucket, rank bucket, expand, dtype, routing, gate, dropout, r, T)
            ("large", "lo", "addmm", torch.bfloat16, "mixed", True, 0.1, 8, 40),
            ("large", "lo", "fused", torch.bfloat16, "mixed", True, 0.1, 8, 40),
            ("small", "lo", "fused", torch.float16, "single", False, 0.0, 16, 40),
            ("small", "lo", "addmm", torch.float32, "none", True, 0.05, 5, 40),
            ("decode", "lo", "addmm", torch.bfloat16, "mixed", True, 0.0, 1, 9),
            ("decode", "lo", "fused", torch.float16, "single", True, 0.1, 16, 1),
            ("large", "hi", "fused", torch.bfloat16, "mixed", True, 0.1, 128, 40),
            ("large", "hi", "addmm", torch.float32, "single", False, 0.1, 64, 40),
        ]
        for tb, rb, expand, dtype, routing, gate, p, r, T in cases:
            tiles = {k: table[(k, tb, rb)] for k in configs.KERNELS}
            if tiles["shrink"].split_k == 0:  # "fill the SMs": on a CPU that would be 1
                tiles["shrink"] = dataclasses.replace(tiles["shrink"], split_k=4)
            b = TritonBackend(expand=expand, tiles=tiles)
            a = _args(T, 600, 300, r, 4, dtype, routing, gate, p)
            y, h_s, h_t, coef = b.forward(a)
            for det, train in ((False, None), (True, [True, False, True, True])):
                b.backward(BwdArgs(**a.__dict__, grad_y=torch.zeros_like(y), h_s=h_s, h_t=h_t, coef=coef,
                                   expert_trainable=train, deterministic=det))
        record_ffn(seen, tiles_of=lambda tb, rb: {k: table[(k, tb, rb)] for k in configs.KERNELS})
    finally:
        for n, fn in real.items():
            setattr(K, n, fn)
    return seen


class _FfnBackend(TritonFFN, TritonBackend):
    pass


def _ffn_args(T: int, d: int, d_ff: int, r: int, E: int, dtype, routing: str, gated: bool, gate: bool, p: float,
              pool: bool) -> FfnFwdArgs:
    lin = _args(T, d, d_ff, r, E, dtype, routing, gate, p)
    z = lambda *s: torch.zeros(*s, dtype=dtype)  # noqa: E731
    t = {f"gate_proj_{part}": None for part in ("weight", "bias", "shared_A", "shared_B", "task_A", "task_B")}
    for proj, (i, o) in (("gate_proj", (d, d_ff)), ("up_proj", (d, d_ff)), ("down_proj", (d_ff, d))):
        if proj == "gate_proj" and not gated:
            continue
        t.update({f"{proj}_weight": z(o, i), f"{proj}_bias": z(o), f"{proj}_shared_A": z(r, i),
                  f"{proj}_shared_B": z(o, r), f"{proj}_task_A": z(E, r, i), f"{proj}_task_B": z(E, o, r)})
    return FfnFwdArgs(x=lin.x, **t, moe_gate=lin.gate_weight, token_task=lin.token_task, sorted_idx=lin.sorted_idx,
                      expert_offsets=lin.expert_offsets, offsets_cpu=None, single_task=lin.single_task,
                      pool=torch.full((2, T // 2), 2.0 / T) if pool else None, activation="silu", scale=2.0,
                      dropout_p=p, seed=lin.seed)


def record_ffn(seen: dict, tiles_of) -> None:
    """The FFN op's launches (its own kernels with the GPU tiles of ``ffn.ffn_tile``, and the linear
    stages it reuses with the linear tiles), recorded by the recorders in place."""
    real = {n: getattr(FK, n) for n in FFN_KERNEL_NAMES}
    tile_fn = FFN.ffn_tile
    for n, fn in real.items():
        setattr(FK, n, _Recorder(fn, seen))
    FFN.ffn_tile = lambda device, kernel, r_pad: tile_fn(torch.device("cuda"), kernel, r_pad)
    try:
        cases = [  # (T bucket, dtype, routing, gated MLP, gate, dropout, r, T, d_ff split, pool)
            ("large", torch.bfloat16, "mixed", True, True, 0.1, 8, 40, 1, True),
            ("large", torch.float16, "single", True, False, 0.0, 16, 40, 1, False),
            ("small", torch.float32, "none", False, True, 0.05, 5, 40, 1, False),
            ("decode", torch.bfloat16, "mixed", True, True, 0.0, 8, 9, 4, False),
            ("large", torch.bfloat16, "mixed", True, True, 0.1, 64, 40, 1, False),
        ]
        for tb, dtype, routing, gated, gate, p, r, T, split, pool in cases:
            b = _FfnBackend(tiles=tiles_of(tb, "lo" if r <= 32 else "hi"))
            b.ffn_split = split
            a = _ffn_args(T, 320, 704, r, 4, dtype, routing, gated, gate, p, pool)
            out = b.ffn_forward(a)
            for train in (None, [True, False, True, True]):
                acc = torch.float32
                b.ffn_backward(FfnBwdArgs(**a.__dict__, grad_y=torch.zeros_like(a.x),
                                          grad_h_pool=torch.zeros(2, 704, dtype=acc) if pool else None,
                                          grad_z_pool=torch.zeros(2, r, dtype=acc) if pool else None,
                                          **dict(zip(FFN_SAVED, out[1:8])), expert_trainable=train))
    finally:
        for n, fn in real.items():
            setattr(FK, n, fn)
        FFN.ffn_tile = tile_fn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SMEM_LIMIT))
    args = ap.parse_args(argv)
    if isinstance(K._shrink_kernel, InterpretedFunction):
        print("TRITON_INTERPRET is set: kernels are interpreted, nothing to compile", file=sys.stderr)
        return 1
    failures = 0
    for arch in args.arch:
        launches = record(arch)
        t0 = time.time()
        for fn, sig, consts, warps, stages in launches.values():
            what = f"sm_{arch} {fn.__name__} warps={warps} stages={stages} " + " ".join(
                f"{k}={v}" for k, v in sorted(consts.items()) if k.isupper())
            try:
                c = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                                   options=dict(num_warps=warps, num_stages=stages))
                smem = c.metadata.shared
                ok = smem <= SMEM_LIMIT[arch]
                failures += not ok
                print(f"{'ok ' if ok else 'BIG'} smem={smem:6d} {what}")
            except Exception as e:  # report every failing variant, not just the first
                failures += 1
                print(f"ERR {what}\n    {type(e).__name__}: {str(e).strip()[:2000]}")
        print(f"sm_{arch}: {len(launches)} variants compiled in {time.time() - t0:.0f} s")
    print("FAILED" if failures else "all variants compile", f"({failures} failures)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
