#!/usr/bin/env bash
# Set up a Python environment for moecl-kernels from scratch (used by the README quick start and CI).
#
# * torch: kept if already importable (e.g. a CUDA build on a GPU machine); otherwise the pinned
#   CPU build torch==2.13.0 (an unpinned spec would pull several GB of CUDA wheels).
# * the package itself: `pip install --no-build-isolation -e ".[test,triton]"`; torch is not a build
#   requirement. On a machine whose torch has CUDA and that has nvcc, this compiles the CUDA
#   extension (MOECL_SKIP_CUDA_BUILD=1 skips it, MOECL_FORCE_CUDA_BUILD=1 makes a failure fatal).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --disable-pip-version-check --no-input --progress-bar off)
if ! "$PY" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "torch==${MOECL_TORCH_VERSION:-2.13.0}"
fi
"${PIP[@]}" setuptools wheel pybind11
"${PIP[@]}" --no-build-isolation -e ".[test,triton]"
"$PY" -c "import moecl_kernels as mk, torch; print(f'moecl-kernels {mk.__version__} with torch {torch.__version__}')"
