"""Errors the user can fix."""

from __future__ import annotations

import os
import traceback


class GapfillError(Exception):
    """A problem with the input or the environment that the user can fix.

    The message is one line naming the problem and the fix; the command line
    prints it without a traceback and exits non-zero.
    """

    exit_code = 1


class Interrupted(BaseException):
    """The run was stopped by a signal (SIGINT or SIGTERM).

    A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    in DIALS swallows it and carries on.
    """

    def __init__(self, signum: int):
        import signal

        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name}: no results were written under their final "
            "names (earlier results are untouched); run the command again to "
            "process the data"
        )
        self.exit_code = 128 + signum


def require_dials():
    """Fail with one line saying how to install DIALS when it is missing."""
    try:
        import dials  # noqa: F401
        import dxtbx  # noqa: F401
    except ImportError:
        raise GapfillError(
            "DIALS is not installed for this Python: on Debian/Ubuntu run "
            "'sudo apt-get install dials' and use /usr/bin/python3 (or a venv made with "
            "'--system-site-packages'); with conda run 'conda install -c conda-forge dials' "
            "and then 'dials.python -m pip install .'"
        ) from None


def one_line(e: BaseException, limit: int | None = None) -> str:
    """An exception's message on one line, cut at `limit` characters; where it
    has none (a bare assert in DIALS or cctbx), its type and the function
    that raised it."""
    text = " ".join(str(e).split())
    if not text:
        frames = traceback.extract_tb(e.__traceback__)
        where = f" in {frames[-1].name} ({os.path.basename(frames[-1].filename)})" if frames else ""
        text = type(e).__name__ + where
    return text[:limit] if limit else text


def dials_exit(e: SystemExit) -> bool:
    """Whether a SystemExit is DIALS ending its command line (its code a
    message, or raised inside DIALS, dxtbx or cctbx), not the host
    program's own exit (a signal handler's sys.exit(0)), which must go on."""
    if isinstance(e.code, str):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    path = frames[-1].filename.replace(os.sep, "/") if frames else ""
    return any(f"/{name}/" in path for name in ("dials", "dxtbx", "cctbx", "scitbx", "iotbx", "libtbx"))


def search_failure(e: Exception, limit: int = 160) -> str:
    """Why a lattice search failed, in one line of at most `limit` characters
    (cut at a word).  DIALS 3.12's indexer, when a refinement macro-cycle
    fails on its first lattice with several experiments, deletes the last
    experiment and then reads a variable it never set
    (dials.algorithms.indexing.indexer, Indexer.index): that UnboundLocalError
    is said for what it means."""
    if isinstance(e, NameError) and "refined_reflections" in str(e):
        text = ("DIALS' indexer could not refine the candidate lattice against the blocks together "
                "(a refinement macro-cycle failed)")
    else:
        text = one_line(e)
    if len(text) > limit:
        text = text[:limit - 4].rsplit(" ", 1)[0] + " ..."
    return text


def indexing_failure(e: Exception, params) -> str:
    """The one-line message of a failed indexing (names the known symmetry)."""
    text = search_failure(e)
    ks = params.indexing.known_symmetry
    if ks.space_group is not None or ks.unit_cell is not None:
        sym = []
        if ks.space_group is not None:
            sym.append(f"space_group={ks.space_group}")
        if ks.unit_cell is not None:
            sym.append("unit_cell=" + ",".join(f"{v:g}" for v in ks.unit_cell.parameters()))
        return (
            f"indexing failed with {' '.join(sym)}: {text}: the lattice of the spots "
            "does not fit this symmetry; check indexing.known_symmetry (or leave it out)"
        )
    return (
        f"indexing failed: {text}: check the geometry (beam centre, distance, "
        "oscillation: geometry.*) or the spot finding (spotfinder.*)"
    )
