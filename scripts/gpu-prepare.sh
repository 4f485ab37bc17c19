#!/usr/bin/env bash
# Builds, on this x86-64 machine, what scripts/gpu-check.sh runs on the GPU machine (which has no
# Rust toolchain): the release unit-test binary of the stepscope crate, stripped, in
# .cache/gpu-carry/ (git-ignored; carry that folder to the device).
#
#   scripts/gpu-prepare.sh
#   then, with the device tool:  run(command="scripts/gpu-check.sh",
#                                    carry=[".cache/gpu-carry"], timeout_s=600)
#
# Environment: CARGO_BUILD_JOBS (default 1), STEPSCOPE_GPU_CARRY (output folder),
# STEPSCOPE_PREPARE_BIN=1 to also carry the stripped `stepscope` binary (mind the 64 MiB limit).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CARRY="${STEPSCOPE_GPU_CARRY:-$ROOT/.cache/gpu-carry}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
mkdir -p "$CARRY"

echo "[gpu-prepare] building the release test binary (cargo test --release --no-run)"
exe="$(cargo test --release --locked -p stepscope --lib --no-run --message-format=json \
  | python3 -c 'import sys, json
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "stepscope" and "lib" in m["target"]["kind"]:
        print(m["executable"])' | tail -n 1)"
[ -n "$exe" ] && [ -x "$exe" ] || { echo "[gpu-prepare] could not find the test binary" >&2; exit 1; }
strip -o "$CARRY/stepscope-lib-tests" "$exe"
if [ "${STEPSCOPE_PREPARE_BIN:-0}" = 1 ]; then
  cargo build --release --locked -p stepscope --bin stepscope
  strip -o "$CARRY/stepscope" target/release/stepscope
fi
# The device checks must run the tests of exactly this tree.
git -C "$ROOT" rev-parse HEAD >"$CARRY/built-from" 2>/dev/null || true
git -C "$ROOT" status --short >>"$CARRY/built-from" 2>/dev/null || true
du -ah "$CARRY" | sort -h
total=$(du -sm "$CARRY" | cut -f1)
if [ "$total" -ge 64 ]; then
  echo "[gpu-prepare] warning: $CARRY is ${total} MiB; the device tool carries at most 64 MiB" >&2
fi
echo "[gpu-prepare] ready: run(command=\"scripts/gpu-check.sh\", carry=[\".cache/gpu-carry\"], timeout_s=600)"
