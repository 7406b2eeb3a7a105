# DIALS_ENABLE_COMMAND_LINE_COMPLETION
"""
Process a rotation sweep with missing or bad images in one command.

Images are imported (gaps in the image numbers found automatically, or made
with gaps.exclude_images), bad images excluded (gaps.auto_exclude), spots
found, all blocks indexed jointly (one crystal), refined statically and then
scan-varying with one crystal model per block and shared beam, detector and
goniometer, integrated and exported: integrated.expt/.refl, one unmerged MTZ
whose BATCH is the image number, one MTZ per block and optionally scaled and
merged MTZ files (scaling.run=True).  Everything runs in this one process
with DIALS' own Python API; only the final products are written.

Examples::

  dials.process_gapped images=/data/x_*.cbf

  dials.process_gapped /data/x_*.cbf exclude_images=41:45,81:83

  dials.process_gapped template=/data/x_####.cbf space_group=P212121 nproc=4

  dials.process_gapped image=/data/x_0001.cbf:1:90 scale=True

  dials.process_gapped /data/snc_*.img.bz2 geometry.scan.oscillation=0,1 \\
      geometry.detector.fast_slow_beam_centre=532.61,500.53

Short forms: nproc= (mp.nproc), space_group= and unit_cell=
(indexing.known_symmetry.*), exclude_images= (gaps.exclude_images),
scale= (scaling.run), anomalous= (scaling.anomalous).
"""

from __future__ import annotations

import difflib
import logging
import os
import signal
import sys

logger = logging.getLogger("dials.process_gapped")

PROGRAM = "dials.process_gapped"


def _unknown_parameter_error(arg, master):
    """DIALS' unknown-parameter message, with the closest parameter names."""
    from dials_gapfill.errors import GapfillError

    name = arg.split("=", 1)[0].strip()
    paths = [d.path for d in master.all_definitions()]
    leaves = {}
    for p in paths:
        leaves.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    close = difflib.get_close_matches(name, paths, n=3, cutoff=0.6)
    for leaf in difflib.get_close_matches(name.rsplit(".", 1)[-1], list(leaves), n=3, cutoff=0.7):
        close.extend(p for p in leaves[leaf] if p not in close)
    hint = f"; did you mean {', '.join(close[:4])}?" if close else ""
    return GapfillError(
        f"unknown parameter {arg!r}{hint} (list them with {PROGRAM} -c -e 2)"
    )


def _phil_error(arg, master):
    """Why a key=value argument was not accepted, as a GapfillError."""
    from dials_gapfill.errors import GapfillError

    try:
        master.command_line_argument_interpreter().process_arg(arg=arg)
    except Exception as e:
        text = " ".join(str(e).split())
        if text.startswith("Unknown command line parameter definition"):
            return _unknown_parameter_error(arg, master)
        return GapfillError(f"cannot use {arg!r}: {text}")
    return None


def _is_phil_file(arg):
    return arg.endswith((".phil", ".param", ".params", ".eff", ".def"))


def parse(args, phil):
    """(params, options, image arguments, diff phil text) as DIALS parses them."""
    from dials.util.options import ArgumentParser

    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import rewrite_aliases

    for arg in args:
        if _is_phil_file(arg) and not arg.startswith("-"):
            if not os.path.exists(arg):
                raise GapfillError(f"no such parameter file: {arg!r}: check the path")
            if not os.access(arg, os.R_OK):
                raise GapfillError(f"cannot read the parameter file {arg!r}: check its permissions")
    parser = ArgumentParser(
        usage=f"{PROGRAM} [options] [param.phil] images=/path/to/images_*.cbf",
        phil=phil,
        epilog=__doc__,
    )
    try:
        params, options, unhandled = parser.parse_args(
            args=rewrite_aliases(args), show_diff_phil=False, return_unhandled=True
        )
    except SystemExit:
        raise
    except Exception as e:
        text = " ".join(str(e).split())
        if "not recognised" in text or "Unknown" in text:
            bad = text.split("recognised", 1)[-1].strip() if "recognised" in text else text
            raise _unknown_parameter_error(bad, phil) from None
        raise GapfillError(f"cannot read the parameters: {text}") from None
    images = []
    for arg in unhandled:
        if _is_phil_file(arg):
            raise GapfillError(f"cannot read the parameter file {arg!r}: check its syntax")
        if "=" in arg and not os.path.exists(arg):
            err = _phil_error(arg, phil)
            if err is not None:
                raise err
        images.append(arg)
    return params, options, images, parser.diff_phil.as_str()


def _install_signal_handlers(outputs, logging_ready):
    """SIGINT and SIGTERM end the run at once, from the handler itself.

    (Raising an exception instead would have to unwind through DIALS' code and
    its worker pools, which may catch it or wait for their workers.)
    """
    from dials_gapfill.errors import Interrupted

    main_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main_pid:
            # a DIALS worker process (forked with this handler): leave quietly,
            # the main process reports the interrupt
            os._exit(128 + signum)
        _leave(Interrupted(signum), outputs, logging_ready)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _leave(interrupt, outputs, logging_ready):
    """Remove temporary outputs, say why in one line, stop the workers, exit."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if outputs is not None:
        outputs.rollback()
    if logging_ready:
        _log_to_file_only(f"Error: {interrupt}")
    print(f"{PROGRAM}: error: {interrupt}", file=sys.stderr)
    _stop_workers()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(interrupt.exit_code)


def _stop_workers():
    """Kill the worker processes DIALS started (they would keep this one alive)."""
    me = os.getpid()
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, found = [me], []
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
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


def _console_shows_own_messages_only():
    for name in ("dials", "dxtbx", "py.warnings"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:
                handler.addFilter(_OwnMessages())


def _log_to_file_only(message):
    """Put the error in the log file; the terminal gets it once, on stderr."""
    for handler in logging.getLogger("dials").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(logging.LogRecord("dials.process_gapped", logging.ERROR, "", 0, message, None, None))


def run(args=None, phil=None):
    """Command-line entry point: parse PHIL, set up logging, run, summarise."""
    from dials_gapfill.errors import GapfillError, Interrupted, require_dials

    verbose = 0
    outputs = None
    logging_ready = False
    try:
        require_dials()
        import dials.util.log
        from dials.util.version import dials_version

        from dials_gapfill.output import Outputs
        from dials_gapfill.phil import master_phil
        from dials_gapfill.pipeline import Pipeline
        from dials_gapfill.report import write_reports

        if phil is None:
            phil = master_phil()
        args = sys.argv[1:] if args is None else list(args)
        verbose = sum(a.count("v") for a in args if a.startswith("-v"))
        params, options, images, diff_phil = parse(args, phil)
        verbose = options.verbose
        if not images and not (params.input.images or params.input.template or params.input.image):
            print(f"usage: {PROGRAM} [options] [param.phil] images=/path/to/images_*.cbf")
            print(f"Run '{PROGRAM} -h' for help and '{PROGRAM} -c' for the parameters.")
            return 0

        outputs = Outputs(params.output.directory)
        outputs.check_writable()
        logfile = os.path.join(outputs.directory, params.output.log) if params.output.log else None
        dials.util.log.config(verbosity=options.verbose, logfile=logfile)
        logging_ready = True
        if not options.verbose:
            _console_shows_own_messages_only()
        _install_signal_handlers(outputs, logging_ready)
        import warnings

        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
        logger.info(dials_version())
        from dials_gapfill import __version__

        logger.info("dials-gapfill %s", __version__)
        if diff_phil:
            logger.info("The following parameters have been modified:\n")
            logger.info(diff_phil)

        pipeline = Pipeline(params, images, outputs=outputs)
        state = pipeline.run()
        write_reports(state, outputs, diff_phil)
        outputs.commit()
        from dials_gapfill.report.summary import summary_text

        logger.info("\n" + summary_text(state.report, outputs.directory))
        return 0
    except GapfillError as e:
        if outputs is not None:
            outputs.rollback()
        message = str(e)
        if logging_ready:
            logger.debug("Error", exc_info=True)
            _log_to_file_only(f"Error: {message}")
        print(f"{PROGRAM}: error: {message}", file=sys.stderr)
        if verbose > 1:
            import traceback

            traceback.print_exc()
        return getattr(e, "exit_code", 1)
    except (KeyboardInterrupt, Interrupted) as e:
        # (before the handlers are installed, or from code that raised them)
        _leave(e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT), outputs, logging_ready)
    except MemoryError:
        if outputs is not None:
            outputs.rollback()
        print(
            f"{PROGRAM}: error: out of memory: use fewer processes (nproc=) or a machine "
            "with more memory",
            file=sys.stderr,
        )
        return 1
    except Exception as e:  # an error we did not foresee: one line, no traceback
        if outputs is not None:
            outputs.rollback()
        if verbose > 1:
            raise
        text = " ".join(str(e).split())[:300]
        print(
            f"{PROGRAM}: error: {type(e).__name__}: {text} (run with -vv for the traceback)",
            file=sys.stderr,
        )
        if logging_ready:
            logger.debug("Unexpected error", exc_info=True)
            _log_to_file_only(f"Error: {type(e).__name__}: {text}")
        return 2


def main():
    sys.exit(run())


if __name__ == "__main__":
    main()
