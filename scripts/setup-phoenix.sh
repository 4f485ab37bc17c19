#!/usr/bin/env bash
# Set up Arize Phoenix, the OTLP trace backend tests/python/test_phoenix.py sends journeys and
# step spans to, idempotently:
#
#   <repo>/.cache/phoenix-venv/   a venv of its own (Phoenix pins many packages that must not mix
#                                 with the test venv's) with arize-phoenix, pinned below
#
# A second run only checks the stamp and exits. The first takes a few minutes (~850 MB).
# Options: --quiet (print only errors). Environment: PYTHON (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
VENV="$CACHE/phoenix-venv"
# Bump to upgrade; the stamp file makes the next run reinstall.
REQUIREMENTS="arize-phoenix==20.26.1"

QUIET=0
for arg in "$@"; do
  case "$arg" in
    --quiet|-q) QUIET=1 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup-phoenix: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

say() { [ "$QUIET" = 1 ] || echo "[setup-phoenix] $*"; }
die() { echo "[setup-phoenix] error: $*" >&2; exit 1; }

mkdir -p "$CACHE"
PY="${PYTHON:-python3}"
STAMP="$VENV/.stepscope-requirements"
if [ -x "$VENV/bin/phoenix" ] && [ "$(cat "$STAMP" 2>/dev/null || true)" = "$REQUIREMENTS" ]; then
  say "phoenix ready ($VENV)"
  exit 0
fi
say "creating venv $VENV"
# shellcheck source=lib/venv.sh
. "$ROOT/scripts/lib/venv.sh"
make_venv "$VENV"
say "installing $REQUIREMENTS (a few minutes the first time)"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $REQUIREMENTS \
  || die "pip install failed"
[ -x "$VENV/bin/phoenix" ] || die "arize-phoenix installed no phoenix command"
echo "$REQUIREMENTS" >"$STAMP"
say "phoenix ready ($VENV)"
