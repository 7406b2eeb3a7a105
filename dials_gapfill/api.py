"""The Python API: process a gapped sweep in the calling process (xia2-style).

    from dials_gapfill import process_gapped
    result = process_gapped(["/data/x_*.cbf"], "exclude_images=41:45 nproc=4")
    result.experiments, result.reflections, result.summary

Nothing is written unless ``write_files=True`` (then exactly what the command
writes, in ``output.directory``, with the same temporary-name-and-rename rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Result:
    experiments: Any  # dxtbx ExperimentList: one experiment per block
    reflections: Any  # integrated reflections
    summary: dict  # the content of dials.process_gapped.json
    report: Any = None  # dials_gapfill.state.Report
    scaled: Any = None  # (experiments, reflections) after scaling.run=True
    files: list = field(default_factory=list)  # paths written (write_files=True)


def process_gapped(images=None, params=None, experiments=None, write_files=False):
    """Run dials.process_gapped in this process.

    images: a path, glob or directory, or a list of them (as on the command line).
    params: None, PHIL text, a list of "key=value" strings (short forms such as
        nproc= and exclude_images= work) or an extract of master_phil().
    experiments: instead of images, an ExperimentList of imported sequences.
    write_files: also write the command's output files.
    """
    from dials_gapfill.errors import require_dials

    require_dials()
    from dials_gapfill.importer import adopt_experiments
    from dials_gapfill.output import Outputs
    from dials_gapfill.phil import params_from
    from dials_gapfill.pipeline import Pipeline
    from dials_gapfill.report import summary_dict, write_reports

    params = params_from(params)
    if isinstance(images, str):
        images = [images]
    outputs = None
    if write_files:
        outputs = Outputs(params.output.directory)
        outputs.check_writable()
    pipeline = Pipeline(params, images or [], outputs=outputs)
    if experiments is not None:
        pipeline.preloaded = adopt_experiments(experiments, params, pipeline.state.report)
    try:
        state = pipeline.run()
        if outputs is not None:
            write_reports(state, outputs)
            outputs.commit()
    except BaseException:
        if outputs is not None:
            outputs.rollback()
        raise
    return Result(
        experiments=state.experiments,
        reflections=state.reflections,
        summary=summary_dict(state),
        report=state.report,
        scaled=state.scaled,
        files=list(outputs.committed) if outputs is not None else [],
    )
