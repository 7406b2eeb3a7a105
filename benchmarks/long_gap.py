#!/usr/bin/env python3
"""Two wedges of one sweep far apart: the continuous model against per-block
crystals, against the simulated truth.

Each case is a simulated sweep of 1 deg images (Pilatus 300K, seed 42, the
default drift of 0.01 deg per deg) of which only images 1-6 and the six
after a gap of GAP images are written: one template, one sweep with one
long gap, as inverse-beam wedges written under one template.  Printed per
case: whether DIALS kept the sweep's orientation static (the warning), the
RMSD x/y of each wedge, the orientation error against the truth per image
(median, worst; compare.orientation_errors) and the integrated count.

    .venv/bin/python benchmarks/long_gap.py --workdir /tmp/long_gap 40 50 60 90 120 174
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dials_gapfill  # noqa: E402,F401  (before dials)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gaps", nargs="+", type=int, help="gap lengths, in images of 1 deg")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--models", default="continuous,per_block")
    args = parser.parse_args(argv)

    from dials_gapfill import process_gapped
    from dials_gapfill.simulation.compare import orientation_errors
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    print("| gap (deg) | model | static (warning) | RMSD x/y wedge 1 (px) | RMSD x/y wedge 2 (px) "
          "| orientation median / worst (deg) | integrated |")
    print("|---:|---|---|---|---|---|---:|")
    for gap in args.gaps:
        folder = os.path.join(args.workdir, f"gap{gap}")
        if not os.path.isdir(folder):
            simulate(SimulationConfig(n_images=12 + gap, omit=tuple(range(7, 7 + gap)), osc_width=1.0,
                                      detector="pilatus300k", distance=150.0, seed=42), folder)
        with open(os.path.join(folder, "ground_truth.json")) as fh:
            truth = json.load(fh)
        for model in args.models.split(","):
            result = process_gapped(folder, ["nproc=1", f"refinement.blocks.model={model}"])
            errors = orientation_errors(result.experiments, truth)
            rmsd = [b["rmsd_scan_varying"] for b in result.summary["blocks"]]
            static = any("stays static" in w for w in result.summary["warnings"])
            print(f"| {gap} | {model} | {'yes' if static else 'no'} | "
                  + " | ".join(f"{r['x']:.3f} / {r['y']:.3f}" for r in rmsd)
                  + f" | {errors['median']:.4f} / {errors['worst']:.4f} | {result.summary['totals']['integrated']} |",
                  flush=True)


if __name__ == "__main__":
    main()
