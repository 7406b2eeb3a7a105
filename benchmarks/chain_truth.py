#!/usr/bin/env python
"""The crystal at every image against the truth: the DIALS command-line chain
as users run it on gapped data, dials.process_gapped's per-block model and its
continuous model, side by side on the same simulated images.

- ``chain``: ``dials.import`` of the file list (one sequence per block),
  ``dials.find_spots``, ``dials.index`` (joint), ``dials.refine`` (its
  defaults: static, then a scan-varying crystal per block), ``dials.integrate``;
- ``per_block``: ``dials.process_gapped refinement.blocks.model=per_block``;
- ``continuous``: ``dials.process_gapped`` with its defaults;
- ``gapless``: ``dials.process_gapped`` on the same sweep without gaps.

For each: the orientation error against the simulator's truth at every image
(median, worst; lab frame, one common gauge rotation removed:
``dials_gapfill.simulation.compare.orientation_errors``; also with only its
part perpendicular to the spindle removed, and with none: a gauge removed in
full takes away the error all images share, which favours one crystal
across the blocks), the largest relative cell error of a block and that of
the blocks' mean cell, CC of the summation intensities of full reflections
with I/sigma > 3 with the true intensities (each run's own, and on the
reflections every run has), the number of those reflections, the angle of
the refined beam from the simulated one, and the wall time.  The run
without gaps is judged on the images the gapped runs have.  Sweeps (``--sweeps``, comma separated):

- ``every10``: 90 x 0.5 deg, every 10th image missing (9-image blocks),
  P 41 21 2 57 x 57 x 150 A, Pilatus 1M, accelerating drift (0.01 deg/deg +
  0.001 deg/deg^2);
- ``every6``: the same crystal, every 6th image missing (5-image blocks);
- ``standard``: 120 x 0.5 deg without images 41-45 and 81-83;
- ``gap30``: 90 x 1 deg without images 31-60;
- ``nodrift``: ``standard`` with a crystal that does not drift (what is
  left of the orientation error without the drift).

With ``--seeds`` each sweep is simulated again with each seed (crystal
orientation and noise; folders ``<sweep>-seed<n>``): one seed's ranking of the
runs can be a draw of its noise.

Usage (2 cores; every10 alone about 15 minutes)::

    .venv/bin/python benchmarks/chain_truth.py --workdir /tmp/chain_truth --sweeps every10
        [--runs chain,per_block,continuous,gapless] [--seeds 42,1,2] [--json out.json]
        [--phil refinement.blocks.continuous_smoother=bspline --tag _bspline]

``--phil`` adds parameters to the dials.process_gapped runs (not the chain's);
``--tag`` is appended to their folder and row names, so that the runs of
another setting sit beside the defaults'.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import dials_gapfill  # noqa: E402,F401  (before dxtbx)

DRIFTING = dict(n_images=90, osc_width=0.5, detector="pilatus1m", unit_cell=(57, 57, 150, 90, 90, 90),
                space_group="P 41 21 2", drift=0.01, drift_acceleration=0.001, seed=42)
SWEEPS = {
    "every10": dict(config=DRIFTING, omit=list(range(10, 91, 10))),
    "every6": dict(config=DRIFTING, omit=list(range(6, 91, 6))),
    "standard": dict(config=dict(n_images=120, seed=42), omit=list(range(41, 46)) + list(range(81, 84))),
    "gap30": dict(config=dict(n_images=90, osc_width=1.0, seed=42), omit=list(range(31, 61))),
    "nodrift": dict(config=dict(n_images=120, seed=42, drift=0.0), omit=list(range(41, 46)) + list(range(81, 84))),
}
BIN = os.path.dirname(sys.executable)


def _tool(name):
    path = os.path.join(BIN, name)
    return path if os.path.exists(path) else shutil.which(name) or name


def _folder(name, seed):
    """The work folder of a sweep: its name, with the seed unless the sweep's own."""
    return name if seed is None or seed == SWEEPS[name]["config"]["seed"] else f"{name}-seed{seed}"


def simulated(workdir, name, seed=None):
    """(complete folder, gapped folder, truth); `seed` replaces the sweep's
    noise and orientation seed."""
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    sweep = SWEEPS[name]
    config = dict(sweep["config"], **({} if seed is None else {"seed": seed}))
    key = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    complete = os.path.join(workdir, "images", key)
    if not os.path.exists(os.path.join(complete, "ground_truth.json")):
        simulate(SimulationConfig(**config), complete)
    gapped = os.path.join(workdir, _folder(name, seed), "gapped")
    if not os.path.isdir(gapped):
        os.makedirs(gapped)
        for path in sorted(glob.glob(os.path.join(complete, "*.cbf"))):
            n = int(os.path.basename(path).split("_")[-1].split(".")[0])
            if n not in sweep["omit"]:
                os.symlink(path, os.path.join(gapped, os.path.basename(path)))
    with open(os.path.join(complete, "ground_truth.json")) as fh:
        return complete, gapped, json.load(fh)


def _run(args, cwd):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed: {(result.stderr or result.stdout)[-800:]}")


def run_chain(gapped, out, nproc):
    os.makedirs(out, exist_ok=True)
    files = sorted(glob.glob(os.path.join(gapped, "*.cbf")))
    _run([_tool("dials.import"), *files], out)
    _run([_tool("dials.find_spots"), "imported.expt", f"nproc={nproc}"], out)
    _run([_tool("dials.index"), "imported.expt", "strong.refl", "joint_indexing=True"], out)
    _run([_tool("dials.refine"), "indexed.expt", "indexed.refl"], out)
    _run([_tool("dials.integrate"), "refined.expt", "refined.refl", f"nproc={nproc}"], out)


def run_ours(images, out, nproc, *phil):
    os.makedirs(out, exist_ok=True)
    _run([_tool("dials.process_gapped"), images, f"output.directory={out}", f"nproc={nproc}", *phil], out)


def measure(folder, truth, images=None):
    """The run's numbers against the truth.  `images`: judge the orientation
    on these image numbers only (a run without gaps on the gapped runs'
    images)."""
    from conftest import summation_against_truth

    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.simulation import compare

    experiments = ExperimentListFactory.from_json_file(os.path.join(folder, "integrated.expt"), check_format=False)
    reflections = flex.reflection_table.from_file(os.path.join(folder, "integrated.refl"))
    errors = compare.orientation_errors(experiments, truth, images=images)
    # the gauge removed in full takes away any error all images share (one
    # crystal across the blocks gains from that, a crystal per block less):
    # with only its part perpendicular to the spindle, and with none
    gauges = {g: compare.orientation_errors(experiments, truth, gauge=g, images=images)
              for g in ("perpendicular", "none")}
    cells = [compare.cell_error(e.crystal, truth) for e in experiments]
    cell = max(c["rel_error_max"] for c in cells)
    # the blocks' mean cell: what a user of a crystal per block reports (one
    # cell's worst-of-blocks error is no order statistic)
    mean = [float(np.mean([c["cell"][k] for c in cells])) for k in range(3)]
    cell_mean = max(abs(a - b) / b for a, b in zip(mean, truth["unit_cell"][:3]))
    r = reflections.select(reflections.get_flags(reflections.flags.integrated_sum) & (reflections["partiality"] > 0.99))
    intensity, sigma, true = summation_against_truth(r, truth)
    ok = np.isfinite(true) & (intensity / sigma > 3)
    cc = float(np.corrcoef(intensity[ok], true[ok])[0, 1])
    # each full reflection by its indices in the truth's basis (one
    # observation of each within a sweep of less than a turn): the runs'
    # CC on the reflections all of them have (common_cc)
    hkl = compare.indices_in_truth_basis(experiments, r, truth)["miller_index"]
    full = {tuple(h): (float(i), float(sg), float(t))
            for h, i, sg, t in zip(hkl, intensity, sigma, true) if np.isfinite(t) and sg > 0}
    s0 = np.array(experiments[0].beam.get_unit_s0())
    true_s0 = np.array(truth["s0"]) / np.linalg.norm(truth["s0"])
    beam = float(np.degrees(np.arccos(np.clip(s0 @ true_s0, -1.0, 1.0))))
    return {"median": errors["median"], "worst": errors["worst"], "gauge_deg": errors["gauge_deg"],
            "perpendicular": [gauges["perpendicular"]["median"], gauges["perpendicular"]["worst"]],
            "no_gauge": [gauges["none"]["median"], gauges["none"]["worst"]],
            "cell": cell, "cell_mean": cell_mean, "cc": cc, "n": int(ok.sum()),
            "beam_deg": beam, "n_images": len(errors["images"]),
            "errors": errors["errors_deg"], "images": errors["images"], "_full": full}


def common_cc(runs: dict) -> dict:
    """{run: (CC, n)} on the full reflections every run measured, with
    I/sigma > 3 in every run: one set of reflections for all."""
    keys = None
    for v in runs.values():
        mine = {k for k, (i, sg, _) in v["_full"].items() if i / sg > 3}
        keys = mine if keys is None else keys & mine
    keys = sorted(keys or [])
    out = {}
    for run, v in runs.items():
        if len(keys) < 3:
            out[run] = (None, len(keys))
            continue
        i = np.array([v["_full"][k][0] for k in keys])
        t = np.array([v["_full"][k][2] for k in keys])
        out[run] = (float(np.corrcoef(i, t)[0, 1]), len(keys))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/chain_truth")
    p.add_argument("--sweeps", default="every10")
    p.add_argument("--runs", default="chain,per_block,continuous,gapless")
    p.add_argument("--seeds", help="comma-separated simulation seeds (default: each sweep's own, 42)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--json", help="write every number to this file")
    p.add_argument("--phil", nargs="*", default=[], help="dials.process_gapped parameters for its runs")
    p.add_argument("--tag", default="", help="suffix of the folders and rows of dials.process_gapped's runs")
    args = p.parse_args(argv)
    results = {}
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    for name, seed in [(n, s) for n in args.sweeps.split(",") for s in seeds]:
        complete, gapped, truth = simulated(args.workdir, name, seed)
        label = _folder(name, seed)
        for run in args.runs.split(","):
            row = run if run == "chain" else run + args.tag
            out = os.path.join(args.workdir, label, row)
            if os.path.isdir(out):
                shutil.rmtree(out)
            t0 = time.time()
            try:
                if run == "chain":
                    run_chain(gapped, out, args.nproc)
                elif run == "per_block":
                    run_ours(gapped, out, args.nproc, "refinement.blocks.model=per_block", *args.phil)
                elif run == "continuous":
                    run_ours(gapped, out, args.nproc, *args.phil)
                elif run == "gapless":
                    run_ours(complete, out, args.nproc, *args.phil)
                # a run without gaps judged on the images the gapped runs have
                gapped_images = next((v["images"] for (lb, _), v in results.items()
                                      if lb == label and "images" in v), None)
                numbers = measure(out, truth, gapped_images if run == "gapless" else None)
            except RuntimeError as e:
                numbers = {"error": str(e)}
            numbers["seconds"] = time.time() - t0
            results[(label, row)] = numbers
            if "error" in numbers:
                print(f"{label:9s} {row:11s} FAILED: {numbers['error'][:200]}", flush=True)
            else:
                print(f"{label:9s} {row:11s} orientation median {numbers['median']:.4f} worst {numbers['worst']:.4f} deg"
                      f"  cell {100 * numbers['cell']:.3f} %  CC {numbers['cc']:.5f} (n {numbers['n']})"
                      f"  beam {numbers['beam_deg']:.2f} deg from the truth"
                      f"  {numbers['seconds']:.0f} s", flush=True)
    for label in dict.fromkeys(k[0] for k in results):
        ok = {run: v for (lb, run), v in results.items() if lb == label and "error" not in v}
        for run, (cc, n) in common_cc(ok).items():
            ok[run]["common_cc"], ok[run]["common_n"] = cc, n
    print("\n| sweep | run | images judged | orientation median / worst (deg): gauge removed; its part "
          "perpendicular to the spindle only; none | gauge (deg) | cell error: worst block; blocks' mean "
          "| CC(I, I_true), own reflections (n) | CC, the reflections all runs have (n) |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, run), v in results.items():
        if "error" in v:
            print(f"| {name} | {run} | failed | | | | | |")
            continue
        cc = f"{v['common_cc']:.5f} ({v['common_n']})" if v.get("common_cc") is not None else "-"
        print(f"| {name} | {run} | {v['n_images']} | {v['median']:.4f} / {v['worst']:.4f}; "
              f"{v['perpendicular'][0]:.4f} / {v['perpendicular'][1]:.4f}; {v['no_gauge'][0]:.4f} / "
              f"{v['no_gauge'][1]:.4f} | {v['gauge_deg']:.4f} | {100 * v['cell']:.3f} %; "
              f"{100 * v['cell_mean']:.3f} % | {v['cc']:.5f} ({v['n']}) | {cc} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({f"{k[0]}/{k[1]}": {key: x for key, x in v.items() if not key.startswith("_")}
                       for k, v in results.items()}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
