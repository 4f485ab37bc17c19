#!/usr/bin/env bash
# Build policy.c into a WebAssembly component: ./build.sh [OUT.wasm]  (default build/policy.wasm)
#
# Tools, each from PATH or else from the stepscope repo's .cache/tools/bin (installed by
# scripts/setup-policy-toolchains.sh): wit-bindgen 0.63.0 (C generator), wasm-tools 1.262,
# clang with the wasm32 backend, wasm-ld (lld), wasi-libc and the wasm32 compiler-rt builtins
# (Debian: clang lld wasi-libc libclang-rt-14-dev-wasm32). Environment: CC (default clang),
# WASI_SYSROOT (default: the compiler's own, e.g. Debian's /usr/lib/wasm32-wasi), CFLAGS.
set -euo pipefail

DIR="$(cd "$(dirname "$0")" && pwd)"
REPO_TOOLS="$(cd "$DIR/../../.." && pwd)/.cache/tools/bin"
OUT="${1:-$DIR/build/policy.wasm}"
SOURCES=("$DIR/policy.c")
GEN="$DIR/build/gen"

die() { echo "build.sh: error: $*" >&2; exit 1; }
find_tool() { # name → path, from PATH then the repo cache
  if command -v "$1" >/dev/null 2>&1; then command -v "$1"
  elif [ -x "$REPO_TOOLS/$1" ]; then echo "$REPO_TOOLS/$1"
  else die "$1 not found in PATH or $REPO_TOOLS (run scripts/setup-policy-toolchains.sh in the stepscope repo)"
  fi
}
WIT_BINDGEN="$(find_tool wit-bindgen)"
WASM_TOOLS="$(find_tool wasm-tools)"
CC="${CC:-clang}"
command -v "$CC" >/dev/null 2>&1 || die "$CC not found (install clang, lld, wasi-libc and \
libclang-rt-14-dev-wasm32, or run scripts/setup-policy-toolchains.sh in the stepscope repo)"
[ -f "$DIR/wit/policy.wit" ] || die "$DIR/wit/policy.wit not found (copy the repo's wit/ directory here)"
SYSROOT=()
[ -n "${WASI_SYSROOT:-}" ] && SYSROOT=(--sysroot="$WASI_SYSROOT")

rm -rf "$GEN" && mkdir -p "$GEN" "$(dirname "$OUT")"
log="$("$WIT_BINDGEN" c --world step-policy "$DIR/wit" --out-dir "$GEN" 2>&1)" \
  || { echo "$log" >&2; die "wit-bindgen failed"; }

# A library-like core module: no main, no crt start files (nothing runs before the first export
# call), every export kept by its export_name attribute, no unresolved imports allowed.
# shellcheck disable=SC2086
"$CC" --target=wasm32-wasi "${SYSROOT[@]}" -O2 -std=c11 -Wall -Wextra \
  -nostartfiles -Wl,--no-entry -Wl,--strip-all -Wl,--gc-sections \
  -I "$GEN" ${CFLAGS:-} \
  -o "$DIR/build/policy.core.wasm" \
  "${SOURCES[@]}" "$GEN/step_policy.c" "$GEN/step_policy_component_type.o"

# Refuse to go on if the core module needs WASI preview 1 (there is no adapter in this build).
if "$WASM_TOOLS" print "$DIR/build/policy.core.wasm" | grep -q '(import "wasi_snapshot_preview1"'; then
  "$WASM_TOOLS" print "$DIR/build/policy.core.wasm" | grep '(import ' >&2
  die "the core module imports WASI preview 1 functions (listed above); avoid the libc calls that need them (stdio, clocks, getenv, exit...)"
fi
"$WASM_TOOLS" component new "$DIR/build/policy.core.wasm" -o "$OUT"
"$WASM_TOOLS" validate "$OUT"
echo "wrote $OUT ($(wc -c < "$OUT") bytes)" >&2
