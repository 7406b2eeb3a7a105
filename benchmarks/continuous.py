#!/usr/bin/env python
"""Benchmark of issue 12: ONE continuous crystal model across the gaps.

For each simulated sweep it compares, on the same images,

- ``gapless``: the same sweep without gaps, through ``dials.process_gapped``
  (one block, one scan-varying crystal);
- ``per_block``: today's per-block model, ``dials.process_gapped`` on the
  gapped images;
- ``continuous``: ``dials_gapfill.continuous`` (index + refine) on the
  gapped images, with a harness made from DIALS only (dxtbx import of the
  file list: one experiment per contiguous run; shared beam, detector,
  goniometer; ``flex.reflection_table.from_observations``), one line per
  gap-edge treatment;

and prints indexed fraction, RMSD x / y (px) / phi (images), orientation
error against the simulator's truth (median / worst over images; see
``dials_gapfill.compare.orientation_errors``) and the largest relative cell
error.  Sweeps:

- ``every10``: 90 x 0.5 deg, every 10th image missing (9 blocks of 9 images),
  P 41 21 2 57 x 57 x 150 A, Pilatus 1M, accelerating drift
  (0.01 deg/deg + 0.001 deg/deg^2: 2.5 deg over the sweep);
- ``standard``: the default 120 x 0.5 deg sweep without images 41-45 and 81-83;
- ``gap30``: 90 x 1 deg with images 31-60 missing (one 30 deg gap).

Usage (2 cores, about 40 minutes for everything)::

    .venv/bin/python benchmarks/continuous.py [--workdir DIR] [--sweeps every10,standard,gap30]
        [--treatments xy,exclude,full] [--no-pipeline] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import dials_gapfill  # noqa: E402,F401  (before dxtbx)

SWEEPS = {
    "every10": dict(
        config=dict(
            n_images=90, osc_width=0.5, detector="pilatus1m", unit_cell=(57, 57, 150, 90, 90, 90),
            space_group="P 41 21 2", drift=0.01, drift_acceleration=0.001, seed=42,
        ),
        omit=list(range(10, 91, 10)),
    ),
    "standard": dict(config=dict(n_images=120, seed=42), omit=list(range(41, 46)) + list(range(81, 84))),
    "gap30": dict(config=dict(n_images=90, osc_width=1.0, seed=42), omit=list(range(31, 61))),
}


def simulated(workdir, name):
    from dials_gapfill.simulate import SimulationConfig, simulate

    d = os.path.join(workdir, name)
    if not os.path.exists(os.path.join(d, "ground_truth.json")):
        simulate(SimulationConfig(**SWEEPS[name]["config"]), d)
    with open(os.path.join(d, "ground_truth.json")) as fh:
        truth = json.load(fh)
    return d, truth


def _combine_rmsds(parts):
    """[(x, y, phi, n)] -> overall (x, y, phi, n), n-weighted in quadrature."""
    parts = [p for p in parts if p and p[3]]
    n = sum(p[3] for p in parts)
    if not n:
        return None
    return tuple(math.sqrt(sum(p[k] ** 2 * p[3] for p in parts) / n) for k in range(3)) + (n,)


def _errors(experiments, truth):
    from dials_gapfill import compare

    oe = compare.orientation_errors(experiments, truth)
    cell = max(compare.cell_error(e.crystal, truth)["rel_error_max"] for e in experiments)
    return oe, cell


def run_pipeline(files, truth, label):
    from dials_gapfill import process_gapped

    t0 = time.time()
    result = process_gapped(files, ["nproc=2"])
    seconds = time.time() - t0
    blocks = result.summary["blocks"]
    spots = sum(b["spots"] for b in blocks)
    indexed = sum(b["indexed"] for b in blocks)
    parts = []
    for b in blocks:
        r = b.get("rmsd_scan_varying") or b.get("rmsd_static")
        if r:
            parts.append((r["x"], r["y"], r["phi"], r["n"]))
    oe, cell = _errors(result.experiments, truth)
    return dict(
        label=label, blocks=len(blocks), spots=spots, indexed=indexed / spots if spots else 0,
        rmsd=_combine_rmsds(parts), median=oe["median"], worst=oe["worst"], cell=cell,
        seconds=seconds, note="process_gapped (incl. integration)",
    )


def run_continuous(files, truth, label, gap_edge="xy", reindex_cycles=0):
    from dials.array_family import flex

    from dials_gapfill import compare, continuous
    from dials_gapfill.phil import params_from

    t0 = time.time()
    experiments = compare.import_blocks(files)
    spots = compare.strong_spots(experiments, nproc=2)
    t1 = time.time()
    params = params_from(["nproc=2"])
    blocks, indexed = continuous.index(experiments, spots, params)
    n_edge = indexed["gap_edge"].count(True)
    ok = indexed.get_flags(indexed.flags.indexed) & (indexed["id"] >= 0)
    edge_indexed = (ok & indexed["gap_edge"]).count(True)
    blocks, refined, record = continuous.refine(
        blocks, indexed, params, gap_edge=gap_edge, reindex_cycles=reindex_cycles
    )
    seconds = time.time() - t1
    ok = refined.get_flags(refined.flags.indexed) & (refined["id"] >= 0)
    used = refined.get_flags(refined.flags.used_in_refinement) & ~refined["gap_edge"]
    sub = refined.select(used)
    xo, yo, zo = sub["xyzobs.px.value"].parts()
    xc, yc, zc = sub["xyzcal.px"].parts()
    n = len(sub)
    rmsd = (
        math.sqrt(flex.sum_sq(xc - xo) / n), math.sqrt(flex.sum_sq(yc - yo) / n),
        math.sqrt(flex.sum_sq(zc - zo) / n), n,
    )
    oe, cell = _errors(blocks, truth)
    return dict(
        label=label, blocks=len(blocks), spots=len(refined), indexed=ok.count(True) / len(refined),
        rmsd=rmsd, median=oe["median"], worst=oe["worst"], cell=cell, seconds=seconds,
        note=f"gap-edge spots {n_edge}, indexed {edge_indexed / max(1, n_edge):.1%}; "
        f"cell esd {['%.3g' % v for v in (record['crystal']['unit_cell_esd'] or [])[:3]]}; "
        f"spot finding {t1 - t0:.0f} s",
        errors_deg=oe["errors_deg"], images=oe["images"],
    )


def table(rows):
    head = (
        f"{'model':<28} {'blocks':>6} {'spots':>7} {'indexed':>8} {'rmsd x':>7} {'rmsd y':>7} "
        f"{'rmsd phi':>8} {'ori med':>8} {'ori worst':>9} {'cell err':>8} {'s':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        x, y, phi, _ = r["rmsd"] if r["rmsd"] else (float("nan"),) * 4
        lines.append(
            f"{r['label']:<28} {r['blocks']:>6} {r['spots']:>7} {100 * r['indexed']:>7.1f}% {x:>7.3f} "
            f"{y:>7.3f} {phi:>8.3f} {r['median']:>7.3f}° {r['worst']:>8.3f}° {100 * r['cell']:>7.3f}% "
            f"{r['seconds']:>6.0f}"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/gapfill_continuous_bench")
    parser.add_argument("--sweeps", default="every10,standard,gap30")
    parser.add_argument("--treatments", default="xy,exclude,full")
    parser.add_argument("--reindex-cycles", type=int, default=0)
    parser.add_argument("--no-pipeline", action="store_true", help="only the continuous model")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    results = {}
    for name in args.sweeps.split(","):
        folder, truth = simulated(args.workdir, name)
        all_files = [os.path.join(folder, f) for f in truth["files"]]
        omit = set(SWEEPS[name]["omit"])
        gapped = [f for f, n in zip(all_files, truth["images_written"]) if n not in omit]
        rows = []
        if not args.no_pipeline:
            rows.append(run_pipeline(all_files, truth, "gapless (process_gapped)"))
            rows.append(run_pipeline(gapped, truth, "per-block (process_gapped)"))
        for treatment in args.treatments.split(","):
            rows.append(
                run_continuous(gapped, truth, f"continuous, gap edge {treatment}", treatment, args.reindex_cycles)
            )
        results[name] = rows
        print(f"\n== {name}: {len(all_files)} images, {len(omit)} missing ==")
        print(table(rows))
        for r in rows:
            print(f"  {r['label']}: {r['note']}")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
