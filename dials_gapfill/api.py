"""The Python API: process a gapped sweep in the calling process (xia2-style).

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

Nothing is written unless ``write_files=True`` (then exactly what the command
writes, in ``output.directory``, with the same temporary-name-and-rename rule
and the same lock on the folder; the log belongs to the command line).  If a
stage after integration fails, the GapfillError carries the integrated data
as ``error.result`` (a Result) and, with ``write_files=True``, the complete
integrated.expt/.refl are kept under their names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    from dials_gapfill.phil import master_phil

    master = master_phil()
    diff = master.fetch_diff(source=master.format(python_object=params))
    return [d.path for d in diff.all_definitions()]


def check_experiments_params(params) -> None:
    """Refuse, with one line, parameters that cannot apply to imported experiments."""
    from dials_gapfill.errors import GapfillError

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


def process_gapped(images=None, params=None, experiments=None, write_files=False):
    """Run dials.process_gapped in this process.

    images: a path, glob or directory, or a list of them (as on the command line).
    params: None, PHIL text, a list of "key=value" strings (short forms such as
        nproc= and exclude_images= work) or an extract of master_phil().
    experiments: instead of images, an ExperimentList of imported sequences;
        gaps.exclude_images cuts them as it cuts images.
    write_files: also write the command's output files.
    """
    from dials_gapfill.errors import GapfillError, require_dials

    require_dials()
    from dials_gapfill.stages.importer import adopt_experiments
    from dials_gapfill.handlers.outputs import Outputs
    from dials_gapfill.phil import params_from
    from dials_gapfill.pipeline import Pipeline
    from dials_gapfill.report import write_reports
    from dials_gapfill.validate import validate

    params = params_from(params)
    if isinstance(images, str):
        images = [images]
    validate(params)
    if experiments is not None:
        if images:
            raise GapfillError("give either images or experiments=, not both")
        check_experiments_params(params)
    elif not images and not (params.input.images or params.input.template or params.input.image):
        raise GapfillError("no images: give image paths (or input.template=, input.image=) or experiments=")
    outputs = None
    if write_files:
        outputs = Outputs(params.output.directory)
        outputs.check_writable()
        outputs.lock()
    pipeline = Pipeline(params, images or [], outputs=outputs)
    try:
        if experiments is not None:
            pipeline.preloaded = adopt_experiments(experiments, params, pipeline.state.report)
        state = pipeline.run()
        if outputs is not None:
            write_reports(state, outputs)
            outputs.commit()
    except GapfillError as e:
        error = _late_failure(e, pipeline, outputs, params)
        if error is e:
            raise
        raise error from None
    except BaseException:
        if outputs is not None:
            outputs.rollback()
        raise
    finally:
        if outputs is not None:
            outputs.unlock()
    return _result(state, outputs)


def _result(state, outputs) -> Result:
    from dials_gapfill.report import summary_dict

    return Result(
        experiments=state.experiments,
        reflections=state.reflections,
        summary=summary_dict(state),
        report=state.report,
        scaled=state.scaled,
        files=list(outputs.committed) if outputs is not None else [],
    )


def _late_failure(error, pipeline, outputs, params):
    """A failure after integration: keep what is complete, say so."""
    from dials_gapfill.command_line.process_gapped import _keep_integrated
    from dials_gapfill.errors import GapfillError

    state = pipeline.state
    done = {s.get("name") for s in state.report.stages}
    kept = _keep_integrated(pipeline, outputs, params) if outputs is not None else ""
    if outputs is not None:
        outputs.rollback()
    if "integration" not in done or state.experiments is None or state.reflections is None:
        return error
    new = GapfillError(
        f"{error}{kept}; the integrated experiments and reflections are in this error's .result"
    )
    new.exit_code = getattr(error, "exit_code", 1)
    try:
        new.result = _result(state, outputs)
    except Exception:
        new.result = Result(experiments=state.experiments, reflections=state.reflections, summary={},
                            report=state.report)
    return new
