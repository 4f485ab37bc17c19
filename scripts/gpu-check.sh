#!/usr/bin/env bash
# CUDA checks on the GPU machine (run through the device tool; see scripts/gpu-prepare.sh):
#   1. locate libcuda, libnvrtc and libcublas and say what was found;
#   2. kernels compile with this machine's NVRTC, for its own sm_XY too;
#   3. parity of the CUDA runner with the CPU runner: builtin:tiny, the fixture models and a
#      variant (bf16 and f16), then a random Llama of realistic size (bf16): relative error of
#      the logits <= 1e-2, greedy ids equal for 32 tokens;
#   4. decode benchmark at batch 1, 32, 128 next to the HBM floor.
# Output also goes to $OUT/gpu-check.log (the device tool brings $OUT back).
# Uses the binaries in .cache/gpu-carry (STEPSCOPE_GPU_CARRY); builds nothing.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CARRY="${STEPSCOPE_GPU_CARRY:-$ROOT/.cache/gpu-carry}"
LOG_DIR="${OUT:-$ROOT/.cache/gpu-out}"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu-check.log"
: >"$LOG"
say() { echo "[gpu-check] $*" | tee -a "$LOG"; }
TEST_BIN="$CARRY/stepscope-lib-tests"
[ -x "$TEST_BIN" ] || { say "missing $TEST_BIN: run scripts/gpu-prepare.sh here first and carry .cache/gpu-carry"; exit 2; }
[ -f "$CARRY/built-from" ] && say "binaries built from: $(head -n 1 "$CARRY/built-from")"

say "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,power.draw \
  --format=csv 2>&1 | tee -a "$LOG"
nproc | sed 's/^/cpus: /' | tee -a "$LOG"

say "== CUDA libraries"
dirs=()
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
  [ -d "$d" ] && dirs+=("$d")
done
# pip wheels (nvidia-cuda-nvrtc, nvidia-cublas, ...) of the machine's python3
while IFS= read -r d; do [ -n "$d" ] && [ -d "$d" ] && dirs+=("$d"); done < <(python3 - 2>/dev/null <<'PY'
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
ldconfig -p 2>/dev/null | grep -E 'libcuda\.so\.1|libnvrtc\.so|libcublas\.so' | sed 's/^/  ldconfig:/' | tee -a "$LOG"
command -v nvcc >/dev/null && nvcc --version | tail -n 2 | tee -a "$LOG"

export STEPSCOPE_REPO_ROOT="$ROOT"
export STEPSCOPE_REQUIRE_CUDA=1  # on this machine a missing device is a failure, not a skip
export RUST_BACKTRACE=1
status=0
say "== kernels, parity (tiny models, realistic random Llama)"
"$TEST_BIN" --test-threads=1 --nocapture --include-ignored backend::cuda::tests 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
say "== runner checks, prefill attention against the CPU runner"
"$TEST_BIN" --test-threads=1 --nocapture backend::cuda::runner::tests 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
say "== decode benchmark"
"$TEST_BIN" --test-threads=1 --nocapture --include-ignored bench::cuda 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 | tee -a "$LOG"
say "done (status $status); log: $LOG"
exit "$status"
