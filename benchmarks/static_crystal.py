#!/usr/bin/env python
"""Each block's static crystal against its scan-varying one, and what the
integration makes of it.

DIALS reads a scan-varying crystal's static A where it needs one crystal
for a block (dials.integrate's ``mask_neighbouring`` of the reference spots:
each pixel's Miller index).  For each data set, ``dials_gapfill.process_gapped``
with its defaults (plus ``--phil``), in this process; printed per block: the
angle between the static U and the U at the block's middle scan point, and
the fraction of its indexed spots whose Miller index the static crystal
gives (within 0.25 in h, k and l); then the profile model and, on simulated
data, CC of the integrated intensities with the true ones (I/sigma > 3).

Run it on two checkouts to compare them (the package imported is printed)::

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before .venv/bin/python benchmarks/static_crystal.py --workdir /tmp/static
    .venv/bin/python benchmarks/static_crystal.py --workdir /tmp/static

Data sets (``--sets``): ``lcys13`` (L-cysteine sweeps 1 and 3 alone, with
``profile.gaussian_rs.min_spots.overall=40``: 47 reference spots), ``lcys``
(the four sweeps), ``tiny8`` (40 x 1 deg simulated, every 8th image
missing), ``standard`` (120 x 0.5 deg simulated, images 41-45 and 81-83
missing).  About 4 minutes for all on 2 cores.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
LCYS = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "l_cysteine"))
SIMULATED = {
    "tiny8": (dict(n_images=40, osc_width=1.0, detector="pilatus300k", distance=150.0, seed=42), range(8, 41, 8)),
    "standard": (dict(n_images=120, seed=42), [*range(41, 46), *range(81, 84)]),
}


def _files(name, workdir):
    """(files, truth or None, extra parameters)"""
    if name == "lcys13":
        return ([f for s in (1, 3) for f in sorted(glob.glob(os.path.join(LCYS, f"l-cyst_0{s}_*.cbf.bz2")))],
                None, ["profile.gaussian_rs.min_spots.overall=40"])
    if name == "lcys":
        return sorted(glob.glob(os.path.join(LCYS, "l-cyst_0*.cbf.bz2"))), None, []
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    config, omit = SIMULATED[name]
    d = os.path.join(workdir, name)
    if not os.path.exists(os.path.join(d, "ground_truth.json")):
        os.makedirs(d, exist_ok=True)
        simulate(SimulationConfig(**config), d)
    truth = json.load(open(os.path.join(d, "ground_truth.json")))
    files = [os.path.join(d, f) for f in truth["files"] if int(f.split("_")[-1].split(".")[0]) not in omit]
    return files, truth, []


def _static_against_scan_varying(experiments, reflections):
    from dials.algorithms.spot_prediction import PixelToMillerIndex
    from scitbx import matrix

    rows = []
    for i, exp in enumerate(experiments):
        c = exp.crystal
        n = c.num_scan_points
        if not n:
            rows.append((None, None))
            continue
        R = matrix.sqr(c.get_U()).transpose() * matrix.sqr(c.get_U_at_scan_point(n // 2))
        angle = R.r3_rotation_matrix_as_unit_quaternion().unit_quaternion_as_axis_and_angle(deg=True)[0]
        static = PixelToMillerIndex(exp.beam, exp.detector, exp.goniometer, exp.scan, c)
        mine = reflections.select((reflections["id"] == i) & reflections.get_flags(reflections.flags.indexed))
        hit = [max(abs(a - b) for a, b in zip(static.h(p, *xyz), hkl)) < 0.25
               for p, xyz, hkl in zip(mine["panel"], mine["xyzobs.px.value"], mine["miller_index"])]
        rows.append((angle, (sum(hit), len(hit))))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--sets", default="lcys13,lcys,tiny8,standard")
    parser.add_argument("--phil", action="append", default=[])
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)

    import dials_gapfill
    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from
    from dials_gapfill.simulation.compare import summation_against_truth
    from dials_gapfill.stages import integration

    print("package:", os.path.dirname(dials_gapfill.__file__))
    for name in args.sets.split(","):
        files, truth, extra = _files(name, args.workdir)
        state = pipeline.Pipeline(params_from(["nproc=2", *extra, *args.phil]), files).run(stop_before="integration")
        rows = _static_against_scan_varying(state.experiments, state.reflections)
        for i, (angle, hits) in enumerate(rows):
            if angle is not None:
                print(f"{name} block {i + 1}: static U {angle:.3f} deg from its middle scan point; "
                      f"static crystal indexes {hits[0]} of {hits[1]} spots")
        try:
            integration.run(state)
        except Exception as e:  # noqa: BLE001 (the message is the result)
            print(f"{name}: integration failed: {e}")
            continue
        r = state.reflections
        summed, fitted = r.get_flags(r.flags.integrated_sum), r.get_flags(r.flags.integrated_prf)
        profiles = sorted({(round(e.profile.sigma_b(deg=True), 5), round(e.profile.sigma_m(deg=True), 5))
                           for e in state.experiments})
        line = f"{name}: integrated {summed.count(True)}, profile fitted {fitted.count(True)}; sigma_b, sigma_m {profiles}"
        if truth is not None:
            r = r.select(fitted)
            _, _, true = summation_against_truth(r, truth)
            scale = np.array(r["lp"]) / (np.array(r["qe"]) if "qe" in r else 1.0)
            i_prf = np.array(r["intensity.prf.value"]) * scale
            s_prf = np.sqrt(np.maximum(np.array(r["intensity.prf.variance"]), 0)) * scale
            ok = np.isfinite(true) & (i_prf > 3 * s_prf)
            line += f"; CC(I prf, I true) {np.corrcoef(i_prf[ok], true[ok])[0, 1]:.5f} on {ok.sum()}"
        print(line)


if __name__ == "__main__":
    main()
