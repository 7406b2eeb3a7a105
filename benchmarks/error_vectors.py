#!/usr/bin/env python3
"""The orientation error at every image as a lab-frame vector, runs side by side.

For refined experiments of a simulated sweep (``integrated.expt`` of
dials.process_gapped or of the DIALS chain), the rotation that is left at each
image after the one gauge rotation common to all images is removed
(``dials_gapfill.simulation.compare.orientation_errors``), printed as its
angle and its x, y, z components (axis times angle, degrees; DIALS' lab
frame: x along the default spindle, z against the beam).  Noise shows as
scatter between images; an error the data share (a systematic one) as the
same smooth curve in every run.

    .venv/bin/python benchmarks/error_vectors.py <ground_truth.json> NAME=<run>/integrated.expt [NAME=...]
        [--every 4]

The ground truth is the simulator's (``benchmarks/chain_truth.py`` keeps it
under ``<workdir>/images/<key>/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import dials_gapfill  # noqa: E402,F401  (before dxtbx)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("truth", help="the simulator's ground_truth.json")
    p.add_argument("runs", nargs="+", metavar="NAME=EXPT", help="a name and refined experiments")
    p.add_argument("--every", type=int, default=1, help="print every n-th image (1)")
    args = p.parse_args(argv)

    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.simulation import compare

    with open(args.truth) as fh:
        truth = json.load(fh)
    results = {}
    for run in args.runs:
        name, _, path = run.partition("=")
        if not path:
            p.error(f"{run}: give NAME=path/to/integrated.expt")
        experiments = ExperimentListFactory.from_json_file(path, check_format=False)
        r = compare.orientation_errors(experiments, truth)
        sweeps = r.get("sweeps") or [1] * len(r["images"])  # several sweeps: (sweep, image)
        results[name] = {(k, n): (e, v) for k, n, e, v in zip(sweeps, r["images"], r["errors_deg"], r["vectors_deg"])}
        print(f"{name}: median {r['median']:.4f} worst {r['worst']:.4f} deg ({path})")
    keys = sorted(set().union(*results.values()))
    keys = [key for key in keys if (key[1] - 1) % max(1, args.every) == 0 or key == keys[-1]]
    print("\nsweep image " + " ".join(f"| {name[:30]:^30} " for name in results))
    print("            " + " ".join(f"| {'angle':>6} {'x':>7} {'y':>7} {'z':>7} " for _ in results))
    for key in keys:
        cells = []
        for rows in results.values():
            if key in rows:
                e, v = rows[key]
                cells.append(f"| {e:6.4f} {v[0]:+.4f} {v[1]:+.4f} {v[2]:+.4f} ")
            else:
                cells.append(f"| {'-':>6} {'':>7} {'':>7} {'':>7} ")
        print(f"{key[0]:5d} {key[1]:5d} " + " ".join(cells))


if __name__ == "__main__":
    main()
