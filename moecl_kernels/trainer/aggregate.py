"""Mean ± std over seeds of several runs' comparisons (one run directory per seed).

    python -m moecl_kernels.trainer.aggregate runs/rt-s0 runs/rt-s1 runs/rt-s2 [--out table.md]

Reads ``comparison.json`` and each method's ``report.json`` of every run directory; a
method missing from a run is left out of that run. The "bar" column says whether the
method meets the quality bar of docs/spec.md §6 on the means: ACC at least isolated
LoRA's, BWT >= -1 pt and a positive transfer gain.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .methods import METHODS
from .metrics import REFERENCE_METHOD
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
            out.setdefault(name, []).append({**r, "seed": seed, "run": str(d)})
    return out


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """method -> {metric: (mean, std)} over the runs (None where a metric is missing), seeds, n;
    in the order of ``METHODS``."""
    table = {}
    order = list(METHODS)
    for name, rows in sorted(runs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        entry: dict[str, Any] = {"n": len(rows), "seeds": [r["seed"] for r in rows]}
        for key, _, _ in METRIC_COLUMNS:
            vals = [r["metrics"].get(key) for r in rows]
            entry[key] = _mean_std(vals) if vals and all(v is not None for v in vals) else None
        entry["wall_time_s"] = _mean_std([r["wall_time_s"] for r in rows])
        table[name] = entry
    ref = table.get(REFERENCE_METHOD)
    for entry in table.values():
        entry["bar"] = None
        if ref is not None and entry["transfer_gain"] is not None and entry["BWT"] is not None:
            entry["bar"] = bool(entry["ACC"][0] >= ref["ACC"][0] and entry["BWT"][0] >= BAR_BWT
                                and entry["transfer_gain"][0] > 0)
    return table


def _cell(v: Optional[tuple[float, float]], signed: bool) -> str:
    if v is None:
        return "n/a"
    m, sd = 100 * v[0], 100 * v[1]
    return f"{m:+.1f} ± {sd:.1f}" if signed else f"{m:.1f} ± {sd:.1f}"


def markdown(table: dict[str, dict[str, Any]]) -> str:
    signed = {"BWT", "FWT", "transfer_gain"}
    lines = ["| method | " + " | ".join(c[1] for c in METRIC_COLUMNS) + " | bar | seeds | time (s) |",
             "|" + " --- |" * (len(METRIC_COLUMNS) + 4)]
    for name, e in table.items():
        cells = [_cell(e[key], key in signed) for key, _, _ in METRIC_COLUMNS]
        bar = "n/a" if e["bar"] is None else ("yes" if e["bar"] else "no")
        t = e["wall_time_s"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {bar} | {','.join(map(str, e['seeds']))} | "
                     f"{t[0]:.0f} ± {t[1]:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moecl_kernels.trainer.aggregate", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, help="run directories (output_dir/name), one per seed")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    args = p.parse_args(argv)
    try:
        table = aggregate(collect(args.run_dirs))
    except (FileNotFoundError, ValueError) as e:
        print(f"aggregate: {e}", file=sys.stderr)
        return 2
    text = markdown(table) + "\n\nmean ± std over runs (percentage points). " + METRICS_NOTE + \
        " bar: ACC >= isolated LoRA's, BWT >= -1 pt and transfer gain > 0 (on the means).\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
