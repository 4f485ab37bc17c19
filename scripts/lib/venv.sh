# Sourced by the setup scripts: make_venv DIR creates a Python venv at DIR (replacing what is
# there) with $PY (default python3). Where `python -m venv` fails (Debian's python3 without
# python3-venv has no ensurepip) it bootstraps virtualenv from PyPI into .cache and uses that; it
# bundles its own pip. PIP_BREAK_SYSTEM_PACKAGES only matters for --target on PEP 668 systems and
# is ignored by pips that predate it. Needs CACHE (the repo's .cache) and a `die` function.
make_venv() {
  local venv="$1" py="${PY:-python3}"
  mkdir -p "$CACHE"
  command -v "$py" >/dev/null 2>&1 || die "$py not found (install CPython 3 with pip, or set PYTHON)"
  rm -rf "$venv"
  if "$py" -m venv "$venv" >/dev/null 2>"$CACHE/venv-error.log"; then
    rm -f "$CACHE/venv-error.log"
    return 0
  fi
  echo "python -m venv failed ($(tail -n1 "$CACHE/venv-error.log")); bootstrapping with virtualenv" >&2
  rm -rf "$venv" "$CACHE/virtualenv-bootstrap" "$CACHE/venv-error.log"
  PIP_BREAK_SYSTEM_PACKAGES=1 "$py" -m pip install --quiet --disable-pip-version-check \
    --target "$CACHE/virtualenv-bootstrap" "virtualenv==20.*" \
    || die "could not install virtualenv either; install python3-venv (Debian: apt-get install python3-venv)"
  PYTHONPATH="$CACHE/virtualenv-bootstrap" "$py" -m virtualenv --quiet "$venv" \
    || die "virtualenv could not create $venv"
}
