"""Processes forked during a run die with the process that forked them.

DIALS forks its worker processes (libtbx.easy_mp, multiprocessing).  When the
run's main process is killed outright (SIGKILL, the out-of-memory killer) its
workers are not told: one blocked on its task queue, or on a result pipe that
nobody reads any more, waits for ever, keeping its memory and the files it
inherited open.

While a run holds this (``hold()`` until the returned object's
``release()``), every process forked by the run, or by its workers, gets in
the child a way to die with its parent:

* forked from the process's main thread: the kernel's parent-death signal,
  ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, delivered the moment the parent ends;
* forked from another thread (e.g. the thread of a multiprocessing Pool that
  replaces finished workers): the kernel ties the parent-death signal to the
  *thread* that forked, which may end long before the process does, so the
  child instead runs a daemon thread that checks every ``POLL_SECONDS`` that
  its parent is still the same process.  The same check stands in for the
  signal where prctl is not available.

A child whose parent died before it could ask for either (the fork raced with
the parent's death) kills itself at once.  Children of children are tied to
their own parent in the same way, so a whole tree goes down with the run.

Only forks through Python's ``os.fork`` (which multiprocessing and
libtbx.easy_mp use) run the hooks: programs that subprocess starts by
fork-and-exec are not touched, unless given a ``preexec_fn`` (subprocess then
forks through Python and the program it runs keeps the parent-death signal,
which exec does not clear: it ends with the thread that started it).  The
hooks stay registered for the life of the process (Python cannot unregister
them) but do nothing while no run holds them, so forks made by the host
program outside a run are left alone.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
POLL_SECONDS = 1.0

_guard = threading.Lock()
_registered = False
_held = 0  # runs in this process holding the hooks (inherited by children)
_prctl = None  # libc's prctl, or None where it is not available
# this process and its main thread, as a child forked from it finds them
# (after a fork the child's one thread keeps the forking thread's ident)
_pid = 0
_main_ident = 0


class Hold:
    """Returned by hold(); release() (idempotent) ends the run's claim."""

    def __init__(self, active: bool):
        self._active = active

    def release(self) -> None:
        global _held
        with _guard:
            if self._active:
                self._active = False
                _held -= 1


def hold() -> Hold:
    """Make processes forked from now on (until release) die with their parent."""
    global _registered, _held, _prctl, _pid, _main_ident
    with _guard:
        if not _registered:
            if not hasattr(os, "register_at_fork"):  # no fork on this platform
                return Hold(False)
            _prctl = _load_prctl()
            os.register_at_fork(after_in_child=_after_fork_in_child)
            _registered = True
        _pid, _main_ident = os.getpid(), threading.main_thread().ident
        _held += 1
    return Hold(True)


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl.restype = ctypes.c_int
        prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        return prctl
    except (ImportError, OSError, AttributeError):
        return None


def _after_fork_in_child() -> None:
    global _guard, _pid, _main_ident
    parent, from_main_thread = _pid, threading.get_ident() == _main_ident
    _pid, _main_ident = os.getpid(), threading.get_ident()
    _guard = threading.Lock()  # (another thread of the parent may have held it)
    if _held <= 0:
        return
    try:
        signalled = (
            from_main_thread
            and _prctl is not None
            and _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        )
        if os.getppid() != parent:  # the parent is gone already
            os.kill(os.getpid(), signal.SIGKILL)
        if not signalled:
            threading.Thread(target=_watch, args=(parent,), name="die-with-parent", daemon=True).start()
    except Exception:  # noqa: BLE001  (the child must run on: it is only left unprotected)
        pass


def _watch(parent: int) -> None:
    # an orphan is adopted by init or a subreaper: its parent pid changes
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)
