#!/usr/bin/env bash
# Install the toolchains that build policy components in C, Python and JavaScript, idempotently
# (Rust needs nothing beyond rust-toolchain.toml). Everything lands under <repo>/.cache/ except the
# Debian packages:
#
#   C           clang, lld, wasi-libc, libclang-rt-14-dev-wasm32   (Debian, apt-get)
#               .cache/tools/bin/wit-bindgen    wit-bindgen-cli, C generator only (crates.io)
#               .cache/tools/bin/wasm-tools     `component new` / `validate` / `print` (crates.io)
#   Python      .cache/policy-venv/bin/componentize-py                             (PyPI)
#   JavaScript  policies/node_modules/@bytecodealliance/componentize-js            (npm, from the
#               lock file policies/package-lock.json)
#
# A second run only checks what is there (about a second). A cold run takes about 8 minutes on two
# cores, nearly all of it `cargo install` of wasm-tools and wit-bindgen-cli.
# Options: --quiet. Environment: PYTHON (default python3), JOBS (cargo -j, default: all cores).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
TOOLS="$CACHE/tools"
PYVENV="$CACHE/policy-venv"

# Pinned versions; bump here only.
WIT_BINDGEN_VERSION=0.63.0          # the same version as the guests' wit-bindgen crate
WASM_TOOLS_VERSION=1.262.0          # matches the host's wit-component 0.262
COMPONENTIZE_PY_VERSION=0.25.1
APT_PACKAGES="clang lld wasi-libc libclang-rt-14-dev-wasm32"

QUIET=0
for arg in "$@"; do
  case "$arg" in
    --quiet|-q) QUIET=1 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup-policy-toolchains: unknown argument: $arg" >&2; exit 2 ;;
  esac
done
say() { [ "$QUIET" = 1 ] || echo "[setup-policy-toolchains] $*"; }
die() { echo "[setup-policy-toolchains] error: $*" >&2; exit 1; }
mkdir -p "$CACHE" "$TOOLS"

# ---- C: Debian's clang with the wasm32-wasi sysroot ---------------------------------------------
missing=""
for pkg in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -z "$missing" ]; then
  say "C toolchain ready (clang $(clang --version | head -n1 | sed 's/.*version //;s/ .*//'), wasi-libc)"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed"
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null \
    || die "apt-get install$missing failed"
else
  die "missing Debian packages:$missing (install them with: sudo apt-get install -y$missing)"
fi

# ---- C: wit-bindgen (C generator) and wasm-tools, from crates.io --------------------------------
install_crate() { # crate version binary features...
  local crate="$1" version="$2" binary="$3"; shift 3
  if [ -x "$TOOLS/bin/$binary" ] && "$TOOLS/bin/$binary" --version 2>/dev/null | grep -q " $version"; then
    say "$binary $version ready"
    return
  fi
  say "cargo install $crate@$version (a few minutes)"
  cargo install --quiet --locked --root "$TOOLS" ${JOBS:+-j "$JOBS"} "$crate@$version" "$@" \
    || die "cargo install $crate@$version failed"
}
install_crate wit-bindgen-cli "$WIT_BINDGEN_VERSION" wit-bindgen --no-default-features --features c
install_crate wasm-tools "$WASM_TOOLS_VERSION" wasm-tools --no-default-features \
  --features component,print,parse,validate

# ---- Python: componentize-py in its own venv ------------------------------------------------------
PY="${PYTHON:-python3}"
if [ -x "$PYVENV/bin/componentize-py" ] && "$PYVENV/bin/pip" show componentize-py 2>/dev/null \
    | grep -qx "Version: $COMPONENTIZE_PY_VERSION"; then
  say "componentize-py $COMPONENTIZE_PY_VERSION ready"
else
  say "installing componentize-py $COMPONENTIZE_PY_VERSION into $PYVENV"
  # shellcheck source=lib/venv.sh
  . "$ROOT/scripts/lib/venv.sh"
  make_venv "$PYVENV"
  "$PYVENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "componentize-py==$COMPONENTIZE_PY_VERSION" || die "pip install componentize-py failed"
fi

# ---- JavaScript: componentize-js from the committed lock file -------------------------------------
command -v npm >/dev/null 2>&1 || die "npm not found (install Node.js 20+ with npm)"
if [ -f "$ROOT/policies/node_modules/@bytecodealliance/componentize-js/package.json" ] \
    && [ "$ROOT/policies/node_modules/.package-lock.json" -nt "$ROOT/policies/package-lock.json" ]; then
  say "componentize-js ready"
else
  say "npm ci in policies/ (componentize-js)"
  (cd "$ROOT/policies" && npm ci --silent --no-audit --no-fund) || die "npm ci failed in policies/"
fi
say "all policy toolchains ready"
