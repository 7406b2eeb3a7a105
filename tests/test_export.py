"""Export: MTZ files read back independently with gemmi; dials.scale reads the outputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import SNASE_PROCESSED_BLOCKS, run_forked

pytestmark = pytest.mark.slow

gemmi = pytest.importorskip("gemmi", reason="gemmi is a test requirement (pip install gemmi)")


def _mtz(path):
    mtz = gemmi.read_mtz_file(path)
    data = np.array(mtz, copy=False)
    columns = {label: data[:, i] for i, label in enumerate(mtz.column_labels())}
    return mtz, columns


def test_batches_are_image_numbers(processed):
    mtz, col = _mtz(os.path.join(processed["dir"], "integrated.mtz"))
    batches = set(col["BATCH"].astype(int))
    expected = set(range(1, 41)) | set(range(46, 81)) | set(range(84, 121))
    assert batches == expected
    assert not batches & {41, 42, 43, 44, 45, 81, 82, 83}
    # the batch headers: one per image, numbered as the images
    assert sorted(b.number for b in mtz.batches) == sorted(expected)


def test_cell_space_group_and_columns(processed, truth):
    mtz, col = _mtz(os.path.join(processed["dir"], "integrated.mtz"))
    assert mtz.spacegroup.hm == "P 1"
    cell = mtz.cell.parameters
    # (measured: lengths within 1e-5 of the truth, angles within 0.001 deg)
    for v, t in zip(cell[:3], truth["unit_cell"][:3]):
        assert abs(v / t - 1) < 5e-4, (cell, truth["unit_cell"])
    for v, t in zip(cell[3:], truth["unit_cell"][3:]):
        assert abs(v - t) < 0.05, (cell, truth["unit_cell"])
    for label in ("H", "K", "L", "M/ISYM", "BATCH", "I", "SIGI", "IPR", "SIGIPR", "BG", "SIGBG",
                  "FRACTIONCALC", "XDET", "YDET", "ROT", "LP", "QE"):
        assert label in col, label
    assert np.all(col["SIGI"] > 0)
    # ROT (phi) lies inside the block of each BATCH
    for b, rot in zip(col["BATCH"][:5000], col["ROT"][:5000]):
        assert (b - 1) * 0.5 - 1.5 <= rot <= b * 0.5 + 1.5


def test_mtz_holds_the_filtered_integrated_reflections(processed):
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials.array_family import flex
    from dials.util.filter_reflections import filter_reflection_table

    d = processed["dir"]
    reflections = flex.reflection_table.from_file(os.path.join(d, "integrated.refl"))
    ExperimentListFactory.from_json_file(os.path.join(d, "integrated.expt"), check_format=False)
    filtered = filter_reflection_table(
        reflections, ["profile", "sum"], min_isigi=-5, filter_ice_rings=False,
        combine_partials=True, partiality_threshold=0.4, d_min=None,
    )
    _, col = _mtz(os.path.join(d, "integrated.mtz"))
    assert len(col["H"]) == len(filtered) > 25000


def test_block_mtz_files_partition_the_combined_one(processed):
    d = processed["dir"]
    _, combined = _mtz(os.path.join(d, "integrated.mtz"))
    key = lambda c: set(zip(c["BATCH"].astype(int), c["H"].astype(int), c["K"].astype(int), c["L"].astype(int)))  # noqa: E731
    whole = key(combined)
    parts = []
    for n, (first, last) in enumerate([(1, 40), (46, 80), (84, 120)], start=1):
        _, col = _mtz(os.path.join(d, f"integrated_{n}.mtz"))
        assert col["BATCH"].min() >= first and col["BATCH"].max() <= last
        parts.append(key(col))
    assert sum(len(p) for p in parts) == len(whole) == len(combined["H"])
    assert set().union(*parts) == whole


def test_dials_scale_reads_the_outputs(processed, tmp_path):
    d = processed["dir"]
    result = run_forked(
        ["dials.scale", os.path.join(d, "integrated.expt"), os.path.join(d, "integrated.refl"),
         "unmerged_mtz=scaled_cli.mtz"],
        cwd=str(tmp_path), timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    mtz, col = _mtz(str(tmp_path / "scaled_cli.mtz"))
    assert len(col["H"]) > 25000
    # dials.scale numbers batches from dxtbx' batch offsets, kept in integrated.expt so
    # that DIALS can re-slice the image sets: three runs of 40, 35 and 37 batches
    batches = sorted(b.number for b in mtz.batches)
    runs, start = [], batches[0]
    for x, y in zip(batches, batches[1:] + [None]):
        if y != x + 1:
            runs.append(x - start + 1)
            start = y
    assert runs == [40, 35, 37]


def test_scaling_in_process(processed):
    from cctbx import crystal, miller

    d = processed["dir"]
    import json

    summary = json.load(open(os.path.join(d, "dials.process_gapped.json")))
    s = summary["scaling"]
    assert s["cc_half"][0] >= 0.95
    assert s["multiplicity"][0] > 1.5
    # DIALS' physical model, as dials.scale chooses it: no scale factor below
    # 0.001 on three blocks of 35-40 images (the sign of divergence that
    # would have KB tried)
    assert s["model"]["requested"] == "auto" and s["model"]["used"] == "physical", s["model"]
    assert s["model"]["small_scales"] == 0 and s["model"]["kept"] > 25000, s["model"]
    assert "replaced" not in s["model"]
    import jsonschema

    schema = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dials_gapfill", "report",
                          "summary_schema.json")
    jsonschema.validate(summary, json.load(open(schema)))
    # the space group was determined (orthorhombic, primitive)
    assert s["symmetry"]["determined"] and s["symmetry"]["space_group"].startswith("P 2")
    merged, col = _mtz(os.path.join(d, "merged.mtz"))
    n_unique = len(col["H"])
    assert n_unique == s["n_unique"][0] == s["merged_reflections"]
    # as many unique reflections as the completeness says
    symmetry = crystal.symmetry(unit_cell=merged.cell.parameters, space_group_symbol=merged.spacegroup.hm)
    possible = miller.build_set(symmetry, anomalous_flag=False, d_min=s["d_min"][0], d_max=s["d_max"][0])
    assert n_unique == pytest.approx(possible.size() * s["completeness"][0] / 100, rel=0.01)
    # the unmerged scaled MTZ keeps image numbers as batches
    scaled_mtz, scaled = _mtz(os.path.join(d, "scaled.mtz"))
    images = set(range(1, 41)) | set(range(46, 81)) | set(range(84, 121))
    assert {b.number for b in scaled_mtz.batches} == images
    assert len(scaled["BATCH"]) > 1000 and set(scaled["BATCH"].astype(int)) <= images
    assert "Merging statistics" in processed["stdout"] and "CC half" in processed["stdout"]


def test_snase_batches_are_image_numbers(snase_processed):
    out = snase_processed
    _, col = _mtz(os.path.join(out, "integrated.mtz"))
    batches = set(col["BATCH"].astype(int))
    (first, last), (first_2, last_2) = SNASE_PROCESSED_BLOCKS
    assert batches <= set(range(first, last + 1)) | set(range(first_2, last_2 + 1))
    assert min(batches) <= first + 1 and max(batches) >= last_2 - 1
    assert batches & set(range(first_2, last_2)) and not batches & set(range(last + 1, first_2))
    mtz = gemmi.read_mtz_file(os.path.join(out, "integrated.mtz"))
    cell = sorted(mtz.cell.parameters[:3])
    # SNase (P4, indexed in P1 here): DIALS 3.12 on the contiguous sweep gives
    # 48.42 48.47 63.41 with 98 % of the spots indexed (../shared/README.md)
    assert cell == pytest.approx([48.42, 48.47, 63.41], rel=0.003)
    summary = json.load(open(os.path.join(out, "dials.process_gapped.json")))
    assert [(b["first"], b["last"]) for b in summary["blocks"]] == SNASE_PROCESSED_BLOCKS
    for b in summary["blocks"]:
        assert b["indexed_fraction"] > 0.95, b
        assert b["rmsd_scan_varying"]["x"] < 0.6 and b["rmsd_scan_varying"]["y"] < 0.6
        assert b["rmsd_scan_varying"]["phi"] < 0.3


def test_a_sweep_whose_files_start_at_image_0(tmp_path):
    """MTZ batches start at 1: a sweep with an image 0 has BATCH = image + 1
    in every block (DIALS' own numbering shifts only the block that starts at
    0), as its batch offset in the JSON says; image 0 can be excluded."""
    from conftest import process_ok

    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    images = str(tmp_path / "images")
    simulate(SimulationConfig(n_images=24, first_image=0, osc_width=1.0, detector="pilatus300k", distance=150.0,
                              omit=(10, 11), seed=42), images)
    out = str(tmp_path / "out")
    result = process_ok(images, out, "exclude_images=0")
    summary = json.load(open(os.path.join(out, "dials.process_gapped.json")))
    assert [s["batch_offset"] for s in summary["sweeps"]] == [1]
    assert [(b["first"], b["last"]) for b in summary["blocks"]] == [(1, 9), (12, 23)]
    assert {"image": 0, "reason": "gaps.exclude_images"}.items() <= summary["excluded_images"][0].items()
    assert "MTZ batches:   2-10, 13-24 (image number + 1: MTZ batches start at 1)" in result.stdout
    combined = {b.number for b in gemmi.read_mtz_file(os.path.join(out, "integrated.mtz")).batches}
    assert combined == {n + 1 for n in list(range(1, 10)) + list(range(12, 24))}
    for number, (first, last) in enumerate([(1, 9), (12, 23)], start=1):
        block = gemmi.read_mtz_file(os.path.join(out, f"integrated_{number}.mtz"))
        assert {b.number for b in block.batches} == set(range(first + 1, last + 2)), number
