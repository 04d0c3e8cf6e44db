#!/usr/bin/env python3
"""Run every kernel of the ``cuda`` backend once at a small size, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python tools/sanitize_cuda.py
    compute-sanitizer --tool racecheck python tools/sanitize_cuda.py
    compute-sanitizer --tool initcheck python tools/sanitize_cuda.py
    compute-sanitizer --tool synccheck python tools/sanitize_cuda.py

Forward and backward of the fused op in fp32 and bf16 with mixed routing (no-task tokens,
an absent expert, task ids on the device so the grids are upper bounds), gate and dropout
on and a frozen expert, once with one split everywhere and once with two (split-K shrink,
split wgrad + fixed-order reduction). That launches shrink, both finalizes, expand
(forward; backward with the dropout mask and gate term) and wgrad / wgrad_reduce for the
shared expert, the per-expert gradients and the gate. Exits 1 if a result is non-finite
or far from the eager backend's (a sanity check; tests/test_cuda_backend.py checks accuracy).
Then a corrupt routing (token indices outside [0, T), offsets past T and decreasing): the
kernels must stay in bounds -- memcheck judges; the numbers are not checked. ``--small``:
bf16 only (a short pass by hand; benchmarks/run_gpu.sh's one call sanitizes a Triton gemm case only).
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from moecl_kernels.backends import cuda as cuda_backend
from moecl_kernels.contract import SINGLE_MIXED
from moecl_kernels.ops import moe_lora_linear
from moecl_kernels.routing import build_routing

T, D_IN, D_OUT, R, E = 70, 72, 40, 5, 3
TRAINABLE = [True, False, True]
GRADS = ("x", "shared_A", "shared_B", "task_A", "task_B", "gate_weight")


def run(backend: str, dtype: torch.dtype, corrupt: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device="cuda", dtype=dtype)

    t = dict(x=rnd(T, D_IN), weight=rnd(D_OUT, D_IN, scale=D_IN**-0.5), bias=rnd(D_OUT),
             shared_A=rnd(R, D_IN, scale=D_IN**-0.5), shared_B=rnd(D_OUT, R), task_A=rnd(E, R, D_IN, scale=D_IN**-0.5),
             task_B=rnd(E, D_OUT, R), gate_weight=rnd(2, D_IN, scale=D_IN**-0.5))
    for k in GRADS:
        t[k].requires_grad_(True)
    ids = torch.tensor([-1, 0, 2])[torch.randint(0, 3, (T,), generator=g)]  # expert 1 absent
    routing = build_routing(ids.cuda(), E, T, device="cuda")
    if corrupt:  # a stale routing: out-of-range token indices, offsets past T and decreasing
        sidx, off = routing.sorted_idx.clone(), routing.expert_offsets.clone()
        sidx[::5], sidx[1::7] = T + 3, -2
        off[1:] = torch.tensor([T + 9, 4, T + 40][:E], dtype=off.dtype)
        routing = dataclasses.replace(routing, sorted_idx=sidx, expert_offsets=off, single_task=SINGLE_MIXED,
                                      offsets_cpu=None)
    y = moe_lora_linear(**t, routing=routing, scale=2.0, dropout_p=0.1, seed=torch.tensor(7, device="cuda"),
                        expert_trainable=TRAINABLE, backend=backend)
    grads = torch.autograd.grad(y, [t[k] for k in GRADS], torch.randn(T, D_OUT, generator=g).to("cuda", dtype))
    torch.cuda.synchronize()
    return dict(y=y.detach(), **dict(zip(GRADS, grads)))


def main(argv=None) -> int:
    small = "--small" in (sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("sanitize_cuda: needs a CUDA GPU", file=sys.stderr)
        return 1
    ext, why = cuda_backend.load_extension()
    if ext is None:
        print(f"sanitize_cuda: {why}", file=sys.stderr)
        return 1
    bad = []
    for splits in (1, 2):
        cuda_backend._splits = lambda blocks, length, min_len, sms, n=splits: n  # force the split count
        for dtype in (torch.bfloat16,) if small else (torch.float32, torch.bfloat16):
            got, want = run("cuda", dtype), run("eager", dtype)
            for k, v in got.items():
                err = float((v.float() - want[k].float()).abs().max() / want[k].float().abs().max().clamp_min(1e-6))
                ok = bool(torch.isfinite(v).all()) and err < 0.05
                print(f"splits={splits} {dtype!s:15} {k:12} max rel diff vs eager {err:.2e} {'ok' if ok else 'BAD'}")
                if not ok:
                    bad.append((splits, dtype, k))
    run("cuda", torch.bfloat16, corrupt=True)
    print("corrupt routing ran (memcheck judges the accesses)")
    print("sanitize_cuda: " + ("all kernels ran" if not bad else f"{len(bad)} bad results: {bad}"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
