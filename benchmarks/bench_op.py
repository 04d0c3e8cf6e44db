"""Op microbenchmark of the fused MoE-LoRA linear: every provider against the base ``F.linear``.

    python -m benchmarks.bench_op --quick            # CPU, tiny shapes: tests the harness (CI)
    python -m benchmarks.bench_op                    # GPU: docs/spec.md §4 rows + the curated sweep (420 s budget)
    python -m benchmarks.bench_op --full             # GPU: the whole cross product (hours)

Each case (mode, d_in, d_out, r, E, T, routing, dtype) builds several rotation sets of
random inputs, then for every provider: check against the float64 oracle
(``moe_lora_reference``) on a subset of rows (forward) and with an upstream gradient
supported on those rows (backward: every weight gradient and dx, which must vanish
elsewhere); only a provider that passes is timed. Timing: see ``common.Timer``. Ratios
are to the base provider of the same case, measured in the same run.

Outputs (``--out``): ``bench.md`` (tables), ``bench.json`` (environment, every raw
repetition time, every check error), ``bench.png`` (ratio to base vs T per provider).
The exit status is 1 when any provider failed its check or raised.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from moecl_kernels.ops import moe_lora_reference
from moecl_kernels.routing import build_routing

from .common import (DTYPES, REPO_ROOT, TOLERANCE, Timer, device_ceilings, environment, fmt, l2_bytes, md_table,
                     peak_memory_mb, rel_err, saved_activation_bytes, write_json)
from .providers import InputSet, Problem, Provider, all_providers

MODES = ("fwd", "fwd+bwd")
ROUTINGS = ("one", "mixed", "zipf", "partial")
MAX_SEQS = 64          # tokens are B = gcd(T, 64) sequences of T // B tokens; task ids are per sequence
NO_TASK_EVERY = 4      # "partial": every 4th sequence has no task
ZIPF_S = 1.2           # "zipf": P(task k) ~ 1 / (k + 1)^s


@dataclass(frozen=True)
class Case:
    mode: str       # "fwd" (no autograd) or "fwd+bwd" (dx and every LoRA/gate gradient; W frozen)
    d_in: int
    d_out: int
    r: int
    E: int
    T: int
    routing: str    # one | mixed (uniform) | zipf (skewed) | partial (25% of sequences without a task)
    dtype: str = "bf16"

    @property
    def label(self) -> str:
        return f"{self.mode} {self.d_in}x{self.d_out} r{self.r} E{self.E} T{self.T} {self.routing} {self.dtype}"


@dataclass(frozen=True)
class SpecTarget:
    key: str
    label: str
    target: str
    case: Optional[Case]
    max_ratio: Optional[float] = None


_S = dict(d_in=4096, d_out=4096, r=16, E=8)
SPEC_TARGETS = (
    SpecTarget("fwd_one", "forward, T = 8192, one task", "≤ 1.08 × base",
               Case("fwd", T=8192, routing="one", **_S), 1.08),
    SpecTarget("fwd_mixed", "forward, T = 8192, 8 tasks mixed", "≤ 1.10 × base",
               Case("fwd", T=8192, routing="mixed", **_S), 1.10),
    SpecTarget("fwd_bwd", "fwd + bwd (dx and LoRA grads), T = 8192, one task", "≤ 1.15 × base (fwd + dgrad)",
               Case("fwd+bwd", T=8192, routing="one", **_S), 1.15),
    SpecTarget("decode", "decode, T = 16, 8 tasks mixed", "≤ 1.3 × base",
               Case("fwd", T=16, routing="mixed", **_S), 1.3),
    SpecTarget("saved", "saved activations per layer (fwd + bwd case above)", "x (shared with base) + O(T·r)",
               Case("fwd+bwd", T=8192, routing="one", **_S)),
    SpecTarget("e2e", "end-to-end MoE-CL train step, Llama-style 1B, all FFN linears",
               "≥ 1.5 × eager tokens/s; ≥ 0.9 × PEFT single-LoRA", None),
)
FUSED = ("triton", "cuda")


def saved_bound_bytes(T: int, r: int) -> int:
    """The "O(T·r)" of docs/spec.md §4 made concrete: 16·T·(r + 2) bytes beyond x, i.e. two fp32 [T, r]
    intermediates, fp32 [T, 2] gates and int32 slack (T×d_out bf16 is 4096/(r+2)× more at d=4096)."""
    return 16 * T * (r + 2)


# --------------------------------------------------------------------------------------------
# sweeps


def _routings(E: int) -> tuple[str, ...]:
    return ("one", "partial") if E == 1 else ROUTINGS


def quick_cases() -> list[Case]:
    """Tiny fp32 CPU shapes exercising every mode, routing and provider path (d_in != d_out both ways)."""
    cases = [Case(m, 64, 96, 8, 4, T, rt, "fp32") for m in MODES for T in (1, 16, 128) for rt in ROUTINGS]
    cases += [Case(m, 96, 64, 4, 1, 32, rt, "fp32") for m in MODES for rt in _routings(1)]
    return cases


def gpu_cases() -> list[Case]:
    """The curated GPU sweep (57 cases, bf16, budgeted at 420 s), around the SPEC shape d=4096 r=16 E=8:

    1. the docs/spec.md §4 rows;
    2. T scan 1..16384 for every routing, forward; fwd+bwd for one-task and mixed batches;
    3. d_in/d_out in {2048, 4096, 8192} (square and both non-square FFN directions) at decode
       (T=16) and prefill/training (T=4096) sizes;
    4. r in {8, 64} and E in {1, 32} at the same two sizes.
    Each axis is varied alone from the SPEC shape; ``--full`` runs the cross product.
    """
    S = dict(d_in=4096, d_out=4096, r=16, E=8)
    cases = [t.case for t in SPEC_TARGETS if t.case is not None]
    cases += [Case("fwd", T=T, routing=rt, **S) for T in (1, 16, 512, 4096, 16384) for rt in ROUTINGS]
    cases += [Case("fwd+bwd", T=T, routing=rt, **S) for T in (16, 512, 4096, 16384) for rt in ("one", "mixed")]
    cases.append(Case("fwd+bwd", T=8192, routing="mixed", **S))
    for d_in, d_out in ((2048, 2048), (8192, 8192), (4096, 8192), (8192, 4096)):
        shape = dict(S, d_in=d_in, d_out=d_out)
        cases += [Case("fwd", T=T, routing="mixed", **shape) for T in (16, 4096)]
        cases.append(Case("fwd+bwd", T=4096, routing="one", **shape))
    for r in (8, 64):
        cases += [Case("fwd", T=T, routing="mixed", **dict(S, r=r)) for T in (16, 4096)]
        cases.append(Case("fwd+bwd", T=4096, routing="one", **dict(S, r=r)))
    cases += [Case("fwd", T=T, routing="one", **dict(S, E=1)) for T in (16, 4096)]
    cases += [Case("fwd", T=T, routing=rt, **dict(S, E=32)) for T in (16, 4096) for rt in ("mixed", "zipf")]
    cases.append(Case("fwd+bwd", T=4096, routing="mixed", **dict(S, E=32)))
    return list(dict.fromkeys(cases))


def full_cases() -> list[Case]:
    """The issue's whole cross product, SPEC rows first."""
    ds = (2048, 4096, 8192)
    cases = [t.case for t in SPEC_TARGETS if t.case is not None]
    cases += [Case(m, di, do, r, E, T, rt) for m in MODES for di in ds for do in ds for r in (8, 16, 64)
              for E in (1, 8, 32) for T in (1, 16, 512, 4096, 16384) for rt in _routings(E)]
    return list(dict.fromkeys(cases))


# --------------------------------------------------------------------------------------------
# problems and the oracle


def sequence_tasks(routing: str, B: int, E: int, g: torch.Generator) -> list[int]:
    if routing == "one":
        return [E - 1] * B  # the last expert, so a kernel that ignores routing is caught
    if routing in ("mixed", "partial"):
        t = torch.arange(B) % E
        t = t[torch.randperm(B, generator=g)]
        if routing == "partial":
            t[::NO_TASK_EVERY] = -1
        return t.tolist()
    if routing == "zipf":
        w = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** ZIPF_S
        return torch.multinomial(w, B, replacement=True, generator=g).tolist()
    raise ValueError(f"unknown routing {routing!r}; choose from {ROUTINGS}")


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
    B = math.gcd(c.T, MAX_SEQS)
    seq = sequence_tasks(c.routing, B, c.E, torch.Generator().manual_seed(seed))
    routing = build_routing(torch.tensor(seq), c.E, c.T, device=device)
    alpha = 2.0 * c.r
    return Problem(sets=sets, routing=routing, seq_tasks=seq, scale=alpha / c.r, alpha=alpha, backward=grad,
                   device=device)


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


def measure(prov: Provider, p: Problem, oracle: Oracle, c: Case, timer: Timer, inject: bool) -> dict:
    bounds = prov.bind_all(p)
    if inject:
        bounds = [_inject(b) for b in bounds]
    errs = check_provider(prov, bounds[0], p, oracle)
    tol = TOLERANCE[DTYPES[c.dtype]]
    worst = max(errs.values())
    rec = {"errors": errs, "max_err": worst, "tol": tol}
    if not worst <= tol:
        return dict(rec, status="FAIL", reason=f"max error {worst:.3g} > tolerance {tol:g}: "
                    + ", ".join(f"{k}={v:.3g}" for k, v in errs.items()))

    if p.backward:
        def step(i):
            b = bounds[i]
            return torch.autograd.grad(b.forward(), list(b.targets.values()), p.sets[i].grad_y, allow_unused=True)
    else:
        def step(i):
            with torch.no_grad():
                return bounds[i].forward()

    times = timer(step, len(bounds))
    med = statistics.median(times)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [med] * 9
    off = [int(v) for v in p.routing.offsets_cpu.tolist()]
    n_active = sum(1 for a, b in zip(off[:-1], off[1:]) if b > a)
    rec.update(status="ok", times_ms=times, median_ms=med, p10_ms=q[0], p90_ms=q[-1], reps=len(times),
               tflops=op_flops(c, prov.semantics, off[-1]) / med / 1e9,
               gbps=op_bytes(c, prov.semantics, n_active) / med / 1e6,
               peak_mb=peak_memory_mb(step, p.device))
    if p.backward:
        rt = p.routing
        rec["saved_extra_bytes"] = saved_activation_bytes(
            bounds[0].forward, [*p.sets[0].tensors(), *bounds[0].targets.values(), rt.token_task, rt.sorted_idx,
                                rt.expert_offsets, rt.offsets_cpu])
    return rec


def _free(device: torch.device) -> None:
    """Return cached GPU memory between cases and after an error (a no-op on the CPU)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def run_case(c: Case, providers: list[Provider], device: torch.device, timer: Timer,
             inject: Optional[str] = None) -> list[dict]:
    """Check and time every provider on one case; ratios to the case's base."""
    n_rot = rotation_count(c, device)
    p = make_problem(c, device, n_rot)
    per_row = 32 * c.r * (c.d_in + c.d_out)  # float64 oracle bytes per checked row, with grads
    oracle = Oracle(p, check_rows(p, max(16, min(128, 2**30 // per_row))))
    records = []
    for prov in providers:
        rec = {"label": c.label, "case": asdict(c), "provider": prov.name, "semantics": prov.semantics,
               "n_rot": n_rot}
        reason = prov.skip_reason(p)
        if reason is not None:
            rec.update(status="skipped", reason=reason)
        else:
            try:
                rec.update(measure(prov, p, oracle, c, timer, inject == prov.name))
            except Exception as e:  # out of memory, unsupported shape in a backend, ...: recorded, run goes on
                rec.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                _free(device)
        records.append(rec)
    base = next((r for r in records if r["provider"] == "base" and r["status"] == "ok"), None)
    for r in records:
        if base is not None and r["status"] == "ok":
            r["ratio_to_base"] = r["median_ms"] / base["median_ms"]
    del p, oracle
    _free(device)
    return records


# --------------------------------------------------------------------------------------------
# reports


def evaluate_spec(results: list[dict], e2e: Optional[dict]) -> list[dict]:
    """One row per docs/spec.md §4 target: what was measured and whether the target is met."""
    by = {(r["label"], r["provider"]): r for r in results}
    rows = []
    for t in SPEC_TARGETS:
        row = {"key": t.key, "case": t.label, "target": t.target, "eager": None, "fused": None, "fused_provider": None,
               "status": "not run"}
        if t.key == "e2e":
            if e2e and e2e["meta"]["device_type"] != "cuda":
                row["status"] = "not run: CPU harness test"
            elif e2e and e2e["fused_backend"] not in FUSED:
                row["status"] = f"not measured: fused resolved to {e2e['fused_backend']}"
            elif e2e and e2e.get("ratios"):
                rt = e2e["ratios"]
                row.update(eager=rt["fused_vs_eager"], fused=rt["fused_vs_peft"], fused_provider=e2e["fused_backend"])
                row["status"] = "met" if row["eager"] >= 1.5 and row["fused"] >= 0.9 else "not met"
            elif e2e:
                row["status"] = "not measured: a backend failed its check"
            rows.append(row)
            continue
        label = t.case.label
        key = "saved_extra_bytes" if t.key == "saved" else "ratio_to_base"
        eager = by.get((label, "eager"))
        if eager is not None:
            row["eager"] = eager.get(key)
        fused = [by[(label, n)] for n in FUSED if by.get((label, n), {}).get(key) is not None]
        if fused:
            best = min(fused, key=lambda r: r[key])
            row.update(fused=best[key], fused_provider=best["provider"])
            bound = saved_bound_bytes(t.case.T, t.case.r) if t.key == "saved" else t.max_ratio
            row["bound"] = bound
            row["status"] = "met" if best[key] <= bound else "not met"
        elif any((label, n) in by for n in FUSED):
            row["status"] = "not measured: " + "; ".join(
                f"{n}: {by[(label, n)].get('reason', by[(label, n)]['status'])}" for n in FUSED if (label, n) in by)
        rows.append(row)
    return rows


def _spec_md(spec: list[dict]) -> str:
    def val(row, k):
        v = row[k]
        if v is None:
            return "–"
        if row["key"] == "saved":
            return f"{v / 2**20:.2f} MiB"
        return f"{v:.3f}×"

    body = []
    for r in spec:
        cols = ("fused / eager", "fused / PEFT") if r["key"] == "e2e" else ("eager", "best fused")
        fused = val(r, "fused") + (f" ({r['fused_provider']})" if r["fused_provider"] else "")
        if r["key"] == "e2e":
            cells = [f"{cols[0]} {val(r, 'eager')}", f"{cols[1]} {fused}"]
        else:
            cells = [val(r, "eager"), fused]
        if r["key"] == "saved" and r.get("bound") is not None:
            cells[1] += f" (bound {r['bound'] / 2**20:.2f} MiB beyond x)"
        body.append([r["case"], r["target"], *cells, r["status"]])
    return md_table(["case", "target", "eager", "fused (backend)", "status"], body)


def _cell(r: dict) -> str:
    return {"ok": lambda: f"{r['ratio_to_base']:.2f}×" if "ratio_to_base" in r else f"{r['median_ms']:.3g} ms",
            "FAIL": lambda: "**FAIL**", "error": lambda: "**error**", "budget": lambda: "(budget)"}.get(
        r["status"], lambda: "–")()


def _summary_md(results: list[dict], providers: list[str]) -> str:
    labels = list(dict.fromkeys(r["label"] for r in results))
    by = {(r["label"], r["provider"]): r for r in results}
    shown = [n for n in providers if n != "base" and any(by.get((lb, n), {}).get("status", "skipped") != "skipped"
                                                          for lb in labels)]
    rows = []
    for lb in labels:
        b = by.get((lb, "base"), {})
        rows.append([lb, fmt(b.get("median_ms"), ".4g"), *[_cell(by[(lb, n)]) if (lb, n) in by else "–"
                                                           for n in shown]])
    return md_table(["case", "base ms", *shown], rows)


def _detail_md(results: list[dict]) -> str:
    rows = []
    for r in results:
        if r["status"] in ("skipped", "budget"):
            continue
        saved = r.get("saved_extra_bytes")
        rows.append([r["label"], r["provider"], r["status"], f"{fmt(r.get('max_err'), '.2e')} / {r.get('tol', '')}",
                     fmt(r.get("median_ms"), ".4g"), fmt(r.get("ratio_to_base"), ".3f"), fmt(r.get("tflops"), ".3g"),
                     fmt(r.get("gbps"), ".3g"), fmt(r.get("peak_mb"), ".1f", "n/a"),
                     fmt(saved / 2**20 if saved is not None else None, ".2f"), r.get("reps", "")])
    return md_table(["case", "provider", "status", "max err / tol", "median ms", "× base", "TFLOP/s", "GB/s",
                     "peak MiB", "saved MiB", "reps"], rows)


def _skips_md(results: list[dict]) -> str:
    reasons = Counter((r["provider"], r.get("reason", "")) for r in results if r["status"] == "skipped")
    lines = [f"- {n}: {why} ({k} cases)" for (n, why), k in sorted(reasons.items())]
    budget = len({r["label"] for r in results if r["status"] == "budget"})
    if budget:
        lines.append(f"- {budget} cases not run: time budget exhausted")
    return "\n".join(lines) or "- none"


def header_md(env: dict, sweep: str, ceilings: dict) -> str:
    lines = [f"- device: **{env['device']}**; timer: {env['timer']}; peak memory: {env['peak_memory']}",
             f"- torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, peft {env['peft']}, "
             f"transformers {env['transformers']}; commit `{env['git_commit']}`; {env['date_utc']}",
             f"- sweep: {sweep}"]
    if ceilings:
        lines.append(f"- measured ceilings: copy {ceilings['copy_GBps']} GB/s, "
                     f"bf16 matmul {ceilings['bf16_matmul_TFLOPs']} TFLOP/s")
    if env["device_type"] != "cuda":
        lines.append("- **CPU run: wall-clock times of tiny shapes that test the harness; they are not GPU numbers "
                     "and say nothing about the kernels' speed.**")
    return "\n".join(lines)


def report_md(env: dict, sweep: str, ceilings: dict, results: list[dict], spec: list[dict], providers: list[str],
              e2e: Optional[dict], details: bool) -> str:
    parts = ["# moecl-kernels op microbenchmark", header_md(env, sweep, ceilings),
             "## docs/spec.md §4 targets", _spec_md(spec),
             "## Median time relative to base F.linear (same case, same run)",
             _summary_md(results, providers), "## Not run", _skips_md(results)]
    if e2e is not None:
        from .bench_e2e import report_md as e2e_md

        parts.append(e2e_md(e2e).replace("# ", "## ", 1).strip())
    if details:
        parts += ["## Every measurement", _detail_md(results)]
    return "\n\n".join(parts) + "\n"


def plot(results: list[dict], env: dict, path: Path) -> None:
    """Ratio to base vs T per provider for the most-measured shape: one panel per mode x routing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok" and "ratio_to_base" in r]
    shape_of = lambda r: tuple(r["case"][k] for k in ("d_in", "d_out", "r", "E", "dtype"))  # noqa: E731
    shapes = Counter(shape_of(r) for r in ok)
    modes = [m for m in MODES if any(r["case"]["mode"] == m for r in ok)]
    routings = [rt for rt in ROUTINGS if any(r["case"]["routing"] == rt for r in ok)]
    fig, axes = plt.subplots(max(1, len(modes)), max(1, len(routings)), squeeze=False,
                             figsize=(4 * max(1, len(routings)), 3.4 * max(1, len(modes))), sharex=True)
    if shapes:
        shape = shapes.most_common(1)[0][0]
        d_in, d_out, r, E, dt = shape
        fig.suptitle(f"{env['device']}: time / base F.linear vs T  (d_in={d_in} d_out={d_out} r={r} E={E} {dt})"
                     + ("\nCPU run: harness test, not GPU numbers" if env["device_type"] != "cuda" else ""))
        names = list(dict.fromkeys(r["provider"] for r in ok if r["provider"] != "base"))
        for i, m in enumerate(modes):
            for j, rt in enumerate(routings):
                ax = axes[i][j]
                for n in names:
                    pts = sorted((x["case"]["T"], x["ratio_to_base"]) for x in ok if shape_of(x) == shape
                                 and x["provider"] == n and x["case"]["mode"] == m and x["case"]["routing"] == rt)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=n)
                ax.axhline(1.0, color="k", lw=0.8, ls="--")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"{m}, {rt}")
                ax.set_xlabel("T (tokens)")
                ax.set_ylabel("× base")
                ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        for row in axes:
            for ax in row:
                for h, lb in zip(*ax.get_legend_handles_labels()):
                    if lb not in labels:
                        handles.append(h)
                        labels.append(lb)
        fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), frameon=False)
        fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    else:
        axes[0][0].text(0.5, 0.5, "no successful measurement", ha="center", va="center")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_op", description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="tiny fp32 shapes on the CPU (< 2 min): tests the harness")
    g.add_argument("--full", action="store_true", help="the whole cross product (GPU, hours; see --time-budget)")
    ap.add_argument("--out", type=Path, help="output folder (default benchmarks/results/quick or .../gpu)")
    ap.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    ap.add_argument("--providers", help="comma-separated subset of providers (base is always included)")
    ap.add_argument("--time-budget", type=float, help="seconds; cases left when it runs out are reported as not run "
                                                      "(default: 420 for the curated GPU sweep, none otherwise)")
    ap.add_argument("--e2e-json", type=Path, help="bench_e2e.py's JSON, for the end-to-end docs/spec.md §4 row")
    ap.add_argument("--inject-error", metavar="PROVIDER", help=argparse.SUPPRESS)  # tests: a wrong provider
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        sweep, cases, budget = "quick (CPU-sized shapes, fp32)", quick_cases(), args.time_budget
        if device.type == "cpu":
            torch.set_num_threads(1)  # steadier wall-clock times on a shared CI machine
        timer = Timer(device, target_ms=10, min_reps=3, max_reps=20, warmup=1)
    else:
        if device.type != "cuda":
            print("error: the GPU sweep needs a CUDA device; on a CPU run --quick", file=sys.stderr)
            return 2
        sweep = "full cross product" if args.full else "curated GPU sweep (see gpu_cases)"
        cases = full_cases() if args.full else gpu_cases()
        budget = args.time_budget if args.time_budget is not None else (None if args.full else 420.0)
        timer = Timer(device, target_ms=100, min_reps=10, max_reps=200, warmup=3)
    providers = all_providers()
    if args.providers:
        want = {"base", *args.providers.split(",")}
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

    def save_json() -> list[dict]:  # after every case too, so a killed run leaves its numbers
        spec = evaluate_spec(results, e2e)
        write_json(out / "bench.json", {"meta": env, "sweep": sweep, "time_budget_s": budget, "ceilings": ceilings,
                                        "elapsed_s": time.monotonic() - t0, "spec_targets": spec, "e2e": e2e,
                                        "results": results})
        return spec

    for i, c in enumerate(cases):
        if budget is not None and time.monotonic() - t0 > budget:
            results += [{"label": c.label, "case": asdict(c), "provider": n, "status": "budget"} for n in names]
            continue
        recs = run_case(c, providers, device, timer, args.inject_error)
        results += recs
        save_json()
        cells = " ".join(f"{r['provider']}={_cell(r)}" for r in recs if r["status"] != "skipped")
        print(f"[{i + 1}/{len(cases)} {time.monotonic() - t0:.0f}s] {c.label}: {cells}", file=sys.stderr, flush=True)

    spec = save_json()
    (out / "bench.md").write_text(report_md(env, sweep, ceilings, results, spec, names, e2e, details=True))
    plot(results, env, out / "bench.png")
    print(report_md(env, sweep, ceilings, results, spec, names, e2e, details=False))
    bad = [r for r in results if r["status"] in ("FAIL", "error")]
    for r in bad:
        print(f"{r['status']}: {r['provider']} on {r['label']}: {r.get('reason', '')}", file=sys.stderr)
    print(f"wrote {out / 'bench.md'}, {out / 'bench.json'}, {out / 'bench.png'}; "
          f"{len(bad)} failed of {sum(r['status'] != 'skipped' for r in results)} measurements", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
