"""Host-side cost of the decode path, measured on the CPU with the kernel launches stubbed.

    python -m benchmarks.bench_host            # ~1 min; writes benchmarks/results/host/host.{json,md}
    python -m benchmarks.bench_host --quick    # a few seconds (CI: tests the harness)

What a decode call (T = 16: the GPU work is ~10 us) costs the CPU before any kernel runs:
validation, backend choice, the custom op's dispatch and the Triton backend's own Python
(routing description, tile lookup, allocations, argument lists), each timed alone, plus the
whole ``moe_lora_linear(..., backend="triton")`` call, under ``torch.no_grad`` as in decoding.
The five Triton kernels are replaced by a no-op launcher, so **Triton's own launcher (its
argument binding and the driver call) and the GPU are not included**: those need a GPU
(``bench_op``'s decode rows time the whole call with CUDA events, eagerly and graph-replayed).
The base GEMM ``y.addmm_`` runs for real on the CPU at d = 64 (timed alone too, to subtract).

CPU numbers of this machine: labelled as such, never GPU figures. The rounds interleave the
measured pieces, so a load change on a shared machine hits them alike; each figure is the
median over rounds of the per-round median.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend accepts CPU tensors only interpreted

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from .common import REPO_ROOT, environment, md_table, write_json  # noqa: E402

KERNELS = ("_shrink_kernel", "_shrink_finalize_kernel", "_expand_kernel", "_wgrad_kernel", "_wgrad_reduce_kernel")


class _NoLaunch:
    """A kernel stand-in: ``kernel[grid](*args, **meta)`` does nothing but count."""

    def __init__(self):
        self.count = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **meta):
        self.count += 1


def _setup(T: int, d: int, r: int, E: int, routing: str):
    from moecl_kernels.backends.triton import kernels
    from moecl_kernels.routing import build_routing

    stubs = {n: _NoLaunch() for n in KERNELS}
    for n, s in stubs.items():
        setattr(kernels, n, s)
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = dict(x=rnd(T, d), weight=rnd(d, d), bias=None, shared_A=rnd(r, d), shared_B=rnd(d, r),
             task_A=rnd(E, r, d), task_B=rnd(E, d, r), gate_weight=rnd(2, d))
    ids = {"mixed": torch.arange(T) % E, "one": torch.zeros(T, dtype=torch.long)}[routing]
    return t, build_routing(ids, E, T), stubs


def pieces(T: int = 16, d: int = 64, r: int = 16, E: int = 8, routing: str = "mixed") -> tuple[dict, dict]:
    """name -> zero-argument callable for each measured piece, and the stubs (launch counts)."""
    from moecl_kernels import backends as bk
    from moecl_kernels.contract import FwdArgs, OpOptions
    from moecl_kernels.ops.custom_ops import moe_lora_fwd
    from moecl_kernels.ops.linear import astuple_shallow, moe_lora_linear, validate

    t, R, stubs = _setup(T, d, r, E, routing)
    x, W = t["x"], t["weight"]
    fa = FwdArgs(**t, token_task=R.token_task, sorted_idx=R.sorted_idx, expert_offsets=R.expert_offsets,
                 offsets_cpu=R.offsets_cpu, single_task=R.single_task, scale=2.0, dropout_p=0.0, seed=None)
    args = astuple_shallow(fa) + astuple_shallow(OpOptions(expert_trainable=[], deterministic=False, backend="triton"))
    backend = bk.backend("triton")
    y = torch.empty(T, d)
    named = {k: t[k] for k in ("weight", "bias", "shared_A", "shared_B", "task_A", "task_B", "gate_weight")}
    return {
        "moe_lora_linear (whole call)": lambda: moe_lora_linear(x, routing=R, scale=2.0, backend="triton", **named),
        "validate": lambda: validate(x, W, None, t["shared_A"], t["shared_B"], t["task_A"], t["task_B"],
                                     t["gate_weight"], R, 0.0),
        "choose_backend": lambda: bk.choose_backend("triton", x, r, E),
        "custom op moe_lora_fwd (dispatch + backend)": lambda: moe_lora_fwd(*args),
        "TritonBackend.forward (launches stubbed)": lambda: backend.forward(fa),
        "base GEMM y.addmm_ alone (CPU, d=64)": lambda: y.addmm_(x, W.t()),
    }, stubs


def measure(fns: dict, rounds: int, reps: int) -> dict:
    """Per piece: median over ``rounds`` of the median of ``reps`` timed calls (microseconds)."""
    per_round = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():  # warm-up: caches, first-use allocations
            for _ in range(20):
                f()
        for i in range(rounds):
            order = list(fns.items()) if i % 2 == 0 else list(reversed(fns.items()))
            for name, f in order:
                ts = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    f()
                    ts.append(time.perf_counter() - t0)
                per_round[name].append(statistics.median(ts) * 1e6)
    return {k: {"median_us": statistics.median(v), "min_round_us": min(v), "rounds_us": v} for k, v in per_round.items()}


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report_md(res: dict) -> str:
    rows = [[k, f"{v['median_us']:.1f}", f"{v['min_round_us']:.1f}"] for k, v in res["pieces"].items()]
    c = res["config"]
    return "\n".join([
        "# Host-side cost of the decode path (CPU measurement, launches stubbed)", "",
        f"- **CPU: {res['machine']}**, 1 thread ({res['meta']['date_utc']}, commit `{res['meta']['git_commit']}`); "
        f"torch {res['meta']['torch']}, triton {res['meta']['triton']}",
        f"- T={c['T']} d={c['d']} r={c['r']} E={c['E']} routing={c['routing']}, fp32, no_grad, dropout off; "
        f"{c['launches_per_call']} Triton launches per forward (stubbed: Triton's own launcher and the GPU are "
        "**not** included); the base GEMM runs for real on the CPU",
        f"- {c['rounds']} interleaved rounds x {c['reps']} calls; median over rounds of the per-round median", "",
        md_table(["piece", "median µs", "best round µs"], rows), ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_host", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few rounds (tests the harness)")
    ap.add_argument("--out", type=Path, help="output folder (default benchmarks/results/host)")
    ap.add_argument("--routing", choices=("mixed", "one"), default="mixed")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = dict(T=16, d=64, r=16, E=8, routing=args.routing)
    fns, stubs = pieces(**cfg)
    rounds, reps = (3, 20) if args.quick else (15, 200)
    with torch.no_grad():
        before = sum(s.count for s in stubs.values())
        fns["TritonBackend.forward (launches stubbed)"]()
        launches = sum(s.count for s in stubs.values()) - before
    res = {"meta": environment(torch.device("cpu")), "machine": f"{cpu_name()} ({os.cpu_count()} cores, shared)",
           "config": dict(cfg, rounds=rounds, reps=reps, launches_per_call=launches),
           "pieces": measure(fns, rounds, reps)}
    out = args.out or REPO_ROOT / "benchmarks" / "results" / "host"
    write_json(out / "host.json", res)
    md = report_md(res)
    (out / "host.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
