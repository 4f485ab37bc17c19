#!/usr/bin/env bash
# NOT PART OF CI. CPU benchmark: stepscope vs llama.cpp on SmolLM2-135M-Instruct, 2 threads each.
#
# llama.cpp is the PREBUILT CPU binary shipped on npm by node-llama-cpp@3.22.1
# (scripts/setup-llamacpp.sh; never built from source), driven by scripts/llamacpp/bench.mjs.
# The weights come in three GGUF formats: the Q4_1 original (scripts/setup-default-model.sh) and
# F16 / Q8_0 re-encodings of the same weights (scripts/make_gguf_variants.py).
#
# For ROUNDS interleaved rounds (default 3), for each of Q4_1, Q8_0, F16:
#   node scripts/llamacpp/bench.mjs FILE --threads T --json        (T in LLAMA_THREADS: 1 and 2)
#   RAYON_NUM_THREADS=2 target/release/stepscope bench model --model FILE --batch 1,16 --json
# Every JSON line ({"engine":..., "model":..., "batch_size":..., "prompt_len":128,
# "prefill_tokens_per_s":..., "decode_tokens_per_s":...}; lines not starting with '{' are
# skipped) goes to .cache/bench-vs-llamacpp/results.jsonl with a "round" key added; then a Markdown
# table of the medians over rounds is printed (and saved as results.md next to it):
#   weights | llama.cpp decode b1 | stepscope | ratio | llama.cpp decode b16 | stepscope | ratio |
#   llama.cpp prefill 128 | stepscope | ratio          (ratio = stepscope / llama.cpp)
# with the machine (lscpu model name; avx2 / avx512_vnni / amx flags) and the date.
#
# Needs: node >= 20 + npm (npm registry), python3, the Rust toolchain (cargo). On a small machine
# run it with nothing else busy: bench.mjs reports the CPU share other processes took
# (other_cpu_load) and the table flags cells measured under contention.
# Environment: ROUNDS (default 3), LLAMA_THREADS (default "1 2": llama.cpp's thread counts, the
# table takes its better one per cell), SKIP_STEPSCOPE=1 (llama.cpp half only: no cargo build, no
# stepscope runs), FORMATS (default "Q4_1 Q8_0 F16"), QUIET_WAIT_S (default 300: before each run,
# wait up to this long for the machine to be idle, i.e. < 10% CPU busy over 2 s; 0 = don't wait),
# TABLE_ONLY=1 (no runs: print the table of the existing results.jsonl again).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
OUT_DIR="$CACHE/bench-vs-llamacpp"
RESULTS="$OUT_DIR/results.jsonl"
ROUNDS="${ROUNDS:-3}"
SKIP_STEPSCOPE="${SKIP_STEPSCOPE:-0}"
FORMATS="${FORMATS:-Q4_1 Q8_0 F16}"
THREADS=2
# llama.cpp also runs at 1 thread: on 2 vCPUs its 2-thread decode was slower than 1 thread, and
# each cell takes llama.cpp's better thread count.
LLAMA_THREADS="${LLAMA_THREADS:-1 2}"
NAME="SmolLM2-135M-Instruct"

say() { echo "[bench-vs-llamacpp] $*" >&2; }
die() { echo "[bench-vs-llamacpp] error: $*" >&2; exit 1; }

[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer (got '$ROUNDS')"
command -v python3 >/dev/null 2>&1 || die "python3 not found"
cd "$ROOT"

if [ "${TABLE_ONLY:-0}" != 1 ]; then  # TABLE_ONLY=1: re-render the table from results.jsonl
# ---- 1. set-up (all idempotent) ----------------------------------------------------------------
say "setting up the model, llama.cpp and the GGUF variants"
scripts/setup-default-model.sh --quiet >/dev/null   # Q4_1 GGUF + .cache/venv with gguf/numpy
scripts/setup-llamacpp.sh --quiet >/dev/null
"$CACHE/venv/bin/python" scripts/make_gguf_variants.py >&2
for fmt in $FORMATS; do
  [ -s "$CACHE/downloads/$NAME.$fmt.gguf" ] || die "missing $CACHE/downloads/$NAME.$fmt.gguf"
done

if [ "$SKIP_STEPSCOPE" != 1 ]; then
  say "cargo build --release -p stepscope"
  cargo build --release -p stepscope >&2
  [ -x target/release/stepscope ] || die "target/release/stepscope was not built"
else
  say "SKIP_STEPSCOPE=1: llama.cpp only"
fi

# ---- 2. interleaved rounds ----------------------------------------------------------------------
mkdir -p "$OUT_DIR"
: >"$RESULTS"
QUIET_WAIT_S="${QUIET_WAIT_S:-300}"
busy_jiffies() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
wait_for_quiet() {
  local waited=0 b0 t0 b1 t1
  [ "$QUIET_WAIT_S" -gt 0 ] || return 0
  while :; do
    read -r b0 t0 < <(busy_jiffies); sleep 2; read -r b1 t1 < <(busy_jiffies)
    # busy share of all CPUs over the last 2 s, in percent
    [ $(( 100 * (b1 - b0) / (t1 - t0 > 0 ? t1 - t0 : 1) )) -lt 10 ] && return 0
    waited=$((waited + 2))
    if [ "$waited" -ge "$QUIET_WAIT_S" ]; then
      say "machine still busy after ${QUIET_WAIT_S}s; measuring anyway (results will be flagged)"
      return 0
    fi
    [ $((waited % 30)) = 0 ] && say "waiting for the machine to go idle (${waited}s)"
  done
}
add_round() { sed -n "s/^{/{\"round\":$1,/p"; }  # keep JSON lines only, tag them with the round

for round in $(seq 1 "$ROUNDS"); do
  for fmt in $FORMATS; do
    gguf="$CACHE/downloads/$NAME.$fmt.gguf"
    wait_for_quiet
    say "round $round/$ROUNDS, $fmt: llama.cpp"
    for t in $LLAMA_THREADS; do
      node scripts/llamacpp/bench.mjs "$gguf" --threads "$t" --json | add_round "$round" >>"$RESULTS"
    done
    if [ "$SKIP_STEPSCOPE" != 1 ]; then
      wait_for_quiet
      say "round $round/$ROUNDS, $fmt: stepscope"
      RAYON_NUM_THREADS=$THREADS target/release/stepscope bench model --model "$gguf" --batch 1,16 --json \
        | add_round "$round" >>"$RESULTS"
    fi
  done
done
say "raw results: $RESULTS ($(wc -l <"$RESULTS") lines)"

fi

# ---- 3. table of medians --------------------------------------------------------------------------
MODEL_NAME="$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n1)"
FLAGS="$(sed -n 's/^flags[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo | head -n1)"
python3 - "$RESULTS" "$MODEL_NAME" "$FLAGS" "$ROUNDS" "$THREADS" "$FORMATS" <<'EOF' | tee "$OUT_DIR/results.md"
import datetime, json, re, statistics, sys

results, cpu, flags, rounds, threads, formats = sys.argv[1:]
flags = set(flags.split())
rows = [json.loads(l) for l in open(results) if l.startswith("{")]

def fmt_of(model):
    m = re.search(r"\.(Q4_1|Q8_0|F16|F32|BF16|Q4_0|Q5_0|Q4_K_M)(\.gguf)?$", str(model))
    return m.group(1) if m else str(model)

def median_at(engine, fmt, batch, key, n_threads):
    vals = [r[key] for r in rows if r.get("engine") == engine and fmt_of(r.get("model")) == fmt
            and r.get("batch_size") == batch and isinstance(r.get(key), (int, float))
            and r.get("threads", int(threads)) == n_threads]
    return (statistics.median(vals), len(vals)) if vals else (None, 0)

def median(engine, fmt, batch, key):
    # stepscope at the benchmark's thread count; llama.cpp at its best thread count (medians per
    # thread count, the larger one): on 2 vCPUs its 2-thread decode can be slower than 1 thread.
    if engine != "llama.cpp":
        return median_at(engine, fmt, batch, key, int(threads))
    found = [median_at(engine, fmt, batch, key, t) for t in sorted({r.get("threads") for r in rows
             if r.get("engine") == engine and isinstance(r.get("threads"), int)})]
    found = [f for f in found if f[0] is not None]
    return max(found) if found else (None, 0)

def num(v):
    return "–" if v is None else f"{v:,.1f}"

def ratio(a, b):
    return "–" if a is None or b is None or a == 0 else f"{b / a:.2f}×"

contended = {(r.get("engine"), fmt_of(r.get("model")), r.get("batch_size")) for r in rows
             if (r.get("other_cpu_load") or 0) > 0.05}
llama_threads = sorted({r.get("threads") for r in rows if r.get("engine") == "llama.cpp"})
print(f"## stepscope vs llama.cpp, SmolLM2-135M-Instruct, stepscope {threads} threads, llama.cpp the "
      f"better of {llama_threads} threads per cell "
      f"(median of {rounds} rounds, tokens/s; ratio = stepscope / llama.cpp)\n")
print("| weights | llama.cpp decode b1 | stepscope decode b1 | ratio | llama.cpp decode b16 | "
      "stepscope decode b16 | ratio | llama.cpp prefill 128 | stepscope prefill 128 | ratio |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for fmt in formats.split():
    l1, _ = median("llama.cpp", fmt, 1, "decode_tokens_per_s")
    s1, _ = median("stepscope", fmt, 1, "decode_tokens_per_s")
    l16, _ = median("llama.cpp", fmt, 16, "decode_tokens_per_s")
    s16, _ = median("stepscope", fmt, 16, "decode_tokens_per_s")
    lp, _ = median("llama.cpp", fmt, 1, "prefill_tokens_per_s")
    sp, _ = median("stepscope", fmt, 1, "prefill_tokens_per_s")
    print(f"| {fmt} | {num(l1)} | {num(s1)} | {ratio(l1, s1)} | {num(l16)} | {num(s16)} | {ratio(l16, s16)} "
          f"| {num(lp)} | {num(sp)} | {ratio(lp, sp)} |")
print()
extra = []
for fmt in formats.split():
    l, _ = median("llama.cpp", fmt, 16, "prefill_tokens_per_s")
    s, _ = median("stepscope", fmt, 16, "prefill_tokens_per_s")
    extra.append(f"{fmt} llama.cpp {num(l)} / stepscope {num(s)}")
print("Prefill of 16 prompts of 128 together (tokens/s): " + "; ".join(extra) + ".\n")
amx = sorted(f for f in flags if f.startswith("amx"))
print(f"Machine: {cpu or 'unknown CPU'}; avx2: {'yes' if 'avx2' in flags else 'no'}, "
      f"avx512_vnni: {'yes' if 'avx512_vnni' in flags else 'no'}, "
      f"amx: {' '.join(amx) if amx else 'no'}. Date: {datetime.date.today().isoformat()}.")
rss = [r["rss_after_load_bytes"] for r in rows if r.get("engine") == "stepscope" and "rss_after_load_bytes" in r]
if rss:
    print(f"stepscope RSS after load: {min(rss) / 2**20:.0f}–{max(rss) / 2**20:.0f} MiB.")
if contended:
    print("\nWARNING: other processes took > 5% of the CPUs during: "
          + ", ".join(f"{e} {f} b{b}" for e, f, b in sorted(contended, key=str))
          + " (see other_cpu_load in results.jsonl); treat those runs as suspect.")
EOF
