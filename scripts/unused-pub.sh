#!/usr/bin/env bash
# Lists `pub` items of the stepscope library that nothing uses.
#
# rustc does not warn about unused `pub` items of a library, since another crate might use them.
# This script copies the host crate to a scratch directory, turns the library into modules of the
# binary (main.rs declares lib.rs's modules, `stepscope::` becomes `crate::`) and every `pub` into
# `pub(crate)`, then runs `cargo check` and prints rustc's dead-code warnings: items that neither
# the binary nor (with --tests) the unit tests reach. Integration tests (host/tests) are not
# compiled, so an item only they use is listed too; read each line before deleting.
#
# Usage: scripts/unused-pub.sh [--tests]   (--tests: what not even the unit tests use)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/ws"
cp "$root/Cargo.lock" "$root/rust-toolchain.toml" "$scratch/ws/"
sed "s|members = \[\"host\", \"tests\"\]|members = [\"host\"]|" "$root/Cargo.toml" >"$scratch/ws/Cargo.toml"
for d in host policies wit kernels; do cp -r "$root/$d" "$scratch/ws/$d"; done
rm -rf "$scratch/ws/host/tests" "$scratch/ws/host/benches"
python3 - "$scratch/ws/host" <<'PY'
import pathlib, re, sys
host = pathlib.Path(sys.argv[1])
src = host / "src"
lib = (src / "lib.rs").read_text()
main = (src / "main.rs").read_text()
mods = "\n".join(l for l in lib.splitlines() if re.match(r"\s*(pub )?mod \w+;", l))
main = main.replace("stepscope::", "crate::")
(src / "main.rs").write_text(main + "\n" + mods + "\n")
(src / "lib.rs").unlink()
for f in src.rglob("*.rs"):
    if f.name == "main.rs":
        continue
    s = f.read_text()
    s = re.sub(r"\bpub(\s)", r"pub(crate)\1", s)
    f.write_text(s)
PY
cd "$scratch/ws"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}/unused-pub"
mode=()
[ "${1:-}" = "--tests" ] && mode=(--profile test)
cargo check -p stepscope --bin stepscope "${mode[@]}" --message-format=short 2>&1 \
  | tee /tmp/unused-pub.log | grep -E "warning: .*(never used|never constructed|never read|unused)" \
  | sed "s|$scratch/ws/||" | sort -u || true
