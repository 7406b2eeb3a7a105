"""The library call that runs a whole job: dials.process_gapped in this process.

    from dials_gapfill import process_gapped
    result = process_gapped(["/data/x_*.cbf"], "exclude_images=41:45 nproc=4")
    result.experiments, result.reflections, result.summary

Both starting points take the same parameters: images (paths, as on the
command line) or ``experiments=`` (an ExperimentList already imported, e.g. by
dials.import).  ``gaps.exclude_images`` applies to both; the parameters that
only mean something while importing (``input.*`` image selection and
``reference_geometry``, ``geometry.*``, ``format.*``, ``lookup.*``) are refused
with one line on the experiments path, as they belong to the import that made
the experiments.  Every parameter is validated before any work
(``dials_gapfill.validate``).

Nothing is written unless ``write_files=True``: then exactly what the command
writes, in ``output.directory``, with the temporary-name-and-rename rule and
the lock on the folder (:class:`Job`, which the command line uses too, so
both give the same outputs for the same parameters).  If a stage after
integration fails, the error carries the integrated data as
``error.result`` (a Result; a GapfillError, or an error not foreseen, as
raised) and, with ``write_files=True``, the complete
integrated.expt/.refl are kept under their names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from dials.util.mp import available_cores
from libtbx import Auto

from dials_gapfill.errors import GapfillError, Interrupted
from dials_gapfill.handlers import workers
from dials_gapfill.handlers.outputs import Outputs, output_names
from dials_gapfill.model.state import Record
from dials_gapfill.phil import auto_as_word, master_phil, modified_text, params_from
from dials_gapfill.pipeline import Pipeline
from dials_gapfill.report import finalise, summary_dict, write_reports
from dials_gapfill.stages.export import earlier_numbered
from dials_gapfill.stages.importer import (
    EXPERIMENT_LIST,
    adopt_experiments,
    check_readable,
    input_files,
    read_experiment_lists,
)
from dials_gapfill.validate import validate

logger = logging.getLogger("dials.process_gapped")

# parameters that belong to importing images: no meaning for experiments
# that are already imported (input.tolerance does apply: it decides which
# models the blocks share)
IMPORT_ONLY = ("input.", "geometry.", "format.", "lookup.")
IMPORT_ALSO_APPLIES = ("input.tolerance.",)


@dataclass
class Result:
    experiments: Any  # dxtbx ExperimentList: one experiment per block
    reflections: Any  # integrated reflections
    summary: dict  # the content of dials.process_gapped.json
    report: Any = None  # dials_gapfill.model.state.Report
    scaled: Any = None  # (experiments, reflections) after scaling.run=True
    files: list = field(default_factory=list)  # paths written (write_files=True)


def _modified_paths(params) -> list[str]:
    """Full PHIL paths of the parameters that differ from the defaults."""
    master = master_phil()
    diff = master.fetch_diff(source=master.format(python_object=params))
    return [d.path for d in diff.all_definitions()]


def check_experiments_params(params) -> None:
    """Refuse, with one line, parameters that cannot apply to imported experiments."""
    for path in _modified_paths(params):
        if path.startswith(IMPORT_ONLY) and not path.startswith(IMPORT_ALSO_APPLIES):
            if path.startswith("input.") and path.split(".")[1] in ("images", "template", "image"):
                raise GapfillError(
                    f"{path} selects images to import, but experiments= are already imported: give "
                    "either images or experiments (use gaps.exclude_images= to leave images out)"
                )
            raise GapfillError(
                f"{path} is applied when images are imported, so it cannot change experiments= that "
                "are already imported: give it to dials.import, or pass the images instead"
            )


# One run at a time in a process: what a run changes while a stage runs is
# the process's, not the run's (DIALS functions replaced by dials_compat, file
# descriptors 1 and 2 captured by util.captured, the signal handlers), so two
# runs in two threads would undo each other's changes.
_ONE_RUN = threading.Lock()


class Job:
    """One run: parameters checked, the output folder taken, the stages run,
    the reports written; on any failure nothing half-written is left and
    earlier results (the log included) are untouched.

    Use as a context manager around :meth:`run`.  images / experiments /
    params: as :func:`process_gapped`.  write_files: write the outputs (and
    take the output folder's lock).  log: with write_files, a function that
    directs logging to the given (temporary) log file path; the log gets its
    final name at the end of a successful run and is kept as
    ``<log>.failed.log`` after a failure.  progress: a handlers.progress
    Progress, or None.  ``diff_phil``: the parameters changed from the
    defaults (the image arguments included), as the log and reports give them.

    After a failure, ``kept`` says which complete outputs were kept (text for
    the error message, "" if none) and ``failed_log`` where the log is.
    """

    def __init__(self, params=None, images=None, experiments=None, write_files=False,
                 log: Callable[[str], None] | None = None, progress=None):
        self.params = params_from(params)
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        self.images = [os.fspath(i) if isinstance(i, os.PathLike) else i for i in images or []]
        # an experiment list among the image arguments (dials.process_gapped
        # imported.expt, as DIALS' programs take it): read in __enter__
        self.experiment_files = [i for i in self.images if isinstance(i, str) and i.endswith(EXPERIMENT_LIST)]
        self.experiments = experiments
        self.diff_phil = modified_text(self.params, self.images)
        listed = [i for i in self.params.input.images or [] if i.endswith(EXPERIMENT_LIST)]
        if listed:  # (input.images=imported.expt: the same; the caller's params stay as they were)
            self.params = auto_as_word(master_phil().format(python_object=self.params).extract())
            self.params.input.images = [i for i in self.params.input.images if i not in listed]
            self.experiment_files += listed
        self.write_files = write_files
        self.log = log
        self.progress = progress
        self.outputs = None
        self.pipeline = None
        self.kept = ""
        self.failed_log = None
        self.written = False  # the outputs have their final names (a success)
        self._workers = workers.Hold(False)

    def __enter__(self) -> Job:
        if self.experiment_files:
            images = [i for i in self.images if i not in self.experiment_files]
            selected = self.params.input.images or self.params.input.template or self.params.input.image
            if self.experiments is not None or images or selected:
                raise GapfillError(
                    f"{self.experiment_files[0]} is an experiment list: give either images or experiment lists "
                    "(.expt, as dials.import writes them), not both"
                )
            self.experiments = read_experiment_lists(self.experiment_files)
            self.images = []
        if self.experiments is not None:
            if self.images:
                raise GapfillError("give either images or experiments=, not both")
            check_experiments_params(self.params)  # (before the values of what does not apply)
        validate(self.params, [i for i in self.images if isinstance(i, str)])
        if self.experiments is not None:
            check_readable(self.experiments)
        elif not self.images and not (
            self.params.input.images or self.params.input.template or self.params.input.image
        ):
            raise GapfillError("no images: give image paths (or input.template=, input.image=) or experiments=")
        if not _ONE_RUN.acquire(blocking=False):
            raise GapfillError(
                "another dials.process_gapped run is active in this process (another thread's, or the one "
                "this call was made from): run them one after the other, or each in its own process"
            )
        try:
            return self._enter()
        except BaseException:
            _ONE_RUN.release()
            raise

    def _enter(self) -> Job:
        """What a run changes: the folder's lock and log, the worker hooks."""
        if self.write_files:
            outputs = Outputs(self.params.output.directory)
            # (before the log is started: it is an output too)
            outputs.check_not_inputs(input_files(self.params, self.images, self.experiments) + self.experiment_files,
                                     *output_names(self.params))
            outputs.check_writable()
            outputs.lock(self.params.output.log)
            self.outputs = outputs
            if self.log is not None and self.params.output.log:
                self.log(outputs.start_log(self.params.output.log))
            outputs.log_recovered()
        # DIALS' workers must not outlive a killed run, whether it writes
        # files or not (last: __exit__, which releases it, runs only after
        # __enter__ returned)
        self._workers = workers.hold()
        return self

    def run(self) -> Result:
        if self.outputs is not None:
            # a folder with an output's name is found now, not after the processing
            self.outputs.check_no_folders(*output_names(self.params))
        self.pipeline = Pipeline(self.params, self.images, outputs=self.outputs, progress=self.progress)
        state = self.pipeline.state
        for line in _machine_warnings(self.params):
            logger.warning("Warning: %s", line)
            state.report.merge(Record(warnings=[line]))
        if self.experiments is not None:
            state.sweeps, record = adopt_experiments(self.experiments, self.params)
            state.report.merge(record)
        try:
            self.pipeline.run()
        finally:
            if self.progress is not None:
                self.progress.close()
        if self.outputs is not None:
            earlier = _kept_after_failures(self.params) + _listed_by_the_earlier_run(self.outputs.directory)
            # (the log of a killed run, kept by this run: said so, it stays)
            self.outputs.retire([n for n in earlier if n != self.outputs.killed_log])
            if self.log is not None and self.params.output.log:
                state.report.files.append({"name": self.params.output.log, "kind": "log"})
            elif self.params.output.log:
                self.outputs.retire([self.params.output.log])  # (an earlier run's, beside these results)
            write_reports(state, self.outputs, self.diff_phil)
        return self.result()

    def result(self) -> Result:
        state = self.pipeline.state
        return Result(
            experiments=state.experiments,
            reflections=state.reflections,
            summary=summary_dict(state, self.diff_phil),
            report=state.report,
            scaled=state.scaled,
            files=list(self.outputs.committed) if self.outputs is not None else [],
        )

    def __exit__(self, exc_type, exc, tb):
        try:
            return self._exit(exc_type, exc)
        finally:
            _ONE_RUN.release()

    def _exit(self, exc_type, exc):
        self._workers.release()
        outputs = self.outputs
        if exc_type is None:
            if outputs is not None:
                # SIGINT/SIGTERM wait until the renaming and the log are done:
                # a stop halfway would leave two runs' files under final names
                with signals_held():
                    try:
                        outputs.commit()  # (all or none)
                    except GapfillError as e:
                        outputs.rollback()
                        self._drop_earlier_failed()
                        if self.log is not None:
                            _log_error(e)
                        self.failed_log = outputs.finish_log(False)
                        outputs.unlock()
                        raise
                    outputs.finish_log(True)
                    outputs.unlock()
                    self.written = True
            return False
        if outputs is not None:
            self.kept = self._keep_integrated()
            outputs.rollback()
            self._drop_earlier_failed()
            if self.log is not None:
                _log_error(exc, self.kept)
            self.failed_log = outputs.finish_log(False)
            outputs.unlock()
        if isinstance(exc, GapfillError) and self._integrated():
            # a failure after integration: the integrated data come with the error
            new = GapfillError(f"{exc}{self.kept}; the integrated experiments and reflections are in this error's .result")
            new.exit_code = getattr(exc, "exit_code", 1)
            finalise(self.pipeline.state)
            new.result = self.result()
            new.kept, new.core = self.kept, str(exc)
            raise new from None
        if isinstance(exc, Exception) and not isinstance(exc, (GapfillError, Interrupted)) and self._integrated():
            # an error not foreseen, after integration: the same exception,
            # with the integrated data (and what was kept) on it
            try:
                finalise(self.pipeline.state)
                exc.result, exc.kept = self.result(), self.kept
            except Exception:
                pass
        return False

    def abandon(self, error) -> str | None:
        """Stop now (a signal): remove the temporary outputs, keep the log as
        the failed log with `error` at its end, free the folder.  Returns the
        failed log's path."""
        if self.outputs is None:
            return None
        self.outputs.rollback()
        self._drop_earlier_failed()
        if self.log is not None:
            _log_error(error)
        path = self.outputs.finish_log(False)
        self.outputs.unlock()
        return path

    def _drop_earlier_failed(self) -> None:
        """This run's failed log replaces an earlier failed run's: the data
        that run kept (integrated.failed.*, its failed block and sweep MTZs)
        go with it, unless this run kept them anew, so that the failed files
        in the folder are one run's, the run its failed log tells of."""
        outputs = self.outputs
        mine = {os.path.basename(f) for f in outputs.committed}
        stale = [n for n in _earlier_failed(self.params, outputs.directory) if n not in mine]
        for name in stale:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(outputs.directory, name))
        if stale:
            logger.info("Removed what an earlier failed run kept (its failed log is replaced by this run's): %s",
                        ", ".join(stale))

    def _integrated(self) -> bool:
        if self.pipeline is None:
            return False
        state = self.pipeline.state
        done = {s.get("name") for s in state.report.stages}
        return "integration" in done and state.experiments is not None and state.reflections is not None

    def _keep_integrated(self) -> str:
        """After a late failure: keep integrated.expt/.refl if integration finished.

        Export writes them first (complete files, temporary names); if the
        failure came before that, they are written here from the pipeline's
        state.  Returns the text to add to the error message ("" if nothing
        was kept)."""
        outputs, params = self.outputs, self.params
        if not self._integrated():
            return ""
        state = self.pipeline.state
        names = [n for n in (params.output.experiments, params.output.reflections) if n]
        if not names:
            return ""
        if not all(outputs.complete(n) for n in names):
            try:
                if params.output.experiments:
                    outputs.write(params.output.experiments, lambda p: state.experiments.as_file(p))
                if params.output.reflections:
                    outputs.write(params.output.reflections, lambda p: state.reflections.as_file(p))
            except Exception:
                return ""
        stages = {s.get("name") for s in state.report.stages}
        extra = []
        if "export" in stages and params.output.mtz:
            # export finished: its MTZ files are complete too (scaling failed)
            extra = [params.output.mtz] + [f["name"] for f in state.report.files
                                           if f.get("kind") in ("block mtz", "sweep mtz")]
            extra = [n for n in extra if outputs.complete(n)]
        kept = {os.path.basename(k) for k in outputs.keep(names + extra)}
        renamed = not all(n in kept for n in names)  # beside an earlier run's results
        if renamed:
            names, extra = [Outputs.failed_name(n) for n in names], [Outputs.failed_name(n) for n in extra]
        if not all(n in kept for n in names):
            return ""
        extra = [n for n in extra if n in kept]
        shown = names + extra[:1]
        if len(extra) > 1:
            sweep_files = {f["name"] for f in state.report.files if f.get("kind") == "sweep mtz"}
            if renamed:
                sweep_files = {Outputs.failed_name(n) for n in sweep_files}
            what = "per-block and per-sweep" if sweep_files & set(extra) else "per-block"
            shown.append(f"{len(extra) - 1} {what} MTZ files")
        listed = ", ".join(shown[:-1]) + " and " + shown[-1]
        where = " (the earlier results there are untouched)" if renamed else ""
        return f"; the integrated data, complete, are kept as {listed} in {outputs.directory}{where}"


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM held back, then given to their handlers at the end.
    Recorded by a handler of their own, not masked: a process-directed
    signal masked in this thread goes to another one (OpenBLAS' threads)
    and Python runs its handler at once.  Handlers are the main thread's."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if h is not None}  # (None: set outside Python)
    for s in previous:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])


def _kept_after_failures(params) -> list[str]:
    """What a failed run leaves under this program's own failed names (the
    failed log, what Outputs.keep kept beside earlier results): an earlier
    run's files of these names go when this run's are committed.  Other
    names go only where the earlier run's JSON lists them
    (_listed_by_the_earlier_run): scaled.mtz and merged.mtz are also what
    dials.export and dials.merge write by default."""
    out = params.output
    names = [Outputs.failed_name(out.log)] if out.log else []
    names += [Outputs.failed_name(n) for n in (out.experiments, out.reflections, out.mtz) if n]
    return names


def _earlier_failed(params, directory) -> list[str]:
    """The data files a failed run kept beside earlier results in
    `directory` (Job._keep_integrated): integrated.failed.expt/.refl/.mtz and
    the failed block and sweep MTZs, as they are there now."""
    out = params.output
    names = [Outputs.failed_name(n) for n in (out.experiments, out.reflections, out.mtz) if n]
    names = [n for n in names if os.path.isfile(os.path.join(directory, n))]
    for numbered in (out.block_mtz, out.sweep_mtz):
        if numbered:
            names += [n for n in earlier_numbered(directory, Outputs.failed_name(numbered))
                      if os.path.isfile(os.path.join(directory, n))]
    return names


def _listed_by_the_earlier_run(directory) -> list[str]:
    """The files earlier successful runs listed in their JSON summaries, and
    those summaries: every JSON file of the folder that is a summary of this
    program (an earlier run may have named its own: output.json=run1.json).
    Those this run does not write go at commit, whatever names or switches
    made them (a report a preview run leaves out, another output.block_mtz
    pattern).  Only plain names, in this folder."""
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []
    names = []
    for entry in entries:
        path = os.path.join(directory, entry)
        if not entry.endswith(".json") or entry.startswith(".") or os.path.islink(path) or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                summary = json.load(fh)
        except (OSError, ValueError):
            continue
        if not isinstance(summary, dict) or summary.get("program") != "dials.process_gapped":
            continue
        listed = summary.get("files", [])
        listed = [f.get("name") for f in listed if isinstance(f, dict)] if isinstance(listed, list) else []
        names += [n for n in listed if isinstance(n, str) and n and os.path.basename(n) == n and n not in (".", "..")]
        names.append(entry)
    return names


def _machine_warnings(params) -> list[str]:
    """What the parameters ask of this machine that it cannot give."""
    out = []
    nproc = params.mp.nproc
    cores = available_cores()
    if params.mp.method == "multiprocessing" and nproc not in (None, Auto) and int(nproc) > cores:
        out.append(
            f"mp.nproc={nproc} is more than the {cores} cores available: the processes share them "
            f"(no faster, more memory); use nproc={cores}, or leave it out for all available cores"
        )
    return out


def _log_error(error, extra: str = "") -> None:
    """The error at the end of the log file (the terminal gets it once, from
    the command line); an unforeseen error with its traceback."""
    foreseen = isinstance(error, (GapfillError, Interrupted, MemoryError, KeyboardInterrupt))
    text = (str(error) if foreseen else f"{type(error).__name__}: {' '.join(str(error).split())[:300]}") + extra
    record = logging.LogRecord(
        "dials.process_gapped", logging.ERROR, "", 0, f"Error: {text}", None,
        None if foreseen else (type(error), error, error.__traceback__),
    )
    for handler in logging.getLogger("dials").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(record)


def process_gapped(images=None, params=None, experiments=None, write_files=False) -> Result:
    """Run dials.process_gapped in this process.

    images: a path, glob or directory, or a list of them (as on the command line).
    params: None, PHIL text, a list of "key=value" strings (short forms such as
        nproc= and exclude_images= work) or an extract of master_phil().
    experiments: instead of images, an ExperimentList of imported sequences;
        gaps.exclude_images cuts them as it cuts images.  (A path to an .expt
        file given as images is read as such a list.)
    write_files: also write the command's output files (not the log, which
        belongs to the command line).
    """
    with Job(params, images, experiments=experiments, write_files=write_files) as job:
        result = job.run()
    if job.outputs is not None:  # (written under their final names at the end of the job)
        result.files = list(job.outputs.committed)
    return result
