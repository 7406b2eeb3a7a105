"""Compare two processings of the same images (e.g. the DIALS CLI chain and
dials.process_gapped): cells, integrated counts and intensities of matched
reflections.  Used by the equivalence test and the benchmark.

Reflections are matched by (block, h, k, l, nearest image of the predicted
centroid); when the two runs index in different (but equivalent) bases the
Miller indices of the second are mapped onto the first's basis with the
integer matrix relating their reciprocal-space bases.
"""

from __future__ import annotations

import copy
import math
import os
import statistics

import numpy as np
from cctbx import uctbx
from dials.array_family import flex
from dials.command_line import find_spots
from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory
from scitbx import matrix

from dials_gapfill.crystal_model.continuous import predict_at_observed_z
from dials_gapfill.model.tables import mean_cell
from dials_gapfill.simulation.simulate import rotation


def _basis_change(crystal_a, crystal_b):
    """Integer matrix X with h_b = X h_a for the same lattice point."""
    A_a, A_b = matrix.sqr(crystal_a.get_A()), matrix.sqr(crystal_b.get_A())
    X = A_b.inverse() * A_a
    Xr = matrix.sqr([round(v) for v in X.elems])
    if max(abs(a - b) for a, b in zip(X.elems, Xr.elems)) > 0.1 or abs(abs(Xr.determinant()) - 1) > 1e-6:
        return None
    return Xr


def _corrected(refl, i):
    """Profile-fitted intensity corrected for LP and QE, and its sigma."""
    scale = refl["lp"][i] / (refl["qe"][i] if "qe" in refl else 1.0)
    return refl["intensity.prf.value"][i] * scale, math.sqrt(max(refl["intensity.prf.variance"][i], 0)) * scale


def _index(experiments, reflections, basis=None):
    """{(block key, h, k, l, image): (I, sigma)} of profile-fitted reflections."""
    out = {}
    prf = reflections.get_flags(reflections.flags.integrated_prf)
    keys = _block_keys(experiments)
    ids = reflections["id"]
    hkl = reflections["miller_index"]
    z = reflections["xyzcal.px"].parts()[2]
    for i in range(len(reflections)):
        if not prf[i]:
            continue
        h = hkl[i]
        if basis is not None:
            h = tuple(int(round(v)) for v in (basis[ids[i]] * __import__("scitbx").matrix.col(h)).elems)
        key = (keys[ids[i]], tuple(h), int(math.floor(z[i])))
        out[key] = _corrected(reflections, i)
    return out


def _block_keys(experiments) -> list:
    """Each block's key in either run: (its sweep, its image range); several
    sweeps have blocks of the same image numbers.  A sweep is a file template,
    numbered in the order of the templates' names (the runs' folders, even
    their formats, may differ)."""
    def template(e):
        return os.path.basename((e.imageset.get_template() if e.imageset is not None else "") or "")

    sweeps = {name: k for k, name in enumerate(sorted({template(e) for e in experiments}), start=1)}
    return [(sweeps[template(e)], tuple(e.scan.get_image_range())) for e in experiments]


def _pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def compare(experiments_a, reflections_a, experiments_b, reflections_b, min_isigma=3.0) -> dict:
    """Numbers comparing run b with run a (a is the reference)."""
    blocks_a = {key: i for i, key in enumerate(_block_keys(experiments_a))}
    blocks_b = {key: i for i, key in enumerate(_block_keys(experiments_b))}
    common = sorted(set(blocks_a) & set(blocks_b))
    result = {"blocks_a": sorted(r for _, r in blocks_a), "blocks_b": sorted(r for _, r in blocks_b), "blocks": []}
    basis = {}
    for r in common:
        ea, eb = experiments_a[blocks_a[r]], experiments_b[blocks_b[r]]
        ca, cb = mean_cell(ea.crystal), mean_cell(eb.crystal)
        na = int((reflections_a["id"] == blocks_a[r]).count(True))
        nb = int((reflections_b["id"] == blocks_b[r]).count(True))
        X = _basis_change(ea.crystal, eb.crystal)
        if X is not None:
            basis[blocks_b[r]] = X.inverse()  # maps h_b to h_a
        # compare cells in a's basis: the cells of a reduced lattice are comparable
        # parameter by parameter only when the bases agree (X = identity up to sign)
        same_basis = X is not None and all(abs(abs(v) - (1 if k in (0, 4, 8) else 0)) < 1e-9 for k, v in enumerate(X.elems))
        rel = [abs(x - y) / x for x, y in zip(ca[:3], cb[:3])] if same_basis else None
        ang = [abs(x - y) for x, y in zip(ca[3:], cb[3:])] if same_basis else None
        result["blocks"].append(
            {
                "sweep": r[0],
                "images": list(r[1]),
                "cell_a": ca,
                "cell_b": cb,
                "cell_rel_diff_max": max(rel) if rel else None,
                "angle_diff_max": max(ang) if ang else None,
                "integrated_a": na,
                "integrated_b": nb,
                "count_rel_diff": abs(nb - na) / na if na else None,
            }
        )
    total_a = sum(b["integrated_a"] for b in result["blocks"])
    total_b = sum(b["integrated_b"] for b in result["blocks"])
    result["integrated_a"], result["integrated_b"] = total_a, total_b
    result["count_rel_diff"] = abs(total_b - total_a) / total_a if total_a else None
    diffs = [b["cell_rel_diff_max"] for b in result["blocks"] if b["cell_rel_diff_max"] is not None]
    result["cell_rel_diff_max"] = max(diffs) if diffs else None

    ia = _index(experiments_a, reflections_a)
    ib = _index(experiments_b, reflections_b, basis=basis if len(basis) == len(common) else None)
    x, y = [], []
    for key, (I_b, s_b) in ib.items():
        hit = ia.get(key)
        if hit is None:
            continue
        I_a, s_a = hit
        if s_a > 0 and s_b > 0 and I_a / s_a >= min_isigma and I_b / s_b >= min_isigma:
            x.append(I_a)
            y.append(I_b)
    result["matched"] = len(x)
    result["cc"] = _pearson(x, y) if len(x) > 2 else None
    result["median_ratio"] = statistics.median(b / a for a, b in zip(x, y)) if x else None
    return result


def load(directory, experiments="integrated.expt", reflections="integrated.refl"):
    expts = ExperimentListFactory.from_json_file(os.path.join(directory, experiments), check_format=False)
    refl = flex.reflection_table.from_file(os.path.join(directory, reflections))
    return expts, refl


# --------------------------------------------------------------------------
# Refined models against the simulator's ground truth
# --------------------------------------------------------------------------


def _rotation_angle_deg(R) -> float:
    c = (np.trace(R) - 1.0) / 2.0
    s = np.linalg.norm([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]]) / 2.0
    return float(np.degrees(np.arctan2(s, c)))


def _rotation_vector_deg(R) -> np.ndarray:
    """The rotation R as axis times angle (degrees), lab frame."""
    from scitbx.math import r3_rotation_axis_and_angle_from_matrix

    aa = r3_rotation_axis_and_angle_from_matrix(r=np.asarray(R, dtype=float).ravel().tolist())
    return np.array(aa.axis) * aa.angle(deg=True)


def _nearest_rotation(M):
    u, _, vt = np.linalg.svd(M)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def _crystal_A_mid(crystal, index: int):
    """A (numpy 3x3) at the mid-point of array index `index` of the crystal's scan
    (scan points are image boundaries; DIALS interpolates A linearly between them)."""
    if crystal.num_scan_points == 0:
        return np.array(crystal.get_A()).reshape(3, 3)
    a = np.array(crystal.get_A_at_scan_point(index)).reshape(3, 3)
    b = np.array(crystal.get_A_at_scan_point(index + 1)).reshape(3, 3)
    return 0.5 * (a + b)


def truth_A_mid(truth: dict, image: int, sweep: int | None = None):
    """The simulator's A = U B at the mid-point of image `image` (numpy 3x3);
    for several sweeps, of image `image` of sweep `sweep` (1-based)."""
    if "sweeps" in truth:
        if sweep is None:
            raise ValueError("the truth has several sweeps: say which (sweep=)")
        truth = sweep_truth(truth, sweep)
    first = truth["image_range"][0]
    U = truth["orientation"]["U"]
    B = np.array(truth["orientation"]["B"]).reshape(3, 3)
    k = image - first
    Ua = np.array(U[k]).reshape(3, 3)
    Ub = np.array(U[k + 1]).reshape(3, 3)
    return _nearest_rotation(0.5 * (Ua + Ub)) @ B


def _lab(goniometer_SRF, phi_deg, A):
    S, axis, F = goniometer_SRF
    return S @ rotation(axis, phi_deg) @ F @ A


def _truth_SRF(truth: dict):
    """(S, axis, F) of a sweep's truth: identity S and F when it has none (one axis)."""
    S, F = truth.get("setting_rotation"), truth.get("fixed_rotation")
    return (
        np.eye(3) if S is None else np.array(S).reshape(3, 3),
        np.array(truth["rotation_axis"]),
        np.eye(3) if F is None else np.array(F).reshape(3, 3),
    )


def sweep_truth(truth: dict, sweep: int) -> dict:
    """One sweep (1-based) of a several-sweep truth in the layout of a single
    sweep's (its scan, orientations, setting and fixed rotation at the top)."""
    s = truth["sweeps"][sweep - 1]
    out = {k: v for k, v in truth.items() if k != "sweeps"}
    out.update(s)
    return out


def sweep_of(experiment, truth: dict) -> int:
    """The sweep (1-based) of the truth an experiment's images belong to: by
    the file template, else by the goniometer setting nearest the truth's."""
    sweeps = truth.get("sweeps")
    if not sweeps:
        return 1
    imageset = getattr(experiment, "imageset", None)
    template = None
    if imageset is not None and hasattr(imageset, "get_template"):
        template = os.path.basename(imageset.get_template())
    for s in sweeps:
        if template and template == s.get("template"):
            return s["sweep"]
    S, axis, F = _goniometer_SRF(experiment.goniometer)
    lab = S @ axis

    def distance(s):
        St, at, Ft = _truth_SRF(s)
        return float(np.linalg.norm(St @ at - lab) + np.linalg.norm(St @ Ft - S @ F))

    return min(sweeps, key=distance)["sweep"]


def _goniometer_SRF(goniometer):
    return (
        np.array(goniometer.get_setting_rotation()).reshape(3, 3),
        np.array(goniometer.get_rotation_axis_datum()),
        np.array(goniometer.get_fixed_rotation()).reshape(3, 3),
    )


def basis_to_truth(A_refined, A_true):
    """Integer matrix X (numpy) with A_refined X = A_true up to a small rotation,
    i.e. the refined indexing basis mapped onto the truth's; None if none fits."""
    X = np.linalg.inv(A_refined) @ A_true
    Xr = np.round(X)
    if np.max(np.abs(X - Xr)) > 0.25 or abs(abs(np.linalg.det(Xr)) - 1) > 1e-6:
        return None
    return Xr


GAUGES = ("full", "perpendicular", "none")


def orientation_errors(experiments, truth: dict, gauge: str = "full", images=None) -> dict:
    """Orientation of refined crystals against the simulator's truth.

    For every image of every experiment, the refined setting matrix at the
    image mid-point and the true one are taken to the laboratory frame
    S R(phi) F A (S setting rotation, R(phi) about the axis, F fixed rotation,
    A = UB); the refined basis is mapped onto the truth's (integer matrix);
    the one rotation common to all images (DIALS' gauge freedom: beam and
    detector turning about the sample, every orientation following) is the
    rotation mean of the per-image rotations and is removed.  The error of an
    image is the angle of what remains.

    Several sweeps (a truth with "sweeps"): each experiment is compared with
    the truth of its own sweep (``sweep_of``: by file template), in the
    laboratory frame with that sweep's setting and fixed rotations, and one
    gauge is removed from all; the result also has "sweeps" (the sweep of
    each image) and "per_sweep" ({sweep: {"median", "worst"}}).

    `gauge`: "full" (above); "perpendicular", only its component
    perpendicular to the spindle (DIALS fixes the beam's rotation about the
    spindle, beam.fix=in_spindle_plane: an orientation error common to all
    images about the spindle is an error, and is kept); "none", nothing
    removed.  A full gauge also takes away whatever error every image
    shares, which favours one crystal across the blocks over a crystal per
    block, whose offsets differ.  `images`: only these image numbers are
    judged (and the gauge fitted on them): runs compared on the same images.

    Returns {"images", "errors_deg", "vectors_deg" (the remaining rotation of
    each image, lab frame, axis times angle), "median", "worst", "gauge_deg"
    (the angle of the rotation removed)}.
    """
    if gauge not in GAUGES:
        raise ValueError(f"gauge {gauge!r}: one of {', '.join(GAUGES)}")
    wanted = None if images is None else set(images)
    multi = "sweeps" in truth
    spindle = None
    images, rotations, image_sweeps = [], [], []
    X = None
    for exp in experiments:
        k = sweep_of(exp, truth) if multi else None
        st = sweep_truth(truth, k) if multi else truth
        osc0, width = st["oscillation"]
        first = st["image_range"][0]
        truth_gonio = _truth_SRF(st)
        if spindle is None:
            spindle = truth_gonio[0] @ truth_gonio[1]
            spindle = spindle / np.linalg.norm(spindle)
        srf = _goniometer_SRF(exp.goniometer)
        f, l = exp.scan.get_image_range()
        # each experiment's own basis (separately indexed sweeps may differ);
        # where none fits, the previous experiment's
        X_exp = basis_to_truth(_crystal_A_mid(exp.crystal, 0), truth_A_mid(st, f))
        if X_exp is not None:
            X = X_exp
        for n in range(f, l + 1):
            if wanted is not None and n not in wanted:
                continue
            A = _crystal_A_mid(exp.crystal, n - f)
            At = truth_A_mid(st, n)
            if X is None:
                raise ValueError("the refined lattice does not match the truth's")
            phi = osc0 + (n - first + 0.5) * width
            # the refined phi of image n: the refined scan's, which is the truth's
            phi_ref = exp.scan.get_angle_from_array_index(n - 1 + 0.5, deg=True)
            Mr = _lab(srf, phi_ref, A @ X)
            Mt = _lab(truth_gonio, phi, At)
            # Mr = R Mt with R a rotation (cells equal up to refinement error)
            rotations.append(_nearest_rotation(Mr @ np.linalg.inv(Mt)))
            images.append(n)
            image_sweeps.append(k)
    if gauge == "none":
        removed = np.eye(3)
    else:
        removed = _nearest_rotation(sum(rotations))
        if gauge == "perpendicular":
            v = np.radians(_rotation_vector_deg(removed))
            v = v - (v @ spindle) * spindle
            removed = rotation(v / np.linalg.norm(v), np.degrees(np.linalg.norm(v))) if np.linalg.norm(v) else np.eye(3)
    gauge = removed
    errors = [_rotation_angle_deg(gauge.T @ R) for R in rotations]
    result = {
        "images": images,
        "errors_deg": errors,
        # what is left of each image's rotation as a lab-frame vector (axis
        # times angle): a systematic error shows as a smooth curve in one
        # component, noise as scatter
        "vectors_deg": [_rotation_vector_deg(gauge.T @ R).tolist() for R in rotations],
        "median": float(np.median(errors)),
        "worst": float(np.max(errors)),
        "gauge_deg": _rotation_angle_deg(gauge),
    }
    if multi:
        result["sweeps"] = image_sweeps
        result["per_sweep"] = {
            k: {
                "median": float(np.median([e for e, s in zip(errors, image_sweeps) if s == k])),
                "worst": float(np.max([e for e, s in zip(errors, image_sweeps) if s == k])),
            }
            for k in sorted(set(image_sweeps))
        }
    return result


def cell_error(crystal, truth: dict, sweep: int | None = None) -> dict:
    """Unit cell of a crystal (mean over scan points) in the truth's basis, and
    its largest relative error in a, b, c and largest error in the angles (degrees).
    Several sweeps: the basis is found at the first image of `sweep` (default
    the first sweep; the crystal is the same in all)."""
    if "sweeps" in truth:
        truth = sweep_truth(truth, sweep or 1)
    first = truth["image_range"][0]
    A = _crystal_A_mid(crystal, 0) if crystal.num_scan_points == 0 else None
    if crystal.num_scan_points:
        mats = [np.array(crystal.get_A_at_scan_point(i)).reshape(3, 3) for i in range(crystal.num_scan_points)]
    else:
        mats = [A]
    At = truth_A_mid(truth, first)
    X = basis_to_truth(mats[0], At)
    if X is None:
        raise ValueError("the refined lattice does not match the truth's")
    cells = []
    for M in mats:
        Ax = M @ X
        G = Ax.T @ Ax  # reciprocal metric
        cells.append(uctbx.unit_cell(metrical_matrix=tuple(G[i, j] for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)))).reciprocal().parameters())
    cell = [float(np.mean([c[k] for c in cells])) for k in range(6)]
    true = truth["unit_cell"]
    return {
        "cell": cell,
        "rel_error_max": max(abs(a - b) / b for a, b in zip(cell[:3], true[:3])),
        "angle_error_max": max(abs(a - b) for a, b in zip(cell[3:], true[3:])),
    }


# --------------------------------------------------------------------------
# A minimal harness from DIALS itself (import, blocks, strong spots), for
# tests and benchmarks that must not depend on the pipeline
# --------------------------------------------------------------------------


def import_blocks(filenames):
    """Block experiments of image files: dxtbx makes one ImageSequence per
    contiguous run; beam and detector are shared (the first block's), and the
    goniometer within a sweep (the first block's of its template: sweeps at
    other goniometer settings keep their own); identifiers
    "block-<first>-<last>", or "block-<sweep>-<first>-<last>" (sweep 1, 2, ...
    in template order) when the files are of several templates."""
    experiments = ExperimentListFactory.from_filenames(sorted(filenames))
    templates = sorted({e.imageset.get_template() for e in experiments})
    experiments = sorted(
        experiments, key=lambda e: (templates.index(e.imageset.get_template()), e.scan.get_image_range()[0])
    )

    out = ExperimentList()
    first = experiments[0]
    goniometers = {}
    for exp in experiments:
        template = exp.imageset.get_template()
        goniometer = goniometers.setdefault(template, exp.goniometer)
        exp.beam, exp.detector, exp.goniometer = first.beam, first.detector, goniometer
        exp.imageset.set_beam(first.beam)
        exp.imageset.set_detector(first.detector)
        exp.imageset.set_goniometer(goniometer)
        f, l = exp.scan.get_image_range()
        if len(templates) > 1:
            exp.identifier = f"block-{templates.index(template) + 1}-{f}-{l}"
        else:
            exp.identifier = f"block-{f}-{l}"
        out.append(exp)
    return out


def strong_spots(experiments, nproc=1):
    """dials.find_spots' strong spots of all blocks (DIALS defaults), id = block."""
    params = find_spots.working_phil.extract()
    params.spotfinder.mp.nproc = nproc
    reflections = flex.reflection_table.from_observations(experiments, params)
    for i, exp in enumerate(experiments):
        reflections.experiment_identifiers()[i] = exp.identifier
    return reflections


def indices_in_truth_basis(experiments, reflections, truth):
    """A copy of `reflections` whose Miller indices are in the truth's basis,
    block by block (each against its own sweep's truth): an indexing basis
    may be another setting of the cell (e.g. -a, b, -c of a monoclinic one)."""
    r = reflections.copy()
    hkl = r["miller_index"]
    for i, exp in enumerate(experiments):
        sweep = sweep_of(exp, truth) if "sweeps" in truth else None
        X = basis_to_truth(_crystal_A_mid(exp.crystal, 0),
                           truth_A_mid(truth, exp.scan.get_image_range()[0], sweep=sweep))
        to_truth = np.round(np.linalg.inv(X)).astype(int)
        rows = (r["id"] == i).iselection()
        mapped = [tuple(int(v) for v in to_truth @ np.array(h)) for h in hkl.select(rows)]
        hkl.set_selected(rows, flex.miller_index(mapped))
    r["miller_index"] = hkl
    return r


def summation_against_truth(reflections, truth):
    """Summation intensities as dials.export scales them (lp / qe /
    partiality; qe 1 where the detector model has none, as the Timepix'),
    their sigmas, and the simulator's true intensities (nan where unknown),
    as numpy arrays over the rows of `reflections`."""
    from cctbx import crystal, miller

    r = reflections
    qe = np.array(r["qe"]) if "qe" in r else np.ones(len(r))
    scale = np.array(r["lp"]) / qe / np.array(r["partiality"])
    intensity = np.array(r["intensity.sum.value"]) * scale
    sigma = np.sqrt(np.maximum(np.array(r["intensity.sum.variance"]), 0)) * scale
    symmetry = crystal.symmetry(unit_cell=truth["unit_cell"], space_group_symbol=truth["space_group"])
    asu = miller.set(symmetry, r["miller_index"], anomalous_flag=False).map_to_asu().indices()
    lookup = {tuple(h): v for h, v in zip(truth["intensities"]["miller_index"], truth["intensities"]["I"])}
    true = np.array([lookup.get(tuple(h), np.nan) for h in asu])
    return intensity, sigma, true


def held_out_residuals(refine, experiments, reflections, score_rows, folds=10, seed=7):
    """Residuals of indexed spots predicted by models refined without them.

    `reflections` (indexed spots, ``id`` = experiment) are split into `folds`
    folds, stratified by experiment, with one seed; for each fold
    ``refine(copy of experiments, the other folds)`` returns refined
    experiments, which predict the fold's rows in `score_rows` (indices) with
    the crystal at each spot's observed z
    (:func:`dials_gapfill.crystal_model.continuous.predict_at_observed_z`).
    Returns {experiment id: (dx px, dy px, dphi images)} numpy arrays."""
    ids = np.asarray(reflections["id"])
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(ids), int)
    for i in np.unique(ids):
        rows = np.flatnonzero(ids == i)
        fold[rng.permutation(rows)] = np.arange(len(rows)) % folds
    scored = np.zeros(len(ids), bool)
    scored[np.asarray(list(score_rows), int)] = True
    out = {}
    for k in range(folds):
        models = refine(copy.deepcopy(experiments), reflections.select(flex.bool((fold != k).tolist())))
        test = reflections.select(flex.size_t(np.flatnonzero((fold == k) & scored).tolist()))
        if not len(test):
            continue
        test = predict_at_observed_z(test, models)
        obs, cal = np.array(test["xyzobs.mm.value"]), np.array(test["xyzcal.mm"])
        tid = np.asarray(test["id"])
        for i, exp in enumerate(models):
            rows = tid == i
            if not rows.any():
                continue
            px = exp.detector[0].get_pixel_size()
            width = math.radians(exp.scan.get_oscillation()[1])
            d = (cal - obs)[rows] / np.array([px[0], px[1], width])
            prev = out.get(i, np.zeros((0, 3)))
            out[i] = np.vstack([prev, d])
    return {i: (d[:, 0], d[:, 1], d[:, 2]) for i, d in out.items()}
