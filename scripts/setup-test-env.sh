#!/usr/bin/env bash
# Set up what the end-to-end tests in tests/python/ need, idempotently:
#
#   <repo>/.cache/test-venv/   a private Python venv with pinned openai, pytest, requests, oteltest,
#                              trustme (certificates for the OTLP-over-TLS test), schemathesis
#                              (fuzzes the API from its /openapi.json)
#   /usr/bin/promtool          from Debian's `prometheus` package (for `promtool check metrics`)
#   /usr/bin/prometheus        the same package's server (scrapes `serve` in the dashboard test)
#   /usr/bin/chromium          Debian's `chromium` (opens `stepscope trace report`'s HTML headless,
#                              driven over the DevTools protocol with websocket-client)
#
# A second run only checks both and exits (well under a second). The venv is made with
# `python3 -m venv`, or, where that is unavailable (Debian without python3-venv), with virtualenv
# installed from PyPI, as scripts/setup-default-model.sh does. promtool is installed with apt-get
# when missing and we are root (it needs `apt-get update` first); otherwise the script says which
# command would install it, and the promtool test is skipped.
# Options: --quiet (print only errors). Environment: PYTHON (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
VENV="$CACHE/test-venv"
# Bump together; the stamp file makes the next run reinstall.
REQUIREMENTS="openai==3.57.0 pytest==9.2.0 requests==2.34.2 oteltest==0.49.0 trustme==1.2.1 schemathesis==4.32.5 websocket-client==1.9.2"

QUIET=0
for arg in "$@"; do
  case "$arg" in
    --quiet|-q) QUIET=1 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup-test-env: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

say() { [ "$QUIET" = 1 ] || echo "[setup-test-env] $*"; }
die() { echo "[setup-test-env] error: $*" >&2; exit 1; }

mkdir -p "$CACHE"

# ---- 1. the venv -----------------------------------------------------------------------------
PY="${PYTHON:-python3}"
STAMP="$VENV/.stepscope-requirements"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null || true)" = "$REQUIREMENTS" ]; then
  say "venv ready ($VENV)"
else
  command -v "$PY" >/dev/null 2>&1 || die "$PY not found (install CPython 3.9+ with pip, or set PYTHON)"
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    say "creating venv $VENV"
    # shellcheck source=lib/venv.sh
    . "$ROOT/scripts/lib/venv.sh"
    make_venv "$VENV"
  fi
  say "installing into the venv: $REQUIREMENTS"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $REQUIREMENTS \
    || die "pip install failed"
  echo "$REQUIREMENTS" >"$STAMP"
fi

# ---- 2. prometheus and promtool --------------------------------------------------------------
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  say "prometheus and promtool ready ($(command -v prometheus), $(command -v promtool))"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "installing Debian's prometheus package (prometheus and promtool)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed"
  # --no-install-recommends: only the two binaries are needed; the package's service is not
  # started in containers (policy-rc.d); the tests start their own server on a free port.
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    || die "apt-get install prometheus failed"
  command -v promtool >/dev/null 2>&1 || die "the prometheus package did not provide promtool"
  command -v prometheus >/dev/null 2>&1 || die "the prometheus package did not provide prometheus"
  say "prometheus and promtool ready"
else
  say "prometheus/promtool are missing and cannot be installed here (not root, or no apt-get):"
  say "  install it with: sudo apt-get update && sudo apt-get install -y prometheus"
  say "  (the prometheus and promtool tests are skipped without it)"
fi

# ---- 3. chromium ------------------------------------------------------------------------------
if command -v chromium >/dev/null 2>&1; then
  say "chromium ready ($(command -v chromium))"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "installing Debian's chromium (for the trace report's browser test)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null \
    || die "apt-get install chromium failed"
  command -v chromium >/dev/null 2>&1 || die "the chromium package did not provide chromium"
  say "chromium ready"
else
  say "chromium is missing and cannot be installed here (not root, or no apt-get):"
  say "  install it with: sudo apt-get update && sudo apt-get install -y chromium"
  say "  (the trace report's browser test is skipped without it)"
fi

