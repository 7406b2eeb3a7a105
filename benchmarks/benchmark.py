#!/usr/bin/env python3
"""Benchmark dials.process_gapped against the DIALS command-line chains.

One script, one run, the same images and the same nproc for everything:

  (a) the seed recipe: the 2017 DIALS documentation's recipe for missing
      images, adapted to DIALS 3.12: dials.import (file list: one imageset per
      contiguous block), find_spots, index, refine scan_varying=False,
      split_experiments, combine_experiments with shared beam, detector and
      goniometer, refine scan_varying=True, integrate, split_experiments,
      one dials.export per block;
  (b) the shortest DIALS 3.12 chain: import, find_spots, index, refine (its
      default: static then scan-varying, one crystal per scan), integrate,
      export;
  (c) dials.process_gapped (its integrated.mtz and per-block MTZ files are the
      equivalent of the exports).

Every step runs as a child process; its wall clock is measured around it and
its peak RSS is ru_maxrss of the rusage that os.wait4 returns for that child
(the largest resident set of any one process of the step: the child itself or
a worker process it waited for; not the sum of concurrent workers).  This
script itself never imports DIALS before the last step has finished (Linux
folds the parent's resident set into a child's ru_maxrss at exec).

Then: totals and ratios c/a and c/b; the per-stage breakdown of (c) from its
dials.process_gapped.json; the share of (c)'s wall time outside its pipeline
stages; (c)'s peak RSS against the largest single CLI step; the science check
of (b) against (c) (dials_gapfill.simulation.compare); PASS/FAIL against the targets; a
Markdown table; everything in a JSON file with --json.

--blocks-scaling runs only (c), on the same sweep cut into 1, 3 and 10 blocks
and on half of the images, and reports time per image and the extra cost per
additional block.

Examples:

  .venv/bin/python benchmarks/benchmark.py                      # 120 x 0.5 deg, Pilatus 2M
  .venv/bin/python benchmarks/benchmark.py --json bench.json --workdir /tmp/bench
  .venv/bin/python benchmarks/benchmark.py --snase ../shared/data/snase
  .venv/bin/python benchmarks/benchmark.py --blocks-scaling
  .venv/bin/python benchmarks/benchmark.py --images 12 --osc 1 --detector pilatus300k \\
      --distance 150 --omit 5:6                                 # a quick check
"""

from __future__ import annotations

import argparse
import glob
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
MIB = 1024.0  # ru_maxrss is in KiB on Linux

# The SNase sweep: 1 deg images whose headers say 0 deg (README.md).
SNASE_GEOMETRY = [
    "geometry.scan.oscillation=0,1",
    "geometry.detector.fast_slow_beam_centre=532.61,500.53",
    "geometry.detector.distance=57.27",
    "geometry.goniometer.axis=1,0,0",
]
SNASE_OMIT = "40:45"

TARGETS = {
    "c_over_a": 0.5,
    "c_over_b": 0.33,
    "outside_share": 0.05,
    "rss_ratio": 1.10,
    "cell_rel_diff": 0.0005,
    "count_rel_diff": 0.01,
    "cc": 0.999,
    "block_extra": 0.05,
    "linearity": 1.05,
}


class StepFailed(Exception):
    pass


# --------------------------------------------------------------------------
# Programs
# --------------------------------------------------------------------------


def _program(name, folders, what):
    """The first `name` in `folders`, else on PATH; stop with a one-line message."""
    for d in folders:
        path = os.path.join(d, name)
        if os.path.exists(path):
            return path
    path = shutil.which(name)
    if path is None:
        sys.exit(f"benchmark: cannot find {name}: {what}")
    return path


def venv_tool(name):
    """A console script of this package: next to this python, in .venv, or on PATH."""
    folders = (os.path.dirname(sys.executable), os.path.join(ROOT, ".venv", "bin"))
    return _program(name, folders, "install the package (make setup)")


def dials_tool(name):
    """A DIALS command-line program (Debian's, in /usr/bin, run by the system python)."""
    return _program(name, ("/usr/bin",), "install DIALS")


# --------------------------------------------------------------------------
# Running one step
# --------------------------------------------------------------------------


def _display(argv, image_files):
    """The command line as shown in the tables: image lists collapsed, paths shortened."""
    out, n_images = [os.path.basename(argv[0])], 0
    for a in argv[1:]:
        if a in image_files:
            n_images += 1
            continue
        if a.startswith("output.log="):  # only renames the DIALS log file
            continue
        if os.path.isabs(a) and "=" not in a:
            a = os.path.basename(a)
        out.append(a)
    if n_images:
        out.insert(1, f"<{n_images} images>")
    return " ".join(out)


def tail(path, n=25):
    try:
        with open(path, "rb") as fh:
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    | " + line for line in lines[-n:])


class Runner:
    """Runs the steps of one chain in one folder and records them."""

    def __init__(self, chain, directory, image_files, echo=True):
        self.chain = chain
        self.directory = directory
        self.image_files = set(image_files)
        self.steps = []
        self.echo = echo
        os.makedirs(os.path.join(directory, "logs"), exist_ok=True)

    def run(self, name, argv):
        n = len(self.steps) + 1
        log = os.path.join(self.directory, "logs", f"{n:02d}_{re.sub(r'[^A-Za-z0-9_.]+', '_', name)}.log")
        shown = _display(argv, self.image_files)
        if self.echo:
            print(f"  ({self.chain}) {n:2d} {shown[:76]:<76}", end="", flush=True)
        with open(log, "wb") as fh:
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, cwd=self.directory, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
        step = {
            "chain": self.chain,
            "n": n,
            "name": name,
            "command": shown,
            "argv": list(argv),
            "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / MIB,
            "returncode": proc.returncode,
            "log": log,
        }
        self.steps.append(step)
        if self.echo:
            print(f"   {wall:8.1f} s {step['peak_rss_mib']:8.0f} MiB", flush=True)
        if proc.returncode != 0:
            raise StepFailed(
                f"step ({self.chain}) {n} {name} failed with exit code {proc.returncode}:\n"
                f"    {shown}\n  in {self.directory}; last lines of {log}:\n{tail(log)}"
            )
        return step


def fresh_dir(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def parse_ranges(text):
    """'41:45,81:83' or '5' -> set of image numbers."""
    out = set()
    for token in (text or "").replace(" ", "").split(","):
        if not token:
            continue
        first, _, last = token.partition(":")
        first, last = int(first), int(last or first)
        if last < first:
            sys.exit(f"benchmark: bad image range {token!r}")
        out.update(range(first, last + 1))
    return out


def blocks_of(numbers):
    """Contiguous runs of sorted image numbers: [(first, last)]."""
    blocks = []
    for n in sorted(numbers):
        if blocks and n == blocks[-1][1] + 1:
            blocks[-1][1] = n
        else:
            blocks.append([n, n])
    return [tuple(b) for b in blocks]


class Data:
    """A complete sweep (image number -> file) plus the geometry overrides."""

    def __init__(self, kind, files, geometry=(), osc=None):
        self.kind = kind
        self.files = dict(sorted(files.items()))  # image number -> path
        self.geometry = list(geometry)
        self.osc = osc  # (start of image 1, width) when the override sets the scan

    def select(self, numbers):
        return [self.files[n] for n in sorted(numbers)]

    def block_geometry(self, first):
        """The overrides for a block imported on its own, starting at its true angle."""
        start, width = self.osc
        angle = start + (first - 1) * width
        return [g if not g.startswith("geometry.scan.oscillation=") else
                f"geometry.scan.oscillation={angle:g},{width:g}" for g in self.geometry]


def simulate(args, workdir):
    """The complete simulated sweep (no omissions), made once per workdir."""
    directory = os.path.join(workdir, "images")
    settings = {
        "n_images": args.images,
        "osc_width": args.osc,
        "detector": args.detector,
        "seed": args.seed,
    }
    if args.distance is not None:
        settings["distance"] = args.distance
    stamp = os.path.join(directory, "benchmark_simulation.json")
    truth_path = os.path.join(directory, "ground_truth.json")
    seconds = None
    reuse = False
    if os.path.exists(stamp) and os.path.exists(truth_path):
        with open(stamp) as fh:
            reuse = json.load(fh) == settings
        if reuse:
            with open(truth_path) as fh:
                names = json.load(fh)["files"]
            reuse = all(os.path.exists(os.path.join(directory, f)) for f in names)
    if reuse:
        print(f"Reusing the simulated images in {directory}")
    else:
        fresh_dir(directory)
        argv = [venv_tool("dials.simulate_sweep"), f"output.directory={directory}"]
        argv += [f"{k}={v}" for k, v in settings.items()]
        print(f"Simulating {args.images} images of {args.osc} deg on a {args.detector} "
              f"(seed {args.seed}) into {directory} ...", flush=True)
        t0 = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if result.returncode != 0:
            sys.exit(f"benchmark: dials.simulate_sweep failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        print("  " + result.stdout.strip().splitlines()[-1] + f" ({seconds:.0f} s)")
        with open(stamp, "w") as fh:
            json.dump(settings, fh)
    with open(truth_path) as fh:
        names = json.load(fh)["files"]
    files = {}
    for name in names:
        files[int(re.search(r"_(\d+)\.cbf$", name).group(1))] = os.path.join(directory, name)
    return Data("simulated", files), seconds


def snase(path):
    files = {}
    for name in os.listdir(path):
        m = re.match(r"snc_newhead_(\d+)\.img\.bz2$", name)
        if m:
            files[int(m.group(1))] = os.path.join(os.path.abspath(path), name)
    if not files:
        sys.exit(f"benchmark: no snc_newhead_*.img.bz2 files in {path}")
    if len(files) != 96:
        print(f"warning: {len(files)} SNase images in {path} (expected 96)")
    return Data("snase", files, SNASE_GEOMETRY, osc=(0.0, 1.0))


def warm_cache(paths):
    """Read every image once, so no chain pays for a cold page cache."""
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 20):
                pass


# --------------------------------------------------------------------------
# The chains
# --------------------------------------------------------------------------


def cli_import(run, data, numbers, nproc):
    """dials.import + dials.find_spots -> imported.expt, strong.refl.

    Simulated images: one dials.import of the file list (one imageset per
    contiguous block; the headers hold each image's true angle), then one
    dials.find_spots.

    SNase: the headers say 0 deg, so the scan comes from the override
    geometry.scan.oscillation=0,1, and dials.import applies it to every block,
    starting each at 0 deg: block 46-96 would then be 45 deg off and the joint
    indexing wrong.  To give the CLI chains a correct geometry (the one
    dials.process_gapped derives from the image numbers), each block is
    imported on its own with geometry.scan.oscillation=<first-1>,1, spots are
    found per block, and dials.combine_experiments joins them with one shared
    beam, detector and goniometer (dials.combine_experiments needs the
    reflections, hence find_spots before it).  These extra steps are what the
    CLI needs for this data; they are timed as part of the chain.
    """
    blocks = blocks_of(numbers)
    if not data.geometry or len(blocks) == 1:
        run.run("import", [dials_tool("dials.import"), *data.select(numbers), *data.geometry])
        run.run("find_spots", [dials_tool("dials.find_spots"), "imported.expt", f"nproc={nproc}"])
        return
    for k, (first, last) in enumerate(blocks):
        run.run(f"import_block{k}", [dials_tool("dials.import"), *data.select(range(first, last + 1)),
                                     *data.block_geometry(first), f"output.experiments=imported_{k}.expt",
                                     f"output.log=dials.import_{k}.log"])
    for k in range(len(blocks)):
        run.run(f"find_spots_block{k}", [dials_tool("dials.find_spots"), f"imported_{k}.expt",
                                         f"output.reflections=strong_{k}.refl", f"nproc={nproc}",
                                         f"output.log=dials.find_spots_{k}.log"])
    run.run("combine_imported", [
        dials_tool("dials.combine_experiments"),
        *[f"imported_{k}.expt" for k in range(len(blocks))],
        *[f"strong_{k}.refl" for k in range(len(blocks))],
        "reference_from_experiment.beam=0", "reference_from_experiment.detector=0",
        "reference_from_experiment.goniometer=0",
        "output.experiments_filename=imported.expt", "output.reflections_filename=strong.refl",
    ])


def _split_files(directory, prefix):
    """(expt, refl) pairs written by dials.split_experiments, in index order."""
    pairs = []
    for expt in glob.glob(os.path.join(directory, f"{prefix}_*.expt")):
        m = re.search(rf"{re.escape(prefix)}_(\d+)\.expt$", expt)
        if m:
            pairs.append((int(m.group(1)), os.path.basename(expt), f"{prefix}_{m.group(1)}.refl"))
    return [(e, r) for _, e, r in sorted(pairs)]


def chain_a(run, data, numbers, nproc):
    """The seed recipe (2017 documentation, DIALS 3.12 names)."""
    cli_import(run, data, numbers, nproc)
    run.run("index", [dials_tool("dials.index"), "imported.expt", "strong.refl"])
    run.run("refine_static", [dials_tool("dials.refine"), "indexed.expt", "indexed.refl", "scan_varying=False",
                              "output.experiments=refined_static.expt", "output.reflections=refined_static.refl",
                              "output.log=dials.refine_static.log"])
    run.run("split_experiments", [dials_tool("dials.split_experiments"), "refined_static.expt",
                                  "refined_static.refl", "output.experiments_prefix=split",
                                  "output.reflections_prefix=split"])
    split = _split_files(run.directory, "split")
    if not split:
        raise StepFailed(f"dials.split_experiments wrote no split_*.expt in {run.directory}")
    run.run("combine_experiments", [
        dials_tool("dials.combine_experiments"), *[e for e, _ in split], *[r for _, r in split],
        "reference_from_experiment.goniometer=0", "reference_from_experiment.detector=0",
        "reference_from_experiment.beam=0",
    ])
    run.run("refine_scan_varying", [dials_tool("dials.refine"), "combined.expt", "combined.refl",
                                    "scan_varying=True"])
    run.run("integrate", [dials_tool("dials.integrate"), "refined.expt", "refined.refl", f"nproc={nproc}"])
    run.run("split_integrated", [dials_tool("dials.split_experiments"), "integrated.expt", "integrated.refl",
                                 "output.experiments_prefix=integrated", "output.reflections_prefix=integrated"])
    blocks = _split_files(run.directory, "integrated")
    if not blocks:
        raise StepFailed(f"dials.split_experiments wrote no integrated_*.expt in {run.directory}")
    for k, (e, r) in enumerate(blocks):
        run.run(f"export_block{k}", [dials_tool("dials.export"), e, r, f"mtz.hklout=integrated_{k}.mtz",
                                     f"output.log=dials.export_{k}.log"])


def chain_b(run, data, numbers, nproc):
    """The shortest DIALS 3.12 chain (dials.refine's default: static, then
    scan-varying with one crystal per scan; no second scan-varying refine)."""
    cli_import(run, data, numbers, nproc)
    run.run("index", [dials_tool("dials.index"), "imported.expt", "strong.refl"])
    run.run("refine", [dials_tool("dials.refine"), "indexed.expt", "indexed.refl"])
    run.run("integrate", [dials_tool("dials.integrate"), "refined.expt", "refined.refl", f"nproc={nproc}"])
    run.run("export", [dials_tool("dials.export"), "integrated.expt", "integrated.refl"])


def chain_c(run, data, numbers, nproc, out="processed", extra=()):
    """dials.process_gapped: the overrides as given (it starts each block at
    its own angle from the image numbers), plus any --c-phil parameters."""
    return run.run("process_gapped", [venv_tool("dials.process_gapped"), *data.select(numbers), *data.geometry,
                                      f"nproc={nproc}", f"output.directory={out}", *extra])


def read_c_json(directory):
    with open(os.path.join(directory, "dials.process_gapped.json")) as fh:
        return json.load(fh)


# --------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------


def fmt(v, spec=".3f", none="n/a"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def verdict(ok):
    return "n/a " if ok is None else ("PASS" if ok else "FAIL")


def chain_total(steps):
    return {
        "wall_s": sum(s["wall_s"] for s in steps),
        "cpu_s": sum(s["cpu_s"] for s in steps),
        "peak_rss_mib": max((s["peak_rss_mib"] for s in steps), default=0.0),
        "n_steps": len(steps),
    }


CHAIN_TITLES = {
    "a": "(a) seed recipe (2017 docs, DIALS 3.12)",
    "b": "(b) shortest DIALS 3.12 CLI chain",
    "c": "(c) dials.process_gapped",
}


def print_main_table(chains):
    width = max([len(s["command"][:72]) for c in chains.values() for s in c["steps"]] + [20])
    print(f"{'':4}{'#':>3}  {'command':<{width}} {'wall s':>9} {'CPU s':>9} {'peak RSS MiB':>13}")
    for key, c in chains.items():
        print(CHAIN_TITLES[key] + ("" if c["ok"] else "   ** FAILED **"))
        for s in c["steps"]:
            print(f"{'':4}{s['n']:>3}  {s['command'][:72]:<{width}} {s['wall_s']:9.1f} {s['cpu_s']:9.1f} "
                  f"{s['peak_rss_mib']:13.0f}")
        t = c["total"]
        processes = f"{t['n_steps']} process" + ("es" if t["n_steps"] != 1 else "")
        print(f"{'':4}{'':>3}  {'total (' + processes + '; RSS: largest step)':<{width}} "
              f"{t['wall_s']:9.1f} {t['cpu_s']:9.1f} {t['peak_rss_mib']:13.0f}")


def markdown_table(chains):
    lines = ["| chain | step | wall (s) | CPU (s) | peak RSS (MiB) |", "|---|---|---:|---:|---:|"]
    for key, c in chains.items():
        for s in c["steps"]:
            lines.append(f"| {key} | `{s['command']}` | {s['wall_s']:.1f} | {s['cpu_s']:.1f} | "
                         f"{s['peak_rss_mib']:.0f} |")
        t = c["total"]
        processes = f"{t['n_steps']} process" + ("es" if t["n_steps"] != 1 else "")
        lines.append(f"| **{key} total** | {processes} | **{t['wall_s']:.1f}** | "
                     f"**{t['cpu_s']:.1f}** | **{t['peak_rss_mib']:.0f}** |")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Science check
# --------------------------------------------------------------------------


def science_check(dir_ref, dir_c):
    """dials_gapfill.simulation.compare of a CLI chain (reference) with dials.process_gapped."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import dials_gapfill  # noqa: F401  (libtbx environment before dials/dxtbx)
    from dials_gapfill.simulation.compare import compare, load

    result = compare(*load(dir_ref), *load(dir_c))
    result["cell_compared"] = "same basis"
    if result.get("cell_rel_diff_max") is None and result["blocks"]:
        # the two runs indexed in different (equivalent) bases: compare the Niggli cells
        from cctbx import uctbx

        diffs = []
        for b in result["blocks"]:
            na = uctbx.unit_cell(b["cell_a"]).niggli_cell().parameters()
            nb = uctbx.unit_cell(b["cell_b"]).niggli_cell().parameters()
            diffs.append(max(abs(x - y) / x for x, y in zip(na[:3], nb[:3])))
        result["cell_rel_diff_max"] = max(diffs)
        result["cell_compared"] = "Niggli cells (different indexing bases)"
    return json.loads(json.dumps(result, default=list))


def print_science(label, s, names=("CLI", "process_gapped")):
    ref, other = names
    print(f"Science check {label} (dials_gapfill.simulation.compare; reference = {ref}):")
    print(f"  blocks ({ref}){' ' * max(1, 16 - len(ref))}{s['blocks_a']}")
    print(f"  blocks ({other}){' ' * max(1, 16 - len(other))}{s['blocks_b']}")
    print(f"  max relative cell diff  {fmt(s['cell_rel_diff_max'], '.2e')}  ({s['cell_compared']}; a, b, c, mean "
          "over scan points)")
    for b in s["blocks"]:
        print(f"    block {b['images'][0]}-{b['images'][1]}: cell diff {fmt(b['cell_rel_diff_max'], '.2e')}, "
              f"angles {fmt(b['angle_diff_max'], '.3f')} deg, integrated {b['integrated_a']} vs "
              f"{b['integrated_b']} ({fmt(b['count_rel_diff'] and 100 * b['count_rel_diff'], '.2f')} %)")
    print(f"  integrated reflections  {s['integrated_a']} ({ref}) vs {s['integrated_b']} ({other}), "
          f"relative difference {fmt(s['count_rel_diff'] and 100 * s['count_rel_diff'], '.2f')} %")
    print(f"  matched (I/sigma >= 3)  {s['matched']}")
    print(f"  CC of intensities       {fmt(s['cc'], '.5f')}")
    print(f"  median ratio {other}/{ref}  {fmt(s['median_ratio'], '.4f')}")


# --------------------------------------------------------------------------
# Main benchmark
# --------------------------------------------------------------------------


def run_chain(key, workdir, data, numbers, nproc, c_phil=()):
    directory = fresh_dir(os.path.join(workdir, key))
    runner = Runner(key, directory, data.files.values())
    error = None
    try:
        if key == "c":
            chain_c(runner, data, numbers, nproc, extra=c_phil)
        else:
            {"a": chain_a, "b": chain_b}[key](runner, data, numbers, nproc)
    except StepFailed as e:
        error = str(e)
        print(f"\nERROR: {error}\n", file=sys.stderr, flush=True)
    return {"directory": directory, "steps": runner.steps, "ok": error is None, "error": error,
            "total": chain_total(runner.steps)}


def benchmark(args, data, numbers, out):
    chains = {}
    for key in args.only:
        print(f"\n{CHAIN_TITLES[key]}  [{os.path.join(args.workdir, key)}]", flush=True)
        chains[key] = run_chain(key, args.workdir, data, numbers, args.nproc, args.c_phil)
    out["chains"] = chains
    out["loadavg_end"] = os.getloadavg()

    print("\n" + "=" * 100)
    print(f"Steps of each chain: {len(numbers)} images in {len(blocks_of(numbers))} blocks "
          f"{['%d-%d' % b for b in blocks_of(numbers)]}, nproc={args.nproc}")
    print("wall = wall clock of the process; CPU = user+system of it and its workers; peak RSS = ru_maxrss of "
          "the step (largest single process)")
    print("=" * 100)
    print_main_table(chains)

    targets = []
    ok = lambda k: k in chains and chains[k]["ok"]  # noqa: E731

    def target(name, value, limit, passed, shown):
        targets.append({"name": name, "value": value, "target": limit, "pass": passed, "shown": shown})

    print("\nTotals and ratios (wall clock):")
    for k in chains:
        t = chains[k]["total"]
        print(f"  {CHAIN_TITLES[k]:<44} {t['wall_s']:9.1f} s wall {t['cpu_s']:9.1f} s CPU "
              f"{t['peak_rss_mib']:8.0f} MiB peak" + ("" if chains[k]["ok"] else "  (FAILED: incomplete)"))
    ratios = {}
    for ref in ("a", "b"):
        if ok("c") and ok(ref):
            r = chains["c"]["total"]["wall_s"] / chains[ref]["total"]["wall_s"]
            rc = chains["c"]["total"]["cpu_s"] / chains[ref]["total"]["cpu_s"]
            ratios[f"c_over_{ref}"] = r
            ratios[f"c_over_{ref}_cpu"] = rc
            limit = TARGETS[f"c_over_{ref}"]
            print(f"  c/{ref} = {r:.3f} (wall), {rc:.3f} (CPU)   target <= {limit}: {verdict(r <= limit)}")
            target(f"c/{ref} wall", r, f"<= {limit}", r <= limit, f"{r:.3f}")
    out["ratios"] = ratios

    if ok("c"):
        report = read_c_json(os.path.join(chains["c"]["directory"], "processed"))
        wall = chains["c"]["steps"][0]["wall_s"]
        stages = report["timing"]["stages"]
        in_stages = sum(s["seconds"] for s in stages)
        outside = wall - in_stages
        print(f"\n(c) per stage (dials.process_gapped.json timing.stages; share of (c) wall clock {wall:.1f} s):")
        for s in stages:
            print(f"  {s['name']:<14} {s['seconds']:9.2f} s {100 * s['seconds'] / wall:6.1f} %")
        print(f"  {'sum of stages':<14} {in_stages:9.2f} s {100 * in_stages / wall:6.1f} %   "
              f"(timing.total_seconds {report['timing']['total_seconds']:.2f} s)")
        share = outside / wall
        print(f"  {'outside':<14} {outside:9.2f} s {100 * share:6.1f} %   = (c) wall clock minus the sum of its "
              "stages: process start-up,\n"
              f"  {'':<14} {'':9}   {'':6}     imports, parameter parsing, logging set-up and writing the "
              "reports (JSON, HTML, summary)")
        print(f"  outside-stage share {100 * share:.1f} %   target <= {100 * TARGETS['outside_share']:.0f} %: "
              f"{verdict(share <= TARGETS['outside_share'])}")
        target("(c) time outside its stages", share, f"<= {100 * TARGETS['outside_share']:.0f} %",
               share <= TARGETS["outside_share"], f"{100 * share:.1f} %")
        out["c_report"] = {"stages": stages, "total_seconds": report["timing"]["total_seconds"],
                           "sum_of_stages": in_stages, "wall_s": wall, "outside_s": outside,
                           "outside_share": share, "totals": report.get("totals"),
                           "blocks": [{k: b.get(k) for k in ("number", "first", "last", "n_images", "spots",
                                                              "indexed", "integrated", "refinement", "profile")}
                                      for b in report.get("blocks", [])]}
        used = (report.get("totals") or {}).get("images_used")
        if used is not None and used != len(numbers):
            print(f"  warning: dials.process_gapped used {used} images of the {len(numbers)} given "
                  f"(excluded: {report.get('excluded_images')})")

        cli_steps = [s for k in ("a", "b") if k in chains for s in chains[k]["steps"]]
        if cli_steps:
            biggest = max(cli_steps, key=lambda s: s["peak_rss_mib"])
            rss_c = chains["c"]["steps"][0]["peak_rss_mib"]
            r = rss_c / biggest["peak_rss_mib"]
            print(f"\nPeak RSS: (c) {rss_c:.0f} MiB vs the largest single CLI step ({biggest['chain']}) "
                  f"{biggest['name']} {biggest['peak_rss_mib']:.0f} MiB: ratio {r:.3f}   target <= "
                  f"{TARGETS['rss_ratio']}: {verdict(r <= TARGETS['rss_ratio'])}")
            out["rss"] = {"c_mib": rss_c, "largest_cli_step": biggest["name"], "largest_cli_chain": biggest["chain"],
                          "largest_cli_mib": biggest["peak_rss_mib"], "ratio": r}
            target("peak RSS c / largest CLI step", r, f"<= {TARGETS['rss_ratio']}", r <= TARGETS["rss_ratio"],
                   f"{r:.3f}")

    # the science check imports DIALS into this process: only now, after every step
    science = {}
    for ref in ("b", "a"):
        if ok(ref) and ok("c"):
            label = f"({ref}) vs (c)" + ("" if ref == "b" else " (for information; no targets)")
            print()
            try:
                s = science_check(chains[ref]["directory"], os.path.join(chains["c"]["directory"], "processed"))
            except Exception as e:  # report, do not lose the timings
                print(f"Science check {label}: ERROR {type(e).__name__}: {e}")
                science[ref] = {"error": f"{type(e).__name__}: {e}"}
                continue
            print_science(label, s)
            science[ref] = s
            if ref == "b":
                cell, count, cc = s["cell_rel_diff_max"], s["count_rel_diff"], s["cc"]
                target("cells (b) vs (c)", cell, "<= 0.05 %", cell is not None and cell <= TARGETS["cell_rel_diff"],
                       fmt(cell and 100 * cell, ".4f") + " %")
                target("integrated counts (b) vs (c)", count, "<= 1 %",
                       count is not None and count <= TARGETS["count_rel_diff"],
                       fmt(count and 100 * count, ".2f") + " %")
                target("CC of matched intensities (b) vs (c)", cc, f">= {TARGETS['cc']}",
                       cc is not None and cc >= TARGETS["cc"], fmt(cc, ".5f"))
                print(f"  cells within 0.05 %: {verdict(cell is not None and cell <= TARGETS['cell_rel_diff'])}   "
                      f"counts within 1 %: {verdict(count is not None and count <= TARGETS['count_rel_diff'])}   "
                      f"CC >= {TARGETS['cc']}: {verdict(cc is not None and cc >= TARGETS['cc'])}")
    if ok("a") and ok("b"):
        # the baseline: how closely DIALS' own two chains agree on these images
        label = "(b) vs (a), DIALS' two chains (baseline for the numbers above; no targets)"
        print()
        try:
            s = science_check(chains["b"]["directory"], chains["a"]["directory"])
            print_science(label, s, names=("b", "a"))
            science["b_vs_a"] = s
        except Exception as e:  # report, do not lose the timings
            print(f"Science check {label}: ERROR {type(e).__name__}: {e}")
            science["b_vs_a"] = {"error": f"{type(e).__name__}: {e}"}
    out["science"] = science

    print("\nTargets:")
    for t in targets:
        print(f"  {t['name']:<40} {t['shown']:>12}   target {t['target']:<10} {verdict(t['pass'])}")
    missing = [k for k in ("a", "b", "c") if not ok(k)]
    if missing:
        print(f"  (not evaluated: chain(s) {', '.join(missing)} not run or failed)")
    out["targets"] = targets

    md = markdown_table(chains)
    print("\nMarkdown:\n")
    print(md)
    if ratios:
        print()
        print(", ".join(f"c/{k[-1]} = {v:.2f}" for k, v in ratios.items() if not k.endswith("_cpu"))
              + f" (wall clock, nproc={args.nproc}, {len(numbers)} images, {data.kind} data)")
    out["markdown"] = md
    return all(c["ok"] for c in chains.values())


# --------------------------------------------------------------------------
# Blocks scaling (only (c))
# --------------------------------------------------------------------------


def scaling_runs(numbers, block_counts):
    """(label, image numbers, expected blocks): the sweep cut into k blocks by
    leaving out k-1 single images spread evenly, and the first half."""
    numbers = sorted(numbers)
    n = len(numbers)
    runs = []
    for k in block_counts:
        if k == 1:
            runs.append(("all images, 1 block", numbers, 1))
            continue
        gaps = {numbers[round(i * n / k)] for i in range(1, k)}
        keep = [x for x in numbers if x not in gaps]
        got = len(blocks_of(keep))
        if got != k:
            sys.exit(f"benchmark: cannot cut {n} images into {k} blocks with single-image gaps (got {got})")
        runs.append((f"{k} blocks (gaps of 1 image)", keep, k))
    runs.append(("half the images, 1 block", numbers[: n // 2], 1))
    return runs


def _stage(run, name):
    return sum(st["seconds"] for st in run["stages"] if st["name"] == name)


def _scaling_run(args, data, label, keep, k, directory):
    """One run of (c) for the scaling table: its numbers, or the failure."""
    runner = Runner("c", directory, data.files.values())
    print(f"\n{label}: {len(keep)} images {['%d-%d' % b for b in blocks_of(keep)]}  [{directory}]", flush=True)
    try:
        step = chain_c(runner, data, keep, args.nproc)
    except StepFailed as e:
        print(f"\nERROR: {e}\n", file=sys.stderr, flush=True)
        return {"label": label, "images": len(keep), "blocks_expected": k, "ok": False, "error": str(e)}
    report = read_c_json(os.path.join(directory, "processed"))
    stages = sum(s["seconds"] for s in report["timing"]["stages"])
    totals = report.get("totals") or {}
    used = totals.get("images_used", len(keep))
    return {
        "label": label, "images": len(keep), "images_used": used, "blocks_expected": k,
        "blocks": totals.get("blocks"), "wall_s": step["wall_s"], "cpu_s": step["cpu_s"],
        "stages_s": stages, "peak_rss_mib": step["peak_rss_mib"], "integrated": totals.get("integrated"),
        "wall_per_image": step["wall_s"] / used, "stages_per_image": stages / used, "ok": True,
        "stages": report["timing"]["stages"],
    }


def blocks_scaling(args, data, numbers, out):
    runs = scaling_runs(numbers, args.block_counts)
    # with --repeat N: N rounds over all runs (a slow spell of the machine then
    # hits every run alike), and each run's least disturbed repeat (the
    # smallest sum of stages) is the one compared
    tries = [[] for _ in runs]
    for rep in range(args.repeat):
        for i, (label, keep, k) in enumerate(runs):
            name = f"run{i}" if args.repeat == 1 else f"run{i}_{rep + 1}"
            tries[i].append(_scaling_run(args, data, label, keep, k, fresh_dir(os.path.join(args.workdir, "scaling", name))))
    results = []
    all_ok = True
    for t in tries:
        good_tries = [r for r in t if r["ok"]]
        all_ok &= len(good_tries) == len(t)
        best = min(good_tries, key=lambda r: r["stages_s"]) if good_tries else t[0]
        best["repeats_stages_s"] = [r.get("stages_s") for r in t]
        results.append(best)
    out["blocks_scaling"] = {"runs": results}
    good = [r for r in results if r["ok"]]
    stage_names = []
    for r in good:
        for st in r["stages"]:
            if st["name"] not in stage_names:
                stage_names.append(st["name"])
    shown_stages = [n for n in stage_names if any(_stage(r, n) >= 0.05 * r["stages_s"] for r in good)]

    print("\n" + "=" * 100)
    print(f"dials.process_gapped, blocks scaling (nproc={args.nproc}; images = images processed; "
          "stages = sum of its pipeline stages"
          + (f"; each run the fastest of {args.repeat}" if args.repeat > 1 else "") + ")")
    print("=" * 100)
    head = (f"  {'run':<28} {'images':>6} {'blocks':>6} {'wall s':>7} {'stages s':>8} {'s/img':>6} "
            + "".join(f" {n[:11]:>11}" for n in shown_stages) + f" {'RSS MiB':>8} {'integrated':>10}")
    print(head)
    for r in results:
        if not r["ok"]:
            print(f"  {r['label']:<28} {r['images']:>6} {'':>6} FAILED")
            continue
        print(f"  {r['label']:<28} {r['images_used']:>6} {r['blocks']!s:>6} {r['wall_s']:7.1f} {r['stages_s']:8.1f} "
              f"{r['stages_per_image']:6.3f}" + "".join(f" {_stage(r, n):11.1f}" for n in shown_stages)
              + f" {r['peak_rss_mib']:8.0f} {r['integrated']!s:>10}")
        if r["blocks"] != r["blocks_expected"]:
            print(f"    warning: {r['blocks']} blocks processed, {r['blocks_expected']} expected")
        if len(r["repeats_stages_s"]) > 1:
            print("    stages s of the repeats: " + ", ".join(fmt(v, ".1f") for v in r["repeats_stages_s"]))

    targets = []
    one = next((r for r in good if r["label"].startswith("all images")), None)
    half = next((r for r in good if r["label"].startswith("half")), None)
    line = None
    if one and half and one["images_used"] > half["images_used"]:
        n_ratio = one["images_used"] / half["images_used"]
        t_ratio = one["stages_s"] / half["stages_s"]
        w_ratio = one["wall_s"] / half["wall_s"]
        exponent = math.log(t_ratio) / math.log(n_ratio) if t_ratio > 0 else None
        marginal = (one["stages_s"] - half["stages_s"]) / (one["images_used"] - half["images_used"])
        fixed = one["stages_s"] - marginal * one["images_used"]
        line = (fixed, marginal)
        passed = exponent is not None and exponent <= TARGETS["linearity"]
        print(f"\nCost against images (1 block): {half['images_used']} -> {one['images_used']} images "
              f"(x{n_ratio:.2f}): stages x{t_ratio:.2f}, wall x{w_ratio:.2f}")
        print(f"  stages = {fixed:.1f} s + {marginal:.3f} s per image (the line through the two runs)")
        print(f"  exponent log(time ratio) / log(image ratio) = {fmt(exponent, '.3f')} (1 = proportional; "
              f"below 1 = a fixed cost)   target <= {TARGETS['linearity']}: {verdict(passed)}")
        out["blocks_scaling"]["linearity"] = {"image_ratio": n_ratio, "stages_ratio": t_ratio,
                                              "wall_ratio": w_ratio, "exponent": exponent,
                                              "seconds_per_image": marginal, "fixed_seconds": fixed}
        targets.append({"name": "cost linear in images", "value": exponent, "shown": fmt(exponent, ".3f"),
                        "target": f"exponent <= {TARGETS['linearity']}", "pass": passed})
    if one:
        if line:
            how = ("time of the k-block run against the 1-block time for the same number of images (from the "
                   "line above), divided by k - 1")
        else:
            how = "time per image of the k-block run against the 1-block run, divided by k - 1 (no half run)"
        print(f"\nExtra cost per additional block, from the stage seconds: {how}:")
        for r in good:
            if r is one or r is half or r["blocks"] in (None, 1):
                continue
            if line:
                expected = line[0] + line[1] * r["images_used"]
                extra = (r["stages_s"] / expected - 1) / (r["blocks"] - 1)
            else:
                expected = one["stages_per_image"] * r["images_used"]
                extra = (r["stages_per_image"] / one["stages_per_image"] - 1) / (r["blocks"] - 1)
            r["expected_1_block_s"], r["extra_per_block"] = expected, extra
            by_stage = []
            if line:  # where the extra time goes: each stage against its own line
                for n in shown_stages:
                    m = (_stage(one, n) - _stage(half, n)) / (one["images_used"] - half["images_used"])
                    e = _stage(one, n) + m * (r["images_used"] - one["images_used"])
                    by_stage.append(f"{n} {_stage(r, n) - e:+.1f} s")
            passed = extra < TARGETS["block_extra"]
            print(f"  {r['blocks']:>3} blocks: {r['stages_s']:.1f} s vs {expected:.1f} s for 1 block: "
                  f"{100 * extra:+.2f} % per additional block   target < 5 %: {verdict(passed)}")
            if by_stage:
                print(f"      extra by stage: {', '.join(by_stage)}")
            targets.append({"name": f"extra cost per block ({r['blocks']} blocks)", "value": extra,
                            "shown": f"{100 * extra:+.2f} %", "target": "< 5 %", "pass": passed})
    out["targets"] = targets
    print("\nTargets:")
    for t in targets:
        print(f"  {t['name']:<40} {t['shown']:>10}   target {t['target']:<20} {verdict(t['pass'])}")

    lines = ["| run | images | blocks | wall (s) | stages (s) | stages s/image | peak RSS (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r["ok"]:
            lines.append(f"| {r['label']} | {r['images_used']} | {r['blocks']} | {r['wall_s']:.1f} | "
                         f"{r['stages_s']:.1f} | {r['stages_per_image']:.3f} | {r['peak_rss_mib']:.0f} |")
    out["markdown"] = "\n".join(lines)
    print("\nMarkdown:\n")
    print(out["markdown"])
    return all_ok


# --------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--nproc", type=int, default=2, help="nproc for find_spots, integrate and process_gapped (2)")
    p.add_argument("--workdir", help="folder for images and runs (kept; default: a new folder under /tmp); "
                   "simulated images already there are reused")
    p.add_argument("--images", type=int, default=120, help="simulated images (120)")
    p.add_argument("--osc", type=float, default=0.5, help="simulated oscillation width, deg (0.5)")
    p.add_argument("--detector", default="pilatus2m",
                   choices=["pilatus300k", "pilatus1m", "pilatus2m", "pilatus6m"], help="(pilatus2m)")
    p.add_argument("--distance", type=float, help="simulated detector distance, mm (the simulator's default)")
    p.add_argument("--seed", type=int, default=42, help="simulation seed (42)")
    p.add_argument("--omit", help="images left out (default 41:45,81:83; with --snase 40:45)")
    p.add_argument("--snase", metavar="PATH", help="use the SNase images snc_newhead_000NN.img.bz2 in PATH")
    p.add_argument("--only", default="a,b,c", help="chains to run, e.g. b,c (a,b,c)")
    p.add_argument("--blocks-scaling", action="store_true",
                   help="run only (c): the sweep in 1, 3 and 10 blocks and half the images")
    p.add_argument("--block-counts", default="1,3,10", help="blocks for --blocks-scaling (1,3,10)")
    p.add_argument("--repeat", type=int, default=1,
                   help="--blocks-scaling: run every configuration this many times, in rounds, and compare "
                   "each one's fastest (smallest sum of stages) (1)")
    p.add_argument("--json", metavar="FILE", help="write all numbers to FILE")
    p.add_argument("--c-phil", nargs="*", default=["refinement.blocks.model=per_block", "integration.gap_partials=separate"],
                   metavar="KEY=VALUE",
                   help="parameters for dials.process_gapped in (c) (default: the per-block model and a "
                   "reflection spanning a gap kept as two rows, as the CLI chains it is compared with "
                   "keep them; the continuous model's science "
                   "is benchmarks/continuous.py's), e.g. refinement.blocks.tie_cells=False")
    args = p.parse_args(argv)

    args.only = [k for k in args.only.replace(" ", "").split(",") if k]
    if not args.only or any(k not in "abc" for k in args.only):
        p.error("--only takes a comma-separated subset of a,b,c")
    args.only = sorted(set(args.only))
    args.block_counts = sorted({int(k) for k in args.block_counts.split(",")})
    if args.block_counts[0] != 1:
        args.block_counts.insert(0, 1)
    if args.nproc < 1:
        p.error("--nproc must be at least 1")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.workdir = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="gapfill-bench-")
    os.makedirs(args.workdir, exist_ok=True)
    if args.omit is None:
        args.omit = "" if args.blocks_scaling else (SNASE_OMIT if args.snase else "41:45,81:83")
    omit = parse_ranges(args.omit)

    print(f"Work folder: {args.workdir}")
    sim_seconds = None
    if args.snase:
        data = snase(args.snase)
    else:
        data, sim_seconds = simulate(args, args.workdir)
    unknown = sorted(omit - set(data.files))
    if unknown:
        print(f"warning: --omit images {unknown} are not in the sweep")
    numbers = [n for n in data.files if n not in omit]
    if len(numbers) < 2:
        sys.exit("benchmark: fewer than 2 images left")

    load = os.getloadavg()
    cpus = os.cpu_count()
    print(f"{data.kind} data: {len(data.files)} images, using {len(numbers)} in blocks "
          f"{['%d-%d' % b for b in blocks_of(numbers)]}; nproc={args.nproc}; {cpus} CPUs; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if load[0] > 0.5 * (cpus or 1):
        print("warning: the machine is busy (load average above half the CPUs): timings will be disturbed")
    t_start = time.perf_counter()
    warm_cache(data.select(numbers if not args.blocks_scaling else data.files))

    out = {
        "benchmark": "dials_gapfill benchmarks/benchmark.py",
        "mode": "blocks-scaling" if args.blocks_scaling else "chains",
        "config": {"nproc": args.nproc, "workdir": args.workdir, "data": data.kind,
                   "images": len(data.files), "images_used": len(numbers), "omit": sorted(omit),
                   "blocks": blocks_of(numbers), "osc": args.osc if not args.snase else 1.0,
                   "detector": None if args.snase else args.detector, "distance": args.distance,
                   "seed": None if args.snase else args.seed, "snase": args.snase,
                   "geometry": data.geometry, "only": args.only, "cpu_count": cpus},
        "simulation_seconds": sim_seconds,
        "loadavg_start": load,
        "targets_definition": TARGETS,
    }
    if args.blocks_scaling:
        ok = blocks_scaling(args, data, numbers, out)
    else:
        ok = benchmark(args, data, numbers, out)
    out["benchmark_seconds"] = time.perf_counter() - t_start
    out["ok"] = ok
    print(f"\nBenchmark took {out['benchmark_seconds']:.0f} s"
          + (f" (plus {sim_seconds:.0f} s simulating)" if sim_seconds else "") + f"; files in {args.workdir}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
        print(f"Numbers written to {args.json}")
    if not ok:
        print("benchmark: at least one step failed (see ERROR above)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
