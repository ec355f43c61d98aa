#!/usr/bin/env bash
# Set up micro from this checkout: a virtual environment in .venv with micro and the
# development tools installed. Safe to run again; asks nothing.
set -euo pipefail
cd "$(dirname "$0")"

quiet=""
[[ "${1:-}" == "--quiet" ]] && quiet="-q"
say() { [[ -n "$quiet" ]] || echo "install.sh: $*"; }

python=""
for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
  [[ -n "$candidate" ]] || continue
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    python=$(command -v "$candidate")
    break
  fi
done
if [[ -z "$python" ]]; then
  echo "install.sh: micro needs Python 3.11 or newer; install it, or point PYTHON at one" >&2
  exit 1
fi

if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv with $python"
  "$python" -m venv .venv
fi
say "installing micro and its development tools into .venv"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip &&
       .venv/bin/python -m pip install --disable-pip-version-check -e '.[dev]'; } >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" >&2
  echo "install.sh: pip could not install micro (its output is above)" >&2
  exit 1
fi
[[ -n "$quiet" ]] || grep -E "^Successfully installed" "$log" || true
.venv/bin/micro --version >/dev/null || { echo "install.sh: the micro command does not run" >&2; exit 1; }

say "done: micro is $(pwd)/.venv/bin/micro ($(.venv/bin/micro --version))"
say "use it as .venv/bin/micro, or put it on your PATH with: source .venv/bin/activate"
