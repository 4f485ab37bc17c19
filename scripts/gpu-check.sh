#!/usr/bin/env bash
# CUDA checks on the GPU machine (run through the device tool; see scripts/gpu-prepare.sh).
# Uses the test binary in .cache/gpu-carry (STEPSCOPE_GPU_CARRY); builds nothing. Steps, in order:
#   device            nvidia-smi: name, driver, memory, clocks, power; CPU count
#   libs              locate libcuda, libnvrtc and libcublas, say what was found, export the dirs
#   list              the test binary lists its tests: every test named below must exist, and a
#                     test of backend::cuda::tests or bench::cuda* that is neither run here nor
#                     known to be CPU-only is reported
#   smoke             first device contact, seconds: `auto` picks the GPU and builds the tiny
#                     model; invalid batches are refused like the CPU runner refuses them
#   parity-tiny       CUDA runner vs CPU runner on builtin:tiny, the fixture models and a
#                     variant, bf16 and f16 (the kernels compile at start-up for this GPU's sm_XY)
#   parity-long       a 700-token prompt next to short ones (decode splits attention over 11-12
#                     key ranges) on the tiny model, the variant and a head_dim-128 model,
#                     eagerly and with CUDA graphs on the same runner
#   parity-prefill    the tensor-core prefill attention (prompts of 64+ new tokens) against the
#                     CPU runner, and against the paged kernel alone, head_dim 16/32/128
#   parity-realistic  the same on a random Llama of realistic size (bf16, f16, skinny GEMM
#                     forced, with graphs); all parity steps apply the rule of check_parity in
#                     backend/cuda/tests.rs: row logit error <= 1e-2 (3e-2 bf16 on the small
#                     models), greedy ids equal wherever the CPU's margin exceeds 4x the row's
#                     RMS logit error (near-ties printed), graphs equal eager to 1e-6
#   bench             decode benchmark at batch 1, 32, 128 over a KV cache filled by a real
#                     prefill, next to the HBM floor; graph logits equal eager on one runner
#   tracing           step tracing off / default rates / 1.0-1.0 on the engine loop over the
#                     CUDA runner (the realistic random Llama, CUDA graphs on), interleaved
#                     rounds: tokens/s and the ratio to off
#   clocks            nvidia-smi again: clocks, temperature, power after the load
# Tests are run by exact name (--exact), so the CPU-only tests of the same modules (NVRTC
# compilation for fixed targets, ptxas spills, the CPU kernel emulator, ...) do not spend device
# time; CI runs those. A test step passes only if the binary exits 0 AND reports as many passed
# tests as it was given (a renamed test cannot pass by running nothing).
#
# Every step runs under `timeout` with its own limit; a step that fails or times out is recorded
# and the next one runs. A step also never gets more than what is left of the overall budget
# (less 15 s for the summary), so the script ends, with its summary, within the budget.
# The summary (step, status, duration, limit) is printed at the end in every case (also on
# SIGTERM/SIGINT) and appended to $OUT/gpu-check.log with everything else. Exit status: 0 if
# every step that was asked for passed, 1 otherwise, 2 for a usage error or a missing binary.
#
#   scripts/gpu-check.sh [--skip STEP]... [--only STEP]... [--budget SECONDS]
#                        [--timeout STEP=SECONDS]... [--help]
# Environment: STEPSCOPE_GPU_CHECK_BUDGET (seconds, default 540),
#   STEPSCOPE_GPU_CHECK_TIMEOUT_<STEP> (STEP upper-cased, '-' as '_', e.g.
#   STEPSCOPE_GPU_CHECK_TIMEOUT_PARITY_REALISTIC=240), STEPSCOPE_GPU_CARRY, OUT.
# Give the device tool a timeout_s of at least the budget plus a minute (e.g. 600 for 540).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

STEPS=(device libs list smoke parity-tiny parity-long parity-prefill parity-realistic bench tracing clocks)
# Default limits (seconds). Their sum exceeds the budget on purpose: most steps take far less
# than their limit, and the budget caps the total whatever happens.
declare -A LIMIT=(
  [device]=20 [libs]=30 [list]=20 [smoke]=45
  [parity-tiny]=75 [parity-long]=60 [parity-prefill]=45 [parity-realistic]=150 [bench]=150 [tracing]=90 [clocks]=15
)
declare -A TESTS=(
  [smoke]="backend::cuda::tests::missing_device_is_an_error_not_a_panic backend::cuda::tests::cuda_rejects_invalid_batches_like_the_cpu"
  [parity-tiny]="backend::cuda::tests::cuda_matches_cpu_on_tiny_models"
  [parity-long]="backend::cuda::tests::cuda_matches_cpu_on_long_contexts_and_head_dim_128"
  [parity-prefill]="backend::cuda::runner::tests::prefill_attention_matches_the_cpu_runner"
  [parity-realistic]="backend::cuda::tests::cuda_matches_cpu_on_a_realistic_random_llama"
  [bench]="bench::cuda::cuda_decode_benchmark"
  [tracing]="bench::cuda_tracing::cuda_tracing_overhead_benchmark"
)
# Tests of the same modules that need no GPU (CI runs them): not run here.
CPU_ONLY=(
  backend::cuda::tests::kernels_compile_with_nvrtc
  backend::cuda::tests::hot_kernels_do_not_spill_registers
  backend::cuda::tests::compile_errors_name_the_file_and_line
  backend::cuda::tests::kernels_include_only_the_common_header
  backend::cuda::tests::kernels_behave_on_the_cpu_emulator
  backend::cuda::tests::cuda_refuses_unsupported_models_cleanly
  bench::cuda_tracing::the_checks_hold_on_the_deterministic_runner
)
SUMMARY_RESERVE=15

usage() {
  sed -n '2,/^set -uo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  echo
  echo "Limits now (seconds):"
  for s in "${STEPS[@]}"; do printf '  %-17s %s\n' "$s" "${LIMIT[$s]}"; done
  echo "  budget            $BUDGET"
}

is_step() { local s; for s in "${STEPS[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
env_name() { local u="${1^^}"; echo "STEPSCOPE_GPU_CHECK_TIMEOUT_${u//-/_}"; }
is_seconds() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -gt 0 ]; }
die_usage() { echo "gpu-check.sh: $*" >&2; echo "see scripts/gpu-check.sh --help" >&2; exit 2; }

BUDGET="${STEPSCOPE_GPU_CHECK_BUDGET:-540}"
is_seconds "$BUDGET" || die_usage "STEPSCOPE_GPU_CHECK_BUDGET=$BUDGET is not a number of seconds"
for s in "${STEPS[@]}"; do
  v="$(env_name "$s")"
  if [ -n "${!v:-}" ]; then
    is_seconds "${!v}" || die_usage "$v=${!v} is not a number of seconds"
    LIMIT[$s]="${!v}"
  fi
done

declare -A SKIP=() ONLY=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --skip|--only)
      [ $# -ge 2 ] || die_usage "$1 needs a step name"
      is_step "$2" || die_usage "unknown step '$2' (steps: ${STEPS[*]})"
      if [ "$1" = --skip ]; then SKIP[$2]=1; else ONLY[$2]=1; fi
      shift 2 ;;
    --skip=*|--only=*)
      s="${1#*=}"
      is_step "$s" || die_usage "unknown step '$s' (steps: ${STEPS[*]})"
      if [[ "$1" == --skip=* ]]; then SKIP[$s]=1; else ONLY[$s]=1; fi
      shift ;;
    --budget)
      [ $# -ge 2 ] && is_seconds "$2" || die_usage "--budget needs a number of seconds"
      BUDGET="$2"; shift 2 ;;
    --timeout)
      [ $# -ge 2 ] || die_usage "--timeout needs STEP=SECONDS"
      s="${2%%=*}"; v="${2#*=}"
      is_step "$s" || die_usage "unknown step '$s' (steps: ${STEPS[*]})"
      is_seconds "$v" || die_usage "--timeout $2: not a number of seconds"
      LIMIT[$s]="$v"; shift 2 ;;
    *) die_usage "unknown argument '$1'" ;;
  esac
done

CARRY="${STEPSCOPE_GPU_CARRY:-$ROOT/.cache/gpu-carry}"
LOG_DIR="${OUT:-$ROOT/.cache/gpu-out}"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu-check.log"
: >"$LOG"
say() { echo "[gpu-check] $*" | tee -a "$LOG"; }
TEST_BIN="$CARRY/stepscope-lib-tests"
[ -x "$TEST_BIN" ] || { say "missing $TEST_BIN: run scripts/gpu-prepare.sh here first and carry .cache/gpu-carry"; exit 2; }
[ -f "$CARRY/built-from" ] && say "binaries built from: $(head -n 1 "$CARRY/built-from")"
command -v timeout >/dev/null || { say "coreutils' timeout is missing: cannot bound the steps"; exit 2; }

TMP="$(mktemp -d)"
STEP_OUT="$TMP/step.out"
now_ms() { date +%s%3N; }
T0="$(now_ms)"
left_s() { echo $(( BUDGET - ($(now_ms) - T0) / 1000 )); }

# ---- running one command under a limit -----------------------------------------------------
# run_cmd LIMIT CMD...: output to the terminal, the log and $STEP_OUT (only $STEP_OUT when
# QUIET=1); sets RC and TIMED_OUT.
CMD_PID=""
INTERRUPTED=""
on_signal() {
  INTERRUPTED="$1"
  # timeout(1) passes the signal on to the command it runs.
  [ -n "$CMD_PID" ] && kill -TERM "$CMD_PID" 2>/dev/null
}
trap 'on_signal SIGTERM' TERM
trap 'on_signal SIGINT' INT
trap 'on_signal SIGHUP' HUP

run_cmd() {
  local limit="$1"; shift
  : >"$STEP_OUT"
  local t="$(now_ms)"
  timeout --kill-after=10 "$limit" "$@" >>"$STEP_OUT" 2>&1 </dev/null &
  CMD_PID=$!
  local tail_pid=""
  if [ "${QUIET:-0}" != 1 ]; then
    tail -s 0.2 -n +1 -f --pid="$CMD_PID" "$STEP_OUT" | tee -a "$LOG" &
    tail_pid=$!
  fi
  RC=0
  wait "$CMD_PID" || RC=$?
  # A signal makes `wait` return early: wait again for the command to end.
  while [ -n "$INTERRUPTED" ] && kill -0 "$CMD_PID" 2>/dev/null; do
    wait "$CMD_PID"; RC=$?
  done
  [ -z "$tail_pid" ] || wait "$tail_pid" 2>/dev/null
  CMD_PID=""
  TIMED_OUT=0
  if { [ "$RC" = 124 ] || [ "$RC" = 137 ]; } && [ $(( $(now_ms) - t )) -ge $(( limit * 1000 - 500 )) ]; then
    TIMED_OUT=1
  fi
}

# ---- the steps: each sets RC and TIMED_OUT, and may set NOTE --------------------------------
step_device() {
  run_cmd "$1" nvidia-smi \
    --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,power.draw \
    --format=csv
  nproc | sed 's/^/cpus: /' | tee -a "$LOG"
}

step_clocks() {
  run_cmd "$1" nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
}

step_libs() {
  local limit="$1" t; t="$(now_ms)"
  local dirs=() d
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    [ -d "$d" ] && dirs+=("$d")
  done
  # pip wheels (nvidia-cuda-nvrtc, nvidia-cublas, ...) of the machine's python3
  while IFS= read -r d; do [ -n "$d" ] && [ -d "$d" ] && dirs+=("$d"); done < <(timeout "$limit" python3 - 2>/dev/null <<'PY'
import glob, os
try:
    import nvidia
    for base in list(nvidia.__path__):
        for lib in sorted(glob.glob(os.path.join(base, "*", "lib"))):
            print(lib)
except Exception:
    pass
PY
)
  LIB_DIRS="$(IFS=:; echo "${dirs[*]}")"
  export STEPSCOPE_CUDA_LIB_DIRS="$LIB_DIRS"
  export LD_LIBRARY_PATH="$LIB_DIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  say "search dirs: $LIB_DIRS"
  for d in "${dirs[@]}"; do
    ls -1 "$d" 2>/dev/null | grep -E '^lib(cuda\.so\.1|nvrtc\.so|nvrtc-builtins\.so|cublas\.so|cublasLt\.so)' \
      | sed "s|^|  $d/|" | tee -a "$LOG"
  done
  local rest=$(( limit - ($(now_ms) - t) / 1000 ))
  [ "$rest" -ge 1 ] || rest=1
  timeout "$rest" ldconfig -p 2>/dev/null | grep -E 'libcuda\.so\.1|libnvrtc\.so|libcublas\.so' | sed 's/^/  ldconfig:/' | tee -a "$LOG"
  command -v nvcc >/dev/null && timeout "$rest" nvcc --version | tail -n 2 | tee -a "$LOG"
  RC=0; TIMED_OUT=0
  [ $(( $(now_ms) - t )) -lt $(( limit * 1000 )) ] || { RC=124; TIMED_OUT=1; }
}

step_list() {
  QUIET=1 run_cmd "$1" "$TEST_BIN" --list
  if [ "$RC" != 0 ]; then tee -a "$LOG" <"$STEP_OUT"; return 0; fi
  local have="$TMP/tests.txt"
  sed -n 's/: test$//p' "$STEP_OUT" | sort >"$have"
  local s t missing=() unknown=()
  for s in "${STEPS[@]}"; do
    for t in ${TESTS[$s]:-}; do grep -qxF "$t" "$have" || missing+=("$t ($s)"); done
  done
  local known; known="$(printf '%s\n' "${TESTS[@]}" | tr ' ' '\n'; printf '%s\n' "${CPU_ONLY[@]}")"
  while IFS= read -r t; do
    grep -qxF "$t" <<<"$known" || unknown+=("$t")
  done < <(grep -E '^(backend::cuda::tests|bench::cuda|bench::cuda_tracing)::' "$have")
  say "$(wc -l <"$have") tests in the binary"
  for t in "${unknown[@]}"; do
    say "WARNING: $t is neither run here nor listed as CPU-only (add it to TESTS or CPU_ONLY in scripts/gpu-check.sh)"
  done
  [ ${#unknown[@]} = 0 ] || NOTE="${#unknown[@]} test(s) not covered"
  if [ ${#missing[@]} -gt 0 ]; then
    for t in "${missing[@]}"; do say "missing from the test binary: $t"; done
    RC=1; NOTE="${#missing[@]} test(s) missing"
  fi
}

step_tests() {
  local limit="$1" step="$2"
  # shellcheck disable=SC2086  # the names have no spaces
  local names=(${TESTS[$step]})
  run_cmd "$limit" "$TEST_BIN" --exact --test-threads=1 --nocapture --include-ignored "${names[@]}"
  local passed
  passed="$(grep -E '^test result: ' "$STEP_OUT" | tail -n 1 | sed -nE 's/.* ([0-9]+) passed;.*/\1/p')"
  NOTE="${passed:-0}/${#names[@]} passed"
  if [ "$RC" = 0 ] && [ "${passed:-0}" != "${#names[@]}" ]; then
    RC=1
    say "expected ${#names[@]} test(s) to pass, the binary reports ${passed:-none}"
  fi
}

# ---- main loop ---------------------------------------------------------------------------------
export STEPSCOPE_REPO_ROOT="$ROOT"
export STEPSCOPE_REQUIRE_CUDA=1  # on this machine a missing device is a failure, not a skip
export RUST_BACKTRACE=1

declare -A STATUS=() DUR=() USED_LIMIT=()
failed=0
for s in "${STEPS[@]}"; do
  if [ -n "$INTERRUPTED" ]; then STATUS[$s]="not run ($INTERRUPTED)"; failed=1; continue; fi
  if [ -n "${SKIP[$s]:-}" ]; then STATUS[$s]="skipped (--skip)"; continue; fi
  if [ ${#ONLY[@]} -gt 0 ] && [ -z "${ONLY[$s]:-}" ]; then STATUS[$s]="skipped (--only)"; continue; fi
  limit="${LIMIT[$s]}"
  left=$(( $(left_s) - SUMMARY_RESERVE ))
  if [ "$left" -lt 5 ]; then
    STATUS[$s]="NOT RUN (budget spent)"; failed=1
    say "== $s: not run, the budget of $BUDGET s is spent"
    continue
  fi
  [ "$limit" -le "$left" ] || limit="$left"
  USED_LIMIT[$s]="$limit"
  say "== $s (limit ${limit} s)"
  RC=0; TIMED_OUT=0; NOTE=""
  t="$(now_ms)"
  case "$s" in
    device) step_device "$limit" ;;
    libs) step_libs "$limit" ;;
    list) step_list "$limit" ;;
    clocks) step_clocks "$limit" ;;
    *) step_tests "$limit" "$s" ;;
  esac
  DUR[$s]=$(( $(now_ms) - t ))
  if [ -n "$INTERRUPTED" ]; then
    STATUS[$s]="INTERRUPTED ($INTERRUPTED)"; failed=1
  elif [ "$TIMED_OUT" = 1 ]; then
    STATUS[$s]="TIMED OUT"; failed=1
  elif [ "$RC" != 0 ]; then
    STATUS[$s]="FAILED rc=$RC"; failed=1
  else
    STATUS[$s]="ok"
  fi
  [ -n "$NOTE" ] && [ "$TIMED_OUT" = 0 ] && [ -z "$INTERRUPTED" ] && STATUS[$s]+=" ($NOTE)"
  say "== $s: ${STATUS[$s]} in $(awk -v ms="${DUR[$s]}" 'BEGIN { printf "%.1f s", ms / 1000 }')"
done

{
  echo
  echo "[gpu-check] == summary (budget $BUDGET s, used $(( ($(now_ms) - T0) / 1000 )) s)"
  printf '%-17s %-34s %9s %7s\n' step status time limit
  for s in "${STEPS[@]}"; do
    if [ -n "${DUR[$s]:-}" ]; then
      d="$(awk -v ms="${DUR[$s]}" 'BEGIN { printf "%.1f s", ms / 1000 }')"
      l="${USED_LIMIT[$s]} s"
    else
      d="-"; l="-"
    fi
    printf '%-17s %-34s %9s %7s\n' "$s" "${STATUS[$s]}" "$d" "$l"
  done
  echo "[gpu-check] $([ "$failed" = 0 ] && echo "all steps passed" || echo "SOME STEPS FAILED"); log: $LOG"
} | tee -a "$LOG"
rm -rf "$TMP"
exit "$failed"
