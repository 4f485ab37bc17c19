#!/usr/bin/env bash
# README command 1: set up the default model if needed, then serve it with step tracing on,
# writing traces to .cache/traces/steps.jsonl. Extra arguments go to `stepscope serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
model_dir=$(./scripts/setup-default-model.sh --quiet)
mkdir -p .cache/traces
cat >&2 <<'HOW'
[serve.sh] sampled steps go to .cache/traces/steps.jsonl; to look at them (the server can keep running):
[serve.sh]   target/release/stepscope trace summary .cache/traces/steps.jsonl        # estimates with 95% intervals
[serve.sh]   target/release/stepscope trace report  .cache/traces/steps.jsonl -o report.html
[serve.sh]   target/release/stepscope trace perfetto .cache/traces/steps.jsonl -o trace.json  # ui.perfetto.dev
HOW
exec cargo run --release --locked --bin stepscope -- serve "$model_dir" \
  --step-tracing-enabled --step-tracing-file .cache/traces/steps.jsonl "$@"
