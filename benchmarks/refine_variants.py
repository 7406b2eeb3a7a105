#!/usr/bin/env python3
"""Refinement variants on the same indexed spots, against the simulator's truth.

Indexes a gapped simulated sweep once (spot finding and indexing of the
chosen model), then refines it once per variant, in this process, and prints
the orientation error at every image (median, worst; one gauge rotation
removed) and the largest relative cell error.  No integration: this isolates
what a refinement choice does.

  per_block: each variant is a list of PHIL words joined by '+', '' = defaults
  continuous: each variant is a checkpoint spacing in degrees

Run in the work folder of benchmarks/chain_truth.py (its images/ and
every10/gapped/), e.g.:

  .venv/bin/python benchmarks/refine_variants.py --workdir /tmp/chain_truth per_block "" "refinement.blocks.tie_cells=False"
  .venv/bin/python benchmarks/refine_variants.py --workdir /tmp/chain_truth continuous 12 10 6
  .venv/bin/python benchmarks/refine_variants.py --workdir /tmp/chain_truth -v continuous 8 10   # each block's RMSDs
  .venv/bin/python benchmarks/refine_variants.py --workdir /tmp/chain_truth --phil refinement.blocks.continuous_smoother=gaussian continuous 12
"""

from __future__ import annotations

import argparse
import copy
import glob
import logging
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=["per_block", "continuous"])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--workdir", required=True, help="benchmarks/chain_truth.py's work folder")
    ap.add_argument("--sweep", default="every10")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--phil", nargs="*", default=[], help="dials.process_gapped parameters for every variant")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="print the models' own log: jobs, re-index cycles, each block's RMSDs")
    args = ap.parse_args()
    if args.verbose:
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
        logging.getLogger("dials.process_gapped").setLevel(logging.INFO)

    from dials_gapfill.crystal_model import ContinuousModel
    from dials_gapfill.crystal_model.per_block import PerBlockModel
    from dials_gapfill.phil import params_from
    from dials_gapfill.simulation import compare

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from chain_truth import simulated

    _, gapped, truth = simulated(args.workdir, args.sweep)  # the sweep's own images and truth
    files = sorted(glob.glob(os.path.join(gapped, "*.cbf")))
    experiments = compare.import_blocks(files)
    spots = compare.strong_spots(experiments, nproc=args.nproc)
    base = [f"nproc={args.nproc}", f"refinement.blocks.model={args.model}", *args.phil]
    if args.model == "per_block":
        blocks, indexed, _ = PerBlockModel(params_from(base)).index(copy.deepcopy(experiments), copy.deepcopy(spots))
    else:
        blocks, indexed, _ = ContinuousModel(params_from(base)).index(copy.deepcopy(experiments), copy.deepcopy(spots))
    for variant in args.variants:
        if args.model == "per_block":
            model = PerBlockModel(params_from(base + [v for v in variant.split("+") if v]))
        else:
            model = ContinuousModel(params_from(base), interval_width_degrees=float(variant))
        t = time.time()
        refined, _, _ = model.refine(copy.deepcopy(blocks), copy.deepcopy(indexed))
        o = compare.orientation_errors(refined, truth)
        cell = max(compare.cell_error(e.crystal, truth)["rel_error_max"] for e in refined)
        oos = (getattr(model, "last", {}).get("out_of_sample") or [None])[-1]
        held_out = (f", held-out RMSD x {oos['x']:.4f} y {oos['y']:.4f} px phi {oos['phi']:.4f} images, "
                    f"robust {oos['x_nmad']:.4f} {oos['y_nmad']:.4f} px {oos['phi_nmad']:.4f} images "
                    f"(n {oos['n']})" if oos else "")
        print(f"{args.model} {variant or 'defaults'}: orientation median {o['median']:.4f} worst "
              f"{o['worst']:.4f} deg, cell {100 * cell:.3f} % ({time.time() - t:.0f} s){held_out}", flush=True)


if __name__ == "__main__":
    main()
