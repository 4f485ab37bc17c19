#!/usr/bin/env bash
# Build app.py into a WebAssembly component: ./build.sh [OUT.wasm]  (default build/policy.wasm)
#        ./build.sh --bindings   writes the generated Python bindings to build/bindings (to read)
#
# Tool: componentize-py 0.25.1, from PATH or else from the stepscope repo's .cache/policy-venv
# (installed by scripts/setup-policy-toolchains.sh). The WIT contract is read from ./wit.
set -euo pipefail

DIR="$(cd "$(dirname "$0")" && pwd)"
REPO_VENV="$(cd "$DIR/../../.." && pwd)/.cache/policy-venv/bin"
APP="${POLICY_APP:-app}"   # the module holding the Policy class

die() { echo "build.sh: error: $*" >&2; exit 1; }
if command -v componentize-py >/dev/null 2>&1; then CPY="$(command -v componentize-py)"
elif [ -x "$REPO_VENV/componentize-py" ]; then CPY="$REPO_VENV/componentize-py"
else die "componentize-py not found in PATH or $REPO_VENV (run scripts/setup-policy-toolchains.sh \
in the stepscope repo, or: pip install componentize-py==0.25.1)"
fi
[ -f "$DIR/wit/policy.wit" ] || die "$DIR/wit/policy.wit not found (copy the repo's wit/ directory here)"

# componentize-py works in a temporary directory: keep it inside build/.
mkdir -p "$DIR/build/tmp"
export TMPDIR="$DIR/build/tmp" PYTHONDONTWRITEBYTECODE=1
trap 'rm -rf "$DIR/build/tmp"' EXIT

if [ "${1:-}" = "--bindings" ]; then
  rm -rf "$DIR/build/bindings"
  "$CPY" -d "$DIR/wit" -w step-policy bindings "$DIR/build/bindings"
  echo "bindings in $DIR/build/bindings" >&2
  exit 0
fi

OUT="${1:-$DIR/build/policy.wasm}"
mkdir -p "$(dirname "$OUT")"
# --stub-wasi: the embedded CPython's WASI imports are replaced by traps/no-ops, so the component
# imports nothing (the policy must not use files, clocks, env or OS randomness anyway).
(cd "$DIR" && "$CPY" -d "$DIR/wit" -w step-policy componentize "$APP" -p "$DIR" --stub-wasi -o "$OUT")
echo "wrote $OUT ($(wc -c < "$OUT") bytes)" >&2
