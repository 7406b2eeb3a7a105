"""Refinement stage: joint static refinement, then per-block crystals refined
scan-varying in ONE job with shared beam, detector and goniometer.

Each macrocycle is DIALS' own ``dials.command_line.refine.run_macrocycle``
(RefinerFactory, refiner.run, predictions and flags written back).  Between
the two the crystal is copied per block, as ``dials.refine`` does in its
``run()`` in DIALS 3.12 (and ``run_dials_refine`` from 3.14); done here so
it happens on every version.

Beyond the manual recipe:

- ``refinement.blocks.tie_cells``: the unit cells of all blocks are kept
  static within each block and restrained to their common mean with DIALS'
  ``unit_cell.restraints.tie_to_group`` (DIALS ignores cell restraints on a
  scan-varying cell), while orientations are scan-varying.
- Blocks below ``refinement.blocks.min_images_scan_varying`` images or
  ``min_reflections_scan_varying`` reflections keep a static crystal inside
  the joint scan-varying job.
- Blocks with too few reflections to refine at all keep the static joint
  result and are left out of the scan-varying job (they still share the
  refined beam, detector and goniometer).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time

import iotbx.phil

from dials.algorithms.refinement.parameterisation import configure
from dials.algorithms.refinement.parameterisation.crystal_parameters import (
    CrystalOrientationParameterisation,
    CrystalUnitCellParameterisation,
)
from dials.algorithms.refinement.refiner import phil_scope
from dials.command_line.refine import run_macrocycle

from dials_gapfill.errors import GapfillError
from dials_gapfill.phil import dials_refine_params
from dials_gapfill.model.state import Record
from dials_gapfill.model.tables import join_blocks, keep_experiments, rmsds

logger = logging.getLogger("dials.process_gapped.refinement")

# A block needs this many indexed reflections to take part in the scan-varying
# job: its static crystal has up to 9 parameters, DIALS' auto-reduction asks for
# 5 reflections per parameter, and outlier rejection may take a quarter.
_MIN_REFLECTIONS_TO_REFINE = 100


def _macrocycle(params, reflections, experiments, what: str):
    t0 = time.perf_counter()
    try:
        refiner, reflections, history = run_macrocycle(params, reflections, experiments)
        logger.info(
            "%s: %d steps in %.1f s", what.capitalize(), history.get_nrows(), time.perf_counter() - t0
        )
    except SystemExit as e:  # DIALS 3.12 exits on configuration/runtime errors
        raise GapfillError(
            f"{what} failed: {' '.join(str(e.code).split())[:200]}: check refinement.* "
            "(or drop the block with gaps.exclude_images)"
        ) from None
    return refiner.get_experiments(), reflections, refiner


@contextlib.contextmanager
def _static_crystals(crystals):
    """Parameterise `crystals` statically inside a scan-varying refinement.

    DIALS chooses static or scan-varying for all crystals of a job; its
    scan-varying prediction parameterisation accepts a mix. The choice is
    made per crystal by wrapping configure._parameterise_crystals for the
    duration of one job; where that function does not exist (another DIALS
    version) all crystals are scan-varying and this says so.
    """
    if not crystals:
        yield True
        return
    original = getattr(configure, "_parameterise_crystals", None)
    if original is None:
        yield False
        return

    def static_version(p, cls):
        if p.get_model() not in crystals or not hasattr(p, "num_sets"):
            return p
        static = cls(p.get_model(), experiment_ids=p.get_experiment_ids())
        static.model_identifier = p.model_identifier
        return static

    def parameterise(options, experiments, analysis):
        ori, uc = original(options, experiments, analysis)
        ori = [static_version(p, CrystalOrientationParameterisation) for p in ori]
        uc = [static_version(p, CrystalUnitCellParameterisation) for p in uc]
        return ori, uc

    configure._parameterise_crystals = parameterise
    try:
        yield True
    finally:
        configure._parameterise_crystals = original


def _record_rmsds(reflections, experiments, record, key):
    what = "static" if key == "rmsd_static" else "scan-varying"
    for i, exp in enumerate(experiments):
        r = rmsds(reflections, i)
        if r is None:
            continue
        record.block(exp.identifier)[key] = {"x": r[0], "y": r[1], "phi": r[2], "n": r[3]}
        logger.info(
            "%s: RMSD x %.3f px, y %.3f px, phi %.3f images (%d reflections, %s)",
            record.name(exp.identifier), r[0], r[1], r[2], r[3], what,
        )


def split_crystals(experiments) -> None:
    """One crystal object per block (a copy of the shared one)."""
    seen = set()
    for exp in experiments:
        if id(exp.crystal) in seen:
            exp.crystal = copy.deepcopy(exp.crystal)
        seen.add(id(exp.crystal))


def refine(experiments, reflections, params):
    """Static joint refinement, then scan-varying per-block refinement.

    `reflections` are the indexing result; only indexed reflections are used
    (and returned).  Returns (experiments, reflections, record).
    """
    record = Record(experiments)
    blocks_p = params.refinement.blocks
    indexed = reflections.get_flags(reflections.flags.indexed) & (reflections["id"] >= 0)
    reflections = reflections.select(indexed)

    # 1. static refinement of everything, one crystal
    rp = dials_refine_params(params)  # one crystal: a small job
    rp.refinement.parameterisation.scan_varying = False
    logger.info("Static refinement of %d block(s) with one crystal", len(experiments))
    experiments, reflections, _ = _macrocycle(rp, reflections, experiments, "static refinement")
    _record_rmsds(reflections, experiments, record, "rmsd_static")
    static_crystal = experiments[0].crystal
    record.crystal["static"] = {
        "unit_cell": list(static_crystal.get_unit_cell().parameters()),
        # one crystal refined against all blocks: the esds of the one cell
        "unit_cell_esd": list(static_crystal.get_cell_parameter_sd()),
        "space_group": str(static_crystal.get_space_group().info()),
    }

    record.crystal["cell_esd"] = record.crystal["static"]["unit_cell_esd"]
    record.crystal["cells_tied"] = bool(blocks_p.tie_cells and len(experiments) > 1)

    # 2. one crystal per block
    split_crystals(experiments)
    if not blocks_p.scan_varying:
        for exp in experiments:
            record.block(exp.identifier)["refinement"] = "static"
        return experiments, reflections, record

    # 3. scan-varying refinement of all blocks in one job
    counts = [int((reflections["id"] == i).count(True)) for i in range(len(experiments))]
    in_job, static_only = set(), set()
    for exp, n in zip(experiments, counts):
        block = record.block(exp.identifier)
        if n < _MIN_REFLECTIONS_TO_REFINE:
            block["refinement"] = "static (joint result: too few reflections)"
            continue
        in_job.add(exp.identifier)
        small = (
            exp.scan.get_num_images() < blocks_p.min_images_scan_varying
            or n < blocks_p.min_reflections_scan_varying
        )
        if small:
            static_only.add(exp.crystal)
            block["refinement"] = "static crystal in the scan-varying job"
        else:
            block["refinement"] = "scan-varying"
    if len(static_only) == len(in_job):
        logger.info("No block is large enough for scan-varying refinement")
        return experiments, reflections, record

    sv_refl, sv_expts = keep_experiments(reflections, experiments, in_job)
    rp = dials_refine_params(params, n_blocks=len(sv_expts))
    par = rp.refinement.parameterisation
    par.scan_varying = True
    if blocks_p.tie_cells and len(sv_expts) > 1:
        par.crystal.unit_cell.force_static = True
        _set_tie(rp, blocks_p.tie_sigma)
    logger.info(
        "Scan-varying refinement of %d block(s) in one job (%d with a static crystal)",
        len(sv_expts),
        len(static_only),
    )
    with _static_crystals(static_only) as applied:
        if not applied:
            logger.warning(
                "This DIALS cannot mix static and scan-varying crystals: all are scan-varying"
            )
        sv_expts, sv_refl, _ = _macrocycle(rp, sv_refl, sv_expts, "scan-varying refinement")
    _record_rmsds(sv_refl, sv_expts, record, "rmsd_scan_varying")

    # put the refined models in place; beam, detector, goniometer stay shared
    refined = {e.identifier: e for e in sv_expts}
    shared = sv_expts[0]
    for exp in experiments:
        if exp.identifier in refined:
            exp.crystal = refined[exp.identifier].crystal
        exp.beam, exp.detector, exp.goniometer = shared.beam, shared.detector, shared.goniometer
    return experiments, join_blocks([sv_refl, reflections], experiments), record


def _set_tie(rp, sigmas):
    """Restrain the unit cells of all crystals to their mean (tie_to_group)."""
    extract = phil_scope.fetch(
        iotbx.phil.parse(
            "refinement.parameterisation.crystal.unit_cell.restraints.tie_to_group {\n"
            f"  sigmas = {' '.join(str(s) for s in sigmas)}\n"
            "}"
        )
    ).extract()
    rp.refinement.parameterisation.crystal.unit_cell.restraints.tie_to_group = (
        extract.refinement.parameterisation.crystal.unit_cell.restraints.tie_to_group
    )
