"""Reports of the op microbenchmark: the docs/spec.md §4 verdicts, the markdown tables, the plot and a
candidate for the ``auto`` backend table (``moecl_kernels/backends/auto_choice.json``)."""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

from .cases import FUSED, MODES, ROUTINGS, SPEC_TARGETS, saved_bound_bytes
from .common import fmt, md_table

# benchmark provider -> the registered backend ``auto`` would run for it (the default expand)
AUTO_NAMES = {"triton-addmm": "triton", "cuda": "cuda", "eager": "eager"}


def default_provider() -> str:
    """The benchmark provider of what ``backend="triton"`` runs here (``$MOECL_TRITON_VARIANT`` /
    ``$MOECL_TRITON_EXPAND``, else ``addmm``)."""
    try:
        from moecl_kernels.backends.triton import TritonBackend

        return "triton-" + TritonBackend().variant
    except Exception:  # no Triton: the report still renders
        return "triton-addmm"


def evaluate_spec(results: list[dict], e2e: Optional[dict], default: Optional[str] = None) -> list[dict]:
    """One row per docs/spec.md §4 target: what was measured and whether the target is met -- judged
    on the default path (``default``: the provider of what ``backend="triton"`` runs), with the best
    fused variant and the base's noise floor (the base timed twice) beside it. The decode row is
    judged on the eager call (what a user gets without graphs); when only the CUDA-graph replay
    meets it, it says so."""
    default = default or default_provider()
    by = {(r["label"], r["provider"]): r for r in results}
    rows = []
    for t in SPEC_TARGETS:
        row = {"key": t.key, "case": t.label, "target": t.target, "eager": None, "fused": None, "fused_provider": None,
               "status": "not run"}
        if t.key == "e2e":
            if e2e and e2e["meta"]["device_type"] != "cuda":
                row["status"] = "not run: CPU harness test"
            elif e2e and e2e["fused_backend"] not in FUSED + ("triton",):
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
        base = by.get((label, "base"), {})
        if base.get("noise_floor") is not None:
            row["noise"] = base["noise_floor"]
        fused = [by[(label, n)] for n in FUSED if by.get((label, n), {}).get(key) is not None]
        dflt = by.get((label, default), {})
        bound = saved_bound_bytes(t.case.T, t.case.r) if t.key == "saved" else t.max_ratio
        if fused:  # the best variant, reported beside the default path
            best = min(fused, key=lambda r: r[key])
            row.update(best=best[key], best_provider=best["provider"], bound=bound)
        if dflt.get(key) is not None:  # judged on the default path
            row.update(fused=dflt[key], fused_provider=default)
            row["status"] = "met" if dflt[key] <= bound else "not met"
            if dflt.get("graph_ratio_to_base") is not None:
                row["fused_graph"] = dflt["graph_ratio_to_base"]
                if row["status"] == "not met" and row["fused_graph"] <= bound:
                    row["status"] = "met with CUDA graphs only"
            graphed = [r for r in fused if r.get("graph_ratio_to_base") is not None]
            if graphed:
                g = min(graphed, key=lambda r: r["graph_ratio_to_base"])
                row.update(best_graph=g["graph_ratio_to_base"], best_graph_provider=g["provider"])
            if row["status"] == "not met" and min(best[key], row.get("best_graph", best[key])) <= bound:
                row["status"] = "not met on the default path (a variant meets it)"
        elif fused:
            row["status"] = f"not measured on the default path ({default}: {dflt.get('reason', dflt.get('status'))})"
        elif any((label, n) in by for n in FUSED):
            row["status"] = "not measured: " + "; ".join(
                f"{n}: {by[(label, n)].get('reason', by[(label, n)]['status'])}" for n in FUSED if (label, n) in by)
        rows.append(row)
    return rows


def spec_md(spec: list[dict]) -> str:
    def val(row, k):
        v = row.get(k)
        if v is None:
            return "–"
        if row["key"] == "saved":
            return f"{v / 2**20:.2f} MiB"
        return f"{v:.3f}×"

    body = []
    for r in spec:
        fused = val(r, "fused") + (f" ({r['fused_provider']})" if r["fused_provider"] else "")
        if r.get("fused_graph") is not None:
            fused += f"; graph-replayed {val(r, 'fused_graph')}"
        best = "–"
        if r.get("best_provider"):
            best = f"{val(r, 'best')} ({r['best_provider']})"
            if r.get("best_graph") is not None:
                best += f"; graph-replayed {val(r, 'best_graph')} ({r['best_graph_provider']})"
        if r["key"] == "e2e":
            cells = [f"fused / eager {val(r, 'eager')}", f"fused / PEFT {fused}"]
        else:
            cells = [val(r, "eager"), fused]
        if r["key"] == "saved" and r.get("bound") is not None:
            cells[1] += f" (bound {r['bound'] / 2**20:.2f} MiB beyond x)"
        noise = f"±{r['noise']:.3f}" if r.get("noise") is not None else "–"
        body.append([r["case"], r["target"], *cells, best, noise, r["status"]])
    return md_table(["case", "target", "eager", "default path (backend)", "best variant", "noise (base twice)",
                     "status"], body)


def cell(r: dict) -> str:
    def ok() -> str:
        s = f"{r['ratio_to_base']:.2f}×" if "ratio_to_base" in r else f"{r['median_ms']:.3g} ms"
        if r.get("graph_ratio_to_base") is not None:
            s += f" (graph {r['graph_ratio_to_base']:.2f}×)"
        return s

    return {"ok": ok, "FAIL": lambda: "**FAIL**", "error": lambda: "**error**", "budget": lambda: "(budget)"}.get(
        r["status"], lambda: "–")()


def summary_md(results: list[dict], providers: list[str]) -> str:
    labels = list(dict.fromkeys(r["label"] for r in results))
    by = {(r["label"], r["provider"]): r for r in results}
    shown = [n for n in providers if n != "base" and any(by.get((lb, n), {}).get("status", "skipped") != "skipped"
                                                          for lb in labels)]
    rows = []
    for lb in labels:
        b = by.get((lb, "base"), {})
        base = fmt(b.get("median_ms"), ".4g") + (f" (graph {b['graph_median_ms']:.4g})" if "graph_median_ms" in b
                                                 else "")
        rows.append([lb, base, *[cell(by[(lb, n)]) if (lb, n) in by else "–" for n in shown]])
    return md_table(["case", "base ms", *shown], rows)


def detail_md(results: list[dict]) -> str:
    rows = []
    for r in results:
        if r["status"] in ("skipped", "budget"):
            continue
        saved = r.get("saved_extra_bytes")
        rows.append([r["label"], r["provider"], r["status"], f"{fmt(r.get('max_err'), '.2e')} / {r.get('tol', '')}",
                     fmt(r.get("median_ms"), ".4g"), fmt(r.get("ratio_to_base"), ".3f"),
                     fmt(r.get("graph_median_ms"), ".4g") if "graph_error" not in r else "err",
                     fmt(r.get("graph_ratio_to_base"), ".3f"), fmt(r.get("tflops"), ".3g"),
                     fmt(r.get("gbps"), ".3g"), fmt(r.get("peak_mb"), ".1f", "n/a"),
                     fmt(saved / 2**20 if saved is not None else None, ".2f"), r.get("reps", "")])
    return md_table(["case", "provider", "status", "max err / tol", "median ms", "× base", "graph ms", "graph × base",
                     "TFLOP/s", "GB/s", "peak MiB", "saved MiB", "reps"], rows)


def skips_md(results: list[dict]) -> str:
    reasons = Counter((r["provider"], r.get("reason", "")) for r in results if r["status"] == "skipped")
    lines = [f"- {n}: {why} ({k} cases)" for (n, why), k in sorted(reasons.items())]
    lines += [f"- {r['provider']} on {r['label']}: graph capture failed: {r['graph_error']}"
              for r in results if r.get("graph_error")]
    budget = len({r["label"] for r in results if r["status"] == "budget"})
    if budget:
        lines.append(f"- {budget} cases not run: time budget exhausted")
    return "\n".join(lines) or "- none"


def auto_choice_candidate(results: list[dict], env: dict) -> dict:
    """What ``moecl_kernels/backends/auto_choice.json`` would say after this run, for this GPU:
    per case bucket (``bf16/decode``, ``bf16/large``), the registered backends by their median
    ratio to base over the bucket's cases measured for all of them (graph-replayed for decode,
    where measured). A candidate to review and commit, not applied automatically."""
    if env.get("device_type") != "cuda":
        return {}
    per_case: dict = defaultdict(dict)
    for r in results:
        name = AUTO_NAMES.get(r["provider"])
        if name is None or r["status"] != "ok" or "ratio_to_base" not in r:
            continue
        c = r["case"]
        bucket = f"{c['dtype']}/{'decode' if c['T'] <= 64 else 'large'}"
        per_case[(bucket, r["label"])][name] = r.get("graph_ratio_to_base") or r["ratio_to_base"]
    buckets: dict = defaultdict(lambda: defaultdict(list))
    names = set().union(*per_case.values()) if per_case else set()
    for (bucket, _), ratios in per_case.items():
        if set(ratios) == names:  # only cases every backend ran: like for like
            for n, v in ratios.items():
                buckets[bucket][n].append(v)
    arch = "sm_" + env.get("capability", "").replace(".", "")
    return {arch: {b: sorted(v, key=lambda n: statistics.median(v[n])) for b, v in buckets.items()}} if buckets else {}


def header_md(env: dict, sweep: str, ceilings: dict) -> str:
    lines = [f"- device: **{env['device']}**; timer: {env['timer']}; peak memory: {env['peak_memory']}",
             f"- torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, peft {env['peft']}, "
             f"transformers {env['transformers']}; commit `{env['git_commit']}`; {env['date_utc']}",
             f"- sweep: {sweep}; providers timed round-robin, the order reversed every round; decode rows "
             "(T <= 64, fwd) also as CUDA-graph replays (graph columns)"]
    if ceilings:
        lines.append(f"- measured ceilings: copy {ceilings['copy_GBps']} GB/s, "
                     f"bf16 matmul {ceilings['bf16_matmul_TFLOPs']} TFLOP/s")
    if env["device_type"] != "cuda":
        lines.append("- **CPU run: wall-clock times of tiny shapes that test the harness; they are not GPU numbers "
                     "and say nothing about the kernels' speed.**")
    return "\n".join(lines)


def report_md(env: dict, sweep: str, ceilings: dict, results: list[dict], spec: list[dict], providers: list[str],
              e2e: Optional[dict], details: bool, auto_candidate: Optional[dict] = None) -> str:
    parts = ["# moecl-kernels op microbenchmark", header_md(env, sweep, ceilings),
             "## docs/spec.md §4 targets", spec_md(spec),
             "## Median time relative to base F.linear (same case, same run)",
             summary_md(results, providers), "## Not run", skips_md(results)]
    if auto_candidate:
        parts += ["## Candidate for `moecl_kernels/backends/auto_choice.json` (`measured`)",
                  "```json\n" + json.dumps(auto_candidate, indent=1) + "\n```"]
    if e2e is not None:
        from .bench_e2e import report_md as e2e_md

        parts.append(e2e_md(e2e).replace("# ", "## ", 1).strip())
    if details:
        parts += ["## Every measurement", detail_md(results)]
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
