"""Compile every Triton kernel variant the backend launches for real GPUs -- no GPU needed.

    python -m moecl_kernels.backends.triton.compile_check [--arch 90 80]

The backend's forward and backward run on small CPU tensors with the kernels replaced
by recorders (nothing executes; the values are garbage and unused). Each distinct
launch -- kernel, argument types, ``constexpr`` values, warps, stages -- is then
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
from . import configs
from . import kernels as K
from .backend import TritonBackend

SMEM_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory per block (opt-in maximum)
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
        torch.int64: "*i64", torch.int8: "*i8"}
KERNEL_NAMES = ("_shrink_kernel", "_shrink_finalize_kernel", "_expand_kernel", "_wgrad_kernel",
                "_wgrad_reduce_kernel")


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
    finally:
        for n, fn in real.items():
            setattr(K, n, fn)
    return seen


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
