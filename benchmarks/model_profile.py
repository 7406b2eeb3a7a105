#!/usr/bin/env python3
"""Where the crystal model's indexing and refinement spend their time: cProfile.

Finds the spots of a gapped simulated sweep of benchmarks/chain_truth.py
once (cached in the work folder), then runs the default (continuous) model's
``index`` and ``refine`` in this process under cProfile and prints, for each,
the wall clock and the cumulative seconds of the DIALS and dials_gapfill
functions named in PARTS (nested: a part's time includes the parts below
it; processes started by DIALS are counted as the wait for them).

    .venv/bin/python benchmarks/model_profile.py --workdir /tmp/chain_truth --sweep standard
        [--phil indexing.fft3d.reciprocal_space_grid.n_points=128 ...]

With ``--phil`` the model runs with those parameters; the orientation
error against the truth (median, worst) is printed after refinement.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import glob
import os
import pstats
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import dials_gapfill  # noqa: E402,F401  (before dxtbx)

PARTS = {
    "index": [
        ("DIALS lattice search (find_lattices)", "lattice_search/__init__.py", "find_lattices"),
        ("  FFT on the reciprocal-space grid", "basis_vector_search/fft3d.py", "_fft"),
        ("  peak search in the FFT map", "basis_vector_search/fft3d.py", "_find_peaks"),
        ("  candidate lattices refined and compared", "lattice_search/__init__.py", "choose_best_orientation_matrix"),
        ("DIALS indexer's refinement macro-cycles", "indexing/indexer.py", "refine"),
        ("spots indexed against predictions (ours)", "continuous.py", "_index_each_sweep"),
    ],
    "refine": [
        ("refinement jobs (DIALS' run_macrocycle)", "continuous.py", "_macrocycle"),
        ("outlier rejection (DIALS' CentroidOutlier)", "continuous.py", "reject_outliers"),
        ("spots indexed against predictions (ours)", "continuous.py", "_index_each_sweep"),
        ("held-out spots predicted (ours)", "continuous.py", "out_of_sample_rmsd"),
    ],
}


def cumulative(stats, path_part, function):
    total = 0.0
    for (filename, _, name), (_, _, _, ct, _) in stats.stats.items():
        if name == function and filename.endswith(path_part):
            total = max(total, ct)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="benchmarks/chain_truth.py's work folder")
    ap.add_argument("--sweep", default="standard")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--phil", nargs="*", default=[], help="dials.process_gapped parameters")
    args = ap.parse_args()

    from dials.array_family import flex

    from chain_truth import simulated
    from dials_gapfill.crystal_model import ContinuousModel
    from dials_gapfill.phil import params_from
    from dials_gapfill.simulation import compare

    _, gapped, truth = simulated(args.workdir, args.sweep)
    experiments = compare.import_blocks(sorted(glob.glob(os.path.join(gapped, "*.cbf"))))
    cache = os.path.join(args.workdir, args.sweep, "strong_for_profile.refl")
    if os.path.exists(cache):
        spots = flex.reflection_table.from_file(cache)
    else:
        spots = compare.strong_spots(experiments, nproc=args.nproc)
        spots.as_file(cache)
    params = params_from([f"nproc={args.nproc}", *args.phil])
    print(f"{args.sweep}: {len(experiments)} blocks, {len(spots)} spots, nproc {args.nproc} {' '.join(args.phil)}")
    profiler = cProfile.Profile()
    t0 = time.time()
    profiler.enable()
    blocks, indexed, _ = ContinuousModel(params).index(copy.deepcopy(experiments), copy.deepcopy(spots))
    profiler.disable()
    timings = {"index": (time.time() - t0, pstats.Stats(profiler))}
    profiler = cProfile.Profile()
    t0 = time.time()
    profiler.enable()
    refined, _, _ = ContinuousModel(params).refine(blocks, indexed)
    profiler.disable()
    errors = compare.orientation_errors(refined, truth)
    timings["refine"] = (time.time() - t0, pstats.Stats(profiler))
    for step, (wall, stats) in timings.items():
        print(f"\n| {step}: {wall:.1f} s wall | s |\n|---|---:|")
        for label, path_part, function in PARTS[step]:
            print(f"| {label} | {cumulative(stats, path_part, function):.1f} |")
    print(f"\norientation against the truth: median {errors['median']:.4f} worst {errors['worst']:.4f} deg")


if __name__ == "__main__":
    main()
