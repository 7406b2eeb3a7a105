"""Errors the user can fix."""

from __future__ import annotations


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
