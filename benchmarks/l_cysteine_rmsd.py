#!/usr/bin/env python
"""The four L-cysteine sweeps: how well each crystal model predicts spots it
was not refined against, beside the RMSDs of the spots it was.

The DIALS 3.12 chain (``dials.import`` of the 60 images, ``dials.find_spots``,
``dials.index joint_indexing=True``) gives the indexed spots; on them three
refinements, each static then scan-varying:

- ``chain``: ``dials.refine`` with its defaults (a crystal per sweep, cell
  and orientation scan-varying: 85 parameters on some 85 spots);
- ``free cells``: ``dials.refine crystal.unit_cell.force_static=True`` (a
  static cell per sweep, orientation scan-varying);
- ``one cell``: the same with DIALS' equal-shift constraints on the six
  cell parameters of the four crystals (one cell);
- ``ours``: the continuous model of ``dials.process_gapped``
  (``ContinuousModel.refine``: an orientation per sweep, scan-varying, one
  static cell for the four);
- ``ours tied``: the same with a static cell per sweep restrained to their
  mean (``refinement.blocks.continuous_sweep_cells=tied``), with
  ``refinement.blocks.tie_sigma`` 0.01 (its default) and 0.003.

Printed per sweep: the RMSDs of the spots each refinement used (x, y in px,
phi in images, as DIALS' table); the RMSDs of the spots every refinement
used (each model on the same spots, after its own refinement); then the
RMSDs of held-out spots: the
indexed spots are split into K folds (stratified by sweep, one seed); each
fold is predicted by the models refined without it.  Held-out spots are
scored where every full refinement kept them (not outliers in any), so the
three are judged on the same spots.

Usage (about 2 minutes)::

    .venv/bin/python benchmarks/l_cysteine_rmsd.py --workdir /tmp/lc_rmsd [--folds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "l_cysteine"))
SEED = 7
# dials.two_theta_refine on the complete sweeps (DIALS' small-molecule tutorial)
REFERENCE_CELL = np.array([5.42183, 8.13282, 12.02218])
REDUCED = []  # (model, fold, action) of refinements run with auto_reduction.action=fix
ONE_CELL = "".join(
    f"refinement.parameterisation.crystal.unit_cell.constraints {{\n parameter = g_param_{k}\n}}\n" for k in range(6)
)
MODELS = {
    "chain": [],
    "free cells": ["crystal.unit_cell.force_static=True"],
    "one cell": ["crystal.unit_cell.force_static=True", "one_cell.phil"],
    # in process: ContinuousModel.refine with these parameters
    "ours": ("ours", []),
    "ours tied": ("ours", ["refinement.blocks.continuous_sweep_cells=tied"]),
    "tied 0.003": ("ours", ["refinement.blocks.continuous_sweep_cells=tied",
                            "refinement.blocks.tie_sigma=" + ",".join(["0.003"] * 6)]),
}


def _run(cmd, cwd, fail=True):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode and fail:
        sys.exit(f"{' '.join(cmd[:2])} failed in {cwd}: {result.stderr.strip()[-300:]}")
    return result.returncode == 0


def index(workdir, data):
    if not os.path.exists(os.path.join(workdir, "indexed.refl")):
        files = sorted(glob.glob(os.path.join(data, "l-cyst_0*.cbf.bz2")))
        if len(files) != 60:
            sys.exit(f"expected the 60 L-cysteine images in {data}: see ../shared/README.md")
        _run(["dials.import", *files], workdir)
        _run(["dials.find_spots", "imported.expt", "nproc=2"], workdir)
        _run(["dials.index", "imported.expt", "strong.refl", "joint_indexing=True"], workdir)
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    experiments = ExperimentListFactory.from_json_file(os.path.join(workdir, "indexed.expt"), check_format=False)
    reflections = flex.reflection_table.from_file(os.path.join(workdir, "indexed.refl"))
    return experiments, reflections.select(reflections["id"] >= 0)


def refine(name, experiments, reflections, folder):
    """Refined (experiments, reflections) of model `name`."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    os.makedirs(folder, exist_ok=True)
    if isinstance(MODELS[name], tuple):
        from dials_gapfill.crystal_model.continuous import ContinuousModel
        from dials_gapfill.phil import params_from

        out_e, out_r, _ = ContinuousModel(params_from(["nproc=1", *MODELS[name][1]])).refine(experiments, reflections)
        return out_e, out_r
    experiments.as_file(os.path.join(folder, "in.expt"))
    reflections.as_file(os.path.join(folder, "in.refl"))
    with open(os.path.join(folder, "one_cell.phil"), "w") as fh:
        fh.write(ONE_CELL)
    if not _run(["dials.refine", "in.expt", "in.refl", *MODELS[name]], folder, fail=False):
        # too few spots for a parameter (DIALS' auto_reduction): fixed, as
        # dials.refine offers, and counted
        for action in ("fix", "remove"):
            if _run(["dials.refine", "in.expt", "in.refl", *MODELS[name], f"auto_reduction.action={action}"],
                    folder, fail=action == "remove"):
                REDUCED.append((name, os.path.basename(folder), action))
                break
    return (ExperimentListFactory.from_json_file(os.path.join(folder, "refined.expt"), check_format=False),
            flex.reflection_table.from_file(os.path.join(folder, "refined.refl")))


def _rmsds(sweep, dx, dy, dz):
    out = {}
    for s in sorted(set(sweep)):
        rows = sweep == s
        out[int(s) + 1] = {k: float(np.sqrt(np.mean(d[rows] ** 2))) for k, d in (("x", dx), ("y", dy), ("phi", dz))}
        out[int(s) + 1]["n"] = int(rows.sum())
    out["all"] = {k: float(np.sqrt(np.mean(d ** 2))) for k, d in (("x", dx), ("y", dy), ("phi", dz))}
    out["all"]["n"] = len(dx)
    return out


def used_rmsds(reflections, every=False):
    used = reflections if every else reflections.select(reflections.get_flags(reflections.flags.used_in_refinement))
    xo, yo, zo = (np.asarray(p) for p in used["xyzobs.px.value"].parts())
    xc, yc, zc = (np.asarray(p) for p in used["xyzcal.px"].parts())
    return _rmsds(np.asarray(used["id"]), xc - xo, yc - yo, zc - zo)


def common_rmsds(reflections, common):
    """RMSDs of the spots in `common` (keys of spots every refinement used):
    the models judged on the same spots, not each on the spots it kept."""
    from dials.array_family import flex

    rows = flex.bool([k in common for k in _key(reflections)])
    return used_rmsds(reflections.select(rows), every=True)


def _key(table):
    """A row's identity across refinements: sweep and observed centroid."""
    x, y, z = table["xyzobs.px.value"].parts()
    return [(int(i), round(a, 3), round(b, 3), round(c, 3)) for i, a, b, c in zip(table["id"], x, y, z)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.workdir, exist_ok=True)
    workdir = os.path.abspath(args.workdir)
    experiments, reflections = index(workdir, args.data)

    import copy


    from dials_gapfill.simulation.compare import held_out_residuals

    from dials_gapfill.model.tables import mean_cell

    result = {"used": {}, "common": {}, "held_out": {}, "cell": {}, "folds": args.folds}
    inliers = None
    refined = {}
    for name in MODELS:
        exps, out = refine(name, copy.deepcopy(experiments), copy.deepcopy(reflections),
                           os.path.join(workdir, name.replace(" ", "_"), "all"))
        refined[name] = out
        # each crystal's cell (its mean over its scan points), from the reference in %
        cells = np.array([mean_cell(c) for c in exps.crystals()])[:, :3]
        result["cell"][name] = {"mean": (100 * (cells.mean(axis=0) / REFERENCE_CELL - 1)).tolist(),
                                "worst": (100 * np.abs(cells / REFERENCE_CELL - 1).max(axis=0)).tolist()}
        result["used"][name] = used_rmsds(out)
        keys = {k for k, u in zip(_key(out), out.get_flags(out.flags.used_in_refinement)) if u}
        inliers = keys if inliers is None else inliers & keys

    for name in MODELS:
        result["common"][name] = common_rmsds(refined[name], inliers)
    keys = _key(reflections)
    score = [i for i, k in enumerate(keys) if k in inliers]
    for name in MODELS:
        counter = iter(range(args.folds))

        def fold_refine(exps, refl, name=name):
            k = next(counter)
            return refine(name, exps, refl, os.path.join(workdir, name.replace(" ", "_"), f"fold{k}"))[0]

        residuals = held_out_residuals(fold_refine, experiments, reflections, score, folds=args.folds, seed=SEED)
        ids = sorted(residuals)
        result["held_out"][name] = _rmsds(np.concatenate([np.full(len(residuals[i][0]), i) for i in ids]),
                                          *(np.concatenate([residuals[i][c] for i in ids]) for c in range(3)))

    print(f"L-cysteine, 4 sweeps; {len(reflections)} indexed spots, {len(inliers)} kept by every refinement; "
          f"held out in {args.folds} folds (seed {SEED})")
    titles = {
        "used": "the spots each refinement used",
        "common": "the spots every refinement used (the same spots for all)",
        "held_out": "held-out spots",
    }
    for what in ("used", "common", "held_out"):
        print(f"\nRMSD x, y (px), phi (images), n: {titles[what]}")
        print(f"{'model':<12}" + "".join(f"{'sweep ' + str(s):>24}" for s in (1, 2, 3, 4)) + f"{'all':>24}")
        for name in MODELS:
            r = result[what][name]
            print(f"{name:<12}" + "".join(
                f"{r[s]['x']:>7.3f}{r[s]['y']:>6.3f}{r[s]['phi']:>6.3f}{r[s]['n']:>5d}" for s in (1, 2, 3, 4, "all")))
    print("\nCell lengths a, b, c from the reference (%): the crystals' mean; the worst crystal")
    for name in MODELS:
        c = result["cell"][name]
        print(f"{name:<12}" + "".join(f"{v:>+8.3f}" for v in c["mean"]) + "   " + "".join(f"{v:>8.3f}" for v in c["worst"]))
    if REDUCED:
        print("\nrefined with auto_reduction.action=fix (too few spots for a parameter otherwise): "
              + ", ".join(f"{n} {f} ({a})" for n, f, a in REDUCED))
    result["reduced"] = REDUCED
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
