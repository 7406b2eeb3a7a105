#!/usr/bin/env bash
# Idempotent set-up for dials-gapfill on Debian 12 (what `make demo` / `make test` run first):
#   1. DIALS from Debian (apt-get install dials) when /usr/bin/python3 cannot import it,
#      plus python3-venv, and (WITH_TEST_TOOLS=1) chromium for the HTML report test;
#   2. a virtual environment made with --system-site-packages so it sees DIALS;
#   3. this package installed into it (pip install -e .[test]).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
SYS_PYTHON=${SYS_PYTHON:-/usr/bin/python3}

packages=()
if ! "$SYS_PYTHON" -c "import dials, dxtbx, cctbx" >/dev/null 2>&1 || ! command -v dials.version >/dev/null 2>&1; then
  packages+=(dials)
fi
if ! "$SYS_PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1; then
  packages+=(python3-venv)
fi
if [ "${WITH_TEST_TOOLS:-0}" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  packages+=(chromium)
fi
if [ ${#packages[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "bootstrap: need root to run: apt-get install ${packages[*]}" >&2; exit 1
  fi
  echo "bootstrap: apt-get install ${packages[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
fi
if ! "$SYS_PYTHON" -c "import dials" >/dev/null 2>&1; then
  echo "bootstrap: DIALS is still missing: 'apt-get install dials' needs Debian 12 or newer" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$SYS_PYTHON" -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.installed-$(cat setup.py | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
  touch "$stamp"
fi
