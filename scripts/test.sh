#!/usr/bin/env bash
# The whole test suite, from a clean checkout on a fresh machine (README command 2; CI runs it).
# Installs what the tests need through the project's own files, then checks formatting and
# lints, then runs every test in the release profile.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== toolchain (rust-toolchain.toml)"
rustup toolchain install          # the pinned toolchain with its components and targets
rustup target add wasm32-unknown-unknown wasm32-wasip2

echo "== default model (SmolLM2-135M-Instruct; its tests must run here)"
./scripts/setup-default-model.sh
export STEPSCOPE_REQUIRE_DEFAULT_MODEL=1 STEPSCOPE_REQUIRE_FIXTURES=1

echo "== llama.cpp's prebuilt CPU build (npm) and the GGUF variants it quantizes (K-quant tests)"
./scripts/setup-llamacpp.sh --quiet >/dev/null
variants_log="$(mktemp)"   # llama.cpp's quantizer prints every tensor; shown only on failure
.cache/venv/bin/python scripts/make_gguf_variants.py >"$variants_log" 2>&1 || { cat "$variants_log"; exit 1; }
rm -f "$variants_log"
export STEPSCOPE_REQUIRE_GGUF_VARIANTS=1

echo "== NVRTC for the kernel-compilation tests (no GPU needed)"
./scripts/install-nvrtc.sh

echo "== end-to-end test environment (tests/python: openai SDK, pytest, Debian's prometheus and promtool)"
./scripts/setup-test-env.sh
# As root, setup-test-env.sh installs Debian's prometheus and chromium (or fails): their tests
# must then run.
if [ "$(id -u)" = 0 ]; then export STEPSCOPE_REQUIRE_PROMETHEUS=1 STEPSCOPE_REQUIRE_CHROMIUM=1; fi

echo "== Arize Phoenix, the OTLP backend of tests/python/test_phoenix.py (its own venv)"
./scripts/setup-phoenix.sh
export STEPSCOPE_REQUIRE_PHOENIX=1

echo "== policy toolchains (C: clang, wasi-libc, wit-bindgen, wasm-tools; Python: componentize-py; JS: componentize-js)"
./scripts/setup-policy-toolchains.sh
export STEPSCOPE_REQUIRE_POLICY_TOOLCHAINS=1
# Compiled Python/JS policies are cached here (not in ~/.cache), so a run leaves nothing behind.
export STEPSCOPE_POLICY_CACHE="$PWD/target/policy-compile-cache"

echo "== formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release --locked -- -D warnings

echo "== scripts that CI does not run (benchmarks, GPU): syntax only"
for script in scripts/*.sh; do bash -n "$script"; done
for script in scripts/llamacpp/*.mjs; do node --check "$script"; done

echo "== tests"
cargo test --workspace --release --locked

echo "== end-to-end tests of stepscope serve (real binary, official openai SDK)"
cargo build --release --locked --bin stepscope
.cache/test-venv/bin/pytest -q tests/python
