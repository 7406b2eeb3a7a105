"""dials-gapfill: process a rotation sweep with missing or bad images in one command.

Python API (xia2-style, in process)::

    from dials_gapfill import process_gapped
    result = process_gapped(["/data/x_*.cbf"], "gaps.exclude_images=41:45")
    result.experiments, result.reflections, result.summary

See README.md for the command line, ``dials.process_gapped``.
"""

from __future__ import annotations

import os
import sys

__version__ = "0.1.0"


def _locate_cctbx_environment() -> None:
    """Let libtbx find its environment from a venv made without bootstrap.sh.

    libtbx looks for ``<sys.prefix>/lib/cctbx/pythonX.Y/libtbx_env``; in a venv
    made with --system-site-packages (the Debian route) sys.prefix is the venv.
    scripts/bootstrap.sh gives the venv that file (so dxtbx, dials and cctbx
    import in any order, as with dials.python); for a venv made by hand this
    points LIBTBX_BUILD at the system copy, which lets DIALS import once
    dials_gapfill has been imported (run ``VENV=<venv> scripts/bootstrap.sh``
    for the whole environment).
    """
    if os.environ.get("LIBTBX_BUILD"):
        return
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    if os.path.isfile(os.path.join(sys.prefix, "lib", "cctbx", version, "libtbx_env")):
        return
    for base in (sys.base_prefix, "/usr", "/usr/local"):
        candidate = os.path.join(base, "lib", "cctbx", version)
        if os.path.isfile(os.path.join(candidate, "libtbx_env")):
            os.environ["LIBTBX_BUILD"] = candidate
            return


_locate_cctbx_environment()


def process_gapped(images=None, params=None, experiments=None, write_files=False, **kwargs):
    """Process a gapped sweep in this process; see dials_gapfill.api."""
    from dials_gapfill.api import process_gapped as _process_gapped

    return _process_gapped(images, params, experiments=experiments, write_files=write_files, **kwargs)
