"""Integration stage: DIALS' run_integration over all blocks at once.

When every block has enough strong spots for its own profile model this is
exactly ``dials.integrate``.  Blocks below DIALS' profile-modelling minimum
(``profile.gaussian_rs.min_spots``) would stop dials.integrate
("Too few reflections for profile modelling"); here they either take the
profile model pooled over all blocks (sigma_b and sigma_m averaged, weighted
by spot count) or are integrated by summation only, as chosen by
``integration.small_blocks.profile``.  The choice is logged per block.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import re
import signal

import dials.extensions
import numpy as np
from dxtbx.model.experiment_list import ExperimentList

from dials.array_family import flex
from dials.command_line.integrate import (
    filter_reference_pixels,
    process_reference,
    run_integration,
)
from dials.constants import EPS, FULL_PARTIALITY
from libtbx import easy_mp

from dials_gapfill import cluster, dials_compat
from dials_gapfill.errors import GapfillError
from dials_gapfill.model.state import Record, block_names
from dials_gapfill.model.tables import join_blocks, keep_experiments
from dials_gapfill.phil import dials_integrate_params

logger = logging.getLogger("dials.process_gapped.integration")


def _reference_counts(reference, experiments):
    """Usable reference spots per experiment (as DIALS' process_reference keeps)."""
    sel = reference.get_flags(reference.flags.indexed)
    sel &= ~reference.get_flags(reference.flags.bad_for_refinement, all=False)
    sel &= reference["miller_index"] != (0, 0, 0)
    ids = reference["id"].select(sel)
    return [int((ids == i).count(True)) for i in range(len(experiments))]


def _too_few(n, exp, gaussian_rs) -> bool:
    """DIALS' own test in gaussian_rs Model.create_from_reflections."""
    if n >= gaussian_rs.min_spots.overall:
        return False
    degrees = exp.scan.get_num_images() * exp.scan.get_oscillation()[1]
    return not (n / degrees >= gaussian_rs.min_spots.per_degree)


def _algorithm(ip):
    return dials.extensions.ProfileModel.load(ip.profile.algorithm)().algorithm()


class _Collect(logging.Handler):
    """Keeps the log records of a worker process, to be logged by the parent."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append((record.name, record.levelno, record.getMessage()))


def _nproc(ip, n_jobs):
    mp = ip.integration.mp
    if mp.method != "multiprocessing":
        return 1
    return min(n_jobs, max(1, int(mp.nproc)))


def _profile_models(profile_params, jobs, nproc):
    """DIALS' profile model of each job (reflections, experiment): the
    gaussian_rs ``Algorithm.create`` that ProfileModelFactory.create calls per
    experiment (a simplex fit of sigma_m over the block's spots, in one
    process in dials.integrate), here the blocks in parallel.

    Returns [(model, None) or (None, reason)] in the order of `jobs`; each
    worker's log lines are logged here, in that order."""
    Algorithm = dials.extensions.ProfileModel.load("gaussian_rs")().algorithm()

    def one(k):
        reflections, exp = jobs[k]
        collect = _Collect()
        top = logging.getLogger("dials")
        handlers, top.handlers = top.handlers, [collect]
        propagate, top.propagate = top.propagate, False
        try:
            model = Algorithm.create(
                profile_params, reflections, exp.crystal, exp.beam, exp.detector, exp.goniometer, exp.scan
            )
            # the model's own numbers (radians), so the parent's copy is exact
            result = (model.n_sigma(), model.sigma_b(deg=False), model.sigma_m(deg=False)), None
        except RuntimeError as e:
            result = None, " ".join(str(e).split())
        finally:
            top.handlers, top.propagate = handlers, propagate
        return result, collect.records

    if nproc > 1 and len(jobs) > 1:
        results = easy_mp.parallel_map(one, range(len(jobs)), processes=nproc, preserve_exception_message=True)
    else:
        results = [one(k) for k in range(len(jobs))]
    models = []
    for (numbers, reason), records in results:
        for name, level, message in records:
            logging.getLogger(name).log(level, message)
        if numbers is None:
            models.append((None, reason))
            continue
        n_sigma, sigma_b, sigma_m = numbers
        models.append((Algorithm(params=profile_params, n_sigma=n_sigma, sigma_b=sigma_b, sigma_m=sigma_m), None))
    return models


def _blocks_profiled_in_parallel(ip):
    """dials.integrate's profile models (ProfileModelFactory.create inside
    run_integration: one gaussian_rs model per experiment from its reference
    spots) with the experiments in parallel processes: the same calls on the
    same spots, so the same models.  For another profile algorithm or fixed
    sigmas, or where this DIALS makes its models otherwise, DIALS' own serial
    code runs."""
    g = ip.profile.gaussian_rs
    if ip.profile.algorithm != "gaussian_rs" or g.parameters.sigma_b is not None or g.parameters.sigma_m is not None:
        return contextlib.nullcontext()

    def create(original, params, experiments, reflections):
        nproc = _nproc(params, len(experiments))
        if (
            nproc < 2
            or not getattr(params, "create_profile_model", True)
            or reflections is None
            or "shoebox" not in reflections
        ):
            return original.create(params, experiments, reflections)
        pairs = list(reflections.iterate_experiments_and_indices(experiments))
        jobs = [(reflections.select(indices), exp) for exp, indices in pairs]
        for (exp, _), (model, reason) in zip(pairs, _profile_models(params.profile, jobs, nproc)):
            if model is None:
                raise RuntimeError(reason)
            exp.profile = model
        return experiments

    return dials_compat.profile_model_factory(create)


def _cut_by_a_gap(reference, experiments, sweeps):
    """flex.bool: reference spots whose shoebox touches a block end next to
    missing or excluded images (their rocking curves were recorded in part)."""
    cut = flex.bool(len(reference), False)
    z0s, z1s = reference["bbox"].parts()[4], reference["bbox"].parts()[5]
    for i, exp in enumerate(experiments):
        a0, a1 = exp.scan.get_array_range()
        mine = reference["id"] == i
        if sweeps.gap_before(exp):
            cut |= mine & (z0s <= a0)
        if sweeps.gap_after(exp):
            cut |= mine & (z1s >= a1)
    return cut


def _matched_reference(ip, experiments, reference):
    """The reference spots as dials.integrate models profiles from them: DIALS'
    process_reference and filter_reference_pixels, then matched to the
    predictions of the refined models (which set s1 and xyzcal; spots without
    a prediction are dropped)."""
    ref, _ = process_reference(copy.deepcopy(reference))
    ref = filter_reference_pixels(ref, experiments)
    predicted = flex.reflection_table.from_predictions_multi(
        experiments,
        dmin=ip.prediction.d_min,
        dmax=ip.prediction.d_max,
        margin=ip.prediction.margin,
        force_static=ip.prediction.force_static,
        padding=ip.prediction.padding,
    )
    _, ref, _ = predicted.match_with_reference(ref)
    return ref


def _pooled_profiles(ip, experiments, reference, small, sweeps=None):
    """Give the blocks in `small` a profile model (sigma_b, sigma_m) from all
    blocks' spots; the others keep their own, as dials.integrate.

    With `sweeps`, spots cut by a gap are left out of the sigma calculation
    (a truncated rocking curve makes sigma_m too small), unless too few
    others remain."""
    if ip.profile.algorithm != "gaussian_rs":
        raise GapfillError(
            f"block(s) {', '.join(str(i + 1) for i in small)} have too few strong spots for "
            f"their own {ip.profile.algorithm} profile model: set "
            "integration.small_blocks.profile=summation (or use the gaussian_rs profile model)"
        )
    ref = _matched_reference(ip, experiments, reference)
    whole = ref
    if sweeps is not None:
        cut = _cut_by_a_gap(ref, experiments, sweeps)
        if len(ref) - cut.count(True) >= max(1, ip.profile.gaussian_rs.min_spots.overall):
            logger.info(
                "Profile model: %d of %d reference spots cut by a gap left out of the sigma calculation",
                cut.count(True), len(ref),
            )
            ref = ref.select(~cut)
    relaxed = copy.deepcopy(ip.profile)
    relaxed.gaussian_rs.min_spots.overall = 0
    relaxed.gaussian_rs.min_spots.per_degree = 0
    Algorithm = _algorithm(ip)
    counts = {i: (ref["id"] == i).count(True) for i in range(len(experiments))}
    blocks = [i for i in range(len(experiments)) if counts[i]]
    # each block's (sigma_b, sigma_m) from its own spots, the blocks in parallel
    jobs = [(ref.select(ref["id"] == i), experiments[i]) for i in blocks]
    own, weights = {}, {}
    for i, (model, reason) in zip(blocks, _profile_models(relaxed, jobs, _nproc(ip, len(blocks)))):
        if model is None:
            logger.debug("Block %d: no profile model from its spots: %s", i + 1, reason)
            continue
        own[i] = (model.sigma_b(deg=True), model.sigma_m(deg=True))
        weights[i] = counts[i]
    total = sum(weights.values())
    if total == 0:
        raise GapfillError(
            f"no block's reference spots (the indexed strong spots that refinement kept and that match a "
            f"prediction, {len(whole)} in all) give a profile model: set profile.gaussian_rs.parameters.sigma_b= "
            "and sigma_m= (degrees)"
        )
    if total < ip.profile.gaussian_rs.min_spots.overall:
        raise GapfillError(
            f"only {total} reference spots in all blocks together (the indexed strong spots that refinement "
            "kept and that match a prediction, as dials.integrate chooses them), fewer than DIALS' profile model "
            f"needs (profile.gaussian_rs.min_spots.overall={ip.profile.gaussian_rs.min_spots.overall}): set "
            "profile.gaussian_rs.parameters.sigma_b= and sigma_m= (degrees), or lower min_spots.overall"
        )
    # spot-weighted mean of the variances: the blocks' spots taken together
    sigma_b = math.sqrt(sum(own[i][0] ** 2 * w for i, w in weights.items()) / total)
    sigma_m = math.sqrt(sum(own[i][1] ** 2 * w for i, w in weights.items()) / total)
    logger.info(
        "Profile model pooled over all blocks (%d spots): sigma_b %.4f, sigma_m %.4f deg",
        total,
        sigma_b,
        sigma_m,
    )
    fixed = copy.deepcopy(ip.profile)
    fixed.gaussian_rs.parameters.sigma_b = sigma_b
    fixed.gaussian_rs.parameters.sigma_m = sigma_m
    for i, exp in enumerate(experiments):
        if i in small or i not in own:
            exp.profile = Algorithm.create(
                fixed, None, exp.crystal, exp.beam, exp.detector, exp.goniometer, exp.scan
            )
        else:
            # a large block: its own model from its own spots, as dials.integrate
            exp.profile = Algorithm.create(
                ip.profile, whole.select(whole["id"] == i), exp.crystal, exp.beam,
                exp.detector, exp.goniometer, exp.scan,
            )
    return sigma_b, sigma_m


def _run(ip, experiments, reference, params=None):
    try:
        if params is not None and cluster.is_cluster(params):
            # --- cluster: the blocks, or their frame ranges, on the jobs (dials_gapfill/cluster/)
            done, reflections = cluster.integrate(ip, experiments, reference, params)
        else:
            with _blocks_profiled_in_parallel(ip):
                done, reflections, _ = run_integration(ip, experiments, reference)
        removed = [e for e in experiments if e.identifier not in set(done.identifiers())]
        if removed and len(done) and ip.profile.algorithm == "gaussian_rs":
            experiments, reflections = _integrate_removed(ip, experiments, removed, done, reflections)
        else:
            experiments = done
    except (ValueError, RuntimeError) as e:
        text = " ".join(str(e).split())
        killed = re.search(r"exit code = -(\d+)", text)
        if killed:
            # libtbx easy_mp reports a worker ended by a signal as a negative exit code
            number = int(killed.group(1))
            try:
                name = signal.Signals(number).name
            except ValueError:
                name = f"signal {number}"
            raise GapfillError(
                f"integration failed: one of its worker processes was killed ({name}"
                f"{', e.g. by the out-of-memory killer' if name == 'SIGKILL' else ''}): run again, with "
                "fewer processes (nproc=) if memory is short"
            ) from None
        raise GapfillError(f"integration failed: {text[:200]}: check integration.*") from None
    return experiments, reflections


def _integrate_removed(ip, given, removed, done, reflections):
    """The blocks DIALS' run_integration left out of several (none of their
    reference spots matched a prediction: a block of an image or two whose
    few spots all went as outliers), each integrated on its own by summation
    with the mean profile parameters (sigma_b, sigma_m) of the blocks
    integrated.  (experiments in the order `given`, reflections)."""
    Algorithm = _algorithm(ip)
    sp = copy.deepcopy(ip)
    g = sp.profile.gaussian_rs.parameters
    g.sigma_b = sum(e.profile.sigma_b(deg=True) for e in done) / len(done)
    g.sigma_m = sum(e.profile.sigma_m(deg=True) for e in done) / len(done)
    sp.integration.profile.fitting = False
    sp.create_profile_model = False
    if sp.integration.mp.method != "multiprocessing":
        # a cluster run: the block is integrated here, not through DIALS' own
        # cluster route (libtbx' queuing system)
        sp.integration.mp.method, sp.integration.mp.njobs, sp.integration.mp.nproc = "multiprocessing", 1, 1
    tables, order = [reflections], list(done)
    for exp in removed:
        logger.warning(
            "Block of images %d-%d: none of its reference spots matched a prediction (DIALS' integrate would "
            "leave it out): integrated by summation", *exp.scan.get_image_range(),
        )
        exp.profile = Algorithm.create(sp.profile, None, exp.crystal, exp.beam, exp.detector, exp.goniometer,
                                       exp.scan)
        alone, table, _ = run_integration(sp, ExperimentList([exp]), None)
        for key in reflections.keys():
            if key not in table:
                table[key] = reflections[key][:1].__class__(len(table))
        tables.append(table)
        order.extend(alone)
    position = {e.identifier: i for i, e in enumerate(given)}
    order = ExperimentList(sorted(order, key=lambda e: position[e.identifier]))
    return order, join_blocks(tables, order)


def integrate(experiments, reference, params, sweeps, profile_model="per_block"):
    """Integrated (experiments, reflections, record) for all blocks.

    profile_model: what integration.profile_model=auto means (the crystal
    model's choice: all_blocks for one crystal across the gaps)."""
    record = Record()
    names = block_names(experiments, sweeps)
    ip = dials_integrate_params(params)
    counts = _reference_counts(reference, experiments)
    small = []
    if ip.profile.algorithm == "gaussian_rs" and ip.create_profile_model:
        g = ip.profile.gaussian_rs
        if g.parameters.sigma_b is None or g.parameters.sigma_m is None:
            small = [i for i, exp in enumerate(experiments) if _too_few(counts[i], exp, g)]
    for i, exp in enumerate(experiments):
        record.block(exp.identifier)["profile"] = "own"

    choice = params.integration.profile_model
    if choice == "auto":
        choice = profile_model
    all_blocks = choice == "all_blocks" and ip.profile.algorithm == "gaussian_rs" and len(experiments) > 1
    if all_blocks and ip.create_profile_model and (
        ip.profile.gaussian_rs.parameters.sigma_b is None or ip.profile.gaussian_rs.parameters.sigma_m is None
    ):
        _pooled_profiles(ip, experiments, reference, list(range(len(experiments))), sweeps)
        for exp in experiments:
            record.block(exp.identifier)["profile"] = "all blocks"
        ip.create_profile_model = False
        experiments, reflections = _run(ip, experiments, reference, params)
    elif not small:
        experiments, reflections = _run(ip, experiments, reference, params)
    elif params.integration.small_blocks.profile == "pooled" or len(small) == len(experiments):
        if len(small) == len(experiments) and params.integration.small_blocks.profile == "summation":
            logger.warning("All blocks are small: using the pooled profile model")
        _pooled_profiles(ip, experiments, reference, small, sweeps)
        for i in small:
            record.block(experiments[i].identifier)["profile"] = "pooled over blocks"
            logger.info(
                "%s: %d strong spots, too few for its own profile model: "
                "profile model pooled over all blocks",
                names[experiments[i].identifier], counts[i],
            )
        ip.create_profile_model = False
        experiments, reflections = _run(ip, experiments, reference, params)
    else:
        large = [i for i in range(len(experiments)) if i not in small]
        big_expts = ExperimentList([experiments[i] for i in large])
        small_expts = ExperimentList([experiments[i] for i in small])
        big_ref, big_expts = keep_experiments(reference, experiments, {e.identifier for e in big_expts})
        big_expts, big_refl = _run(copy.deepcopy(ip), big_expts, big_ref, params)
        Algorithm = _algorithm(ip)
        weights = [counts[i] for i in large]
        total = sum(weights)
        sigma_b = sum(e.profile.sigma_b(deg=True) * w for e, w in zip(big_expts, weights)) / total
        sigma_m = sum(e.profile.sigma_m(deg=True) * w for e, w in zip(big_expts, weights)) / total
        sp = copy.deepcopy(ip)
        sp.profile.gaussian_rs.parameters.sigma_b = sigma_b
        sp.profile.gaussian_rs.parameters.sigma_m = sigma_m
        sp.integration.profile.fitting = False
        sp.create_profile_model = False
        for exp in small_expts:
            exp.profile = Algorithm.create(
                sp.profile, None, exp.crystal, exp.beam, exp.detector, exp.goniometer, exp.scan
            )
            record.block(exp.identifier)["profile"] = "summation only"
            logger.info(
                "%s: too few strong spots for a profile model: integrated by summation",
                names[exp.identifier],
            )
        small_ref, small_expts = keep_experiments(reference, experiments, {e.identifier for e in small_expts})
        small_expts, small_refl = _run(sp, small_expts, small_ref, params)
        # the blocks' own order (sweep by sweep: image numbers repeat across sweeps)
        position = {e.identifier: k for k, e in enumerate(experiments)}
        order = ExperimentList(sorted(list(big_expts) + list(small_expts), key=lambda e: position[e.identifier]))
        # summation-only rows get empty profile-fitting columns (their flags
        # say they were not profile fitted)
        for key in big_refl.keys():
            if key not in small_refl:
                small_refl[key] = big_refl[key][:1].__class__(len(small_refl))
        reflections = join_blocks([big_refl, small_refl], order)
        experiments = order

    # a block DIALS left out and integrated here on its own by summation
    # (_integrate_removed), or any other without a profile-fitted row
    prf = reflections.get_flags(reflections.flags.integrated_prf)
    for i, exp in enumerate(experiments):
        mine = reflections["id"] == i
        if mine.count(True) and not (mine & prf).count(True) and prf.count(True):
            stats = record.block(exp.identifier)
            if stats.get("profile") != "summation only":
                logger.info("%s: no reflection profile-fitted (DIALS fitted none with its %s profile model): "
                            "summation intensities only", names[exp.identifier], stats.get("profile", "own"))
            stats["profile"] = "summation only"
    repeated = repeated_predictions(experiments, reflections)
    if len(repeated):
        keep = flex.bool(len(reflections), True)
        keep.set_selected(repeated, False)
        reflections = reflections.select(keep)
        logger.info(
            "%d repeated predictions of a reflection in the same block dropped (DIALS' scan-varying "
            "predictor past the ends of a block's scan: the same pixels integrated twice)", len(repeated),
        )
    if params.integration.gap_partials == "combine":
        reflections, _ = combine_gap_partials(experiments, reflections)
    _record(reflections, experiments, record, names)
    # counted on the rows handed on (a combined row is still cut at its gap)
    flag_cut_rocking_curves(reflections, experiments, record, params.mtz.partiality_threshold, sweeps, names)
    if "gap_combined" in reflections:
        for i, exp in enumerate(experiments):
            n = ((reflections["id"] == i) & reflections["gap_combined"]).count(True)
            record.block(exp.identifier)["gap_combined"] = n
            if n:
                logger.info(
                    "%s: %d reflections that span a gap measured once (the parts on either "
                    "side combined into this block's row)", names[exp.identifier], n,
                )
    return experiments, reflections, record


def flag_cut_rocking_curves(reflections, experiments, record, partiality_threshold, sweeps, names):
    """Flag reflections whose rocking curve is cut by a gap; count them per block.

    DIALS clips each shoebox at the first and last image of its block and
    computes the recorded fraction of the rocking curve (column
    ``partiality``); export divides summation intensities by it and drops
    reflections below ``mtz.partiality_threshold``.  Here a partial whose
    shoebox is clipped at a block end next to missing or excluded images gets
    ``gap_edge = True``; one clipped at the first or last image of the whole
    sweep is cut as in any DIALS run and is only counted (``sweep_end``).
    """
    n = len(reflections)
    partial = reflections["partiality"] < FULL_PARTIALITY - EPS
    kept = reflections["partiality"] >= partiality_threshold
    bbox = reflections["bbox"].parts()
    gap_edge = flex.bool(n, False)
    for i, exp in enumerate(experiments):
        z0, z1 = exp.scan.get_array_range()
        mine = (reflections["id"] == i) & partial
        at_start = mine & (bbox[4] <= z0)
        at_end = mine & (bbox[5] >= z1)
        gap_before = sweeps.gap_before(exp)
        gap_after = sweeps.gap_after(exp)
        cut_gap = flex.bool(n, False)
        cut_end = flex.bool(n, False)
        for cut, at in ((gap_before, at_start), (gap_after, at_end)):
            if cut:
                cut_gap |= at
            else:
                cut_end |= at
        gap_edge |= cut_gap
        stats = record.block(exp.identifier)
        stats["gap_edge"] = cut_gap.count(True)
        stats["gap_edge_exported"] = (cut_gap & kept).count(True)
        stats["sweep_end"] = (cut_end & ~cut_gap).count(True)
        if stats["gap_edge"]:
            logger.info(
                "%s: %d reflections with rocking curves cut by a gap "
                "(flagged gap_edge; %d with partiality >= %.2f pass the MTZ's partiality cut, their "
                "summation intensities scaled by 1/partiality)",
                names[exp.identifier], stats["gap_edge"],
                stats["gap_edge_exported"], partiality_threshold,
            )
    reflections["gap_edge"] = gap_edge


def mean_i_over_sigma(reflections):
    """<I/sigma> with profile-fitted intensities where available, else summation."""
    prf = reflections.get_flags(reflections.flags.integrated_prf)
    if "intensity.prf.value" in reflections and prf.count(True):
        i = reflections["intensity.prf.value"].select(prf)
        v = reflections["intensity.prf.variance"].select(prf)
    else:
        s = reflections.get_flags(reflections.flags.integrated_sum)
        i = reflections["intensity.sum.value"].select(s)
        v = reflections["intensity.sum.variance"].select(s)
    ok = v > 0
    if ok.count(True) == 0:
        return 0.0
    return float(flex.mean(i.select(ok) / flex.sqrt(v.select(ok))))


def _record(reflections, experiments, record, names):
    for i, exp in enumerate(experiments):
        sub = reflections.select(reflections["id"] == i)
        stats = record.block(exp.identifier)
        stats["integrated"] = len(sub)
        isigi = mean_i_over_sigma(sub) if len(sub) else float("nan")
        stats["mean_isigi"] = None if math.isnan(isigi) else isigi
        stats["profile_fitted"] = int(sub.get_flags(sub.flags.integrated_prf).count(True))
        logger.info(
            "%s: %d reflections integrated (%d profile-fitted), <I/sigma> %s",
            names[exp.identifier], len(sub), stats["profile_fitted"],
            f"{stats['mean_isigi']:.1f}" if stats["mean_isigi"] is not None else "-",
        )


# --------------------------------------------------------------------------
# One row per reflection in a block
# --------------------------------------------------------------------------


def repeated_predictions(experiments, reflections):
    """Rows of integrated `reflections` that repeat another prediction of the
    same reflection in the same block: a flex.size_t selection to drop.

    DIALS' scan-varying predictor also predicts the frames of its padding
    (``prediction.padding``, 1° on each side of a block's scan), each with the
    crystal of the scan's first or last frame, turned from its start to its
    end setting within the frame (dials/algorithms/spot_prediction/
    reflection_predictor.h, ``ScanVaryingReflectionPredictor::for_ub``).
    Where the crystal turns between scan points, its setting jumps back at
    the start of every padding frame, so a reflection crossing near there is
    predicted twice, crossing the same way.  Both rows are integrated on the
    same pixels, and where summation intensities are exported both pass the
    partiality threshold: the same photons would count twice.  Of the rows of
    one block with the same Miller index and the same direction of crossing
    within half a turn, the prediction nearest the block's frames is kept
    (with the rows DIALS split from it: same ``partial_id``).  Rows split by
    DIALS' integrator share a ``partial_id`` and are left alone."""
    if not len(reflections) or "partial_id" not in reflections:
        return flex.size_t()
    ids = reflections["id"].as_numpy_array()
    hkl = reflections["miller_index"].as_vec3_double().as_numpy_array().astype(np.int64)
    entering = reflections["entering"].as_numpy_array()
    z = reflections["xyzcal.px"].parts()[2].as_numpy_array()
    partial_id = reflections["partial_id"].as_numpy_array()
    partiality = reflections["partiality"].as_numpy_array()
    lo = np.array([e.scan.get_array_range()[0] for e in experiments], dtype=float)[ids]
    hi = np.array([e.scan.get_array_range()[1] for e in experiments], dtype=float)[ids]
    width = np.array([e.scan.get_oscillation()[1] for e in experiments])[ids]
    outside = np.maximum(np.maximum(lo - z, z - hi), 0.0)
    keys = np.column_stack([ids, hkl, entering.astype(np.int64)])
    # grouped by reflection and direction; in each group nearest the frames first
    order = np.lexsort((-partiality, outside, *keys.T[::-1]))
    keys, order_z = keys[order], z[order]
    starts = np.flatnonzero(np.r_[True, np.any(keys[1:] != keys[:-1], axis=1)])
    ends = np.r_[starts[1:], len(order)]
    drop = []
    for a, b in zip(starts, ends):
        if b - a < 2:
            continue
        kept = order[a]
        for row, zz in zip(order[a + 1 : b], order_z[a + 1 : b]):
            if partial_id[row] != partial_id[kept] and abs(zz - z[kept]) * width[row] < 180.0:
                drop.append(row)
    return flex.size_t(sorted(int(r) for r in drop))


# --------------------------------------------------------------------------
# Reflections whose rocking curve spans a gap: measured once
# --------------------------------------------------------------------------


def gap_partial_pairs(experiments, reflections, max_dz=1.5):
    """Pairs (i, j) of rows of integrated `reflections`: the same reflection
    (same Miller index, the same crystal position, i.e. predicted centroids
    within `max_dz` frames) observed in part at the end of one block (row i)
    and in part at the start of the next block of the same rotation, after a
    gap or where a sweep's files go on in another folder (row j).  Rows must
    have ``partiality`` < 1 (DIALS clipped their shoebox) and be integrated
    (summation or profile fitting)."""

    ranges = [e.scan.get_image_range() for e in experiments]
    ids = reflections["id"]
    hkl = reflections["miller_index"]
    zc = reflections["xyzcal.px"].parts()[2]
    part = reflections["partiality"]
    z0, z1 = reflections["bbox"].parts()[4:6]
    integrated = reflections.get_flags(reflections.flags.integrated_sum) | reflections.get_flags(
        reflections.flags.integrated_prf
    )
    pairs = []
    for b in range(len(ranges) - 1):
        (_, l), (f, _) = ranges[b], ranges[b + 1]
        if not one_rotation(experiments[b], experiments[b + 1]):
            continue  # (another sweep: its frames are not this rotation's)
        # clipped at the gap: i at the end of block b, j at the start of b + 1
        before = ((ids == b) & integrated & (part < 0.999) & (z1 >= l)).iselection()
        after = ((ids == b + 1) & integrated & (part < 0.999) & (z0 <= f - 1)).iselection()
        index = {}
        for j in after:
            index.setdefault(hkl[j], []).append(j)
        for i in before:
            for j in index.get(hkl[i], ()):
                if abs(zc[i] - zc[j]) <= max_dz:
                    pairs.append((int(i), int(j)))
    return pairs


def one_rotation(first, second) -> bool:
    """Whether block `second` goes on with `first`'s rotation: the same
    goniometer setting and axis, and its first image where the oscillation of
    `first` continued over the image numbers between them would put it (a
    gap, or none where a sweep's files go on in another folder).  Blocks of
    different sweeps are not, whatever their image numbers."""
    g1, g2 = first.goniometer, second.goniometer
    if g1 is None or g2 is None or _sweep_key(first) != _sweep_key(second):
        return False
    for get in ("get_rotation_axis", "get_setting_rotation", "get_fixed_rotation"):
        if not np.allclose(getattr(g1, get)(), getattr(g2, get)(), atol=1e-6):
            return False
    (_, last), (start, _) = first.scan.get_image_range(), second.scan.get_image_range()
    width = first.scan.get_oscillation()[1]
    if start <= last or not np.isclose(second.scan.get_oscillation()[1], width, rtol=1e-4):
        return False
    expected = first.scan.get_oscillation_range()[1] + (start - last - 1) * width
    return bool(np.isclose(second.scan.get_oscillation_range()[0], expected, atol=0.01 * abs(width)))


def _sweep_key(experiment):
    """What names an experiment's sweep: its file-name template (the same in
    every folder a sweep's files lie in), or its file where one file holds
    the sweep (NeXus)."""
    imageset = experiment.imageset
    template = imageset.get_template() if imageset is not None and hasattr(imageset, "get_template") else None
    if template and "#" in template:
        return os.path.basename(template)
    paths = imageset.paths() if imageset is not None else []
    return os.path.abspath(paths[0]) if len(paths) else template


# A gap-spanning reflection with this much of its rocking curve on one side
# is measured on that side alone.  Summed with a sliver on the other side
# (partiality 0.005 or less) the counts of whatever lay in the sliver's
# shoebox were added: on drifting sweeps with every 10th or 6th image missing
# the combined rows' CC with the true intensities was 0.972 and 0.977, and
# all full reflections' 0.99714 and 0.99631, against 0.99823 and 0.99830
# without the combined rows (benchmarks/cc_outliers.py; the DIALS chain, which
# does not combine, 0.99817 and 0.99834).
ONE_PART_HOLDS_IT = 0.99


def combine_gap_partials(experiments, reflections, max_dz=1.5):
    """Integrated reflections with each gap-spanning reflection measured once.

    For every pair of :func:`gap_partial_pairs` the two partial observations
    become one row (the one with the larger partiality, the other is
    removed); where that one holds ONE_PART_HOLDS_IT of the reflection it is
    kept as it is and the other removed.  Combined:

    - summation: counts and variances add, ``partiality`` = p1 + p2 (capped at
      1), so the partiality correction of export (I / partiality) estimates
      the full intensity from both parts;
    - profile fitting (each part already estimates the full intensity):
      inverse-variance weighted mean and its variance;
    - a bool column ``gap_combined`` marks the combined rows.

    Returns (table, number of pairs combined).
    """
    pairs = gap_partial_pairs(experiments, reflections, max_dz=max_dz)
    table = copy.deepcopy(reflections)
    combined = flex.bool(len(table), False)
    remove = flex.bool(len(table), False)
    part = table["partiality"]
    has_sum = "intensity.sum.value" in table
    has_prf = "intensity.prf.value" in table
    if has_sum:
        Is, Vs = table["intensity.sum.value"], table["intensity.sum.variance"]
    if has_prf:
        Ip, Vp = table["intensity.prf.value"], table["intensity.prf.variance"]
        prf_ok = table.get_flags(table.flags.integrated_prf)
    for i, j in pairs:
        keep, drop = (i, j) if part[i] >= part[j] else (j, i)
        if remove[keep] or remove[drop] or combined[keep] or combined[drop]:
            continue  # a part in more than one pair: combined once, the other pair left as it is
        if part[keep] >= ONE_PART_HOLDS_IT:
            # the other part holds at most a percent of the reflection but a
            # whole shoebox of noise, and of any spot that overlaps it there
            remove[drop] = True
            continue
        if has_sum:
            Is[keep] = Is[i] + Is[j]
            Vs[keep] = Vs[i] + Vs[j]
        if has_prf and prf_ok[i] and prf_ok[j] and Vp[i] > 0 and Vp[j] > 0:
            w1, w2 = 1.0 / Vp[i], 1.0 / Vp[j]
            Ip[keep] = (w1 * Ip[i] + w2 * Ip[j]) / (w1 + w2)
            Vp[keep] = 1.0 / (w1 + w2)
        elif has_prf and prf_ok[drop] and not prf_ok[keep]:
            Ip[keep], Vp[keep] = Ip[drop], Vp[drop]
        part[keep] = min(1.0, part[i] + part[j])
        combined[keep] = True
        remove[drop] = True
    if has_sum:
        table["intensity.sum.value"], table["intensity.sum.variance"] = Is, Vs
    if has_prf:
        table["intensity.prf.value"], table["intensity.prf.variance"] = Ip, Vp
    table["partiality"] = part
    table["gap_combined"] = combined
    table = table.select(~remove)
    return table, int(combined.count(True))


def run(state) -> Record:
    state.experiments, state.reflections, record = integrate(
        state.experiments, state.reflections, state.params, state.sweeps, state.crystal_model.profile_model
    )
    return record
