#!/usr/bin/env python
"""How closely a scan-varying smoother can follow a crystal that turns at a
constant or a steadily changing rate: DIALS' Gaussian smoother against the
continuous model's quadratic B-spline (dials_gapfill/crystal_model/smoother.py).

For a scan of W degrees cut into n intervals (DIALS' rule: n = int(W /
interval_width_degrees), at least 1), the best least-squares fit of each
smoother's checkpoint values to the ramp f(phi) = phi (one degree per degree)
and to the parabola f(phi) = phi**2 / W (an accelerating turn; both turn the
crystal by W degrees over the scan, 1 deg/deg on average) leaves an error:
printed at the two ends and in the middle half.  Multiply by the mean drift
rate (e.g. 0.01 deg/deg) for the orientation error the model itself leaves,
whatever the data.
DIALS' smoother is a Gaussian-weighted mean of its nearest checkpoints and
cannot follow a straight line; the B-spline, on the same checkpoints,
represents straight lines and parabolas exactly.

    .venv/bin/python benchmarks/smoother_ramp.py [--widths 20,30,60] [--spacings 36,12,9]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dials_gapfill  # noqa: E402,F401  (before dials)


def _design(width: float, n_intervals: int, kind: str, phi):
    from dials.algorithms.refinement.parameterisation.scan_varying_model_parameters import GaussianSmoother
    from dials_refinement_helpers_ext import GaussianSmoother as _Core
    from scitbx.array_family import flex

    from dials_gapfill.crystal_model.smoother import BSplineSmoother

    smoother = (GaussianSmoother if kind == "gaussian" else BSplineSmoother)((0.0, width), n_intervals)
    n = smoother.num_values()
    design = np.zeros((len(phi), n))
    for j in range(n):
        values = flex.double(n, 0.0)
        values[j] = 1.0
        for i, p in enumerate(phi):
            if kind == "gaussian":
                design[i, j] = _Core.value_weight(smoother, p, values).get_value()
            else:
                design[i, j] = smoother.weights(p).get(j, 0.0)
    return design


def residuals(width: float, n_intervals: int, kind: str, shape: str = "ramp", samples: int = 400):
    """(values, |error| at the start, at the end, rms in the middle half)."""
    phi = np.linspace(0.0, width, samples)
    design = _design(width, n_intervals, kind, phi)
    target = phi if shape == "ramp" else phi ** 2 / width
    coefficients, *_ = np.linalg.lstsq(design, target, rcond=None)
    residual = design @ coefficients - target
    middle = residual[samples // 4: 3 * samples // 4]
    return design.shape[1], float(abs(residual[0])), float(abs(residual[-1])), float(np.sqrt((middle ** 2).mean()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="20,30,60")
    parser.add_argument("--spacings", default="36,12,9")
    args = parser.parse_args()
    print("| scan | spacing | intervals | values | drift | smoother | error at the ends (deg per deg/deg of mean drift) | rms in the middle half |")
    print("|---:|---:|---:|---:|---|---|---|---:|")
    for width in (float(w) for w in args.widths.split(",")):
        for spacing in (float(s) for s in args.spacings.split(",")):
            n_intervals = max(int(width / spacing), 1)
            for shape in ("ramp", "parabola"):
                for kind in ("gaussian", "bspline"):
                    n, first, last, middle = residuals(width, n_intervals, kind, shape)
                    print(f"| {width:g}° | {spacing:g}° | {n_intervals} | {n} | {shape} | {kind} | "
                          f"{first:.3f}, {last:.3f} | {middle:.3f} |")


if __name__ == "__main__":
    main()
