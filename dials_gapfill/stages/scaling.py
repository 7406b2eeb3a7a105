"""Optional scaling stage: all blocks scaled together as one crystal, in process.

1. Symmetry: when indexing ran in P1 (no indexing.known_symmetry), the Laue
   group and space group are found by dials.symmetry itself
   (dials.command_line.symmetry.symmetry: Laue group analysis on the minimum
   cell, then the systematic-absence check). It returns nothing but writes its
   results, so they are read back from a temporary directory.
2. Scaling: DIALS' ScalingAlgorithm (what dials.scale runs) on all blocks at
   once: one set of merged intensities, a scaling model per block (each block
   is a scan).
3. Resolution limit (as xia2): unless scaling.d_min is given, CC½ in
   resolution bins is fitted as dials.estimate_resolution does (DIALS'
   Resolutionizer, tanh fit) and the limit is where the fit falls to
   scaling.resolution.cc_half. Neither DIALS nor xia2 has a criterion for the
   detector corners other than an absolute completeness
   (scaling.resolution.completeness, off by default), which cannot tell a
   corner shell from a short sweep; so, from that limit inward, the limit is
   the highest resolution at which the merging table's outer shell is at
   least scaling.resolution.completeness_falloff as complete as the median of
   its other shells (counted as iotbx counts the table). When that cuts data,
   the blocks are scaled again with that limit (cut_data.d_min), so the scale
   model, merging statistics, scaled.mtz and merged.mtz all end at the same
   d_min, and the criterion is checked on the table that came out.
4. scaled.mtz (unmerged, DIALS' export_mtz with the scaled intensities, BATCH
   = image number) and merged.mtz (dials.merge's merge_data_to_mtz), and the
   merging statistics (overall / inner / outer shell, DIALS' table_1_stats)
   for the summary.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import statistics
import tempfile
import typing
import warnings

import iotbx.mtz
import numpy
from cctbx import miller, sgtbx, uctbx
from dials.algorithms.scaling.algorithm import ScalingAlgorithm
from dials.algorithms.scaling.scaling_library import determine_best_unit_cell, scaled_data_as_miller_array
from dials.array_family import flex
from dials.command_line.export import export_mtz, export_shelx
from dials.command_line.export import phil_scope as export_phil
from dials.command_line.merge import merge_data_to_mtz
from dials.command_line.merge import phil_scope as merge_phil
from dials.command_line.scale import phil_scope as scale_phil
from dials.command_line.symmetry import phil_scope as symmetry_phil
from dials.command_line.symmetry import symmetry
from dials.report.analysis import table_1_stats
from dials.util import resolution_analysis
from dials.util.resolution_analysis import interpolate_value, metrics
from dxtbx.model import Experiment, ExperimentList
from scitbx import matrix

from dials_gapfill import dials_compat
from dials_gapfill.errors import GapfillError, dials_exit, one_line
from dials_gapfill.model.state import Record, block_names
from dials_gapfill.model.tables import keep_experiments
from dials_gapfill.phil import defaults
from dials_gapfill.report.merging import LABELS
from dials_gapfill.util import esd_decimals

logger = logging.getLogger("dials.process_gapped.scaling")


def _tables_by_experiment(experiments, joint):
    """One reflection table per experiment, in the order of experiments (as
    dials.symmetry and dials.estimate_resolution read them)."""
    return [joint.select_on_experiment_identifiers([exp.identifier]) for exp in experiments]


# dials.symmetry's likelihood of its best Laue group below which the choice is
# reported as uncertain: less likely than all the other candidates together
LAUE_LIKELIHOOD_WARN = 0.5


def determine_symmetry(experiments, reflections):
    """(experiments, reflections) reindexed into the best space group, and a
    record {laue_group, space_group, cb_op, determined}.

    dials.symmetry's symmetry() with its default parameters; its log (the
    Laue group table, the absences) goes to the log file. The input is not
    changed.
    """
    params = defaults(symmetry_phil)
    params.output.html = None
    work = copy.deepcopy(experiments)  # symmetry() moves them to the minimum cell
    tables = _tables_by_experiment(experiments, reflections)
    with tempfile.TemporaryDirectory(prefix="dials_gapfill_symmetry_") as tmp:
        out = params.output
        out.experiments = os.path.join(tmp, "symmetrized.expt")
        out.reflections = os.path.join(tmp, "symmetrized.refl")
        out.json = os.path.join(tmp, "dials.symmetry.json")
        with dials_compat.symmetry_and_merging_without_tracebacks(), dials_compat.screw_axes_scored() as axes:
            symmetry(work, tables, params)
        reindexed = ExperimentList.from_file(out.experiments, check_format=False)
        joint = flex.reflection_table.from_file(out.reflections)
        with open(out.json) as fh:
            best = json.load(fh)["subgroup_scores"][0]
    for exp, new in zip(work, reindexed):
        exp.crystal = new.crystal
    space_group = work[0].crystal.get_space_group()
    record = {
        "laue_group": str(space_group.build_derived_patterson_group().info()),
        "space_group": str(space_group.info()),
        # from the integrated indices to the scaled ones (dials.symmetry's
        # subgroup table gives it from its minimum cell)
        "cb_op": reindexing_operator(experiments[0].crystal, work[0].crystal) or best["cb_op"],
        "determined": True,
        "likelihood": best["likelihood"],
        # screw axes of which no reflection of the class they extinguish was
        # measured: the data do not tell them from a 2-, 3-, 4- or 6-fold axis
        "screw_axes_undetermined": [name for name, _, absent in axes if absent == 0],
    }
    logger.info(
        "Laue group %s (likelihood %.3f, confidence %.3f), space group %s, reindexing %s",
        record["laue_group"], best["likelihood"], best["confidence"], record["space_group"], record["cb_op"],
    )
    return work, joint, record


def reindexing_operator(before, after) -> str | None:
    """The change of basis (as a,b,c) taking the Miller indices of crystal
    `before` to those of `after`, the same lattice in the same frame: h' = M h
    with M = A_after^-1 A_before; None where M is not integral."""
    m = matrix.sqr(after.get_A()).inverse() * matrix.sqr(before.get_A())
    rounded = matrix.sqr([round(x) for x in m.elems])
    if max(abs(a - b) for a, b in zip(m.elems, rounded.elems)) > 0.05 or rounded.determinant() == 0:
        return None
    den = 12  # (the inverse of a centring's M has halves and thirds)
    r = rounded.transpose().inverse()
    op = sgtbx.change_of_basis_op(sgtbx.rt_mx(sgtbx.rot_mx([round(x * den) for x in r.elems], den),
                                              sgtbx.tr_vec((0, 0, 0), den * 12)))
    return op.as_abc()


def _scale_params(params, d_min=None, model=None):
    sp = defaults(scale_phil)
    sp.anomalous = params.scaling.anomalous
    model = model or params.scaling.model
    if model != "auto":
        sp.model = model
    if d_min:
        sp.cut_data.d_min = d_min
    sp.output.html = None
    sp.output.json = None
    sp.output.delete_integration_shoeboxes = True
    return sp


def check_blocks(n_blocks, params) -> None:
    """Refuse KB for one block: KB scales each block relative to the others,
    and one block's scale and B are undetermined.  DIALS 3.12 goes on and
    diverges (weak simulated sweep: I/σ 0.15 against 32 with the physical
    model); later DIALS refuses it (dials/dials#2974)."""
    if params.scaling.run and params.scaling.model == "KB" and n_blocks < 2:
        raise GapfillError(
            "scaling.model=KB needs two or more blocks or sweeps (a scale and B for each, relative to the "
            "others), and this run has one: use scaling.model=auto or physical"
        )


def check_d_min(reflections, d_min) -> None:
    """Refuse a scaling.d_min that leaves no integrated reflection: DIALS'
    scaler then drops every block and stops on its own empty list (an
    IndexError in DIALS 3.12)."""
    if not d_min or "d" not in reflections:
        return
    d = reflections["d"].select(reflections.get_flags(reflections.flags.integrated, all=False))
    if len(d) and flex.max(d) < d_min:
        raise GapfillError(
            f"scaling.d_min={d_min:g} leaves no reflection: the integrated data reach from "
            f"{flex.max(d):.2f} to {flex.min(d):.2f} A; give a scaling.d_min below {flex.max(d):.2f}"
        )


def cc_half_threshold(params):
    """scaling.resolution.cc_half (None: no CC1/2 criterion)."""
    return params.scaling.resolution.cc_half


def data_d_min(experiments, joint) -> float | None:
    """The highest resolution among the reflections used in scaling."""
    good = joint.select(~joint.get_flags(joint.flags.bad_for_scaling, all=False))
    if not len(good):
        return None
    return min(determine_best_unit_cell(experiments).d(good["miller_index"]))


def _resolutionizer(experiments, joint, cc_half=None, completeness=None):
    """DIALS' Resolutionizer on the scaled reflections, as
    dials.estimate_resolution sets it up (its defaults, these criteria)."""
    rp = resolution_analysis.phil_defaults.extract().resolution
    rp.cc_half = cc_half
    rp.completeness = completeness
    return resolution_analysis.Resolutionizer.from_reflections_and_experiments(
        _tables_by_experiment(experiments, joint), experiments, rp
    )


def estimate_resolution(experiments, joint, cc_half):
    """(d_min, crossed): where DIALS' CC½ fit falls to cc_half.

    DIALS' Resolutionizer on the scaled reflections, exactly as
    dials.estimate_resolution runs it (tanh fit, half-dataset CC½, up to 100
    bins of at least 10 reflections, Wilson outliers with E² > 16 left out,
    bins whose CC½ is not significant not fitted), and DIALS' interpolation
    of the fitted curve. One difference: when every significant bin's
    observed CC½ is above cc_half, dials.estimate_resolution returns the last
    significant bin even if the fitted curve crosses cc_half well before it;
    on sparse data that bin is an isolated noisy one (weak simulated sweep:
    2.55 Å with outer-shell CC½ 0.20 and I/σ 0.2, where the fit crosses 0.3 at
    3.0 Å), so the crossing of the fit is used whenever there is one.
    crossed is False when the fit stays above cc_half: then d_min is DIALS'
    answer, the last bin where CC½ is significant (beyond it, too few repeated
    observations). Raises RuntimeError when nothing can be fitted or CC½ is
    below cc_half everywhere (no limit can be chosen).
    """
    result = _resolutionizer(experiments, joint, cc_half=cc_half).resolution(metrics.CC_HALF, limit=cc_half)
    if len(result.y_obs) and max(result.y_obs) < cc_half:
        raise RuntimeError(f"CC½ is below {cc_half:g} in every resolution bin")
    y_fit = result.y_fit
    if y_fit is not None and len(y_fit) and min(y_fit) < cc_half < max(y_fit):
        d_star_sq = interpolate_value(result.d_star_sq, y_fit, cc_half)
        if d_star_sq:
            return 1 / math.sqrt(d_star_sq), True
    return result.d_min, False


def misigma_threshold(params):
    """scaling.resolution.misigma (None: data beyond the last bin where CC½
    can be measured are cut)."""
    return getattr(params.scaling.resolution, "misigma", None)


def estimate_resolution_misigma(experiments, joint, misigma):
    """d_min where DIALS' fit of merged <I/σ(I)> against resolution (as
    dials.estimate_resolution misigma=) falls to `misigma`; the edge of the
    data when every bin is above it; None when the fit does not cross."""
    return _resolutionizer(experiments, joint).resolution(metrics.MISIGMA, limit=misigma).d_min


def completeness_threshold(params):
    """scaling.resolution.completeness (None: not used)."""
    return params.scaling.resolution.completeness


def estimate_resolution_completeness(experiments, joint, completeness):
    """d_min where DIALS' completeness fit (as dials.estimate_resolution
    completeness=...) falls to `completeness` (a fraction), or None."""
    resolutionizer = _resolutionizer(experiments, joint, completeness=completeness)
    return resolutionizer.resolution(metrics.COMPLETENESS, limit=completeness).d_min


def falloff_threshold(params):
    """scaling.resolution.completeness_falloff (None: not used)."""
    return getattr(params.scaling.resolution, "completeness_falloff", None)


def table_nbins(params) -> int:
    """The number of shells of the merging table (dials.scale's output.merging.nbins)."""
    return _scale_params(params).output.merging.nbins


def table_completeness(experiments, joint, n_bins):
    """A function d_min -> (the completeness, as fractions, of each of the
    n_bins shells of the merging table of the scaled data cut at d_min, or
    None when a shell is empty; the number of unique reflections kept).

    Counted as iotbx's merging statistics (the table dials.scale prints)
    count them, to the last digit: the unique reflections of DIALS' scaled
    miller array (not bad for scaling, positive scales, best cell,
    non-anomalous); cctbx's equal-volume shells over the range of the data
    kept; in each shell, the observed unique reflections over the complete
    set from the shell's low-resolution limit to its highest-resolution
    observation. In numpy: merging statistics for every candidate cut would
    take seconds each on a large sweep.
    """
    array = scaled_data_as_miller_array([joint], experiments, best_unit_cell=determine_best_unit_cell(experiments))
    unique = array.as_non_anomalous_set().map_to_asu().unique_under_symmetry()
    unit_cell = unique.unit_cell()
    observed = numpy.sort(numpy.array(unique.d_star_sq().data()))
    possible = numpy.sort(numpy.array(unique.complete_set(d_min=1 / math.sqrt(observed[-1])).d_star_sq().data()))
    d_max = 1 / math.sqrt(observed[0])

    def shells(d_min):
        kept = observed[: numpy.searchsorted(observed, (1 + 1e-9) / d_min**2, side="right")]
        if len(kept) < n_bins:
            return None, len(kept)
        limits = numpy.array(miller.binning(unit_cell, n_bins, d_max, 1 / math.sqrt(kept[-1])).limits())
        which = numpy.searchsorted(limits, kept, side="right") - 1
        completeness = []
        for i in range(n_bins):
            in_shell = kept[which == i]
            if not len(in_shell):
                return None, len(kept)
            top = min(limits[i + 1], in_shell[-1]) * (1 + 1e-6)
            n_possible = numpy.count_nonzero((possible >= limits[i]) & (possible <= top))
            completeness.append(min(len(in_shell) / n_possible, 1.0))
        return completeness, len(kept)

    return shells


# The resolution steps tried by the completeness-falloff criterion: 0.5 % in d
# (1.5 % of the volume of reciprocal space), rounded to the 0.01 Å printed and
# applied; and the largest fraction of the unique reflections it may leave
# out. The sparse shells of the detector corners hold few reflections, so a
# cut there leaves out few; completeness that falls over most of the data is
# the geometry of the experiment (e.g. a detector at a 2θ offset), not
# corners to trim.
FALLOFF_STEP = 1.005
FALLOFF_MAX_LOSS = 0.5


def completeness_falloff(shells, fraction, d_from):
    """{"d_min", "outer", "median"}: the highest resolution d_min >= d_from
    (in steps of FALLOFF_STEP) at which the merging table's outer shell is at
    least `fraction` as complete as the median of its other shells (outer,
    median: those completenesses, as fractions). shells: table_completeness().
    d_min None (and "why") when the shells cannot be counted or no cut that
    leaves out at most FALLOFF_MAX_LOSS of the unique reflections gets there.

    The median of the other shells, not their mean nor the first shells:
    the first shell loses reflections to the beam stop and the blind region,
    and the shells next to the outer one may already be partly in the
    corners; the median is the completeness the sweep reaches where the
    detector records whole shells. The table's own shells (equal volume, as
    dials.scale's), because that is the table the limit is for.
    """
    d_min = d_from
    _, n_all = shells(d_from)
    while True:
        completeness, n_kept = shells(d_min)
        if completeness is None:
            why = f"completeness falloff not measured (a shell of the table to {d_min:.2f} Å holds no reflection)"
            return {"d_min": None, "why": why}
        if n_kept < (1 - FALLOFF_MAX_LOSS) * n_all:
            return {
                "d_min": None,
                "why": "completeness falls over most of the data (no falloff limit: it would leave "
                f"out more than {FALLOFF_MAX_LOSS:.0%} of the unique reflections)",
            }
        median = statistics.median(completeness[:-1])
        if median > 0 and completeness[-1] >= fraction * median:
            return {"d_min": d_min, "outer": completeness[-1], "median": median}
        d_min = round(max(d_min * FALLOFF_STEP, d_min + 0.01), 2)


def choose_resolution(params, experiments, joint) -> dict:
    """The high resolution limit to apply after a first scaling of all data.

    Returns {"d_min": limit or None (no cut), "method": "user" | "cc_half" |
    "misigma" | "completeness" | "completeness_falloff" | "none", "cc_half":
    threshold, "d_min_data": highest resolution of the scaled data, "d_min_fit"
    (CC½), "d_min_misigma" (where CC½ cannot be measured beyond d_min_fit),
    "crossed", "message": one line saying the limit and why}. Of several
    criteria the lowest-resolution limit is taken (as
    dials.estimate_resolution does); the completeness falloff is applied last,
    from that limit inward, so the chosen table always meets it.
    """
    user = params.scaling.d_min
    d_data = data_d_min(experiments, joint)
    threshold = cc_half_threshold(params)
    completeness = completeness_threshold(params)
    falloff = falloff_threshold(params)
    out = {"d_min": None, "method": "none", "cc_half": threshold, "d_min_data": d_data}
    if completeness is not None:
        out["completeness"] = completeness
    if falloff is not None:
        out["completeness_falloff"] = falloff
    if user:
        out.update(d_min=user, method="user", message=f"d_min {user:.2f} Å from scaling.d_min")
        return out
    edge = f"all data to {d_data:.2f} Å" if d_data else "all data"
    candidates = []  # (d_min, method, why, crossed), d_min as applied (0.01 Å)
    notes = []
    if threshold is None:
        notes.append("no CC½ limit (scaling.resolution.cc_half=None)")
    else:
        try:
            d_fit, crossed = estimate_resolution(experiments, joint, threshold)
        except (RuntimeError, ValueError, AssertionError, ZeroDivisionError) as e:
            d_fit, crossed = None, False
            notes.append(f"no CC½ limit ({' '.join(str(e).split())[:100]})")
        else:
            out["d_min_fit"] = d_fit
            if d_fit is None:
                notes.append(
                    f"the CC½ fit does not cross {threshold:g} (CC½ too noisy or too few "
                    "repeated observations)"
                )
            elif d_data is None or d_fit <= d_data * 1.001:
                notes.append(f"CC½ stays above {threshold:g} to the edge of the data")
            elif crossed:
                candidates.append((round(d_fit, 2), "cc_half", f"from CC½ fit = {threshold:g}", True))
            else:
                candidates.extend(_beyond_cc_half(params, experiments, joint, d_fit, d_data, threshold, out, notes))
    if completeness is not None:
        try:
            d_c = estimate_resolution_completeness(experiments, joint, completeness)
        except (RuntimeError, ValueError, AssertionError, ZeroDivisionError) as e:
            d_c = None
            notes.append(f"completeness fit failed ({' '.join(str(e).split())[:80]})")
        out["d_min_completeness"] = d_c
        if d_c and d_data and d_c > d_data * 1.001:
            candidates.append((round(d_c, 2), "completeness", f"from completeness fit = {completeness:g}", None))
        elif d_c is not None:
            notes.append(f"completeness stays above {completeness:g} to the edge of the data")
    if falloff is not None and d_data:
        # from the limit of the other criteria inward: whichever wins, the
        # table's outer shell meets this one
        d_from = max([c[0] for c in candidates] + [d_data])
        try:
            found = completeness_falloff(table_completeness(experiments, joint, table_nbins(params)), falloff, d_from)
        except (RuntimeError, ValueError, AssertionError, ZeroDivisionError, IndexError) as e:
            found = {"d_min": None, "why": f"completeness falloff not measured ({' '.join(str(e).split())[:80]})"}
        if found["d_min"] is None:
            notes.append(found["why"])
        out["d_min_falloff"] = d_f = found["d_min"]
        if d_f is not None:
            out.update(outer_completeness=100 * found["outer"], inner_median_completeness=100 * found["median"])
            if d_f > d_from:
                candidates.append((d_f, "completeness_falloff", falloff_reason(falloff, found), None))
            elif not candidates:
                notes.append(f"completeness does not fall off towards the edge ({falloff_shells(found)})")
    if not candidates:
        out["message"] = f"no resolution cut: {'; '.join(notes) or 'no criterion'}; {edge}"
        return out
    d_min, method, why, crossed = max(candidates)
    out.update(d_min=d_min, method=method, message=f"d_min {d_min:.2f} Å {why}; data extend to {d_data:.2f} Å")
    if crossed is not None:
        out["crossed"] = crossed
    return out


def _beyond_cc_half(params, experiments, joint, d_fit, d_data, threshold, out, notes) -> list:
    """The limit where CC½ stays above `threshold` as far as it can be
    measured (to d_fit) and beyond it too few reflections are repeated: the
    candidates of choose_resolution.

    Few repeats say nothing about the quality of the data (sparse
    small-molecule wedges: most reflections measured once, strong to the
    edge of the detector), so beyond d_fit merged <I/σ(I)> decides, as
    dials.estimate_resolution misigma= (xia2's former criterion, 1.0): the
    data are kept as far as its fit stays above scaling.resolution.misigma.
    None: cut at d_fit (dials.estimate_resolution's answer for CC½ alone).
    """
    why = f"where CC½ can last be measured (above {threshold:g} up to there; beyond, too few repeated observations)"
    misigma = misigma_threshold(params)
    if misigma is None:
        return [(round(d_fit, 2), "cc_half", why, False)]
    try:
        d_i = estimate_resolution_misigma(experiments, joint, misigma)
    except (RuntimeError, ValueError, AssertionError, ZeroDivisionError) as e:
        notes.append(f"merged <I/σ> fit failed ({' '.join(str(e).split())[:80]})")
        return [(round(d_fit, 2), "cc_half", why, False)]
    out["d_min_misigma"] = d_i
    if d_i is None or d_i >= d_fit:
        return [(round(d_fit, 2), "cc_half", f"{why}, where merged <I/σ> falls below {misigma:g} too", False)]
    beyond = (f"CC½ above {threshold:g} as far as it can be measured ({d_fit:.2f} Å); beyond, too few "
              "repeated observations")
    if d_data is None or d_i <= d_data * 1.001:
        notes.append(f"{beyond}, and merged <I/σ> above {misigma:g} to the edge of the data")
        return []
    return [(round(d_i, 2), "misigma", f"from merged <I/σ> fit = {misigma:g} ({beyond})", None)]


def falloff_shells(found) -> str:
    return f"outer shell {100 * found['outer']:.0f} % complete, the inner shells' median {100 * found['median']:.0f} %"


def falloff_reason(falloff, found) -> str:
    return f"from completeness falloff = {falloff:g} ({falloff_shells(found)}; beyond, the detector corners)"


def recheck_falloff(params, resolution, experiments, joint, move=True) -> bool:
    """After scaling again with the limit: the completeness-falloff criterion
    on the table that came out, whose numbers are recorded. Outlier
    rejection in that scaling may leave out a few reflections the first
    scaling kept; if the outer shell then falls short (and `move`), the limit
    moves inward: resolution updated, True (scale again). False: the table
    meets the criterion, or the criterion is not used."""
    falloff = falloff_threshold(params)
    d_min = resolution.get("d_min")
    if falloff is None or d_min is None or resolution["method"] == "user":
        return False
    try:
        found = completeness_falloff(table_completeness(experiments, joint, table_nbins(params)), falloff, d_min)
    except (RuntimeError, ValueError, AssertionError, ZeroDivisionError, IndexError):
        return False
    if found["d_min"] is None:
        return False
    resolution.update(outer_completeness=100 * found["outer"], inner_median_completeness=100 * found["median"])
    if found["d_min"] <= d_min or not move:
        if resolution["method"] == "completeness_falloff":  # the numbers of the table printed
            resolution["message"] = (
                f"d_min {d_min:.2f} Å {falloff_reason(falloff, found)}; "
                f"data extend to {resolution['d_min_data']:.2f} Å"
            )
        return False
    logger.info(
        "After scaling again the outer shell at %.2f Å falls short of the completeness falloff: %.2f Å",
        d_min, found["d_min"],
    )
    resolution.update(
        d_min=found["d_min"], d_min_falloff=found["d_min"], method="completeness_falloff",
        message=f"d_min {found['d_min']:.2f} Å {falloff_reason(falloff, found)}; "
        f"data extend to {resolution['d_min_data']:.2f} Å",
    )
    resolution.pop("crossed", None)
    return True


# How often the limit may move inward after scaling again (recheck_falloff),
# each time one more scaling. The reflections of one scaling and the next
# differ only by outlier rejection: the simulated sweeps of the tests never
# needed a move.
RECHECKS = 2


# statistics that need repeated observations: undefined (None, shown "-") in a
# shell where every unique reflection was measured once (iotbx reports 0)
NEED_PAIRS = ("cc_half", "r_merge", "r_meas", "r_pim")


def merging_summary(stats, anom=None) -> dict:
    """The merging statistics of the summary: DIALS' table_1_stats (the
    numbers of dials.scale's summary table) as {key: [overall, inner shell,
    outer shell]}, and "shells", one dict per resolution shell."""
    table = table_1_stats(stats, anom)
    out = {
        key: list(table.get(label, [None] * 3))
        for key, label in LABELS.items()
        if anom is not None or not key.startswith("anomalous")
    }
    for key in NEED_PAIRS:
        out[key] = [None if n <= u else v for v, n, u in zip(out[key], out["n_obs"], out["n_unique"])]
    # a CC½ over fewer than three reflections is no correlation (iotbx reports
    # 0 for one; over two it is ±1 whatever the data)
    if "cc_half" in out:
        parts = (stats.overall, stats.bins[0], stats.bins[-1])
        out["cc_half"] = [None if getattr(b, "cc_one_half_n_refl", 3) < 3 else v
                          for v, b in zip(out["cc_half"], parts)]
    out["shells"] = []
    for b in stats.bins:
        shell = {
            "d_max": b.d_max, "d_min": b.d_min, "n_obs": b.n_obs, "n_unique": b.n_uniq,
            "completeness": 100 * b.completeness, "multiplicity": b.mean_redundancy,
            "i_over_sigma": b.i_over_sigma_mean, "cc_half": b.cc_one_half,
            "r_merge": b.r_merge, "r_pim": b.r_pim,
        }
        if b.n_obs <= b.n_uniq:
            shell.update({key: None for key in NEED_PAIRS if key in shell})
        elif getattr(b, "cc_one_half_n_refl", 3) < 3:
            shell["cc_half"] = None
        out["shells"].append(shell)
    return out


# Differences between repeated measurements per scale parameter below which
# the merging statistics are flagged: fitting p parameters to m differences
# shrinks their spread by sqrt(1 - p/m), 11 % at 5 per parameter, and the
# R-factors and CC½ then describe the fit more than the data.
DIFFERENCES_PER_PARAMETER = 5


def few_differences(summary) -> str | None:
    """The warning when the merging statistics rest on too few repeated
    measurements for the scale parameters fitted to those same measurements
    (sparse wedges: a CC½ of 0.999 from 9 pairs and 20 parameters), else None."""
    parameters = (summary.get("model") or {}).get("parameters")
    n_obs, n_unique = (summary.get("n_obs") or [None])[0], (summary.get("n_unique") or [None])[0]
    if not parameters or n_obs is None or n_unique is None:
        return None
    differences = n_obs - n_unique
    if differences >= DIFFERENCES_PER_PARAMETER * parameters:
        return None
    return (
        f"the merging statistics rest on {differences} repeated measurements (observations beyond the first of "
        f"each reflection), and the {parameters} scale parameters of the "
        f"{summary.get('blocks', '?')} blocks were fitted to them: CC½ and the R-factors describe that fit, "
        f"not the data's agreement (fewer than {DIFFERENCES_PER_PARAMETER} per parameter); more images or "
        "sweeps give an independent measure"
    )


class _Scaled(typing.NamedTuple):
    """One run of DIALS' ScalingAlgorithm: its parameters, merging statistics,
    scaled experiments and joint table, and what the summary counts."""

    params: object
    stats: object
    anom: object
    experiments: ExperimentList
    joint: flex.reflection_table
    counts: dict


def _run_scaling(params, d_min, experiments, reflections, model=None) -> _Scaled:
    """DIALS' ScalingAlgorithm on all blocks (as dials.scale runs it)."""
    sp = _scale_params(params, d_min, model)
    try:
        algorithm = ScalingAlgorithm(sp, experiments, [reflections])
        algorithm.run()
        stats, anom = algorithm.merging_statistics_result, algorithm.anom_merging_statistics_result
        cutoff = sp.cut_data.small_scale_cutoff
        small = sum((t["inverse_scale_factor"] < cutoff).count(True) for t in algorithm.reflections)
        experiments, joint = algorithm.finish()
    except (ValueError, RuntimeError, AssertionError, IndexError, SystemExit) as e:
        # (IndexError: DIALS 3.12's scaler when its cuts left no block;
        # SystemExit: its reflection selection and scaler exit, e.g. when
        # no reflection is measured twice)
        if isinstance(e, SystemExit) and not dials_exit(e):
            raise
        within, smaller = "", ""
        if params.scaling.d_min:
            n = None
            if "d" in reflections:
                integrated = reflections.get_flags(reflections.flags.integrated, all=False)
                n = (integrated & (reflections["d"] >= params.scaling.d_min)).count(True)
            within = f" with scaling.d_min={params.scaling.d_min:g}"
            within += f" ({n} integrated reflections within it)" if n is not None else ""
            smaller = "give a smaller scaling.d_min, or "
        raise GapfillError(
            f"scaling failed{within}: {one_line(e, 200).rstrip('.')}: {smaller}run without scaling.run "
            "and scale integrated.expt/integrated.refl with dials.scale"
        ) from None
    counts = {
        "used": ", ".join(sorted({e.scaling_model.id_ for e in experiments})),  # DIALS' auto: KB below 1 deg
        "small_scales": small,
        "kept": (~joint.get_flags(joint.flags.bad_for_scaling, all=False)).count(True),
        "parameters": sum(c.n_params for e in experiments for c in e.scaling_model.components.values()),
    }
    return _Scaled(sp, stats, anom, experiments, joint, counts)


def _symmetry(experiments, reflections, params, record):
    """(experiments, reflections, symmetry): as dials.symmetry finds it, from
    the intensities, unless the space group was given; a Bravais lattice
    chosen at indexing (indexing.bravais_lattice) is a lattice's symmetry,
    which the intensities may not have (a monoclinic crystal with beta near
    90 deg, indexed oP), so dials.symmetry judges that too, as xia2 runs it
    after integration whatever the indexing."""
    symmetry = {
        "space_group": str(experiments[0].crystal.get_space_group().info()),
        "determined": False,
    }
    if params.indexing.known_symmetry.space_group is not None:
        return experiments, reflections, symmetry
    logger.info("Determining the Laue group and space group (as dials.symmetry)")
    try:
        try:
            experiments, reflections, symmetry = determine_symmetry(experiments, reflections)
        except ValueError as e:
            if "no reflection after prefiltering" not in str(e):
                raise
            experiments, reflections, symmetry = _symmetry_of_the_blocks_with_data(experiments, reflections, e)
    except (ValueError, RuntimeError, AssertionError, IndexError, SystemExit) as e:
        if isinstance(e, SystemExit) and not dials_exit(e):
            raise
        record.warn(f"symmetry determination failed ({one_line(e, 200)}); scaling in P1")
        logger.warning("Symmetry determination failed (%s); scaling in P 1", one_line(e, 200))
    else:
        if symmetry["likelihood"] < LAUE_LIKELIHOOD_WARN:
            # dials.symmetry takes its best candidate however weak; on a few
            # dozen reflections (sparse wedges) it is close to a guess
            msg = (
                f"the Laue group {symmetry['laue_group']} is uncertain (dials.symmetry's likelihood "
                f"{symmetry['likelihood']:.2f}): the merging statistics assume it; give "
                "indexing.known_symmetry.space_group= if it is known"
            )
            record.warn(msg)
            logger.warning("Warning: %s", msg)
        undetermined = symmetry.get("screw_axes_undetermined")
        if undetermined:
            msg = (
                f"no reflection that screw axes {', '.join(undetermined)} would extinguish was measured: the "
                f"data do not tell them from plain rotation axes, so the space group {symmetry['space_group']} "
                "is one of several the intensities allow; give indexing.known_symmetry.space_group= if it is known"
            )
            record.warn(msg)
            logger.warning("Warning: %s", msg)
    return experiments, reflections, symmetry


def _symmetry_of_the_blocks_with_data(experiments, reflections, error):
    """dials.symmetry refuses a run in which one block has no reflection
    left by its filter (partiality >= 0.4: a block of an image or two of
    fine slices): the symmetry of the other blocks, applied to all blocks,
    as dials.symmetry applies it (crystals and indices reindexed).  `error`
    is raised again where no block, or every block, has such reflections."""
    usable = reflections.get_flags(reflections.flags.integrated, all=False) & (reflections["partiality"] >= 0.4)
    with_data = {e.identifier for i, e in enumerate(experiments) if (usable & (reflections["id"] == i)).count(True)}
    if not with_data or len(with_data) == len(experiments):
        raise error
    logger.info("dials.symmetry on the %d of %d blocks with reflections it can use, its result applied to all",
                len(with_data), len(experiments))
    sub_reflections, sub_experiments = keep_experiments(reflections, experiments, with_data)
    work, _, symmetry = determine_symmetry(sub_experiments, sub_reflections)
    op = sgtbx.change_of_basis_op(symmetry["cb_op"])
    found = {e.identifier: e.crystal for e in work}
    group, B = work[0].crystal.get_space_group(), work[0].crystal.get_B()
    out = copy.deepcopy(experiments)
    for exp in out:
        crystal = found.get(exp.identifier)
        if crystal is None:
            crystal = exp.crystal.change_basis(op)
            crystal.set_space_group(group)
            crystal.set_B(B)  # (the cell as symmetrized)
        exp.crystal = crystal
    table = copy.deepcopy(reflections)
    table["miller_index"] = op.apply(table["miller_index"])
    return out, table, symmetry


def _scale_choosing_the_model(params, d_min, unscaled, experiments, reflections):
    """(scaled, the model given to DIALS, the counts of the model replaced or
    None).  With scaling.model=auto and several blocks, DIALS' own choice is
    replaced by KB when that leaves fewer observations out for a scale
    factor below DIALS' small_scale_cutoff."""
    scaled = _run_scaling(params, d_min, experiments, reflections)
    if unscaled is None or scaled.counts["small_scales"] == 0:
        return scaled, None, None
    # DIALS' own sign that its model diverged: it leaves out every
    # observation whose scale factor came out below 0.001 and warns "it
    # may be best to rerun scaling".  A smooth scale and decay go there
    # only where too few, too rarely repeated observations leave them
    # free (sparse wedges); KB has two parameters per block.
    try:
        alternative = _run_scaling(params, d_min, *copy.deepcopy(unscaled), model="KB")
    except GapfillError as e:  # (the first scaling stands)
        logger.info("Scaling with KB instead failed: %s; DIALS' choice kept", e)
        return scaled, None, None
    if alternative.counts["small_scales"] < scaled.counts["small_scales"]:
        return alternative, "KB", scaled.counts
    return scaled, None, None


def _scale_at_the_limit(params, scaled, unscaled, model):
    """(scaled, resolution): the resolution limit chosen on the scaled data
    and, where a criterion set it, the blocks scaled again with it (the
    limit moving inward while the completeness falloff asks)."""
    resolution = choose_resolution(params, scaled.experiments, scaled.joint)
    if resolution["method"] in ("cc_half", "misigma", "completeness", "completeness_falloff"):
        # a scaling that fails at the limit leaves the one before it standing
        # (all data, or the limit before the falloff moved it inward)
        before = (scaled, None)
        for attempt in range(RECHECKS + 1):
            logger.info("Scaling again with the resolution limit: %s", resolution["message"])
            try:
                scaled = _run_scaling(params, resolution["d_min"], *copy.deepcopy(unscaled), model=model)
            except GapfillError as e:
                scaled, earlier = before
                failed = f"scaling again at {resolution['d_min']:.2f} A ({resolution['message']}) failed: {e}"
                resolution = earlier or dict(resolution, d_min=None, method="none",
                                             message="no resolution cut: scaling at the limit failed")
                resolution["rescale_failed"] = failed
                break
            at = copy.deepcopy(resolution)
            if not recheck_falloff(params, resolution, scaled.experiments, scaled.joint, move=attempt < RECHECKS):
                break
            before = (scaled, at)
    return scaled, resolution


def _model_summary(params, scaled, replaced, record) -> dict:
    """The JSON's scaling.model, with the warning when KB replaced DIALS' choice."""
    model = {"requested": params.scaling.model, **scaled.counts}
    if replaced is not None:
        model["replaced"] = replaced
        msg = (
            f"DIALS' scaling model ({replaced['used']}) diverged: {replaced['small_scales']} scale factors below "
            f"{scaled.params.cut_data.small_scale_cutoff:g} (left out), {replaced['kept']} observations kept; "
            f"scaled with KB instead (one scale and B per block: {scaled.counts['kept']} kept)"
        )
        record.warn(msg)
        logger.warning("Warning: %s", msg)
    elif scaled.counts.get("small_scales"):
        # kept (KB no better, or no other model to try): said, not only counted
        msg = (
            f"DIALS' scaling model ({scaled.counts.get('used')}) left out {scaled.counts['small_scales']} "
            f"observations whose scale factor came out below {scaled.params.cut_data.small_scale_cutoff:g}, "
            "DIALS' own sign of a model that diverged where too few repeated observations hold it"
            + (" (KB was no better)" if params.scaling.model == "auto" and len(scaled.experiments) > 1 else "")
        )
        record.warn(msg)
        logger.warning("Warning: %s", msg)
    return model


def _write_outputs(params, scaled, outputs, batch_offsets, esd, summary, record) -> None:
    """scaled.mtz, merged.mtz and (shelx) the SHELX pair, as dials.export and
    dials.merge write them from the scaled data."""
    sp, experiments, joint = scaled.params, scaled.experiments, scaled.joint
    for exp in experiments:  # (copies) BATCH = image number; blocks are separated by gaps
        exp.scan.set_batch_offset(0)
    ep = defaults(export_phil)
    ep.intensity = ["scale"]
    ep.mtz.partiality_threshold = sp.cut_data.partiality_cutoff
    if sp.cut_data.d_min:
        ep.mtz.d_min = sp.cut_data.d_min
    out = params.output
    offsets = [batch_offsets[e.identifier] for e in experiments] if batch_offsets else None
    in_order = dials_compat.in_mtz_batch_order(experiments, joint, offsets) if offsets else (experiments, joint, None)

    def write_unmerged(path):
        ep.mtz.hklout = path
        ordered, rows, ordered_offsets = in_order
        with dials_compat.mtz_batch_offsets(ordered_offsets) if ordered_offsets else contextlib.nullcontext(), \
                dials_compat.crystals_differ_explained():
            export_mtz(ep, dials_compat.models_to_export(ordered), [rows])

    n_scaled = iotbx.mtz.object(outputs.write(out.scaled_mtz, write_unmerged)).n_reflections()
    record.files.append({"name": out.scaled_mtz, "kind": "scaled unmerged mtz", "reflections": n_scaled})
    mp = defaults(merge_phil)
    mp.assess_space_group = False
    # dials.merge's default: I(+)/I(-), F(+)/F(-) and DANO beside the means
    # whatever scaling.anomalous (which is dials.scale's: how it scales)
    mp.anomalous = True
    mp.output.html = None
    mp.partiality_threshold = sp.cut_data.partiality_cutoff
    if sp.cut_data.d_min:
        mp.d_min = sp.cut_data.d_min
    with dials_compat.symmetry_and_merging_without_tracebacks():
        mtz = merge_data_to_mtz(mp, experiments, [joint])
    outputs.write(out.merged_mtz, lambda path: mtz.write(path))
    summary["merged_reflections"] = mtz.n_reflections()
    record.files.append({"name": out.merged_mtz, "kind": "merged mtz", "reflections": mtz.n_reflections()})
    if out.shelx:
        record.files.extend(write_shelx(ep, experiments, joint, out.shelx_name, outputs, esd))


def _left_out(identifiers, scaled, names, outputs, params, record) -> list[int]:
    """The blocks (numbers from 1, of the blocks' `identifiers`) DIALS'
    scaler removed for having no reflection it could scale (none left
    after its partiality, I/sigma and outlier cuts, or none linked to the
    other blocks): said, as they are in no file written from the scaled data."""
    kept = set(scaled.experiments.identifiers())
    gone = [k for k, ident in enumerate(identifiers, start=1) if ident not in kept]
    if gone:
        files = [params.output.scaled_mtz, params.output.merged_mtz]
        if params.output.shelx:
            files.append(f"{params.output.shelx_name}.hkl")
        where = f" (not in {', '.join(files)})" if outputs is not None else ""
        msg = (
            f"{', '.join(names[identifiers[k - 1]] for k in gone)}: no reflection DIALS' scaler could use "
            f"(none left by its cuts, or none shared with the other blocks): left out of the scaled data{where}"
        )
        record.warn(msg)
        logger.warning("Warning: %s", msg)
    return gone


def scale(experiments, reflections, params, outputs, batch_offsets=None, names=None):
    """Scale, merge and (if outputs) write scaled.mtz and merged.mtz:
    ((scaled experiments, reflections), Record).  batch_offsets: experiment
    identifier -> the MTZ batch offset of its sweep (several sweeps); names:
    identifier -> the block's name in messages (model.state.block_names)."""
    record = Record()
    names = names or block_names(experiments)
    experiments = copy.deepcopy(experiments)
    reflections = copy.deepcopy(reflections)
    integrated = experiments[0].crystal
    cells = numpy.array([e.crystal.get_unit_cell().parameters() for e in experiments])
    one_cell = numpy.ptp(cells, axis=0).max() < 1e-5  # the blocks share one cell (its esds: the crystal's)
    if "shoebox" in reflections:
        del reflections["shoebox"]
    experiments, reflections, symmetry = _symmetry(experiments, reflections, params, record)
    check_blocks(len(experiments), params)
    logger.info("Scaling %d block(s) in %s", len(experiments), symmetry["space_group"])
    user_d_min = params.scaling.d_min
    check_d_min(reflections, user_d_min)
    automatic = not user_d_min and any(
        t is not None for t in (cc_half_threshold(params), completeness_threshold(params), falloff_threshold(params))
    )
    may_fall_back = params.scaling.model == "auto" and len(experiments) > 1
    unscaled = (copy.deepcopy(experiments), copy.deepcopy(reflections)) if automatic or may_fall_back else None
    # DIALS' scaler removes blocks from the list it is given (their
    # experiment objects then no longer valid): the identifiers, kept first
    blocks = list(experiments.identifiers())
    scaled, model, replaced = _scale_choosing_the_model(
        params, user_d_min, unscaled if may_fall_back else None, experiments, reflections)
    scaled, resolution = _scale_at_the_limit(params, scaled, unscaled, model)
    unscaled = None  # (memory)
    model = _model_summary(params, scaled, replaced, record)
    if resolution.get("rescale_failed"):
        msg = f"{resolution.pop('rescale_failed')}; the scaled data of the scaling before it are kept"
        record.warn(msg)
        logger.warning("Warning: %s", msg)
    logger.info("Resolution limit: %s", resolution["message"])
    summary = {"symmetry": symmetry, "blocks": len(scaled.experiments), "model": model, "resolution": resolution,
               "blocks_left_out": _left_out(blocks, scaled, names, outputs, params, record)}
    summary["merged_reflections"] = None  # (counted where merged.mtz is written)
    if scaled.stats is not None:
        summary.update(merging_summary(scaled.stats, scaled.anom if params.scaling.anomalous else None))
        overall = summary["cc_half"][0]
        if overall is not None and overall < 0.3:
            msg = (
                f"the intensities hardly agree: overall CC½ {overall:.2f} (Rmerge "
                f"{summary['r_merge'][0]:.2f}) after scaling in {symmetry['space_group']}; "
                "read the other warnings, and check the space group"
            )
            record.warn(msg)
            logger.warning("Warning: %s", msg)
        msg = few_differences(summary)
        if msg:
            record.warn(msg)
            logger.warning("Warning: %s", msg)
    # the cell of the scaled data (the setting of scaled.mtz, merged.mtz and the
    # SHELX files) with the esds of the one cell all blocks share, in its basis
    summary["unit_cell"] = list(determine_best_unit_cell(scaled.experiments).parameters())
    summary["unit_cell_esd"] = cell_esd_in(integrated, scaled.experiments[0].crystal) if one_cell else None
    record.scaling = summary
    esd = summary["unit_cell_esd"] if params.output.shelx else None
    if outputs is not None:
        _write_outputs(params, scaled, outputs, batch_offsets, esd, summary, record)
    return (scaled.experiments, scaled.joint), record


def cell_esd_in(crystal, basis):
    """The esds of `crystal`'s cell in the basis of `basis` (the same
    lattice, e.g. as dials.symmetry reindexed it), or None when `crystal`
    has no covariance: dxtbx's change_basis, which dials.symmetry reindexes
    with, drops it.  First-order propagation of the covariance of B through
    the reciprocal metric tensor, as dxtbx's get_cell_parameter_sd does for
    an unchanged basis."""
    covariance = crystal.get_B_covariance()
    if not len(covariance):
        return None
    covariance = numpy.array(covariance).reshape(9, 9)
    # A = UB takes h to its reciprocal-lattice vector; in the new basis A' = A m
    m = numpy.linalg.inv(numpy.array(crystal.get_A()).reshape(3, 3)) @ numpy.array(basis.get_A()).reshape(3, 3)

    def cell(b):
        b = b.reshape(3, 3) @ m
        g = numpy.linalg.inv(b.T @ b)  # the metric tensor: the inverse of the reciprocal one
        return numpy.array(uctbx.unit_cell(metrical_matrix=(g[0, 0], g[1, 1], g[2, 2], g[0, 1], g[0, 2],
                                                            g[1, 2])).parameters())

    b = numpy.array(crystal.get_B())
    jacobian = numpy.empty((6, 9))
    for k in range(9):
        step = 1e-6 * max(abs(b[k]), 1e-3)
        up, down = b.copy(), b.copy()
        up[k] += step
        down[k] -= step
        jacobian[:, k] = (cell(up) - cell(down)) / (2 * step)
    esd = [float(e) for e in numpy.sqrt(numpy.diag(jacobian @ covariance @ jacobian.T))]
    # an angle the space group fixes (90 or 120 deg whatever the metric) has no esd
    space_group = basis.get_space_group()
    angles = [space_group.average_unit_cell(uctbx.unit_cell(p)).parameters()[3:]
              for p in ((7, 8, 9, 80, 85, 95), (6, 7.5, 10, 95, 100, 70))]
    for k in range(3):
        if abs(angles[0][k] - angles[1][k]) < 1e-6:
            esd[3 + k] = 0.0
    return esd


def _zerr_digits(ins, esd) -> None:
    """DIALS writes ZERR's esds with 4 decimals (lengths) and 3 (angles): an
    esd below half the last digit (an electron-diffraction cell's 0.00004 A)
    would read as 0, which SHELXL takes as an exact cell.  Such a line is
    written again with the digits the esds need."""
    decimals = [esd_decimals(e, 4) for e in esd[:3]] + [esd_decimals(e, 3) for e in esd[3:]]
    if decimals == [4, 4, 4, 3, 3, 3]:
        return
    with open(ins) as fh:
        lines = fh.readlines()
    for k, line in enumerate(lines):
        if line.startswith("ZERR"):
            z = line.split()[1]
            lines[k] = f"ZERR {float(z):8.3f} " + " ".join(f"{e:8.{d}f}" for e, d in zip(esd, decimals)) + "\n"
    with open(ins, "w") as fh:
        fh.writelines(lines)


def write_shelx(ep, experiments, joint, name, outputs, esd=None) -> list:
    """<name>.hkl and <name>.ins as dials.export format=shelx writes them from
    the scaled data: the reflections of scaled.mtz (ep: its export
    parameters, the same filters), intensities scaled to SHELX's fixed
    format, original indices (SHELX merges them itself); the files' entries
    for the summary.  esd: the esds of the one cell all blocks share, in the
    scaled basis, for the .ins file's ZERR line (DIALS writes it only for
    one cell with a covariance, which dials.symmetry's reindexing drops)."""
    hkl, ins = f"{name}.hkl", f"{name}.ins"
    if esd:
        best = determine_best_unit_cell(experiments)  # the cell of the .hkl's d-spacings, unchanged
        copies = ExperimentList()  # the crystals copied (a scaling model cannot be)
        for exp in experiments:
            crystal = copy.deepcopy(exp.crystal)
            crystal.set_recalculated_unit_cell(best)
            crystal.set_recalculated_cell_parameter_sd(esd)
            copies.append(Experiment(beam=exp.beam, detector=exp.detector, goniometer=exp.goniometer,
                                     scan=exp.scan, crystal=crystal, imageset=exp.imageset,
                                     identifier=exp.identifier))
        experiments = copies

    def write_both(path):
        ep.shelx.hklout, ep.shelx.ins = path, outputs.path(ins)
        try:
            export_shelx(ep, experiments, [joint])
        except (ValueError, AssertionError, RuntimeError) as e:
            raise GapfillError(f"SHELX export failed: {one_line(e, 200)}: run without "
                               "output.shelx and export scaled.mtz") from None
        if esd:
            _zerr_digits(ep.shelx.ins, esd)

    written = outputs.write(hkl, write_both)
    outputs.write(ins, lambda path: None)  # written with the .hkl file, to this path
    with open(written) as fh:  # the reflections, and the 0 0 0 line that ends them
        n = sum(1 for line in fh if line[:12].split() != ["0", "0", "0"])
    return [{"name": hkl, "kind": "shelx hkl", "reflections": n}, {"name": ins, "kind": "shelx ins"}]


def run(state) -> Record:
    offsets = None
    if state.sweeps is not None:  # (as the export numbers them)
        by_sweep = state.sweeps.batch_offsets()
        offsets = {e.identifier: by_sweep[state.sweeps.sweep_of(e).number] for e in state.experiments}
    with warnings.catch_warnings():
        # DIALS 3.12's scaler uses pandas' deprecated iteritems: a FutureWarning
        # per call, on stderr of whatever program calls this
        warnings.simplefilter("ignore", FutureWarning)
        state.scaled, record = scale(state.experiments, state.reflections, state.params, state.outputs, offsets,
                                     block_names(state.experiments, state.sweeps))
    return record
