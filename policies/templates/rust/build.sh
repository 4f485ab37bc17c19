#!/usr/bin/env bash
# Build this crate into a WebAssembly component: ./build.sh [OUT.wasm]  (default build/policy.wasm)
#
# Tools: cargo with the wasm32-wasip2 target (rustup installs it from rust-toolchain.toml; or
# `rustup target add wasm32-wasip2`). The target emits a component directly, so nothing else is
# needed. Cargo's output goes to $CARGO_TARGET_DIR if set, else ./target.
set -euo pipefail

DIR="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:-$DIR/build/policy.wasm}"

die() { echo "build.sh: error: $*" >&2; exit 1; }
command -v cargo >/dev/null 2>&1 || die "cargo not found in PATH (install Rust with rustup; \
in the stepscope repo see rust-toolchain.toml and scripts/setup-policy-toolchains.sh)"
[ -f "$DIR/wit/policy.wit" ] || die "$DIR/wit/policy.wit not found (copy the repo's wit/ directory here)"

TARGET_DIR="${CARGO_TARGET_DIR:-$DIR/target}"
(cd "$DIR" && cargo build --locked --release --target wasm32-wasip2 --target-dir "$TARGET_DIR")
NAME="$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$DIR/Cargo.toml" | head -n1 | tr - _)"
mkdir -p "$(dirname "$OUT")"
cp "$TARGET_DIR/wasm32-wasip2/release/$NAME.wasm" "$OUT"
echo "wrote $OUT ($(wc -c < "$OUT") bytes)" >&2
