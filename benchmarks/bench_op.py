"""Op microbenchmark of the fused MoE-LoRA linear: every provider against the base ``F.linear``.

    python -m benchmarks.bench_op --quick            # CPU, tiny shapes: tests the harness (CI)
    python -m benchmarks.bench_op --spec             # GPU: the docs/spec.md §4 rows, ragged and decode cases (~2 min)
    python -m benchmarks.bench_op                    # GPU: the curated sweep (420 s budget)
    python -m benchmarks.bench_op --full             # GPU: the whole cross product (hours)

Each case (``cases.Case``: mode, d_in, d_out, r, E, T, routing, dtype) builds several rotation
sets of random inputs, then for every provider: check against the float64 oracle
(``moe_lora_reference``) on a subset of rows (forward) and with an upstream gradient supported
on those rows (backward: every weight gradient and dx, which must vanish elsewhere); the
providers that pass are timed together, round-robin, the order reversed every round (no
provider always runs first; see ``common.Timer.interleaved``). Decode cases (T <= 64,
forward) are timed eagerly and again as CUDA-graph replays (GPU), base and op alike: eagerly,
back-to-back event pairs show the host's speed for a launch-bound op and the device's for the
one-launch base; replays show the device time of both. Ratios are to the base provider of the
same case, measured in the same run.

Outputs (``--out``): ``bench.md`` (tables, ``report.py``), ``bench.json`` (environment, every
raw repetition time, every check error, a candidate for the ``auto`` backend table),
``bench.png`` (ratio to base vs T per provider; not with ``--no-plot``). The exit status is 1
when any provider failed its check or raised.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

from moecl_kernels.ops import moe_lora_reference
from moecl_kernels.routing import build_routing

from .cases import (MODES, ROUTINGS, SPEC_TARGETS, Case, batch_tasks, full_cases, gpu_cases, quick_cases,  # noqa: F401
                    saved_bound_bytes, spec_cases)
from .common import (DTYPES, REPO_ROOT, TOLERANCE, Timer, device_ceilings, environment, l2_bytes, peak_memory_mb,
                     RowTimeout, poisoned, rel_err, row_budget, saved_activation_bytes, write_json)
from .providers import InputSet, Problem, Provider, all_providers
from .report import auto_choice_candidate, cell, evaluate_spec, plot, report_md

# --------------------------------------------------------------------------------------------
# problems and the oracle


def rotation_count(c: Case, device: torch.device) -> int:
    """Enough input sets that one pass over them is >= 3x the L2 (2..8 sets)."""
    el = DTYPES[c.dtype].itemsize
    set_bytes = el * (c.T * (c.d_in + 2 * c.d_out) + c.d_in * c.d_out + (c.E + 1) * c.r * (c.d_in + c.d_out))
    return max(2, min(8, math.ceil(3 * l2_bytes(device) / set_bytes)))


def make_problem(c: Case, device: torch.device, n_rot: int, seed: int = 0) -> Problem:
    """Random inputs at unit-scale activations; the LoRA terms are of the order of the base
    output (s = alpha / r = 2, B non-zero), so a wrong expert or gate is far above tolerance."""
    dt = DTYPES[c.dtype]
    grad = c.mode == "fwd+bwd"
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, std=1.0, req=False):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dt).requires_grad_(req)

    sets = [InputSet(x=rnd(c.T, c.d_in, req=grad), weight=rnd(c.d_out, c.d_in, std=c.d_in**-0.5),
                     shared_A=rnd(c.r, c.d_in, std=c.d_in**-0.5, req=grad),
                     shared_B=rnd(c.d_out, c.r, std=c.r**-0.5, req=grad),
                     task_A=rnd(c.E, c.r, c.d_in, std=c.d_in**-0.5, req=grad),
                     task_B=rnd(c.E, c.d_out, c.r, std=c.r**-0.5, req=grad),
                     gate_weight=rnd(2, c.d_in, std=c.d_in**-0.5, req=grad),
                     grad_y=rnd(c.T, c.d_out)) for _ in range(n_rot)]
    seq, ids = batch_tasks(c.routing, c.T, c.E, torch.Generator().manual_seed(seed))
    routing = build_routing(ids, c.E, c.T, device=device)
    alpha = 2.0 * c.r
    return Problem(sets=sets, routing=routing, seq_tasks=seq, scale=alpha / c.r, alpha=alpha, backward=grad,
                   device=device, ragged=c.routing == "ragged")


def check_rows(p: Problem, max_rows: int) -> torch.Tensor:
    """Rows the oracle is evaluated on: all of them for small T, else evenly spaced rows plus
    the first and last token of every expert's group and of the no-task group."""
    T = p.dims[0]
    if T <= max_rows:
        return torch.arange(T, device=p.device)
    picks = set(torch.linspace(0, T - 1, max_rows // 2).long().tolist())
    off = [int(v) for v in p.routing.offsets_cpu.tolist()] + [T]
    sidx = p.routing.sorted_idx.cpu()
    for a, b in zip(off[:-1], off[1:]):
        if b > a:
            picks.update((int(sidx[a]), int(sidx[b - 1])))
    return torch.tensor(sorted(picks), device=p.device)


class Oracle:
    """float64 ``moe_lora_reference`` on the check rows, per provider semantics (see providers)."""

    GRADS = ("x", "shared_A", "shared_B", "task_A", "task_B", "gate_weight")

    def __init__(self, p: Problem, rows: torch.Tensor):
        self.p, self.rows, self._cache = p, rows, {}

    def __call__(self, semantics: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if semantics not in self._cache:
            self._cache[semantics] = self._compute(semantics)
        return self._cache[semantics]

    def _compute(self, semantics: str):
        s, rows, bwd = self.p.sets[0], self.rows, self.p.backward
        d = {n: getattr(s, n).detach()[rows] if n == "x" else getattr(s, n).detach() for n in self.GRADS}
        d = {n: v.to(torch.float64).requires_grad_(bwd) for n, v in d.items()}
        shared_B = d["shared_B"] if semantics == "moe" else d["shared_B"] * 0
        task_B = d["task_B"] if semantics != "base" else d["task_B"] * 0
        gate = d["gate_weight"] if semantics == "moe" else None
        with torch.enable_grad():
            y = moe_lora_reference(d["x"], s.weight.detach().double(), None, d["shared_A"], shared_B, d["task_A"],
                                   task_B, gate, self.p.routing.token_task[rows], self.p.scale)
            grads = {}
            if bwd:
                gs = torch.autograd.grad(y, [d[n] for n in self.GRADS], s.grad_y[rows].double(), allow_unused=True)
                grads = {n: (g if g is not None else torch.zeros_like(d[n])) for n, g in zip(self.GRADS, gs)}
        return y.detach(), grads

    @staticmethod
    def grad_for(grads: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        """``"task_A[3]"`` -> grads["task_A"][3]."""
        if key.endswith("]"):
            name, idx = key[:-1].split("[")
            return grads[name][int(idx)]
        return grads[key]


def check_provider(prov: Provider, bound, p: Problem, oracle: Oracle) -> dict[str, float]:
    """Relative errors of y and of every gradient the provider produces (see module doc)."""
    rows = oracle.rows
    y_ref, g_ref = oracle(prov.semantics)
    if not p.backward:
        with torch.no_grad():
            return {"y": rel_err(bound.forward()[rows], y_ref)}
    y = bound.forward()
    errs = {"y": rel_err(y.detach()[rows], y_ref)}
    gy = torch.zeros_like(y)
    gy[rows] = p.sets[0].grad_y[rows]
    names = list(bound.targets)
    got = torch.autograd.grad(y, [bound.targets[n] for n in names], gy, allow_unused=True)
    for n, g in zip(names, got):
        g = torch.zeros_like(bound.targets[n]) if g is None else g.detach()
        want = Oracle.grad_for(g_ref, n)
        if n == "x":
            outside = g.clone()
            outside[rows] = 0  # rows with zero upstream gradient must get exactly none
            stray = float(outside.abs().max() / want.abs().max().clamp_min(1e-30))
            errs["dx"] = max(rel_err(g[rows], want), stray if math.isfinite(stray) else math.inf)
        else:
            errs["d" + n] = rel_err(g, want)
    return errs


# --------------------------------------------------------------------------------------------
# measuring


def op_flops(c: Case, semantics: str, n_task: int) -> float:
    """Useful FLOPs of the provider's semantics (fwd; fwd+bwd adds dgrad and the LoRA/gate grads)."""
    base = 2.0 * c.T * c.d_in * c.d_out
    tok = 2.0 * c.r * (c.d_in + c.d_out)  # one LoRA expert on one token
    if semantics == "base":
        lora, gate = 0.0, 0.0
    elif semantics == "lora":
        lora, gate = n_task * tok, 0.0
    else:
        lora, gate = (c.T + n_task) * tok, 4.0 * c.T * c.d_in
    fwd = base + lora + gate
    return fwd + (base + 2 * lora + 2 * gate if c.mode == "fwd+bwd" else 0.0)


def op_bytes(c: Case, semantics: str, n_active: int) -> float:
    """The bytes floor: every operand read once, every result written once (fwd: x, W, LoRA and
    gate weights, y; bwd adds grad_y, W, x for the weight grads, dx and the weight grads)."""
    el = DTYPES[c.dtype].itemsize
    adapters = {"base": 0, "lora": n_active, "moe": 1 + n_active}[semantics]
    lw = adapters * c.r * (c.d_in + c.d_out) + (2 * c.d_in if semantics == "moe" else 0)
    fwd = c.T * c.d_in + c.d_in * c.d_out + c.T * c.d_out + lw
    bwd = c.T * c.d_out + c.d_in * c.d_out + c.T * c.d_in + (c.T * c.d_in if adapters else 0) + 2 * lw
    return el * (fwd + (bwd if c.mode == "fwd+bwd" else 0))


def _inject(bound):
    """A deliberately wrong provider (``--inject-error``): output and gradients 10% off."""
    from .providers import Bound

    return Bound(lambda f=bound.forward: f() * 1.1, bound.targets)


def _prepare(prov: Provider, p: Problem, oracle: Oracle, c: Case, inject: bool) -> tuple[dict, Optional[Callable]]:
    """Check a provider; the record so far and, if it passed, its timed step (``step(i)`` on set i)."""
    bounds = prov.bind_all(p)
    if inject:
        bounds = [_inject(b) for b in bounds]
    with poisoned():  # outputs start as NaN: no provider passes on another's leftovers
        errs = check_provider(prov, bounds[0], p, oracle)
    tol = TOLERANCE[DTYPES[c.dtype]]
    worst = max(errs.values())
    rec = {"errors": errs, "max_err": worst, "tol": tol}
    if not worst <= tol:
        return dict(rec, status="FAIL", reason=f"max error {worst:.3g} > tolerance {tol:g}: "
                    + ", ".join(f"{k}={v:.3g}" for k, v in errs.items())), None
    if p.backward:
        def step(i):
            b = bounds[i]
            return torch.autograd.grad(b.forward(), list(b.targets.values()), p.sets[i].grad_y, allow_unused=True)
    else:
        def step(i):
            with torch.no_grad():
                return bounds[i].forward()
    step.bounds = bounds
    return rec, step


def _stats(times: list[float]) -> dict:
    med = statistics.median(times)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [med] * 9
    return dict(times_ms=times, median_ms=med, p10_ms=q[0], p90_ms=q[-1], reps=len(times))


def _time_all(steps: dict, n_rot: int, timer: Timer) -> tuple[dict, dict]:
    """Interleaved times of every step; a step that raises is timed no further: (times, errors)."""
    errors = {}
    while steps:
        try:
            return timer.interleaved(steps, n_rot), errors
        except Exception as e:  # find the culprit alone, drop it, time the rest together
            for name, step in list(steps.items()):
                try:
                    step(0)
                except Exception as e1:
                    errors[name] = f"{type(e1).__name__}: {str(e1).splitlines()[0] if str(e1) else ''}"
                    del steps[name]
            if not errors:
                raise e
    return {}, errors


def capture_graphs(step: Callable, n_rot: int) -> tuple[Callable, list]:
    """One CUDA graph per rotation set capturing ``step(i)`` (after a warm-up on a side
    stream); returns a replaying step and the captured outputs (refilled by each replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(n_rot):
            step(i)
    torch.cuda.current_stream().wait_stream(side)
    graphs, outs = [], []
    for i in range(n_rot):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs.append(step(i))
        graphs.append(g)
    return (lambda i: graphs[i].replay()), outs


def _graph_steps(steps: dict, n_rot: int, tol: float, recs: dict) -> dict:
    """Graph-replaying steps of the decode case's providers; a provider that cannot be captured,
    or whose replay differs from its eager output, gets a ``graph_error`` instead."""
    out = {}
    for name, step in steps.items():
        try:
            replay, outs = capture_graphs(step, n_rot)
            replay(0)
            eager = step(0)
            torch.cuda.synchronize()
            diff = rel_err(outs[0], eager)
            if not diff <= tol:
                raise RuntimeError(f"replayed output differs from the eager one (rel. err {diff:.3g})")
            out[name] = replay
        except Exception as e:
            recs[name]["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return out


def _free(device: torch.device) -> None:
    """Return cached GPU memory between cases and after an error (a no-op on the CPU)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def prepare_providers(c, providers: list, p, oracle, n_rot: int, inject: Optional[str]) -> tuple[dict, dict]:
    """(records, timed steps): every provider checked against the oracle on one case; a skip or
    an error (out of memory, a shape a backend refuses, ...) is recorded and the run goes on."""
    recs, steps = {}, {}
    for prov in providers:
        rec = recs[prov.name] = {"label": c.label, "case": asdict(c), "provider": prov.name,
                                 "semantics": prov.semantics, "n_rot": n_rot}
        reason = prov.skip_reason(p)
        if reason is not None:
            rec.update(status="skipped", reason=reason)
            continue
        try:
            extra, step = _prepare(prov, p, oracle, c, inject == prov.name)
            rec.update(extra)
            if step is not None:
                steps[prov.name] = step
        except Exception as e:
            rec.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            _free(p.device)
    return recs, steps


def run_case(c: Case, providers: list[Provider], device: torch.device, timer: Timer,
             inject: Optional[str] = None) -> list[dict]:
    """Check every provider on one case, time the ones that pass together; ratios to the base."""
    n_rot = rotation_count(c, device)
    p = make_problem(c, device, n_rot)
    per_row = 32 * c.r * (c.d_in + c.d_out)  # float64 oracle bytes per checked row, with grads
    oracle = Oracle(p, check_rows(p, max(16, min(128, 2**30 // per_row))))
    recs, steps = prepare_providers(c, providers, p, oracle, n_rot, inject)
    times, errors = _time_all(dict(steps), n_rot, timer)
    off = [int(v) for v in p.routing.offsets_cpu.tolist()]
    n_active = sum(1 for a, b in zip(off[:-1], off[1:]) if b > a)
    for name, step in steps.items():
        rec, prov = recs[name], next(pr for pr in providers if pr.name == name)
        if name in errors:
            rec.update(status="error", reason=errors[name])
            continue
        med = statistics.median(times[name])
        rec.update(status="ok", **_stats(times[name]), tflops=op_flops(c, prov.semantics, off[-1]) / med / 1e9,
                   gbps=op_bytes(c, prov.semantics, n_active) / med / 1e6, peak_mb=peak_memory_mb(step, p.device))
        if p.backward:
            rt, b0 = p.routing, step.bounds[0]
            rec["saved_extra_bytes"] = saved_activation_bytes(
                b0.forward, [*p.sets[0].tensors(), *b0.targets.values(), rt.token_task, rt.sorted_idx,
                             rt.expert_offsets, rt.offsets_cpu])
    ok = {n: s for n, s in steps.items() if recs[n]["status"] == "ok"}
    if c.decode and device.type == "cuda" and ok:
        replays = _graph_steps(ok, n_rot, TOLERANCE[DTYPES[c.dtype]], recs)
        gtimes, gerrors = _time_all(replays, n_rot, timer)
        for name, t in gtimes.items():
            recs[name].update({"graph_" + k: v for k, v in _stats(t).items()})
        for name, why in gerrors.items():
            recs[name]["graph_error"] = why
    base = recs.get("base")
    for r in recs.values():
        if base is not None and base.get("status") == "ok" and r["status"] == "ok":
            r["ratio_to_base"] = r["median_ms"] / base["median_ms"]
            if "graph_median_ms" in r and "graph_median_ms" in base:
                r["graph_ratio_to_base"] = r["graph_median_ms"] / base["graph_median_ms"]
    if "ratio_to_base" in recs.get("base-repeat", {}):  # the base timed twice: the noise floor of this case
        base["noise_floor"] = abs(recs["base-repeat"]["ratio_to_base"] - 1.0)
    del p, oracle, steps
    _free(device)
    return list(recs.values())


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_op", description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="tiny fp32 shapes on the CPU (< 2 min): tests the harness")
    g.add_argument("--spec", action="store_true", help="GPU: the docs/spec.md §4 rows, ragged and decode cases only")
    g.add_argument("--full", action="store_true", help="the whole cross product (GPU, hours; see --time-budget)")
    ap.add_argument("--out", type=Path, help="output folder (default benchmarks/results/quick or .../gpu)")
    ap.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    ap.add_argument("--providers", help="comma-separated subset of providers (base is always included)")
    ap.add_argument("--time-budget", type=float, help="seconds; cases left when it runs out are reported as not run "
                                                      "(default: 420 for the curated GPU sweep, none otherwise)")
    ap.add_argument("--row-budget", type=float, help="seconds per case; a case past it is recorded as "
                                                     "'budget' and the next one runs (default: none)")
    ap.add_argument("--e2e-json", type=Path, help="bench_e2e.py's JSON, for the end-to-end docs/spec.md §4 row")
    ap.add_argument("--no-plot", action="store_true", help="skip bench.png")
    ap.add_argument("--rerender", action="store_true",
                    help="re-render --out's bench.md (and the SPEC verdicts) from its bench.json, e.g. with "
                         "--e2e-json after the end-to-end run; measures nothing")
    ap.add_argument("--inject-error", metavar="PROVIDER", help=argparse.SUPPRESS)  # tests: a wrong provider
    return ap.parse_args(argv)


def rerender(out: Path, e2e_json: Optional[Path]) -> int:
    """bench.md and the SPEC verdicts of ``out/bench.json`` again (with an end-to-end JSON)."""
    data = json.loads((out / "bench.json").read_text())
    e2e = json.loads(e2e_json.read_text()) if e2e_json is not None else data.get("e2e")
    results, env = data["results"], data["meta"]
    names = list(dict.fromkeys(r["provider"] for r in results))
    data.update(e2e=e2e, spec_targets=evaluate_spec(results, e2e))
    write_json(out / "bench.json", data)
    (out / "bench.md").write_text(report_md(env, data["sweep"], data["ceilings"], results, data["spec_targets"], names,
                                            e2e, True, data.get("auto_choice_candidate")))
    print(report_md(env, data["sweep"], data["ceilings"], results, data["spec_targets"], names, e2e, False,
                    data.get("auto_choice_candidate")))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rerender:
        if args.out is None or not (args.out / "bench.json").is_file():
            print("error: --rerender needs --out with a bench.json", file=sys.stderr)
            return 2
        return rerender(args.out, args.e2e_json)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        sweep, cases, budget = "quick (CPU-sized shapes, fp32)", quick_cases(), args.time_budget
        if device.type == "cpu":
            torch.set_num_threads(1)  # steadier wall-clock times on a shared CI machine
        timer = Timer(device, target_ms=10, min_reps=3, max_reps=20, warmup=1)
    else:
        if device.type != "cuda":
            print("error: the GPU sweeps need a CUDA device; on a CPU run --quick", file=sys.stderr)
            return 2
        if args.spec:
            sweep, cases = "docs/spec.md §4 rows + ragged + decode (see cases.spec_cases)", spec_cases()
        else:
            sweep = "full cross product" if args.full else "curated GPU sweep (see cases.gpu_cases)"
            cases = full_cases() if args.full else gpu_cases()
        budget = args.time_budget if args.time_budget is not None else (420.0 if not (args.full or args.spec) else None)
        timer = Timer(device, target_ms=100, min_reps=10, max_reps=200, warmup=3)
    providers = all_providers()
    if args.providers:
        want = {"base", "base-repeat", *args.providers.split(",")}
        unknown = want - {p.name for p in providers}
        if unknown:
            print(f"error: unknown providers {sorted(unknown)}; known: {[p.name for p in providers]}", file=sys.stderr)
            return 2
        providers = [p for p in providers if p.name in want]
    if args.inject_error and args.inject_error not in {p.name for p in providers}:
        print(f"error: --inject-error {args.inject_error}: not a selected provider", file=sys.stderr)
        return 2
    if args.e2e_json is not None and not args.e2e_json.is_file():
        print(f"error: --e2e-json {args.e2e_json}: no such file", file=sys.stderr)
        return 2
    out = args.out or REPO_ROOT / "benchmarks" / "results" / ("quick" if args.quick else "gpu")
    names = [p.name for p in providers]

    env = environment(device)
    ceilings = device_ceilings(device, timer)
    e2e = json.loads(args.e2e_json.read_text()) if args.e2e_json is not None else None
    t0 = time.monotonic()
    results: list[dict] = []

    def save_json() -> tuple[list[dict], dict]:  # after every case too, so a killed run leaves its numbers
        spec, auto = evaluate_spec(results, e2e), auto_choice_candidate(results, env)
        write_json(out / "bench.json", {"meta": env, "sweep": sweep, "time_budget_s": budget, "ceilings": ceilings,
                                        "elapsed_s": time.monotonic() - t0, "spec_targets": spec, "e2e": e2e,
                                        "auto_choice_candidate": auto, "results": results})
        return spec, auto

    for i, c in enumerate(cases):
        if budget is not None and time.monotonic() - t0 > budget:
            results += [{"label": c.label, "case": asdict(c), "provider": n, "status": "budget"} for n in names]
            continue
        try:
            with row_budget(args.row_budget):
                recs = run_case(c, providers, device, timer, args.inject_error)
        except RowTimeout as e:  # this row only: the next one gets its own budget
            recs = [{"label": c.label, "case": asdict(c), "provider": n, "status": "budget", "reason": str(e)}
                    for n in names]
            _free(device)
        results += recs
        save_json()
        cells = " ".join(f"{r['provider']}={cell(r)}" for r in recs if r["status"] != "skipped")
        print(f"[{i + 1}/{len(cases)} {time.monotonic() - t0:.0f}s] {c.label}: {cells}", file=sys.stderr, flush=True)

    spec, auto = save_json()
    (out / "bench.md").write_text(report_md(env, sweep, ceilings, results, spec, names, e2e, True, auto))
    if not args.no_plot:
        plot(results, env, out / "bench.png")
    print(report_md(env, sweep, ceilings, results, spec, names, e2e, False, auto))
    bad = [r for r in results if r["status"] in ("FAIL", "error")]
    for r in bad:
        print(f"{r['status']}: {r['provider']} on {r['label']}: {r.get('reason', '')}", file=sys.stderr)
    print(f"wrote {out}/bench.md, bench.json{'' if args.no_plot else ', bench.png'}; "
          f"{len(bad)} failed of {sum(r['status'] != 'skipped' for r in results)} measurements", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
