#!/usr/bin/env bash
# Install llama.cpp's PREBUILT CPU build, as shipped on the npm registry by node-llama-cpp, for the
# llama.cpp side of the CPU benchmark (scripts/bench-vs-llamacpp.sh) and the llama.cpp greedy
# fixture (scripts/llamacpp/greedy.mjs), and for the quantizer that makes the Q4_K_M test file
# (scripts/make_gguf_variants.py; scripts/test.sh runs both).
#
#   <repo>/.cache/llamacpp/
#       package.json package-lock.json        (written here; exact pins)
#       node_modules/node-llama-cpp/          node-llama-cpp@3.22.1 (JS API, llama.cpp tag info)
#       node_modules/@node-llama-cpp/linux-x64/bins/...   the prebuilt CPU binary (llama-addon.node
#                                                         + libggml*/libllama shared libraries)
#
# llama.cpp is never built from source and nothing is downloaded from outside the npm registry:
#   - `npm install --ignore-scripts` : node-llama-cpp's postinstall (which would look for a binary
#     and otherwise clone/build llama.cpp) does not run at all;
#   - NODE_LLAMA_CPP_SKIP_DOWNLOAD=true and NODE_LLAMA_CPP_POSTINSTALL=skip (the package's own
#     switches, see dist/config.js and dist/cli/commands/OnPostInstallCommand.js) are set as well,
#     so even a postinstall that did run would exit at once;
#   - `--omit=optional` plus an explicit dependency on @node-llama-cpp/linux-x64 installs only the
#     CPU prebuilt (not the CUDA/Vulkan ones, which are optional dependencies of node-llama-cpp).
# Then it verifies: the CPU prebuilt is present, getLlama({gpu: false, build: "never",
# skipDownload: true}) loads it (scripts/llamacpp/lib.mjs --check: the llama-addon.node mapped
# into the process must be the linux-x64 prebuilt), and no local build directory, source clone,
# last-build record, xpack (cmake) store or ~/.node-llama-cpp appeared. Each check is printed.
# It also records the llama.cpp commit compiled into the prebuilt (LLAMA_COMMIT, read from
# libllama-common.so with python3 ctypes) in .cache/llamacpp/llama-cpp-build-info.json.
#
# Needs node >= 20 and npm (checked), linux x86_64 with glibc, and the npm registry. Idempotent:
# a second run skips npm when the pinned versions are installed and only re-verifies.
# Options: --force (reinstall node_modules), --quiet (print only the install directory).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
DIR="$CACHE/llamacpp"
NLC_VERSION="3.22.1"
PREBUILT_PKG="@node-llama-cpp/linux-x64"
NLC="$DIR/node_modules/node-llama-cpp"
PREBUILT="$DIR/node_modules/$PREBUILT_PKG"

FORCE=0
QUIET=0
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    --quiet|-q) QUIET=1 ;;
    -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup-llamacpp: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

say() { [ "$QUIET" = 1 ] || echo "[setup-llamacpp] $*"; }
die() { echo "[setup-llamacpp] error: $*" >&2; exit 1; }

# The package's switches: no download, no build, no postinstall (also honoured at run time).
export NODE_LLAMA_CPP_SKIP_DOWNLOAD=true
export NODE_LLAMA_CPP_POSTINSTALL=skip
export npm_config_node_llama_cpp_postinstall=skip

# ---- 0. prerequisites ------------------------------------------------------------------------
[ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ] \
  || die "only linux x86_64 is supported (this is $(uname -s) $(uname -m))"
command -v node >/dev/null 2>&1 || die "node not found (install Node.js >= 20)"
command -v npm >/dev/null 2>&1 || die "npm not found (install npm, it comes with Node.js)"
NODE_MAJOR="$(node -p 'process.versions.node.split(".")[0]')"
[ "$NODE_MAJOR" -ge 20 ] || die "node $(node --version) is too old; node-llama-cpp $NLC_VERSION needs >= 20"
say "node $(node --version), npm $(npm --version)"

installed_ok() {
  [ -f "$NLC/package.json" ] && [ -f "$PREBUILT/package.json" ] || return 1
  [ "$(node -p "require('$NLC/package.json').version")" = "$NLC_VERSION" ] || return 1
  [ "$(node -p "require('$PREBUILT/package.json').version")" = "$NLC_VERSION" ]
}

mkdir -p "$DIR"

# One setup at a time (flock is in util-linux; skip the lock where it is missing).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE/.setup-llamacpp.lock"
  if ! flock -n 9; then
    say "another setup is running; waiting for it"
    flock 9
  fi
fi

# ---- 1. npm install (registry only, no scripts) ----------------------------------------------
if [ "$FORCE" = 0 ] && installed_ok; then
  say "node-llama-cpp@$NLC_VERSION and $PREBUILT_PKG@$NLC_VERSION already installed in $DIR"
else
  rm -rf "$DIR/node_modules"
  cat >"$DIR/package.json" <<EOF
{
  "name": "stepscope-llamacpp",
  "private": true,
  "description": "llama.cpp prebuilt CPU binary via node-llama-cpp, for scripts/llamacpp/*.mjs (written by scripts/setup-llamacpp.sh)",
  "dependencies": {
    "node-llama-cpp": "$NLC_VERSION",
    "$PREBUILT_PKG": "$NLC_VERSION"
  }
}
EOF
  say "npm install node-llama-cpp@$NLC_VERSION $PREBUILT_PKG@$NLC_VERSION (--ignore-scripts --omit=optional)"
  (cd "$DIR" && npm install --ignore-scripts --omit=optional --no-audit --no-fund \
      --loglevel=error) >"$DIR/npm-install.log" 2>&1 \
    || die "npm install failed (see $DIR/npm-install.log)"
  installed_ok || die "npm install did not produce node-llama-cpp@$NLC_VERSION + $PREBUILT_PKG@$NLC_VERSION"
fi

# ---- 2. verify: prebuilt present, loads with build "never" + gpu off, nothing built/downloaded --
BINARY="$(cd "$PREBUILT" && find bins -name 'llama-addon.node' | sort | head -n1)"
[ -n "$BINARY" ] || die "no llama-addon.node in $PREBUILT (the prebuilt CPU binary is missing)"
say "check: prebuilt CPU binary present: $PREBUILT_PKG/$BINARY"

# Things that would only exist if node-llama-cpp had built llama.cpp or fetched anything:
# local builds, a clone of llama.cpp's source, the last-build record, the cmake xpack store,
# the CLI's home directory (downloaded models/releases).
SUSPECTS=(
  "$NLC/llama/localBuilds"
  "$NLC/llama/llama.cpp"
  "$NLC/llama/lastBuild.json"
  "$NLC/llama/xpack/store"
  "$NLC/llama/xpack/cache"
  "$NLC/.temp"
  "$HOME/.node-llama-cpp"
)
check_no_build() {
  local p
  for p in "${SUSPECTS[@]}"; do
    [ ! -e "$p" ] || die "found $p: something was built or downloaded (remove it, or rerun with --force)"
  done
}
check_no_build

# lib.mjs --check: getLlama({gpu: false, build: "never", skipDownload: true}), then the path of the
# llama-addon.node really mapped into the process (it throws unless that is the linux-x64 prebuilt).
OUT="$(node "$ROOT/scripts/llamacpp/lib.mjs" --check)" \
  || die "node-llama-cpp could not load its prebuilt CPU binary with build \"never\" and gpu off"
say "check: getLlama({gpu: false, build: \"never\", skipDownload: true}) loaded: $OUT"

# The llama.cpp commit baked into the prebuilt (common/build-info.cpp), for provenance records.
BINDIR="$(dirname "$PREBUILT/$BINARY")"
if command -v python3 >/dev/null 2>&1 \
  && INFO="$(python3 - "$BINDIR" "$DIR/llama-cpp-build-info.json" <<'EOF'
import ctypes, json, os, sys
lib = ctypes.CDLL(os.path.join(sys.argv[1], "libllama-common.so"))
info = {
    "llama_build_number": ctypes.c_int.in_dll(lib, "LLAMA_BUILD_NUMBER").value,
    "llama_commit": ctypes.c_char_p.in_dll(lib, "LLAMA_COMMIT").value.decode(),
    "llama_compiler": ctypes.c_char_p.in_dll(lib, "LLAMA_COMPILER").value.decode(),
    "llama_build_target": ctypes.c_char_p.in_dll(lib, "LLAMA_BUILD_TARGET").value.decode(),
}
with open(sys.argv[2], "w") as f:
    json.dump(info, f)
print(json.dumps(info))
EOF
)"; then
  say "llama.cpp build info (from libllama-common.so): $INFO"
else
  say "note: could not read LLAMA_COMMIT from libllama-common.so (python3 missing?)"
fi
check_no_build
say "check: no local build, source clone, lastBuild.json, xpack store or ~/.node-llama-cpp appeared"
say "ready: $DIR"
[ "$QUIET" = 1 ] && echo "$DIR"
exit 0
