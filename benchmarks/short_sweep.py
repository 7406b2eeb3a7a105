#!/usr/bin/env python
"""A short sweep among long ones: the crystal of each sweep against the truth.

Three sweeps of one simulated crystal (P 21 21 21, 54 x 62 x 71 A, Pilatus
300K at 150 mm, 1 deg images, drift 0.01 deg/deg) at kappa settings
(0, 0), (40, 120) and (-40, 240): 12, 3 and 12 images.  Most spots of the
3-image sweep touch its first or last image, whose end cuts their rocking
curves and pulls their centroids inward.

``dials.process_gapped`` with defaults and any extra PHIL given runs on the
three sweeps; printed per sweep: the orientation error against the truth at
every image (median / worst, deg; one gauge rotation removed for all,
``dials_gapfill.simulation.compare.orientation_errors``) and CC(I, I_true)
of the summation intensities at I/sigma > 3 and partiality > 0.5 and > 0.99.

Usage (about 1 minute per run)::

    .venv/bin/python benchmarks/short_sweep.py --workdir /tmp/short_sweep [--seed 42] [--tails] [PHIL ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def simulate(folder, seed=42, tails=False):
    from dials_gapfill.simulation.multisweep import MultiSweepConfig, SweepConfig, simulate_sweeps
    from dials_gapfill.simulation.simulate import SimulationConfig

    truth_file = os.path.join(folder, "ground_truth.json")
    if not os.path.exists(truth_file):
        simulate_sweeps(MultiSweepConfig(
            base=SimulationConfig(n_images=12, osc_width=1.0, detector="pilatus300k", distance=150.0, seed=seed,
                                  scan_end_tails=tails),
            sweeps=(SweepConfig(scan_axis="omega", angles={}),
                    SweepConfig(scan_axis="omega", angles={"kappa": 40.0, "phi": 120.0}, n_images=3),
                    SweepConfig(scan_axis="omega", angles={"kappa": -40.0, "phi": 240.0}))), folder)
    with open(truth_file) as fh:
        return json.load(fh)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/short_sweep")
    parser.add_argument("--seed", type=int, default=42, help="the simulation's seed (crystal orientation, noise)")
    parser.add_argument("--tails", action="store_true",
                        help="simulate the tails that reflections centred beyond a sweep's ends record on its end "
                             "images (SimulationConfig.scan_end_tails)")
    parser.add_argument("phil", nargs="*", help="extra PHIL for dials.process_gapped")
    args = parser.parse_args()

    from dials_gapfill.simulation import compare

    images = os.path.join(args.workdir, "images")
    truth = simulate(images, args.seed, args.tails)
    out = os.path.join(args.workdir, "run")
    command = [os.path.join(os.path.dirname(sys.executable), "dials.process_gapped"), images, "nproc=1",
               f"output.directory={out}", *args.phil]
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"dials.process_gapped failed: {result.stderr.strip()[-2000:]}")
    experiments, reflections = compare.load(out)
    errors = compare.orientation_errors(experiments, truth)["per_sweep"]
    r = compare.indices_in_truth_basis(experiments, reflections, truth)
    r = r.select(r.get_flags(r.flags.integrated_sum) & (r["partiality"] > 0.5))
    intensity, sigma, true = compare.summation_against_truth(r, truth)
    partiality = np.asarray(r["partiality"])
    sweep_of_block = np.array([compare.sweep_of(e, truth) for e in experiments])[np.asarray(r["id"])]
    print(" ".join(args.phil) or "defaults")
    print("orientation error (deg); CC(I, I_true) at I/sigma > 3, partiality > 0.5 and > 0.99")
    print(f"{'sweep':>5} {'images':>6} {'median':>8} {'worst':>8} {'CC >0.5':>8} {'n':>6} {'CC >0.99':>8} {'n':>6}")
    for sweep, e in sorted(errors.items()):
        n_images = sum(x.scan.get_num_images() for x in experiments if compare.sweep_of(x, truth) == sweep)
        row = [f"{sweep:>5}", f"{n_images:>6}", f"{e['median']:>8.4f}", f"{e['worst']:>8.4f}"]
        for least in (0.5, 0.99):
            ok = np.isfinite(true) & (intensity / sigma > 3) & (sweep_of_block == sweep) & (partiality > least)
            row += [f"{np.corrcoef(intensity[ok], true[ok])[0, 1]:>8.4f}", f"{int(ok.sum()):>6}"]
        print(" ".join(row))


if __name__ == "__main__":
    main()
