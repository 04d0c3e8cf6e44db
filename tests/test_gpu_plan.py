"""The GPU call's plan, on the CPU: ``benchmarks/run_gpu.sh --dry-run`` (stages, budgets, rows, kernels to
compile, files to return), the script's stamping and its stage orchestration with a stub Python, and the
pieces it relies on (the warm-up units, the per-row budget). A broken plan fails here, not on the GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_plan
from benchmarks.cases import Case, FfnCase
from benchmarks.common import RowTimeout, row_budget

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"
FILES = {"run.log", "build.log", "tests.log", "bench.json", "bench.md", "ffn.json", "ffn.md", "e2e.json"}


def sh(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_dry_run_lists_the_whole_plan():
    p = sh("--dry-run")
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    for stage in ("build", "warm", "spec", "ffn", "e2e", "tests", "sanitize", "report"):
        assert re.search(rf"^{stage}\s+\d+", out, re.M), stage
    total = int(re.search(r"total of the stage budgets: (\d+)s of (\d+)s", out).group(1))
    assert total <= 540
    files = re.search(r"files returned under \$OUT \((\d+), at most 8\): (.*)", out)
    assert int(files.group(1)) <= 8 and set(files.group(2).split()) == FILES
    assert "each row its own budget" in out and "ffn  ffn fwd+bwd" in out  # the FFN §4 row is in this call
    assert re.search(r"warm-up: \d+ provider x case units", out) and "triton-gemm-tma-2cta" in out
    assert re.search(r"_ffn_wgrad_kernel: \d+", out)  # the Triton kernels to compile
    assert out.rstrip().endswith("dry run: OK")


def test_a_broken_plan_fails_the_dry_run():
    p = sh("--dry-run", env={"BUDGET_S": "300"})  # the stages no longer fit the call
    assert p.returncode != 0 and "more than BUDGET_S" in p.stdout
    bad = SCRIPT.read_text().replace("FFN_PROVIDERS=two-ffn,", "FFN_PROVIDERS=two-ffnn,")
    tmp = ROOT / "benchmarks" / ".run_gpu_broken_test.sh"
    try:
        tmp.write_text(bad)
        p = subprocess.run(["bash", str(tmp), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        tmp.unlink()
    assert p.returncode != 0 and "unknown ffn providers ['two-ffnn']" in p.stdout


def test_stamp_and_refusal_without_it():
    p = sh("--stamp")
    assert p.returncode == 0, p.stderr
    kv = dict(line.split("=", 1) for line in p.stdout.split())
    assert re.fullmatch(r"[0-9a-f]{40}", kv["MOECL_GIT_COMMIT"])
    assert kv["MOECL_GIT_DIRTY"] == "clean" or re.fullmatch(r"[0-9a-f]{16}", kv["MOECL_GIT_DIRTY"])
    env = {"GIT_DIR": "/nonexistent", "MOECL_GIT_COMMIT": "", "MOECL_GIT_DIRTY": ""}  # as on the device: no .git
    p = sh(env=env)
    assert p.returncode == 2 and "refusing to run" in p.stderr


def test_every_stage_runs_and_reports_with_a_stub_python(tmp_path):
    """The orchestration itself: with a Python that does nothing, every stage still runs in order under
    its cap, the summary is written, and only the returned files are left under $OUT."""
    stub = tmp_path / "py"
    stub.write_text("#!/usr/bin/env bash\necho \"stub $*\" >>\"$STUB_LOG\"\nexit 0\n")
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = {"PYTHON": str(stub), "OUT": str(out), "STUB_LOG": str(tmp_path / "calls"), "MOECL_GIT_COMMIT": "abc",
           "MOECL_GIT_DIRTY": "clean", "WARM_PROCS": "3", "TORCH_CUDA_ARCH_LIST": "9.0a", "PATH": os.environ["PATH"]}
    p = sh(env=env, timeout=120)
    log = (out / "run.log").read_text()
    stages = json.loads(log.split("STAGES ", 1)[1].splitlines()[0])
    assert list(stages)[:8] == ["build", "warm", "spec", "ffn", "e2e", "tests", "sanitize", "report"]
    assert stages["build"]["rc"] == 0 and stages["report"]["rc"] == 1  # the stub wrote no bench.json
    assert p.returncode == 1 and "commit abc uncommitted clean" in log and "GPU at end" in log
    calls = (tmp_path / "calls").read_text()
    assert calls.count("-m benchmarks.gpu_plan --warm --shard") == 3
    assert calls.count("tools/sanitize_triton.py --gemm") == 1  # compiled in the warm-up, not under the sanitizer
    assert "--row-budget 15" in calls and "-m benchmarks.bench_ffn" in calls and "-m benchmarks.bench_e2e" in calls
    assert {f.name for f in out.iterdir()} <= FILES


def test_warm_up_runs_a_unit_once_on_the_cpu():
    from benchmarks.ffn_providers import ffn_providers
    from benchmarks.providers import OpBackend

    assert gpu_plan.warm_one("op", Case("fwd+bwd", 64, 48, 4, 3, 16, "mixed", "fp32"), OpBackend("eager"),
                             torch.device("cpu")) == "ok"
    eager = next(p for p in ffn_providers(["eager"]))
    assert gpu_plan.warm_one("ffn", FfnCase("fwd", 40, 72, 4, 3, 24, "mixed", "fp32"), eager,
                             torch.device("cpu")) == "ok"
    assert gpu_plan.warm_one("op", Case("fwd", 64, 48, 4, 3, 16, "mixed", "fp32"), OpBackend("triton-addmm"),
                             torch.device("cpu")).startswith("skipped")
    us = gpu_plan.units(["base", "eager", "triton-addmm"], ["base-mlp", "triton"])
    assert all(not n.startswith("base") for _, _, n in us) and {k for k, _, _ in us} == {"op", "ffn"}


def test_row_budget_interrupts_only_its_row():
    t0 = time.monotonic()
    with pytest.raises(RowTimeout):
        with row_budget(0.2):
            try:
                while True:
                    time.sleep(0.01)
            except Exception:  # a provider's own handler must not swallow it
                pytest.fail("RowTimeout caught as an Exception")
    assert time.monotonic() - t0 < 5
    with row_budget(5):  # a row inside its budget is untouched, and the timer is cleared after it
        pass
    time.sleep(0.05)


@pytest.mark.parametrize("module", ["bench_op", "bench_ffn"])
def test_a_row_past_its_budget_is_recorded_and_the_next_runs(module, tmp_path):
    import importlib

    m = importlib.import_module(f"benchmarks.{module}")
    m.main(["--quick", "--row-budget", "0.001", "--providers", "eager", "--out", str(tmp_path)]
           + (["--no-plot"] if module == "bench_op" else []))
    res = json.loads((tmp_path / ("bench.json" if module == "bench_op" else "ffn.json")).read_text())["results"]
    labels = {r["label"] for r in res}
    assert len(labels) > 1 and all(r["status"] == "budget" for r in res), {r["status"] for r in res}
    assert all("over its budget" in r["reason"] for r in res)
