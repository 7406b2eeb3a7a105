#!/usr/bin/env python
"""The four L-cysteine sweeps with one image left out, at each of several places.

Real sparse data (1-5 spots per frame) leave the lattice search little to
spare: which image is missing changes what it sees.  For every (sweep, image)
asked for, a folder of links to the 60 images without that one is processed
with ``dials.process_gapped`` and the given parameters; the complete sweeps
are run too.  Printed per run: how the lattice search went (the warnings it
left), the cell and its largest relative difference from the reference cell
of the complete sweeps (``dials.two_theta_refine`` in DIALS' small-molecule
tutorial, 5.42183 8.13282 12.02218 A), in esds, indexed / integrated /
profile-fitted counts and the RMSDs over all blocks.

Usage (about 6 minutes with the default 12 positions on 2 cores)::

    .venv/bin/python benchmarks/l_cysteine_gaps.py --workdir /tmp/lc_gaps [--images 3,7,11] \
        [--sweeps 1,2,3,4] [--also 2:11+3:3+4:3] [--jobs 2] [--label NAME] [-- extra PHIL ...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "l_cysteine"))
REFERENCE_CELL = np.array((5.42183, 8.13282, 12.02218))
COMMAND = os.path.join(os.path.dirname(sys.executable), "dials.process_gapped")


def folder_without(workdir, left_out):
    """Links to the 60 images but those of `left_out`, [(sweep, image)]."""
    name = "+".join(f"s{s}_i{i:02d}" for s, i in left_out) or "complete"
    skip = {f"l-cyst_{s:02d}_{i:05d}.cbf.bz2" for s, i in left_out}
    d = os.path.join(workdir, "images", name)
    if not os.path.isdir(d):
        os.makedirs(d)
        for path in sorted(glob.glob(os.path.join(DATA, "l-cyst_0?_?????.cbf.bz2"))):
            base = os.path.basename(path)
            if base not in skip:
                os.symlink(path, os.path.join(d, base))
    return name, d


def run(workdir, label, name, images, extra):
    out = os.path.join(workdir, label, name)
    if not os.path.exists(os.path.join(out, "dials.process_gapped.json")):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        t0 = time.time()
        result = subprocess.run([COMMAND, images, f"output.directory={out}", "nproc=1", *extra],
                                capture_output=True, text=True)
        seconds = time.time() - t0
        if result.returncode:
            return {"name": name, "failed": (result.stderr or result.stdout).strip().splitlines()[-1:]}
        with open(os.path.join(out, "seconds"), "w") as fh:
            fh.write(f"{seconds:.1f}")
    return summarise(name, out)


CHAIN = [
    ["dials.import"],  # the image files follow
    ["dials.find_spots", "imported.expt", "nproc=1"],
    ["dials.index", "imported.expt", "strong.refl", "joint_indexing=True"],
    ["dials.refine", "indexed.expt", "indexed.refl"],
    # its defaults stop at profile modelling on these sparse sweeps
    ["dials.integrate", "refined.expt", "refined.refl", "nproc=1", "profile.gaussian_rs.min_spots.overall=0",
     "profile.gaussian_rs.min_spots.per_degree=0"],
]


def run_chain(workdir, name, images):
    """The DIALS command-line chain on the same images: the step it stopped
    at (or None), the mean cell of its crystals and the integrated count."""
    out = os.path.join(workdir, "chain", name)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    stopped = None
    for step in CHAIN:
        args = step + (sorted(glob.glob(os.path.join(images, "*.bz2"))) if step[0] == "dials.import" else [])
        result = subprocess.run(args, cwd=out, capture_output=True, text=True)
        if result.returncode:
            last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:]
            stopped = f"{step[0]}: {' '.join(last)[:80]}"
            break
    row = {"name": name, "stopped": stopped, "seconds": time.time() - t0}
    if stopped is None:
        from dials.array_family import flex
        from dxtbx.model.experiment_list import ExperimentListFactory

        expts = ExperimentListFactory.from_json_file(os.path.join(out, "integrated.expt"), check_format=False)
        cells = np.array([mean_cell(c) for c in expts.crystals()])
        cell = cells.mean(axis=0)[:3]
        rel = cell / REFERENCE_CELL - 1
        refl = flex.reflection_table.from_file(os.path.join(out, "integrated.refl"))
        row.update(cell=[round(float(c), 4) for c in cell], rel_max_pct=round(100 * float(rel[np.argmax(np.abs(rel))]), 3),
                   n_crystals=len(cells),
                   integrated=int(refl.get_flags(refl.flags.integrated_sum).count(True)))
    return row


def mean_cell(crystal):
    n = crystal.num_scan_points
    if not n:
        return crystal.get_unit_cell().parameters()
    return np.mean([crystal.get_unit_cell_at_scan_point(i).parameters() for i in range(n)], axis=0)


def summarise(name, out):
    with open(os.path.join(out, "dials.process_gapped.json")) as fh:
        report = json.load(fh)
    with open(os.path.join(out, "seconds")) as fh:
        seconds = float(fh.read())
    cell = np.array(report["crystal"]["static"]["unit_cell"][:3])
    esd = np.array(report["crystal"]["cell_esd"][:3])
    rel = cell / REFERENCE_CELL - 1
    worst = int(np.argmax(np.abs(rel)))
    blocks = report["blocks"]
    # the last job's RMSDs: scan-varying, or static where a block has no scan points
    last = [b.get("rmsd_scan_varying") or b.get("rmsd_static") for b in blocks]
    last = [r for r in last if r and r.get("n")]
    n = sum(r["n"] for r in last)
    rmsd = {key: (sum(r[key] ** 2 * r["n"] for r in last) / n) ** 0.5 if n else float("nan")
            for key in ("x", "y", "phi")}
    return {
        "name": name,
        "cell": [round(float(c), 4) for c in cell],
        "rel_max_pct": round(100 * float(rel[worst]), 3),
        "esds": round(float(rel[worst] * REFERENCE_CELL[worst] / esd[worst]), 1),
        "indexed": sum(b["indexed"] for b in blocks),
        "spots": sum(b["spots"] for b in blocks),
        "integrated": sum(b["integrated"] for b in blocks),
        "profile_fitted": sum(b.get("profile_fitted") or 0 for b in blocks),
        "rmsd": {k: round(v, 3) for k, v in rmsd.items()},
        "n_refined": n,
        "search": "; ".join(w[:70] for w in report["warnings"] if "lattice search" in w) or "-",
        "seconds": seconds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--sweeps", default="1,2,3,4")
    parser.add_argument("--images", default="3,7,11")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--also", default="", help="more cases, each images of several sweeps left out "
                        "together: SWEEP:IMAGE+SWEEP:IMAGE,... (e.g. 2:11+3:3+4:3)")
    parser.add_argument("--label", default="defaults")
    parser.add_argument("--json")
    parser.add_argument("--chain", action="store_true", help="the DIALS chain on the same images instead")
    parser.add_argument("extra", nargs="*", help="PHIL for dials.process_gapped (after --)")
    args = parser.parse_args()
    cases = [folder_without(args.workdir, [])]
    for s in (int(x) for x in args.sweeps.split(",") if x):
        for i in (int(x) for x in args.images.split(",") if x):
            cases.append(folder_without(args.workdir, [(s, i)]))
    for case in (c for c in args.also.split(",") if c):
        cases.append(folder_without(args.workdir, [tuple(int(v) for v in p.split(":")) for p in case.split("+")]))
    if args.chain:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(lambda c: run_chain(args.workdir, *c), cases))
        print("DIALS chain: " + " -> ".join(" ".join(step) for step in CHAIN))
        print("| left out | stopped at | crystals | mean cell (A) | worst length from the reference (%) | integrated | s |")
        print("|---|---|---:|---|---|---:|---:|")
        for r in rows:
            if r["stopped"]:
                print(f"| {r['name']} | {r['stopped']} | | | | | {r['seconds']:.0f} |")
            else:
                print(f"| {r['name']} | - | {r['n_crystals']} | {' '.join(f'{c:.4f}' for c in r['cell'])} "
                      f"| {r['rel_max_pct']:+.3f} | {r['integrated']} | {r['seconds']:.0f} |")
        print(f"stopped: {sum(1 for r in rows if r['stopped'])} of {len(rows)}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=1)
        return
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda c: run(args.workdir, args.label, *c, args.extra), cases))
    print(f"{args.label}: {' '.join(args.extra) or 'defaults'}")
    print("| left out | cell (A) | worst length from the reference: %, esds | indexed / spots | integrated "
          "(profile fitted) | RMSD x y phi (n) | lattice search | s |")
    print("|---|---|---|---|---|---|---|---:|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['name']} | failed: {' '.join(r['failed'])[:100]} | | | | | | |")
            continue
        m = r["rmsd"]
        print(f"| {r['name']} | {' '.join(f'{c:.4f}' for c in r['cell'])} | {r['rel_max_pct']:+.3f}, {r['esds']:+.1f} "
              f"| {r['indexed']} / {r['spots']} | {r['integrated']} ({r['profile_fitted']}) "
              f"| {m['x']:.3f} {m['y']:.3f} {m['phi']:.3f} ({r['n_refined']}) | {r['search']} | {r['seconds']:.0f} |")
    ok = [r for r in rows if "failed" not in r]
    if ok:
        print(f"worst |cell difference| {max(abs(r['rel_max_pct']) for r in ok):.3f} %, "
              f"{max(abs(r['esds']) for r in ok):.1f} esds; failed runs {len(rows) - len(ok)} of {len(rows)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
