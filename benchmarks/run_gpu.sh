#!/usr/bin/env bash
# The GPU session's script: ONE call of at most 9 minutes (BUDGET_S=540; give the call timeout_s 570)
# that returns the whole docs/spec.md §4 table, the FFN row included, checked and stamped:
#
#   build     pip install -e . (the CUDA extension, this GPU's architecture only)            build.log
#   warm      the JIT warm-up: every provider x case of spec and ffn once, WARM_PROCS processes
#             in parallel (python -m benchmarks.gpu_plan --warm), and the sanitizer's case once
#             (no sanitizer): Triton's disk cache filled before anything is timed             build.log
#   spec      bench_op --spec: the §4 op rows + ragged + decode (eager and graph-replayed), every
#             row its own budget (--row-budget), bench.json rewritten after every row         bench.json bench.md
#   ffn       bench_ffn: the FFN §4 row and its neighbours, every row its own budget          ffn.json ffn.md
#   e2e       bench_e2e: eager and PEFT first, then each fused backend, each isolated (one that
#             raises is recorded, the rest still run), e2e.json after every variant           e2e.json
#   tests     a trimmed bf16 GPU smoke run; its summary survives the timeout (timeout -s INT,
#             a per-test timeout, -rfE)                                                        tests.log
#   sanitize  optional, only with SANITIZE_MIN_S left: compute-sanitizer memcheck of one gemm-variant
#             bf16 case and a bf16 decode batch (tools/sanitize_triton.py --gemm)              tests.log
#   report    bench.md re-rendered with the e2e row; at most 8 files left under $OUT          bench.md
#
# Every stage has its own budget and a timeout of the smaller of it and what is left of BUDGET_S
# (REPORT_RESERVE_S kept for the report); every stage runs even when an earlier one failed; results
# are written as each row finishes. run.log starts and ends with nvcc's version, the GPU's clocks,
# power and temperature, and ends with a table of each stage's budget, seconds used and exit status
# (also as one JSON line, "STAGES {...}").
#
#   bash benchmarks/run_gpu.sh --stamp     # here (with .git): prints MOECL_GIT_COMMIT=... MOECL_GIT_DIRTY=...
#   MOECL_GIT_COMMIT=<sha> MOECL_GIT_DIRTY=<hash|clean> bash benchmarks/run_gpu.sh   # on the GPU machine
#   bash benchmarks/run_gpu.sh --dry-run   # CPU (CI): stages, budgets, rows, kernels to warm, files to return
#
# The device copy of the tree has no .git, so the commit and the hash of uncommitted changes travel in
# the environment; the script refuses to run without them (it computes them where .git exists).
# Environment: OUT (default benchmarks/results/gpu), BUDGET_S (540), PYTHON (python3), WARM_PROCS (8),
# TORCH_CUDA_ARCH_LIST (default: this GPU's architecture only).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
WARM_PROCS=${WARM_PROCS:-8}
REPORT_RESERVE_S=12
SANITIZE_MIN_S=30
export PYTHONUNBUFFERED=1

STAGES=(build warm spec ffn e2e tests sanitize report)
declare -A BUDGET=([build]=100 [warm]=75 [spec]=135 [ffn]=60 [e2e]=70 [tests]=55 [sanitize]=30 [report]=10)
ROW_BUDGET=15      # seconds per bench_op row (8 rows: the dry run checks they fit the spec budget)
FFN_ROW_BUDGET=9   # seconds per bench_ffn row (5 rows)
PROVIDERS=eager,triton-addmm,triton-fused,triton-gemm-ptr,triton-gemm-tma,triton-gemm-tma-2cta,triton-gemm-decode-1wave,cuda,peft,peft-mixed,grouped_mm
FFN_PROVIDERS=two-ffn,eager,triton
FILES=(run.log build.log tests.log bench.json bench.md ffn.json ffn.md e2e.json)  # all that comes back
MAX_FILES=8
TESTS=(tests/test_triton_backend.py tests/test_triton_variants.py tests/test_cuda_backend.py tests/test_ffn_triton.py)
TESTS_K="graph or sync or torch_compile or strided or bfloat16"

stamp() {  # the commit and a hash of uncommitted changes (tracked diffs and untracked files), from .git
  git rev-parse --git-dir >/dev/null 2>&1 || return 1
  local head dirty
  head=$(git rev-parse HEAD) || return 1
  dirty=$( { git diff HEAD --binary; git ls-files --others --exclude-standard -z | xargs -0 -r sha256sum; } \
           | sha256sum | cut -c1-16)
  if [ -z "$(git status --porcelain)" ]; then dirty=clean; fi
  echo "MOECL_GIT_COMMIT=$head"
  echo "MOECL_GIT_DIRTY=$dirty"
}

dry_run() {  # the whole plan on a CPU: fails here, not on the GPU, when it is broken
  local s total=0 bad=0 n_files=${#FILES[@]}
  echo "plan: one call, BUDGET_S=${BUDGET_S}s (give the device call timeout_s $(( BUDGET_S + 30 )))"
  printf '%-9s %8s  %s\n' stage budget_s writes
  for s in "${STAGES[@]}"; do
    [ -n "${BUDGET[$s]+x}" ] || { echo "ERROR: stage $s has no budget"; bad=1; continue; }
    declare -F "stage_$s" >/dev/null || { echo "ERROR: stage $s has no stage_$s"; bad=1; }
    total=$(( total + BUDGET[$s] ))
    printf '%-9s %8s  %s\n' "$s" "${BUDGET[$s]}" "$(writes "$s")"
  done
  echo "total of the stage budgets: ${total}s of ${BUDGET_S}s"
  [ "$total" -le "$BUDGET_S" ] || { echo "ERROR: the stages' budgets add up to more than BUDGET_S"; bad=1; }
  echo "files returned under \$OUT (${n_files}, at most ${MAX_FILES}): ${FILES[*]}"
  [ "$n_files" -le "$MAX_FILES" ] || { echo "ERROR: more than ${MAX_FILES} files"; bad=1; }
  for s in "${STAGES[@]}"; do  # every file a stage writes is one of FILES
    for f in $(writes "$s"); do
      [[ " ${FILES[*]} " == *" $f "* ]] || { echo "ERROR: stage $s writes $f, not in FILES"; bad=1; }
    done
  done
  echo "tests: ${TESTS[*]} -m gpu -k \"$TESTS_K\""
  for f in "${TESTS[@]}" tools/sanitize_triton.py; do [ -f "$f" ] || { echo "ERROR: $f missing"; bad=1; }; done
  echo "kernels to compile (warm-up units, ${WARM_PROCS} processes):"
  env -u TRITON_INTERPRET "$PY" -m benchmarks.gpu_plan --dry-run --providers "$PROVIDERS" --ffn-providers "$FFN_PROVIDERS" \
    --row-budget "$ROW_BUDGET" --ffn-row-budget "$FFN_ROW_BUDGET" --spec-budget "${BUDGET[spec]}" \
    --ffn-budget "${BUDGET[ffn]}" || bad=1
  echo "dry run: $([ $bad -eq 0 ] && echo OK || echo FAILED)"
  return $bad
}

writes() {  # the files under $OUT a stage writes
  case $1 in
    build|warm) echo build.log ;; spec) echo bench.json bench.md ;; ffn) echo ffn.json ffn.md ;;
    e2e) echo e2e.json ;; tests|sanitize) echo tests.log ;; report) echo bench.md run.log ;;
  esac
}

gpu_state() {  # clocks, power, temperature, throttle reasons (read-only: nothing is changed)
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,power.draw,power.limit,temperature.gpu,clocks_event_reasons.active \
    --format=csv 2>/dev/null || nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu \
    --format=csv || echo "nvidia-smi: not available"
}

left() { echo $(( BUDGET_S - SECONDS )); }
cap() {  # timeout of a stage: its budget, within what is left of BUDGET_S (the report's reserve kept)
  local reserve=$REPORT_RESERVE_S
  [ "$2" = report ] && reserve=2
  local l=$(( $(left) - reserve ))
  [ "$l" -gt "$1" ] && l=$1
  [ "$l" -lt 1 ] && l=1
  echo "$l"
}

declare -A status used
run_stage() {  # name: runs stage_<name> under its cap, records exit status and duration
  local name=$1 t0=$SECONDS limit
  limit=$(cap "${BUDGET[$name]}" "$name")
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
  echo "=== build: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" >>"$OUT/build.log"
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
  tail -n 4 "$OUT/build.log"
  return $rc
}

stage_warm() {  # WARM_PROCS processes, each a shard of the provider x case units; Triton caches on disk
  echo "=== warm: ${WARM_PROCS} processes" >>"$OUT/build.log"
  local i pids=() rc=0
  for (( i = 0; i < WARM_PROCS; i++ )); do
    timeout "$LIMIT" "$PY" -m benchmarks.gpu_plan --warm --shard "$i/$WARM_PROCS" --providers "$PROVIDERS" \
      --ffn-providers "$FFN_PROVIDERS" >"$SCRATCH/warm.$i.log" 2>&1 &
    pids+=($!)
  done
  # the sanitizer's case too (its shapes differ): compiled here, not under compute-sanitizer later
  MOECL_TRITON_VARIANT=gemm timeout "$LIMIT" "$PY" tools/sanitize_triton.py --gemm >"$SCRATCH/warm.sanitize.log" 2>&1 &
  pids+=($!)
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || rc=$?; done
  cat "$SCRATCH"/warm.*.log >>"$OUT/build.log"
  grep -c ": ok" "$SCRATCH"/warm.*.log | awk -F: '{n += $2} END {print n " units warmed"}'
  grep -h "FAILED" "$SCRATCH"/warm.*.log | head -n 5
  return $rc
}

stage_spec() {  # bench_op rewrites bench.json after every row; each row has its own budget
  timeout "$LIMIT" "$PY" -m benchmarks.bench_op --spec --no-plot --out "$OUT" --providers "$PROVIDERS" \
    --row-budget "$ROW_BUDGET" >"$SCRATCH/spec.log" 2>&1
  local rc=$?
  grep -E "^\[|FAIL|error" "$SCRATCH/spec.log" | tail -n 30
  return $rc
}

stage_ffn() {  # bench_ffn rewrites ffn.json after every row
  timeout "$LIMIT" "$PY" -m benchmarks.bench_ffn --out "$OUT" --providers "$FFN_PROVIDERS" \
    --row-budget "$FFN_ROW_BUDGET" >"$SCRATCH/ffn.log" 2>&1
  local rc=$?
  grep -E "^\[|^Target|FAIL|error" "$SCRATCH/ffn.log" | tail -n 20
  return $rc
}

stage_e2e() {  # e2e.md stays in scratch (bench.md carries the row); e2e.json is copied even when cut short
  timeout "$LIMIT" "$PY" -m benchmarks.bench_e2e --out "$SCRATCH" >"$SCRATCH/e2e.log" 2>&1
  local rc=$?
  tail -n 8 "$SCRATCH/e2e.log"
  [ -f "$SCRATCH/e2e.json" ] && cp "$SCRATCH/e2e.json" "$OUT/e2e.json"
  return $rc
}

stage_tests() {  # trimmed smoke run; SIGINT at the cap so pytest still prints its summary (-rfE)
  local extra=()
  "$PY" -c "import xdist" 2>/dev/null && extra+=(-n 8)
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 45)
  echo "=== tests: ${TESTS[*]} -k \"$TESTS_K\" ${extra[*]}" >>"$OUT/tests.log"
  timeout -s INT -k 10 "$LIMIT" "$PY" -m pytest -m gpu -q -rfE --no-header -p no:cacheprovider ${extra[@]+"${extra[@]}"} \
    "${TESTS[@]}" -k "$TESTS_K" >>"$OUT/tests.log" 2>&1
  local rc=$?
  tail -n 3 "$OUT/tests.log"
  return $rc
}

stage_sanitize() {  # optional: only with SANITIZE_MIN_S left before the report's reserve
  if [ $(( $(left) - REPORT_RESERVE_S )) -lt "$SANITIZE_MIN_S" ]; then
    echo "sanitize: skipped, $(left)s left" | tee -a "$OUT/tests.log"
    return 0
  fi
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found" | tee -a "$OUT/tests.log"; return 1; }
  echo "=== sanitize: memcheck tools/sanitize_triton.py --gemm (MOECL_TRITON_VARIANT=gemm)" >>"$OUT/tests.log"
  MOECL_TRITON_VARIANT=gemm PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$LIMIT" compute-sanitizer --tool memcheck \
    --error-exitcode 99 "$PY" tools/sanitize_triton.py --gemm >>"$OUT/tests.log" 2>&1
  local rc=$?
  echo "memcheck sanitize_triton.py --gemm: rc=$rc" | tee -a "$OUT/tests.log"
  return $rc
}

stage_report() {  # bench.md again, now with the end-to-end row (nothing is re-measured); <= MAX_FILES files
  local rc=0 f
  if [ -f "$OUT/bench.json" ]; then
    local e2e_args=()
    [ -f "$OUT/e2e.json" ] && e2e_args=(--e2e-json "$OUT/e2e.json")
    timeout "$LIMIT" "$PY" -m benchmarks.bench_op --rerender --out "$OUT" ${e2e_args[@]+"${e2e_args[@]}"} \
      >"$SCRATCH/report.log" 2>&1
    rc=$?
    awk '/^## .*§4 targets/ {p = 1; print; next} p && /^## / {exit} p' "$OUT/bench.md"
  else
    echo "no bench.json to report"; rc=1
  fi
  for f in "$OUT"/*; do  # anything beyond FILES stays on the machine (at most 8 files come back)
    [[ " ${FILES[*]} " == *" $(basename "$f") "* ]] || { echo "not returned: $(basename "$f")"; mv "$f" "$SCRATCH/"; }
  done
  return $rc
}

main() {
  echo "=== run_gpu.sh $(date -u +%FT%TZ) commit ${MOECL_GIT_COMMIT} uncommitted ${MOECL_GIT_DIRTY} BUDGET_S=${BUDGET_S}"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not found"
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "--- GPU at start"; gpu_state
  local s fail=0 json=""
  for s in "${STAGES[@]}"; do
    run_stage "$s"
  done
  echo "--- GPU at end"; gpu_state
  echo "::: summary (${SECONDS}s of BUDGET_S=${BUDGET_S}s)"
  printf '%-9s %9s %7s %4s\n' stage budget_s used_s rc
  for s in "${STAGES[@]}"; do
    printf '%-9s %9s %7s %4s\n' "$s" "${BUDGET[$s]}" "${used[$s]}" "${status[$s]}"
    json+="\"$s\": {\"budget_s\": ${BUDGET[$s]}, \"used_s\": ${used[$s]}, \"rc\": ${status[$s]}}, "
    [ "${status[$s]}" = 0 ] || fail=1
  done
  echo "STAGES {${json%, }, \"total_s\": $SECONDS, \"budget_s\": $BUDGET_S}"
  return $fail
}

case "${1:-}" in
  --stamp) stamp || { echo "no .git here: pass MOECL_GIT_COMMIT and MOECL_GIT_DIRTY" >&2; exit 2; }; exit 0 ;;
  --dry-run) dry_run; exit $? ;;
  "") ;;
  *) echo "usage: $0 [--dry-run | --stamp]" >&2; exit 2 ;;
esac
if [ -z "${MOECL_GIT_COMMIT:-}" ] || [ -z "${MOECL_GIT_DIRTY:-}" ]; then
  if st=$(stamp 2>/dev/null); then eval "export $(echo "$st" | tr '\n' ' ')"; fi
fi
if [ -z "${MOECL_GIT_COMMIT:-}" ] || [ -z "${MOECL_GIT_DIRTY:-}" ]; then
  echo "refusing to run: set MOECL_GIT_COMMIT and MOECL_GIT_DIRTY (run 'bash benchmarks/run_gpu.sh --stamp' where .git is)" >&2
  exit 2
fi
export MOECL_GIT_COMMIT MOECL_GIT_DIRTY
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SCRATCH=$(mktemp -d)
: >"$OUT/build.log"
: >"$OUT/tests.log"
main 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
