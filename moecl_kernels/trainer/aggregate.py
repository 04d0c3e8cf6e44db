"""Mean ± std over seeds of several runs' comparisons (one run directory per seed), and every
method compared with a reference on paired seeds.

    python -m moecl_kernels.trainer.aggregate runs/rt-s0 runs/rt-s1 runs/rt-s2 [--ref isolated_lora_rm] [--out table.md]

Reads ``comparison.json`` and each method's ``report.json`` of every run directory; a
method missing from a run is left out of that run (a method with the same seed in two runs
is an error: the pairing is by seed). The reference (``--ref``; default the rank-matched
isolated LoRA, ``isolated_lora_rm``, where it ran, else ``isolated_lora``) is compared with
each method on the seeds both ran only: the paired mean difference of ACC and of LA (= the
transfer gain against the reference) with its std and n, and on how many of those seeds the
method's ACC is at least the reference's. The "bar" column (docs/spec.md §6) uses the paired
comparison: mean paired ACC difference >= 0, mean BWT on those seeds >= -1 pt and mean paired
LA difference (transfer gain) > 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .methods import METHODS
from .metrics import RANK_MATCHED_METHOD, REFERENCE_METHOD
from .report import METRIC_COLUMNS, METRICS_NOTE

BAR_BWT = -0.01


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def collect(run_dirs: Sequence[Path]) -> dict[str, list[dict[str, Any]]]:
    """method -> one entry per run: metrics, wall time, seed."""
    out: dict[str, list[dict[str, Any]]] = {}
    for d in run_dirs:
        comp = Path(d) / "comparison.json"
        if not comp.is_file():
            raise FileNotFoundError(f"{comp} does not exist (is {d} a finished run directory?)")
        for name, r in json.loads(comp.read_text()).items():
            rep = Path(d) / name / "report.json"
            seed = json.loads(rep.read_text()).get("seed") if rep.is_file() else None
            for prev in out.get(name, []):
                if seed is not None and prev["seed"] == seed:
                    raise ValueError(f"method {name} has seed {seed} in two runs ({prev['run']} and {d}); "
                                     f"the paired comparison needs one run per method and seed")
            out.setdefault(name, []).append({**r, "seed": seed, "run": str(d)})
    return out


def paired(rows: list[dict[str, Any]], ref_rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The method (``rows``) against the reference on the seeds both ran: ``seeds``, ``n``,
    ``dACC`` and ``dLA`` (mean, std of the per-seed differences), ``BWT`` (mean, std on those
    seeds) and ``wins`` (seeds where the method's ACC >= the reference's); None without a common seed."""
    ref = {r["seed"]: r["metrics"] for r in ref_rows if r["seed"] is not None}
    common = [(r["metrics"], ref[r["seed"]], r["seed"]) for r in rows if r["seed"] in ref]
    if not common:
        return None
    common.sort(key=lambda c: c[2])
    d_acc = [m["ACC"] - mr["ACC"] for m, mr, _ in common]
    d_la = [m["LA"] - mr["LA"] for m, mr, _ in common]
    bwt = [m["BWT"] for m, _, _ in common]
    return {"seeds": [c[2] for c in common], "n": len(common), "dACC": _mean_std(d_acc), "dLA": _mean_std(d_la),
            "BWT": _mean_std(bwt) if all(b is not None for b in bwt) else None,
            "wins": sum(d >= 0 for d in d_acc)}


def default_reference(runs: dict[str, list[dict[str, Any]]]) -> Optional[str]:
    return next((n for n in (RANK_MATCHED_METHOD, REFERENCE_METHOD) if n in runs), None)


def aggregate(runs: dict[str, list[dict[str, Any]]], ref: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """method -> {metric: (mean, std)} over the runs (None where a metric is missing), seeds, n,
    ``paired`` (:func:`paired` against ``ref``, default :func:`default_reference`) and ``bar``;
    in the order of ``METHODS``."""
    ref = ref if ref is not None else default_reference(runs)
    if ref is not None and ref not in runs:
        raise ValueError(f"--ref {ref} is not among the runs' methods: {', '.join(runs)}")
    table = {}
    order = list(METHODS)
    for name, rows in sorted(runs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        entry: dict[str, Any] = {"n": len(rows), "seeds": [r["seed"] for r in rows]}
        for key, _, _ in METRIC_COLUMNS:
            vals = [r["metrics"].get(key) for r in rows]
            entry[key] = _mean_std(vals) if vals and all(v is not None for v in vals) else None
        entry["wall_time_s"] = _mean_std([r["wall_time_s"] for r in rows])
        entry["paired"] = paired(rows, runs[ref]) if ref is not None and name != ref else None
        entry["bar"] = None
        pr = entry["paired"]
        if pr is not None and pr["BWT"] is not None:
            entry["bar"] = bool(pr["dACC"][0] >= 0 and pr["BWT"][0] >= BAR_BWT and pr["dLA"][0] > 0)
        table[name] = entry
    return {"reference": ref, "methods": table}


def _cell(v: Optional[tuple[float, float]], signed: bool) -> str:
    if v is None:
        return "n/a"
    m, sd = 100 * v[0], 100 * v[1]
    return f"{m:+.1f} ± {sd:.1f}" if signed else f"{m:.1f} ± {sd:.1f}"


def _paired_cells(p: Optional[dict[str, Any]]) -> list[str]:
    if p is None:
        return ["n/a", "n/a", "n/a"]
    return [_cell(p["dACC"], True), _cell(p["dLA"], True), f"{p['wins']}/{p['n']} ({','.join(map(str, p['seeds']))})"]


def markdown(result: dict[str, Any]) -> str:
    signed = {"BWT", "FWT", "transfer_gain", "transfer_gain_rm"}
    ref = result["reference"] or "none"
    head = [c[1] for c in METRIC_COLUMNS] + [f"ΔACC vs {ref}, paired (pp)", f"ΔLA vs {ref}, paired (pp)",
                                             "ACC >= ref (seeds)", "bar", "seeds", "time (s)"]
    lines = ["| method | " + " | ".join(head) + " |", "|" + " --- |" * (len(head) + 1)]
    for name, e in result["methods"].items():
        cells = [_cell(e[key], key in signed) for key, _, _ in METRIC_COLUMNS] + _paired_cells(e["paired"])
        bar = ("ref" if name == result["reference"] else "n/a") if e["bar"] is None else ("yes" if e["bar"] else "no")
        t = e["wall_time_s"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {bar} | {','.join(map(str, e['seeds']))} | "
                     f"{t[0]:.0f} ± {t[1]:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moecl_kernels.trainer.aggregate", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, help="run directories (output_dir/name), one per seed")
    p.add_argument("--ref", help="the reference method of the paired comparison (default: isolated_lora_rm where "
                                 "it ran, else isolated_lora)")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    p.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = p.parse_args(argv)
    try:
        result = aggregate(collect(args.run_dirs), args.ref)
    except (FileNotFoundError, ValueError) as e:
        print(f"aggregate: {e}", file=sys.stderr)
        return 2
    text = markdown(result) + "\n\nmean ± std over runs (percentage points). " + METRICS_NOTE + \
        " Paired: the per-seed differences to the reference on the seeds both ran (mean ± std; ΔLA is the " \
        "transfer gain against the reference). bar: paired ΔACC >= 0, BWT >= -1 pt and paired ΔLA > 0 " \
        "(means over the paired seeds).\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
