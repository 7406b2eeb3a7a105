"""A run killed outright (SIGKILL) leaves nothing behind: its worker processes
die with it, the output folder's lock goes with the process that took it, and
the next run into the folder removes the killed run's temporary files."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import process, tool

psutil = pytest.importorskip("psutil")

LOCK = ".dials.process_gapped.lock"


def _python(script, *args, **kwargs):
    """Start `script` in a new Python process (this package importable)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True, **kwargs)


def _alive(pids):
    """The processes among `pids` still running (zombies do not count)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_gone(pids, seconds):
    deadline = time.time() + seconds
    while _alive(pids) and time.time() < deadline:
        time.sleep(0.2)
    return _alive(pids)


def _kill(pids):
    for pid in _alive(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# ----------------------------------------------------------------------------
# the lock on the output folder
# ----------------------------------------------------------------------------


def test_forked_child_does_not_hold_the_lock(tmp_path):
    """A process that took the lock forks a child and is killed: the child
    (alive, with the lock file open) does not keep the folder locked.  While
    the parent lives, the child cannot take the lock either."""
    from dials_gapfill.handlers.outputs import Outputs

    out = tmp_path / "out"
    out.mkdir()
    proc = _python("""
        import os, sys, time
        from dials_gapfill.errors import GapfillError
        from dials_gapfill.handlers.outputs import Outputs
        Outputs(sys.argv[1]).lock()
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                Outputs(sys.argv[1]).lock()
                os.write(w, b"child took the lock")
            except GapfillError as e:
                os.write(w, str(e).encode())
            os.close(w)
            time.sleep(120)
            os._exit(0)
        os.close(w)
        print(child, os.read(r, 1000).decode(), flush=True)
        os.kill(os.getpid(), 9)
    """, out)
    child, said = proc.stdout.readline().split(" ", 1)
    child = int(child)
    try:
        assert f"in use by another dials.process_gapped run (pid {proc.pid})" in said, said
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert _alive([child]) == [child]
        assert open(out / LOCK).read().split() == [str(proc.pid)]  # the dead run's
        taker = Outputs(str(out))
        taker.lock()
        assert open(out / LOCK).read().split() == [str(os.getpid())]
        taker.unlock()
        assert not os.path.exists(out / LOCK)
    finally:
        _kill([child])


def test_lock_of_a_running_process_is_refused(tmp_path):
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.handlers.outputs import Outputs

    out = tmp_path / "out"
    out.mkdir()
    proc = _python("""
        import sys
        from dials_gapfill.handlers.outputs import Outputs
        o = Outputs(sys.argv[1])
        o.lock()
        print("locked", flush=True)
        sys.stdin.read()
        o.unlock()
    """, out)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(GapfillError, match=f"is in use by another dials.process_gapped run \\(pid {proc.pid}\\)"):
            Outputs(str(out)).lock()
    finally:
        proc.communicate("", timeout=30)
    taker = Outputs(str(out))
    taker.lock()
    taker.unlock()


def test_stale_lock_file_is_taken_over(tmp_path):
    from dials_gapfill.handlers.outputs import Outputs

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / LOCK).write_text(f"{dead.pid}\n")
    taker = Outputs(str(tmp_path))
    taker.lock()
    assert (tmp_path / LOCK).read_text() == f"{os.getpid()}\n"
    taker.unlock()
    assert not os.path.exists(tmp_path / LOCK)


def test_second_lock_in_this_process_is_refused(tmp_path):
    """Record locks do not exclude their own process: a second run in this
    process is refused all the same (also by another path to the folder),
    and the refusal leaves the first run's lock in force."""
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.handlers.outputs import Outputs

    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "link").symlink_to(out)
    first = Outputs(str(out))
    first.lock()
    try:
        for path in (out, tmp_path / "link"):
            with pytest.raises(GapfillError, match=f"in use by another dials.process_gapped run \\(pid {os.getpid()}\\)"):
                Outputs(str(path)).lock()
        other = _python("""
            import sys
            from dials_gapfill.errors import GapfillError
            from dials_gapfill.handlers.outputs import Outputs
            try:
                Outputs(sys.argv[1]).lock()
            except GapfillError as e:
                print(e)
        """, out)
        stdout, _ = other.communicate(timeout=60)
        assert f"in use by another dials.process_gapped run (pid {os.getpid()})" in stdout
    finally:
        first.unlock()
    again = Outputs(str(tmp_path / "link"))
    again.lock()
    again.unlock()


# ----------------------------------------------------------------------------
# a killed run's temporary files
# ----------------------------------------------------------------------------


def test_stale_temporary_files_are_removed(tmp_path):
    """Only this program's temporary names, only those of a pid not running;
    of their logs the newest is kept as the failed log."""
    from dials_gapfill.handlers.outputs import Outputs

    dead = subprocess.Popen(["true"])
    dead.wait()
    zombie = subprocess.Popen(["true"])  # dead, not yet collected
    live = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.time() + 10
        while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
            time.sleep(0.05)
        stale = [f".dials.process_gapped.tmp-{dead.pid}.log", f".integrated.tmp-{dead.pid}.refl",
                 f".integrated_1.tmp-{dead.pid}.mtz", f".noext.tmp-{dead.pid}", f".write-test-{dead.pid}",
                 f".dials.process_gapped.tmp-{zombie.pid}.log"]
        kept = [f".dials.process_gapped.tmp-{live.pid}.log", f".integrated.tmp-{live.pid}.expt",
                f".integrated.tmp-{os.getpid()}.refl", f"integrated.tmp-{dead.pid}.refl",
                f".integrated.tmp{dead.pid}.refl", f".integrated.tmp-{dead.pid}x.refl",
                ".ground_truth.json.tmp123", "dials.process_gapped.log", "integrated.refl", ".hidden"]
        for name in stale + kept:
            (tmp_path / name).write_text("x")
        (tmp_path / f".folder.tmp-{dead.pid}").mkdir()
        kept.append(f".folder.tmp-{dead.pid}")
        outputs = Outputs(str(tmp_path))
        outputs.lock()
        try:
            assert sorted(outputs.removed) == sorted(stale)
            # the newest killed run's log is kept as the failed log
            assert outputs.killed_log == "dials.process_gapped.failed.log"
            assert sorted(os.listdir(tmp_path)) == sorted(kept + [LOCK, outputs.killed_log])
        finally:
            outputs.unlock()
        # a log of another extension (output.log=run.txt) is known by its name
        other = tmp_path / "other"
        other.mkdir()
        (other / f".run.tmp-{dead.pid}.txt").write_text("how far it got")
        outputs = Outputs(str(other))
        outputs.lock("run.txt")
        try:
            assert outputs.killed_log == "run.failed.txt"
            assert (other / "run.failed.txt").read_text() == "how far it got"
        finally:
            outputs.unlock()
    finally:
        live.kill()
        live.wait()
        zombie.wait()


# ----------------------------------------------------------------------------
# worker processes
# ----------------------------------------------------------------------------

# Forks as DIALS and multiprocessing make them, while a run holds the hooks:
# from the main thread, from a thread that has ended since, a child's own
# child, and a multiprocessing Pool that replaces its workers from its
# handler thread (maxtasksperchild=1).  Prints the pids, then dies by SIGKILL.
FAMILY = """
    import json, multiprocessing, os, sys, threading, time
    from dials_gapfill.handlers import workers
    if sys.argv[1] == "no prctl":
        workers._load_prctl = lambda: None
    workers.hold()

    def sleeper(nested=False):
        if os.fork() == 0:
            if nested and os.fork() == 0:
                time.sleep(120)
                os._exit(0)
            time.sleep(120)
            os._exit(0)

    sleeper(nested=True)
    thread = threading.Thread(target=sleeper)
    thread.start()
    thread.join()
    time.sleep(2 * workers.POLL_SECONDS + 1)  # outlives its thread

    pool = multiprocessing.get_context("fork").Pool(2, maxtasksperchild=1)
    results = [pool.apply_async(time.sleep, (0.1,)) for _ in range(4)]
    [r.get() for r in results]  # (the first workers have been replaced)
    pool.apply_async(time.sleep, (120,))
    time.sleep(0.5)
    import psutil
    print(json.dumps([p.pid for p in psutil.Process().children(recursive=True)]), flush=True)
    os.kill(os.getpid(), 9)
"""


@pytest.mark.parametrize("how", ["prctl", "no prctl"])
def test_workers_die_with_a_killed_parent(how):
    proc = _python(FAMILY, how)
    family = json.loads(proc.stdout.readline())
    try:
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert len(family) >= 5, family  # 2 sleepers, a nested one, the pool's 2 workers
        assert _wait_gone(family, 10) == []
    finally:
        _kill(family)


def test_how_each_fork_is_tied_to_its_parent():
    """How each fork is tied to its parent: the parent-death signal from the
    main thread, a watcher thread from another thread, nothing once released."""
    proc = _python("""
        import ctypes, os, threading
        from dials_gapfill.handlers import workers

        def report():
            r, w = os.pipe()
            if os.fork() == 0:
                os.close(r)
                sig = ctypes.c_int(0)
                ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
                watcher = any(t.name == "die-with-parent" for t in threading.enumerate())
                os.write(w, f"{sig.value} {watcher}".encode())
                os._exit(0)
            os.close(w)
            text = os.read(r, 100).decode()
            os.wait()
            return text

        seen = {"before": report()}
        hold = workers.hold()
        seen["main thread"] = report()
        thread = threading.Thread(target=lambda: seen.__setitem__("other thread", report()))
        thread.start()
        thread.join()
        hold.release()
        hold.release()  # (once only)
        seen["released"] = report()
        print(seen)
    """)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert eval(stdout) == {"before": "0 False", "main thread": f"{int(signal.SIGKILL)} False",
                            "other thread": "0 True", "released": "0 False"}


# ----------------------------------------------------------------------------
# the whole program
# ----------------------------------------------------------------------------


def _run_processes(out):
    """Processes of any run into `out` (forked workers share its command line)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if f"output.directory={out}" in (p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_kill_9_during_integration(tiny, tmp_path):
    """kill -9 of a run with nproc=2 while its workers integrate: no process
    of it is left 10 s later, and the next run into the folder succeeds and
    removes the killed run's temporary files."""
    out = str(tmp_path / "out")
    os.makedirs(out)
    args = [tool("dials.process_gapped"), tiny, f"output.directory={out}", "nproc=2"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    family = []
    try:
        log = os.path.join(out, f".dials.process_gapped.tmp-{proc.pid}.log")
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(log) and "=== Integration ===" in open(log).read():
                break
            time.sleep(0.2)
        # the stage's first work is in the main process: wait for its workers
        while time.time() < deadline and proc.poll() is None:
            try:
                family = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
            except psutil.Error:
                break
            if family:
                break
            time.sleep(0.1)
        assert proc.poll() is None and family, "no worker processes during integration"
        time.sleep(1.0)
        family = sorted(set(family) | set(_run_processes(out)) - {proc.pid})
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert _wait_gone(sorted(set(family + _run_processes(out))), 10) == []
        assert _run_processes(out) == []
        assert os.path.exists(log)  # left for the next run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill(family + _run_processes(out))

    result = process(tiny, out)
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    assert not [f for f in os.listdir(out) if ".tmp-" in f or f == LOCK], os.listdir(out)
    assert os.path.exists(os.path.join(out, "integrated.refl"))
    text = open(os.path.join(out, "dials.process_gapped.log")).read()
    assert f"by a run that was killed or crashed: .dials.process_gapped.tmp-{proc.pid}.log" in text
    # the killed run's log, as this run's log says, is kept (until the next run)
    assert "The killed run's log is kept as dials.process_gapped.failed.log" in text
    assert glob.glob(os.path.join(out, "*.failed.log")) == [os.path.join(out, "dials.process_gapped.failed.log")]
    assert "=== Integration ===" in open(os.path.join(out, "dials.process_gapped.failed.log")).read()
