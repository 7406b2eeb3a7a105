"""Compare two processings of the same images (e.g. the DIALS CLI chain and
dials.process_gapped): cells, integrated counts and intensities of matched
reflections.  Used by the equivalence test and the benchmark.

Reflections are matched by (block, h, k, l, nearest image of the predicted
centroid); when the two runs index in different (but equivalent) bases the
Miller indices of the second are mapped onto the first's basis with the
integer matrix relating their reciprocal-space bases.
"""

from __future__ import annotations

import math
import statistics


def _basis_change(crystal_a, crystal_b):
    """Integer matrix X with h_b = X h_a for the same lattice point."""
    from scitbx import matrix

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
    """{(block image range, h, k, l, image): (I, sigma)} of profile-fitted reflections."""
    out = {}
    prf = reflections.get_flags(reflections.flags.integrated_prf)
    ids = reflections["id"]
    hkl = reflections["miller_index"]
    z = reflections["xyzcal.px"].parts()[2]
    for i in range(len(reflections)):
        if not prf[i]:
            continue
        exp = experiments[ids[i]]
        h = hkl[i]
        if basis is not None:
            h = tuple(int(round(v)) for v in (basis[ids[i]] * __import__("scitbx").matrix.col(h)).elems)
        key = (exp.scan.get_image_range(), tuple(h), int(math.floor(z[i])))
        out[key] = _corrected(reflections, i)
    return out


def _pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def compare(experiments_a, reflections_a, experiments_b, reflections_b, min_isigma=3.0) -> dict:
    """Numbers comparing run b with run a (a is the reference)."""
    from dials_gapfill.tables import mean_cell

    blocks_a = {e.scan.get_image_range(): i for i, e in enumerate(experiments_a)}
    blocks_b = {e.scan.get_image_range(): i for i, e in enumerate(experiments_b)}
    common = sorted(set(blocks_a) & set(blocks_b))
    result = {"blocks_a": sorted(blocks_a), "blocks_b": sorted(blocks_b), "blocks": []}
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
                "images": list(r),
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
    import os

    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials.array_family import flex

    expts = ExperimentListFactory.from_json_file(os.path.join(directory, experiments), check_format=False)
    refl = flex.reflection_table.from_file(os.path.join(directory, reflections))
    return expts, refl
