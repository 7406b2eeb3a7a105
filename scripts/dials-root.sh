#!/usr/bin/env bash
# A Debian 12 (bookworm) root with DIALS, for machines whose distribution has no DIALS
# package (Debian 13 and newer).  scripts/bootstrap.sh and the Makefile use it when
# /usr/bin/python3 cannot import DIALS and apt has no `dials`, or when GAPFILL_DIALS=root.
#
#   scripts/dials-root.sh build        build the root once (debootstrap, then apt-get install
#                                      dials python3-venv chromium make git), cached at
#                                      $GAPFILL_ROOT (default /var/cache/dials-gapfill/bookworm)
#   scripts/dials-root.sh run CMD...   run CMD in the root (building it first if needed), in the
#                                      current folder, with this checkout and ../shared mounted
#                                      at the same paths, so outputs land in the checkout
#   scripts/dials-root.sh path         print where the root is
#   scripts/dials-root.sh mirrors      print the Debian mirror and security mirror it would use
#
# The root is built in $GAPFILL_ROOT.build.<pid> and renamed when complete, so an interrupted
# build is never taken for a root.  Mounts (/proc, /sys, /dev, the machine's /etc/ssl/certs
# read-only, the checkout, ../shared) are made in a private mount namespace (unshare) and
# unmounted on exit and on Ctrl-C, after stopping any process left running in the root
# (a daemon a command started).  debootstrap uses this machine's Debian mirror (from
# /etc/apt/sources.list*), or $GAPFILL_ROOT_MIRROR.
# Needs root (or sudo): debootstrap, mount and chroot do.
set -euo pipefail
SELF=$(cd "$(dirname "$0")" && pwd -P)/$(basename "$0")
CHECKOUT=$(cd "$(dirname "$0")/.." && pwd -P)
ROOT=${GAPFILL_ROOT:-/var/cache/dials-gapfill/bookworm}
MARKER=etc/dials-gapfill-root   # written last in the root; bootstrap.sh sees it from inside
PACKAGES=(dials python3-venv chromium make git ca-certificates)
LOG=$ROOT.build.log

say() { echo "dials-root: $*" >&2; }
die() { say "$*"; exit 1; }

# ---- privileges: debootstrap, mount and chroot need root --------------------------------
if [ "$(id -u)" != 0 ] && [ "${1:-}" != path ] && [ "${1:-}" != mirrors ]; then
  command -v sudo >/dev/null 2>&1 || die "needs root (debootstrap, mount, chroot) and there is no sudo"
  # run the command inside the root as the calling user, so files in the checkout stay theirs
  exec sudo -E GAPFILL_ROOT_USER="$(id -u):$(id -g)" bash "$SELF" "$@"
fi

# ---- the machine's Debian mirror -----------------------------------------------------------
# Prints "MIRROR SECURITY_MIRROR" (security may be "-"): the first enabled Debian source of
# /etc/apt/sources.list and /etc/apt/sources.list.d/*.{list,sources} (one-line or deb822).
APT_ETC=${GAPFILL_APT_ETC:-/etc/apt}  # (tests/test_bootstrap.py gives its own)
apt_mirrors() {
  local codenames='^(buster|bullseye|bookworm|trixie|forky|duke|sid|oldstable|stable|testing|unstable)(-updates|-security|-backports)?$'
  {
    for f in "$APT_ETC"/sources.list "$APT_ETC"/sources.list.d/*.list; do
      [ -f "$f" ] || continue
      sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" { print $2, $3 }'
    done
    for f in "$APT_ETC"/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      awk 'function flush() { if (uris != "" && enabled != "no") { n = split(uris, u, " "); m = split(suites, s, " ");
                                for (i = 1; i <= n; i++) for (j = 1; j <= m; j++) print u[i], s[j] }
                              uris = ""; suites = ""; enabled = "" }
           /^[ \t]*#/ { next }
           /^[ \t]*$/ { flush(); next }
           tolower($1) == "uris:" { $1 = ""; uris = $0 }
           tolower($1) == "suites:" { $1 = ""; suites = $0 }
           tolower($1) == "enabled:" { enabled = tolower($2) }
           END { flush() }' "$f"
    done
  } | awk -v re="$codenames" '$2 ~ re { sub(/\/+$/, "", $1)
        if ($2 ~ /-security$/) { if (sec == "") sec = $1 } else if (main == "") main = $1 }
        END { print (main == "" ? "-" : main), (sec == "" ? "-" : sec) }'
}

mirrors() {
  local found main sec
  found=$(apt_mirrors 2>/dev/null || echo "- -")
  main=${GAPFILL_ROOT_MIRROR:-${found% *}}
  sec=${GAPFILL_ROOT_SECURITY_MIRROR:-${found#* }}
  [ "$main" != - ] || main=http://deb.debian.org/debian
  if [ "$sec" = - ]; then
    case "$main" in */debian) sec=$main-security ;; esac
  fi
  echo "$main $sec"
}

# ---- mounts (made in a private mount namespace when unshare works) ---------------------------
MOUNTED=()
mount_in_root() {  # mount_in_root TYPE SOURCE PATH-INSIDE
  local target=$ROOT_DIR$3
  mkdir -p "$target"
  case "$1" in
    proc) mount -t proc proc "$target" ;;
    self) mount --bind "$target" "$target" ;;  # the root a mount point: `unshare --mount` works inside
    *) mount --rbind "$2" "$target"; mount --make-rslave "$target" ;;
  esac
  MOUNTED+=("$target")
}
unmount_all() {
  local i m
  for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
    m=${MOUNTED[i]}
    if [ "$m" = "$ROOT_DIR" ]; then umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || say "could not unmount $m"
    else umount -R "$m" 2>/dev/null || umount -R -l "$m" 2>/dev/null || say "could not unmount $m"
    fi
  done
  MOUNTED=()
}
kill_left_in_root() {  # daemons started inside the root (a test's Slurm, say) outlive the chroot
  local pid pids=()
  for pid in /proc/[0-9]*; do
    [ "$(readlink "$pid/root" 2>/dev/null)" = "$ROOT_DIR" ] && pids+=("${pid#/proc/}")
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  say "stopping ${#pids[@]} process(es) left running in the root"
  kill -TERM "${pids[@]}" 2>/dev/null || true
  sleep 2
  kill -KILL "${pids[@]}" 2>/dev/null || true
}
mounts_under() { awk -v d="$1" '$2 == d || index($2, d "/") == 1' /proc/self/mounts; }
in_namespace() {  # run this script's internal command in a private mount namespace
  if [ "${GAPFILL_ROOT_UNSHARE:-1}" != 0 ] && unshare --mount --propagation private true 2>/dev/null; then
    unshare --mount --propagation private bash "$SELF" "$@"
  else
    bash "$SELF" "$@"  # no namespaces here (or GAPFILL_ROOT_UNSHARE=0): the traps below unmount
  fi
}
system_mounts() {
  mount_in_root self "" ""
  mount_in_root proc proc /proc
  mount_in_root bind /sys /sys
  mount_in_root bind /dev /dev   # with /dev/pts and /dev/shm (multiprocessing needs /dev/shm)
  cp -L /etc/resolv.conf "$ROOT_DIR/etc/resolv.conf" 2>/dev/null || true
}

# ---- build ---------------------------------------------------------------------------------------
build_inside() {  # (in the namespace) build_inside DIR MIRROR SECURITY
  ROOT_DIR=$1
  trap unmount_all EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local main=$2 sec=$3
  say "debootstrap --variant=minbase bookworm (mirror $main)"
  debootstrap --variant=minbase bookworm "$ROOT_DIR" "$main" >>"$LOG" 2>&1 ||
    die "debootstrap failed: see $LOG"
  {
    echo "deb $main bookworm main"
    echo "deb $main bookworm-updates main"
    [ "$sec" = - ] || echo "deb $sec bookworm-security main"
  } >"$ROOT_DIR/etc/apt/sources.list"
  # the machine's apt proxy, if it has one
  apt-config dump 2>/dev/null | grep -Ei '^Acquire::(https?|ftp)::Proxy' >"$ROOT_DIR/etc/apt/apt.conf.d/90proxy" || rm -f "$ROOT_DIR/etc/apt/apt.conf.d/90proxy"
  printf '#!/bin/sh\nexit 101\n' >"$ROOT_DIR/usr/sbin/policy-rc.d"  # no services in the root
  chmod 755 "$ROOT_DIR/usr/sbin/policy-rc.d"
  system_mounts
  say "apt-get install ${PACKAGES[*]} (in the root; about 10 minutes)"
  chroot "$ROOT_DIR" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive sh -c "apt-get update && apt-get install -y ${PACKAGES[*]} && apt-get clean" \
    >>"$LOG" 2>&1 || die "apt-get in the root failed: see $LOG"
  chroot "$ROOT_DIR" /usr/bin/python3 -c "import dials, dxtbx, cctbx" >>"$LOG" 2>&1 ||
    die "DIALS does not import in the root: see $LOG"
  unmount_all
  echo "Debian 12 root with DIALS for dials-gapfill (scripts/dials-root.sh), built $(date -u +%FT%TZ) from $main" \
    >"$ROOT_DIR/$MARKER"
}

build() {
  [ -e "$ROOT/$MARKER" ] && return 0
  mkdir -p "$(dirname "$ROOT")"
  exec 9>"$ROOT.lock"
  flock 9  # one build at a time
  [ -e "$ROOT/$MARKER" ] && { exec 9>&-; return 0; }
  [ ! -e "$ROOT" ] || die "$ROOT exists but is not a complete root: remove it (rm -rf --one-file-system $ROOT)"
  if ! command -v debootstrap >/dev/null 2>&1; then
    say "apt-get install debootstrap"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq debootstrap >/dev/null
  fi
  local tmp=$ROOT.build.$$ mirror sec
  read -r mirror sec < <(mirrors)
  say "building a Debian 12 root with DIALS in $ROOT (once: about 10 minutes and 5 GB; log $LOG)"
  : >"$LOG"
  BUILD_TMP=$tmp
  trap 'discard_build' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local t0=$SECONDS
  in_namespace _build "$tmp" "$mirror" "$sec"
  mv -T "$tmp" "$ROOT"
  BUILD_TMP=
  trap - EXIT INT TERM
  exec 9>&-
  say "root ready in $ROOT after $((SECONDS - t0)) s ($(du -sh --one-file-system "$ROOT" 2>/dev/null | cut -f1))"
}
discard_build() {  # an unfinished build is removed, never renamed (never if something is still mounted in it)
  [ -n "${BUILD_TMP:-}" ] && [ -d "$BUILD_TMP" ] || return 0
  if [ -n "$(mounts_under "$BUILD_TMP")" ]; then
    say "not removing $BUILD_TMP: something is still mounted in it"
  else
    rm -rf --one-file-system "$BUILD_TMP"
  fi
}

# ---- run -----------------------------------------------------------------------------------------
run_inside() {  # (in the namespace) run_inside CWD CMD...
  ROOT_DIR=$ROOT
  trap 'kill_left_in_root; unmount_all' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local cwd=$1; shift
  system_mounts
  # the machine's CA certificates (read-only), so pip reaches PyPI through the same TLS proxies
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mount_in_root bind /etc/ssl/certs /etc/ssl/certs
    mount -o remount,bind,ro "$ROOT_DIR/etc/ssl/certs"
  fi
  mount_in_root bind "$CHECKOUT" "$CHECKOUT"
  if [ -d "$CHECKOUT/../shared" ]; then
    local shared; shared=$(cd "$CHECKOUT/../shared" && pwd -P)
    mount_in_root bind "$shared" "$shared"
  fi
  # a clean environment, with what the Makefile, pip and pytest may be given
  local envs=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 GAPFILL_IN_ROOT=1)
  local name
  while IFS= read -r name; do
    case "$name" in
      VENV | WITH_TEST_TOOLS | BOOTSTRAP_VENV_ONLY | TERM | COLUMNS | TZ | PIP_* | PYTEST_* | GAPFILL_TEST_* | \
        http_proxy | https_proxy | no_proxy | HTTP_PROXY | HTTPS_PROXY | NO_PROXY) envs+=("$name=${!name}") ;;
    esac
  done < <(compgen -e)
  local user=()
  if [ -n "${GAPFILL_ROOT_USER:-}" ] && [ "${GAPFILL_ROOT_USER%%:*}" != 0 ]; then
    user=(--userspec="$GAPFILL_ROOT_USER"); envs+=(HOME=/tmp)
  else
    envs+=(HOME=/root)
  fi
  local rc=0
  chroot "${user[@]}" "$ROOT_DIR" /usr/bin/env -i "${envs[@]}" /bin/sh -c 'cd "$1" && shift && exec "$@"' sh "$cwd" "$@" || rc=$?
  return $rc
}

run() {
  [ $# -gt 0 ] || die "usage: $0 run COMMAND..."
  build
  local cwd; cwd=$(pwd -P)
  case "$cwd/" in "$CHECKOUT"/*) ;; *) cwd=$CHECKOUT ;; esac
  in_namespace _run "$cwd" "$@"
}

case "${1:-}" in
  build) build ;;
  run) shift; run "$@" ;;
  path) echo "$ROOT" ;;
  mirrors) mirrors ;;
  _build) shift; build_inside "$@" ;;
  _run) shift; run_inside "$@" ;;
  *) sed -n '2,/^set -euo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
