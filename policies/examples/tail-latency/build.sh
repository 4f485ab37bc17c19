#!/usr/bin/env bash
# Build policy.js into a WebAssembly component: ./build.sh [OUT.wasm]  (default build/policy.wasm)
#
# Tools: node (18+) from PATH, and @bytecodealliance/componentize-js 0.23.0 from ./node_modules
# (`npm install` here) or else from the stepscope repo's policies/node_modules (installed by
# scripts/setup-policy-toolchains.sh). The WIT contract is read from ./wit.
set -euo pipefail

DIR="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$DIR/../../.." && pwd)"
OUT="${1:-$DIR/build/policy.wasm}"
SOURCE="${POLICY_SOURCE:-$DIR/policy.js}"

die() { echo "build.sh: error: $*" >&2; exit 1; }

command -v node >/dev/null 2>&1 || die "node not found in PATH (install Node.js 18+)"
CJS=""
for d in "$DIR/node_modules" "$REPO/policies/node_modules"; do
  if [ -f "$d/@bytecodealliance/componentize-js/src/componentize.js" ]; then
    CJS="$d/@bytecodealliance/componentize-js/src/componentize.js"
    break
  fi
done
[ -n "$CJS" ] || die "componentize-js not found: run scripts/setup-policy-toolchains.sh in the \
stepscope repo, or \`npm install\` in $DIR"
[ -f "$DIR/wit/policy.wit" ] || die "$DIR/wit/policy.wit not found (copy the repo's wit/ directory here)"

# ComponentizeJS works in a temporary directory, and its pre-initializer keeps a compilation cache:
# keep both inside build/.
mkdir -p "$DIR/build/tmp"
trap 'rm -rf "$DIR/build/tmp"' EXIT
TMPDIR="$DIR/build/tmp" POLICY_BUILD_CACHE="$DIR/build/cache" node "$DIR/build.mjs" "$CJS" "$DIR/wit" "$SOURCE" "$OUT"
