#!/usr/bin/env python
"""How closely DIALS' Gaussian smoother (the scan-varying crystal's) can follow
a crystal that turns at a constant rate.

For a scan of W degrees cut into n intervals (DIALS' rule: n = int(W /
interval_width_degrees), at least 1), the smoother's value at phi is a
Gaussian-weighted mean of its checkpoint values.  A weighted mean cannot
follow a straight line to the ends of the scan, so the best least-squares
fit of its checkpoint values to the ramp f(phi) = phi (one degree per
degree) leaves an error: printed at the two ends and in the middle half.
Multiply by the drift rate (e.g. 0.01 deg/deg) for the orientation error
the model itself leaves, whatever the data.

    .venv/bin/python benchmarks/smoother_ramp.py [--widths 20,30,60] [--spacings 36,12,9]
"""

from __future__ import annotations

import argparse

import numpy as np


def ramp_residuals(width: float, n_intervals: int, samples: int = 400):
    from dials.algorithms.refinement.parameterisation.scan_varying_model_parameters import GaussianSmoother
    from dials_refinement_helpers_ext import GaussianSmoother as _Core
    from scitbx.array_family import flex

    smoother = GaussianSmoother((0.0, width), n_intervals)
    n = smoother.num_values()
    phi = np.linspace(0.0, width, samples)
    design = np.zeros((samples, n))
    for j in range(n):
        values = flex.double(n, 0.0)
        values[j] = 1.0
        for i, p in enumerate(phi):
            design[i, j] = _Core.value_weight(smoother, p, values).get_value()
    coefficients, *_ = np.linalg.lstsq(design, phi, rcond=None)
    residual = design @ coefficients - phi
    middle = residual[samples // 4: 3 * samples // 4]
    return n, float(abs(residual[0])), float(abs(residual[-1])), float(np.sqrt((middle ** 2).mean()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="20,30,60")
    parser.add_argument("--spacings", default="36,12,9")
    args = parser.parse_args()
    print("| scan | checkpoint spacing | intervals | values | error at the ends (deg per deg/deg of drift) | rms in the middle half |")
    print("|---:|---:|---:|---:|---|---:|")
    for width in (float(w) for w in args.widths.split(",")):
        for spacing in (float(s) for s in args.spacings.split(",")):
            n_intervals = max(int(width / spacing), 1)
            n, first, last, middle = ramp_residuals(width, n_intervals)
            print(f"| {width:g}° | {spacing:g}° | {n_intervals} | {n} | {first:.3f}, {last:.3f} | {middle:.3f} |")


if __name__ == "__main__":
    main()
