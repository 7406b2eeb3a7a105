# DIALS_ENABLE_COMMAND_LINE_COMPLETION
# (imports of DIALS, cctbx and their dependencies are deferred to the functions
# that need them: without DIALS the command says in one line how to install it)
"""
Process a rotation sweep with missing or bad images in one command.

Images are imported (one sweep per file-name template or NeXus file; gaps in
the image numbers found automatically, or made with gaps.exclude_images), bad
images excluded (gaps.auto_exclude), spots found, all blocks of all sweeps
indexed with one crystal, refined as one crystal whose orientation follows
each sweep smoothly across its gaps (refinement.blocks.model=continuous; or a
crystal per block: per_block), integrated and exported: integrated.expt/.refl,
one unmerged MTZ whose BATCH is the image number (plus a per-sweep offset
when there are several sweeps), one MTZ per block and optionally scaled and
merged MTZ files (scaling.run=True).  Everything runs in this one process with
DIALS' own Python API; only the final products are written.

Examples::

  dials.process_gapped images=/data/x_*.cbf

  dials.process_gapped /data/x_*.cbf exclude_images=41:45,81:83

  dials.process_gapped template=/data/x_####.cbf space_group=P212121 nproc=4

  dials.process_gapped image=/data/x_0001.cbf:1:90 scale=True

  dials.process_gapped imported.expt exclude_images=41:45   (what dials.import wrote)

  dials.process_gapped /data/snc_*.img.bz2 geometry.scan.oscillation=0,1 \\
      geometry.detector.fast_slow_beam_centre=532.61,500.53

Short forms: nproc= (mp.nproc), space_group= and unit_cell=
(indexing.known_symmetry.*), exclude_images= (gaps.exclude_images),
scale= (scaling.run), anomalous= (scaling.anomalous).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import warnings

from dials_gapfill.errors import GapfillError, Interrupted, require_dials
from dials_gapfill.util import is_assignment

logger = logging.getLogger("dials.process_gapped")

PROGRAM = "dials.process_gapped"


def _unknown_parameter_error(arg, master):
    """DIALS' unknown-parameter message, with the closest parameter names."""
    from dials_gapfill.phil import unknown_parameter

    return GapfillError(f"{unknown_parameter(arg, master=master)} (list them with {PROGRAM} -c -e 2)")


def _phil_error(arg, master):
    """Why a key=value argument was not accepted, as a GapfillError."""
    from dials_gapfill.phil import quoting_error

    try:
        master.command_line_argument_interpreter().process_arg(arg=arg)
    except Exception as e:
        text = " ".join(str(e).split())
        if text.startswith("Unknown command line parameter definition"):
            return _unknown_parameter_error(arg, master)
        return quoting_error(arg, master) or GapfillError(f"cannot use {arg!r}: {text}")
    return None


def _text_changed_error(args, master):
    """The first key=value argument whose text PHIL reads otherwise
    (phil.text_changed_error); else None."""
    from dials_gapfill.phil import assignments, text_changed_error

    for arg, source in assignments(args, master):
        err = text_changed_error(arg, source, master)
        if err is not None:
            return err
    return None


def _cell_error(args):
    """A unit_cell of other than six numbers (cctbx would fill in the rest:
    unit_cell=5,5 is 5, 5, 1, 90, 90, 90); phil.check_cell_words does the
    same in parameter files and the API's text."""
    from dials_gapfill.phil import six_numbers

    for arg in args:
        name, sep, value = arg.partition("=")
        if sep and is_assignment(arg) and name.strip().split(".")[-1] == "unit_cell" and value.strip().lower() not in ("", "none"):
            if not six_numbers(value):
                return GapfillError(
                    f"{arg!r}: give the six cell parameters a,b,c,alpha,beta,gamma "
                    "(e.g. unit_cell=5.42,8.13,12.02,90,90,90)"
                )
    return None


PHIL_EXTENSIONS = (".phil", ".param", ".params", ".eff", ".def")


def _is_phil_file(arg):
    """A parameter file: a name with a PHIL extension that is not key=value
    (unless a file of exactly that name exists)."""
    if arg.startswith("-") or not arg.endswith(PHIL_EXTENSIONS):
        return False
    return os.path.isfile(arg) or not is_assignment(arg)


# the UTF-8 byte-order mark some editors (Windows Notepad) write first: PHIL
# would read it as part of the first parameter's name
BOM = b"\xef\xbb\xbf"


def _parse_phil_file(path):
    """A parameter file parsed as DIALS parses it, a byte-order mark left out."""
    import iotbx.phil  # (DIALS is known to be installed here)

    with open(path, "rb") as fh:
        data = fh.read()
    if not data.startswith(BOM):
        return iotbx.phil.parse(file_name=path)
    # (bytes that are not UTF-8 kept as DIALS keeps them from the copy it reads)
    text = data[len(BOM):].decode(errors="surrogateescape")
    return iotbx.phil.parse(input_string=text, source_info=f'file "{path}"')


def _not_utf8_error(path):
    """A GapfillError naming the first line of the parameter file `path` that
    is not valid UTF-8 (saved as Latin-1, say), or None: PHIL would drop the
    byte silently (crystal_name = caf\\xe9 read as caf)."""
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        return GapfillError(
            f"the parameter file {path} line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x}): "
            "save the file as UTF-8"
        )


def _starts_with_bom(arg) -> bool:
    """`arg` is a readable parameter file that starts with a byte-order mark."""
    if not (_is_phil_file(arg) and os.path.isfile(arg) and os.access(arg, os.R_OK)):
        return False
    with open(arg, "rb") as fh:
        return fh.read(len(BOM)) == BOM


def _without_bom(args, folder):
    """(args, {copy: file}): the parameter files that start with a byte-order
    mark replaced by copies without it in `folder` (DIALS reads the files
    itself)."""
    out, copies = [], {}
    for k, arg in enumerate(args):
        if _starts_with_bom(arg):
            with open(arg, "rb") as fh:
                data = fh.read()
            copy = os.path.join(folder, f"{k}_{os.path.basename(arg)}")
            with open(copy, "wb") as fh:
                fh.write(data[len(BOM):])
            copies[copy] = arg
            arg = copy
        out.append(arg)
    return out, copies


def _phil_file_error(path, master):
    """Why DIALS did not take the parameter file `path`: the file and line."""
    if os.path.isdir(path):
        return GapfillError(f"the parameter file {path!r} is a folder: give a PHIL file")
    try:
        parsed = _parse_phil_file(path)
    except Exception as e:
        text = " ".join(str(e).split())
        line = re.search(r"line (\d+)", text)
        what = re.sub(r"\s*\(?(at )?file \"[^\"]*\", line \d+\)?", "", text).strip()
        what = what.removeprefix("Syntax error:").strip().rstrip(".") or text
        where = f" line {line.group(1)}" if line else ""
        if not line and "end of input" in text.lower():
            try:
                with open(path, errors="replace") as fh:
                    n = sum(1 for _ in fh)
            except OSError:
                n = 0
            where = f" line {n} (the end of the file)" if n else " (at its end)"
        return GapfillError(
            f"syntax error in the parameter file {path}{where}: {what}: fix that line "
            "(PHIL: name = value, scope { ... })"
        )
    try:
        fetched, unused = master.fetch(source=parsed, track_unused_definitions=True)
    except Exception as e:
        return GapfillError(f"cannot use the parameter file {path}: {' '.join(str(e).split())}")
    if unused:
        first = unused[0]
        line = getattr(first.object, "where_str", "") or ""
        m = re.search(r"line (\d+)", line)
        where = f" line {m.group(1)}" if m else ""
        err = _unknown_parameter_error(first.path, master)
        return GapfillError(f"in the parameter file {path}{where}: {err}")
    from dials_gapfill.phil import definition_error

    return definition_error(parsed, fetched, f"in the parameter file {path}") or GapfillError(
        f"cannot read the parameter file {path!r}: check its syntax")


def parse(args, phil):
    """(params, options, image arguments, diff phil text) as DIALS parses them."""
    import tempfile

    if not any(_starts_with_bom(arg) for arg in args):
        return _parse(args, phil, None)
    with tempfile.TemporaryDirectory(prefix="dials.process_gapped-") as folder:
        return _parse(args, phil, folder)


def _parse(args, phil, folder):
    from dials.util.options import ArgumentParser

    from dials_gapfill.phil import auto_as_word, check_cell_words, rewrite_aliases, value_error

    for arg in args:
        if _is_phil_file(arg) and not arg.startswith("-"):
            if not os.path.exists(arg):
                raise GapfillError(f"no such parameter file: {arg!r}: check the path")
            if not os.access(arg, os.R_OK):
                raise GapfillError(f"cannot read the parameter file {arg!r}: check its permissions")
    for arg in args:
        if _is_phil_file(arg) and os.path.isfile(arg):
            err = _not_utf8_error(arg)
            if err is not None:
                raise err
    err = _cell_error(args)
    if err is not None:
        raise err
    for arg in args:
        if _is_phil_file(arg) and os.path.isfile(arg):
            try:
                parsed = _parse_phil_file(arg)
            except Exception:
                continue  # the syntax error is named below, with its line
            check_cell_words(parsed, f" in {arg}")
    parser = ArgumentParser(
        usage=f"{PROGRAM} [options] [param.phil] images=/path/to/images_*.cbf",
        phil=phil,
        epilog=__doc__,
    )
    given, copies = _without_bom(args, folder)
    try:
        params, options, unhandled = parser.parse_args(
            args=rewrite_aliases(given), show_diff_phil=False, return_unhandled=True
        )
    except SystemExit:
        raise
    except Exception as e:
        text = " ".join(str(e).split())
        for arg in args:
            if _is_phil_file(arg) and os.path.isfile(arg):
                err = _phil_file_error(arg, phil)
                if not str(err).startswith("cannot read the parameter file"):
                    raise err from None
        if "not recognised" in text or "Unknown" in text:
            bad = text.split("recognised", 1)[-1].strip() if "recognised" in text else text
            raise _unknown_parameter_error(bad, phil) from None
        err = value_error(rewrite_aliases(args), phil)
        if err is not None:
            raise err from None
        raise GapfillError(f"cannot read the parameters: {text}") from None
    err = _text_changed_error(rewrite_aliases(args), phil)
    if err is not None:
        raise err
    images = []
    for arg in unhandled:
        if _is_phil_file(arg) and os.path.isfile(arg) and os.path.getsize(arg) == 0:
            continue  # an empty parameter file, which DIALS leaves aside: it sets nothing
        arg = copies.get(arg, arg)
        if _is_phil_file(arg) or (arg.endswith(PHIL_EXTENSIONS) and os.path.exists(arg)):
            raise _phil_file_error(arg, phil)
        if "=" in arg and not os.path.exists(arg):
            err = _phil_error(arg, phil)
            if err is not None:
                raise err
        images.append(arg)
    return auto_as_word(params), options, images, parser.diff_phil.as_str()


def _stop_workers() -> None:
    """Kill the worker processes DIALS started (they would keep this one alive)."""
    import psutil  # (a DIALS dependency: installed with it)

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass


class _OwnMessages(logging.Filter):
    """The terminal shows this program's messages and any warning; the log file
    keeps everything DIALS says (use -v to see it all on the terminal)."""

    # DIALS' own progress lines that are worth seeing during long stages
    progress = {
        "dials.algorithms.integration.integrator": " Frames:",
        "dials.algorithms.spot_finding.finder": "\nFinding spots in image",
    }

    def filter(self, record):
        if record.name.startswith(PROGRAM) or record.levelno >= logging.WARNING:
            return True
        prefix = self.progress.get(record.name)
        return prefix is not None and str(record.msg).startswith(prefix)


def _logging_to(verbosity):
    """The Job's log callback: DIALS' logging (dials.util.log.config) to the
    given file, the terminal showing this program's own messages."""

    def start(path):
        import dials.util.log

        dials.util.log.config(verbosity=verbosity, logfile=path)
        if not verbosity:
            for name in ("dials", "dxtbx", "py.warnings"):
                for handler in logging.getLogger(name).handlers:
                    if type(handler) is logging.StreamHandler:
                        handler.addFilter(_OwnMessages())
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)

    return start


def _fail(message, job=None, code=1) -> int:
    """One line on stderr, with where the failed run's log is."""
    where = f" (log of this run: {job.failed_log})" if job is not None and job.failed_log else ""
    print(f"{PROGRAM}: error: {message}{where}", file=sys.stderr)
    return code


def _interrupted(job, interrupt):
    """End the run at once (from the signal handler itself: raising instead
    would unwind through DIALS' code and its worker pools, which may catch it
    or wait for their workers): temporary outputs removed, the log kept as the
    failed log, workers stopped, one line, exit."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from dials_gapfill.handlers.progress import abort

    abort()  # the progress bar off the terminal before the message
    if job is not None and job.failed_log is None:
        job.failed_log = job.abandon(interrupt)
    _fail(interrupt, job)
    _stop_workers()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(interrupt.exit_code)


def _install_signal_handlers(job) -> None:
    main_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main_pid:
            # a DIALS worker process (forked with this handler): leave quietly,
            # the main process reports the interrupt
            os._exit(128 + signum)
        if job.written:  # (while the summary is printed: the results are whole)
            print(f"{PROGRAM}: interrupted by {signal.Signals(signum).name} after this run's results were written "
                  f"in {job.outputs.directory}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(128 + signum)
        _interrupted(job, Interrupted(signum))

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


class _ReaderMayLeave:
    """A terminal stream whose reader may go away (``| head``, a pager quit
    early): from then on what is written goes to os.devnull, and the run
    finishes and writes its files (its log holds every message), where the
    closed pipe's BrokenPipeError would have stopped it, each logging call
    printing a traceback on the way."""

    def __init__(self, stream):
        self._stream = stream

    def _gone(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _terminal_reader_may_leave():
    """sys.stdout and sys.stderr as _ReaderMayLeave while the command runs."""
    saved = sys.stdout, sys.stderr
    try:
        sys.stdout, sys.stderr = (_ReaderMayLeave(s) if hasattr(s, "fileno") else s for s in saved)
        yield
    finally:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except (OSError, ValueError):
                pass
        sys.stdout, sys.stderr = saved


def run(args=None, phil=None) -> int:
    """Command-line entry point: parse PHIL, run the job, print the summary."""
    with _terminal_reader_may_leave():
        return _run(args, phil)


def _run(args=None, phil=None) -> int:
    args = sys.argv[1:] if args is None else list(args)
    verbose = sum(a.count("v") for a in args if a.startswith("-v"))
    job = None
    try:
        require_dials()
        from dials.util.version import dials_version

        from dials_gapfill import __version__
        from dials_gapfill.api import Job
        from dials_gapfill.handlers.progress import Progress
        from dials_gapfill.phil import master_phil
        from dials_gapfill.report.summary import summary_text

        if "--version" in args:
            print(dials_version())
            print(f"dials-gapfill {__version__}")
            return 0
        params, options, images, _ = parse(args, phil or master_phil())
        verbose = options.verbose
        if not images and not (params.input.images or params.input.template or params.input.image):
            print(f"usage: {PROGRAM} [options] [param.phil] images=/path/to/images_*.cbf")
            print(f"Run '{PROGRAM} -h' for help and '{PROGRAM} -c' for the parameters.")
            return 0
        job = Job(params, images, write_files=True, log=_logging_to(options.verbose),
                  progress=Progress(params.output.progress, params.output.progress_interval))
        with job:
            _install_signal_handlers(job)
            logger.info(dials_version())
            logger.info("dials-gapfill %s", __version__)
            if job.diff_phil:
                logger.info("The following parameters have been modified:\n")
                logger.info(job.diff_phil)
            result = job.run()
        logger.info("\n" + summary_text(result.report, job.outputs.directory))
        return 0
    except GapfillError as e:
        message = getattr(e, "core", str(e)) + (job.kept if job is not None else "")
        if verbose > 1:
            import traceback

            traceback.print_exc()
        return _fail(message, job, getattr(e, "exit_code", 1))
    except (KeyboardInterrupt, Interrupted) as e:
        # (before the handlers are installed, or from code that raised them)
        _interrupted(job, e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT))
    except MemoryError:
        return _fail("out of memory: use fewer processes (nproc=) or a machine with more memory", job)
    except Exception as e:  # an error we did not foresee: one line, no traceback (it is in the log)
        if verbose > 1:
            raise
        text = " ".join(str(e).split())[:300]
        kept = job.kept if job is not None else ""
        return _fail(f"{type(e).__name__}: {text}{kept} (run with -vv for the traceback)", job, 2)


def main():
    sys.exit(run())


if __name__ == "__main__":
    main()
