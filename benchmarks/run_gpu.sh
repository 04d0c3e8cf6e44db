#!/usr/bin/env bash
# The one script for a GPU machine: build the CUDA extension, run the GPU tests, run
# compute-sanitizer on the kernels, run the end-to-end and op benchmarks. Every stage runs
# even when an earlier one failed (its exit status is recorded), within one time budget.
#
#   MOECL_GIT_COMMIT=<sha> bash benchmarks/run_gpu.sh [STAGE ...]
#
# STAGE: build tests sanitize e2e bench (default: all five, in that order).
# Environment: OUT (output folder; default benchmarks/results/gpu), BUDGET_S (seconds for the
# whole script, default 570: one device call is at most 600 s), PYTHON (default python3),
# MOECL_GIT_COMMIT (recorded in the JSON; the device copy of the tree has no .git).
#
# Writes at most 8 files, all directly under $OUT:
#   run.log       every stage's progress, exit status and duration (this script's output)
#   build.log     pip install -e . with MOECL_FORCE_CUDA_BUILD=1
#   tests.log     pytest -m gpu
#   sanitize.log  compute-sanitizer memcheck + racecheck of tools/sanitize_cuda.py and tools/sanitize_triton.py
#   e2e.json      bench_e2e: fused vs eager vs PEFT training step on a 1.1B Llama-style model
#   bench.json, bench.md, bench.png   bench_op: the curated sweep + docs/spec.md §4 targets (+ the e2e row)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu}
BUDGET_S=${BUDGET_S:-570}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests sanitize e2e bench)
for s in "${stages[@]}"; do
  case $s in build|tests|sanitize|e2e|bench) ;; *) echo "unknown stage '$s' (build tests sanitize e2e bench)"; exit 2 ;; esac
done
declare -A status
left() { echo $(( BUDGET_S - SECONDS )); }
cap() {  # seconds for a stage's timeout: at most $1, and within what is left of the budget (>= 1)
  local l=$(( $(left) - 5 ))
  [ "$l" -gt "$1" ] && l=$1
  [ "$l" -lt 1 ] && l=1
  echo "$l"
}

run_stage() {  # name, command...: runs, records exit status and duration
  local name=$1; shift
  local t0=$SECONDS
  echo "::: $name (t=${t0}s, $(left)s left)"
  "$@"
  local rc=$?
  status[$name]="rc=$rc $(( SECONDS - t0 ))s"
  echo "::: $name: rc=$rc in $(( SECONDS - t0 ))s"
}

build() {
  MOECL_FORCE_CUDA_BUILD=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1
  local rc=$?
  "$PY" - >>"$OUT/build.log" 2>&1 <<'EOF'
import torch, moecl_kernels as mk
x = torch.empty(1, device="cuda", dtype=torch.bfloat16)
for b in ("triton", "cuda"):
    try:
        print(b, "->", mk.resolve_backend(b, x))
    except Exception as e:
        print(b, "unavailable:", e)
EOF
  tail -n 5 "$OUT/build.log"
  return $rc
}

gpu_tests() {
  timeout "$(cap 200)" "$PY" -m pytest -m gpu -q --no-header -p no:cacheprovider \
    >"$OUT/tests.log" 2>&1
  local rc=$?
  tail -n 3 "$OUT/tests.log"
  return $rc
}

sanitize() {
  local rc=0 found=0 script tool
  : >"$OUT/sanitize.log"
  if ! command -v compute-sanitizer >/dev/null; then
    echo "compute-sanitizer not found" | tee -a "$OUT/sanitize.log"
    return 1
  fi
  for script in tools/sanitize_cuda.py tools/sanitize_triton.py; do
    [ -f "$script" ] || { echo "$script: not present, skipped" | tee -a "$OUT/sanitize.log"; continue; }
    found=1
    for tool in memcheck racecheck; do
      echo "=== $tool $script" >>"$OUT/sanitize.log"
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(cap 150)" compute-sanitizer --tool "$tool" --error-exitcode 99 \
        "$PY" "$script" >>"$OUT/sanitize.log" 2>&1
      local r=$?
      echo "$tool $script: rc=$r" | tee -a "$OUT/sanitize.log"
      [ $r -ne 0 ] && rc=$r
    done
  done
  [ $found -eq 0 ] && echo "no sanitizer scripts present"
  return $rc
}

e2e() {
  local tmp
  tmp=$(mktemp -d)
  timeout "$(cap 240)" "$PY" -m benchmarks.bench_e2e --out "$tmp"
  local rc=$?
  [ -f "$tmp/e2e.json" ] && cp "$tmp/e2e.json" "$OUT/e2e.json"
  return $rc
}

bench() {
  local budget=$(( $(left) - 45 ))  # leave time for the reports and the copy back
  [ $budget -gt 420 ] && budget=420
  [ $budget -lt 60 ] && budget=60
  local e2e_args=()
  [ -f "$OUT/e2e.json" ] && e2e_args=(--e2e-json "$OUT/e2e.json")
  # bench_op stops starting cases at the budget and writes bench.json after every case
  timeout "$(cap 600)" "$PY" -m benchmarks.bench_op --out "$OUT" --time-budget "$budget" ${e2e_args[@]+"${e2e_args[@]}"}
}

main() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  local s fail=0
  for s in "${stages[@]}"; do
    case $s in
      build) run_stage build build ;;
      tests) run_stage tests gpu_tests ;;
      sanitize) run_stage sanitize sanitize ;;
      e2e) run_stage e2e e2e ;;
      bench) run_stage bench bench ;;
    esac
  done
  echo "::: summary (${SECONDS}s)"
  for s in "${stages[@]}"; do
    echo "$s: ${status[$s]}"
    [[ ${status[$s]} == rc=0* ]] || fail=1
  done
  return $fail
}

main 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
