#!/usr/bin/env python3
"""Benchmark: a cRED sweep with crystal-tracking frames (dials/dials#2339).

One simulated continuous-rotation electron-diffraction sweep (default 240
frames of 0.4 deg, 0.0251 A, a 512 x 512 Timepix as TimePix_SU SMV files,
carbamazepine-like P 1 21/n 1 cell; dials_gapfill.simulation.electron), in
two versions made from the same frames: without tracking frames, and with
every 20th frame a crystal-tracking frame (a defocused image: no Bragg
spots).  Processed, with the same nproc and the same electron-diffraction
settings (phil/electron_diffraction.phil: camera length and detector tilts
fixed, the axis direction in the detector plane refined), by

  ref       dials.process_gapped on the sweep without tracking frames (the
            same frames, nothing left out: what the gaps cost is measured
            against it);
  multiple  dials.process_gapped, tracking frames left out with
            exclude_images_multiple=20 (never read);
  auto      dials.process_gapped, tracking frames found by the bad-image stage;
  cli       the DIALS 3.12 command line: dials.import of the file list without
            the tracking frames (one sequence per block), dials.find_spots,
            dials.index, dials.refine, dials.integrate (the phil file given to
            dials.index and dials.refine), dials.export;

and compared with the truth: orientation error per image (median, worst;
dials_gapfill.simulation.compare.orientation_errors: the lab-frame setting
matrices after removing the one rotation common to all images), the cell
(mean over blocks) and its largest relative error in a, b, c, CC of the
summation intensities (LP-corrected, divided by partiality, partiality >= 0.4
as dials.export writes them) with the true ones at I/sigma > 3, counts and
wall-clock / CPU times (os.wait4 of each child process).

  .venv/bin/python benchmarks/electron.py                       # 240 x 0.4 deg
  .venv/bin/python benchmarks/electron.py --workdir /tmp/ed_bench --json ed.json --markdown
  .venv/bin/python benchmarks/electron.py --axis-offset 1.5     # start from an axis 1.5 deg off
  .venv/bin/python benchmarks/electron.py --images 80 --runs multiple,cli   # a quick look
  .venv/bin/python benchmarks/electron.py --images 80 --seed 1 --runs ref,multiple \
      --phil refinement.blocks.continuous_gap_edges=modelled          # other settings for our runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import benchmark as bm  # noqa: E402  (its program lookup)

PHIL = os.path.join(ROOT, "phil", "electron_diffraction.phil")
RUNS = ("ref", "multiple", "auto", "cli")
TITLES = {
    "ref": "process_gapped, no tracking frames",
    "multiple": "process_gapped exclude_images_multiple=N",
    "auto": "process_gapped, tracking frames found",
    "cli": "DIALS 3.12 command line",
}


gapfill_tool = bm.venv_tool  # this package's console scripts, as benchmark.py finds them
dials_tool = bm.dials_tool



class StepFailed(Exception):
    pass


def run_step(steps, name, argv, cwd, shown=None):
    """Run one child process in `cwd` (its output to logs/<n>_<name>.log);
    record wall and CPU time."""
    os.makedirs(os.path.join(cwd, "logs"), exist_ok=True)
    log = os.path.join(cwd, "logs", f"{len(steps) + 1:02d}_{name}.log")
    print(f"    {shown or name:<60}", end="", flush=True)
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    steps.append({"name": name, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "returncode": code})
    print(f"{wall:8.1f} s", flush=True)
    if code != 0:
        with open(log, errors="replace") as fh:
            tail = "".join(fh.readlines()[-20:])
        raise StepFailed(f"{name} failed (exit code {code}) in {cwd}; last lines of {log}:\n{tail}")


# --------------------------------------------------------------------------
# The sweeps
# --------------------------------------------------------------------------


def make_sweeps(args, workdir):
    """(folder without tracking frames, folder with defocused tracking frames,
    the tracking frames' numbers, truth); made once per workdir and settings."""
    from dials_gapfill.simulation.electron import EDSimulationConfig, ed_simulation, simulate_ed

    settings = dict(n_images=args.images, osc_width=args.osc, seed=args.seed, tracking_every=args.every)
    complete = os.path.join(workdir, "images_no_tracking")
    tracking = os.path.join(workdir, "images_tracking")
    stamp = os.path.join(workdir, "simulation.json")
    config = EDSimulationConfig(tracking="defocused", **settings)
    frames = config.tracking_frames
    if os.path.exists(stamp) and json.load(open(stamp)) == settings:
        print(f"Reusing the simulated frames in {workdir}")
    else:
        for d in (complete, tracking):
            shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        simulate_ed(EDSimulationConfig(tracking="none", **settings), complete)
        # the same frames, the tracking frames defocused (each frame has its own
        # random stream, so the others are the same files)
        os.makedirs(tracking)
        sim = ed_simulation(config)
        for n in config.image_numbers:
            name = config.filename(n)
            if n in frames:
                with open(os.path.join(tracking, name), "wb") as fh:
                    fh.write(sim.image_bytes(n))
            else:
                os.symlink(os.path.join(complete, name), os.path.join(tracking, name))
        with open(stamp, "w") as fh:
            json.dump(settings, fh)
        print(f"Simulated {args.images} frames of {args.osc} deg (tracking frames {frames[0]}, "
              f"{frames[1]}, ...) in {time.perf_counter() - t0:.0f} s into {workdir}")
    with open(os.path.join(complete, "ground_truth.json")) as fh:
        truth = json.load(fh)
    return complete, tracking, frames, truth


def axis_override(offset_deg):
    """geometry.goniometer.axis= for an axis turned by offset_deg (about the
    beam) from the format's, or nothing."""
    if not offset_deg:
        return []
    a = (-0.755, -0.656)
    norm = math.hypot(*a)
    t = math.radians(offset_deg)
    x = (a[0] * math.cos(t) - a[1] * math.sin(t)) / norm
    y = (a[0] * math.sin(t) + a[1] * math.cos(t)) / norm
    return [f"geometry.goniometer.axis={x:.6f},{y:.6f},0"]


# --------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------


def images(folder, leave_out=()):
    names = sorted(f for f in os.listdir(folder) if f.endswith(".img"))
    return [os.path.join(folder, f) for f in names if int(re.search(r"_(\d+)\.img$", f).group(1)) not in leave_out]


def run_gapfill(name, folder, extra, args, workdir):
    cwd = os.path.join(workdir, name)
    shutil.rmtree(cwd, ignore_errors=True)
    os.makedirs(cwd)
    steps = []
    argv = [gapfill_tool("dials.process_gapped"), *images(folder), PHIL, *axis_override(args.axis_offset),
            f"nproc={args.nproc}", "output.directory=.", *extra, *args.phil]
    run_step(steps, "process_gapped", argv, cwd, shown=f"dials.process_gapped {' '.join(extra)}".strip())
    return cwd, steps


def run_cli(folder, frames, args, workdir):
    """The DIALS 3.12 command line on the frames without the tracking frames."""
    cwd = os.path.join(workdir, "cli")
    shutil.rmtree(cwd, ignore_errors=True)
    os.makedirs(cwd)
    steps = []
    files = images(folder, leave_out=set(frames))
    # the phil file's DIALS parameters (its refinement.blocks.* are this
    # program's own, which DIALS' commands do not know)
    phil = os.path.join(cwd, "electron_diffraction_dials.phil")
    with open(PHIL) as fh, open(phil, "w") as out:
        out.writelines(line for line in fh if not line.strip().startswith("refinement.blocks."))
    run_step(steps, "import", [dials_tool("dials.import"), *files, *axis_override(args.axis_offset)], cwd,
             shown=f"dials.import <{len(files)} files>")
    run_step(steps, "find_spots", [dials_tool("dials.find_spots"), "imported.expt", f"nproc={args.nproc}"], cwd)
    run_step(steps, "index", [dials_tool("dials.index"), "imported.expt", "strong.refl", phil], cwd,
             shown="dials.index electron_diffraction.phil")
    run_step(steps, "refine", [dials_tool("dials.refine"), "indexed.expt", "indexed.refl", phil], cwd,
             shown="dials.refine electron_diffraction.phil")
    run_step(steps, "integrate", [dials_tool("dials.integrate"), "refined.expt", "refined.refl",
                                  f"nproc={args.nproc}"], cwd)
    run_step(steps, "export", [dials_tool("dials.export"), "integrated.expt", "integrated.refl"], cwd)
    return cwd, steps


# --------------------------------------------------------------------------
# Against the truth
# --------------------------------------------------------------------------


def against_truth(folder, truth):
    """Orientation, cell, CC with the true intensities and counts of one run."""
    import numpy as np

    from dials_gapfill.simulation.compare import (
        cell_error,
        indices_in_truth_basis,
        load,
        orientation_errors,
        summation_against_truth,
    )

    experiments, reflections = load(folder)
    orientation = orientation_errors(experiments, truth)
    # the gauge removed only perpendicular to the spindle: a full one also
    # takes away the error every image shares (which favours one crystal
    # across the blocks over a crystal per block)
    perpendicular = orientation_errors(experiments, truth, gauge="perpendicular")
    cells = [cell_error(e.crystal, truth) for e in experiments]
    cell = [float(np.mean([c["cell"][k] for c in cells])) for k in range(6)]
    integrated = reflections.select(reflections.get_flags(reflections.flags.integrated_sum))
    exported = integrated.select(integrated["partiality"] >= 0.4)
    intensity, sigma, true = summation_against_truth(indices_in_truth_basis(experiments, exported, truth), truth)
    ok = (sigma > 0) & (intensity > 3 * sigma) & np.isfinite(true)
    # the rotation axis in the detector plane, against the detector's fast axis
    # (a turn of everything about the beam is a gauge the truth does not fix)
    gonio, panel = experiments[0].goniometer, experiments[0].detector[0]
    axis = np.array(gonio.get_setting_rotation()).reshape(3, 3) @ np.array(gonio.get_rotation_axis_datum())
    fast = np.array(panel.get_fast_axis())
    azimuth = math.degrees(math.atan2(axis[1], axis[0]) - math.atan2(fast[1], fast[0]))
    true_azimuth = math.degrees(math.atan2(truth["rotation_axis"][1], truth["rotation_axis"][0]))
    return {
        "blocks": len(experiments),
        "axis_error_deg": (azimuth - true_azimuth + 180) % 360 - 180,
        "orientation_median_deg": orientation["median"],
        "orientation_worst_deg": orientation["worst"],
        "gauge_deg": orientation["gauge_deg"],
        "orientation_perpendicular_deg": [perpendicular["median"], perpendicular["worst"]],
        "cell": cell,
        "cell_rel_error_max": max(c["rel_error_max"] for c in cells),
        # the blocks' mean cell (a crystal per block: what its user reports)
        "mean_cell_rel_error": max(abs(a - b) / b for a, b in zip(cell[:3], truth["unit_cell"][:3])),
        "angle_error_max_deg": max(c["angle_error_max"] for c in cells),
        "cc_true": float(np.corrcoef(intensity[ok], true[ok])[0, 1]),
        "n_cc": int(ok.sum()),
        "integrated": len(integrated),
        "exported": len(exported),
        "distance_mm": experiments[0].detector[0].get_distance(),
    }


# --------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------


def table(results, truth):
    names = list(results)
    rows = [
        ("blocks", lambda r: f"{r['blocks']}"),
        ("orientation error median (deg)", lambda r: f"{r['orientation_median_deg']:.4f}"),
        ("orientation error worst (deg)", lambda r: f"{r['orientation_worst_deg']:.4f}"),
        ("the same, gauge perpendicular to the spindle only: median / worst (deg)",
         lambda r: "{:.4f} / {:.4f}".format(*r["orientation_perpendicular_deg"])),
        ("a, b, c (A)", lambda r: ", ".join(f"{v:.4f}" for v in r["cell"][:3])),
        ("beta (deg)", lambda r: f"{r['cell'][4]:.3f}"),
        ("axis direction in the detector plane, error (deg)", lambda r: f"{r['axis_error_deg']:.3f}"),
        ("cell error, largest of a, b, c", lambda r: f"{100 * r['cell_rel_error_max']:.3f} %"),
        ("the blocks' mean cell's error, largest of a, b, c", lambda r: f"{100 * r['mean_cell_rel_error']:.3f} %"),
        ("CC(I, I_true), I/sigma > 3", lambda r: f"{r['cc_true']:.5f} ({r['n_cc']})"),
        ("reflections integrated", lambda r: f"{r['integrated']}"),
        ("reflections exported (partiality >= 0.4)", lambda r: f"{r['exported']}"),
        ("wall clock (s)", lambda r: f"{r['wall_s']:.0f}"),
        ("CPU (s)", lambda r: f"{r['cpu_s']:.0f}"),
        ("processes", lambda r: f"{r['processes']}"),
    ]
    true_cell = ", ".join(f"{v:g}" for v in truth["unit_cell"][:3])
    lines = ["| | " + " | ".join(TITLES[n] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(get(results[n]) for n in names) + " |")
    lines.append(f"\nTruth: a, b, c = {true_cell} A, beta = {truth['unit_cell'][4]:g} deg.")
    return "\n".join(lines)


def plain(results):
    names = list(results)
    width = 16
    head = f"{'':32}" + "".join(f"{n:>{width}}" for n in names)
    out = [head]

    def row(label, values):
        out.append(f"{label:32}" + "".join(f"{v:>{width}}" for v in values))

    get = lambda key, spec: [format(results[n][key], spec) for n in names]  # noqa: E731
    row("blocks", get("blocks", "d"))
    row("orientation median (deg)", get("orientation_median_deg", ".4f"))
    row("orientation worst (deg)", get("orientation_worst_deg", ".4f"))
    for k, name in enumerate("abc"):
        row(f"{name} (A)", [f"{results[n]['cell'][k]:.4f}" for n in names])
    row("beta (deg)", [f"{results[n]['cell'][4]:.3f}" for n in names])
    row("axis error (deg)", get("axis_error_deg", ".3f"))
    row("cell error max (%)", [f"{100 * results[n]['cell_rel_error_max']:.3f}" for n in names])
    row("CC with truth (I/sig > 3)", get("cc_true", ".5f"))
    row("  reflections in CC", get("n_cc", "d"))
    row("integrated", get("integrated", "d"))
    row("exported", get("exported", "d"))
    row("wall clock (s)", get("wall_s", ".0f"))
    row("CPU (s)", get("cpu_s", ".0f"))
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--osc", type=float, default=0.4)
    parser.add_argument("--every", type=int, default=20, help="every n-th frame a tracking frame")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--axis-offset", type=float, default=0.0,
                        help="start every run from an axis turned by this many degrees in the detector plane")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"a subset of {','.join(RUNS)}")
    parser.add_argument("--workdir", default=None, help="kept; default a temporary folder, removed")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", action="store_true", help="also print the Markdown table")
    parser.add_argument("--phil", nargs="*", default=[],
                        help="parameters added to the dials.process_gapped runs (after the phil file)")
    args = parser.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    if not runs or set(runs) - set(RUNS):
        parser.error(f"--runs: choose from {','.join(RUNS)}")

    sys.path.insert(0, ROOT)
    import dials_gapfill  # noqa: F401  (libtbx environment before dxtbx)

    workdir = args.workdir or tempfile.mkdtemp(prefix="gapfill_ed_")
    os.makedirs(workdir, exist_ok=True)
    complete, tracking, frames, truth = make_sweeps(args, workdir)
    multiple = f"exclude_images_multiple={args.every}"
    results = {}
    for name in runs:
        print(f"  {TITLES[name]}:")
        if name == "cli":
            folder, steps = run_cli(tracking, frames, args, workdir)
        else:
            source, extra = {"ref": (complete, []), "multiple": (tracking, [multiple]), "auto": (tracking, [])}[name]
            folder, steps = run_gapfill(name, source, extra, args, workdir)
        results[name] = against_truth(folder, truth)
        results[name].update(wall_s=sum(s["wall_s"] for s in steps), cpu_s=sum(s["cpu_s"] for s in steps),
                             processes=len(steps), steps=steps)
    print()
    print(f"{args.images} frames of {args.osc} deg, tracking frames every {args.every}th "
          f"({len(frames)}), nproc {args.nproc}" + (f", axis started {args.axis_offset} deg off" if args.axis_offset else ""))
    print(plain(results))
    if args.markdown:
        print()
        print(table(results, truth))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": vars(args), "tracking_frames": frames, "results": results}, fh, indent=1)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
