"""The continuous crystal model: ONE crystal across the gaps of each sweep.

The blocks of each sweep are joined onto ONE experiment whose scan covers the
sweep's whole image range, gaps included (indexing and refinement need no
pixels: its ImageSequence is made with ``check_format=False`` and is never
read).  DIALS' own indexing (``dials.command_line.index.index``, joint over
the sweeps) and refinement (``dials.command_line.refine.run_macrocycle``:
static with one crystal for all sweeps, then scan-varying with a smoother over
each sweep's whole range: DIALS' checkpoints with quadratic B-spline weights,
``smoother.py``, unless refinement.blocks.continuous_smoother=gaussian) work on
these experiments; the result is sliced back
onto the blocks (``dials.util.slice.slice_crystal``: each block's crystal gets
the n_images + 1 scan points of its own images), so each block keeps its own
image set and scan and the rest of the pipeline (integration per block,
export) runs unchanged.

Several sweeps (different goniometer settings) share the crystal while it is
static: indexing and the static job see one crystal.  DIALS refines a
scan-varying crystal against one scan and goniometer only, so for the
scan-varying jobs each sweep gets its own copy (its own orientation through
its own rotation), the cells static and one (DIALS' equal-shift constraints,
``base.one_cell``; refinement.blocks.continuous_sweep_cells=tied restrains a
cell per sweep to their mean instead, ``unit_cell.restraints.tie_to_group``
with sigmas refinement.blocks.tie_sigma).  A sweep whose reflections DIALS finds too few for a scan-varying
orientation (it refuses to parameterise it) keeps a static one in that job.

Gap-edge spots
--------------
A spot whose shoebox touches a block's first frame with another block of its
sweep before it, or its last frame with one after it (missing images between
them, or a folder boundary), was recorded only in part: its z centroid is
pulled into the block.  Such spots (:func:`gap_edge_spots`;
a sweep's own first and last image are not gaps) are

- left out of the lattice search;
- indexed against the predictions of the indexed model (:func:`index_gap_edges`:
  nearest prediction in x, y whose predicted z lies within the spot's frames
  widened by ``z_window`` frames into the gap);
- in refinement, with the default ``gap_edge="xy"``, used for x and y only:
  their phi observation is replaced by the model's prediction and its variance
  inflated by ``PHI_VARIANCE_INFLATION`` so phi carries no weight and outlier
  rejection (which looks at unweighted residuals) does not reject them for a
  z they never had; ``"exclude"`` leaves them out of refinement, ``"full"``
  uses them like any spot (biased z);
- with refinement.blocks.continuous_gap_edges=modelled (and ``gap_edge="xy"``),
  their phi is used in the scan-varying jobs against what it is: the
  centroid of the frames that recorded a Gaussian rocking curve cut by the
  gap (:func:`cut_rocking_curve_phi`; sigma_m from the uncut spots,
  :func:`rocking_curve_sigma_m`).

Entry points: :class:`ContinuousModel` (``index``, ``refine``),
:func:`gap_edge_spots`, :func:`join_blocks`, :func:`slice_onto_blocks`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from typing import Any

import libtbx
import numpy as np
from dials.algorithms.refinement.outlier_detection.outlier_base import (
    CentroidOutlierFactory,
)
from dials.algorithms.refinement.prediction.managed_predictors import (
    ExperimentsPredictorFactory,
)
from dials.algorithms.refinement.refinement_helpers import set_obs_s1
from dials.algorithms.indexing import DialsIndexError
from dials.algorithms.profile_model.gaussian_rs.calculator import ComputeEsdReflectingRange
from dials.array_family import flex
from dials.command_line.index import index as dials_index
from dials.command_line.refine import run_macrocycle
from dials.util.slice import slice_crystal
from dxtbx.imageset import ImageSetFactory
from dxtbx.model import Experiment, Scan
from dxtbx.model.experiment_list import ExperimentList
from scipy.spatial import cKDTree
from scipy.special import ndtr
from scitbx.array_family import flex as sflex

from dials_gapfill import dials_compat
from dials_gapfill.crystal_model.base import (
    CrystalModel,
    crystal_per_sweep,
    fewer_reflections_per_parameter,
    fixing_sparse_sweeps,
    one_cell,
    tie_cells,
    sweep_groups,
    say_too_few_spots,
    sweep_number,
)
from dials_gapfill.crystal_model.lattice import SEARCH_ERRORS, staged_search
from dials_gapfill.crystal_model.smoother import BSplineSmoother
from dials_gapfill.errors import GapfillError, indexing_failure, search_failure
from dials_gapfill.model.state import Record
from dials_gapfill.model.tables import set_identifiers
from dials_gapfill.phil import dials_index_params, dials_refine_params, resolve_nproc
from dials_gapfill.util import range_text

logger = logging.getLogger("dials.process_gapped.continuous")

# z variance of gap-edge spots in refinement, times their own (phi gets ~no weight)
PHI_VARIANCE_INFLATION = 1.0e6
GAP_EDGE_TREATMENTS = ("xy", "exclude", "full")

# Smoother checkpoint spacing (degrees) of the continuous crystal, used when
# refinement.parameterisation.crystal.*.smoother is left at DIALS' default
# (36 deg, no absolute_num_intervals).  One smoother over the whole rotation
# with DIALS' 36 deg is stiffer than the per-block model's one smoother per
# block; 12 deg (benchmarks/continuous.py): every-10th sweep median/worst
# 0.051/0.410 deg against 0.108/0.370 at 36 deg (gapless DIALS default
# 0.090/0.411), 3-block sweep 0.003/0.012 against 0.016/0.043 (per-block
# 0.003/0.018), one 30 deg gap 0.009/0.032 against 0.016/0.049 (per-block
# 0.009/0.033).
CONTINUOUS_INTERVAL_WIDTH = 12.0
DIALS_INTERVAL_WIDTH = 36.0

# The refinement jobs of the continuous model use DIALS' random sample of
# this many reflections per degree (refinement.reflections.
# reflections_per_degree, where left Auto: all).  Measured with
# benchmarks/chain_truth.py's sweeps, orientation error against the truth
# median/worst and time of the refinement, all reflections -> 200 per degree:
# every 10th image missing 0.0082/0.0288 deg, 89 s -> 0.0080/0.0275 deg, 28 s;
# 3 blocks 0.0040/0.0117 deg, 26 s -> 0.0040/0.0128 deg, 16 s (100 per degree:
# 0.0098/0.0353 deg on the first).
REFLECTIONS_PER_DEGREE = 200

# The lattice search runs on the spots not cut by a gap when there are at
# least this many (DIALS' indexer needs a few dozen to find a lattice); else,
# or when it fails, on all spots.
MIN_SEARCH_SPOTS = 20

# refinement.blocks.continuous_scan_ends=xy leaves a sweep's scan-end spots
# their phi where they are at least this fraction of its spots
SCAN_END_MAX_FRACTION = 0.5

# frames predicted beyond each end of a sweep when spots are indexed against
# predictions
PREDICTION_PADDING = 1.0

# continuous_gap_edges=modelled: a gap-edge spot's phi gets weight where its
# expected centroid moves with the predicted one by at least this much
# (d centroid / d prediction; beyond the cut it does not move at all)
CUT_CURVE_MIN_SLOPE = 0.05
# sigma_m estimated on at most this many uncut spots of each sweep, at least
# this many
SIGMA_M_MAX_SPOTS = 600
SIGMA_M_MIN_SPOTS = 50


# --------------------------------------------------------------------------
# Blocks <-> one continuous experiment per sweep
# --------------------------------------------------------------------------


def check_blocks(experiments) -> None:
    """The blocks of each sweep must be in image order, not overlap, share
    the beam, their sweep's detector and goniometer, and lie on one rotation
    (same width, start angles consistent)."""
    if len(experiments) == 0:
        raise GapfillError("no blocks to join")
    for group in sweep_groups(experiments):
        first = experiments[group[0]]
        phi0, width = first.scan.get_oscillation()
        f0 = first.scan.get_image_range()[0]
        previous_last = None
        for i in group:
            exp = experiments[i]
            f, l = exp.scan.get_image_range()
            if previous_last is not None and f <= previous_last:
                raise GapfillError(f"block {i + 1} (images {f}-{l}) is not after the block before it")
            previous_last = l
            start, w = exp.scan.get_oscillation()
            if abs(w - width) > 1e-6 * max(1.0, abs(width)):
                raise GapfillError(f"block {i + 1}: oscillation width {w} differs from {width}")
            expected = phi0 + (f - f0) * width
            if abs(start - expected) > 1e-3 * abs(width):
                raise GapfillError(
                    f"block {i + 1} (images {f}-{l}) starts at {start:.4f} deg, not on the rotation of "
                    f"the first block of its sweep ({expected:.4f} deg): one continuous model needs one rotation"
                )
            for name, reference in (("beam", experiments[0]), ("detector", first)):
                if getattr(exp, name) is not getattr(reference, name):
                    raise GapfillError(f"block {i + 1} does not share the {name} of the first block")


def join_blocks(experiments, identifier="continuous"):
    """ONE experiment whose scan covers images first..last of the blocks of
    one sweep (gaps included), with the blocks' beam, detector, goniometer
    and crystal.

    Its ImageSequence is made with ``check_format=False`` from the first
    block's template: indexing and refinement never read it.
    """
    check_blocks(experiments)
    first_exp = experiments[0]
    f0 = first_exp.scan.get_image_range()[0]
    l1 = experiments[-1].scan.get_image_range()[1]
    phi0, width = first_exp.scan.get_oscillation()
    n = l1 - f0 + 1
    exposure = first_exp.scan.get_exposure_times()[0] if len(first_exp.scan.get_exposure_times()) else 0.0
    epochs0 = first_exp.scan.get_epochs()
    e0 = epochs0[0] if len(epochs0) else 0.0
    dt = (epochs0[1] - epochs0[0]) if len(epochs0) > 1 else exposure
    scan = Scan(
        (f0, l1),
        (phi0, width),
        sflex.double(n, exposure),
        sflex.double([e0 + k * dt for k in range(n)]),
        f0 - 1,
        True,
    )
    imageset = first_exp.imageset
    template = imageset.get_template() if hasattr(imageset, "get_template") else None
    sequence = None
    if template:
        try:
            sequence = ImageSetFactory.make_sequence(
                template,
                list(range(f0, l1 + 1)),
                format_class=imageset.get_format_class(),
                beam=first_exp.beam,
                detector=first_exp.detector,
                goniometer=first_exp.goniometer,
                scan=scan,
                check_format=False,
            )
        except Exception as e:  # an unusual format: fall back to the first block's sequence
            logger.debug("make_sequence failed (%s): using the first block's image set", e)
    if sequence is None:
        sequence = copy.deepcopy(imageset)
        sequence.set_scan(scan)
    return Experiment(
        imageset=sequence,
        beam=first_exp.beam,
        detector=first_exp.detector,
        goniometer=first_exp.goniometer,
        scan=scan,
        crystal=first_exp.crystal,
        identifier=identifier,
    )


def static_orientation_at_centre(crystal) -> None:
    """Set the static U of a scan-varying `crystal` (a copy owned by the
    caller) to its U at the middle scan point, the scan points kept (of
    an odd number of images, the scan point half an image past the middle:
    a scan point is an image boundary).

    DIALS reads the static A where it needs one crystal for a whole block,
    e.g. ``mask_neighbouring`` of dials.integrate's reference spots (each
    pixel's Miller index).  Left at the static job's value it goes stale when
    the scan-varying jobs move the beam: on two 1.5 deg L-cysteine wedges the
    beam turned 6.8 deg in the spindle plane, the static U was left 14 deg
    from the scan points and indexed 0 of 36 spots, every reference pixel was
    masked as a neighbour's and no profile model could be made
    (benchmarks/results/2026-12-05-static-crystal.md)."""
    n = crystal.num_scan_points
    if n == 0:
        return
    A = [crystal.get_A_at_scan_point(i) for i in range(n)]
    cov = crystal.get_B_covariance_at_scan_points()
    crystal.set_U(crystal.get_U_at_scan_point(n // 2))  # clears the scan points
    crystal.set_A_at_scan_points(A)
    if len(cov) > 0:
        crystal.set_B_covariance_at_scan_points(cov)


def block_label(experiment) -> str:
    """' (x_#####.cbf)': the template of a block's images, which tells apart
    blocks of different sweeps with the same image numbers, for the log."""
    try:
        return f" ({os.path.basename(experiment.imageset.get_template())})"
    except (AttributeError, RuntimeError):
        return ""


def crystal_on_images(crystal, refined_range, images, label=""):
    """The scan-varying `crystal`, refined over the images `refined_range`
    (first, last), on the images `images` (first, last): scan points of
    those images (n_images + 1), as ``dials.util.slice``, and the static U of
    their middle (:func:`static_orientation_at_centre`).  DIALS' refiner
    trims a scan to the images with observations
    (``trim_scan_to_observations``): images beyond the refined ones keep the
    orientation of its nearest end.  A static crystal is returned as it is.
    `label`: after the block's images in the log (block_label)."""
    if crystal.num_scan_points == 0:
        return crystal
    (f0, l0), (f, l) = refined_range, images
    if f < f0 or l > l0:
        before, after = range(f, min(l, f0 - 1) + 1), range(max(f, l0 + 1), l + 1)
        for shown, end in ((before, f0), (after, l0)):
            if len(shown):
                logger.info(
                    "Block of images %d-%d%s: image(s) %s had no spot in the scan-varying refinement "
                    "(its scan: images %d-%d) and keep the orientation at the scan's nearest end "
                    "(image %d)", f, l, label, range_text(shown), f0, l0, end)
        n = crystal.num_scan_points
        A = [crystal.get_A_at_scan_point(min(max(k - f0, 0), n - 1)) for k in range(f, l + 2)]
        crystal = copy.deepcopy(crystal)
        crystal.reset_scan_points()
        crystal.set_A_at_scan_points(A)
    else:
        crystal = slice_crystal(crystal, (f - f0, l - f0 + 1))
    static_orientation_at_centre(crystal)
    return crystal


def slice_onto_blocks(continuous, experiments):
    """Block experiments (copies of `experiments`, same identifiers, image sets
    and scans) with the refined beam, detector and goniometer of `continuous`
    (shared) and each its slice of the continuous crystal: scan points of its
    own images (n_images + 1), as ``dials.util.slice``, and the static U of
    its middle (:func:`static_orientation_at_centre`); a static crystal is
    shared as it is."""

    out = ExperimentList()
    for exp in experiments:
        crystal = crystal_on_images(continuous.crystal, continuous.scan.get_image_range(),
                                    exp.scan.get_image_range(), block_label(exp))
        out.append(
            Experiment(
                imageset=exp.imageset,
                beam=continuous.beam,
                detector=continuous.detector,
                goniometer=continuous.goniometer,
                scan=exp.scan,
                crystal=crystal,
                profile=exp.profile,
                scaling_model=exp.scaling_model,
                identifier=exp.identifier,
            )
        )
    return out


class Joined:
    """The blocks of each sweep joined: one continuous experiment per sweep,
    and the maps of reflection tables between blocks and sweeps."""

    def __init__(self, experiments):
        check_blocks(experiments)
        self.blocks = experiments
        self.groups = sweep_groups(experiments)
        self.group_of_block = {i: g for g, group in enumerate(self.groups) for i in group}
        one = len(self.groups) == 1
        self.experiments = ExperimentList([
            join_blocks(ExperimentList([experiments[i] for i in group]),
                        "continuous" if one else f"continuous-{g + 1}")
            for g, group in enumerate(self.groups)
        ])

    def block_experiments(self, g):
        return ExperimentList([self.blocks[i] for i in self.groups[g]])

    def to_continuous(self, reflections):
        """A copy of `reflections` on the continuous experiments: ``id`` the
        sweep (-1 unindexed), column ``block`` each row's block (its image
        set) and ``sweep`` its sweep."""
        table = copy.deepcopy(reflections)
        keep = table["id"] >= 0
        origin = table["imageset_id"] if "imageset_id" in table else table["id"]
        table["block"] = origin  # remember the block (each block has its own image set)
        sweep = flex.int(len(table), 0)
        if len(self.groups) > 1:
            for i, g in self.group_of_block.items():
                sweep.set_selected(origin == i, g)
        ids = sweep.deep_copy()  # flex.int(sweep) would be the same array
        ids.set_selected(~keep, -1)
        table["id"] = ids
        table["imageset_id"] = sweep.deep_copy()
        table["sweep"] = sweep
        set_identifiers(table, self.experiments)
        return table

    def to_blocks(self, table, blocks):
        """Ids of a continuous table mapped back to `blocks` (the blocks of
        every sweep, in order): each row to the block of its sweep holding
        the image of its z."""
        block = self.block_of_rows(table, blocks)
        ids = table["id"]
        new = flex.int(len(table), -1)
        new.set_selected(ids >= 0, block.select(ids >= 0))
        table["id"] = new
        table["imageset_id"] = block  # each block has its own image set
        for column in ("block", "sweep"):
            if column in table:
                del table[column]
        set_identifiers(table, blocks)
        return table

    def block_of_rows(self, table, blocks=None):
        """flex.int: the block (of `blocks`, default the joined blocks) of
        each row of a continuous table, from its sweep and the image of its
        observed z; -1 for none."""
        blocks = self.blocks if blocks is None else blocks
        z = table["xyzobs.px.value"].parts()[2]
        image = flex.floor(z).iround() + 1
        sweep = table["sweep"] if "sweep" in table else flex.int(len(table), 0)
        block = flex.int(len(table), -1)
        for g, group in enumerate(self.groups):
            mine = sweep == g
            for i in group:
                f, l = blocks[i].scan.get_image_range()
                block.set_selected(mine & (image >= f) & (image <= l), i)
        return block

    def slice(self, models):
        """The blocks with their slices of each sweep's model."""
        out = ExperimentList()
        for g, model in enumerate(models):
            out.extend(slice_onto_blocks(model, self.block_experiments(g)))
        return out


# --------------------------------------------------------------------------
# Gap edges
# --------------------------------------------------------------------------


def gap_edge_spots(experiments, reflections):
    """flex.bool: spots whose shoebox (bbox) touches a block's first frame
    with another block of the same sweep before it, or its last frame with
    one after it: missing images between them, or none (a sweep split over
    two folders, each read as its own sequence: the spots are found block by
    block, so one recorded across the boundary is cut there as at a gap,
    as integration takes it, model.sweep.Sweeps.gap_before).  A sweep's
    own first and last image are not gaps."""

    z0 = reflections["bbox"].parts()[4]
    z1 = reflections["bbox"].parts()[5]
    if "block" in reflections:
        blocks = reflections["block"]
    else:
        blocks = reflections["id"]
    edge = flex.bool(len(reflections), False)
    for group in sweep_groups(experiments):
        ranges = [experiments[i].scan.get_image_range() for i in group]
        for k, (i, (f, l)) in enumerate(zip(group, ranges)):
            here = blocks == i
            if k > 0:
                edge |= here & (z0 <= f - 1)
            if k + 1 < len(ranges):
                edge |= here & (z1 >= l)
    return edge


def scan_end_spots(experiments, reflections):
    """flex.bool: spots whose shoebox (bbox) touches a sweep's own first or
    last image, whose rocking curve the scan's end cuts."""

    z0 = reflections["bbox"].parts()[4]
    z1 = reflections["bbox"].parts()[5]
    blocks = reflections["block"] if "block" in reflections else reflections["id"]
    end = flex.bool(len(reflections), False)
    for group in sweep_groups(experiments):
        first, last = group[0], group[-1]
        f = experiments[first].scan.get_image_range()[0]
        l = experiments[last].scan.get_image_range()[1]
        end |= (blocks == first) & (z0 <= f - 1)
        end |= (blocks == last) & (z1 >= l)
    return end


def _predict(experiment, padding_frames=PREDICTION_PADDING):
    """DIALS' predictions over the whole continuous scan (static or
    scan-varying), and `padding_frames` beyond each of its ends: a spot at a
    sweep's first or last image has its centroid there when its reflection
    is at the sweep's edge (on a 15-image sweep without it, 29 of 129
    indexed spots of the four L-cysteine sweeps had no prediction)."""
    padding = padding_frames * abs(experiment.scan.get_oscillation()[1])
    return flex.reflection_table.from_predictions(experiment, padding=padding)


def index_against_predictions(continuous, table, selection, z_window=2.0, xy_tolerance=3.0, exp_id=0):
    """Index the spots `selection` of `table` (on `continuous`, id `exp_id`)
    against DIALS' predictions of its crystal (static or scan-varying): the
    nearest prediction in x, y within `xy_tolerance` px whose predicted z lies
    within the spot's frames, widened into the gap by `z_window` frames for
    gap-edge spots (column ``gap_edge``) and by half a frame for the others
    (at least 1 frame either side of the observed z).  Sets miller_index, id and the indexed flag of the
    matched spots, clears them for the others; returns the number matched."""

    isel = selection.iselection()
    if len(isel) == 0:
        return 0
    pred = _predict(continuous)
    px, py, pz = (np.array(c) for c in pred["xyzcal.px"].parts())
    if len(px) == 0:
        return 0
    tree = cKDTree(np.column_stack([px, py]))
    obs = table.select(isel)
    ox, oy, oz = (np.array(c) for c in obs["xyzobs.px.value"].parts())
    edge = np.array(obs["gap_edge"]) if "gap_edge" in obs else np.zeros(len(obs), dtype=bool)
    z0 = np.array(obs["bbox"].parts()[4], dtype=float)
    z1 = np.array(obs["bbox"].parts()[5], dtype=float)
    # a spot's reflection has its centroid on the spot's own frames (a fine-
    # sliced rocking curve spans several: 1-1.5 frames between observed and
    # predicted centroid on 0.1-degree L-cysteine images)
    lo = np.where(edge, z0 - z_window, np.minimum(oz - 1.0, z0 - 0.5))
    hi = np.where(edge, z1 + z_window, np.maximum(oz + 1.0, z1 + 0.5))
    hkl_pred = pred["miller_index"]
    miller = table["miller_index"] if "miller_index" in table else flex.miller_index(len(table))
    ids = table["id"]
    found = flex.bool(len(table), False)
    matched = 0
    for k, hits in enumerate(tree.query_ball_point(np.column_stack([ox, oy]), xy_tolerance)):
        best, best_d = None, None
        for j in hits:
            if not (lo[k] <= pz[j] <= hi[k]):
                continue
            d = (px[j] - ox[k]) ** 2 + (py[j] - oy[k]) ** 2 + (0.0 if edge[k] else (pz[j] - oz[k]) ** 2)
            if best is None or d < best_d:
                best, best_d = j, d
        row = int(isel[k])
        if best is None:
            ids[row] = -1
            miller[row] = (0, 0, 0)
            continue
        miller[row] = hkl_pred[best]
        ids[row] = exp_id
        found[row] = True
        matched += 1
    table["miller_index"] = miller
    table["id"] = ids
    table.unset_flags(selection, table.flags.indexed)
    table.set_flags(found, table.flags.indexed)
    return matched


def index_gap_edges(continuous, table, selection, z_window=2.0, xy_tolerance=3.0, exp_id=0):
    """:func:`index_against_predictions` for the gap-edge spots `selection`."""
    return index_against_predictions(continuous, table, selection, z_window, xy_tolerance, exp_id)


def _index_each_sweep(models, table, selection, z_window):
    """:func:`index_against_predictions` of each sweep's rows of `selection`
    against its model; the number matched."""
    if len(models) == 1:
        return index_against_predictions(models[0], table, selection, z_window=z_window)
    return sum(
        index_against_predictions(model, table, selection & (table["sweep"] == g), z_window=z_window, exp_id=g)
        for g, model in enumerate(models)
    )


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------

# refinement.blocks.continuous_reindex_cycles=None (auto): index all spots
# against the scan-varying model and refine again while that adds at least
# this fraction of all spots, or of one block's spots and at least
# AUTO_REINDEX_BLOCK_MIN of them, at most AUTO_REINDEX_MAX times; and once
# more after the first cycle that adds less: the job before it had its spots
# and outliers chosen against a model that indexing then changed (on the
# every-10th sweep of benchmarks/chain_truth.py, with the B-spline smoother,
# orientation error 0.0040 / 0.0158 deg without that job, 0.0016 / 0.0093
# with it: benchmarks/results/2026-12-04-bspline-smoother.md).  On 90 x 0.5
# deg, every 10th image missing, a crystal whose drift accelerates to 0.1
# deg/deg, the lattice search indexes 56 % of the last block and the model
# refined from that predicts the end of the sweep badly (docs/crystal-model.md:
# the numbers, benchmarks/continuous.py --intensities).  With every 6th image
# missing each cycle reaches further into the end of the sweep: the fourth
# still indexed 8.7 % more of one block, the fifth nothing (worst orientation
# error 0.056 deg after three cycles, 0.015 deg after four; whole runs,
# benchmarks/results/2026-12-03-smoother-spacing.md).
AUTO_REINDEX_GAIN = 0.01
AUTO_REINDEX_MAX = 6
AUTO_REINDEX_BLOCK_MIN = 10

# The smoother's checkpoint spacing is chosen from the data: the last
# scan-varying job is repeated with checkpoints FINER_SPACING times as far
# apart, on the same reflections and the same random sample (SAMPLE_SEED),
# and the finer model kept where it predicts the left-out reflections better
# (paired_z).  Only at the end: started at 9 deg, the end of a drifting sweep
# with every 6th image missing runs away (worst 0.176 deg against 0.018 at
# 12 deg, benchmarks/refine_variants.py) before its spots are indexed against
# a scan-varying model.  Whole runs against the truth:
# benchmarks/results/2026-12-03-smoother-spacing.md.
FINER_SPACING = 0.75
# ... and kept only where its mean squared residual is lower by more than
# FINER_Z standard errors of the paired differences (a tie keeps the coarser)
FINER_Z = 2.0
# With choose_spacing="auto" (the default) the finer job runs only where the
# data showed a crystal moving faster than the static model followed: a
# re-index cycle ran (the scan-varying model indexed AUTO_REINDEX_GAIN more).
# On the four sweeps of benchmarks/results/2026-12-03-smoother-spacing.md and
# SNase the finer spacing was kept on exactly the two where a cycle ran
# (paired z -3.0 and -3.8) and not on the three without (-1.6, +6.4, -0.3),
# where the extra job was a third of the refinement's time for nothing.
SAMPLE_SEED = 42


SMOOTHER_NAMES = {"gaussian": "DIALS' Gaussian", "bspline": "quadratic B-spline"}


@dataclasses.dataclass
class _Job:
    """One refinement of the continuous model: the joined experiments, their
    table and what stays fixed between the jobs."""

    joined: Joined
    table: Any  # all indexed spots on the continuous experiments (columns "block", "sweep")
    edge: Any  # flex.bool: spots cut by a gap
    xy_edge: Any  # the gap-edge spots whose phi gets no weight
    original_mm: tuple  # observed mm centroids and variances, to restore after a job
    record: Record
    chi2: dict
    static_esd: Any = None  # the static job's cell esds
    indexed_against: Any = None  # the models every spot was last indexed against
    out_of_sample: list = dataclasses.field(default_factory=list)  # each scan-varying job's
    spacing_choice: Any = None  # the checkpoint spacings compared and the one kept
    cycles: list = dataclasses.field(default_factory=list)  # each re-index cycle: spots gained, refined again
    smoother: str = "gaussian"  # the scan-varying jobs' smoother (SMOOTHER_NAMES)
    numbers: Any = None  # the run's number of each sweep (CrystalModel.sweep_numbers), for log lines
    static_for_a_gap: set = dataclasses.field(default_factory=set)  # sweeps warned of (_static_for_a_long_gap)
    scan_end: Any = None  # flex.bool: spots cut by their sweep's own first or last image (scan_end_spots)
    # the scan-end spots of sweeps mostly cut by their ends: their observed
    # phi in the static jobs, against the cut rocking curve in the
    # scan-varying ones (continuous_gap_edges=modelled)
    modelled_end: Any = None


class ContinuousModel(CrystalModel):
    """ONE crystal over each sweep's whole rotation: indexed and refined on
    one scan per sweep over all its images (gaps included), orientation
    scan-varying, cell static (one cell for all sweeps); each block takes its
    slice of it.

    Options (keywords; the parameters give the others): gap_edge ("xy",
    "exclude", "full": see the module doc), reindex_gap_edges (index the
    gap-edge spots again against the statically refined model before the
    scan-varying job), final_reindex (all spots indexed against the final
    model at the end, no further refinement), z_window (frames into a gap a
    gap-edge spot's prediction may lie), interval_width_degrees (smoother
    checkpoint spacing where the parameters leave DIALS' default; None keeps
    DIALS'), choose_spacing (then try FINER_SPACING times that spacing at the
    end and keep it where left-out reflections say so; "auto": only after a
    re-index cycle); from refinement.blocks: scan_varying, scan_varying_cell
    (continuous_scan_varying_cell) and reindex_cycles
    (continuous_reindex_cycles: after the scan-varying job, all spots indexed
    again against it and the job repeated, that many times; None: while that
    indexes at least AUTO_REINDEX_GAIN of the spots more, at most
    AUTO_REINDEX_MAX times).
    """

    name = "continuous"
    profile_model = "all_blocks"

    def __init__(self, params, sweeps=None, gap_edge="xy", reindex_gap_edges=True, final_reindex=True, z_window=2.0,
                 interval_width_degrees=CONTINUOUS_INTERVAL_WIDTH, choose_spacing="auto", **overrides):
        super().__init__(params, sweeps)
        if gap_edge not in GAP_EDGE_TREATMENTS:
            raise ValueError(f"gap_edge must be one of {GAP_EDGE_TREATMENTS}")
        blocks = params.refinement.blocks
        self.gap_edge = gap_edge
        self.reindex_gap_edges = reindex_gap_edges
        self.final_reindex = final_reindex
        self.z_window = z_window
        self.interval_width_degrees = interval_width_degrees
        if choose_spacing not in (True, False, "auto"):
            raise ValueError("choose_spacing must be True, False or 'auto'")
        self.choose_spacing = choose_spacing
        self.nproc = resolve_nproc(params.mp.nproc)
        self.scan_varying = overrides.pop("scan_varying", blocks.scan_varying)
        self.scan_varying_cell = overrides.pop("scan_varying_cell", blocks.continuous_scan_varying_cell)
        self.smoother = overrides.pop("smoother", blocks.continuous_smoother)
        self.scan_ends = overrides.pop("scan_ends", blocks.continuous_scan_ends)
        self.gap_edges = overrides.pop("gap_edges", blocks.continuous_gap_edges)
        self.reindex_cycles = overrides.pop("reindex_cycles", blocks.continuous_reindex_cycles)
        self.second_job = overrides.pop("second_job", blocks.continuous_second_job)
        self.sweep_cells = overrides.pop("sweep_cells", blocks.continuous_sweep_cells)
        self.tie_sigma = blocks.tie_sigma
        if overrides:
            raise TypeError(f"unknown options: {', '.join(overrides)}")
        self.last = {}
        self.warnings = []

    def _one_cell(self, rp, crystal):
        """The sweeps' cells in a job with several: one (shared), or each its
        own restrained to their mean (tied)."""
        if self.sweep_cells == "tied":
            tie_cells(rp, self.tie_sigma)
        else:
            one_cell(rp, crystal)

    # ---- indexing ----------------------------------------------------------

    def index(self, experiments, reflections):
        """Index all blocks with ONE crystal found on the joined scans.

        DIALS' indexing (``dials.command_line.index.index``, parameters
        ``dials_index_params(params)``, joint over the sweeps) runs on one
        experiment per sweep covering its whole image range with the spots not
        cut by a gap; gap-edge spots are then indexed against the indexed
        model's predictions (:func:`index_gap_edges`).  Returns (block
        experiments sharing the one crystal and the indexed beam, detectors
        and goniometers; all spots with ``miller_index``, ``flags`` (indexed),
        ``id`` = block or -1 if unindexed, bool column ``gap_edge``; record).
        """
        joined = Joined(experiments)
        table = joined.to_continuous(reflections)
        for column in ("miller_index", "xyzcal.px", "xyzcal.mm", "s1", "entering", "rlp"):
            if column in table:
                del table[column]
        table.unset_flags(flex.bool(len(table), True), table.flags.indexed)
        edge = gap_edge_spots(experiments, table)
        table["gap_edge"] = edge
        searched = ~edge | _edge_spots_searched(table, edge, self._min_spots_per_parameter(),
                                                self.sweep_numbers(experiments))
        search = table.select(searched & (table["id"] >= 0))
        if "shoebox" in search:
            del search["shoebox"]
        if len(joined.groups) == 1:
            logger.info(
                "Continuous model: lattice search on one scan of images %d-%d (%d blocks), %d spots "
                "(%d cut by a gap left out)",
                *joined.experiments[0].scan.get_image_range(), len(experiments), len(search), edge.count(True),
            )
        else:
            logger.info(
                "Continuous model: lattice search on %d sweeps, one scan each (%d blocks), %d spots "
                "(%d cut by a gap left out)", len(joined.groups), len(experiments), len(search), edge.count(True),
            )
        ip = dials_index_params(self.params)
        ip.indexing.joint_indexing = True  # one crystal for all sweeps (DIALS >= 3.27 asks to be told)

        def fresh(experiments):
            # DIALS' indexer refines the beam and detector in place: each search
            # (the quick one, then perhaps the full one) starts from the input models
            return copy.deepcopy(experiments)

        try:
            if len(search) < MIN_SEARCH_SPOTS:
                raise DialsIndexError(f"only {len(search)} spots not cut by a gap")
            found, indexed = staged_search(
                lambda p: dials_index(fresh(joined.experiments), [search], p), ip, len(search), self.params,
                len(joined.experiments),
            )
        except SEARCH_ERRORS as e:
            if not edge.count(True):
                raise _search_failed(e, self.params) from None
            # every block short (one image every other, two images apart):
            # nearly every spot is cut by a gap; their x, y are whole and
            # their z a little off, which the lattice search tolerates.  Also
            # where a sparse sweep has too few spots for its own detector:
            # fixing it in the search instead (auto_reduction.action=fix, as
            # xia2 indexes several sweeps) gave L-cysteine worse cells and
            # dropped a good block (benchmarks/results/2026-12-06-index-auto-reduction-fix.md)
            searched = table["id"] >= 0
            search = table.select(searched)
            if "shoebox" in search:
                del search["shoebox"]
            message = (
                f"lattice search without the spots cut by a gap failed ({search_failure(e, 120)}): "
                f"searched again with all {len(search)} spots"
            )
            logger.warning("Warning: %s", message)
            self.warnings.append(message)
            try:
                found, indexed = staged_search(
                    lambda p: dials_index(fresh(joined.experiments), [search], p), ip, len(search), self.params,
                    len(joined.experiments),
                )
            except SEARCH_ERRORS as e2:
                raise _search_failed(e2, self.params) from None
        searched = searched & (table["id"] >= 0)
        for exp, continuous in zip(found, joined.experiments):
            exp.identifier = continuous.identifier
            exp.imageset = continuous.imageset
        # the search table's rows come back reordered: put its results onto all spots
        out = _merge_search(table, search, indexed)
        # every spot (edge spots included) in mm, then the edge spots not
        # searched indexed
        out.centroid_px_to_mm(found)
        edge = out["gap_edge"] & ~searched
        n_edge = _index_each_sweep(found, out, edge, self.z_window)
        logger.info("Gap-edge spots indexed against predictions: %d of %d", n_edge, edge.count(True))
        judged = (searched & ~out["gap_edge"]) | out.get_flags(out.flags.indexed)
        blocks = joined.slice(found)
        out = joined.to_blocks(out, blocks)
        return blocks, out, self._judged_record(blocks, out, judged)

    def _judged_record(self, blocks, table, judged):
        """The index record: each block's spots judged by the lattice search
        (``spots_judged``: those not cut by a gap that it searched, and the
        spots cut by a gap that it or the crystal's predictions indexed).
        A gap-edge spot that did not index is not evidence against its
        block: its phi is off by a fraction of an image, against an
        unrefined crystal (a block of two images between gaps, L-cysteine:
        2 of its 14 spots matched, all 14 cut; a single image between gaps
        in the search with all spots: 2 of 11; after refinement they
        index)."""
        record = Record(warnings=list(self.warnings))
        block = np.asarray(table["imageset_id"])
        counts = np.bincount(block[np.asarray(judged) & (block >= 0)], minlength=len(blocks))
        for i, b in enumerate(blocks):
            record.block(b.identifier)["spots_judged"] = int(counts[i])
        return record

    # ---- refinement --------------------------------------------------------

    def refine(self, experiments, reflections):
        """Static, then scan-varying refinement of ONE crystal over each
        sweep's whole range (static only without scan_varying), on the joined
        scans with DIALS' ``run_macrocycle`` and ``dials_refine_params(params)``:
        orientation scan-varying (smoother intervals from the sweep's whole
        range, as DIALS sets them), cell static unless scan_varying_cell; beam
        and detectors shared, parameterised as DIALS' defaults.

        `experiments`, `reflections`: as returned by :meth:`index`.  Returns
        (block experiments, each with its slice of its sweep's refined crystal
        and the shared refined beam, detector and goniometer; the indexed
        reflections, ``id`` = ``imageset_id`` = block, predictions for those
        used in refinement, ``gap_edge``; record).  The cell's esds (crystal
        ``cell_esd``): with one sweep from the covariance of the last job
        (with a static cell, the block of the cell's own parameters:
        dials_compat.set_static_cell_covariance); with several, from the
        static job where the sweeps share one crystal.  RMSDs x, y in px, phi
        in images, over spots used in refinement and not cut by a gap
        (gap-edge spots: edge_x, edge_y, edge_n; a block whose spots are all
        cut by a gap reports x, y, phi of those, with phi_biased=True; None
        for a block without refined spots).
        """
        sflex.set_random_seed(SAMPLE_SEED)  # DIALS' outlier rejection (MCD) draws random subsets
        job = self._start(experiments, reflections)
        static = self._static_job(job, experiments)
        if self.reindex_gap_edges and job.edge.count(True):
            n = _index_each_sweep(static, job.table, job.edge, self.z_window)
            logger.info("Gap-edge spots indexed against the refined model: %d of %d", n, job.edge.count(True))
        final, widths = self._scan_varying_jobs(job, static)
        if self.final_reindex:
            self._final_reindex(job, final)
        return self._finish(job, final, widths)

    def _start(self, experiments, reflections) -> _Job:
        joined = Joined(experiments)
        numbers = self.sweep_numbers(experiments)
        table = joined.to_continuous(reflections)
        if "gap_edge" not in table:
            table["gap_edge"] = gap_edge_spots(experiments, table)
        edge = table["gap_edge"]
        # "xy": phi of gap-edge spots without weight, except in blocks where every
        # spot is cut (blocks of one or two images): there the biased phi is the
        # only phi information for that stretch of the rotation, and a smoother
        # left without it at the sweep's end extrapolates (tiny sweep, last block
        # one image after a gap: worst error 0.052 deg without, 0.018 with it)
        xy_edge = copy.deepcopy(edge)
        end = scan_end_spots(experiments, table)
        modelled_end = flex.bool(len(table), False)
        if self.gap_edge == "xy" and self.scan_ends == "xy":
            # a sweep's scan-end spots treated as gap-edge spots, unless they
            # are most of its spots (a short sweep of fine slices: four 15 x
            # 0.1 deg L-cysteine sweeps, DIALS then refuses a sweep left
            # without phi); with modelled gap edges, only where the rocking
            # curve's width can be estimated (a sweep with SIGMA_M_MIN_SPOTS
            # spots cut by neither): else their phi would get no weight, which
            # leaves a sparse sweep's ends held by nothing
            uncut = ~edge & ~end & (table["id"] >= 0)
            modelled = self.gap_edges != "modelled" or any(
                (uncut & (table["sweep"] == g)).count(True) >= SIGMA_M_MIN_SPOTS for g in range(len(joined.groups)))
            for g, group in enumerate(joined.groups):
                rows = table["sweep"] == g
                if modelled and (rows & end).count(True) < SCAN_END_MAX_FRACTION * rows.count(True):
                    xy_edge |= rows & end
                elif modelled and self.gap_edges == "modelled":
                    # a short sweep: left with their observed phi in the
                    # scan-varying jobs, the ends' inward pull on it is fitted
                    # as a turn about the spindle (3 x 1 deg among 12-image
                    # sweeps: worst orientation error 0.13 deg)
                    modelled_end |= rows & end
        # (modelled_end, where set, stands over these two rules: a block or
        # sweep of a short sweep whose spots are all cut keeps their observed
        # phi in the static jobs and has it compared with the cut curve in
        # the scan-varying ones; taken as observed there too, a 1-image block
        # after a gap at a 5-image sweep's end turned 0.078 deg off, against
        # 0.029 deg)
        blocks_of_rows = table["block"]
        for i in range(len(experiments)):
            rows = blocks_of_rows == i
            if rows.count(True) and (rows & ~xy_edge).count(True) == 0:
                xy_edge.set_selected(rows, False)
        # the same for a sweep: with fewer spots whose phi counts than 3 x
        # DIALS' auto_reduction.min_nref_per_parameter (DIALS counts every
        # spot for each of an orientation's three angles; this asks for that
        # many per angle), its rotation about the spindle is held by almost
        # nothing, and the biased phi of its cut spots (a fraction of an
        # image) is better than none.  L-cysteine without image 11 of sweep
        # 4: 14 of its 27 indexed spots with phi; with only those its
        # orientation went astray (1 of its spots left by outlier rejection,
        # the cell's esds 30-150 times smaller than in any other run;
        # benchmarks/l_cysteine_gaps.py)
        indexed = table["id"] >= 0
        enough = 3 * self._min_spots_per_parameter()
        for g in range(len(joined.groups)):
            rows = (table["sweep"] == g) & indexed
            with_phi = (rows & ~xy_edge).count(True)
            if with_phi < enough and (rows & xy_edge).count(True):
                logger.info("Sweep %d: %d of its %d indexed spots not cut by a gap or its scan's ends, fewer than "
                            "DIALS asks for an orientation (%d): the phi of all of them is used",
                            numbers[g], with_phi, rows.count(True), enough)
                xy_edge.set_selected(rows, False)
        if "xyzobs.mm.value" not in table:
            table.centroid_px_to_mm(joined.experiments)
        if "s1" not in table:  # DIALS sets the observed s1 where it is zero
            table["s1"] = flex.vec3_double(len(table), (0.0, 0.0, 0.0))
        original_mm = (copy.deepcopy(table["xyzobs.mm.value"]), copy.deepcopy(table["xyzobs.mm.variance"]))
        record = Record()
        for e in experiments:
            record.block(e.identifier)
        return _Job(joined, table, edge, xy_edge, original_mm, record, {}, numbers=numbers, scan_end=end,
                    modelled_end=modelled_end)

    def _refine_params(self):
        """DIALS' refinement parameters of this model's jobs: dials.refine's,
        on a sample of REFLECTIONS_PER_DEGREE where reflections_per_degree is
        left Auto (which DIALS takes as all reflections below one turn)."""
        rp = dials_refine_params(self.params)
        reflections = rp.refinement.reflections
        if reflections.reflections_per_degree is libtbx.Auto:
            reflections.reflections_per_degree = REFLECTIONS_PER_DEGREE
        return rp

    def _min_spots_per_parameter(self):
        """DIALS' refinement.parameterisation.auto_reduction.min_nref_per_parameter."""
        return max(1, self._refine_params().refinement.parameterisation.auto_reduction.min_nref_per_parameter)

    def _refinable(self, table):
        ok = table.get_flags(table.flags.indexed) & (table["id"] >= 0)
        if self.gap_edge == "exclude":
            ok &= ~table["gap_edge"]
        return ok

    def _model_edge_phi(self, job, models) -> None:
        """continuous_gap_edges=modelled: sigma_m from the uncut spots
        against `models`, then the gap-edge spots' phi against their cut
        rocking curves (:func:`cut_rocking_curve_phi`)."""
        table = job.table
        uncut = self._refinable(table) & ~job.edge & ~job.scan_end
        sigma_m = rocking_curve_sigma_m(models, table, uncut, job.numbers)
        if not sigma_m:
            logger.info("Gap-edge spots: sigma_m could not be estimated from the uncut spots; their phi keeps "
                        "no weight")
            # a short sweep's scan-end spots keep their observed phi, as in
            # the static jobs: else the sweep would have almost none
            rows = job.modelled_end.iselection()
            table["xyzobs.mm.variance"].set_selected(rows, job.original_mm[1].select(rows))
            return
        rows = job.xy_edge | job.modelled_end
        n = cut_rocking_curve_phi(table, rows, models, job.joined, job.original_mm[1], sigma_m)
        logger.info("Gap-edge spots: phi against a rocking curve cut by the gap or the scan's end (sigma_m %.4f deg "
                    "from the uncut spots) for %d of %d", math.degrees(sigma_m), n, rows.count(True))

    def _restore_edge_phi(self, job) -> None:
        """The edge spots' phi back to what was observed."""
        edge, table = (job.edge | job.xy_edge | job.modelled_end).iselection(), job.table
        table["xyzobs.mm.value"].set_selected(edge, job.original_mm[0].select(edge))
        table["xyzobs.mm.variance"].set_selected(edge, job.original_mm[1].select(edge))

    def _static_job(self, job, experiments):
        """1. static refinement of the one crystal; returns the refined experiments."""
        rp = self._refine_params()
        rp.refinement.parameterisation.scan_varying = False
        models = job.joined.experiments
        table = job.table
        if self.gap_edge == "xy":
            _inflate_edge_phi_variance(table, job.xy_edge)
        if len(models) > 1:
            # an orientation per sweep, one cell; the orientations first: the
            # one crystal of the joint lattice search misses each sweep by a
            # rotation (goniometer settings a little off).  Judged in one
            # distribution (a sweep below DIALS' minimum pools them) whole
            # sweeps would look like outliers: no rejection then.  Judged
            # sweep by sweep, as dials.refine does, each sweep's offset is its
            # own distribution's centre, and a job without rejection would
            # pull the orientations towards the outliers (35 % of the four
            # L-cysteine sweeps' spots) that the static job then judges
            # against them (phi RMSD 0.21-0.80 images at the end, against
            # 0.07-0.50 with the rejection)
            crystal_per_sweep(models)
            self._one_cell(rp, models[0].crystal)
            first = copy.deepcopy(rp)
            refinable = self._refinable(table)
            if sweeps_judged_apart(table, refinable & ~job.xy_edge, rp):
                sel, first = _job_selection(table, refinable, models, rp, self.gap_edge, job.xy_edge,
                                            nproc=self.nproc, numbers=job.numbers)
            else:
                first.refinement.reflections.outlier.algorithm = "null"
                sel = refinable.iselection()
            logger.info("Continuous model: an orientation per sweep, %d reflections", len(sel))
            models, _, _ = _static_macrocycle(job, first, table.select(sel), models,
                                              "static refinement of the sweeps' orientations")
        sel, job_rp = _job_selection(table, self._refinable(table), models, rp, self.gap_edge, job.xy_edge,
                                     nproc=self.nproc, numbers=job.numbers)
        work = table.select(sel)
        logger.info("Continuous model: static refinement, %d reflections", len(work))
        static, work, refiner = _static_macrocycle(job, job_rp, work, models, "static refinement")
        job.chi2["static"] = _reduced_chi_squared(refiner)
        if len(static) > 1 and self.sweep_cells == "shared":
            dials_compat.set_constrained_cell_covariance(refiner, [m.crystal for m in static])
        job.static_esd = _cell_esd(static[0].crystal)
        _write_back(table, sel, work)
        self._restore_edge_phi(job)
        blocks = job.joined.to_blocks(copy.deepcopy(table), experiments)
        for ident, r in block_rmsds(blocks, experiments).items():
            if r is not None:  # None: no spot of the block in the job
                job.record.block(ident)["rmsd_static"] = r
        return static

    def _scan_varying_params(self, job, models):
        """DIALS' refinement parameters of the scan-varying jobs, the smoothers'
        interval widths, and the sweeps whose crystals stay static (too few
        reflections)."""
        rp = self._refine_params()
        par = rp.refinement.parameterisation
        par.scan_varying = True
        par.crystal.unit_cell.force_static = not self.scan_varying_cell
        widths, ours = [], []
        for smoother in (par.crystal.orientation.smoother, par.crystal.unit_cell.smoother):
            if (
                self.interval_width_degrees
                and smoother.absolute_num_intervals is None
                and smoother.interval_width_degrees == DIALS_INTERVAL_WIDTH
            ):
                smoother.interval_width_degrees = self.interval_width_degrees
                ours.append(True)
            else:
                ours.append(False)
            widths.append(smoother.interval_width_degrees)
        # (a sweep's orientation is static in a job only where DIALS refuses
        # to parameterise it for too few reflections: _scan_varying_job)
        static_only = set()
        if len(models) > 1:
            self._one_cell(rp, models[0].crystal)
        # the spacing is chosen from the data only where it is ours (the
        # orientation smoother left at DIALS' default)
        return rp, widths, static_only, ours[0]

    def _scan_varying_jobs(self, job, static):
        """2. scan-varying orientation (cell static unless asked), one crystal
        per sweep; then every spot indexed again against the scan-varying
        model (a static model cannot index a crystal that turns by degrees)
        and refined again.  Returns (the final experiments, smoother interval
        widths)."""
        models = static
        rp, widths, static_only, ours = self._scan_varying_params(job, models)
        table = job.table
        auto = self.reindex_cycles is None
        cycles = AUTO_REINDEX_MAX if auto else max(0, int(self.reindex_cycles))
        rows_block = np.asarray(job.joined.block_of_rows(table))
        spots = np.bincount(rows_block[rows_block >= 0], minlength=len(job.joined.blocks))
        model_edges = self.gap_edges == "modelled" and self.gap_edge == "xy" and (
            job.xy_edge | job.modelled_end).count(True) > 0
        last = oos = None
        moved = False  # a re-index cycle that indexed more refined again
        # the last job's spots and outliers were chosen against a model that
        # had just moved.  With second_job also for the first scan-varying
        # job: its outliers were judged against the static crystal, which
        # mispredicts a crystal that turns by more than a spot's width, so the
        # spots where the drift is largest (the ends) are rejected and the
        # scan-varying model is weakest exactly there; one more job, its
        # outliers judged against the scan-varying model, follows (3-block
        # sweep: orientation error 0.0032 / 0.0124 deg median / worst ->
        # 0.0014 / 0.0083)
        unsettled = bool(self.second_job)
        for cycle in range(1 + cycles if self.scan_varying else 0):
            if cycle > 0:
                saved = {column: table[column].deep_copy() for column in ("id", "miller_index", "flags")}
                before = _indexed_per_block(table, rows_block, len(spots))
                everything = table["id"] >= -1
                n = _index_each_sweep(models, table, everything, self.z_window)
                gain = _indexed_per_block(table, rows_block, len(spots)) - before
                block_gain = gain / np.maximum(spots, 1)
                logger.info(
                    "All spots indexed against the scan-varying model: %d of %d (%+d; the most in one block %+d, "
                    "%+.1f%% of its spots)", n, len(table), gain.sum(), gain.max(), 100 * block_gain.max(),
                )
                more = gain.sum() >= AUTO_REINDEX_GAIN * len(table) or bool(
                    ((block_gain >= AUTO_REINDEX_GAIN) & (gain >= AUTO_REINDEX_BLOCK_MIN)).any()
                )
                small = auto and not more
                job.cycles.append({"gain": int(gain.sum()), "indexed_more": more, "refined": not small or unsettled})
                if small and not unsettled:
                    job.indexed_against = models
                    break
                if small:
                    logger.info("Continuous model: refined again (cycle %d): the last job's spots and outliers were "
                                "chosen against the model before it, which indexing then changed", cycle)
                else:
                    logger.info("Continuous model: refined again with them (cycle %d)", cycle)
                unsettled = not small
                moved = moved or not small
            if self.gap_edge == "xy":
                # (a short sweep's scan-end spots too: those whose cut
                # rocking curve tells nothing of their phi keep no weight)
                _inflate_edge_phi_variance(table, job.xy_edge | job.modelled_end)
            if model_edges:
                self._model_edge_phi(job, models)
            table.unset_flags(flex.bool(len(table), True), table.flags.used_in_refinement)
            # judged by block once a re-index cycle indexed more (the crystal
            # turns faster somewhere than the model did); the job that only
            # judges the first scan-varying job's outliers against it does so
            # sweep by sweep: a block of a few images has too few spots for a
            # stable distribution (40 x 1 deg, every 8th image missing, 7-image
            # blocks: worst error 0.056 deg by block, 0.028 by sweep)
            sel, job_rp = _job_selection(table, self._refinable(table), models, rp, self.gap_edge, job.xy_edge,
                                         by_block=cycle > 0 and moved, nproc=self.nproc, numbers=job.numbers)
            work = table.select(sel)
            empty = [g for g in range(len(models)) if not (work["id"] == g).count(True)]
            if empty and cycle > 0:
                # DIALS cannot refine a sweep without a reflection (its scan is
                # trimmed to its observations): such a sweep keeps the
                # indexing of the job before (a sweep of one image with 2
                # spots, re-indexed against the scan-varying model, kept none)
                mine = flex.bool(len(table), False)
                for g in empty:
                    mine |= table["sweep"] == g
                for column, values in saved.items():
                    now = table[column]
                    now.set_selected(mine, values.select(mine))
                    table[column] = now
                table.unset_flags(flex.bool(len(table), True), table.flags.used_in_refinement)
                sel, job_rp = _job_selection(table, self._refinable(table), models, rp, self.gap_edge, job.xy_edge,
                                             by_block=moved, nproc=self.nproc, numbers=job.numbers)
                work = table.select(sel)
                logger.info("Continuous model: re-indexed against the scan-varying model, sweep(s) %s kept no spot "
                            "for refinement: their indexing before stands", ", ".join(str(job.numbers[g]) for g in empty))
                if any(not (work["id"] == g).count(True) for g in range(len(models))):
                    self._restore_edge_phi(job)
                    logger.info("Continuous model: a sweep without a spot for refinement: the job before stands")
                    break
            if self.gap_edge == "xy":
                work["phi_weighted"] = ~(job.xy_edge | job.modelled_end).select(sel)
            if self.choose_spacing and ours and (cycle > 0 or self.choose_spacing is True):
                # the job's input, for the same job with finer checkpoints
                # (the refiner changes its models and table in place); "auto"
                # tries them only after a re-index cycle, so only that input
                last = (copy.deepcopy(models), table.select(sel), sel, job_rp)
                last[1]["phi_weighted"] = work["phi_weighted"] if "phi_weighted" in work else flex.bool(len(work), True)
            models, oos = self._scan_varying_job(job, models, work, sel, job_rp, static_only)
        if last and oos and (moved or self.choose_spacing is True):
            models, widths = self._finer_if_better(job, last, models, oos, widths, static_only)
        elif self.choose_spacing and ours and oos:
            logger.info("Smoother checkpoints every %g deg: no re-index cycle ran (a crystal the static model "
                        "followed), the finer spacing not tried", widths[0])
            job.spacing_choice = {"widths": [widths[0]], "chosen": widths[0], "scores": [held_out_score(oos)],
                                  "paired_z": None}
        return models, widths

    def _scan_varying_job(self, job, models, work, sel, job_rp, static_only, what="scan-varying refinement"):
        """One scan-varying job on `work` (rows `sel` of the table); its
        columns written back.
        Returns (models, out-of-sample RMSDs)."""
        logger.info("Continuous model: %s, %d reflections", what, len(work))
        factory = BSplineSmoother if self.smoother == "bspline" else None
        static_only = set(static_only)
        fixed = set()
        lowered = False
        while True:
            try:
                with dials_compat.static_crystals_in_scan_varying_job(static_only), \
                        dials_compat.crystal_smoother(factory) as swapped:
                    models, work, refiner = _macrocycle(job_rp, work, models, what)
                break
            except GapfillError as e:
                # a sparse sweep (a dozen spots, as a 1.5-deg small-molecule
                # wedge): DIALS refuses its scan-varying orientation for too
                # few reflections per parameter; it stays static in this job
                named = dials_compat.crystals_refused_for_too_few_reflections(getattr(e, "dials_message", ""), models)
                refused = named - static_only
                if named and not refused and not lowered:
                    # static already, and still too few: on fewer reflections
                    # per parameter before it is fixed (base.FEWEST_NREF_PER_PARAMETER)
                    lowered = True
                    job_rp = fewer_reflections_per_parameter(job_rp, sorted(job.numbers[i] for i in named))
                    continue
                if named and not refused and not named <= fixed:
                    # and still too few: fixed
                    job_rp = copy.deepcopy(job_rp)
                    dials_compat.fix_crystal_orientations(job_rp, named - fixed, models)
                    say_too_few_spots(job.record, sorted(job.numbers[i] for i in named - fixed),
                                      kept_as="the job before left it")
                    fixed |= named
                    continue
                if not refused:
                    raise
                logger.info("Sweep(s) %s: too few reflections for a scan-varying orientation (DIALS' "
                            "auto_reduction): static in this job", ", ".join(str(job.numbers[i]) for i in sorted(refused)))
                width = job_rp.refinement.parameterisation.crystal.orientation.smoother.interval_width_degrees
                for g, line in _static_for_a_long_gap(job, sorted(refused - job.static_for_a_gap), width):
                    job.static_for_a_gap.add(g)  # (said once, not in every job)
                    logger.warning("Warning: %s", line)
                    job.record.warn(line)
                static_only |= refused
        job.smoother = "bspline" if swapped else "gaussian"
        oos = out_of_sample_rmsd(refiner, models)
        if oos:
            logger.info("Out of sample (%d reflections): RMSD x %.3f px, y %.3f px, phi %.3f images",
                        oos["n"], oos["x"], oos["y"], oos["phi"])
        job.out_of_sample.append({k: v for k, v in oos.items() if k != "rows"} if oos else None)
        job.chi2["scan_varying"] = _reduced_chi_squared(refiner)
        if not self.scan_varying_cell:
            if len(models) == 1:
                dials_compat.set_static_cell_covariance(refiner, models[0].crystal)
            elif self.sweep_cells == "shared":
                dials_compat.set_constrained_cell_covariance(refiner, [m.crystal for m in models])
        _write_back(job.table, sel, work)
        self._restore_edge_phi(job)
        return models, oos

    def _finer_if_better(self, job, last, models, oos, widths, static_only):
        """The last scan-varying job again with checkpoints FINER_SPACING
        times as far apart, on the same reflections and the same random
        sample; its models are kept when they predict the reflections the
        sample left out better (:func:`held_out_score`), else the job's.
        Returns (models, smoother widths)."""
        start, work, sel, job_rp = last
        rp = copy.deepcopy(job_rp)
        smoothers = (rp.refinement.parameterisation.crystal.orientation.smoother,
                     rp.refinement.parameterisation.crystal.unit_cell.smoother)
        finer = [w * FINER_SPACING for w in widths]
        for smoother, w in zip(smoothers, finer):
            smoother.interval_width_degrees = w
        table = job.table
        saved = {key: copy.deepcopy(table[key]) for key in ("xyzcal.mm", "xyzcal.px", "s1", "entering",
                                                             "delpsical.rad") if key in table}
        saved_flags = copy.deepcopy(table["flags"])
        saved_chi2 = dict(job.chi2)
        try:
            candidate, candidate_oos = self._scan_varying_job(
                job, start, work, sel, rp, static_only, f"scan-varying refinement, checkpoints every {finer[0]:g} deg",
            )
        except GapfillError as e:  # e.g. a checkpoint in a long gap without reflections
            logger.info("Checkpoints every %g deg: %s", finer[0], e)
            candidate_oos = None
        z = paired_z(oos, candidate_oos)
        keep = z is not None and z < -FINER_Z
        logger.info(
            "Smoother checkpoints every %g deg: held-out score %.4f against %.4f every %g deg (paired z %s): %s",
            finer[0], held_out_score(candidate_oos) if candidate_oos else float("nan"), held_out_score(oos),
            widths[0], "n/a" if z is None else f"{z:.1f}", "kept" if keep else "not kept",
        )
        job.spacing_choice = {"widths": [widths[0], finer[0]], "chosen": finer[0] if keep else widths[0],
                              "scores": [held_out_score(oos), held_out_score(candidate_oos) if candidate_oos else None],
                              "paired_z": z}
        if keep:
            job.indexed_against = None  # the final re-index runs against these models
            return candidate, finer
        for key, column in saved.items():
            table[key] = column
        table["flags"] = saved_flags
        job.chi2 = saved_chi2
        return models, widths

    def _final_reindex(self, job, final) -> None:
        """3. every spot indexed against the final model (no more refinement):
        the indexed fraction of the model that is handed on."""
        table = job.table
        used = table.get_flags(table.flags.used_in_refinement)
        if job.indexed_against is final:
            # the last re-index cycle indexed every spot against these models
            # and nothing was refined after it: the same assignment again
            n = (table.get_flags(table.flags.indexed) & (table["id"] >= 0)).count(True)
        else:
            n = _index_each_sweep(final, table, table["id"] >= -1, self.z_window)
        lost = used & ~table.get_flags(table.flags.indexed)
        table.unset_flags(lost, table.flags.used_in_refinement)
        logger.info("All spots indexed against the final model: %d of %d", n, len(table))

    def _finish(self, job, final, widths):
        """The blocks with their slices of the final models, their reflections
        and the record."""
        joined = job.joined
        blocks = joined.slice(final)
        out = joined.to_blocks(job.table, blocks)
        out = out.select(out.get_flags(out.flags.indexed) & (out["id"] >= 0))
        names = self.block_names(blocks)
        record = job.record
        rmsds = block_rmsds(out, blocks)
        for g, model in enumerate(final):
            first, last = model.scan.get_image_range()
            if self.scan_varying and model.crystal.num_scan_points:
                what = ("continuous: one crystal over images %d-%d, orientation scan-varying (checkpoints every %g deg, "
                        "%s smoother), cell %s") % (
                    first, last, widths[0], SMOOTHER_NAMES[job.smoother],
                    "scan-varying" if self.scan_varying_cell else "static",
                )
            else:
                what = "continuous: one crystal over images %d-%d, static" % (first, last)
            for i in joined.groups[g]:
                ident = blocks[i].identifier
                r = rmsds[ident]
                stats = record.block(ident)
                if self.scan_varying and r is not None:  # None: no spot of the block in the job
                    stats["rmsd_scan_varying"] = r
                    if r:
                        logger.info(
                            "%s: RMSD x %.3f px, y %.3f px, phi %.3f images (%d reflections)",
                            names[ident], r["x"], r["y"], r["phi"], r["n"],
                        )
                stats["refinement"] = what
                stats["unit_cell_esd"] = None  # one cell: no per-block esds
        crystal = final[0].crystal
        one = len(final) == 1
        # the esds of the cell handed on: from the last job's covariance (with
        # a static cell, the block of its parameters; with several sweeps, of
        # the one cell they share through constraints)
        esd = _cell_esd(crystal) if self.scan_varying else job.static_esd
        cells = [list(m.crystal.get_unit_cell().parameters()) for m in final]
        record.crystal.update({
            # the cell is static: one cell for all blocks, with its esds
            "static": {
                "unit_cell": cells[0] if one else [sum(c[k] for c in cells) / len(cells) for k in range(6)],
                "unit_cell_esd": esd,
                "space_group": str(crystal.get_space_group().info()),
            },
            "cell_esd": esd,
            "cells_tied": True,  # one cell: no per-block esds
            "model": self.name,
        })
        if not one:
            record.crystal["sweep_cells"] = cells
        self.last = {  # what the report does not show, for benchmarks and tests
            "unit_cell_esd_static_job": job.static_esd,
            "scan_varying_cell": bool(self.scan_varying_cell),
            "num_scan_points": [m.crystal.num_scan_points for m in final],
            "reduced_chi_squared": job.chi2,
            "out_of_sample": job.out_of_sample,
            "spacing_choice": job.spacing_choice,
            "smoother": job.smoother,
            "reindex_cycles": job.cycles,
        }
        return blocks, out, record


def longest_gap(blocks):
    """(degrees, last image before, first image after) of the longest gap
    between consecutive blocks of one sweep, or None (one block)."""
    longest = None
    for before, after in zip(blocks, blocks[1:]):
        gap = after.scan.get_oscillation_range()[0] - before.scan.get_oscillation_range()[1]
        if longest is None or gap > longest[0]:
            longest = (gap, before.scan.get_image_range()[1], after.scan.get_image_range()[0])
    return longest


# A gap of this many smoother intervals leaves checkpoints inside it with no
# reflection near them: two 6-image wedges of 1 deg 40 deg apart (3.3
# intervals of 12 deg) kept their scan-varying orientation, 50 deg apart
# DIALS refused it (benchmarks/long_gap.py)
LONG_GAP_INTERVALS = 3


def _static_for_a_long_gap(job, refused, width) -> list[tuple[int, str]]:
    """(sweep, warning) for the sweeps (group indices `refused`) whose
    orientation DIALS refused to make scan-varying and that have a gap of
    LONG_GAP_INTERVALS smoother intervals (`width` deg) or more: checkpoints
    inside it have no reflection however many the sweep has (two 6-image
    wedges of a drifting crystal, 1 x 1 deg, 50 deg or more apart).  Measured on such
    wedges 50-174 deg apart (benchmarks/long_gap.py): the static
    orientation is at least as close to the truth as per-block crystals
    (median 0.008-0.028 against 0.027-0.039 deg), but the wedge after the
    gap is predicted less well the longer the gap (RMSD x 0.032-0.106 px
    against 0.032-0.048 per block); so this is said, and the model is not
    changed."""
    lines = []
    several = len(job.joined.groups) > 1
    for g in refused:
        longest = longest_gap(job.joined.block_experiments(g))
        if longest is None or width is None or longest[0] < LONG_GAP_INTERVALS * width:
            continue
        gap, last, first = longest
        whose = f"sweep {job.numbers[g]}'s" if several and job.numbers else "the sweep's"
        lines.append((g,
            f"{whose} crystal orientation stays static, not scan-varying: the {gap:.0f}-deg gap between "
            f"images {last} and {first} leaves the smoother's checkpoints there (every {width:g} deg) without "
            "reflections, so DIALS refuses the parameters; refinement.blocks.model=per_block gives each "
            "block its own scan-varying crystal"
        ))
    return lines


def _indexed_per_block(table, rows_block, n_blocks):
    """Indexed spots per block (numpy); `rows_block`: each row's block, -1 none."""
    ok = np.asarray(table.get_flags(table.flags.indexed) & (table["id"] >= 0)) & (rows_block >= 0)
    return np.bincount(rows_block[ok], minlength=n_blocks)


def _edge_spots_searched(table, edge, minimum, numbers):
    """The gap-edge spots that join the lattice search: those of a sweep
    (several sweeps) with fewer than `minimum` spots not cut by a gap (its
    blocks single images, say).  Indexed afterwards against the crystal the
    other sweeps found, such a sweep would be predicted only as well as the
    headers give its goniometer setting (L-cysteine sweep 1 as images 1 and
    15: 1 of 35 spots within 3 px); in the search, DIALS' indexer assigns
    them in reciprocal space as any other spot (their x, y are whole, their
    phi a little off)."""
    sweeps = np.asarray(table["sweep"]) if "sweep" in table else np.zeros(len(table), dtype=int)
    cut = np.asarray(edge)
    out = np.zeros(len(table), dtype=bool)
    if len(set(sweeps.tolist())) < 2:
        return flex.bool(out.tolist())
    for g in np.unique(sweeps):
        rows = sweeps == g
        inner = int((rows & ~cut).sum())
        if inner < minimum and (rows & cut).any():
            logger.info("Sweep %d: %d spots not cut by a gap; its %d spots cut by a gap join the lattice search",
                        numbers[g], inner, int((rows & cut).sum()))
            out |= rows & cut
    return flex.bool(out.tolist())


def _merge_search(table, search, indexed):
    """`table` with the indexing result of its subset `search` (matched by the
    sweep and the observed centroid, which the indexer does not change)."""

    out = copy.deepcopy(table)
    out["id"] = flex.int(len(out), -1)
    out["miller_index"] = flex.miller_index(len(out))
    key = {}
    for i, (s, xyz) in enumerate(zip(out["imageset_id"], out["xyzobs.px.value"])):
        key[(s, xyz)] = i
    ids, hkl, xyzs = indexed["id"], indexed["miller_index"], indexed["xyzobs.px.value"]
    sweeps = indexed["imageset_id"]
    idx_flag = indexed.get_flags(indexed.flags.indexed)
    new_ids, new_hkl = out["id"], out["miller_index"]
    for j in range(len(indexed)):
        i = key.get((sweeps[j], xyzs[j]))
        if i is None or not idx_flag[j] or ids[j] < 0:
            continue
        new_ids[i] = ids[j]
        new_hkl[i] = hkl[j]
    out["id"], out["miller_index"] = new_ids, new_hkl
    out.set_flags(new_ids >= 0, out.flags.indexed)
    return out


# --------------------------------------------------------------------------
# Refinement helpers
# --------------------------------------------------------------------------


def _static_macrocycle(job, rp, reflections, experiments, what):
    """A static job, a sweep with too few spots for its orientation fixed
    (:func:`base.fixing_sparse_sweeps`)."""
    return fixing_sparse_sweeps(lambda p: _macrocycle(p, reflections, experiments, what), rp, experiments,
                                lambda sweeps, what: say_too_few_spots(job.record, sweeps, what), fewest=True,
                                numbers=job.numbers)


def _macrocycle(rp, reflections, experiments, what):
    # every job draws DIALS' random sample with one seed: the same rows give
    # the same sample (the spacing choice compares two jobs on it) and a run
    # does not depend on what drew random numbers before it
    sflex.set_random_seed(SAMPLE_SEED)
    t0 = time.perf_counter()
    try:
        with dials_compat.steady_levmar():
            refiner, reflections, history = run_macrocycle(rp, reflections, experiments)
    except SystemExit as e:  # DIALS 3.12 exits on configuration/runtime errors
        error = GapfillError(f"{what} failed: {' '.join(str(e.code).split())[:200]}: check refinement.*")
        error.dials_message = str(e.code)
        raise error from None
    logger.info("%s: %d steps in %.1f s", what.capitalize(), history.get_nrows(), time.perf_counter() - t0)
    return refiner.get_experiments(), reflections, refiner


def rocking_curve_sigma_m(models, table, rows, numbers=None):
    """sigma_m (radians, the e.s.d. of the reflecting range) of DIALS'
    gaussian_rs profile model, estimated as dials.integrate's profile
    modelling does (ComputeEsdReflectingRange, "extended" maximum likelihood)
    on the spots `rows` of each sweep (`models`: one per sweep, ids = sweep),
    at most SIGMA_M_MAX_SPOTS of them, with DIALS' min_zeta 0.05; the
    sweeps' estimates pooled (rms weighted by spots).  None without an
    estimate (no shoeboxes, too few spots).  `numbers`: the run's sweep
    numbers, for the log."""

    if "shoebox" not in table:
        return None
    experiments = ExperimentList(list(models))
    estimates = []
    rng = np.random.default_rng(SAMPLE_SEED)
    for g, model in enumerate(experiments):
        sel = np.asarray((rows & (table["id"] == g)).iselection())
        if len(sel) < SIGMA_M_MIN_SPOTS:
            continue
        if len(sel) > SIGMA_M_MAX_SPOTS:
            sel = np.sort(rng.choice(sel, SIGMA_M_MAX_SPOTS, replace=False))
        sub = predict_at_observed_z(table.select(flex.size_t(sel.tolist())), experiments)
        sub = sub.select(sub["s1"].norms() > 0)
        sub.compute_zeta_multi(experiments)
        sub = sub.select(flex.abs(sub["zeta"]) >= 0.05)
        if len(sub) < SIGMA_M_MIN_SPOTS:
            continue
        try:
            sigma = ComputeEsdReflectingRange(model.crystal, model.beam, model.detector, model.goniometer,
                                              model.scan, sub, algorithm="extended").sigma()
        except (RuntimeError, AssertionError, ValueError) as e:  # DIALS' estimator on too little signal
            logger.debug("sigma_m of sweep %d: %s", sweep_number(numbers, g), e)
            continue
        if math.isfinite(sigma) and sigma > 0:
            estimates.append((sigma, len(sub)))
    if not estimates:
        return None
    return math.sqrt(sum(s * s * n for s, n in estimates) / sum(n for _, n in estimates))


def _cut_centroid(zc, s, first, end, chunk=2048):
    """Expected z centroid (frames) of Gaussian rocking curves N(zc, s)
    recorded on frames first..end-1 only, each frame at its centre weighted
    by the part of the curve it records (arrays of one value per spot); NaN
    where those frames record nothing.  Spots in chunks: the frame window
    (6 s either side, at most 400 frames) times the spots bounds the memory."""
    out = np.full(len(zc), np.nan)
    for i in range(0, len(zc), chunk):
        part = slice(i, i + chunk)
        z, sd, f, e = zc[part], s[part], first[part], end[part]
        window = int(min(np.ceil(6 * np.max(sd)) + 3, 400))
        k = np.floor(z)[:, None] + np.arange(-window, window + 1)[None, :]
        w = ndtr((k + 1 - z[:, None]) / sd[:, None]) - ndtr((k - z[:, None]) / sd[:, None])
        w = np.where((k >= f[:, None]) & (k < e[:, None]), w, 0.0)
        total = w.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[part] = np.where(total > 1e-9, (w * (k + 0.5)).sum(axis=1) / total, np.nan)
    return out


def cut_rocking_curve_phi(table, rows, models, joined, original_variance, sigma_m):
    """Phi of the gap-edge spots `rows` as what it is: the centroid E of the
    frames of its block that recorded its rocking curve, a Gaussian of
    sigma_m / |zeta| (DIALS' reflecting range) about the predicted z_c of
    `models` cut at the block's ends (:func:`_cut_centroid`).  Linearised for
    DIALS' least squares, which compares an observation with z_c: with
    g = dE/dz_c the observation becomes z_c + (z_obs - E) / g and its
    variance the observed one / g**2, so a spot weighs what its cut centroid
    tells about z_c (nothing beyond the cut, where E stays at the last
    frame).  Rows with g < CUT_CURVE_MIN_SLOPE, or without a prediction, keep
    the phi variance they have.  Returns the number of rows given phi weight."""

    isel = (rows & (table["id"] >= 0)).iselection()
    if len(isel) == 0:
        return 0
    experiments = ExperimentList(list(models))
    sub = predict_at_observed_z(table.select(isel), experiments)
    predicted = sub["s1"].norms() > 0
    isel, sub = isel.select(predicted), sub.select(predicted)
    if len(isel) == 0:
        return 0
    sub.compute_zeta_multi(experiments)
    ids = np.asarray(sub["id"])
    phi0 = np.array([e.scan.get_oscillation(deg=False)[0] for e in experiments])[ids]
    width = np.array([e.scan.get_oscillation(deg=False)[1] for e in experiments])[ids]
    a0 = np.array([e.scan.get_array_range()[0] for e in experiments])[ids]
    ranges = np.array([b.scan.get_image_range() for b in joined.blocks])[np.asarray(sub["block"])]
    first, end = ranges[:, 0] - 1.0, ranges[:, 1].astype(float)
    zc = a0 + (np.asarray(sub["xyzcal.mm"].parts()[2]) - phi0) / width
    x, y, z_mm = (np.asarray(c) for c in table["xyzobs.mm.value"].select(isel).parts())
    zo = a0 + (z_mm - phi0) / width
    sigma_phi = np.minimum(sigma_m / np.maximum(np.abs(np.asarray(sub["zeta"])), 1e-6), 20 * sigma_m)
    s = sigma_phi / np.abs(width)
    step = 0.05
    e0 = _cut_centroid(zc, s, first, end)
    g = (_cut_centroid(zc + step, s, first, end) - _cut_centroid(zc - step, s, first, end)) / (2 * step)
    ok = np.isfinite(e0) & np.isfinite(g) & (g >= CUT_CURVE_MIN_SLOPE)
    vx, vy, vz = (np.asarray(c) for c in original_variance.select(isel).parts())
    _, _, vz_now = (np.asarray(c) for c in table["xyzobs.mm.variance"].select(isel).parts())
    gs = np.where(ok, g, 1.0)
    new_z = np.where(ok, phi0 + (zc + (zo - np.where(ok, e0, 0.0)) / gs - a0) * width, z_mm)
    new_vz = np.where(ok, vz / (gs * gs), vz_now)
    table["xyzobs.mm.value"].set_selected(isel, flex.vec3_double(flex.double(x), flex.double(y), flex.double(new_z)))
    table["xyzobs.mm.variance"].set_selected(
        isel, flex.vec3_double(flex.double(vx), flex.double(vy), flex.double(new_vz)))
    n = int(ok.sum())
    logger.debug("Gap-edge spots with phi weight from the cut rocking curve: %d of %d", n, len(isel))
    return n


def _inflate_edge_phi_variance(table, selection):
    """For `selection` rows: the phi variance times PHI_VARIANCE_INFLATION
    (x, y keep their weight; phi keeps its observed value, ~no weight)."""

    isel = selection.iselection()
    if len(isel) == 0:
        return
    vx, vy, vz = table["xyzobs.mm.variance"].select(isel).parts()
    table["xyzobs.mm.variance"].set_selected(isel, flex.vec3_double(vx, vy, vz * PHI_VARIANCE_INFLATION))


def predict_at_observed_z(sub, experiments):
    """`sub` (a selection of a continuous table) with DIALS' predictions of
    `experiments` for its indices (xyzcal.mm), as the refiner makes them: a
    scan-varying crystal at each reflection's observed z."""
    set_identifiers(sub, experiments)
    sub["s1"] = flex.vec3_double(len(sub), (0.0, 0.0, 0.0))
    set_obs_s1(sub, experiments)
    sub.calculate_entering_flags(experiments)
    if any(e.crystal.num_scan_points for e in experiments):
        _set_scan_varying_models(sub, experiments)
    ExperimentsPredictorFactory.from_experiments(experiments)(sub)
    return sub


def _set_scan_varying_models(sub, experiments):
    """The per-reflection models DIALS' scan-varying predictor reads (as the
    refiner's prediction parameterisation sets them): ``ub_matrix`` the
    crystal's A interpolated between the scan points around each
    reflection's observed z (a static crystal: its A), and the beam's s0,
    its panel's d matrix and the goniometer's setting rotation, which are
    static here.  Without them DIALS predicts with the crystal's static A."""
    n = len(sub)
    ub = np.zeros((n, 9))
    s0 = np.zeros((n, 3))
    dmat = np.zeros((n, 9))
    setting = np.zeros((n, 9))
    ids = np.asarray(sub["id"])
    z = np.asarray(sub["xyzobs.px.value"].parts()[2])
    panels = np.asarray(sub["panel"])
    for i, exp in enumerate(experiments):
        rows = ids == i
        if not rows.any():
            continue
        crystal = exp.crystal
        if crystal.num_scan_points:
            A = np.array([crystal.get_A_at_scan_point(k) for k in range(crystal.num_scan_points)])
            t = np.clip(z[rows] - exp.scan.get_array_range()[0], 0.0, len(A) - 1.0)
            k = np.minimum(np.floor(t).astype(int), len(A) - 2) if len(A) > 1 else np.zeros(len(t), int)
            f = (t - k)[:, None] if len(A) > 1 else np.zeros((len(t), 1))
            ub[rows] = A[k] * (1.0 - f) + A[np.minimum(k + 1, len(A) - 1)] * f
        else:
            ub[rows] = crystal.get_A()
        s0[rows] = exp.beam.get_s0()
        setting[rows] = exp.goniometer.get_setting_rotation()
        for p, panel in enumerate(exp.detector):
            dmat[rows & (panels == p)] = panel.get_d_matrix()
    sub["ub_matrix"] = flex.mat3_double([tuple(r) for r in ub])
    sub["s0_vector"] = flex.vec3_double([tuple(r) for r in s0])
    sub["d_matrix"] = flex.mat3_double([tuple(r) for r in dmat])
    sub["S_matrix"] = flex.mat3_double([tuple(r) for r in setting])


def paired_z(oos, candidate):
    """z of the mean difference candidate - oos of the rows' squared
    residuals (the same left-out rows: the same reflections and random
    sample); None where they cannot be paired."""
    if not oos or not candidate or len(oos["rows"]) != len(candidate["rows"]) or len(oos["rows"]) < 2:
        return None
    d = candidate["rows"] - oos["rows"]
    sd = float(np.std(d, ddof=1))
    return float(np.mean(d) / (sd / math.sqrt(len(d)))) if sd > 0 else 0.0


def held_out_score(oos):
    """Mean squared residual of the left-out reflections, x and y in pixels
    and phi in images (the units of the observations)."""
    return oos["x"] ** 2 + oos["y"] ** 2 + oos["phi"] ** 2


def out_of_sample_rmsd(refiner, models):
    """RMSDs x, y (px) and phi (images) of the reflections the job's random
    sample left out (DIALS' free reflections) against `models`, and robust
    RMSDs (``*_nmad``: 1.4826 median absolute residuals); phi only of rows
    whose phi had weight (column ``phi_weighted``).  None without free
    reflections (a job on all reflections)."""
    free = refiner.get_free_reflections()
    if free is None or len(free) == 0:
        return None
    experiments = ExperimentList(list(models))
    sub = predict_at_observed_z(copy.deepcopy(free), experiments)
    xo, yo, zo = sub["xyzobs.mm.value"].parts()
    xc, yc, zc = sub["xyzcal.mm"].parts()
    px = experiments[0].detector[0].get_pixel_size()
    width = math.radians(abs(experiments[0].scan.get_oscillation()[1])) or 1.0
    n = len(sub)
    phi_rows = sub["phi_weighted"] if "phi_weighted" in sub else flex.bool(n, True)
    dx = np.asarray(xc - xo) / px[0]
    dy = np.asarray(yc - yo) / px[1]
    dz = np.asarray((zc - zo).select(phi_rows)) / width

    def nmad(d):  # a robust RMSD (about zero: a bias counts), for the free rows
        # include spots indexed wrongly by an earlier model
        return float(1.4826 * np.median(np.abs(d))) if len(d) else 0.0

    squares = dx * dx + dy * dy
    squares[np.asarray(phi_rows)] += dz * dz
    return {
        "rows": squares,  # each row's squared residual (x, y, phi), for paired comparisons
        "x": float(np.sqrt(np.mean(dx * dx))),
        "y": float(np.sqrt(np.mean(dy * dy))),
        "phi": float(np.sqrt(np.mean(dz * dz))) if len(dz) else 0.0,
        "x_nmad": nmad(dx), "y_nmad": nmad(dy), "phi_nmad": nmad(dz),
        "n": n,
    }


def _outlier_groups(sub, minimum, by_block):
    """The groups DIALS' outlier rejection judges separately (its
    separate_experiments), numbered 0, 1, ...: with `by_block` each row's
    block, as dials.refine on the blocks would (one experiment each), unless
    a block has fewer than `minimum` rows; else each row's sweep; None (one
    group) where a sweep has fewer.

    By block only once every spot has been indexed against a scan-varying
    model (the re-index cycles): a crystal that turns faster at one end of
    the sweep is predicted worse there, and judged with the rest of the
    rotation that end's spots are outliers that never pull the model to them
    (benchmarks/refine_variants.py, 12-deg checkpoints, every 10th image
    missing, accelerating drift: worst orientation error 0.0225 deg judged
    in 18-deg ranges, 0.0161 deg by block in every job).  Before, the static
    model's indices at that end are partly wrong, and judged by block they
    would be kept (every 6th image missing, by block in every job: worst
    0.51 deg; by block in the re-index cycles only: 0.018 deg)."""
    for column in (("block", "sweep") if by_block else ("sweep",)):
        if column not in sub:
            continue
        values = np.asarray(sub[column])
        keys, groups, counts = np.unique(values, return_inverse=True, return_counts=True)
        if (keys >= 0).all() and counts.min() >= minimum:
            return flex.int(groups.astype(int).tolist())
    return None


def _search_failed(e, params) -> GapfillError:
    """The run's one-line error for a failed lattice search, carrying DIALS'
    error as ``search_error`` for a caller that tries another search (the
    per-block model) and says the reason in its own words."""
    error = GapfillError(indexing_failure(e, params))
    error.search_error = e
    return error


def reject_outliers(table, selection, models, rp, edge=None, by_block=False, nproc=1):
    """DIALS' centroid outlier rejection (the algorithm of `rp`, as the
    refiner would run it on the current models; block by block where each
    block has enough spots: :func:`_outlier_groups`), run separately on the spots
    not cut by a gap (x, y and phi residuals) and on the gap-edge spots (x and
    y residuals only: their phi is biased by the cut, and mixed with the others
    they would narrow or widen the distribution the algorithm estimates).
    Its jobs run on `nproc` processes, each seeded on its own
    (:func:`dials_compat.seeded_outlier_jobs`: the same outliers for any nproc).
    Sets ``centroid_outlier`` on `table` for the rejected rows of `selection`;
    returns the number rejected per group."""

    table.unset_flags(flex.bool(len(table), True), table.flags.centroid_outlier)
    if edge is None:
        edge = table["gap_edge"]
    algorithm = rp.refinement.reflections.outlier.algorithm
    if algorithm in ("null", None):
        return {}
    experiments = ExperimentList(list(models))
    minimum = rp.refinement.reflections.outlier.minimum_number_of_reflections
    counts = {}
    for name, group, cols in (
        ("inner", selection & ~edge, ["x_resid", "y_resid", "phi_resid"]),
        ("gap_edge", selection & edge, ["x_resid", "y_resid"]),
    ):
        isel = group.iselection()
        if len(isel) < max(1, minimum):
            # DIALS flags every reflection of a job below its minimum: none
            # is judged where there are too few to judge
            continue
        sub = predict_at_observed_z(table.select(isel), experiments)
        xo, yo, zo = sub["xyzobs.mm.value"].parts()
        xc, yc, zc = sub["xyzcal.mm"].parts()
        sub["x_resid"], sub["y_resid"], sub["phi_resid"] = xc - xo, yc - yo, zc - zo
        sub.set_flags(flex.bool(len(sub), True), sub.flags.predicted)
        ro = copy.deepcopy(rp.refinement.reflections)
        if ro.outlier.algorithm in ("auto", libtbx.Auto):
            ro.outlier.algorithm = "mcd"
        if ro.outlier.separate_experiments:
            groups = _outlier_groups(sub, minimum, by_block)
            if groups is None:
                # sparse sweeps (a few dozen spots): one distribution for all
                # of them, not one per block or sweep below DIALS' minimum
                ro.outlier.separate_experiments = False
            else:
                sub["id"] = groups
        detector = dials_compat.seeded_outlier_jobs(
            CentroidOutlierFactory.from_parameters_and_colnames(ro, cols), SAMPLE_SEED, nproc)
        if detector.get_block_width() is libtbx.Auto:
            detector.set_block_width(18.0)  # DIALS' choice without a centroid analysis
        detector(sub)
        bad = sub.get_flags(sub.flags.centroid_outlier)
        full = flex.bool(len(table), False)
        full.set_selected(isel, bad)
        table.set_flags(full, table.flags.centroid_outlier)
        counts[name] = bad.count(True)
    return counts


def sweeps_judged_apart(table, selection, rp) -> bool:
    """Whether :func:`reject_outliers` judges the spots of `selection` (not
    cut by a gap) sweep by sweep: DIALS' rejection on, separate_experiments,
    and every sweep with at least DIALS' minimum_number_of_reflections."""
    outlier = rp.refinement.reflections.outlier
    if outlier.algorithm in ("null", None) or not outlier.separate_experiments or "sweep" not in table:
        return False
    sweeps = np.asarray(table["sweep"].select(selection))
    if not len(sweeps) or (sweeps < 0).any():
        return False
    return int(np.bincount(sweeps).min()) >= outlier.minimum_number_of_reflections


def spots_given_back(table, refinable, kept, minimum, numbers=None):
    """`kept` (the rows of `refinable` that outlier rejection left) with the
    spots given back to a sweep that rejection in one distribution with the
    others left too few; `minimum` is DIALS'
    auto_reduction.min_nref_per_parameter.

    A sweep judged with the others can lose most of its spots (its
    residuals offset from theirs).  DIALS refines a parameter only on
    `minimum` reflections: left fewer, a sweep keeps all its spots
    unjudged.  Left fewer than 3 x `minimum` (that many for each of an
    orientation's three angles; DIALS counts every spot for each), and
    less than half of its spots (the sweep as a whole offset, not a few bad
    spots), it keeps its spots not cut by a gap; those cut by a gap stay
    judged, their phi (used where a block has no other spot) off by the cut.
    L-cysteine without image 7 of sweep 4 (its own detector, a phi RMSD of
    ~0.5 images in every refinement, the DIALS chain's included, against
    0.1-0.3 in sweeps 1-3): 8 of its 26 spots left where 40 % of all were
    rejected, and its detector could no longer be refined.  All 60 images:
    sweep 2 left 14 of 23, a share like the others'; given back its 9, its
    y RMSD on the spots every refinement kept went from 0.10 to 0.21 px
    (benchmarks/results/2026-12-05-l-cysteine-gaps.md)."""
    kept = copy.deepcopy(kept)
    sweeps = np.asarray(table["sweep"])
    ref, ok = np.asarray(refinable), np.asarray(kept)
    for g in np.unique(sweeps[ref]):
        if g < 0:
            continue
        left = int((ok & (sweeps == g)).sum())
        rows = refinable & (table["sweep"] == int(g))
        if left < minimum:
            logger.info("Sweep %d: %d of its spots left by outlier rejection, fewer than DIALS needs to "
                        "refine it (%d); its %d spots kept", sweep_number(numbers, g), left, minimum, rows.count(True))
            kept |= rows
        elif left < 3 * minimum and 2 * left < rows.count(True) and "gap_edge" in table:
            uncut = rows & ~table["gap_edge"] & ~kept
            if uncut.count(True):
                logger.info("Sweep %d: %d of its %d spots left by outlier rejection, fewer than DIALS asks "
                            "for an orientation (%d); its %d other spots not cut by a gap kept", sweep_number(numbers, g), left,
                            rows.count(True), 3 * minimum, uncut.count(True))
                kept |= uncut
    return kept


def _job_selection(table, refinable, models, rp, gap_edge, edge=None, by_block=False, nproc=1, numbers=None):
    """Rows of one refinement job.  With gap_edge="xy" outliers are rejected
    here (:func:`reject_outliers`) and the job runs without DIALS' own
    rejection (which would judge the edge spots' unweighted, biased phi
    residuals together with the others, and reject every reflection of a
    sparse sweep with fewer than its minimum)."""
    if edge is None:
        edge = table["gap_edge"]
    if gap_edge != "xy" or not (edge.count(True) or len(models) > 1):
        return refinable.iselection(), rp
    counts = reject_outliers(table, refinable, models, rp, edge, by_block, nproc)
    if counts:
        logger.info("Outliers rejected (not cut by a gap / cut by a gap): %s", counts)
    job_rp = copy.deepcopy(rp)
    job_rp.refinement.reflections.outlier.algorithm = "null"
    kept = refinable & ~table.get_flags(table.flags.centroid_outlier)
    if "sweep" in table and len(models) > 1:
        minimum = max(1, rp.refinement.parameterisation.auto_reduction.min_nref_per_parameter)
        kept = spots_given_back(table, refinable, kept, minimum, numbers)
    return kept.iselection(), job_rp


def block_rmsds(table, experiments):
    """Per block: RMSD x, y (px), phi (images) and n of the spots used in
    refinement that are not cut by a gap, and x, y, n of the gap-edge spots."""

    used = table.get_flags(table.flags.used_in_refinement)
    edge = table["gap_edge"] if "gap_edge" in table else flex.bool(len(table), False)
    out = {}
    for i, exp in enumerate(experiments):
        rec = {}
        for name, sel in (("inner", used & ~edge), ("edge", used & edge)):
            sub = table.select(sel & (table["id"] == i))
            if len(sub) == 0:
                rec[name] = None
                continue
            xo, yo, zo = sub["xyzobs.px.value"].parts()
            xc, yc, zc = sub["xyzcal.px"].parts()
            n = len(sub)
            rec[name] = {
                "x": math.sqrt(flex.sum_sq(xc - xo) / n),
                "y": math.sqrt(flex.sum_sq(yc - yo) / n),
                "phi": math.sqrt(flex.sum_sq(zc - zo) / n),
                "n": n,
            }
        if rec["inner"]:
            r = dict(rec["inner"])
            if rec["edge"]:
                r.update(edge_x=rec["edge"]["x"], edge_y=rec["edge"]["y"], edge_n=rec["edge"]["n"])
        elif rec["edge"]:
            # every spot of the block is cut by a gap (a block of one or two
            # images): x, y of those; their phi is biased by the cut
            r = dict(rec["edge"], phi_biased=True, edge_n=rec["edge"]["n"])
        else:
            r = None
        out[exp.identifier] = r
    return out


def _reduced_chi_squared(refiner):
    history = refiner.history
    if "reduced_chi_squared" not in history or not history.get_nrows():
        return None
    return float(history["reduced_chi_squared"][-1])


def _cell_esd(crystal):
    try:
        sd = crystal.get_cell_parameter_sd()
        return list(sd) if len(sd) else None
    except Exception:
        return None


def _write_back(table, sel, work):
    """Columns the refiner wrote into `work` (a selection `sel` of `table`)."""

    for key in ("xyzcal.mm", "xyzcal.px", "s1", "entering", "delpsical.rad"):
        if key not in work:
            continue
        if key not in table:
            col = work[key]
            table[key] = type(col)(len(table))
        table[key].set_selected(sel, work[key])
    for flag in (table.flags.used_in_refinement, table.flags.centroid_outlier):
        full = flex.bool(len(table), False)
        full.set_selected(sel, work.get_flags(flag))
        table.unset_flags(sel, flag)
        table.set_flags(full, flag)
