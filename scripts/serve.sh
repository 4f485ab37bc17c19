#!/usr/bin/env bash
# README command 1: set up the default model if needed, then serve it with step tracing on,
# writing traces to .cache/traces/steps.jsonl. Extra arguments go to `stepscope serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
model_dir=$(./scripts/setup-default-model.sh --quiet)
mkdir -p .cache/traces
exec cargo run --release --locked --bin stepscope -- serve "$model_dir" \
  --step-tracing-enabled --step-tracing-file .cache/traces/steps.jsonl "$@"
