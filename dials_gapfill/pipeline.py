"""The pipeline: an ordered list of stages over one State.

Modelled on DIALS' ``stills_process.Processor``: each stage calls DIALS' own
Python API on the in-memory experiments and reflections and returns what it
found (a ``Record``); nothing is written between stages.  The pipeline merges
each record into the report, takes the blocks and the images not used from
the sweeps, and runs the data-sanity checks that follow a stage.  Only the
export and scaling stages write files, through ``Outputs`` (temporary names,
renamed at the end).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from dials_gapfill import sanity
from dials_gapfill.errors import GapfillError, dials_exit, one_line
from dials_gapfill.handlers.progress import stage_progress
from dials_gapfill.model.state import Record, State
from dials_gapfill.report import finalise
from dials_gapfill.stages import (
    bad_images,
    detector_checks,
    export,
    importer,
    indexing,
    integration,
    refinement,
    scaling,
    spotfinding,
)

logger = logging.getLogger("dials.process_gapped")


def _always(params) -> bool:
    return True


@dataclass
class Stage:
    name: str
    run: Callable  # State -> Record or None
    runs: Callable = _always  # params -> whether it runs
    checks: Callable | None = None  # (experiments, reflections, params) -> warnings, after it
    ready: Callable | None = None  # State -> None: refuses, once the blocks are known, what they make impossible


def _scaling_ready(state) -> None:
    scaling.check_blocks(len(state.experiments), state.params)


# the first stage whose work is worth saving: later stages' `ready` checks run
# before it, when bad images have split the blocks (dropping a block later can
# still make a check fail, at its own stage)
READY_BEFORE = "indexing"

STAGES = [
    Stage("import", importer.run),
    Stage("spot finding", spotfinding.run),
    Stage("bad images", bad_images.run, lambda p: p.gaps.auto_exclude),
    Stage("detector checks", detector_checks.run, sanity.enabled),
    Stage("indexing", indexing.run),
    Stage("refinement", refinement.run, checks=sanity.refinement_warnings),
    Stage("integration", integration.run, checks=sanity.integration_warnings),
    Stage("export", export.run),
    Stage("scaling", scaling.run, lambda p: p.scaling.run, ready=_scaling_ready),
]


class Pipeline:
    """Run the stages in order over one State.

    sweeps: a Sweeps made elsewhere (stages.importer.adopt_experiments): the
    import stage then only takes its blocks.  progress: the command line's
    handlers.progress.Progress, or None.
    """

    def __init__(self, params, images=(), outputs=None, sweeps=None, progress=None):
        self.state = State(params=params, images=list(images or []), sweeps=sweeps, outputs=outputs)
        self.progress = progress

    def run(self, stop_before: str | None = None) -> State:
        """Run the stages in order (up to, not including, `stop_before`)."""
        state = self.state
        t_start = time.perf_counter()
        for stage in STAGES:
            if stage.name == stop_before:
                break
            if stage.name == READY_BEFORE:
                for later in STAGES[STAGES.index(stage):]:
                    if later.ready is not None and later.runs(state.params):
                        later.ready(state)
            if not stage.runs(state.params):
                continue
            logger.info("")
            logger.info("=== %s ===", stage.name.capitalize())
            t0 = time.perf_counter()
            with stage_progress(self.progress, stage.name, state):  # and image numbers in DIALS' messages
                try:
                    record = stage.run(state) or Record()
                except SystemExit as e:
                    # DIALS code that ends its command line with sys.exit
                    # would end the caller's interpreter (API) or skip the
                    # run's rollback and log (command line); the host's own
                    # exit goes on
                    if not dials_exit(e):
                        raise
                    why = one_line(e, 200) if isinstance(e.code, str) else f"exit code {e.code}"
                    raise GapfillError(f"{stage.name} stopped inside DIALS: {why}") from None
            if stage.checks is not None and sanity.enabled(state.params):
                for line in stage.checks(state.experiments, state.reflections, state.params):
                    logger.warning("Warning: %s", line)
                    record.warn(line)
            self.merge(record)
            seconds = time.perf_counter() - t0
            state.report.stages.append({"name": stage.name, "seconds": seconds})
            logger.info("%s done in %.1f s", stage.name.capitalize(), seconds)
        finalise(state)
        state.report.inputs["total_seconds"] = time.perf_counter() - t_start
        return state

    def merge(self, record: Record) -> None:
        """A stage's record into the report, with the blocks as the sweeps have them."""
        self.state.report.sync(self.state.sweeps, self.state.experiments)
        self.state.report.merge(record)
