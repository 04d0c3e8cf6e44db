"""The GPU call's work list (``benchmarks/run_gpu.sh``): the JIT warm-up and the dry run of the plan.

    python -m benchmarks.gpu_plan --dry-run --providers P1,P2 --ffn-providers F1,F2 --row-budget S --ffn-row-budget S
        CPU (CI): the §4 rows and FFN rows with their budgets, every provider x case the warm-up
        compiles (providers validated against the benchmarks' lists) -- no GPU, nothing compiled
    python -m benchmarks.gpu_plan --warm --shard I/N --providers ... --ffn-providers ...
        GPU: every provider x case of shard I of N run once (forward, and backward for fwd+bwd
        cases): Triton's JIT compiles each kernel variant into its on-disk cache, which the
        benchmark processes that follow read. Several shards run in parallel (run_gpu.sh).
        A unit that fails is printed and the rest go on; the exit status counts the failures.

The warm-up units are exactly what ``bench_op --spec`` and ``bench_ffn`` run, in the same
shapes and dtypes, so the timed stages compile nothing (their first check would otherwise pay
the compile inside the row's budget).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import torch

from .cases import ffn_spec_cases, spec_cases

STARTUP_S = 12  # a benchmark process's start-up before its first row (imports, CUDA context, ceilings)


def units(providers: list[str], ffn_providers: list[str]) -> list[tuple[str, object, str]]:
    """(kind, case, provider) of every warm-up unit, ``op`` rows first: the order the stages run. The
    base providers (cuBLAS, nothing to compile) are left out."""
    out = [("op", c, n) for c in spec_cases() for n in providers if not n.startswith("base")]
    return out + [("ffn", c, n) for c in ffn_spec_cases() for n in ffn_providers if not n.startswith("base")]


def _provider_objects(kind: str, names: list[str]) -> dict:
    if kind == "op":
        from .providers import all_providers

        return {p.name: p for p in all_providers() if p.name in names}
    from .ffn_providers import ffn_providers

    return {p.name: p for p in ffn_providers(names)}


def known(kind: str) -> list[str]:
    if kind == "op":
        from .providers import all_providers

        return [p.name for p in all_providers()]
    from .ffn_providers import ffn_providers

    return [p.name for p in ffn_providers()]


def warm_one(kind: str, case, prov, device: torch.device) -> str:
    """Run one provider once on one case (n_rot = 1); 'ok', 'skipped: why' (raises on failure)."""
    if kind == "op":
        from .bench_op import make_problem
    else:
        from .bench_ffn import make_problem
    p = make_problem(case, device, 1)
    why = prov.skip_reason(p)
    if why is not None:
        return f"skipped: {why}"
    b = prov.bind(p, 0)
    if p.backward:
        torch.autograd.grad(b.forward(), list(b.targets.values()), p.sets[0].grad_y, allow_unused=True)
    else:
        with torch.no_grad():
            b.forward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return "ok"


def warm(shard: int, n_shards: int, providers: list[str], ffn_providers: list[str], device: torch.device) -> int:
    todo = units(providers, ffn_providers)[shard::n_shards]
    objs = {k: _provider_objects(k, providers if k == "op" else ffn_providers) for k in ("op", "ffn")}
    failed = 0
    for kind, case, name in todo:
        t0 = time.monotonic()
        try:
            what = warm_one(kind, case, objs[kind][name], device)
        except Exception as e:  # noqa: BLE001 - reported; the timed stage will record it again
            failed += 1
            what = f"FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"warm[{shard}/{n_shards}] {kind} {case.label} {name}: {what} ({time.monotonic() - t0:.1f}s)", flush=True)
    return min(failed, 100)


def triton_kernels(arch: int = 90) -> dict[str, int]:
    """Distinct Triton specialisations (kernel, constexprs, warps, stages) that the §4 shapes launch on
    ``arch``: ``compile_check``'s recording (kernels stubbed, tiles planned as on a GPU), no compile."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # the kernels would run (interpreted) instead of recording
        raise RuntimeError("the recording needs compiled Triton: run without TRITON_INTERPRET=1")
    from moecl_kernels.backends.triton import compile_check as cc

    seen: dict[str, set] = {}
    for _case, fn, _args, kwargs, _grid in cc.record(arch, False):
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", str(fn))
        seen.setdefault(name, set()).add(tuple(sorted((k, v) for k, v in kwargs.items()
                                                      if isinstance(v, (bool, int, str)))))
    return {k: len(v) for k, v in sorted(seen.items())}


def dry_run(providers: list[str], ffn_providers: list[str], row_budget: float, ffn_row_budget: float,
            spec_budget: float, ffn_budget: float) -> int:
    bad = 0
    for kind, names in (("op", providers), ("ffn", ffn_providers)):
        unknown = sorted(set(names) - set(known(kind)))
        if unknown:
            print(f"ERROR: unknown {kind} providers {unknown}; known: {known(kind)}")
            bad += 1
    ops, ffns = spec_cases(), ffn_spec_cases()
    print(f"rows: {len(ops)} op rows x {row_budget:g} s (bench_op --spec), {len(ffns)} FFN rows x "
          f"{ffn_row_budget:g} s (bench_ffn); each row its own budget")
    for c in ops:
        print(f"  op   {c.label}")
    for c in ffns:
        print(f"  ffn  {c.label}")
    for what, n, each, budget in (("op", len(ops), row_budget, spec_budget), ("FFN", len(ffns), ffn_row_budget,
                                                                            ffn_budget)):
        if budget and n * each + STARTUP_S > budget:
            print(f"ERROR: {n} {what} rows x {each:g} s + {STARTUP_S} s start-up > the stage's {budget:g} s")
            bad += 1
    us = units(providers, ffn_providers)
    n_op = sum(k == "op" for k, _, _ in us)
    print(f"warm-up: {len(us)} provider x case units ({n_op} op, {len(us) - n_op} FFN; base providers compile "
          "nothing), each run once, sharded over processes")
    for kind, c, n in us:
        print(f"  {kind} {c.label} {n}")
    kernels = triton_kernels(90)
    print(f"Triton kernels the §4 shapes compile on sm_90 (compile_check's recording): "
          f"{sum(kernels.values())} specialisations of {len(kernels)} kernels")
    for k, n in kernels.items():
        print(f"  {k}: {n}")
    return bad


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_plan", description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--dry-run", action="store_true", help="print the rows and the warm-up units (no GPU)")
    g.add_argument("--warm", action="store_true", help="GPU: run shard I/N of the warm-up units once")
    ap.add_argument("--shard", default="0/1", help="I/N: this process's share of the warm-up units")
    ap.add_argument("--providers", default="", help="bench_op providers (comma-separated; base ones added)")
    ap.add_argument("--ffn-providers", default="", help="bench_ffn providers (comma-separated; base ones added)")
    ap.add_argument("--row-budget", type=float, default=0.0)
    ap.add_argument("--ffn-row-budget", type=float, default=0.0)
    ap.add_argument("--spec-budget", type=float, default=0.0, help="dry run: the spec stage's budget (s)")
    ap.add_argument("--ffn-budget", type=float, default=0.0, help="dry run: the ffn stage's budget (s)")
    args = ap.parse_args(argv)
    providers = ["base", "base-repeat", *filter(None, args.providers.split(","))]
    ffn = ["base-mlp", "base-mlp-repeat", *filter(None, args.ffn_providers.split(","))]
    if args.dry_run:
        return dry_run(providers, ffn, args.row_budget, args.ffn_row_budget, args.spec_budget, args.ffn_budget)
    i, n = (int(v) for v in args.shard.split("/"))
    if not (0 <= i < n):
        print(f"error: --shard {args.shard}: want I/N with 0 <= I < N", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return warm(i, n, providers, ffn, device)


if __name__ == "__main__":
    sys.exit(main())
