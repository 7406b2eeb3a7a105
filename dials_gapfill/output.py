"""Writing results without ever leaving a half-written file under a final name.

Every output is first written to a temporary name in the output folder
(``.<stem>.tmp-<pid>.<ext>``); ``commit()`` renames them all at the end of a
successful run, and ``rollback()`` removes them after a failure or an
interrupt, leaving earlier results with the same names untouched.
"""

from __future__ import annotations

import errno
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
        try:
            writer(tmp)
        except OSError as e:
            raise self._os_error(e, name) from None
        if not os.path.exists(tmp):
            raise GapfillError(f"writing {name} produced no file: check the output folder")
        return tmp

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

    def rollback(self) -> None:
        for tmp in self._pending.values():
            try:
                os.remove(tmp)
            except OSError:
                pass
        self._pending.clear()
