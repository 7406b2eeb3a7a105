#!/usr/bin/env python3
"""Where dials.process_gapped spends its CPU time: py-spy over a whole run.

Runs ``dials.process_gapped`` on a simulated sweep of benchmarks/continuous.py
(``standard``: 120 x 0.5 deg without images 41-45 and 81-83, the default
benchmark's sweep; ``every10``: 90 x 0.5 deg without every 10th image) under
``py-spy record --subprocesses`` (pip install py-spy), then sorts every sample
(one process, on CPU) into the stage whose frame is on its stack and, within
the stage, into the first DIALS function of PARTS that is on it.  Prints the
CPU seconds of each stage and part (samples / rate, all processes added up)
and the stages' wall clock from the run's JSON, as a Markdown table.

    .venv/bin/python benchmarks/cpu_profile.py --sweep standard --phil refinement.blocks.model=per_block
    .venv/bin/python benchmarks/cpu_profile.py --sweep every10
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

STAGES = [
    ("stage_import", "import"),
    ("stage_find_spots", "spot finding"),
    ("stage_bad_images", "bad images"),
    ("stage_detector_checks", "detector checks"),
    ("stage_index", "indexing"),
    ("stage_refine", "refinement"),
    ("stage_integrate", "integration"),
    ("stage_export", "export"),
    ("stage_scale", "scaling"),
]

# (part, a function on the stack): the first that matches names the part; a
# Class.method matches a frame ending with it, a bare name anywhere in a frame
PARTS = [
    ("candidate lattices refined (ModelEvaluation)", "ModelEvaluation.evaluate"),
    ("FFT basis-vector search", "BasisVectorSearch.find_candidate_basis_vectors"),
    ("profile fitting (compute_fitted_intensity)", "compute_fitted_intensity"),
    ("reference profiles (profile modeller)", "ValidatedMultiExpProfileModeller.model"),
    ("sigma_b, sigma_m (ProfileModelCalculator)", "ProfileModelCalculator.__init__"),
    ("foreground/background masks (compute_mask)", "compute_mask"),
    ("background (GLM)", "compute_background"),
    ("image reading and decompression", "get_corrected_data"),
    ("image reading and decompression", "get_raw_data"),
    ("image reading and decompression", "_read_cbf_image"),
    ("image mask", "get_mask"),
    ("spot threshold (dispersion)", "ThresholdStrategy.__call__"),
    ("spot labelling and centroids", "ExtractPixelsFromImage.__call__"),
    ("spot labelling and centroids", "ExtractSpots.__call__"),
    ("outlier rejection (MCD/Tukey)", "CentroidOutlier.__call__"),
    ("least squares (gradients, normal equations)", "LevenbergMarquardtIterations.run"),
    ("least squares (gradients, normal equations)", "GaussNewtonIterations.run"),
    ("refiner set-up (reflection manager)", "RefinerFactory.from_parameters_data_experiments"),
    ("re-indexing against predictions", "index_against_predictions"),
    ("prediction", "Predictor"),
    ("prediction", "predict"),
    ("shoebox extraction (processor)", "Task.__call__"),
    ("Bravais settings", "refined_settings_from_refined_triclinic"),
    ("MTZ and tables", "export_mtz"),
]


def record(argv, out, rate):
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if not spy:
        sys.exit("profile: py-spy not found: pip install py-spy")
    cmd = [spy, "record", "--subprocesses", "--rate", str(rate), "--format", "raw", "-o", out, "--", *argv]
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"profile: the run failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return time.perf_counter() - t0


def classify(raw, rate):
    """{stage: Counter(part: CPU seconds)} from py-spy's raw (collapsed) stacks."""
    table = collections.defaultdict(collections.Counter)
    for line in open(raw):
        stack, _, n = line.rstrip().rpartition(" ")
        frames = [re.sub(r"\s*\(.*\)$", "", f) for f in stack.split(";")]
        seconds = int(n) / rate
        stage = next((name for marker, name in STAGES if marker in frames), "outside the stages")
        part = "other"
        for name, marker in PARTS:
            if any(f.endswith(marker) if "." in marker else marker in f for f in frames):
                part = name
                break
        table[stage][part] += seconds
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", default="standard", help="standard or every10 (benchmarks/continuous.py)")
    p.add_argument("--workdir", default="/tmp/gapfill_continuous_bench", help="images (shared with continuous.py)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rate", type=int, default=25, help="samples per second and process (25)")
    p.add_argument("--phil", nargs="*", default=[], help="extra parameters for dials.process_gapped")
    p.add_argument("--json", help="write the table to this file")
    args = p.parse_args(argv)

    import continuous  # benchmarks/continuous.py: the sweeps

    directory, _ = continuous.simulated(args.workdir, args.sweep)
    omit = set(continuous.SWEEPS[args.sweep]["omit"])
    files = sorted(
        os.path.join(directory, f) for f in os.listdir(directory)
        if f.endswith(".cbf") and int(f.split("_")[-1].split(".")[0]) not in omit
    )
    out = os.path.join(args.workdir, f"profile_{args.sweep}")
    shutil.rmtree(out, ignore_errors=True)
    tool = os.path.join(os.path.dirname(sys.executable), "dials.process_gapped")
    run = [tool, *files, f"nproc={args.nproc}", f"output.directory={out}", "output.progress=none", *args.phil]
    raw = out + ".raw"
    wall = record(run, raw, args.rate)
    with open(os.path.join(out, "dials.process_gapped.json")) as fh:
        stages = {s["name"]: s["seconds"] for s in json.load(fh)["timing"]["stages"]}
    table = classify(raw, args.rate)
    total = sum(sum(c.values()) for c in table.values())

    print(f"\ndials.process_gapped on '{args.sweep}' ({len(files)} images), nproc={args.nproc}, "
          f"{' '.join(args.phil) or 'defaults'}: {wall:.1f} s wall under py-spy, {total:.1f} CPU s sampled\n")
    print("| stage | wall (s) | CPU (s) | CPU share | largest parts (CPU s) |")
    print("|---|---:|---:|---:|---|")
    rows = []
    order = [name for _, name in STAGES] + ["outside the stages"]
    for stage in order:
        if stage not in table:
            continue
        parts = table[stage]
        cpu = sum(parts.values())
        top = ", ".join(f"{k} {v:.1f}" for k, v in parts.most_common(4) if v >= 0.05 * cpu)
        w = stages.get(stage)
        print(f"| {stage} | {'' if w is None else f'{w:.1f}'} | {cpu:.1f} | {100 * cpu / total:.0f} % | {top} |")
        rows.append(dict(stage=stage, wall=w, cpu=cpu, parts=dict(parts)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(sweep=args.sweep, phil=args.phil, wall=wall, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
