"""Phi residuals of integrated reflections near their block's ends: what a
rocking curve cut by a gap or a scan end does to the observed centroid.

For each integrated reflection whose predicted centre lies within 1.5 images
inside a block's end (or up to half an image beyond it), the observed minus
predicted z (images), binned by that distance, next to what a Gaussian
rocking curve of sigma_m / |zeta| cut at the block's end gives: the
centroid of the frames recorded (each at its centre, weighted by the part of
the curve it records) minus the predicted centre.  Far from an end that is
the rounding to a frame's centre alone, which narrow curves on wide frames
show as well.

    .venv/bin/python benchmarks/edge_residuals.py /tmp/msb/seed42/out_gapped --sigma-m 0.12
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np

BINS = ((-0.5, 0.0), (0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0), (1.0, 1.5))


def _cdf(t):
    return 0.5 * (1.0 + np.vectorize(math.erf)(t / math.sqrt(2.0)))


def expected_residual(zc, s, first_frame, end_frame):
    """Centroid of the frames first_frame..end_frame-1, frame centres
    weighted by a Gaussian N(zc, s) integrated over each, minus zc."""
    k = np.arange(int(math.floor(zc - 6 * s - 2)), int(math.ceil(zc + 6 * s + 3)))
    w = _cdf((k + 1 - zc) / s) - _cdf((k - zc) / s)
    inside = (k >= first_frame) & (k < end_frame)
    if w[inside].sum() <= 0:
        return float("nan")
    return float((w[inside] * (k[inside] + 0.5)).sum() / w[inside].sum() - zc)


def main():
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a dials.process_gapped output folder")
    parser.add_argument("--sigma-m", type=float, required=True, help="mosaicity (deg) for the model column")
    args = parser.parse_args()
    experiments = ExperimentListFactory.from_json_file(os.path.join(args.folder, "integrated.expt"),
                                                       check_format=False)
    table = flex.reflection_table.from_file(os.path.join(args.folder, "integrated.refl"))
    table = table.select(table.get_flags(table.flags.integrated_sum))
    if "zeta" not in table:
        table.compute_zeta_multi(experiments)
    zo = np.asarray(table["xyzobs.px.value"].parts()[2])
    zc = np.asarray(table["xyzcal.px"].parts()[2])
    zeta = np.abs(np.asarray(table["zeta"]))
    ids = np.asarray(table["id"])
    sigma_m = math.radians(args.sigma_m)
    rows = []  # (side, distance inside the block, observed - predicted, model)
    for i, exp in enumerate(experiments):
        f, l = exp.scan.get_image_range()
        width = math.radians(abs(exp.scan.get_oscillation()[1]))
        for r in np.where(ids == i)[0]:
            s = min(sigma_m / max(zeta[r], 1e-6), 20 * sigma_m) / width
            for side, distance in (("end", l - zc[r]), ("start", zc[r] - (f - 1))):
                if -0.5 < distance < 1.5:
                    rows.append((side, distance, zo[r] - zc[r], expected_residual(zc[r], s, f - 1, l)))
    print(f"{'side':<6} {'images inside':>14} {'n':>5} {'obs - pred median':>18} {'model':>8}")
    for side in ("end", "start"):
        for lo, hi in BINS:
            sel = [r for r in rows if r[0] == side and lo <= r[1] < hi]
            if sel:
                d = np.array([r[2] for r in sel])
                m = np.array([r[3] for r in sel])
                print(f"{side:<6} {lo:>6.2f} - {hi:<5.2f} {len(sel):>5} {np.median(d):>18.3f} {np.nanmedian(m):>8.3f}")


if __name__ == "__main__":
    main()
