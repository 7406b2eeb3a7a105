#!/usr/bin/env python3
"""dials.process_gapped against the floor: dials.find_spots + dials.integrate.

Any processing of a rotation sweep passes over the pixels at least twice: to
find the strong spots and to integrate.  Everything else (indexing,
refinement, export) works on spot lists and models.  This script times, on
the same images with the same nproc, side by side in one run:

  (c)    dials.process_gapped with its default parameters;
  floor  dials.find_spots and dials.integrate, each a DIALS 3.12 command on
         its own.  dials.integrate needs refined experiments: dials.import,
         dials.index and dials.refine make them first (not timed; the
         strong spots dials.index reads are those of the timed
         dials.find_spots).

It prints, per sweep, (c)'s stages (dials.process_gapped.json) against the
two floor steps (wall clock of each process), the ratio c / floor per stage
that has a floor counterpart (spot finding, integration) and in total, what
(c) spends outside the two passes, the integrated counts of both as a check
that they did the same work, and a Markdown table for a results page.

Sweeps (both cut from the same simulated 120 x 0.5 deg Pilatus 2M images as
benchmark.py's default, seed 42):

  standard  images 41-45 and 81-83 left out (3 blocks)
  every10   every 10th image left out (12 blocks of 9)

Examples:

  .venv/bin/python benchmarks/floor.py --sweeps standard
  .venv/bin/python benchmarks/floor.py --workdir /tmp/floor --nproc 2 --json floor.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import benchmark as bm  # noqa: E402  (the same runner, data and helpers as benchmark.py)

# the simulated images of benchmark.py's default run, so a work folder shared
# with it reuses them
SIMULATION = {"images": 120, "osc": 0.5, "detector": "pilatus2m", "seed": 42, "distance": None}

SWEEPS = {
    "standard": ("images 41-45 and 81-83 left out", "41:45,81:83"),
    "every10": ("every 10th image left out", ",".join(f"{n}:{n}" for n in range(10, 121, 10))),
}

# (c)'s stages that pass over the pixels, and the floor step that does the same
PASSES = {"spot finding": "find_spots", "integration": "integrate"}


def git_state():
    """The commit of the (c) that was measured, and whether the tree had changes."""
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + (" (with uncommitted changes)" if dirty else "")


def log_count(path, pattern):
    """The number a DIALS log reports on its line matching `pattern` (last match)."""
    try:
        with open(path, errors="replace") as fh:
            found = re.findall(pattern, fh.read())
    except OSError:
        return None
    return int(found[-1]) if found else None


def chain_floor(run, data, numbers, nproc):
    """import, find_spots (timed), index, refine, integrate (timed)."""
    run.run("import", [bm.dials_tool("dials.import"), *data.select(numbers)])
    run.run("find_spots", [bm.dials_tool("dials.find_spots"), "imported.expt", f"nproc={nproc}"])
    run.run("index", [bm.dials_tool("dials.index"), "imported.expt", "strong.refl"])
    run.run("refine", [bm.dials_tool("dials.refine"), "indexed.expt", "indexed.refl"])
    run.run("integrate", [bm.dials_tool("dials.integrate"), "refined.expt", "refined.refl", f"nproc={nproc}"])


def one_sweep(args, data, name):
    what, omit_text = SWEEPS[name]
    omit = bm.parse_ranges(omit_text)
    numbers = [n for n in data.files if n not in omit]
    blocks = bm.blocks_of(numbers)
    top = os.path.join(args.workdir, "floor", name)
    load = os.getloadavg()
    print(f"\n=== {name}: {what}; {len(numbers)} images in {len(blocks)} blocks; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}  [{top}]", flush=True)
    out = {"sweep": name, "what": what, "omit": sorted(omit), "images": len(numbers), "blocks": len(blocks),
           "loadavg_start": load, "ok": False}

    floor_run = bm.Runner("floor", bm.fresh_dir(os.path.join(top, "floor")), data.files.values())
    c_run = bm.Runner("c", bm.fresh_dir(os.path.join(top, "c")), data.files.values())
    try:
        chain_floor(floor_run, data, numbers, args.nproc)
        bm.chain_c(c_run, data, numbers, args.nproc)
    except bm.StepFailed as e:
        print(f"\nERROR: {e}\n", file=sys.stderr, flush=True)
        out["error"] = str(e)
        out["steps"] = floor_run.steps + c_run.steps
        return out
    out["loadavg_end"] = os.getloadavg()

    steps = {s["name"]: s for s in floor_run.steps}
    c_step = c_run.steps[0]
    report = bm.read_c_json(os.path.join(c_run.directory, "processed"))
    stages = report["timing"]["stages"]
    c_wall = c_step["wall_s"]
    in_stages = sum(s["seconds"] for s in stages)

    rows = []  # (stage, c seconds, floor seconds or None)
    for s in stages:
        floor_step = PASSES.get(s["name"])
        rows.append((s["name"], s["seconds"], steps[floor_step]["wall_s"] if floor_step else None))
    rows.append(("outside the stages", c_wall - in_stages, None))
    c_passes = sum(s["seconds"] for s in stages if s["name"] in PASSES)
    floor_total = sum(steps[f]["wall_s"] for f in PASSES.values())
    floor_cpu = sum(steps[f]["cpu_s"] for f in PASSES.values())

    totals = report.get("totals") or {}
    counts = {
        "c_spots": totals.get("spots"),
        "floor_spots": log_count(steps["find_spots"]["log"], r"Saved (\d+) reflections to strong\.refl"),
        "c_integrated": totals.get("integrated"),
        "floor_integrated": log_count(steps["integrate"]["log"], r"Saving (\d+) reflections to integrated\.refl"),
    }

    print(f"\n{name}: (c) dials.process_gapped against the floor, wall clock seconds (nproc={args.nproc}; (c) by "
          "its stages, the floor by process)")
    print(f"  {'stage':<20} {'(c) s':>8} {'floor s':>8} {'c/floor':>8}")
    for stage, c_s, f_s in rows:
        ratio = f"{c_s / f_s:8.2f}" if f_s else f"{'-':>8}"
        shown = f"{f_s:8.1f}" if f_s is not None else f"{'-':>8}"
        print(f"  {stage:<20} {c_s:8.1f} {shown} {ratio}")
    print(f"  {'the two passes':<20} {c_passes:8.1f} {floor_total:8.1f} {c_passes / floor_total:8.2f}")
    print(f"  {'total':<20} {c_wall:8.1f} {floor_total:8.1f} {c_wall / floor_total:8.2f}")
    print(f"  CPU seconds: (c) {c_step['cpu_s']:.1f}, floor {floor_cpu:.1f} (ratio {c_step['cpu_s'] / floor_cpu:.2f}); "
          f"peak RSS MiB: (c) {c_step['peak_rss_mib']:.0f}, floor "
          f"{max(steps[f]['peak_rss_mib'] for f in PASSES.values()):.0f}")
    print(f"  (c) beyond the floor: {c_wall - floor_total:+.1f} s, of which outside the two passes "
          f"{c_wall - c_passes:.1f} s")
    print(f"  strong spots: (c) {counts['c_spots']}, floor {counts['floor_spots']}; integrated reflections: "
          f"(c) {counts['c_integrated']}, floor {counts['floor_integrated']}")
    untimed = sum(s["wall_s"] for s in floor_run.steps if s["name"] not in PASSES.values())
    print(f"  (not timed: the floor's dials.import, dials.index, dials.refine took {untimed:.1f} s)")

    out.update({
        "ok": True,
        "c": {"wall_s": c_wall, "cpu_s": c_step["cpu_s"], "peak_rss_mib": c_step["peak_rss_mib"],
              "stages": stages, "outside_s": c_wall - in_stages, "passes_s": c_passes,
              "command": c_step["command"], "directory": c_run.directory},
        "floor": {"wall_s": floor_total, "cpu_s": floor_cpu,
                  "steps": {f: steps[f] for f in PASSES.values()},
                  "untimed_steps": [s for s in floor_run.steps if s["name"] not in PASSES.values()],
                  "directory": floor_run.directory},
        "ratios": {"total": c_wall / floor_total, "passes": c_passes / floor_total,
                   **{stage: c_s / f_s for stage, c_s, f_s in rows if f_s}},
        "counts": counts,
    })
    return out


def markdown(results):
    lines = ["| sweep | images (blocks) | spot finding: (c) / floor | integration: (c) / floor | "
             "(c) other stages + outside | total (c) | total floor | c / floor |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        if not r["ok"]:
            lines.append(f"| {r['sweep']} | {r['images']} ({r['blocks']}) | failed | | | | | |")
            continue
        stage = {s["name"]: s["seconds"] for s in r["c"]["stages"]}
        f = r["floor"]["steps"]
        other = r["c"]["wall_s"] - r["c"]["passes_s"]
        cells = [f"{stage.get(c, 0.0):.1f} / {f[s]['wall_s']:.1f} s ({r['ratios'].get(c, float('nan')):.2f})"
                 for c, s in PASSES.items()]
        lines.append(f"| {r['sweep']}: {r['what']} | {r['images']} ({r['blocks']}) | {cells[0]} | {cells[1]} | "
                     f"{other:.1f} s | {r['c']['wall_s']:.1f} s | {r['floor']['wall_s']:.1f} s | "
                     f"**{r['ratios']['total']:.2f}** |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--workdir", help="folder for images and runs (kept; default: a new folder under /tmp); "
                   "simulated images already there (benchmark.py's too) are reused")
    p.add_argument("--nproc", type=int, default=2, help="nproc for every step (2)")
    p.add_argument("--sweeps", default="standard,every10", help=f"comma-separated, of {', '.join(SWEEPS)} "
                   "(standard,every10)")
    p.add_argument("--json", metavar="FILE", help="write all numbers to FILE")
    args = p.parse_args(argv)
    sweeps = [s for s in args.sweeps.replace(" ", "").split(",") if s]
    if not sweeps or any(s not in SWEEPS for s in sweeps):
        p.error(f"--sweeps takes a comma-separated subset of {','.join(SWEEPS)}")
    if args.nproc < 1:
        p.error("--nproc must be at least 1")
    args.workdir = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="gapfill-floor-")
    os.makedirs(args.workdir, exist_ok=True)

    print(f"Work folder: {args.workdir}")
    data, sim_seconds = bm.simulate(types.SimpleNamespace(**SIMULATION), args.workdir)
    cpus = os.cpu_count()
    load = os.getloadavg()
    print(f"nproc={args.nproc}; {cpus} CPUs; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"dials.process_gapped at {git_state() or 'an unknown commit'}")
    if load[0] > 0.5 * (cpus or 1):
        print("warning: the machine is busy (load average above half the CPUs): timings will be disturbed")
    t_start = time.perf_counter()
    bm.warm_cache(data.files.values())

    results = [one_sweep(args, data, name) for name in sweeps]
    md = markdown(results)
    print("\nMarkdown:\n")
    print(md)
    out = {
        "benchmark": "dials_gapfill benchmarks/floor.py",
        "config": {"nproc": args.nproc, "workdir": args.workdir, "sweeps": sweeps, "simulation": SIMULATION,
                   "cpu_count": cpus, "commit": git_state()},
        "simulation_seconds": sim_seconds,
        "loadavg_start": load,
        "loadavg_end": os.getloadavg(),
        "sweeps": results,
        "markdown": md,
        "seconds": time.perf_counter() - t_start,
    }
    load = out["loadavg_end"]
    print(f"\nFloor benchmark took {out['seconds']:.0f} s; load average at the end {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}; files in {args.workdir}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
        print(f"Numbers written to {args.json}")
    ok = all(r["ok"] for r in results)
    if not ok:
        print("floor: at least one step failed (see ERROR above)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
