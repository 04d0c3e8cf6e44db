"""Reports of a run: per method ``report.json``, ``report.md`` and ``heatmap.png`` (the
accuracy matrix R), and across methods ``comparison.json`` / ``comparison.md``."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def machine_info(world_size: int) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "world_size": world_size}


_LEVELS = {"ffn": "FFN level: experts are whole MLPs", "linear": "linear level: experts per projection"}


def level_line(results: dict[str, dict[str, Any]]) -> str:
    """Which MoE-CL level the run's methods used (docs/spec.md §1.1 / §1.3)."""
    levels = sorted({r.get("level", "linear") for r in results.values()})
    return "MoE-CL " + " / ".join(_LEVELS[lv] for lv in levels) + f" (model.level={'/'.join(levels)})"


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f}" if v < 0 or v > 0 else "+0.0"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def matrix_markdown(R: Sequence[Sequence[float]], baseline: Sequence[float], tasks: Sequence[str]) -> str:
    head = "| after training \\ test on | " + " | ".join(tasks) + " |"
    lines = [head, "|" + " --- |" * (len(tasks) + 1), "| (untrained) | " + " | ".join(_pct(v) for v in baseline) + " |"]
    for i, row in enumerate(R):
        lines.append(f"| {i + 1}. {tasks[i]} | " + " | ".join(_pct(v) for v in row) + " |")
    return "\n".join(lines)


def write_heatmap(path: Path, R: Sequence[Sequence[float]], tasks: Sequence[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tasks)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 1.8))
    im = ax.imshow([[100 * v for v in row] for row in R], vmin=0, vmax=100, cmap="viridis")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{100 * R[i][j]:.0f}", ha="center", va="center", color="w" if R[i][j] < 0.6 else "k")
    ax.set_xticks(range(n), tasks, rotation=30, ha="right")
    ax.set_yticks(range(n), [f"{i + 1}. {t}" for i, t in enumerate(tasks)])
    ax.set_xlabel("test task")
    ax.set_ylabel("after training task")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_method_report(out_dir: Path, result: dict[str, Any]) -> None:
    """``result``: method, tasks, R, baseline, metrics, and run facts (see engine)."""
    atomic_write_text(out_dir / "report.json", json.dumps(result, indent=2, sort_keys=True))
    m = result["metrics"]
    md = [
        f"# {result['method']} on {result['benchmark']}",
        "",
        f"ACC {_pct(m['ACC'])} | BWT {_fmt(m['BWT'])} | FWT {_fmt(m['FWT'])} | LA {_pct(m.get('LA', 0.0))} | "
        f"transfer gain {_fmt(m.get('transfer_gain'))} | vs rank-matched {_fmt(m.get('transfer_gain_rm'))} "
        f"(percentage points; {result['mode']} mode, "
        f"{_LEVELS[result.get('level', 'linear')]}, seed {result['seed']})",
        "",
        "Accuracy matrix R (%): row i = after training tasks 1..i, column j = test accuracy on task j.",
        "",
        matrix_markdown(result["R"], result["baseline"], result["tasks"]),
        "",
        *_probe_lines(result),
        f"Wall time {result['wall_time_s']:.1f} s on {result['machine']['platform']} "
        f"({result['machine']['cpu_count']} CPUs, {result['machine']['torch_threads']} torch threads, "
        f"GPU: {result['machine']['gpu'] or 'none'}, {result['machine']['world_size']} process(es)).",
        "",
    ]
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    write_heatmap(out_dir / "heatmap.png", result["R"], result["tasks"], f"{result['method']}: accuracy matrix R")


def _probe_lines(result: dict[str, Any]) -> list[str]:
    probe, base = result.get("probe"), result.get("probe_baseline")
    if probe is None or base is None:
        return ["FWT: R[i-1][i] - untrained accuracy (zero-shot answers before task i).", ""]
    cells = " | ".join(f"{_pct(base[j])} / {'-' if probe[j] is None else _pct(probe[j])}" for j in range(len(base)))
    return ["Linear probes (FWT; %): untrained backbone / backbone before the task", "",
            "| " + " | ".join(result["tasks"]) + " |", "|" + " --- |" * len(base), f"| {cells} |", ""]


METRIC_COLUMNS = (("ACC", "ACC (%)", _pct), ("BWT", "BWT (pp)", _fmt), ("FWT", "FWT (pp)", _fmt),
                  ("LA", "LA (%)", _pct), ("transfer_gain", "transfer gain (pp)", _fmt),
                  ("transfer_gain_rm", "gain vs rank-matched (pp)", _fmt))


def comparison_markdown(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| method | " + " | ".join(c[1] for c in METRIC_COLUMNS) + " | time (s) |",
             "|" + " --- |" * (len(METRIC_COLUMNS) + 2)]
    for name, r in results.items():
        m = r["metrics"]
        cells = [fmt(m.get(key)) if m.get(key) is not None else "n/a" for key, _, fmt in METRIC_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['wall_time_s']:.1f} |")
    return "\n".join(lines)


METRICS_NOTE = ("ACC: final mean accuracy; BWT: backward transfer (negative = forgetting); FWT: forward transfer "
                "(classification: a linear probe on the backbone before each task vs on the untrained backbone); "
                "LA: mean accuracy on each task right after training it; transfer gain: LA minus isolated LoRA's LA; "
                "gain vs rank-matched: LA minus the LA of isolated LoRA at rank 2r (isolated_lora_rm).")


def write_comparison(run_dir: Path, results: dict[str, dict[str, Any]]) -> str:
    """Writes ``comparison.json`` and ``comparison.md``; returns the markdown table."""
    table = comparison_markdown(results)
    summary = {name: {"metrics": r["metrics"], "wall_time_s": r["wall_time_s"]} for name, r in results.items()}
    atomic_write_text(run_dir / "comparison.json", json.dumps(summary, indent=2, sort_keys=True))
    first = next(iter(results.values()))
    atomic_write_text(run_dir / "comparison.md", "\n".join([
        f"# Comparison on {first['benchmark']} ({len(first['tasks'])} tasks: {', '.join(first['tasks'])})", "",
        level_line(results), "", table, "", METRICS_NOTE, ""]))
    return table
