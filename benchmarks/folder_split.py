#!/usr/bin/env python
"""One simulated sweep whose files lie in two folders, no image missing:
processed whole (one folder), split with the boundary's reflections measured
once (integration.gap_partials=combine, the default) and split with both
parts kept (=separate). Prints rows, rows combined, MTZ reflections and
CC(I, I_true) of the MTZ's summation intensities (I/sigma > 3) for each.

    .venv/bin/python benchmarks/folder_split.py --workdir /tmp/folder_split
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

import dials_gapfill  # noqa: E402,F401  (sets up libtbx for the venv before dials imports)

# the test suite's tiny sweep (tests/conftest.py TINY)
TINY = dict(n_images=40, osc_width=1.0, detector="pilatus300k", distance=150.0, seed=42)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--nproc", type=int, default=1)
    args = p.parse_args(argv)
    import json

    import iotbx.mtz
    from dials.array_family import flex

    from dials_gapfill.simulation.compare import summation_against_truth
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    os.makedirs(args.workdir, exist_ok=True)
    images = os.path.join(args.workdir, "images")
    if not os.path.exists(os.path.join(images, "ground_truth.json")):
        simulate(SimulationConfig(**TINY), images)
    with open(os.path.join(images, "ground_truth.json")) as fh:
        truth = json.load(fh)
    halves = []
    for name, numbers in (("A", range(1, 21)), ("B", range(21, 41))):
        folder = os.path.join(args.workdir, name)
        os.makedirs(folder, exist_ok=True)
        for n in numbers:
            target = os.path.join(folder, f"sim_{n:04d}.cbf")
            if not os.path.lexists(target):
                os.symlink(os.path.join(images, f"sim_{n:04d}.cbf"), target)
        halves.append(folder)
    tool = os.path.join(os.path.dirname(sys.executable), "dials.process_gapped")
    runs = (("one folder", [images], []), ("two folders, combine", halves, []),
            ("two folders, separate", halves, ["integration.gap_partials=separate"]))
    print("| run | blocks | rows integrated | rows combined | MTZ reflections | CC(I_sum, I_true), full rows, I/sigma > 3 (n) |")
    print("|---|---:|---:|---:|---:|---|")
    for name, inputs, phil in runs:
        out = os.path.join(args.workdir, name.replace(" ", "_").replace(",", ""))
        subprocess.run([tool, *inputs, f"output.directory={out}", f"nproc={args.nproc}", *phil],
                       check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, "dials.process_gapped.json")) as fh:
            summary = json.load(fh)
        r = flex.reflection_table.from_file(os.path.join(out, "integrated.refl"))
        combined = r["gap_combined"].count(True) if "gap_combined" in r else 0
        r = r.select(r.get_flags(r.flags.integrated_sum) & (r["partiality"] > 0.99))
        intensity, sigma, true = summation_against_truth(r, truth)
        ok = np.isfinite(true) & (intensity / sigma > 3)
        n_mtz = iotbx.mtz.object(os.path.join(out, "integrated.mtz")).n_reflections()
        print(f"| {name} | {len(summary['blocks'])} | {summary['totals']['integrated']} | {combined} | {n_mtz} | "
              f"{np.corrcoef(intensity[ok], true[ok])[0, 1]:.5f} ({ok.sum()}) |")


if __name__ == "__main__":
    main()
