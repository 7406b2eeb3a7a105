"""The per-block crystal model: the documented DIALS recipe for missing images.

Indexing: ONE crystal for all blocks.  ``indexing.blocks.lattice_search``
chooses where DIALS looks for the lattice:

- ``largest`` (default): DIALS' indexer (``Indexer.from_parameters``: the
  basis-vector search, the evaluation of candidate solutions and the
  refinement protocol of dials.index) on the largest block, then DIALS'
  known-orientation indexer on ALL blocks with that crystal, so every block
  is indexed and refined with the one crystal.  The cost of the search does
  not grow with the number of blocks (each candidate is refined with every
  block in a joint search, which is what makes dials.index slower on a
  gapped sweep than on the same images without gaps).
- ``joint``: dials.index's joint indexing of all blocks at once
  (``dials.command_line.index.index``), exactly as the CLI.

If the search fails on the largest block, the joint search is tried (and the
other way round).  With several sweeps the joint search comes first; where it
fails, the continuous model's search on each sweep's blocks joined into one
scan (sparse sweeps: DIALS' joint indexing of blocks of a dozen spots fails
where one block's refinement does), then the largest block's.

Refinement: joint static refinement of the one crystal, then a copy of the
crystal per block refined static and then scan-varying in ONE job with shared beam and
detector (and each sweep's goniometer).  Each macrocycle is DIALS' own
``dials.command_line.refine.run_macrocycle`` (RefinerFactory, refiner.run,
predictions and flags written back).  Between the two the crystal is copied
per block, as ``dials.refine`` does in its ``run()``.  Beyond the recipe:

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

import copy
import logging
import time

from dials.algorithms.indexing import DialsIndexError, indexer
from dials.array_family import flex
from dials.command_line.index import index as dials_index
from dials.command_line.refine import run_macrocycle
from dxtbx.model.experiment_list import ExperimentList

from dials_gapfill import dials_compat
from dials_gapfill.crystal_model.base import (
    CrystalModel,
    crystal_per_sweep,
    fixing_sparse_sweeps,
    one_cell,
    refined_models,
    sweep_groups,
    tie_cells,
    say_too_few_spots,
)
from dials_gapfill.crystal_model.continuous import (
    ContinuousModel,
    block_label,
    crystal_on_images,
    reject_outliers,
    spots_given_back,
    sweeps_judged_apart,
)
from dials_gapfill.crystal_model.lattice import SEARCH_ERRORS, staged_search
from dials_gapfill.errors import GapfillError, indexing_failure, search_failure
from dials_gapfill.model.state import Record
from dials_gapfill.model.tables import join_blocks, keep_experiments, rmsds, set_identifiers
from dials_gapfill.phil import dials_index_params, dials_refine_params

logger = logging.getLogger("dials.process_gapped.refinement")
index_logger = logging.getLogger("dials.process_gapped.indexing")

# A block needs this many indexed reflections to take part in the scan-varying
# job: its static crystal has up to 9 parameters, DIALS' auto-reduction asks for
# 5 reflections per parameter, and outlier rejection may take a quarter.
MIN_REFLECTIONS_TO_REFINE = 100
# blocks with at least this many images get a static step of their own
# before the scan-varying job (see PerBlockModel._scan_varying)
PER_BLOCK_STATIC_MIN_IMAGES = 3


class PerBlockModel(CrystalModel):
    """One crystal indexed and refined statically over all blocks, then a
    crystal per block refined scan-varying in one job."""

    name = "per_block"
    profile_model = "per_block"

    # ---- indexing ----------------------------------------------------------

    def index(self, experiments, reflections):
        """(experiments sharing one crystal, reflections with miller indices, record)."""
        params = self.params
        ip = dials_index_params(params)  # one crystal: a small refinement job
        ip.indexing.joint_indexing = True
        searches = [self._search_largest_block, self._search_joint]
        # several sweeps: the joint search first, as dials.index does; a
        # crystal found on one sweep's block indexes another sweep only as
        # well as the headers give their goniometer settings (L-cysteine
        # sweeps 1 and 3: 14 % of sweep 3's spots, against 65 % jointly)
        several = len(sweep_groups(experiments)) > 1
        if params.indexing.blocks.lattice_search == "joint" or len(experiments) == 1 or several:
            searches.reverse()
        if len(experiments) == 1:
            searches = searches[:1]
        elif several:
            # then each sweep's blocks joined, before one block's crystal
            searches.insert(1, self._search_sweeps)
        failures = []
        for search in searches:
            try:
                found, indexed = search(experiments, reflections, copy.deepcopy(ip))
            except SEARCH_ERRORS as e:
                failures.append(e)
                index_logger.warning(
                    "Lattice search (%s) failed: %s", search.__doc__.split(":")[0],
                    search_failure(e),
                )
                continue
            _restore_identifiers(found, indexed, experiments)
            return found, indexed, Record()
        raise GapfillError(indexing_failure(failures[0], params))

    def _search_sweeps(self, experiments, reflections, ip):
        """sweeps jointly: the continuous model's search, each sweep's blocks
        joined into one scan.  A block of a sparse sweep holds a few spots,
        and DIALS' joint indexing of blocks fails where one block's
        refinement does (L-cysteine without image 7 of sweep 4: its blocks
        of 6 and 8 images hold 19 and 15 spots)."""
        try:
            found, indexed, _ = ContinuousModel(self.params, self.sweeps).index(experiments, reflections)
        except GapfillError as e:  # its searches failed: the next search is tried
            raise DialsIndexError(search_failure(getattr(e, "search_error", e))) from None
        del indexed["gap_edge"]
        if "s1" not in indexed:  # DIALS' refinement sets the observed s1 where it is zero
            indexed["s1"] = flex.vec3_double(len(indexed), (0.0, 0.0, 0.0))
        return found, indexed

    def _search_joint(self, experiments, reflections, ip):
        """all blocks jointly: dials.index on every block at once."""
        n_spots = int((reflections["id"] >= 0).count(True))
        # the number of experiments DIALS' indexer returns is not checked here
        # (the continuous model's search is): on L-cysteine without image 11
        # of sweep 3 the per-block run keeps all 5 blocks, cell within
        # 0.03 %; refused as a failed search, it stopped at indexing
        # (benchmarks/results/2026-12-05-l-cysteine-gaps.md)
        return staged_search(lambda p: dials_index(_fresh_models(experiments), [reflections], p), ip, n_spots,
                             self.params)

    def _search_largest_block(self, experiments, reflections, ip):
        """largest block: DIALS' indexer on the block with most spots, then all
        blocks indexed with its crystal (known orientation)."""
        counts = [int((reflections["id"] == i).count(True)) for i in range(len(experiments))]
        largest = max(range(len(experiments)), key=lambda i: counts[i])
        index_logger.info(
            "Lattice search on block %d (%d spots), then all %d blocks with its crystal",
            largest + 1, counts[largest], len(experiments),
        )
        refl = reflections.select(reflections["id"] == largest)
        refl["id"] = flex.int(len(refl), 0)
        set_identifiers(refl, [experiments[largest]])
        refl["imageset_id"] = refl["id"]

        def run(p):
            fresh = _fresh_models(ExperimentList([experiments[largest]]))
            search = indexer.Indexer.from_parameters(copy.deepcopy(refl), fresh, params=copy.deepcopy(p))
            search.index()
            return search.refined_experiments, search.refined_reflections

        found = staged_search(run, ip, len(refl), self.params)[0][0]
        crystal = found.crystal

        # every block with that crystal and the geometry refined with it (the
        # crystal only fits that geometry): DIALS' known-orientation indexer, with
        # one crystal shared by all blocks (as DIALS' joint indexing builds
        # it); the blocks that shared the searched block's beam, detector or
        # goniometer take its refined one, the others (another sweep's
        # goniometer setting or detector position) keep theirs
        table = copy.deepcopy(reflections)
        table["imageset_id"] = table["id"]
        searched = experiments[largest]
        blocks = ExperimentList()
        for exp, block in zip(experiments, _fresh_models(experiments)):
            for name in ("beam", "detector", "goniometer"):
                if getattr(exp, name) is getattr(searched, name):
                    setattr(block, name, getattr(found, name))
            blocks.append(block)
        if ip.indexing.known_symmetry.space_group is None:
            ip.indexing.known_symmetry.space_group = crystal.get_space_group().info()
        joint = dials_compat.joint_known_orientation(table, blocks, ip, crystal)
        indexed = copy.deepcopy(joint.refined_reflections)
        indexed.extend(joint.unindexed_reflections)
        return joint.refined_experiments, indexed

    # ---- refinement --------------------------------------------------------

    def refine(self, experiments, reflections):
        """Static joint refinement, then scan-varying per-block refinement.

        `reflections` are the indexing result; only indexed reflections are
        used (and returned).  Returns (experiments, reflections, record)."""
        params = self.params
        record = Record()
        names = self.block_names(experiments)
        blocks_p = params.refinement.blocks
        indexed = reflections.get_flags(reflections.flags.indexed) & (reflections["id"] >= 0)
        reflections = reflections.select(indexed)

        # 1. static refinement of everything, one crystal (with several
        # sweeps an orientation per sweep and one cell, the orientations
        # first, their outliers judged sweep by sweep: see _judged_by_sweep)
        rp = dials_refine_params(params)  # one crystal: a small job
        rp.refinement.parameterisation.scan_varying = False
        n_sweeps = len(sweep_groups(experiments))
        numbers = self.sweep_numbers(experiments)

        def too_few(sweeps, what):
            say_too_few_spots(record, sweeps, what)

        job_reflections, job_rp = reflections, rp
        if n_sweeps > 1:
            crystal_per_sweep(experiments)
            one_cell(rp, experiments[0].crystal)
            logger.info("Static refinement of an orientation per sweep (%d sweeps), one cell", n_sweeps)
            # a sweep all of whose blocks are below DIALS' minimum for outlier
            # rejection: both static jobs judge spots sweep by sweep
            # (_judged_by_sweep); otherwise the first job has no rejection and
            # the second DIALS' own, block by block
            small = _a_sweep_of_small_blocks(reflections, experiments, rp)
            first_reflections, first = reflections, copy.deepcopy(rp)
            first.refinement.reflections.outlier.algorithm = "null"
            if small:
                first_reflections, first = _judged_by_sweep(reflections, experiments, rp, numbers, unjudged="null")
            experiments, after = fixing_sparse_sweeps(
                lambda p: _macrocycle(p, first_reflections, experiments, "static refinement"), first, experiments,
                too_few, numbers=numbers)
            if after.size() == reflections.size():  # (none left out) the job's table, as before
                reflections = after
            if small:
                job_reflections, job_rp = _judged_by_sweep(reflections, experiments, rp, numbers)
            else:
                job_reflections, job_rp = _small_blocks_judged_with_their_sweep(reflections, experiments, rp, numbers)
        logger.info("Static refinement of %d block(s) with one crystal", len(experiments))
        experiments, reflections, refiner = fixing_sparse_sweeps(
            lambda p: _macrocycle(p, job_reflections, experiments, "static refinement", with_refiner=True),
            job_rp, experiments, too_few, numbers=numbers)
        if n_sweeps > 1:
            dials_compat.set_constrained_cell_covariance(refiner, list(experiments.crystals()))
        _record_rmsds(reflections, experiments, record, "rmsd_static", names)
        static_crystal = experiments[0].crystal
        tied = bool(blocks_p.tie_cells and len(experiments) > 1)
        record.crystal.update({
            "static": {
                "unit_cell": list(static_crystal.get_unit_cell().parameters()),
                # one crystal refined against all blocks: the esds of the one cell
                "unit_cell_esd": list(static_crystal.get_cell_parameter_sd()),
                "space_group": str(static_crystal.get_space_group().info()),
            },
            "model": self.name,
            "cells_tied": tied,
        })
        record.crystal["cell_esd"] = record.crystal["static"]["unit_cell_esd"]

        # 2. one crystal per block
        _split_crystals(experiments)
        if blocks_p.scan_varying:
            experiments, reflections = self._scan_varying(experiments, reflections, record, names)
        else:
            for exp in experiments:
                record.block(exp.identifier)["refinement"] = "static"
        # a block's own esds only where its cell is its own (DIALS' esds of
        # cells tied in a scan-varying job are not those of the one cell)
        for exp in experiments:
            esd = [] if tied else list(exp.crystal.get_cell_parameter_sd())
            record.block(exp.identifier)["unit_cell_esd"] = esd if any(esd) else None
        return experiments, reflections, record

    def _scan_varying(self, experiments, reflections, record, names):
        """3. the blocks' crystals scan-varying in one job."""
        blocks_p = self.params.refinement.blocks
        counts = [int((reflections["id"] == i).count(True)) for i in range(len(experiments))]
        in_job, static_only = set(), set()
        for exp, n in zip(experiments, counts):
            block = record.block(exp.identifier)
            if n < MIN_REFLECTIONS_TO_REFINE:
                block["refinement"] = "static (joint result: too few reflections)"
                continue
            in_job.add(exp.identifier)
            small = (
                exp.scan.get_num_images() < blocks_p.min_images_scan_varying
                or n < blocks_p.min_reflections_scan_varying
            )
            if small:
                static_only.add(exp.identifier)
                block["refinement"] = "static crystal in the scan-varying job"
            else:
                block["refinement"] = "scan-varying"
        if len(static_only) == len(in_job):
            logger.info("No block is large enough for scan-varying refinement")
            return experiments, reflections

        sv_refl, sv_expts = keep_experiments(reflections, experiments, in_job)
        # dials.refine gives each scan its own crystal BEFORE its static
        # macrocycle, so each block starts the scan-varying job from its own
        # static orientation.  From the one crystal's instead, a crystal that
        # drifts leaves every block's residuals large, outlier rejection
        # throws out the block ends and the smoothers start far off (every
        # 10th image missing, accelerating drift: 0.0288 / 0.0768 deg median
        # / worst against the truth, 0.0089 / 0.0423 with this step; see
        # benchmarks/results/2026-12-03-chain-truth-every10.md).  Not for
        # blocks of one or two images: every spot of those touches a gap, its
        # z centroid is pulled into the block, and the one crystal's
        # orientation, held by all blocks, is the better start (every other
        # image missing: worst 0.098 deg with a static step of their own).
        own = {e.identifier for e in sv_expts if e.scan.get_num_images() >= PER_BLOCK_STATIC_MIN_IMAGES}
        if own:
            s_refl, s_expts = keep_experiments(sv_refl, sv_expts, own)
            srp = dials_refine_params(self.params, n_blocks=len(s_expts))
            srp.refinement.parameterisation.scan_varying = False
            if blocks_p.tie_cells and len(s_expts) > 1:
                tie_cells(srp, blocks_p.tie_sigma)
            logger.info("Static refinement of a crystal per block (%d of %d blocks), as dials.refine starts",
                        len(s_expts), len(sv_expts))
            s_expts, s_refl = _macrocycle(srp, s_refl, s_expts, "static refinement per block")
            refined = {e.identifier: e for e in s_expts}
            for exp in sv_expts:
                if exp.identifier in refined:
                    exp.crystal = refined[exp.identifier].crystal
            refined_models(sv_expts, s_expts)
            rest = [e.identifier for e in sv_expts if e.identifier not in own]
            sv_refl = join_blocks([s_refl] + ([keep_experiments(sv_refl, sv_expts, set(rest))[0]] if rest else []),
                                  sv_expts)

        rp = dials_refine_params(self.params, n_blocks=len(sv_expts))
        par = rp.refinement.parameterisation
        par.scan_varying = True
        if blocks_p.tie_cells and len(sv_expts) > 1:
            par.crystal.unit_cell.force_static = True
            tie_cells(rp, blocks_p.tie_sigma)
        logger.info(
            "Scan-varying refinement of %d block(s) in one job (%d with a static crystal)",
            len(sv_expts), len(static_only),
        )
        static_ids = [k for k, e in enumerate(sv_expts) if e.identifier in static_only]
        with dials_compat.static_crystals_in_scan_varying_job(static_ids) as applied:
            if not applied:
                logger.warning("This DIALS cannot mix static and scan-varying crystals: all are scan-varying")
            sv_expts, sv_refl, refiner = _macrocycle(rp, sv_refl, sv_expts, "scan-varying refinement",
                                                     with_refiner=True)
        # each block's static cell its own esds (DIALS 3.12 gives it those of
        # an orientation's smoother parameters: 100-200 times too large)
        dials_compat.set_static_cell_covariances(refiner, sv_expts)
        _record_rmsds(sv_refl, sv_expts, record, "rmsd_scan_varying", names)

        # the refined models in place; blocks that shared a beam, detector or
        # goniometer share its refined one.  DIALS trims a block's scan to
        # the images with observations: its crystal's scan points then cover
        # fewer images than the block, and DIALS' predictor would fall back
        # to the static crystal without a word; the trimmed-off images keep
        # the orientation of the nearest refined one.
        refined = {e.identifier: e for e in sv_expts}
        for exp in experiments:
            if exp.identifier in refined:
                done = refined[exp.identifier]
                exp.crystal = done.crystal
                if done.scan.get_image_range() != exp.scan.get_image_range():
                    exp.crystal = crystal_on_images(done.crystal, done.scan.get_image_range(),
                                                    exp.scan.get_image_range(), block_label(exp))
        refined_models(experiments, sv_expts)
        return experiments, join_blocks([sv_refl, reflections], experiments)


def _a_sweep_of_small_blocks(reflections, experiments, rp) -> bool:
    """Whether DIALS' outlier rejection, judging block by block, would flag
    every spot of a sweep: each of its blocks below
    minimum_number_of_reflections (a sparse sweep split by gaps)."""
    outlier = rp.refinement.reflections.outlier
    if outlier.algorithm in ("null", None) or not outlier.separate_experiments:
        return False
    counts = [(reflections["id"] == i).count(True) for i in range(len(experiments))]
    return any(all(counts[i] < outlier.minimum_number_of_reflections for i in group)
               for group in sweep_groups(experiments))


def _judged_by_sweep(reflections, experiments, rp, numbers, unjudged=None):
    """(reflections, refinement parameters) of a static job with several
    sweeps.  Where DIALS' outlier rejection can judge each sweep's spots in
    their own distribution (every sweep with its
    minimum_number_of_reflections), they are judged so here, against the
    current models (continuous.reject_outliers, the continuous model's
    choice for its static jobs), and the job runs on the spots kept without
    rejection of its own.  DIALS, judging block by block, flags every spot
    of a block below its minimum, and a sparse sweep's blocks are (the
    L-cysteine wedges without images 6-7 of sweep 2 and 10 of sweep 4:
    blocks of 9, 13 and 14 spots).  Their sweep then keeps a detector no
    spot holds, while the shared beam moves: sweep 4 was predicted 7.6 px
    off.  Otherwise (reflections, rp), with the rejection `unjudged`
    (e.g. "null") where given.  Judged in one distribution, whole sweeps
    would look like outliers (the one crystal of the joint lattice search
    misses each sweep by a rotation); not judged at all, spots indexed far
    off pull a sparse sweep's orientation to them (phi residuals up to 31
    degrees there: sweep 4 predicted 384 px off).  Used only where a sweep's
    blocks are all below that minimum (_a_sweep_of_small_blocks): elsewhere
    the jobs as they were measured (a sweep of two single images: static
    cell 0.18 % from the complete sweeps', 0.42 % judged by sweep, its spots'
    phi biased by the gaps on both sides)."""
    table = copy.deepcopy(reflections)
    table["sweep"] = _sweep_column(experiments, table["id"])
    everything = flex.bool(len(table), True)
    if not sweeps_judged_apart(table, everything, rp):
        if unjudged is None:
            return reflections, rp
        rp = copy.deepcopy(rp)
        rp.refinement.reflections.outlier.algorithm = unjudged
        return reflections, rp
    reject_outliers(table, everything, experiments, rp, edge=flex.bool(len(table), False))
    kept = everything & ~table.get_flags(table.flags.centroid_outlier)
    return _job_on_kept(reflections, table, kept, rp, numbers, "Outliers judged sweep by sweep")


def _sweep_column(experiments, ids):
    """Each row's sweep (0, 1, ...: its group in sweep_groups) from its block id."""
    sweep_of = {i: g for g, group in enumerate(sweep_groups(experiments)) for i in group}
    return flex.int([sweep_of[i] for i in ids])


def _job_on_kept(reflections, table, kept, rp, numbers, judged):
    """(the rows `kept`, with spots given back to a sweep left too few
    (continuous.spots_given_back), and `rp` without outlier rejection of its
    own): a static job on spots judged here.  `table` has the "sweep" column."""
    minimum = max(1, rp.refinement.parameterisation.auto_reduction.min_nref_per_parameter)
    kept = spots_given_back(table, flex.bool(len(table), True), kept, minimum, numbers)
    logger.info("%s: %d of %d spots left out", judged, kept.count(False), len(kept))
    rp = copy.deepcopy(rp)
    rp.refinement.reflections.outlier.algorithm = "null"
    return reflections.select(kept), rp


def _small_blocks_judged_with_their_sweep(reflections, experiments, rp, numbers):
    """(reflections, refinement parameters) of the second static job with
    several sweeps where some blocks, not all of any sweep, are below DIALS'
    minimum_number_of_reflections for outlier rejection.  DIALS, judging
    block by block, flags every spot of such a block, which then has no
    reference spot for profile fitting and leaves its sweep's orientation to
    the other blocks (the L-cysteine wedges without images 6-7 of sweep 2 by
    the per-block model: block 1-5 of sweep 2, 10 spots, all flagged; 0 of
    its 46 reflections profile fitted, <I/sigma> 5.6).  Here its spots are
    judged in their sweep's distribution (continuous.reject_outliers), the
    other blocks' spots block by block as DIALS would, and the job runs on
    the spots kept without rejection of its own.  Otherwise (reflections,
    rp)."""
    outlier = rp.refinement.reflections.outlier
    if outlier.algorithm in ("null", None) or not outlier.separate_experiments:
        return reflections, rp
    minimum = outlier.minimum_number_of_reflections
    ids = reflections["id"]
    small = [i for i in range(len(experiments)) if (ids == i).count(True) < minimum]
    if not small:
        return reflections, rp
    sweeps = _sweep_column(experiments, ids)
    table = copy.deepcopy(reflections)
    everything = flex.bool(len(table), True)
    no_edge = flex.bool(len(table), False)
    table["sweep"] = sweeps
    if not sweeps_judged_apart(table, everything, rp):
        return reflections, rp
    reject_outliers(table, everything, experiments, rp, edge=no_edge)
    by_sweep = table.get_flags(table.flags.centroid_outlier)
    in_small = flex.bool(len(table), False)
    for i in small:
        in_small |= ids == i
    table["sweep"] = ids  # the groups: each block of its own
    reject_outliers(table, ~in_small, experiments, rp, edge=no_edge)
    by_block = table.get_flags(table.flags.centroid_outlier)
    kept = ~((in_small & by_sweep) | (~in_small & by_block))
    table["sweep"] = sweeps
    return _job_on_kept(reflections, table, kept, rp, numbers,
                        f"Outliers judged block by block, those of {len(small)} block(s) below DIALS' minimum "
                        f"of {minimum} spots with their sweep")


def _fresh_models(experiments):
    """`experiments` with copies of their models, shared as in `experiments`,
    and the same image sets (:func:`_restore_identifiers` matches on them).
    DIALS' indexer refines the beam and detector in place: each search (the
    quick one, then perhaps the full one) starts from the input models, as
    dials.index would."""
    return copy.deepcopy(experiments, {id(e.imageset): e.imageset for e in experiments})


def _restore_identifiers(indexed_experiments, indexed, experiments):
    """Give the indexed experiments the identifiers of their blocks.

    DIALS' indexer makes new experiments with new identifiers; each still
    holds the image set (and image range) of one input block.
    """
    by_imageset = {id(e.imageset): e.identifier for e in experiments}
    # (image ranges repeat between sweeps: with the template)
    by_range = {(e.imageset.get_template(), e.scan.get_image_range()): e.identifier for e in experiments}
    for exp in indexed_experiments:
        exp.identifier = (by_imageset.get(id(exp.imageset))
                          or by_range[exp.imageset.get_template(), exp.scan.get_image_range()])
    set_identifiers(indexed, indexed_experiments)


def _macrocycle(params, reflections, experiments, what: str, with_refiner=False):
    """DIALS' run_macrocycle: (experiments, reflections[, refiner])."""
    t0 = time.perf_counter()
    try:
        refiner, reflections, history = run_macrocycle(params, reflections, experiments)
        logger.info(
            "%s: %d steps in %.1f s", what.capitalize(), history.get_nrows(), time.perf_counter() - t0
        )
    except SystemExit as e:  # DIALS 3.12 exits on configuration/runtime errors
        error = GapfillError(
            f"{what} failed: {' '.join(str(e.code).split())[:200]}: check refinement.* "
            "(or drop the block with gaps.exclude_images)"
        )
        error.dials_message = str(e.code)
        raise error from None
    if with_refiner:
        return refiner.get_experiments(), reflections, refiner
    return refiner.get_experiments(), reflections


def _record_rmsds(reflections, experiments, record, key, names):
    what = "static" if key == "rmsd_static" else "scan-varying"
    for i, exp in enumerate(experiments):
        r = rmsds(reflections, i)
        if r is None:
            continue
        record.block(exp.identifier)[key] = {"x": r[0], "y": r[1], "phi": r[2], "n": r[3]}
        logger.info(
            "%s: RMSD x %.3f px, y %.3f px, phi %.3f images (%d reflections, %s)",
            names[exp.identifier], r[0], r[1], r[2], r[3], what,
        )


def _split_crystals(experiments) -> None:
    """One crystal object per block (a copy of the shared one)."""
    seen = set()
    for exp in experiments:
        if id(exp.crystal) in seen:
            exp.crystal = copy.deepcopy(exp.crystal)
        seen.add(id(exp.crystal))
