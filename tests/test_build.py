"""The build: setup.py's decision (CUDA extension or pure Python), its arch list parsing, a
pure-Python wheel with a CPU torch, and the CUDA compile check's ptxas parser. CPU only."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup_py():
    return runpy.run_path(str(ROOT / "setup.py"), run_name="moecl_setup")


def test_build_plan(setup_py):
    plan, err = setup_py["cuda_build_plan"], setup_py["BuildError"]
    nvcc = "/usr/local/cuda/bin/nvcc"
    assert plan({}, None, nvcc, True)[0] is False                    # CPU torch: pure Python
    assert "torch has no CUDA" in plan({}, None, nvcc, True)[1]
    assert plan({}, "13.0", nvcc, True)[0] is True                   # CUDA torch + nvcc: build
    assert plan({}, "13.0", None, True) == (False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    assert plan({}, "13.0", nvcc, False)[0] is False                 # no pybind11: pure Python
    assert plan({"MOECL_SKIP_CUDA_BUILD": "1"}, "13.0", nvcc, True)[0] is False
    assert plan({"MOECL_FORCE_CUDA_BUILD": "1"}, None, nvcc, True)[0] is True  # torch-free extension
    with pytest.raises(err, match="nvcc not found"):
        plan({"MOECL_FORCE_CUDA_BUILD": "1"}, "13.0", None, True)
    with pytest.raises(err, match="pybind11"):
        plan({"MOECL_FORCE_CUDA_BUILD": "1"}, "13.0", nvcc, False)
    with pytest.raises(err, match="contradict"):
        plan({"MOECL_FORCE_CUDA_BUILD": "1", "MOECL_SKIP_CUDA_BUILD": "1"}, "13.0", nvcc, True)


def test_arch_list_parsing(setup_py):
    parse, gencode, err = setup_py["parse_arch_list"], setup_py["gencode_flags"], setup_py["BuildError"]
    archs, skipped = parse("8.0;9.0a")
    assert archs == [("80", False), ("90a", False)] and skipped == []
    assert gencode(archs) == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
    archs, skipped = parse("7.0 7.5 8.0 8.6+PTX")
    assert archs == [("80", False), ("86", True)] and skipped == ["7.0", "7.5"]
    assert "-gencode=arch=compute_86,code=compute_86" in gencode(archs)
    with pytest.raises(err, match="Ampere"):
        parse("Ampere")


def test_pure_python_install_without_cuda_torch(tmp_path):
    """setup.py with a CPU torch builds a pure-Python wheel (no _C, py3-none-any)."""
    if torch.version.cuda is not None:
        pytest.skip("torch has CUDA here; the pure-Python path is for CPU torch")
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in ("setup.py", "pyproject.toml", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("moecl_kernels", "csrc", "python"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k not in ("MOECL_FORCE_CUDA_BUILD", "MOECL_SKIP_CUDA_BUILD")}
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v", "-w", str(tmp_path / "dist"),
         str(src)], capture_output=True, text=True, env=env, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "installing without the CUDA extension: torch has no CUDA" in res.stdout + res.stderr
    wheels = list((tmp_path / "dist").glob("*.whl"))
    assert len(wheels) == 1 and wheels[0].name.endswith("-py3-none-any.whl"), wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "moecl_kernels/py.typed" in names
    assert not [n for n in names if "_C" in Path(n).name]


def test_compile_check_parses_spills():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import cuda_compile_check as cc
    finally:
        sys.path.pop(0)
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z5heavyPfi' for 'sm_80'
ptxas info    : Function properties for _Z5heavyPfi
    5960 bytes stack frame, 5952 bytes spill stores, 12152 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 5960 bytes cumulative stack size, 364 bytes cmem[0]
ptxas info    : Compiling entry function '_Z4goodPf' for 'sm_90a'
ptxas info    : Function properties for _Z4goodPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 16128 bytes smem, 528 bytes cmem[0]
"""
    heavy, good = cc.parse_ptxas(log)
    assert (heavy["arch"], heavy["registers"], heavy["spill_stores"], heavy["spill_loads"]) == ("sm_80", 24, 5952, 12152)
    assert (good["arch"], good["registers"], good["smem_bytes"], good["spill_stores"]) == ("sm_90a", 80, 16128, 0)
    assert cc.short_name("void moecl::detail::(anonymous namespace)::shrink_kernel<float>(moecl::X<float>)") == \
        "shrink_kernel<float>"
