"""Writing results without ever leaving a half-written file under a final name.

Every output is first written to a temporary name in the output folder
(``.<stem>.tmp-<pid>.<ext>``); ``commit()`` renames them all at the end of a
successful run, and ``rollback()`` removes them after a failure or an
interrupt, leaving earlier results with the same names untouched.

The log is written the same way (``start_log``): it gets its final name at the
end of a successful run, and a failed or interrupted run keeps its log as
``<stem>.failed<ext>`` (``finish_log``), so the previous run's log survives.

``lock()`` makes the folder this run's while it writes to it: a lock file
(``.dials.process_gapped.lock``) holding the pid; a second run into the same
folder refuses with one line, and a lock left by a process that died is taken
over.  The lock is a POSIX record lock (``fcntl.lockf``), which belongs to the
process that took it: worker processes forked during the run inherit the open
file but not the lock, so a worker that outlives a killed run cannot keep the
folder locked (an ``flock`` lock is shared with every forked child).  The
kernel releases a record lock as soon as its process closes *any* descriptor
of the file, so while it holds the lock this process reads the file only
through the lock's own descriptor; and as record locks do not exclude the
process that holds them, folders locked in this process are also kept in a
set, so that a second run in the same process is refused too.

When it takes the folder, ``lock()`` also removes the temporary files that a
run killed before its cleanup left (``.<stem>.tmp-<pid><ext>``): only names of
that pattern, and only when no process with that pid is running.  Such a run's
log is kept as ``<stem>.failed.log``, the one record of how far it got.

``commit()`` renames all outputs or none: where one cannot take its final
name, those already renamed are put back with the earlier files they
replaced.  After a late failure ``keep()`` names the complete outputs
(integrated.expt/.refl, MTZ files) as final, or as ``<stem>.failed<ext>``
where an earlier run's results have those names.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import threading

from dials_gapfill.errors import GapfillError
from dials_gapfill.validate import numbered_pattern

logger = logging.getLogger("dials.process_gapped.output")

# the names of this program's temporary files: outputs and the log
# (Outputs.path, Outputs.start_log) and the probe of check_writable
TEMPORARY = re.compile(r"\.(?:.+\.tmp-(?P<pid>[0-9]+)(?:\.[^.]*)?|write-test-(?P<probe>[0-9]+))")

# output folders (st_dev, st_ino) locked by this process
_locked: set[tuple[int, int]] = set()
_locked_guard = threading.Lock()


def _forget_locks() -> None:
    # a forked child holds none of its parent's record locks (its own attempt
    # is refused by the kernel, naming the parent), and the guard may have
    # been taken by another thread of the parent at the fork
    global _locked, _locked_guard
    _locked = set()
    _locked_guard = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks)


class Outputs:
    def __init__(self, directory: str):
        from libtbx import Auto

        if directory is Auto:  # PHIL reads the word "auto" as Auto: a folder called auto
            directory = "auto"
        self.directory = os.path.abspath(directory or ".")
        self._pending: dict[str, str] = {}  # final path -> temporary path
        self.committed: list[str] = []
        self._complete: set[str] = set()  # final paths whose writer finished
        self._lock_fd: int | None = None
        self._lock_key: tuple[int, int] | None = None
        self._log: tuple[str, str] | None = None  # (temporary path, final path)
        self.removed: list[str] = []  # a killed run's temporary files, removed by lock()
        self.killed_log: str | None = None  # the failed-log name its log was kept under
        self._retired: set[str] = set()  # final paths this run does not write: removed at commit

    LOCK_NAME = ".dials.process_gapped.lock"

    @property
    def lock_path(self) -> str:
        return os.path.join(self.directory, self.LOCK_NAME)

    def lock(self, log: str | None = None) -> None:
        """Take the output folder for this run, or refuse if another run has it."""
        path = self.lock_path
        try:
            st = os.stat(self.directory)
            key = (st.st_dev, st.st_ino)
        except OSError as e:
            raise GapfillError(
                f"cannot create the lock file {path}: {e.strerror}: check the output folder"
            ) from None
        with _locked_guard:
            if key in _locked:
                # (before opening the file: closing it would drop this process's lock)
                raise self._in_use(os.getpid())
            fd = self._take(path)
            _locked.add(key)
        self._lock_fd, self._lock_key = fd, key
        holder = _pread_pid(fd)
        if holder and holder != os.getpid():
            logger.debug("Taking over the lock of pid %d (no longer running)", holder)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
        except OSError as e:
            self.unlock()
            raise self._os_error(e, self.LOCK_NAME) from None
        self.removed, self.killed_log = remove_stale_temporaries(self.directory, log)

    def _take(self, path: str) -> int:
        """An open descriptor of the lock file `path`, its record lock held."""
        attempts = 0
        while True:
            attempts += 1
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise GapfillError(
                    f"cannot create the lock file {path}: {e.strerror}: check the output folder"
                ) from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _pread_pid(fd)
                os.close(fd)
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raise self._in_use(holder) from None
                raise GapfillError(
                    f"cannot lock {path}: {e.strerror}: choose a folder on a file system that "
                    "supports file locks with output.directory="
                ) from None
            # free: no other run, or the file was left by a run that died (the
            # kernel releases the lock when its process ends, however it ends).
            # A run that was just finishing may have removed the file between
            # our open and lock: then this lock is on a file nobody else sees
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except OSError:
                same = False
            if same or attempts == 10:
                return fd
            os.close(fd)

    def _in_use(self, holder: int | None) -> GapfillError:
        who = f" (pid {holder})" if holder else ""
        return GapfillError(
            f"the output folder {self.directory} is in use by another dials.process_gapped run"
            f"{who}: wait for it to finish or choose another folder with output.directory="
        )

    def log_recovered(self) -> None:
        """Say (in the run's log) what lock() removed of a killed run's files."""
        if self.removed:
            logger.info(
                "Removed %d temporary file(s) left in %s by a run that was killed or crashed: %s",
                len(self.removed), self.directory, ", ".join(self.removed),
            )
        if self.killed_log:
            logger.info("The killed run's log is kept as %s", self.killed_log)

    def unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.remove(self.lock_path)
        except OSError:
            pass
        try:
            os.close(self._lock_fd)  # (releases the record lock)
        except OSError:
            pass
        with _locked_guard:
            _locked.discard(self._lock_key)
        self._lock_fd = self._lock_key = None

    def start_log(self, name: str) -> str:
        """Temporary path for the log `name` (renamed by finish_log)."""
        final = os.path.join(self.directory, name)
        stem, ext = os.path.splitext(os.path.basename(final))
        tmp = os.path.join(os.path.dirname(final), f".{stem}.tmp-{os.getpid()}{ext}")
        self._log = (tmp, final)
        return tmp

    @staticmethod
    def failed_name(name: str) -> str:
        """The name a file of a failed run is kept under: x.log -> x.failed.log."""
        stem, ext = os.path.splitext(name)
        return f"{stem}.failed{ext or '.log'}"

    def finish_log(self, success: bool) -> str | None:
        """Give the log its final name (success) or the failed-log name; return it."""
        if self._log is None:
            return None
        tmp, final = self._log
        if not success:
            final = os.path.join(os.path.dirname(final), self.failed_name(os.path.basename(final)))
        self._log = None
        try:
            os.replace(tmp, final)
        except OSError:
            return None
        return final

    def check_writable(self) -> None:
        """Fail early (before any processing) if the folder cannot take files."""
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise GapfillError(
                f"cannot create the output folder {self.directory}: {e.strerror}: "
                "choose another with output.directory="
            ) from None
        probe = os.path.join(self.directory, f".write-test-{os.getpid()}")
        try:
            with open(probe, "w") as fh:
                fh.write("x")
            os.remove(probe)
        except OSError as e:
            raise GapfillError(
                f"the output folder {self.directory} is not writable ({e.strerror}): "
                "choose another with output.directory="
            ) from None

    def check_no_folders(self, names, patterns=()) -> None:
        """Refuse (one line, no results written) where a folder has an output's
        name: one of `names`, or a name one of the regular expressions
        `patterns` matches (numbered outputs, whose numbers are not known yet)."""
        finals = [os.path.join(self.directory, os.path.basename(n)) for n in names if n]
        if patterns:
            try:
                listed = os.listdir(self.directory)
            except OSError:
                listed = []
            finals += [os.path.join(self.directory, n) for n in listed
                       if any(re.fullmatch(p, n) for p in patterns)]
        for final in finals:
            if os.path.isdir(final) and not os.path.islink(final):
                raise GapfillError(
                    f"cannot write {os.path.basename(final)} in {self.directory}: a folder of that name is "
                    "there: move it away or choose another folder with output.directory= (no results were written)"
                )

    def check_not_inputs(self, inputs, names, patterns=()) -> None:
        """Refuse (one line, nothing written) where an output would take the
        place of one of the run's input files (`inputs`: paths; `names`,
        `patterns` as check_no_folders): experiments=integrated.expt of an
        earlier run, with output.directory its folder, would be replaced by
        this run's integrated.expt."""
        here = os.path.realpath(self.directory)
        for path in inputs:
            if os.path.realpath(os.path.dirname(os.path.abspath(path))) != here:
                continue
            name = os.path.basename(path)
            if name in names or any(re.fullmatch(p, name) for p in patterns):
                raise GapfillError(
                    f"the output {name} would replace the input file {path}: give that output another name, "
                    "or choose another folder with output.directory= (nothing was written)"
                )

    def path(self, name: str) -> str:
        """Temporary path to write the output `name` to."""
        final = os.path.join(self.directory, name)
        # keep the extension: DIALS chooses the file format by it
        stem, ext = os.path.splitext(os.path.basename(final))
        tmp = os.path.join(os.path.dirname(final), f".{stem}.tmp-{os.getpid()}{ext}")
        self._pending[final] = tmp
        return tmp

    def write(self, name: str, writer) -> str:
        """Call writer(temporary_path); translate a full disk into a clear error."""
        tmp = self.path(name)
        final = os.path.join(self.directory, name)
        self._complete.discard(final)
        try:
            writer(tmp)
        except OSError as e:
            raise self._os_error(e, name) from None
        except Exception:
            # a writer in C++ tells a full disk in its own words (iotbx's MTZ
            # writer: "MTZ file read error"): the folder says what it was
            if self._full():
                raise self._os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), name) from None
            raise
        if not os.path.exists(tmp):
            raise GapfillError(f"writing {name} produced no file: check the output folder")
        self._complete.add(final)
        return tmp

    def _full(self) -> bool:
        """Whether the folder's file system has less than 1 MiB left for
        this process (root may use the blocks reserved for it)."""
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return False
        blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
        return blocks * st.f_frsize < 1 << 20

    def complete(self, name: str) -> bool:
        """Whether `name` was written completely (and is waiting for commit)."""
        final = os.path.join(self.directory, name)
        return final in self._complete and final in self._pending

    def _os_error(self, e: OSError, name: str) -> GapfillError:
        if e.errno == errno.ENOSPC:
            return GapfillError(
                f"disk full while writing {name} in {self.directory}: free some space or "
                "choose another folder with output.directory="
            )
        return GapfillError(
            f"cannot write {name} in {self.directory}: {e.strerror}: check the output folder"
        )

    def discard(self, name: str) -> None:
        """The output `name` is not written by this run after all (its writer
        failed on data it cannot hold): its temporary file goes now, and a file
        of that name from an earlier run at commit, so that the folder does not
        show it beside this run's results."""
        final = os.path.join(self.directory, name)
        tmp = self._pending.pop(final, None)
        self._complete.discard(final)
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass
        self._retired.add(final)

    def retire(self, names) -> None:
        """Files of these names from an earlier run go at commit unless this
        run writes them: outputs that only other parameters produce (the
        scaled files of a run with scaling), so that the folder shows one
        run's results."""
        self._retired.update(os.path.join(self.directory, n) for n in names if n)

    def commit(self) -> list[str]:
        """Give every output its final name, all or none: where one cannot
        be replaced (a folder of that name, permissions), the outputs already
        renamed are put back as they were and the error raised."""
        self.check_no_folders(self._pending)
        done: list[tuple[str, str, str | None]] = []  # (final, temporary, the earlier file moved aside)
        try:
            for final, tmp in self._pending.items():
                aside = None
                if os.path.lexists(final):
                    stem, ext = os.path.splitext(os.path.basename(final))
                    aside = os.path.join(self.directory, f".{stem}.old.tmp-{os.getpid()}{ext}")
                    os.replace(final, aside)
                try:
                    os.replace(tmp, final)
                except OSError:
                    if aside is not None:
                        os.replace(aside, final)
                    raise
                done.append((final, tmp, aside))
        except OSError as e:
            failed = os.path.basename(final)
            for renamed, tmp, aside in reversed(done):
                try:
                    os.replace(renamed, tmp)
                    if aside is not None:
                        os.replace(aside, renamed)
                except OSError:
                    pass
            raise self._os_error(e, failed) from None
        for _, _, aside in done:
            if aside is not None:
                try:
                    os.remove(aside)
                except OSError:
                    pass
        for final in sorted(self._retired - set(self._pending)):
            try:
                os.remove(final)
            except OSError:
                pass
        self._retired.clear()
        self.committed.extend(final for final, _, _ in done)
        self._pending.clear()
        return self.committed

    def keep(self, names) -> list[str]:
        """After a failure: give these already written outputs (complete
        files of earlier stages) final names, drop all the others.  Where an
        earlier run's file has one of those names, all are kept as
        ``<stem>.failed<ext>`` instead, so that the earlier results stay
        whole beside them."""
        wanted = [os.path.join(self.directory, n) for n in names if n]
        ready = [f for f in wanted if f in self._pending and os.path.exists(self._pending[f])]
        earlier = any(os.path.lexists(f) for f in ready)
        kept = []
        for final in ready:
            target = os.path.join(self.directory, self.failed_name(os.path.basename(final))) if earlier else final
            try:
                os.replace(self._pending[final], target)
            except OSError:
                continue
            del self._pending[final]
            self.committed.append(target)
            kept.append(target)
        self.rollback()
        return kept

    def rollback(self) -> None:
        for tmp in self._pending.values():
            try:
                os.remove(tmp)
            except OSError:
                pass
        self._pending.clear()


def _pread_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 64, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _running(pid: int) -> bool:
    """Whether a process `pid` exists (any owner); True when that cannot be told."""
    if pid <= 0:
        return True  # (not a process id: kill(0) would mean this process group)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # e.g. EPERM: it exists, under another user
    try:  # a zombie (killed, its parent has not yet collected it) is not running
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_temporaries(directory: str, log: str | None = None) -> tuple[list[str], str | None]:
    """Remove this program's temporary files in `directory` whose pid is no
    longer running (a run killed before it could clean up): (their names,
    the failed-log name the newest such run's log was kept under, or None).
    A temporary log is one of a *.log name, or of `log` (output.log)."""
    log_stem, log_ext = os.path.splitext(os.path.basename(log)) if log else (None, None)
    removed, logs = [], []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed, None
    for entry in sorted(entries, key=lambda e: e.name):
        m = TEMPORARY.fullmatch(entry.name)
        if m is None:
            continue
        pid = int(m.group("pid") or m.group("probe"))
        if pid == os.getpid() or _running(pid):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                continue
            found = re.fullmatch(r"\.(?P<stem>.+)\.tmp-[0-9]+(?P<ext>\.log)", entry.name)
            if found is None and log_stem:
                found = re.fullmatch(rf"\.(?P<stem>{re.escape(log_stem)})\.tmp-[0-9]+(?P<ext>{re.escape(log_ext)})",
                                     entry.name)
            if found is not None and not found.group("stem").endswith(".old"):
                logs.append((entry.stat().st_mtime, entry.name, found.group("stem") + found.group("ext")))
                continue
            os.remove(entry.path)
        except OSError:
            continue
        removed.append(entry.name)
    kept = None
    # the newest killed run's log is the one record of how far it got
    for i, (_, name, final) in enumerate(sorted(logs)):
        path = os.path.join(directory, name)
        try:
            if i == len(logs) - 1:
                kept = Outputs.failed_name(final)
                os.replace(path, os.path.join(directory, kept))
            else:
                os.remove(path)
        except OSError:
            kept = None
            continue
        removed.append(name)
    return removed, kept


def output_names(params) -> tuple[list[str], list[str]]:
    """(the names of the files this run may write, the regular expressions of
    its numbered ones: block and sweep MTZs)."""
    out = params.output
    names = [out.experiments, out.reflections, out.mtz, out.json, out.html, out.log]
    if params.scaling.run:
        names += [out.scaled_mtz, out.merged_mtz]
        if out.shelx and out.shelx_name:
            names += [f"{out.shelx_name}.hkl", f"{out.shelx_name}.ins"]
    patterns = []
    if out.mtz:
        for numbered, switch in ((out.block_mtz, out.per_block_mtz), (out.sweep_mtz, out.per_sweep_mtz)):
            if numbered and switch:
                patterns.append(numbered_pattern(numbered))
    return [n for n in names if n], patterns
