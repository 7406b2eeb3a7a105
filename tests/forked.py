"""Console scripts (dials.process_gapped, DIALS' commands) run as their entry
point in a process forked from a server that has imported them and DIALS
once (multiprocessing's forkserver: forked from a single-threaded process,
not from the pytest worker with its threads).

The same code, exit code, stdout, stderr and files as the console script,
without the 3 s of interpreter start and imports of every command; DIALS'
own tests call its commands' run() in process the same way. Tests that signal or
watch the process (interrupts, kills, progress on a terminal) start the
console script instead. This module imports nothing from pytest: the server
imports it.
"""

from __future__ import annotations

import os
import sys

PRELOAD = [
    "forked",
    "dials_gapfill.command_line.process_gapped", "dials_gapfill.api", "dials_gapfill.pipeline",
    "dials_gapfill.report.html", "dials_gapfill.report.summary", "dials_gapfill.handlers.progress",
    "dials_gapfill.stages.indexing", "dials_gapfill.stages.refinement", "dials_gapfill.stages.integration",
    "dials_gapfill.stages.scaling", "dials_gapfill.stages.export", "dials_gapfill.crystal_model.continuous",
    "dials_gapfill.crystal_model.per_block", "dials.command_line.find_spots", "dials.command_line.index",
    "dials.command_line.refine", "dials.command_line.integrate",
]
_context = None
_entry_points = None


def entry_point(program):
    """The console script `program` (a name or path) as an entry point, or None."""
    global _entry_points
    if _entry_points is None:
        from importlib.metadata import entry_points

        _entry_points = {ep.name: ep for ep in entry_points(group="console_scripts")
                         if ep.name.startswith("dials.")}
    return _entry_points.get(os.path.basename(program))


entry_point("dials.process_gapped")  # in the server, once


def context():
    """multiprocessing's forkserver context, its server importing PRELOAD."""
    global _context
    if _context is None:
        import multiprocessing

        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def main(args, cwd, environ, stdout_path, stderr_path):
    """The console script args[0] with arguments args[1:] in this process, as
    its script calls it: stdout and stderr to the two files, the caller's
    environment and folder."""
    import logging
    import multiprocessing
    import traceback

    # the start method of a fresh interpreter (the server's child inherits
    # "forkserver": DIALS' process pools would start theirs that way)
    multiprocessing.set_start_method(None, force=True)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)
    os.environ.clear()
    os.environ.update(environ)
    if cwd:
        os.chdir(cwd)
    sys.argv = list(args)
    code = 1
    try:
        code = entry_point(args[0]).load()()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code or 0)
