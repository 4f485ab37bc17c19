#!/usr/bin/env bash
# NOT PART OF CI (it adds a second full dependency build). Cross-builds the stepscope library's
# unit tests for aarch64 Linux and runs the CPU kernel tests on them under qemu's user-mode
# emulator, so the portable (non-x86) kernels are built and checked as aarch64 code:
# the int8 block matmuls (qmatmul), the f32/f16/bf16 row tiles, the half-precision matmul, the
# quantizers and the GGUF weight tests.
#
#   scripts/check-aarch64.sh            # build + run the kernel tests
#   scripts/check-aarch64.sh -- FILTER  # other test filters instead of the default ones
#
# Needs: the pinned Rust toolchain (rustup adds the aarch64-unknown-linux-gnu target), and
# Debian's gcc-aarch64-linux-gnu, g++-aarch64-linux-gnu (C/C++ in ring's and tokenizers'
# build scripts, and the linker) and qemu-user, installed with apt when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
FILTERS=(backend::cpu model::quant model::gguf)
if [ "${1:-}" = "--" ]; then shift; FILTERS=("$@"); fi

need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "check-aarch64: install ${need[*]} (apt), or run as root" >&2
    exit 1
  fi
  echo "[check-aarch64] apt-get install ${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
rustup target add "$TARGET" >/dev/null

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar

echo "[check-aarch64] cargo build --target $TARGET (library, its unit tests and the binary)" >&2
cargo build --release --locked --target "$TARGET" -p stepscope --bin stepscope
cargo test --release --locked --target "$TARGET" -p stepscope --lib --no-run
echo "[check-aarch64] running ${FILTERS[*]} under qemu-aarch64" >&2
cargo test --release --locked --target "$TARGET" -p stepscope --lib -- "${FILTERS[@]}"
file "target/$TARGET/release/stepscope" 2>/dev/null || true
