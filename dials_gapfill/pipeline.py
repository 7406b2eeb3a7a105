"""The orchestrator: an ordered list of stages over one State.

Modelled on DIALS' ``stills_process.Processor``: each stage calls DIALS' own
Python API on the in-memory experiments and reflections; nothing is written
between stages.  Only the export stage writes files, through ``Outputs``
(temporary names, renamed at the end).
"""

from __future__ import annotations

import logging
import time

from dials_gapfill.errors import GapfillError
from dials_gapfill.state import State

logger = logging.getLogger("dials.process_gapped")


# --------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------


def stage_import(state: State) -> None:
    from dials_gapfill.importer import import_images

    state.experiments = import_images(state.params, state.images, state.report)


def _resplit(state: State, excluded: set, reason_by_image: dict, by: str) -> None:
    """Cut the excluded images out of the blocks (after spot finding)."""
    from dials_gapfill.tables import assign_to_blocks, blocks_of, drop_short_blocks, split_experiments

    report = state.report
    for n in sorted(excluded):
        logger.warning("Excluding image %d: %s", n, reason_by_image[n])
        report.exclude(n, reason_by_image[n], by)
    template = report.inputs.get("template", "")
    experiments = split_experiments(state.experiments, excluded, template)
    keep = drop_short_blocks(experiments, state.params.gaps.min_block_images, report, " after exclusions")
    if not keep:
        raise GapfillError("no usable images left after excluding bad images: check the data")
    state.experiments = keep
    report.blocks = blocks_of(state.experiments)
    if state.reflections is not None:
        assign_to_blocks(state.reflections, state.experiments)
        state.reflections = state.reflections.select(state.reflections["id"] >= 0)


def stage_find_spots(state: State) -> None:
    from dials_gapfill.importer import import_images
    from dials_gapfill.spotfinding import find_spots

    params, report = state.params, state.report
    reflections, unreadable = find_spots(state.experiments, params, report)
    if unreadable:
        # images the header checks could not catch (e.g. compressed files):
        # import again without them (fresh image sets), then find spots again
        if not params.gaps.auto_exclude:
            n, reason = next(iter(sorted(unreadable.items())))
            raise GapfillError(
                f"image {n} cannot be read ({reason}): leave it out with exclude_images={n} "
                "(or set gaps.auto_exclude=True)"
            )
        for n, reason in sorted(unreadable.items()):
            logger.warning("Excluding image %d: %s", n, reason)
        state.experiments = import_images(params, state.images, report, extra_excluded=unreadable)
        report.warnings[:] = list(dict.fromkeys(report.warnings))
        reflections, still = find_spots(state.experiments, params, report)
        if still:
            raise GapfillError(
                f"images {sorted(still)} cannot be read: leave them out with exclude_images="
            )
    if len(reflections) == 0:
        raise GapfillError(
            "no strong spots on any image: the images are blank (no diffraction); check "
            "the shutter and beam, or the spot finding settings (spotfinder.*)"
        )
    state.reflections = reflections
    _count_spots(state)


def _count_spots(state: State) -> None:
    from dials_gapfill.spotfinding import spot_counts_per_image

    counts = spot_counts_per_image(state.reflections, state.experiments)
    for n, c in counts.items():
        state.report.per_image.setdefault(n, {})["spots"] = c
    for i, exp in enumerate(state.experiments):
        block = state.report.block(exp.identifier)
        block.stats["spots"] = int((state.reflections["id"] == i).count(True))
        logger.info("Block %d (images %s): %d strong spots", block.number, block.label, block.stats["spots"])


def stage_bad_images(state: State) -> None:
    """Blank, all-zero and over-exposed images become gaps.

    Over-exposed images are handled first: their huge spots join the spots of
    the neighbouring images in DIALS' 3D spot finding, which would make the
    neighbours look blank.  After each exclusion the spots of the blocks that
    were cut are found again, so they are exactly the spots of a run with
    those images excluded by hand.
    """
    from dxtbx.model.experiment_list import ExperimentList

    from dials.array_family import flex

    from dials_gapfill.bad_images import find_bad_images
    from dials_gapfill.spotfinding import find_spots
    from dials_gapfill.tables import assign_to_blocks

    params = state.params
    if not params.gaps.auto_exclude:
        return
    found = False
    for _ in range(3):
        bad = find_bad_images(state.reflections, state.experiments, params)
        if not bad:
            break
        found = True
        used = sum(b.n_images for b in state.report.blocks)
        if len(bad) >= used:
            raise GapfillError(
                f"all {used} images are bad ({next(iter(bad.values()))}, ...): no diffraction "
                "to process; check the data collection"
            )
        over = {n: r for n, r in bad.items() if r.startswith("over-exposed")}
        chosen = over or bad
        cut = [
            e.scan.get_image_range() for e in state.experiments
            if any(e.scan.get_image_range()[0] <= n <= e.scan.get_image_range()[1] for n in chosen)
        ]
        _resplit(state, set(chosen), chosen, "auto")
        for n in chosen:
            state.report.per_image.setdefault(n, {})["spots"] = 0
        # spots of the cut blocks, found again on the new blocks
        redo = ExperimentList(
            [e for e in state.experiments if any(a <= e.scan.get_image_range()[0] <= b for a, b in cut)]
        )
        fresh, unreadable = find_spots(redo, params, state.report)
        if unreadable:
            raise GapfillError(f"images {sorted(unreadable)} cannot be read: leave them out with exclude_images=")
        # block by block, in block order and in the spot finder's order within a
        # block: the same table as one spot finding on the blocks (which matters,
        # refinement samples reflections at random from the table's order)
        redone = {e.identifier for e in redo}
        old = state.reflections
        old_ids = dict(zip(old.experiment_identifiers().values(), old.experiment_identifiers().keys()))
        new_ids = dict(zip(fresh.experiment_identifiers().values(), fresh.experiment_identifiers().keys()))
        merged = flex.reflection_table()
        for exp in state.experiments:
            if exp.identifier in redone:
                merged.extend(fresh.select(fresh["id"] == new_ids[exp.identifier]))
            elif exp.identifier in old_ids:
                merged.extend(old.select(old["id"] == old_ids[exp.identifier]))
        assign_to_blocks(merged, state.experiments)
        state.reflections = merged.select(merged["id"] >= 0)
    else:
        logger.info("Stopped looking for bad images after 3 rounds")
    if found:
        _count_spots(state)
    else:
        logger.info("No bad images found")


def stage_index(state: State) -> None:
    from dials_gapfill.indexing import index, poorly_indexed_error
    from dials_gapfill.tables import keep_experiments

    params, report = state.params, state.report
    strong_counts = [int((state.reflections["id"] == i).count(True)) for i in range(len(state.experiments))]
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
            report.dropped_blocks.append({"first": block.first, "last": block.last, "reason": reason, "stats": dict(block.stats)})
            for n in range(block.first, block.last + 1):
                report.exclude(n, "block could not be indexed", "auto")
    if not keep:
        raise poorly_indexed_error(params, max(b.stats.get("indexed_fraction", 0) for b in report.blocks))
    if len(keep) < len(experiments):
        indexed, experiments = keep_experiments(indexed, experiments, keep)
        report.blocks = [b for b in report.blocks if b.identifier in keep]
    if params.indexing.bravais_lattice not in (None, "None", "none", ""):
        from dials_gapfill.indexing import choose_bravais_lattice

        experiments, indexed, chosen = choose_bravais_lattice(experiments, indexed, params)
        report.crystal["bravais_lattice"] = chosen
    crystal = experiments[0].crystal
    report.crystal["indexing"] = {
        "unit_cell": list(crystal.get_unit_cell().parameters()),
        "space_group": str(crystal.get_space_group().info()),
    }
    state.experiments, state.reflections = experiments, indexed


def stage_refine(state: State) -> None:
    from dials_gapfill.refinement import refine

    state.experiments, state.reflections = refine(
        state.experiments, state.reflections, state.params, state.report
    )


def stage_integrate(state: State) -> None:
    from dials_gapfill.integration import integrate

    state.experiments, state.reflections = integrate(
        state.experiments, state.reflections, state.params, state.report
    )


def stage_export(state: State) -> None:
    from dials_gapfill.export import export
    from dials_gapfill.report import finalise

    finalise(state)
    if state.outputs is None:
        return
    export(state.experiments, state.reflections, state.params, state.report, state.outputs)


def stage_scale(state: State) -> None:
    from dials_gapfill.scaling import scale

    if not state.params.scaling.run:
        return
    state.scaled = scale(state.experiments, state.reflections, state.params, state.report, state.outputs)


STAGES = [
    ("import", stage_import),
    ("spot finding", stage_find_spots),
    ("bad images", stage_bad_images),
    ("indexing", stage_index),
    ("refinement", stage_refine),
    ("integration", stage_integrate),
    ("export", stage_export),
    ("scaling", stage_scale),
]


class Pipeline:
    """Run the stages in order over one State."""

    def __init__(self, params, images=(), outputs=None, experiments=None):
        self.state = State(params=params, images=list(images or []))
        self.state.outputs = outputs
        self.preloaded = experiments

    def run(self, stop_after: str | None = None) -> State:
        state = self.state
        t_start = time.perf_counter()
        for name, stage in STAGES:
            if name == "import" and self.preloaded is not None:
                state.experiments = self.preloaded
                continue
            logger.info("")
            logger.info("=== %s ===", name.capitalize())
            t0 = time.perf_counter()
            stage(state)
            seconds = time.perf_counter() - t0
            state.report.stages.append({"name": name, "seconds": seconds})
            logger.info("%s done in %.1f s", name.capitalize(), seconds)
            if name == stop_after:
                break
        from dials_gapfill.report import finalise

        finalise(state)
        state.report.inputs["total_seconds"] = time.perf_counter() - t_start
        return state
