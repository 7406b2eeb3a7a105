"""Writing results without ever leaving a half-written file under a final name.

Every output is first written to a temporary name in the output folder
(``.<stem>.tmp-<pid>.<ext>``); ``commit()`` renames them all at the end of a
successful run, and ``rollback()`` removes them after a failure or an
interrupt, leaving earlier results with the same names untouched.

The log is written the same way (``start_log``): it gets its final name at the
end of a successful run, and a failed or interrupted run keeps its log as
``<stem>.failed<ext>`` (``finish_log``), so the previous run's log survives.

``lock()`` makes the folder this run's while it writes to it: a lock file
(``.dials.process_gapped.lock``) holding the pid, locked with ``flock``; a
second run into the same folder refuses with one line, and a lock left by a
process that died is taken over.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os

from dials_gapfill.errors import GapfillError

logger = logging.getLogger("dials.process_gapped.output")


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
        self._log: tuple[str, str] | None = None  # (temporary path, final path)

    LOCK_NAME = ".dials.process_gapped.lock"

    @property
    def lock_path(self) -> str:
        return os.path.join(self.directory, self.LOCK_NAME)

    def lock(self) -> None:
        """Take the output folder for this run, or refuse if another run has it."""
        path = self.lock_path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise GapfillError(
                f"cannot create the lock file {path}: {e.strerror}: check the output folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = _read_pid(path)
            who = f" (pid {holder})" if holder else ""
            raise GapfillError(
                f"the output folder {self.directory} is in use by another dials.process_gapped run"
                f"{who}: wait for it to finish or choose another folder with output.directory="
            ) from None
        # flock is free: no other run, or the file was left by a run that died
        # (the kernel releases flock when a process ends, however it ends)
        holder = _read_pid(path)
        if holder and holder != os.getpid():
            logger.debug("Taking over the lock of pid %d (no longer running)", holder)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.remove(self.lock_path)
        except OSError:
            pass
        try:
            os.close(self._lock_fd)
        except OSError:
            pass
        self._lock_fd = None

    def start_log(self, name: str) -> str:
        """Temporary path for the log `name` (renamed by finish_log)."""
        final = os.path.join(self.directory, name)
        stem, ext = os.path.splitext(os.path.basename(final))
        tmp = os.path.join(os.path.dirname(final), f".{stem}.tmp-{os.getpid()}{ext}")
        self._log = (tmp, final)
        return tmp

    @staticmethod
    def failed_log_name(name: str) -> str:
        stem, ext = os.path.splitext(name)
        return f"{stem}.failed{ext or '.log'}"

    def finish_log(self, success: bool) -> str | None:
        """Give the log its final name (success) or the failed-log name; return it."""
        if self._log is None:
            return None
        tmp, final = self._log
        if not success:
            final = os.path.join(os.path.dirname(final), self.failed_log_name(os.path.basename(final)))
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
        if not os.path.exists(tmp):
            raise GapfillError(f"writing {name} produced no file: check the output folder")
        self._complete.add(final)
        return tmp

    def complete(self, name: str) -> bool:
        """Whether `name` was written completely (and is waiting for commit)."""
        final = os.path.join(self.directory, name)
        return final in self._complete and final in self._pending

    def _os_error(self, e: OSError, name: str) -> GapfillError:
        if e.errno == errno.ENOSPC:
            return GapfillError(
                f"disk full while writing {name} in {self.directory}: free some space or "
                "choose another folder with output.directory= (nothing was written)"
            )
        return GapfillError(
            f"cannot write {name} in {self.directory}: {e.strerror}: check the output folder"
        )

    def commit(self) -> list[str]:
        for final, tmp in self._pending.items():
            try:
                os.replace(tmp, final)
            except OSError as e:
                raise self._os_error(e, os.path.basename(final)) from None
            self.committed.append(final)
        self._pending.clear()
        return self.committed

    def keep(self, names) -> list[str]:
        """After a failure: give these already written outputs their final
        names (complete files of earlier stages), drop all the others."""
        wanted = {os.path.join(self.directory, n) for n in names if n}
        kept = []
        for final, tmp in list(self._pending.items()):
            if final in wanted and os.path.exists(tmp):
                try:
                    os.replace(tmp, final)
                except OSError:
                    continue
                del self._pending[final]
                self.committed.append(final)
                kept.append(final)
        self.rollback()
        return kept

    def rollback(self) -> None:
        for tmp in self._pending.values():
            try:
                os.remove(tmp)
            except OSError:
                pass
        self._pending.clear()


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None

