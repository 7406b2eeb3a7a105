#!/usr/bin/env python
"""Three simulated sweeps of one crystal, each with gaps, against the same
images without gaps, over several noise seeds.

The sweeps are those of tests/test_multisweep.py (3 x 30 x 1 deg omega scans at
kappa settings (0, 0), (40, 120), (-40, 240), Pilatus 300K, drift going on
through the sweeps; sweep 1 without every 10th image, sweep 2 without images
14-16, sweep 3 without image 21), simulated with each seed in turn.  For each
seed, ``dials.process_gapped`` with its defaults on the gapped sweeps and on
the complete ones; printed:

- the orientation error against the truth at every image (median, worst; lab
  frame, one gauge rotation removed for all sweeps:
  ``dials_gapfill.simulation.compare.orientation_errors``) and the ratios
  gapped / complete;
- the same for each sweep with its own gauge removed (how well a sweep follows
  the crystal, without the sweeps' relative orientations);
- each sweep's mean residual rotation after the common gauge (its offset from
  the other sweeps, degrees, lab frame) and the refined beam's tilt from the
  truth's (degrees; DIALS refines it in the spindle-beam plane).

Usage (2 cores; about 5 minutes a seed)::

    .venv/bin/python benchmarks/multisweep.py --workdir /tmp/multisweep --seeds 42,1,2,3,4,5 [--json out.json]
        [--phil refinement.blocks.continuous_smoother=bspline --tag _bspline] [--drift 0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import dials_gapfill  # noqa: E402,F401  (before dxtbx)
from dials_gapfill.simulation import compare  # noqa: E402
from test_multisweep import MULTI, OMIT  # noqa: E402  (the test's sweeps)

BIN = os.path.dirname(sys.executable)


def simulate(folder: str, seed: int, drift: float | None = None) -> tuple[str, str]:
    from dials_gapfill.simulation.multisweep import MultiSweepConfig, simulate_sweeps
    from dials_gapfill.simulation.simulate import SimulationConfig

    complete, gapped = os.path.join(folder, "complete"), os.path.join(folder, "gapped")
    if not os.path.exists(os.path.join(complete, "ground_truth.json")):
        os.makedirs(complete, exist_ok=True)
        simulate_sweeps(MultiSweepConfig(base=SimulationConfig(**dict(MULTI, seed=seed, **({} if drift is None else {"drift": drift}))), goniometer="kappa",
                                         n_sweeps=3), complete)
    os.makedirs(gapped, exist_ok=True)
    for name in sorted(os.listdir(complete)):
        if name.endswith(".cbf") and int(name[7:11]) not in OMIT[int(name[4:6])]:
            link = os.path.join(gapped, name)
            if not os.path.lexists(link):
                os.symlink(os.path.join(complete, name), link)
    return complete, gapped


def offsets(errors: dict) -> dict:
    """Each sweep's mean residual rotation vector (deg) after the common gauge
    (`errors`: compare.orientation_errors of all sweeps)."""
    vectors = np.array(errors["vectors_deg"])
    sweeps = np.array(errors["sweeps"])
    return {int(s): [round(float(x), 5) for x in vectors[sweeps == s].mean(axis=0)] for s in sorted(set(sweeps))}


def measure(folder: str, truth: dict) -> dict:
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    experiments = ExperimentListFactory.from_json_file(os.path.join(folder, "integrated.expt"), check_format=False)
    errors = compare.orientation_errors(experiments, truth)
    own = {}
    for s in (1, 2, 3):
        mine = ExperimentList([e for e in experiments if compare.sweep_of(e, truth) == s])
        own[s] = compare.orientation_errors(mine, truth)["median"]
    s0, s0_true = np.array(experiments[0].beam.get_s0()), np.array(truth["s0"])
    tilt = np.degrees(np.arccos(np.clip(s0 @ s0_true / np.linalg.norm(s0) / np.linalg.norm(s0_true), -1, 1)))
    return {
        "median": errors["median"], "worst": errors["worst"],
        "own_gauge_medians": own,
        "offsets_deg": offsets(errors),
        "beam_tilt_deg": float(tilt),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="42,1,2,3,4,5")
    parser.add_argument("--json")
    parser.add_argument("--phil", nargs="*", default=[], help="dials.process_gapped parameters for both runs")
    parser.add_argument("--tag", default="", help="suffix of the run folders (out_gapped<tag>, out_complete<tag>)")
    parser.add_argument("--drift", type=float, help="the crystal's drift, deg per deg of scan (the test's: "
                        "SimulationConfig's 0.01); its own folders seed<n>-drift<d>")
    args = parser.parse_args()
    results = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        folder = os.path.join(args.workdir, f"seed{seed}" + ("" if args.drift is None else f"-drift{args.drift:g}"))
        complete, gapped = simulate(folder, seed, args.drift)
        with open(os.path.join(complete, "ground_truth.json")) as fh:
            truth = json.load(fh)
        row = {}
        for name, images in (("gapped", gapped), ("complete", complete)):
            out = os.path.join(folder, f"out_{name}{args.tag}")
            if not os.path.exists(os.path.join(out, "integrated.expt")):
                subprocess.run([os.path.join(BIN, "dials.process_gapped"), images, f"output.directory={out}",
                                "nproc=2", *args.phil], check=True, capture_output=True)
            row[name] = measure(out, truth)
            r = row[name]
            print(f"seed {seed:>3} {name:<8} median {r['median']:.4f} worst {r['worst']:.4f}  each sweep "
                  + " ".join(f"{v:.4f}" for v in r["own_gauge_medians"].values())
                  + f"  offsets |{'| |'.join('%.4f' % np.linalg.norm(v) for v in r['offsets_deg'].values())}|"
                  + f"  beam tilt {r['beam_tilt_deg']:.3f} deg", flush=True)
        row["ratio_median"] = row["gapped"]["median"] / row["complete"]["median"]
        row["ratio_worst"] = row["gapped"]["worst"] / row["complete"]["worst"]
        print(f"seed {seed:>3} ratio median {row['ratio_median']:.2f} worst {row['ratio_worst']:.2f}", flush=True)
        results[seed] = row
    med = [r["ratio_median"] for r in results.values()]
    worst = [r["ratio_worst"] for r in results.values()]
    print(f"{len(results)} seeds: ratio median {np.median(med):.2f} (range {min(med):.2f}-{max(med):.2f}), "
          f"worst {np.median(worst):.2f} (range {min(worst):.2f}-{max(worst):.2f}); "
          f"geometric means {np.exp(np.mean(np.log(med))):.2f} / {np.exp(np.mean(np.log(worst))):.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
