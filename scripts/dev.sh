#!/usr/bin/env bash
# flowbus set-up and the two things people run:
#   bash scripts/dev.sh up [flowbus up options]   install, then run the embedded default (Ctrl-C stops it)
#   bash scripts/dev.sh test [pytest options]     install, then run the whole test suite
# Installs everything the project needs into ./.venv (Python 3.11 + the package with its test extra).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null || {
  echo "flowbus needs Python 3.11 (found: $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2; exit 2; }

setup() {
  if [ ! -x .venv/bin/python ]; then
    echo "dev.sh: creating .venv with $("$PY" --version)" >&2
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
  fi
  # re-install when pyproject.toml changed since the last install
  local stamp=.venv/.flowbus-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "dev.sh: installing flowbus and its dependencies (first time: ~1 min, Ray is large) ..." >&2
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
  fi
}

# Tests run inside a fresh network namespace that has only loopback, when this machine allows
# it (root, unshare): nothing a test starts can reach or listen on any other interface.
in_loopback_netns() {
  if [ "${FLOWBUS_NO_NETNS:-}" != "1" ] && command -v unshare >/dev/null && unshare --net true 2>/dev/null; then
    unshare --net -- sh -c 'ip link set lo up 2>/dev/null || true; exec "$@"' sh "$@"
  else
    "$@"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  up)
    setup
    exec .venv/bin/flowbus up "$@"
    ;;
  test)
    setup
    in_loopback_netns .venv/bin/python -m pytest -q "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: bash scripts/dev.sh {up|test|setup} [options]" >&2
    exit 2
    ;;
esac
