#!/usr/bin/env python3
"""CI compile check of the CUDA kernels: no GPU needed, only nvcc.

Compiles every kernel source of csrc/build.json for sm_80 and sm_90a with ``-Xptxas -v``,
parses ptxas' per-kernel resource usage, writes it to a report (markdown table, or JSON when
the path ends in .json) and prints the table. Exit status 1 on a compile error or on any register spill (spill stores or loads),
0 otherwise; a stack frame without spills (local arrays) is reported as a warning.

    python tools/cuda_compile_check.py [--nvcc PATH] [--archs 80,90a] [-j 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = json.loads((ROOT / "csrc" / "build.json").read_text())

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def find_nvcc(explicit: str | None) -> str:
    if explicit:
        return explicit
    for cand in (os.environ.get("CUDA_HOME") and Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc",
                 shutil.which("nvcc"), Path("/usr/local/cuda/bin/nvcc")):
        if cand and Path(cand).is_file():
            return str(cand)
    sys.exit("cuda_compile_check: nvcc not found (use --nvcc or set CUDA_HOME)")


def parse_ptxas(text: str) -> list[dict]:
    """Per (kernel, arch) resource usage from ``-Xptxas -v`` output."""
    rows: list[dict] = []
    cur: dict | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"symbol": m.group(1), "arch": m.group(2), "registers": None, "smem_bytes": 0,
                   "stack_bytes": 0, "spill_stores": 0, "spill_loads": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m:
            cur["stack_bytes"], cur["spill_stores"], cur["spill_loads"] = (int(v) for v in m.groups())
            continue
        m = _USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            cur["smem_bytes"] = int(m.group(2) or 0)
    return rows


def demangle(symbols: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or str(Path(find_nvcc(None)).parent / "cu++filt")
    if not Path(tool).is_file():
        tool = shutil.which("c++filt")
    if not tool or not symbols:
        return {s: s for s in symbols}
    out = subprocess.run([tool], input="\n".join(symbols), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(symbols, out)) if len(out) == len(symbols) else {s: s for s in symbols}


def short_name(demangled: str) -> str:
    """``void moecl::detail::(anonymous namespace)::shrink_kernel<float>(...)`` -> ``shrink_kernel<float>``."""
    name = re.sub(r"^void\s+", "", demangled.replace("(anonymous namespace)::", ""))
    return re.sub(r"\b\w+::", "", name.split("(", 1)[0])


def format_table(rows: list[dict]) -> str:
    """Markdown table: one line per (kernel, arch)."""
    lines = ["| kernel | source | arch | registers | smem (B) | stack (B) | spill stores / loads (B) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['source']} | {r['arch']} | {r['registers']} | {r['smem_bytes']} | "
                     f"{r['stack_bytes']} | {r['spill_stores']} / {r['spill_loads']} |")
    return "\n".join(lines)


def compile_one(nvcc: str, src: str, archs: list[str], tmp: Path) -> tuple[str, int, str, float]:
    cmd = [nvcc, "-c", str(ROOT / src), "-o", str(tmp / (Path(src).stem + ".o")), *SPEC["nvcc_flags"],
           *(f"-I{ROOT / d}" for d in SPEC["include_dirs"]), "-Xptxas", "-v",
           *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs)]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True)
    return src, res.returncode, res.stdout + res.stderr, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nvcc", help="nvcc to use (default: $CUDA_HOME/bin/nvcc, PATH, /usr/local/cuda)")
    ap.add_argument("--archs", default="80,90a", help="comma-separated SASS targets (default: 80,90a)")
    ap.add_argument("-j", "--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")), help="parallel nvcc runs")
    ap.add_argument("--out", default=str(ROOT / "build" / "cuda_compile_report.md"),
                    help="report path: markdown table, or JSON if it ends in .json")
    args = ap.parse_args()

    nvcc = find_nvcc(args.nvcc)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    sources = SPEC["kernel_sources"]
    print(f"compiling {len(sources)} sources for {', '.join('sm_' + a for a in archs)} with {nvcc} (-j{args.jobs})")
    failed = []
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="moecl_cc_") as tmp, ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for src, rc, log, secs in pool.map(lambda s: compile_one(nvcc, s, archs, Path(tmp)), sources):
            print(f"  {src}: {'ok' if rc == 0 else 'FAILED'} ({secs:.1f} s)")
            if rc != 0:
                failed.append(src)
                print(log, file=sys.stderr)
                continue
            for row in parse_ptxas(log):
                row["source"] = src
                rows.append(row)

    names = demangle(sorted({r["symbol"] for r in rows}))
    for r in rows:
        r["kernel"] = short_name(names[r["symbol"]])
    rows.sort(key=lambda r: (r["source"], r["kernel"], r["arch"]))
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    stacks = [r for r in rows if r["stack_bytes"] and r not in spills]
    missing = [r for r in rows if r["registers"] is None]

    table = format_table(rows)
    report = Path(args.out)
    report.parent.mkdir(parents=True, exist_ok=True)
    if report.suffix == ".json":
        report.write_text(json.dumps({"nvcc": nvcc, "archs": archs, "failed_sources": failed, "kernels": rows},
                                     indent=2) + "\n")
    else:
        report.write_text(f"# CUDA compile check\n\nnvcc: `{nvcc}`, failed sources: {failed or 'none'}\n\n{table}\n")
    print("\n" + table)
    print(f"\n{len(rows)} kernel builds, report: {report}")

    if not rows and not failed:
        print("FAIL: ptxas reported no kernels (is -Xptxas -v output parsed correctly?)", file=sys.stderr)
        return 1
    if failed:
        print(f"FAIL: compile errors in {failed}", file=sys.stderr)
    if stacks:
        print("warning: stack frames (local memory) in: " + ", ".join(f"{r['kernel']} ({r['arch']})" for r in stacks))
    if spills:
        print("FAIL: register spills in: " + ", ".join(f"{r['kernel']} ({r['arch']})" for r in spills),
              file=sys.stderr)
    if missing:
        print("FAIL: no register count parsed for: " + ", ".join(r["kernel"] for r in missing), file=sys.stderr)
    return 1 if failed or spills or missing else 0


if __name__ == "__main__":
    sys.exit(main())
