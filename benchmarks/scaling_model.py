#!/usr/bin/env python3
"""Benchmark: which scaling model, physical or KB, and when `auto` falls back.

With scaling.model=auto the run takes DIALS' own model (physical for rotation
data, KB for a block under 1 deg) and, with two or more blocks, scales again
with KB when it gave any scale factor below DIALS' small_scale_cutoff (0.001:
DIALS leaves the observation out and says "it may be best to rerun
scaling"), keeping KB when fewer are left out.  This script measures
that statistic on real and simulated data: each data set is processed once
with defaults (no scaling), then its integrated.expt / integrated.refl are
scaled in process (dials_gapfill.stages.scaling.scale, the scaling stage
itself) with scaling.model=physical, KB and auto, and for each it prints
the blocks, the model used, the scale factors below 0.001, the
observations kept, the range of the kept scale factors, overall CC½, the
merged reflections, and the repeated measurements (observations beyond the
first of each reflection) per scale parameter, which the run flags below 5;
and dials.scale with its defaults on the same files.

Data sets (--data, comma-separated):
  lcys          the four L-cysteine wedges, all 60 images (../shared)
  lcys_gapped   the same with images 1:6:7 and 3:10:10 left out
  sim_gapped    the tests' simulated 120-image P 21 21 21 sweep without
                images 41-45 and 81-83 (three blocks)
  ed            a simulated 120-frame electron-diffraction sweep with every
                20th frame left out (dials_gapfill.simulation.electron;
                phil/electron_diffraction.phil; six blocks)

  .venv/bin/python benchmarks/scaling_model.py --workdir /tmp/scaling_model
  .venv/bin/python benchmarks/scaling_model.py --workdir /tmp/scaling_model --data lcys --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
TOOL = os.path.join(os.path.dirname(sys.executable), "dials.process_gapped")


def _process(images, folder, *phil):
    if os.path.exists(os.path.join(folder, "integrated.refl")):
        return folder
    os.makedirs(folder, exist_ok=True)
    result = subprocess.run([TOOL, *images, f"output.directory={folder}", "nproc=1", *phil],
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{folder}: {result.stderr.strip()}")
    return folder


def lcys(workdir, gapped=False):
    images = [os.path.join(SHARED, "l_cysteine")]
    phil = ["exclude_images=1:6:7,3:10:10"] if gapped else []
    return _process(images, os.path.join(workdir, "lcys_gapped" if gapped else "lcys"), *phil)


def sim_gapped(workdir):
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    images = os.path.join(workdir, "sim_images")
    if not os.path.exists(os.path.join(images, "ground_truth.json")):
        simulate(SimulationConfig(n_images=120, seed=42), images)
    config = SimulationConfig(n_images=120, seed=42)
    kept = [os.path.join(images, config.filename(n)) for n in range(1, 121)
            if not (41 <= n <= 45 or 81 <= n <= 83)]
    return _process(kept, os.path.join(workdir, "sim_gapped"))


def ed(workdir):
    from dials_gapfill.simulation.electron import EDSimulationConfig, simulate_ed

    images = os.path.join(workdir, "ed_images")
    if not os.path.exists(os.path.join(images, "ground_truth.json")):
        simulate_ed(EDSimulationConfig(tracking="none", n_images=120, osc_width=0.4, seed=3, tracking_every=20),
                    images)
    return _process([images], os.path.join(workdir, "ed"), os.path.join(ROOT, "phil", "electron_diffraction.phil"),
                    "exclude_images_multiple=20")


DATA = {"lcys": lcys, "lcys_gapped": lambda w: lcys(w, gapped=True), "sim_gapped": sim_gapped, "ed": ed}


def scale_three_ways(folder):
    import numpy as np
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.phil import params_from
    from dials_gapfill.stages.scaling import scale

    rows = {}
    for model in ("physical", "KB", "auto"):
        experiments = ExperimentListFactory.from_json_file(os.path.join(folder, "integrated.expt"),
                                                           check_format=False)
        reflections = flex.reflection_table.from_file(os.path.join(folder, "integrated.refl"))
        if model == "KB" and len(experiments) < 2:
            rows[model] = None
            continue
        (_, joint), record = scale(experiments, reflections, params_from(["scale=True", f"scaling.model={model}"]),
                                   None)
        good = ~joint.get_flags(joint.flags.bad_for_scaling, all=False)
        factors = np.array(joint["inverse_scale_factor"].select(good))
        s = record.scaling
        rows[model] = {
            "blocks": len(experiments), "used": s["model"]["used"], "small": s["model"]["small_scales"],
            "kept": s["model"]["kept"], "factor_min": float(factors.min()), "factor_max": float(factors.max()),
            "cc_half": s["cc_half"][0], "merged": s["n_unique"][0], "d_min": s["d_min"][0],
            "replaced": s["model"].get("replaced"),
            "parameters": s["model"]["parameters"], "differences": s["n_obs"][0] - s["n_unique"][0],
            "flagged": any("repeated measurements" in w for w in record.warnings),
        }
    return rows


def dials_scale(folder):
    """dials.symmetry, then dials.scale, with their defaults on the same
    integrated.expt/.refl, as a user of the DIALS chain runs them: (scale
    factors below 0.001 as dials.scale's log counts them, reflections in its
    unmerged MTZ), or None when one of them fails."""
    import re

    import iotbx.mtz

    work = os.path.join(folder, "dials_scale")
    os.makedirs(work, exist_ok=True)
    for command in (["dials.symmetry", os.path.join(folder, "integrated.expt"), os.path.join(folder, "integrated.refl")],
                    ["dials.scale", "symmetrized.expt", "symmetrized.refl", "unmerged_mtz=scaled.mtz"]):
        if subprocess.run(command, cwd=work, capture_output=True, text=True).returncode:
            return None
    log = open(os.path.join(work, "dials.scale.log")).read()
    small = sum(int(n) for n in re.findall(r"(\d+) reflections excluded: scale factor <", log))
    return small, iotbx.mtz.object(os.path.join(work, "scaled.mtz")).n_reflections()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data", default="lcys,lcys_gapped,sim_gapped,ed")
    parser.add_argument("--json")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    results = {}
    for name in args.data.split(","):
        folder = DATA[name](args.workdir)
        results[name] = scale_three_ways(folder)
        results[name]["dials.scale"] = dials_scale(folder)  # the DIALS chain
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    head = ("| data | blocks | model asked | used | factors < 0.001 | kept | kept factors | CC½ | merged | d_min (Å) "
            "| repeated measurements / scale parameters (flagged below 5) |")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name, rows in results.items():
        for model, r in rows.items():
            if model == "dials.scale":
                text = "failed" if r is None else f"{r[0]} | {r[1]} (in its scaled.mtz)"
                print(f"| {name} | | dials.symmetry, dials.scale | DIALS' choice | {text} | | | | | |")
                continue
            if r is None:
                print(f"| {name} | 1 | {model} | refused (one block) | | | | | | | |")
                continue
            cc = "-" if r["cc_half"] is None else f"{r['cc_half']:.4f}"
            print(f"| {name} | {r['blocks']} | {model} | {r['used']} | {r['small']} | {r['kept']} | "
                  f"{r['factor_min']:.3g}-{r['factor_max']:.3g} | {cc} | {r['merged']} | {r['d_min']:.2f} | "
                  f"{r['differences']} / {r['parameters']} = {r['differences'] / r['parameters']:.1f}"
                  f"{' (flagged)' if r['flagged'] else ''} |")


if __name__ == "__main__":
    main()
