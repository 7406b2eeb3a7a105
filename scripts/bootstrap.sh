#!/usr/bin/env bash
# Idempotent set-up for dials-gapfill on Debian 12 (what `make demo` / `make test` run first):
#   1. DIALS from Debian (apt-get install dials) when /usr/bin/python3 cannot import it,
#      plus python3-venv, and (WITH_TEST_TOOLS=1) chromium for the HTML report test;
#   2. a virtual environment made with --system-site-packages so it sees DIALS;
#   3. this package installed into it (pip install -e .[test]).
# Where DIALS comes from (`bash scripts/bootstrap.sh --route` prints it; the Makefile asks):
#   system  /usr/bin/python3 imports DIALS (or this runs inside the DIALS root): as above;
#   apt     Debian 12 (from /etc/os-release, whether or not its apt lists were ever
#           read), or apt has a `dials` candidate: apt-get update, then install it;
#   root    neither (Debian 13 and newer have no DIALS package), or GAPFILL_DIALS=root:
#           everything runs in a Debian 12 root with DIALS (scripts/dials-root.sh, built once),
#           with the checkout mounted at the same path, and the venv is .venv-root.
set -euo pipefail
cd "$(dirname "$0")/.."
SYS_PYTHON=${SYS_PYTHON:-/usr/bin/python3}

dials_route() {
  # inside the root (its marker file): DIALS is there, never a root in the root
  if [ -e "${GAPFILL_ROOT_MARKER:-/etc/dials-gapfill-root}" ]; then echo system; return; fi
  case "${GAPFILL_DIALS:-auto}" in
    root) echo root; return ;;
    auto | "") ;;
    *) echo "bootstrap: GAPFILL_DIALS=$GAPFILL_DIALS: use GAPFILL_DIALS=root (or auto)" >&2; return 2 ;;
  esac
  if "$SYS_PYTHON" -c "import dials, dxtbx, cctbx" >/dev/null 2>&1; then
    echo system
  elif debian_with_dials; then
    # the distribution has the package: its apt lists may simply never have been
    # read (a new container or VM), which apt-get update below mends
    echo apt
  elif "${APT_CACHE:-apt-cache}" policy dials 2>/dev/null | grep -Eq '^[[:space:]]*Candidate:[[:space:]]*[^([:space:]]'; then
    echo apt
  else
    echo root
  fi
}

# Debian 12 (bookworm) ships DIALS 3.12 in main; Debian 13 and newer do not.
debian_with_dials() {
  local release=${OS_RELEASE:-/etc/os-release} id="" version="" codename=""
  [ -r "$release" ] || return 1
  id=$(. "$release" 2>/dev/null && echo "${ID:-}")
  version=$(. "$release" 2>/dev/null && echo "${VERSION_ID:-}")
  codename=$(. "$release" 2>/dev/null && echo "${VERSION_CODENAME:-}")
  [ "$id" = debian ] && { [ "$version" = 12 ] || [ "$codename" = bookworm ]; }
}

route=$(dials_route)
if [ "${1:-}" = --route ]; then
  echo "$route"
  exit 0
fi
if [ "$route" = root ]; then
  # the venv, made inside the root, is not the host's .venv
  VENV=${VENV:-.venv-root} exec bash scripts/dials-root.sh run bash scripts/bootstrap.sh
fi
VENV=${VENV:-.venv}

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
  if [ -n "${GAPFILL_IN_ROOT:-}" ] && [ ! -e "$VENV/.gitignore" ]; then
    echo '*' >"$VENV/.gitignore"  # (.venv-root: git status stays clean)
  fi
fi

# cctbx's libtbx finds its environment (libtbx_env) at <sys.prefix>/lib/cctbx/pythonX.Y,
# and an installed environment anchors its paths (the DIALS, cctbx and dxtbx sources,
# bin, lib, include) at sys.prefix, which in a venv is the venv: without this step
# `import dxtbx` fails in the venv (FileNotFoundError .../lib/cctbx/python3.11).  Give
# the venv its own build folder: links to the system one's contents and a copy of
# libtbx_env whose paths stay at the system prefix, as dials.python sees them.
"$SYS_PYTHON" - "$VENV" <<'PY'
import os, pickle, sys, tempfile
import libtbx.env_config as env_config

venv = os.path.abspath(sys.argv[1])
source = env_config.get_installed_path()  # e.g. /usr/lib/cctbx/python3.11
if not os.path.isfile(os.path.join(source, "libtbx_env")):
    sys.exit(0)  # not an installed cctbx (a conda or developer build): nothing to do
target = os.path.join(venv, "lib", "cctbx", os.path.basename(source))
os.makedirs(target, exist_ok=True)
for name in os.listdir(source):
    link = os.path.join(target, name)
    if name != "libtbx_env" and not os.path.lexists(link):
        os.symlink(os.path.join(source, name), link)
env = env_config.unpickle(build_path=source)  # paths anchored at this Python's prefix
env.installed = False  # keep those paths: do not re-anchor them at the venv's prefix
fd, tmp = tempfile.mkstemp(dir=target, prefix=".libtbx_env.")
with os.fdopen(fd, "wb") as fh:
    pickle.dump(env, fh)
os.chmod(tmp, 0o644)
os.replace(tmp, os.path.join(target, "libtbx_env"))
PY

if [ "${BOOTSTRAP_VENV_ONLY:-0}" = 1 ]; then
  exit 0  # (tests/test_venv.py: the environment without installing this package)
fi
stamp="$VENV/.installed-$(cat setup.py | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
  touch "$stamp"
fi
