#!/usr/bin/env bash
# The GPU session's script. A session has 15 device-minutes in all, start-up included, and one
# call runs at most 10 minutes, so the plan is ONE call of at most 9 minutes that answers what a
# tuning decision needs, and an optional second call for the long sweep:
#
#   call 1 (default, ~9 min):  MOECL_GIT_COMMIT=<sha> bash benchmarks/run_gpu.sh
#       build -> tests (bf16 GPU smoke subset) -> spec (docs/spec.md §4 rows, ragged, decode eager and
#       graph-replayed, both Triton expand modes and cuda) -> sanitize (small memcheck/racecheck
#       pass, corrupt routing included) -> e2e (one training step per backend) -> report (bench.md
#       re-rendered with the e2e row)
#   call 2 (optional, ~8 min): MOECL_GIT_COMMIT=<sha> bash benchmarks/run_gpu.sh build sweep
#
# Each stage has a host-side time budget (seconds, below) and a timeout of the smaller of its
# budget and what is left of BUDGET_S; every stage runs even when an earlier one failed. Each
# stage writes into $OUT as it goes (pytest and sanitizer logs stream, bench_op rewrites its JSON
# after every case, bench_e2e after every variant), so a call cut short still returns what it
# wrote. run.log ends with a table of every stage's budget, time used and exit status (and the
# same as one JSON line, "STAGES {...}").
#
# Environment: OUT (default benchmarks/results/gpu), BUDGET_S (default 540), PYTHON (python3),
# MOECL_GIT_COMMIT (recorded in the JSON; the device copy of the tree has no .git),
# TORCH_CUDA_ARCH_LIST (default: this GPU's architecture only, to halve the build).
#
# Files (at most 8, directly under $OUT): run.log build.log tests.log sanitize.log bench.json
# bench.md e2e.json e2e.md -- the sweep call: run.log build.log bench.json bench.md bench.png.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1

# stage -> host-side budget in seconds (call 1 adds up to 520 of the 540)
declare -A BUDGET=([build]=130 [tests]=90 [spec]=130 [sanitize]=70 [e2e]=100 [report]=10 [sweep]=420)
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests spec sanitize e2e report)
for s in "${stages[@]}"; do
  [ -n "${BUDGET[$s]+x}" ] || { echo "unknown stage '$s' (build tests spec sanitize e2e report sweep)"; exit 2; }
done
declare -A status used
left() { echo $(( BUDGET_S - SECONDS )); }
cap() {  # timeout of a stage: its budget, within what is left of BUDGET_S (>= 1)
  local l=$(( $(left) - 5 ))
  [ "$l" -gt "$1" ] && l=$1
  [ "$l" -lt 1 ] && l=1
  echo "$l"
}

run_stage() {  # name: runs stage_<name> under its cap, records exit status and duration
  local name=$1 t0=$SECONDS
  local limit
  limit=$(cap "${BUDGET[$name]}")
  echo "::: $name (t=${t0}s, budget ${BUDGET[$name]}s, cap ${limit}s, $(left)s left)"
  LIMIT=$limit "stage_$name"
  local rc=$?
  status[$name]=$rc
  used[$name]=$(( SECONDS - t0 ))
  echo "::: $name: rc=$rc in ${used[$name]}s"
}

stage_build() {
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
    export TORCH_CUDA_ARCH_LIST
  fi
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" >"$OUT/build.log"
  MAX_JOBS=16 MOECL_FORCE_CUDA_BUILD=1 timeout "$LIMIT" "$PY" -m pip install --no-build-isolation --no-deps \
    --no-index -e . >>"$OUT/build.log" 2>&1
  local rc=$?
  "$PY" - >>"$OUT/build.log" 2>&1 <<'EOF'
import torch, moecl_kernels as mk
x = torch.empty(16, 1, device="cuda", dtype=torch.bfloat16)
for b in ("auto", "triton", "cuda"):
    try:
        print(b, "->", mk.resolve_backend(b, x))
    except Exception as e:
        print(b, "unavailable:", e)
EOF
  tail -n 5 "$OUT/build.log"
  return $rc
}

stage_tests() {  # the bf16 GPU smoke subset: kernel paths, graphs (seed replay), no host sync, compile
  local par=()
  "$PY" -c "import xdist" 2>/dev/null && par=(-n 8)  # 8 processes: Triton compiles the variants in parallel
  timeout "$LIMIT" "$PY" -m pytest -m gpu -q -rA --no-header -p no:cacheprovider ${par[@]+"${par[@]}"} \
    tests/test_triton_backend.py tests/test_cuda_backend.py tests/test_benchmarks.py \
    -k "(bfloat16 and not eager_matrix and not forced_splits) or graph or sync or torch_compile or strided or harness" \
    >"$OUT/tests.log" 2>&1
  local rc=$?
  tail -n 3 "$OUT/tests.log"
  return $rc
}

stage_spec() {  # bench_op rewrites bench.json after every case
  local e2e_args=()
  [ -f "$OUT/e2e.json" ] && e2e_args=(--e2e-json "$OUT/e2e.json")
  timeout "$LIMIT" "$PY" -m benchmarks.bench_op --spec --no-plot --out "$OUT" \
    --providers eager,triton-addmm,triton-fused,cuda,peft,peft-mixed,grouped_mm ${e2e_args[@]+"${e2e_args[@]}"}
}

stage_sanitize() {  # memcheck of both backends (corrupt routing included), racecheck of the CUDA kernels
  local rc=0 r script tool
  : >"$OUT/sanitize.log"
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found" | tee -a "$OUT/sanitize.log"; return 1; }
  for job in "memcheck tools/sanitize_triton.py" "memcheck tools/sanitize_cuda.py" "racecheck tools/sanitize_cuda.py"; do
    read -r tool script <<<"$job"
    echo "=== $tool $script" >>"$OUT/sanitize.log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(( LIMIT / 3 ))" compute-sanitizer --tool "$tool" --error-exitcode 99 \
      "$PY" "$script" --small >>"$OUT/sanitize.log" 2>&1
    r=$?
    echo "$tool $script: rc=$r" | tee -a "$OUT/sanitize.log"
    [ $r -ne 0 ] && rc=$r
  done
  return $rc
}

stage_e2e() {  # bench_e2e rewrites e2e.json after every variant
  timeout "$LIMIT" "$PY" -m benchmarks.bench_e2e --out "$OUT"
}

stage_report() {  # bench.md again, now with the end-to-end row (nothing is re-measured)
  [ -f "$OUT/bench.json" ] || { echo "no bench.json to report"; return 1; }
  local e2e_args=()
  [ -f "$OUT/e2e.json" ] && e2e_args=(--e2e-json "$OUT/e2e.json")
  timeout "$LIMIT" "$PY" -m benchmarks.bench_op --rerender --out "$OUT" ${e2e_args[@]+"${e2e_args[@]}"}
}

stage_sweep() {  # the optional second call: the curated sweep, stopping at its budget
  local budget=$(( LIMIT - 60 ))
  [ $budget -lt 60 ] && budget=60
  timeout "$LIMIT" "$PY" -m benchmarks.bench_op --out "$OUT" --time-budget "$budget"
}

main() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  local s fail=0 json=""
  for s in "${stages[@]}"; do
    run_stage "$s"
  done
  echo "::: summary (${SECONDS}s of BUDGET_S=${BUDGET_S}s)"
  printf '%-9s %9s %7s %4s\n' stage budget_s used_s rc
  for s in "${stages[@]}"; do
    printf '%-9s %9s %7s %4s\n' "$s" "${BUDGET[$s]}" "${used[$s]}" "${status[$s]}"
    json+="\"$s\": {\"budget_s\": ${BUDGET[$s]}, \"used_s\": ${used[$s]}, \"rc\": ${status[$s]}}, "
    [ "${status[$s]}" = 0 ] || fail=1
  done
  echo "STAGES {${json%, }, \"total_s\": $SECONDS, \"budget_s\": $BUDGET_S}"
  return $fail
}

main 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
