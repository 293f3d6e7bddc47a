#!/usr/bin/env bash
# flowbus set-up and the two things people run:
#   bash scripts/dev.sh up [flowbus up options]   install, then run the embedded default (Ctrl-C stops it)
#   bash scripts/dev.sh demo [options]            install, then run the cross-backend demo pipeline once
#   bash scripts/dev.sh test [pytest options]     install, lint (scripts/lint.sh), then run the whole test suite
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
    .venv/bin/python -m pip install -q -e '.[test,soma,wms]'
    touch "$stamp"
  fi
  setup_ecflow
}

# ecFlow 5.9.2 from Debian (server, CLI client, and the Python module, which is cp311 only):
# apt packages when missing (needs root, no prompts), then only the `ecflow` package dir is
# symlinked into .venv (no other Debian module leaks in), and the loopback bind shim the test
# fixtures preload into ecflow_server (it always binds 0.0.0.0) is built into .venv/lib.
ECFLOW_DEBS="ecflow-server ecflow-client python3-ecflow"
# the dashboard's browser tests drive Debian's headless Chromium through its chromium-driver
BROWSER_DEBS="chromium chromium-driver"
setup_ecflow() {
  local missing="" pkg
  for pkg in $ECFLOW_DEBS $BROWSER_DEBS; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "dev.sh: installing Debian packages:$missing" >&2
      DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
      # shellcheck disable=SC2086  # word splitting of the package list is intended
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >&2
    else
      echo "dev.sh: Debian packages missing ($missing ); install them as root (apt-get); ecFlow and browser tests will be skipped" >&2
    fi
  fi
  local site
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if [ -d /usr/lib/python3/dist-packages/ecflow ] && [ ! -e "$site/ecflow" ]; then
    ln -sfn /usr/lib/python3/dist-packages/ecflow "$site/ecflow"
  fi
  local shim=.venv/lib/libloopback_bind.so
  if [ ! -f "$shim" ] || [ scripts/loopback_bind.c -nt "$shim" ]; then
    if command -v gcc >/dev/null; then
      gcc -O2 -shared -fPIC -o "$shim" scripts/loopback_bind.c -ldl
    else
      echo "dev.sh: no gcc; ecFlow test servers cannot be kept on loopback (tests will skip)" >&2
    fi
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
  demo)
    setup
    exec .venv/bin/flowbus demo "$@"
    ;;
  test)
    setup
    # ruff and mypy strict first (offline; ~30 s cold, ~1 s with the caches in .lint/): a lint error fails the run
    bash scripts/lint.sh
    # two pytest workers (pytest-xdist), a test file each at a time: most tests wait on real servers,
    # so two share the 2 cores well; FLOWBUS_TEST_WORKERS=1 runs them one by one
    workers=${FLOWBUS_TEST_WORKERS:-2}; par=()
    if [ "$workers" -gt 1 ]; then par=(-n "$workers" --dist loadfile); fi
    in_loopback_netns .venv/bin/python -m pytest -q "${par[@]}" "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: bash scripts/dev.sh {up|demo|test|setup} [options]" >&2
    exit 2
    ;;
esac
