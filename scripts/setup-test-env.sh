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
# A second run only checks them and exits (well under a second). The venv is made with
# `python3 -m venv`, or, where that is unavailable (Debian without python3-venv), with virtualenv
# installed from PyPI, as scripts/setup-default-model.sh does. The Debian packages are installed
# with apt-get when missing and we are root; otherwise the script says which command would
# install them, and their tests are skipped (scripts/test.sh, run as root, requires them).
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
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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

# ---- 2. Debian packages: prometheus (and promtool), chromium ---------------------------------
# apt_tool NAME "PACKAGES" COMMANDS...: installs PACKAGES with apt-get (as root) unless every
# command is already there; otherwise says how, and that NAME's tests are skipped.
APT_UPDATED=0
apt_tool() {
  local name="$1" packages="$2" missing=0 cmd
  shift 2
  for cmd in "$@"; do command -v "$cmd" >/dev/null 2>&1 || missing=1; done
  if [ "$missing" = 0 ]; then
    say "$name ready"
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian's $packages (for the $name tests)"
    export DEBIAN_FRONTEND=noninteractive
    if [ "$APT_UPDATED" = 0 ]; then
      apt-get update -qq >/dev/null || die "apt-get update failed"
      APT_UPDATED=1
    fi
    # --no-install-recommends: only the programs are needed; no package service is started in
    # containers (policy-rc.d), and the tests start their own on free ports.
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $packages >/dev/null \
      || die "apt-get install $packages failed"
    for cmd in "$@"; do
      command -v "$cmd" >/dev/null 2>&1 || die "$packages did not provide $cmd"
    done
    say "$name ready"
  else
    say "$name is missing and cannot be installed here (not root, or no apt-get):"
    say "  install it with: sudo apt-get update && sudo apt-get install -y $packages"
    say "  (the $name tests are skipped without it)"
  fi
}

apt_tool "prometheus" "prometheus" prometheus promtool
apt_tool "chromium" "chromium fonts-dejavu-core" chromium
