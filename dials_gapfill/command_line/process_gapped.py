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
import re
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


PHIL_EXTENSIONS = (".phil", ".param", ".params", ".eff", ".def")


def _is_assignment(arg):
    """key=value with a PHIL name as key (output.directory=x.phil is one)."""
    name, sep, _ = arg.partition("=")
    return bool(sep) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name.strip()) is not None


def _is_phil_file(arg):
    """A parameter file: a name with a PHIL extension that is not key=value
    (unless a file of exactly that name exists)."""
    if arg.startswith("-") or not arg.endswith(PHIL_EXTENSIONS):
        return False
    return os.path.isfile(arg) or not _is_assignment(arg)


def _phil_file_error(path, master):
    """Why DIALS did not take the parameter file `path`: the file and line."""
    import iotbx.phil

    from dials_gapfill.errors import GapfillError

    if os.path.isdir(path):
        return GapfillError(f"the parameter file {path!r} is a folder: give a PHIL file")
    try:
        parsed = iotbx.phil.parse(file_name=path)
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
        _, unused = master.fetch(source=parsed, track_unused_definitions=True)
    except Exception as e:
        return GapfillError(f"cannot use the parameter file {path}: {' '.join(str(e).split())}")
    if unused:
        first = unused[0]
        line = getattr(first.object, "where_str", "") or ""
        m = re.search(r"line (\d+)", line)
        where = f" line {m.group(1)}" if m else ""
        err = _unknown_parameter_error(first.path, master)
        return GapfillError(f"in the parameter file {path}{where}: {err}")
    return GapfillError(f"cannot read the parameter file {path!r}: check its syntax")


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
    # braces in a value (output.block_mtz=x_{block}.mtz) are PHIL scope syntax
    # unless quoted: quote such values as the user meant them
    args = [
        f'{a.split("=", 1)[0]}="{a.split("=", 1)[1]}"'
        if _is_assignment(a) and not os.path.exists(a) and re.search(r"[{}]", a.split("=", 1)[1])
        and not a.split("=", 1)[1].strip().startswith(('"', "'"))
        else a
        for a in args
    ]
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
        for arg in args:
            if _is_phil_file(arg) and os.path.isfile(arg):
                err = _phil_file_error(arg, phil)
                if not str(err).startswith("cannot read the parameter file"):
                    raise err from None
        if "not recognised" in text or "Unknown" in text:
            bad = text.split("recognised", 1)[-1].strip() if "recognised" in text else text
            raise _unknown_parameter_error(bad, phil) from None
        raise GapfillError(f"cannot read the parameters: {text}") from None
    images = []
    for arg in unhandled:
        if _is_phil_file(arg) or (arg.endswith(PHIL_EXTENSIONS) and os.path.exists(arg)):
            raise _phil_file_error(arg, phil)
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
    try:  # the progress bar off the terminal before the message
        from dials_gapfill.handlers.progress import abort

        abort()
    except Exception:
        pass
    if outputs is not None:
        outputs.rollback()
    if logging_ready:
        _log_to_file_only(f"Error: {interrupt}")
    where = _finish_log(outputs, False)
    if outputs is not None:
        outputs.unlock()
    print(f"{PROGRAM}: error: {interrupt}{where}", file=sys.stderr)
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


def _finish_log(outputs, success):
    """Rename the log (final name, or the failed-log name); say where it is."""
    if outputs is None:
        return ""
    path = outputs.finish_log(success)
    if not path or success:
        return ""
    return f" (log of this run: {path})"


def _keep_integrated(pipeline, outputs, params):
    """After a late failure: keep integrated.expt/.refl if integration finished.

    Export writes them first (complete files, temporary names); if the failure
    came before that, they are written here from the pipeline's state.
    Returns the text to add to the error message ("" if nothing was kept).
    """
    if pipeline is None or outputs is None:
        return ""
    state = pipeline.state
    names = [n for n in (params.output.experiments, params.output.reflections) if n]
    stages = {s.get("name") for s in getattr(state.report, "stages", [])}
    if not names or "integration" not in stages:
        return ""
    if not all(outputs.complete(n) for n in names):
        if state.experiments is None or state.reflections is None:
            return ""
        try:
            if params.output.experiments:
                outputs.write(params.output.experiments, lambda p: state.experiments.as_file(p))
            if params.output.reflections:
                outputs.write(params.output.reflections, lambda p: state.reflections.as_file(p))
        except Exception:
            return ""
    extra = []
    if "export" in stages and params.output.mtz:
        # export finished: its MTZ files are complete too (scaling failed)
        extra = [params.output.mtz] + [
            f["name"] for f in state.report.files if f.get("kind") == "block mtz"
        ]
        extra = [n for n in extra if outputs.complete(n)]
    kept = outputs.keep(names + extra)
    if not all(os.path.join(outputs.directory, n) in kept for n in names):
        return ""
    extra = [n for n in extra if os.path.join(outputs.directory, n) in kept]
    shown = names + extra[:1]
    if len(extra) > 1:
        shown.append(f"{len(extra) - 1} per-block MTZ files")
    listed = ", ".join(shown[:-1]) + " and " + shown[-1]
    return f"; the integrated data, complete, are kept as {listed} in {outputs.directory}"


def run(args=None, phil=None):
    """Command-line entry point: parse PHIL, set up logging, run, summarise."""
    from dials_gapfill.errors import GapfillError, Interrupted, require_dials

    verbose = 0
    outputs = None
    pipeline = None
    params = None
    logging_ready = False
    try:
        require_dials()
        import dials.util.log
        from dials.util.version import dials_version

        from dials_gapfill.handlers.outputs import Outputs
        from dials_gapfill.phil import master_phil
        from dials_gapfill.pipeline import Pipeline
        from dials_gapfill.report import write_reports
        from dials_gapfill.validate import validate

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
        # every parameter checked before anything is read or written
        validate(params)

        outputs = Outputs(params.output.directory)
        outputs.check_writable()
        outputs.lock()
        # the log gets its final name only at the end of a successful run
        logfile = outputs.start_log(params.output.log) if params.output.log else None
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

        from dials_gapfill.handlers.progress import Progress

        progress = Progress(params.output.progress, params.output.progress_interval)
        pipeline = Pipeline(params, images, outputs=outputs, progress=progress)
        try:
            state = pipeline.run()
        finally:
            progress.close()
        if params.output.log:
            state.report.files.append({"name": params.output.log, "kind": "log"})
        write_reports(state, outputs, diff_phil)
        outputs.commit()
        _finish_log(outputs, True)
        from dials_gapfill.report.summary import summary_text

        logger.info("\n" + summary_text(state.report, outputs.directory))
        outputs.unlock()
        return 0
    except GapfillError as e:
        message = str(e) + _keep_integrated(pipeline, outputs, params)
        if outputs is not None:
            outputs.rollback()
        if logging_ready:
            logger.debug("Error", exc_info=True)
            _log_to_file_only(f"Error: {message}")
        message += _finish_log(outputs, False)
        if outputs is not None:
            outputs.unlock()
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
        where = _finish_log(outputs, False)
        if outputs is not None:
            outputs.unlock()
        print(
            f"{PROGRAM}: error: out of memory: use fewer processes (nproc=) or a machine "
            f"with more memory{where}",
            file=sys.stderr,
        )
        return 1
    except Exception as e:  # an error we did not foresee: one line, no traceback
        kept = _keep_integrated(pipeline, outputs, params)
        if outputs is not None:
            outputs.rollback()
        text = " ".join(str(e).split())[:300]
        if logging_ready:
            logger.debug("Unexpected error", exc_info=True)
            _log_to_file_only(f"Error: {type(e).__name__}: {text}")
        where = _finish_log(outputs, False)
        if outputs is not None:
            outputs.unlock()
        if verbose > 1:
            raise
        print(
            f"{PROGRAM}: error: {type(e).__name__}: {text}{kept} (run with -vv for the traceback)"
            f"{where}",
            file=sys.stderr,
        )
        return 2


def main():
    sys.exit(run())


if __name__ == "__main__":
    main()
