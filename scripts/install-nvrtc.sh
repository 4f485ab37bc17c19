#!/usr/bin/env bash
# Installs NVRTC (no driver, no GPU needed) from NVIDIA's PyPI wheel into <repo>/.cache/nvrtc,
# so that the test suite can compile every kernel in kernels/ with NVRTC on a CPU-only machine
# (host/src/backend/cuda/tests.rs, `kernels_compile_with_nvrtc`).
#
#   scripts/install-nvrtc.sh          # ~95 MB download the first time; ~10 ms when present
#   scripts/install-nvrtc.sh --quiet  # print only the library directory
#
# Prints the library directory (libnvrtc.so.12, libnvrtc-builtins.so.12.*); the tests find it
# there by themselves (no LD_LIBRARY_PATH needed; STEPSCOPE_NVRTC_ROOT overrides the location).
# No CUDA headers are installed: the kernels include none (only kernels/common.cuh), so NVRTC
# alone compiles them, here and at start-up on a GPU machine. Idempotent; concurrent runs are
# serialised with flock. Needs only CPython 3 with pip and network access to PyPI.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${STEPSCOPE_NVRTC_ROOT:-$ROOT/.cache/nvrtc}"
PYTHON="${PYTHON:-python3}"
# Pinned: the versions the kernels were last compiled with.
NVRTC_WHEEL="nvidia-cuda-nvrtc-cu12==12.9.86"
STAMP="$TARGET/.stepscope-installed"
STAMP_TEXT="$NVRTC_WHEEL"
LIB_DIR="$TARGET/nvidia/cuda_nvrtc/lib"

QUIET=0
for arg in "$@"; do
  case "$arg" in
    --quiet|-q) QUIET=1 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-nvrtc: unknown argument: $arg" >&2; exit 2 ;;
  esac
done
say() { [ "$QUIET" = 1 ] || echo "[install-nvrtc] $*"; }

complete() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_TEXT" ] \
    && compgen -G "$LIB_DIR/libnvrtc.so.*" >/dev/null
}

if ! complete; then
  mkdir -p "$(dirname "$TARGET")"
  exec 9>"$TARGET.lock"
  flock 9
  if ! complete; then
    say "installing $NVRTC_WHEEL into $TARGET"
    rm -rf "$TARGET.tmp"
    PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check \
      --no-deps --no-compile --target "$TARGET.tmp" "$NVRTC_WHEEL"
    rm -rf "$TARGET"
    mv "$TARGET.tmp" "$TARGET"
    echo "$STAMP_TEXT" >"$STAMP"
  fi
fi

if [ "$QUIET" = 1 ]; then
  echo "$LIB_DIR"
else
  say "NVRTC: $(ls "$LIB_DIR" | grep -E '^libnvrtc\.so\.' | head -n 1) in $LIB_DIR"
fi
