"""Issue 24, install honesty: tools/setup_env.sh says what it installs and installs the CPU build of
torch where there is no GPU (a plain ``torch==`` pin resolves to the CUDA build on PyPI). Run in its
dry-run mode, with ``torch`` shadowed by a module that fails to import, and ``nvidia-smi`` faked."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(tmp_path, gpu: bool, index_ok: str = "1"):
    shadow = tmp_path / "shadow" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no torch here')\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if gpu:
        smi = bindir / "nvidia-smi"
        smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n")
        smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    path = os.pathsep.join([str(bindir)] + [p for p in os.environ["PATH"].split(os.pathsep)
                                            if not (Path(p) / "nvidia-smi").exists()])
    env = dict(os.environ, PATH=path, PYTHONPATH=str(tmp_path / "shadow"), PYTHON=sys.executable,
               MOECL_SETUP_DRY_RUN="1", MOECL_TORCH_CPU_INDEX_OK=index_ok)
    env.pop("MOECL_TORCH_INDEX", None)
    return subprocess.run(["bash", str(ROOT / "tools" / "setup_env.sh")], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_no_gpu_installs_the_cpu_build_and_says_so(tmp_path):
    res = _dry_run(tmp_path, gpu=False)
    assert res.returncode == 0, res.stderr
    torch_line = next(line for line in res.stdout.splitlines() if "torch==" in line)
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in torch_line
    assert "no GPU found: installing torch==2.13.0, the CPU build" in res.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_a_gpu_installs_the_pypi_cuda_build_and_says_so(tmp_path):
    res = _dry_run(tmp_path, gpu=True)
    assert res.returncode == 0, res.stderr
    torch_line = next(line for line in res.stdout.splitlines() if "torch==" in line)
    assert torch_line.rstrip().endswith("torch==2.13.0") and "the CUDA build, several GB" in res.stderr
    assert "-e .[test,triton]" in res.stdout  # the package itself, after torch


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_no_gpu_and_no_cpu_index_falls_back_to_the_configured_sources_and_says_so(tmp_path):
    """Offline mirrors (and this project's CI) serve a CPU build under the plain pin: no hang on an
    unreachable index."""
    res = _dry_run(tmp_path, gpu=False, index_ok="0")
    assert res.returncode == 0, res.stderr
    torch_line = next(line for line in res.stdout.splitlines() if "torch==" in line)
    assert torch_line.rstrip().endswith("torch==2.13.0") and "--index-url" not in torch_line
    assert "the PyTorch CPU index is unreachable" in res.stderr
