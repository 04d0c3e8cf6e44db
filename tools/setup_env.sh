#!/usr/bin/env bash
# Set up a Python environment for moecl-kernels from scratch (used by the README quick start and CI).
#
# It installs into the Python it runs ($PYTHON, default python3): make and activate a virtual
# environment first (python3 -m venv .venv && . .venv/bin/activate); it says so when it is not in one.
#
# * torch: kept if already importable (e.g. a CUDA build on a GPU machine). Otherwise torch==2.13.0
#   (MOECL_TORCH_VERSION): where `nvidia-smi` lists no GPU, the CPU build from PyTorch's CPU index
#   (https://download.pytorch.org/whl/cpu); where it lists one, the default PyPI build, which bundles
#   CUDA (several GB). MOECL_TORCH_INDEX=<url> picks the index yourself (e.g. .../whl/cu128). Where
#   that CPU index cannot be reached within 5 s (an offline mirror, this project's CI), the plain pin
#   from the configured pip sources (MOECL_TORCH_CPU_INDEX_OK=1/0 skips the probe).
# * the package itself: `pip install --no-build-isolation -e ".[test,triton]"`; torch is not a build
#   requirement. On a machine whose torch has CUDA and that has nvcc, this compiles the CUDA
#   extension (MOECL_SKIP_CUDA_BUILD=1 skips it, MOECL_FORCE_CUDA_BUILD=1 makes a failure fatal).
# * MOECL_SETUP_DRY_RUN=1 prints each pip command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --disable-pip-version-check --no-input --progress-bar off)
run() {
  if [ "${MOECL_SETUP_DRY_RUN:-0}" = 1 ]; then echo "would run: $*"; else "$@"; fi
}
if ! "$PY" -c "import sys, os; sys.exit(0 if sys.prefix != sys.base_prefix or os.environ.get('CONDA_PREFIX') else 1)"; then
  echo "setup_env.sh: installing into $("$PY" -c 'import sys; print(sys.prefix)') (not a virtual environment);" \
       "to keep it apart, first: python3 -m venv .venv && . .venv/bin/activate" >&2
fi
cpu_index_reachable() {  # MOECL_TORCH_CPU_INDEX_OK=1/0 decides without asking the network
  case "${MOECL_TORCH_CPU_INDEX_OK:-}" in
    1) return 0 ;; 0) return 1 ;;
  esac
  "$PY" -c "import urllib.request as u; u.urlopen('https://download.pytorch.org/whl/cpu/torch/', timeout=5)" \
    >/dev/null 2>&1
}
if ! "$PY" -c "import torch" 2>/dev/null; then
  TORCH="torch==${MOECL_TORCH_VERSION:-2.13.0}"
  if [ -n "${MOECL_TORCH_INDEX:-}" ]; then
    echo "setup_env.sh: installing $TORCH from $MOECL_TORCH_INDEX" >&2
    run "${PIP[@]}" "$TORCH" --index-url "$MOECL_TORCH_INDEX"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    echo "setup_env.sh: a GPU is present: installing $TORCH from PyPI (the CUDA build, several GB)" >&2
    run "${PIP[@]}" "$TORCH"
  elif cpu_index_reachable; then
    echo "setup_env.sh: no GPU found: installing $TORCH, the CPU build (https://download.pytorch.org/whl/cpu)" >&2
    run "${PIP[@]}" "$TORCH" --index-url https://download.pytorch.org/whl/cpu
  else
    # offline mirrors and CI images (this project's) serve their own CPU build under the plain pin
    echo "setup_env.sh: no GPU found and the PyTorch CPU index is unreachable: installing $TORCH from the" \
         "configured pip sources (a local CPU wheel where one is configured; on plain PyPI the CUDA build)" >&2
    run "${PIP[@]}" "$TORCH"
  fi
else
  echo "setup_env.sh: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')" >&2
fi
run "${PIP[@]}" "setuptools>=77" wheel pybind11  # setup.py needs setuptools>=77 (an old venv has 65)
run "${PIP[@]}" --no-build-isolation -e ".[test,triton]"
if [ "${MOECL_SETUP_DRY_RUN:-0}" != 1 ]; then
  "$PY" -c "import moecl_kernels as mk, torch; print(f'moecl-kernels {mk.__version__} with torch {torch.__version__}')"
fi
