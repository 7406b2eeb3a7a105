"""The orchestrator: an ordered list of stages over one State.

Modelled on DIALS' ``stills_process.Processor``: each stage calls DIALS' own
Python API on the in-memory experiments and reflections; nothing is written
between stages.  Only the export stage writes files, through ``Outputs``
(temporary names, renamed at the end).
"""

from __future__ import annotations

import copy

import logging
import time

from dials_gapfill.crystal_model import continuous
from dials_gapfill.stages import sanity
from dials_gapfill.stages.bad_images import find_bad_images, whole_frame_faults
from dials_gapfill.errors import GapfillError
from dials_gapfill.stages.export import export
from dials_gapfill.stages.importer import drop_short_blocks, import_images, log_block_table
from dials_gapfill.stages.indexing import choose_bravais_lattice, index, poorly_indexed_error
from dials_gapfill.stages.integration import integrate
from dials_gapfill.handlers.progress import stage_progress
from dials_gapfill.stages.refinement import refine
from dials_gapfill.report import finalise
from dials_gapfill.stages.scaling import scale
from dials_gapfill.stages.spotfinding import TooManyStrongPixels, find_spots, spot_counts_per_image
from dials_gapfill.model.state import State
from dials_gapfill.model.sweep import BAD
from dials_gapfill.model.tables import join_blocks, keep_experiments
from dials_gapfill.util import range_text

logger = logging.getLogger("dials.process_gapped")


# --------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------


def stage_import(state: State) -> None:
    if state.sweep is None:
        state.sweep = import_images(state.params, state.images, state.report)
    state.experiments = state.sweep.experiments()
    state.report.sync(state.sweep, state.experiments)
    log_block_table(state.report)


def _spot_finder(params):
    """find_spots(experiments) -> reflections, for blocks that are already
    known to be readable (a failure now is an error)."""

    def find(experiments):
        reflections, bad = find_spots(experiments, params)
        if bad:
            n, reason = next(iter(sorted(bad.items())))
            raise GapfillError(f"image {n} cannot be used ({reason}): leave it out with exclude_images={n}")
        return reflections

    return find


def _find_or_blame(experiments, params):
    """find_spots, or the images to blame when it failed: (reflections, bad)."""
    try:
        return find_spots(experiments, params)
    except TooManyStrongPixels:
        bad = whole_frame_faults(experiments, params) if params.gaps.auto_exclude else {}
        if not bad:
            raise
        return None, bad


def stage_find_spots(state: State) -> None:
    params, sweep = state.params, state.sweep
    reflections, bad = _find_or_blame(state.experiments, params)
    for _ in range(3):
        if not bad:
            break
        # images that stopped the spot finder (unreadable pixels, a frame
        # over-exposed as a whole): excluded, then spots found without them
        if not params.gaps.auto_exclude:
            n, reason = next(iter(sorted(bad.items())))
            raise GapfillError(
                f"image {n} cannot be used ({reason}): leave it out with exclude_images={n} "
                "(or set gaps.auto_exclude=True)"
            )
        state.experiments, _ = sweep.exclude(bad, "auto")
        _drop_short(state)
        reflections, bad = _find_or_blame(state.experiments, params)
    if bad:
        raise GapfillError(f"images {range_text(sorted(bad))} cannot be read: leave them out with exclude_images=")
    if len(reflections) == 0:
        raise GapfillError(
            "no strong spots on any image: the images are blank (no diffraction); check "
            "the shutter and beam, or the spot finding settings (spotfinder.*)"
        )
    state.reflections = reflections
    state.report.sync(sweep, state.experiments)
    _count_spots(state)


def _drop_short(state: State) -> None:
    """Blocks that exclusions made shorter than gaps.min_block_images go."""
    drop_short_blocks(state.sweep, state.params.gaps.min_block_images, " after exclusions")
    if not state.sweep.used():
        raise GapfillError("no usable images left after excluding bad images: check the data")
    experiments = state.sweep.experiments()
    if state.reflections is not None and len(experiments) < len(state.experiments):
        state.reflections = join_blocks([state.reflections], experiments)
    state.experiments = experiments


def _count_spots(state: State) -> None:
    counts = spot_counts_per_image(state.reflections, state.experiments)
    for n, c in counts.items():
        state.report.per_image.setdefault(n, {})["spots"] = c
    for e in state.report.excluded:
        if e["status"] == BAD:
            state.report.per_image.setdefault(e["image"], {})["spots"] = 0
    for i, exp in enumerate(state.experiments):
        block = state.report.block(exp.identifier)
        block.stats["spots"] = int((state.reflections["id"] == i).count(True))
        logger.info("Block %d (images %s): %d strong spots", block.number, block.label, block.stats["spots"])


def stage_bad_images(state: State) -> None:
    """Blank, all-zero, saturated and over-exposed images become gaps.

    Over-exposed images are excluded first: their huge spots join the spots
    of the neighbouring images in DIALS' 3D spot finding, which would make the
    neighbours look blank.  The sweep gives the blocks that were cut their
    spots again, so they are the spots of a run with those images excluded by
    hand.
    """
    params, sweep = state.params, state.sweep
    found = False
    for _ in range(3):
        bad = find_bad_images(state.reflections, state.experiments, params)
        if not bad:
            break
        found = True
        used = len(sweep.used())
        if len(bad) >= used:
            raise GapfillError(
                f"all {used} images are bad ({next(iter(bad.values()))}, ...): no diffraction "
                "to process; check the data collection"
            )
        over = {n: r for n, r in bad.items() if r.startswith("over-exposed")}
        state.experiments, state.reflections = sweep.exclude(
            over or bad, "auto", state.reflections, _spot_finder(params)
        )
        _drop_short(state)
    else:
        logger.info("Stopped looking for bad images after 3 rounds")
    if found:
        state.report.sync(sweep, state.experiments)
        _count_spots(state)
    else:
        logger.info("No bad images found")


def stage_detector_checks(state: State) -> None:
    """Data sanity: the detector as it is, read on a few of the images used."""
    _warn(state, sanity.spot_warnings(state.experiments, state.reflections, state.params))


def stage_index(state: State) -> None:
    params, report, sweep = state.params, state.report, state.sweep
    strong_counts = [int((state.reflections["id"] == i).count(True)) for i in range(len(state.experiments))]
    if params.refinement.blocks.model == "continuous":
        try:
            continuous.check_blocks(state.experiments)
        except GapfillError as e:
            # e.g. a block whose start angle is not on the rotation (a wrong
            # header): per-block crystals, and such a block is dropped below
            msg = f"{e}: using refinement.blocks.model=per_block"
            logger.warning("Warning: %s", msg)
            report.warnings.append(msg)
            # this run's own copy: the caller's parameters stay as given
            state.params = params = copy.deepcopy(params)
            params.refinement.blocks.model = "per_block"
    if params.refinement.blocks.model == "continuous":
        experiments, indexed = continuous.index(state.experiments, state.reflections, params)
    else:
        experiments, indexed = index(state.experiments, state.reflections, params)
    flags = indexed.get_flags(indexed.flags.indexed)
    keep = set()
    for i, exp in enumerate(experiments):
        block = report.block(exp.identifier)
        n_indexed = int(((indexed["id"] == i) & flags).count(True))
        fraction = n_indexed / strong_counts[i] if strong_counts[i] else 0.0
        block.stats["indexed"] = n_indexed
        block.stats["indexed_fraction"] = fraction
        logger.info(
            "Block %d (images %s): %d of %d spots indexed (%.1f%%)",
            block.number, block.label, n_indexed, strong_counts[i], 100 * fraction,
        )
        if fraction >= params.indexing.blocks.min_indexed_fraction and n_indexed > 0:
            keep.add(exp.identifier)
        else:
            reason = (
                f"only {100 * fraction:.0f}% of its spots indexed "
                f"(indexing.blocks.min_indexed_fraction={params.indexing.blocks.min_indexed_fraction})"
            )
            logger.warning("Dropping block %d (images %s): %s", block.number, block.label, reason)
            report.warnings.append(f"block {block.number} (images {block.label}) dropped: {reason}")
            sweep.drop(block.first, block.last, "block could not be indexed")
            sweep.dropped_blocks.append({"first": block.first, "last": block.last, "reason": reason,
                                         "stats": dict(block.stats)})
    if not keep:
        raise poorly_indexed_error(params, max(b.stats.get("indexed_fraction", 0) for b in report.blocks))
    if len(keep) < len(experiments):
        indexed, experiments = keep_experiments(indexed, experiments, keep)
        report.sync(sweep, experiments)
    if params.indexing.bravais_lattice not in (None, "None", "none", ""):
        experiments, indexed, chosen = choose_bravais_lattice(experiments, indexed, params)
        report.crystal["bravais_lattice"] = chosen
    crystal = experiments[0].crystal
    report.crystal["indexing"] = {
        "unit_cell": list(crystal.get_unit_cell().parameters()),
        "space_group": str(crystal.get_space_group().info()),
    }
    state.experiments, state.reflections = experiments, indexed


def stage_refine(state: State) -> None:
    params, report = state.params, state.report
    if params.refinement.blocks.model == "continuous":
        experiments, reflections, record = continuous.refine(
            state.experiments, state.reflections, params,
            scan_varying_cell=params.refinement.blocks.continuous_scan_varying_cell,
            scan_varying=params.refinement.blocks.scan_varying,
            reindex_cycles=params.refinement.blocks.continuous_reindex_cycles,
        )
        for identifier, stats in record["blocks"].items():
            block = report.block(identifier)
            block.stats.update(stats)
            r = stats.get("rmsd_scan_varying")
            if r:
                logger.info(
                    "Block %d (images %s): RMSD x %.3f px, y %.3f px, phi %.3f images (%d reflections)",
                    block.number, block.label, r["x"], r["y"], r["phi"], r["n"],
                )
        crystal = record["crystal"]
        # the cell is static: the static job's cell, with its esds
        report.crystal["static"] = {
            "unit_cell": crystal["unit_cell"],
            "unit_cell_esd": crystal["unit_cell_esd"],
            "space_group": crystal["space_group"],
        }
        report.crystal["cell_esd"] = crystal["unit_cell_esd"]
        report.crystal["cells_tied"] = True  # one cell: no per-block esds
        report.crystal["model"] = "continuous"
        state.experiments, state.reflections = experiments, reflections
    else:
        state.experiments, state.reflections, record = refine(state.experiments, state.reflections, params)
        report.add(record)
        report.crystal["model"] = "per_block"
    if sanity.enabled(state.params):
        _warn(state, sanity.refinement_warnings(state.experiments, state.reflections, state.params))


def _warn(state: State, lines) -> None:
    """Data sanity warnings: logged, and in the summary."""
    for line in lines:
        logger.warning("Warning: %s", line)
        if line not in state.report.warnings:
            state.report.warnings.append(line)


def stage_integrate(state: State) -> None:
    state.experiments, state.reflections, record = integrate(
        state.experiments, state.reflections, state.params, state.sweep
    )
    state.report.add(record)
    if sanity.enabled(state.params):
        _warn(state, sanity.integration_warnings(state.experiments, state.reflections, state.params))


def stage_export(state: State) -> None:
    finalise(state)
    if state.outputs is None:
        return
    export(state.experiments, state.reflections, state.params, state.report, state.outputs)


def stage_scale(state: State) -> None:
    state.scaled = scale(state.experiments, state.reflections, state.params, state.report, state.outputs)


def _always(params) -> bool:
    return True


# (name, stage, whether it runs with these parameters)
STAGES = [
    ("import", stage_import, _always),
    ("spot finding", stage_find_spots, _always),
    ("bad images", stage_bad_images, lambda p: p.gaps.auto_exclude),
    ("detector checks", stage_detector_checks, sanity.enabled),
    ("indexing", stage_index, _always),
    ("refinement", stage_refine, _always),
    ("integration", stage_integrate, _always),
    ("export", stage_export, _always),
    ("scaling", stage_scale, lambda p: p.scaling.run),
]


class Pipeline:
    """Run the stages in order over one State."""

    def __init__(self, params, images=(), outputs=None, sweep=None, progress=None):
        self.state = State(params=params, images=list(images or []), sweep=sweep)
        self.state.outputs = outputs
        self.progress = progress  # progress.Progress of the command line, or None

    @property
    def preloaded(self):
        return self.state.sweep

    @preloaded.setter
    def preloaded(self, sweep) -> None:
        """A Sweep made elsewhere (importer.adopt_experiments): no import."""
        self.state.sweep = sweep

    def run(self, stop_before: str | None = None) -> State:
        """Run the stages in order (up to, not including, `stop_before`)."""
        state = self.state
        t_start = time.perf_counter()
        for name, stage, runs in STAGES:
            if name == stop_before:
                break
            if not runs(state.params):
                continue
            logger.info("")
            logger.info("=== %s ===", name.capitalize())
            t0 = time.perf_counter()
            with stage_progress(self.progress, name, state):  # and image numbers in DIALS' messages
                stage(state)
            seconds = time.perf_counter() - t0
            state.report.stages.append({"name": name, "seconds": seconds})
            logger.info("%s done in %.1f s", name.capitalize(), seconds)
        finalise(state)
        state.report.inputs["total_seconds"] = time.perf_counter() - t_start
        return state
