#!/usr/bin/env bash
# Decision-call latency of the same policy logic in Rust, C, Python and JavaScript, side by side
# in one run: builds the four templates (policies/templates/*, each the default policy's logic)
# and runs `stepscope bench policy --language …` on them, after the native Rust function.
# Needs the toolchains of scripts/setup-policy-toolchains.sh and a release build of stepscope.
# Usage: scripts/bench-policy-languages.sh [ITERATIONS [BENCH ARGS…]]   (default 100000)
#   e.g. `… 100000 --fuel 0` (deadline only); STEPSCOPE_BIN picks another stepscope binary
#   (to compare builds side by side on the same components).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ITERATIONS="${1:-100000}"
shift || true
BIN="${STEPSCOPE_BIN:-$ROOT/target/release/stepscope}"
[ -x "$BIN" ] || { echo "bench-policy-languages: build first: cargo build --release" >&2; exit 1; }
OUT="$ROOT/target/policy-languages"
mkdir -p "$OUT"
args=(--language "rust-builtin=builtin:default")
for lang in rust c python js; do
  echo "== building policies/templates/$lang" >&2
  bash "$ROOT/policies/templates/$lang/build.sh" "$OUT/$lang.wasm" >&2
  args+=(--language "$lang=$OUT/$lang.wasm")
done
"$BIN" bench policy --iterations "$ITERATIONS" "${args[@]}" "$@"
