"""Small helpers without DIALS imports (the HTML report uses them too)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import tempfile


def runs(numbers) -> list:
    """Runs of consecutive integers: [41, 42, 43, 45] -> [(41, 43), (45, 45)]."""
    out = []
    for n in sorted(set(numbers)):
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return [tuple(r) for r in out]


def range_text(numbers) -> str:
    """Compact text of a set of integers: [41, 42, 43, 45] -> "41-43, 45"."""
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs(numbers))


class Captured:
    text = ""


@contextlib.contextmanager
def captured(fd: int):
    """Capture what this process and its children write to file descriptor
    `fd` (1 or 2, C++ and worker processes included); the text is in the
    yielded object's ``text`` afterwards, for the caller to pass on or drop."""
    try:
        fflush = ctypes.CDLL(None).fflush
    except (OSError, AttributeError):
        fflush = None
    stream = sys.stdout if fd == 1 else sys.stderr
    stream.flush()
    holder = Captured()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), fd)
        try:
            yield holder
        finally:
            stream.flush()
            if fflush is not None:
                fflush(None)  # C++ output is buffered by C stdio
            os.dup2(saved, fd)
            os.close(saved)
            capture.seek(0)
            holder.text = capture.read().decode(errors="replace")


def printable(name: str) -> str:
    """`name` with the bytes that are not UTF-8 (surrogate escapes of a name
    made in another encoding) as the shell writes them: caf\\xe9."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def not_utf8(path: str) -> str | None:
    """The path up to its first name that is not valid UTF-8, or None.

    Python reads such a name (made on a system with another encoding) into
    surrogate escapes, which DIALS' log, dxtbx and the MTZ writer cannot
    encode; the path is given as the shell writes those bytes (caf\\xe9), so
    that the message itself can be printed."""
    try:
        path.encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    parts = path.split(os.sep)
    for k, part in enumerate(parts):
        try:
            part.encode("utf-8")
        except UnicodeEncodeError:
            return printable(os.sep.join(parts[: k + 1]))
    return printable(path)


def has_esd(esd) -> bool:
    """An esd worth printing: a number above rounding noise (dxtbx gives the
    angles a space group fixes esds of about 1e-18)."""
    import math

    return isinstance(esd, (int, float)) and math.isfinite(esd) and esd > 1e-10


def esd_decimals(esd, least: int = 4) -> int:
    """Decimals to print a value and its esd with: `least`, or as many as the
    esd needs for one significant digit (an electron-diffraction cell's
    0.00004 A would print as 0.0000), at most 8."""
    import math

    if not has_esd(esd):
        return least
    return max(least, min(8, math.ceil(-math.log10(2 * esd))))


def is_assignment(arg: str) -> bool:
    """key=value with a PHIL name as key (output.directory=x.phil is one)."""
    name, sep, _ = arg.partition("=")
    return bool(sep) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name.strip()) is not None
