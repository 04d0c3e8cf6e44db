"""Build script: the pure-Python package, plus the CUDA extension ``moecl_kernels._C`` when it can be built.

    pip install --no-build-isolation .       # GPU machine: compiles the kernels; CPU machine: pure Python

The extension is built when torch has CUDA (``torch.version.cuda``) and nvcc is found
(``$CUDA_HOME/bin``, ``$PATH``, ``/usr/local/cuda/bin``), and pybind11 is installed.
Environment:

    TORCH_CUDA_ARCH_LIST      target archs, e.g. "8.0;9.0a" (default, from csrc/build.json); "X.Y+PTX"
                              also embeds PTX; archs below 8.0 are skipped (the kernels use mma.sync bf16)
    MAX_JOBS                  parallel nvcc processes (default: CPU count)
    MOECL_FORCE_CUDA_BUILD=1  build even if torch has no CUDA (the extension does not link torch);
                              a missing nvcc or pybind11 is then an error instead of a pure-Python install
    MOECL_SKIP_CUDA_BUILD=1   never build the extension

Sources and flags come from csrc/build.json, shared with CMakeLists.txt and
tools/cuda_compile_check.py. The extension links no torch library (torch-free launchers,
raw pointers), so it cannot go stale against a torch upgrade; it carries the package
version, which the cuda backend checks at load time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent
BUILD_SPEC = json.loads((ROOT / "csrc" / "build.json").read_text())


class BuildError(RuntimeError):
    """The build cannot proceed (old setuptools, forced CUDA build without toolchain, ...); the message says why."""


def read_version() -> str:
    text = (ROOT / "moecl_kernels" / "_version.py").read_text()
    m = re.search(r"__version__\s*=\s*[\"']([^\"']+)[\"']", text)
    if m is None:
        raise BuildError("moecl_kernels/_version.py does not define __version__")
    return m.group(1)


def parse_arch_list(text: str) -> tuple[list[tuple[str, bool]], list[str]]:
    """``"8.0;9.0a 8.6+PTX"`` -> ([("80", False), ("90a", False), ("86", True)], skipped).

    Each entry is (arch number, embed PTX). Archs below ``min_arch`` of build.json are
    returned in ``skipped``; anything unparsable raises :class:`BuildError`.
    """
    min_major, min_minor = (int(v) for v in BUILD_SPEC["min_arch"].split("."))
    archs: list[tuple[str, bool]] = []
    skipped: list[str] = []
    for item in re.split(r"[;\s]+", text.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.(\d)(a?)(\+PTX)?", item)
        if m is None:
            raise BuildError(
                f"TORCH_CUDA_ARCH_LIST entry {item!r} is not understood (expected e.g. 8.0, 9.0a or 8.6+PTX)"
            )
        major, minor = int(m.group(1)), int(m.group(2))
        if (major, minor) < (min_major, min_minor):
            skipped.append(item)
            continue
        arch = (f"{major}{minor}{m.group(3)}", m.group(4) is not None)
        if arch not in archs:
            archs.append(arch)
    return archs, skipped


def gencode_flags(archs: list[tuple[str, bool]]) -> list[str]:
    flags = []
    for num, ptx in archs:
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def arch_names(archs: list[tuple[str, bool]]) -> list[str]:
    """Names recorded in the extension's build_info(): sm_XX per SASS target, compute_XX per PTX."""
    names = []
    for num, ptx in archs:
        names.append(f"sm_{num}")
        if ptx:
            names.append(f"compute_{num}")
    return names


def find_nvcc(env: Mapping[str, str]) -> Optional[str]:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            cand = Path(env[var]) / "bin" / "nvcc"
            if cand.is_file():
                return str(cand)
    found = shutil.which("nvcc", path=env.get("PATH"))
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def torch_cuda_version() -> Optional[str]:
    """torch.version.cuda, or None for a CPU torch or no torch at all."""
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def have_pybind11() -> bool:
    return importlib.util.find_spec("pybind11") is not None


def cuda_build_plan(env: Mapping[str, str], torch_cuda: Optional[str], nvcc: Optional[str], pybind11_ok: bool) -> tuple[bool, str]:
    """(build the extension?, why). Raises :class:`BuildError` when forced and impossible."""
    force = env.get("MOECL_FORCE_CUDA_BUILD", "") == "1"
    skip = env.get("MOECL_SKIP_CUDA_BUILD", "") == "1"
    if force and skip:
        raise BuildError("MOECL_FORCE_CUDA_BUILD=1 and MOECL_SKIP_CUDA_BUILD=1 contradict each other; unset one")
    if skip:
        return False, "MOECL_SKIP_CUDA_BUILD=1"
    missing = []
    if nvcc is None:
        missing.append("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if not pybind11_ok:
        missing.append("pybind11 is not installed (pip install pybind11; --no-build-isolation uses this environment)")
    if force:
        if missing:
            raise BuildError("MOECL_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: " + "; ".join(missing))
        return True, "MOECL_FORCE_CUDA_BUILD=1"
    if torch_cuda is None:
        return False, "torch has no CUDA (CPU build or not installed)"
    if missing:
        return False, "; ".join(missing)
    return True, f"torch CUDA {torch_cuda}, nvcc at {nvcc}"


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def git_hash() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _log(msg: str) -> None:
    print(f"moecl-kernels: {msg}", file=sys.stderr, flush=True)


def check_setuptools(version: str) -> None:
    """pyproject.toml uses PEP 639 license metadata (setuptools >= 77); say so instead of a schema error."""
    m = re.match(r"(\d+)", version)
    if m is None or int(m.group(1)) < 77:
        raise BuildError(
            f"moecl-kernels needs setuptools>=77, found {version}: pip install -U setuptools pybind11 "
            "(with --no-build-isolation pip builds with this environment's setuptools)"
        )


def main() -> None:
    import setuptools
    from setuptools import Extension, setup
    from setuptools.command.build_ext import build_ext

    check_setuptools(setuptools.__version__)

    class NvccBuildExt(build_ext):
        """Compiles the extension with nvcc alone (kernels and binding), linking cudart statically."""

        def build_extension(self, ext: Extension) -> None:
            import pybind11

            nvcc = find_nvcc(os.environ)
            archs, skipped = parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST") or BUILD_SPEC["default_arch_list"])
            if skipped:
                _log(f"skipping archs {skipped}: the kernels need sm_{BUILD_SPEC['min_arch'].replace('.', '')} or newer")
            if not archs:
                raise BuildError("no CUDA arch left to build for; set TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0a')")
            includes = [f"-I{ROOT / d}" for d in BUILD_SPEC["include_dirs"]]
            tmp = Path(self.build_temp) / "moecl_cuda"
            tmp.mkdir(parents=True, exist_ok=True)
            common = ["-Xcompiler", "-fPIC", *includes]
            jobs = []
            for src in BUILD_SPEC["kernel_sources"]:
                obj = tmp / (Path(src).stem + ".o")
                jobs.append([nvcc, "-c", str(ROOT / src), "-o", str(obj), *BUILD_SPEC["nvcc_flags"],
                             *gencode_flags(archs), *common])
            defines = {
                "MOECL_VERSION": read_version(),
                "MOECL_ARCHS": ",".join(arch_names(archs)),
                "MOECL_NVCC_VERSION": nvcc_version(nvcc),
                "MOECL_GIT_HASH": git_hash(),
            }
            host_flags = [f for f in BUILD_SPEC["cxx_flags"] if not f.startswith("-std=")]
            std = [f for f in BUILD_SPEC["cxx_flags"] if f.startswith("-std=")]
            for src in BUILD_SPEC["binding_sources"]:
                obj = tmp / (Path(src).stem + ".o")
                jobs.append([nvcc, "-c", str(ROOT / src), "-o", str(obj), *std, "-Xcompiler", ",".join(host_flags),
                             *common, f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
                             *(f'-D{k}="{v}"' for k, v in defines.items())])
            workers = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
            _log(f"compiling {len(jobs)} sources for {arch_names(archs)} with {nvcc} ({workers} jobs)")
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                for cmd, res in zip(jobs, pool.map(lambda c: subprocess.run(c, capture_output=True, text=True), jobs)):
                    if res.returncode != 0:
                        raise BuildError(
                            f"compiling {cmd[2]} failed:\n{' '.join(cmd)}\n{res.stdout}{res.stderr}\n"
                            "(MOECL_SKIP_CUDA_BUILD=1 installs the package without the CUDA kernels)"
                        )
            target = Path(self.get_ext_fullpath(ext.name))
            target.parent.mkdir(parents=True, exist_ok=True)
            objs = [c[c.index("-o") + 1] for c in jobs]
            link = [nvcc, "-shared", "--cudart", "static", "-o", str(target), *objs]
            res = subprocess.run(link, capture_output=True, text=True)
            if res.returncode != 0:
                raise BuildError(f"linking {target.name} failed:\n{' '.join(link)}\n{res.stdout}{res.stderr}")
            _log(f"built {target}")

    build, why = cuda_build_plan(os.environ, torch_cuda_version(), find_nvcc(os.environ), have_pybind11())
    if build:
        _log(f"building the CUDA extension ({why})")
        sources = BUILD_SPEC["kernel_sources"] + BUILD_SPEC["binding_sources"]
        ext_modules = [Extension(BUILD_SPEC["extension"], sources=sources)]
    else:
        _log(f"installing without the CUDA extension: {why}")
        ext_modules = []
    setup(ext_modules=ext_modules, cmdclass={"build_ext": NvccBuildExt})


if __name__ == "__main__":
    main()
