#!/usr/bin/env python
"""Benchmark of the continuous crystal model: ONE crystal across the gaps.

For each simulated sweep it compares, on the same images,

- ``gapless``: the same sweep without gaps, today's pipeline (one block, one
  scan-varying crystal);
- ``per_block``: today's per-block model on the gapped images;

(both through the pipeline's own indexing and refinement stages on the
same harness, or with ``--full-pipeline`` through ``process_gapped``,
integration included: the same numbers, several minutes more);
- ``continuous``: ``dials_gapfill.crystal_model.continuous`` (index + refine) on the
  gapped images, with a harness made from DIALS only (dxtbx import of the
  file list: one experiment per contiguous run; shared beam, detector,
  goniometer; ``flex.reflection_table.from_observations``), one line per
  gap-edge treatment;

and prints indexed fraction, RMSD x / y (px) / phi (images), orientation
error against the simulator's truth (median / worst over images; see
``dials_gapfill.simulation.compare.orientation_errors``) and the largest relative cell
error.  Sweeps:

- ``every10``: 90 x 0.5 deg, every 10th image missing (9 blocks of 9 images),
  P 41 21 2 57 x 57 x 150 A, Pilatus 1M, accelerating drift
  (0.01 deg/deg + 0.001 deg/deg^2: 2.5 deg over the sweep);
- ``standard``: the default 120 x 0.5 deg sweep without images 41-45 and 81-83;
- ``gap30``: 90 x 1 deg with images 31-60 missing (one 30 deg gap).

Usage (2 cores, about 40 minutes for everything)::

    .venv/bin/python benchmarks/continuous.py [--workdir DIR] [--sweeps every10,standard,gap30]
        [--treatments xy,exclude,full] [--no-pipeline] [--json out.json]
    .venv/bin/python benchmarks/continuous.py --partials         # gap-spanning reflections
    .venv/bin/python benchmarks/continuous.py --intensities [--runs gapless,per_block,continuous_v1,continuous]
        # whole pipeline: CC with the true intensities, orientation, cell, time; the
        # same images without gaps, per_block, the continuous model before the
        # profile model from all blocks and the automatic re-index (continuous_v1),
        # and as it is
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
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

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
    from dials_gapfill.simulation import compare
    oe = compare.orientation_errors(experiments, truth)
    cell = max(compare.cell_error(e.crystal, truth)["rel_error_max"] for e in experiments)
    return oe, cell


def run_pipeline(files, truth, label):
    from dials_gapfill import process_gapped
    t0 = time.time()
    model = "continuous" if label.startswith("gapless") else "per_block"
    result = process_gapped(files, ["nproc=2", f"refinement.blocks.model={model}"])
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


def run_stages(files, truth, label):
    """Today's per-block model without integration: the pipeline's own indexing
    and refinement (dials_gapfill.crystal_model.PerBlockModel: index, refine) on
    the same DIALS-only harness (import, spots) as the continuous model."""
    from dials_gapfill.simulation import compare
    from dials_gapfill.crystal_model import PerBlockModel
    from dials_gapfill.phil import params_from

    experiments = compare.import_blocks(files)
    spots = compare.strong_spots(experiments, nproc=2)
    t0 = time.time()
    params = params_from(["nproc=2", "refinement.blocks.model=per_block"])
    model = PerBlockModel(params)
    experiments, indexed, _ = model.index(experiments, spots)
    ok = indexed.get_flags(indexed.flags.indexed) & (indexed["id"] >= 0)
    fraction = ok.count(True) / len(spots)
    experiments, refined, record = model.refine(experiments, indexed)
    seconds = time.time() - t0
    parts = []
    for exp in experiments:
        stats = record.block(exp.identifier)
        r = stats.get("rmsd_scan_varying") or stats.get("rmsd_static")
        if r:
            parts.append((r["x"], r["y"], r["phi"], r["n"]))
    oe, cell = _errors(experiments, truth)
    return dict(
        label=label, blocks=len(experiments), spots=len(spots), indexed=fraction,
        rmsd=_combine_rmsds(parts), median=oe["median"], worst=oe["worst"], cell=cell,
        seconds=seconds, note="pipeline stages index + refine (no integration)",
    )


def run_continuous(files, truth, label, gap_edge="xy", reindex_cycles=None, phil=()):
    from dials.array_family import flex

    from dials_gapfill.simulation import compare
    from dials_gapfill.crystal_model import ContinuousModel
    from dials_gapfill.phil import params_from

    t0 = time.time()
    experiments = compare.import_blocks(files)
    spots = compare.strong_spots(experiments, nproc=2)
    t1 = time.time()
    params = params_from(["nproc=2", *phil])
    model = ContinuousModel(params, gap_edge=gap_edge, reindex_cycles=reindex_cycles)
    blocks, indexed, _ = model.index(experiments, spots)
    n_edge = indexed["gap_edge"].count(True)
    ok = indexed.get_flags(indexed.flags.indexed) & (indexed["id"] >= 0)
    edge_indexed = (ok & indexed["gap_edge"]).count(True)
    blocks, refined, record = model.refine(blocks, indexed)
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
        label=label, blocks=len(blocks), spots=len(spots), indexed=ok.count(True) / len(spots),
        rmsd=rmsd, median=oe["median"], worst=oe["worst"], cell=cell, seconds=seconds,
        note=f"gap-edge spots {n_edge}, indexed {edge_indexed / max(1, n_edge):.1%}; "
        f"cell esd {['%.3g' % v for v in (record.crystal['cell_esd'] or [])[:3]]}; "
        f"spot finding {t1 - t0:.0f} s",
        errors_deg=oe["errors_deg"], images=oe["images"],
    )


def _truth_lookup(truth, crystal):
    """h (refined basis) -> true I, via the basis change to the truth and its asu."""
    import numpy as np
    from cctbx import crystal as cctbx_crystal
    from cctbx import miller, sgtbx, uctbx
    from cctbx.array_family import flex as cflex

    from dials_gapfill.simulation import compare
    A = np.array(crystal.get_A_at_scan_point(0) if crystal.num_scan_points else crystal.get_A()).reshape(3, 3)
    first = truth["image_range"][0]
    X = compare.basis_to_truth(A, compare.truth_A_mid(truth, first))
    Xinv = np.round(np.linalg.inv(X)).astype(int)
    sym = cctbx_crystal.symmetry(
        unit_cell=uctbx.unit_cell(truth["unit_cell"]),
        space_group=sgtbx.space_group_info(truth["space_group"]).group(),
    )
    table = {tuple(h): I for h, I in zip(truth["intensities"]["miller_index"], truth["intensities"]["I"])}

    def lookup(hkls):
        mapped = cflex.miller_index([tuple(int(v) for v in Xinv @ np.array(h)) for h in hkls])
        asu = miller.set(sym, mapped, anomalous_flag=False).map_to_asu().indices()
        return [table.get(tuple(h)) for h in asu]

    return lookup


def partials(workdir):
    """Reflections whose rocking curve spans a one-image gap: the two partial
    observations (integration.gap_partials=separate) against the one row
    integration.combine_gap_partials makes of them (what the default,
    gap_partials=combine, hands on), CC with the truth (I/sigma > 3; summation
    intensities / partiality for rows with partiality >= 0.4, what the MTZ
    holds), and uncut reflections of the same resolution range."""
    from dials_gapfill import process_gapped
    from dials_gapfill.stages import integration
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    d = os.path.join(workdir, "partials")
    config = dict(n_images=60, osc_width=0.5, detector="pilatus300k", distance=150.0, seed=42)
    if not os.path.exists(os.path.join(d, "ground_truth.json")):
        simulate(SimulationConfig(**config), d)
    with open(os.path.join(d, "ground_truth.json")) as fh:
        truth = json.load(fh)
    omit = set(range(6, 61, 6))
    files = [os.path.join(d, f) for f, n in zip(truth["files"], truth["images_written"]) if n not in omit]
    result = process_gapped(files, ["nproc=2", "integration.gap_partials=separate"])
    expts, refl = result.experiments, result.reflections
    lookup = _truth_lookup(truth, expts[0].crystal)
    pairs = integration.gap_partial_pairs(expts, refl)
    combined, n = integration.combine_gap_partials(expts, refl)

    def cc(table, rows, kind):
        xs, ys = [], []
        true = lookup([table["miller_index"][i] for i in rows])
        for i, t in zip(rows, true):
            if t is None:
                continue
            if kind == "prf":
                if not table.get_flags(table.flags.integrated_prf)[i]:
                    continue
                I, V = table["intensity.prf.value"][i], table["intensity.prf.variance"][i]
            else:
                p = table["partiality"][i]
                if p < 0.4:  # below mtz.partiality_threshold: not exported
                    continue
                I, V = table["intensity.sum.value"][i] / p, table["intensity.sum.variance"][i] / p**2
            scale = table["lp"][i] / table["qe"][i]
            if V <= 0 or I / math.sqrt(V) < 3:
                continue
            xs.append(I * scale)
            ys.append(t)
        from dials_gapfill.simulation.compare import _pearson

        return (_pearson(xs, ys) if len(xs) > 2 else float("nan")), len(xs)

    part = refl["partiality"]
    edge = refl["gap_edge"] if "gap_edge" in refl else None
    singles = [i for p in pairs for i in p]
    comb = [i for i in range(len(combined)) if combined["gap_combined"][i]]
    # uncut reflections in the resolution range of the combined ones
    d = refl["d"] if "d" in refl else refl.compute_d(expts)
    dc = [d[i] for p in pairs for i in p]
    lo, hi = (min(dc), max(dc)) if dc else (0.0, float("inf"))
    uncut = [
        i for i in range(len(refl)) if part[i] > 0.99 and (edge is None or not edge[i]) and lo <= d[i] <= hi
    ]
    print(f"\n== partials: 60 x 0.5 deg, every 6th image missing; {len(pairs)} gap-spanning pairs, {n} combined ==")
    for kind in ("sum", "prf"):
        for label, table_, rows in (
            (f"uncut, d {lo:.2f}-{hi:.2f} A", refl, uncut),
            ("each part alone", refl, singles),
            ("combined (measured once)", combined, comb),
        ):
            c, m = cc(table_, rows, kind)
            print(f"  {kind:<4} {label:<28} CC {c:.4f}  n {m}")


def _cc_truth(experiments, reflections, truth, min_isigma=3.0):
    """CC of integrated intensities with the truth (profile-fitted where
    available, else summation / partiality; lp / qe applied), I/sigma > 3."""
    from dials_gapfill.simulation.compare import _pearson

    lookup = _truth_lookup(truth, experiments[0].crystal)
    r = reflections
    true = lookup(list(r["miller_index"]))
    prf = r.get_flags(r.flags.integrated_prf)
    summ = r.get_flags(r.flags.integrated_sum)
    xs, ys = [], []
    for i, t in enumerate(true):
        if t is None:
            continue
        if prf[i]:
            I, V = r["intensity.prf.value"][i], r["intensity.prf.variance"][i]
        elif summ[i] and r["partiality"][i] >= 0.4:
            p = r["partiality"][i]
            I, V = r["intensity.sum.value"][i] / p, r["intensity.sum.variance"][i] / p**2
        else:
            continue
        if V <= 0 or I / math.sqrt(V) < min_isigma:
            continue
        xs.append(I * r["lp"][i] / r["qe"][i])
        ys.append(t)
    return _pearson(xs, ys), len(xs)


# --intensities: the runs compared on each sweep (label, gapped?, PHIL)
INTENSITY_RUNS = {
    "gapless": (False, []),
    "per_block": (True, ["refinement.blocks.model=per_block"]),
    # the continuous model as it was before the profile model from all
    # blocks and the automatic re-index cycles
    "continuous_v1": (True, ["integration.profile_model=per_block", "refinement.blocks.continuous_reindex_cycles=0"]),
    "continuous": (True, []),
}


def intensities(workdir, names, runs=tuple(INTENSITY_RUNS)):
    """The whole pipeline (process_gapped, integration included) on the same
    images: orientation and cell against the truth, CC of the integrated
    intensities with the truth, time; side by side.  `runs`: keys of
    INTENSITY_RUNS (gapless: the same sweep without its gaps)."""
    from dials_gapfill import process_gapped
    for name in names:
        folder, truth = simulated(workdir, name)
        omit = set(SWEEPS[name]["omit"])
        print(f"\n== {name}: whole pipeline, {len(truth['files']) - len(omit)} images ({len(omit)} missing) ==")
        print(f"{'run':<14} {'integrated':>10} {'CC(I,Itrue)':>12} {'n':>7} {'ori med':>8} {'ori worst':>9} {'cell err':>8} {'s':>6}")
        for label in runs:
            gapped, phil = INTENSITY_RUNS[label]
            files = [
                os.path.join(folder, f) for f, n in zip(truth["files"], truth["images_written"])
                if not (gapped and n in omit)
            ]
            t0 = time.time()
            result = process_gapped(files, ["nproc=2", *phil])
            seconds = time.time() - t0
            oe, cell = _errors(result.experiments, truth)
            cc, n = _cc_truth(result.experiments, result.reflections, truth)
            print(
                f"{label:<14} {len(result.reflections):>10} {cc:>12.5f} {n:>7} {oe['median']:>7.3f}° "
                f"{oe['worst']:>8.3f}° {100 * cell:>7.3f}% {seconds:>6.0f}", flush=True,
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
    parser.add_argument("--reindex-cycles", type=int, default=None, help="default: auto (the pipeline's)")
    parser.add_argument("--no-pipeline", action="store_true", help="only the continuous model")
    parser.add_argument(
        "--full-pipeline", action="store_true",
        help="gapless and per-block runs through process_gapped (with integration) instead of "
        "its indexing and refinement stages",
    )
    parser.add_argument("--no-gapless", default="", help="sweeps without the gapless run (comma-separated)")
    parser.add_argument("--phil", action="append", default=[], help="PHIL for the continuous model")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--runs", default=",".join(INTENSITY_RUNS),
        help=f"with --intensities: which runs ({', '.join(INTENSITY_RUNS)})",
    )
    parser.add_argument("--partials", action="store_true", help="only the gap-spanning partials measurement")
    parser.add_argument(
        "--intensities", action="store_true",
        help="only the whole pipeline with each model: CC with the true intensities, orientation, cell, time",
    )
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    if args.partials:
        return partials(args.workdir)
    if args.intensities:
        return intensities(args.workdir, args.sweeps.split(","), args.runs.split(","))
    results = {}
    for name in args.sweeps.split(","):
        folder, truth = simulated(args.workdir, name)
        all_files = [os.path.join(folder, f) for f in truth["files"]]
        omit = set(SWEEPS[name]["omit"])
        gapped = [f for f, n in zip(all_files, truth["images_written"]) if n not in omit]
        rows = []
        if not args.no_pipeline:
            run, what = (run_pipeline, "process_gapped") if args.full_pipeline else (run_stages, "stages")
            if name not in args.no_gapless.split(","):
                rows.append(run(all_files, truth, f"gapless ({what})"))
            rows.append(run(gapped, truth, f"per-block ({what})"))
        for treatment in args.treatments.split(","):
            rows.append(
                run_continuous(
                    gapped, truth, f"continuous, gap edge {treatment}", treatment, args.reindex_cycles, args.phil
                )
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
