"""Run every Triton kernel of the ``triton`` backend once, at a small size, on the GPU.

Meant to run under compute-sanitizer (memcheck, racecheck): forward and backward for one
task, mixed tasks with no-task tokens, the split-K decode path (T <= 64), the
deterministic weight-gradient path, dropout and gate off, the fused expand, then a corrupt
routing (token indices outside [0, T), offsets past T and decreasing: the kernels must stay
in bounds, memcheck is the judge; its numbers are not checked). Exits non-zero if a result of
a valid routing disagrees with the eager backend (fp32, 1e-4 relative) so a silent
corruption is caught too. ``--small``: the fewest cases that still launch every kernel
variant family. ``--gemm``: one bf16 case of the gemm variant and a bf16 decode batch (the
optional sanitizer pass of benchmarks/run_gpu.sh, with ``MOECL_TRITON_VARIANT=gemm``).
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from moecl_kernels.contract import SINGLE_MIXED
from moecl_kernels.ops import moe_lora_linear
from moecl_kernels.routing import build_routing

GRADS = ("x", "shared_A", "shared_B", "task_A", "task_B", "gate_weight")


def case(T, d_in, d_out, r, E, tasks, gate=True, p=0.0, deterministic=False, seed=0, corrupt=False,
         backends=("triton", "eager"), dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*s, scale=1.0, grad=True):
        return (torch.randn(*s, generator=g) * scale).to(dtype).cuda().requires_grad_(grad)

    inp = dict(x=rnd(T, d_in), weight=rnd(d_out, d_in, scale=d_in**-0.5, grad=False), bias=rnd(d_out, grad=False),
               shared_A=rnd(r, d_in, scale=d_in**-0.5), shared_B=rnd(d_out, r, scale=r**-0.5),
               task_A=rnd(E, r, d_in, scale=d_in**-0.5), task_B=rnd(E, d_out, r, scale=r**-0.5),
               gate_weight=rnd(2, d_in, scale=d_in**-0.5) if gate else None)
    R = build_routing(tasks, E, T, device="cuda")
    if corrupt:  # a stale routing: out-of-range token indices, offsets past T and decreasing
        sidx, off = R.sorted_idx.clone(), R.expert_offsets.clone()
        sidx[::5], sidx[1::7] = T + 3, -2
        off[1:] = torch.tensor([T + 9, 4, T + 40, 1][:E], dtype=off.dtype)
        R = dataclasses.replace(R, sorted_idx=sidx, expert_offsets=off, single_task=SINGLE_MIXED, offsets_cpu=None)
    gy = torch.randn(T, d_out, generator=g).to(dtype).cuda()
    outs = {}
    for backend in backends:
        y = moe_lora_linear(**inp, routing=R, scale=2.0, dropout_p=p, seed=torch.tensor(seed + 1, device="cuda"),
                            deterministic=deterministic, backend=backend)
        names = [n for n in GRADS if inp[n] is not None]
        grads = torch.autograd.grad(y, [inp[n] for n in names], gy)
        outs[backend] = [y, *grads]
    torch.cuda.synchronize()
    if len(backends) < 2:
        return 0.0
    worst = max(float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))
                for a, b in zip(outs["triton"], outs["eager"]))
    return worst


def gemm_case() -> int:
    """``--gemm``: one bf16 case of the gemm variant (run with ``MOECL_TRITON_VARIANT=gemm``: on sm_90 the
    TMA GEMM, the atomic weight gradients) and one bf16 decode batch (the split-K GEMV): the kernels
    the fp32 default-backend pass does not reach, under one sanitizer start-up."""
    bad = 0
    for name, args in (("gemm bf16 mixed + no-task", (256, 128, 96, 16, 4, torch.tensor([0, 3, -1, 1] * 64))),
                       ("gemm bf16 decode", (16, 256, 96, 16, 4, torch.tensor([1, 0, 3, 2] * 4)))):
        err = case(*args, p=0.1, dtype=torch.bfloat16)
        ok = err <= 3e-2
        bad += not ok
        print(f"{name:28s} max rel. err vs eager {err:.2e} {'ok' if ok else 'MISMATCH'}")
    return bad


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--gemm" in argv:
        return 1 if gemm_case() else 0
    small = "--small" in argv
    torch.backends.cuda.matmul.allow_tf32 = False
    E = 4
    cases = {
        "one task": (200, 96, 80, 8, E, torch.full((200,), 2), {}),
        "mixed + no-task": (203, 97, 81, 8, E, torch.tensor([0, 3, -1, 1, 2, 1, -1] * 29), dict(p=0.1)),
        "decode split-K": (16, 256, 96, 16, E, torch.tensor([1, 0, 3, 2] * 4), {}),
        "deterministic": (130, 64, 72, 4, E, torch.randint(-1, E, (130,)), dict(deterministic=True)),
        "dropout, gate off, r=1": (77, 65, 33, 1, E, torch.randint(0, E, (77,)), dict(p=0.1, gate=False)),
    }
    if small:
        cases = {k: cases[k] for k in ("mixed + no-task", "decode split-K")}
    bad = 0
    for name, (T, di, do, r, E_, tasks, kw) in cases.items():
        err = case(T, di, do, r, E_, tasks, **kw)
        ok = err <= 1e-4
        bad += not ok
        print(f"{name:24s} max rel. err vs eager {err:.2e} {'ok' if ok else 'MISMATCH'}")
    from moecl_kernels.backends import get_backend

    for expand in ("addmm", "fused"):  # a corrupt routing: in bounds or memcheck reports it
        get_backend("triton").expand = expand
        case(130, 64, 72, 4, E, torch.randint(-1, E, (130,)), p=0.1, corrupt=True, backends=("triton",))
        print(f"corrupt routing, {expand:6s} ran (memcheck judges the accesses)")
    get_backend("triton").expand = "addmm"
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
