#!/usr/bin/env python
"""Where the intensities of a chain_truth.py run part from the truth: CC of
the summation intensities of full reflections (partiality > 0.99, I/sigma > 3)
with the true ones in ranges of z, the median I / I_true by the number of
frames a reflection spans (reflections close to the spindle span many, and
their Lorentz factor follows the refined beam), the share of the sum of squared residuals
I - I_true held by the 20 largest, and the largest residuals with their
frames (bbox z) and partiality.

    .venv/bin/python benchmarks/cc_outliers.py --workdir /work/bench27 --sweep every10 --runs chain,continuous
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import chain_truth  # noqa: E402  (imports dials_gapfill before dxtbx)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="benchmarks/chain_truth.py's work folder")
    p.add_argument("--sweep", default="every10")
    p.add_argument("--runs", default="chain,continuous")
    p.add_argument("--width", type=int, default=20, help="z range width (images)")
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args(argv)

    from conftest import summation_against_truth
    from dials.array_family import flex

    _, _, truth = chain_truth.simulated(args.workdir, args.sweep)
    for run in args.runs.split(","):
        r = flex.reflection_table.from_file(os.path.join(args.workdir, args.sweep, run, "integrated.refl"))
        r = r.select(r.get_flags(r.flags.integrated_sum) & (r["partiality"] > 0.99))
        intensity, sigma, true = summation_against_truth(r, truth)
        z = np.array(r["xyzcal.px"].parts()[2])
        ok = np.isfinite(true) & (intensity / sigma > 3)
        ranges = []
        for lo in range(0, int(z.max()) + 1, args.width):
            m = ok & (z >= lo) & (z < lo + args.width)
            if m.sum() > 2:
                ranges.append(f"z {lo}-{lo + args.width} {np.corrcoef(intensity[m], true[m])[0, 1]:.5f}")
        span = np.array(r["bbox"].parts()[5] - r["bbox"].parts()[4])
        spans = []
        for lo, hi in ((0, 5), (5, 10), (10, 20), (20, 10**6)):
            m = ok & (span >= lo) & (span < hi)
            if m.sum() > 2:
                spans.append(f"{lo}-{hi - 1 if hi < 10**6 else ''} frames: n {m.sum()}, median I/I_true "
                             f"{np.median(intensity[m] / true[m]):.3f}")
        d2 = (intensity - true)[ok] ** 2
        print(f"{run}: CC {np.corrcoef(intensity[ok], true[ok])[0, 1]:.5f} (n {ok.sum()}); " + "; ".join(ranges)
              + f"; 20 largest squared residuals: {np.sort(d2)[-20:].sum() / d2.sum():.2f} of the sum")
        print("  by the frames a reflection spans (bbox): " + "; ".join(spans))
        hkl, bbox, partiality = list(r["miller_index"]), r["bbox"], r["partiality"]
        for i in np.argsort(-np.abs((intensity - true) * ok))[: args.top]:
            print(f"  {hkl[i]} z {z[i]:.1f} (frames {bbox[i][4]}-{bbox[i][5] - 1}) I {intensity[i]:.0f} "
                  f"I_true {true[i]:.0f} sigma {sigma[i]:.0f} partiality {partiality[i]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
