"""The core pipeline on the simulated 3-block sweep: it recovers the ground truth."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def _angle(m):
    u, _, vt = np.linalg.svd(m)
    r = u @ vt
    return math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(r) - 1) / 2))))


def _frame(panel):
    f, s = np.array(panel.get_fast_axis()), np.array(panel.get_slow_axis())
    return np.stack([f, s, np.cross(f, s)], axis=1)


@pytest.fixture(scope="module")
def integrated(processed):
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials.array_family import flex

    d = processed["dir"]
    experiments = ExperimentListFactory.from_json_file(os.path.join(d, "integrated.expt"), check_format=False)
    reflections = flex.reflection_table.from_file(os.path.join(d, "integrated.refl"))
    summary = json.load(open(os.path.join(d, "dials.process_gapped.json")))
    return experiments, reflections, summary


@pytest.fixture(scope="module")
def simulation(truth):
    """The simulator that made the sweep: its predicted reflections are the truth."""
    from dials_gapfill.simulation.simulate import Simulation, SimulationConfig

    config = {k: tuple(v) if isinstance(v, list) else v for k, v in truth["config"].items()}
    return Simulation(SimulationConfig(**config))


def test_blocks_and_shared_models(integrated):
    experiments, _, summary = integrated
    assert [e.scan.get_image_range() for e in experiments] == [(1, 40), (46, 80), (84, 120)]
    # read back from integrated.expt: one beam, detector, goniometer; a crystal per block
    for e in experiments:
        assert e.beam is experiments[0].beam
        assert e.detector is experiments[0].detector
        assert e.goniometer is experiments[0].goniometer
    assert len(experiments.crystals()) == 3
    assert len({id(e.crystal) for e in experiments}) == 3
    assert all(e.crystal.num_scan_points == e.scan.get_num_images() + 1 for e in experiments)
    # the continuous model (default): each block holds the slice of one
    # scan-varying crystal over images 1-120, smoothed with the B-spline
    assert all(b["refinement"].startswith("continuous: one crystal over images 1-120, orientation scan-varying")
               and "quadratic B-spline smoother" in b["refinement"] for b in summary["blocks"])
    assert summary["crystal"]["model"] == "continuous"
    # the summary's orientations are those of integrated.expt (not of the
    # models DIALS' MTZ export turns into its own frame)
    for e, b in zip(experiments, summary["blocks"]):
        mid = e.crystal.num_scan_points // 2
        assert np.allclose(b["U_mid"], e.crystal.get_U_at_scan_point(mid), atol=1e-9), b["number"]


def test_cell_matches_truth(integrated, truth):
    experiments, _, summary = integrated
    true_cell = truth["unit_cell"]
    for e in experiments:
        cell = e.crystal.get_unit_cell().parameters()
        # (measured: lengths within 1e-5 of the truth, angles within 0.001 deg)
        for v, t in zip(cell[:3], true_cell[:3]):
            assert abs(v - t) / t < 5e-4, (cell, true_cell)
        for v, t in zip(cell[3:], true_cell[3:]):
            assert abs(v - t) < 0.05, (cell, true_cell)
    # one crystal across the blocks: one cell
    spread = summary["crystal"]["final"]["cell_spread"]
    assert max(spread) < 1e-6, spread


def test_orientation_at_block_midpoints(integrated, truth, simulation):
    """Each block's orientation at its mid-point within 0.05 deg of the truth.

    With scan-varying crystal orientations, DIALS' parameterisation has a gauge
    freedom: a small rotation of beam and detector about the sample (the
    spindle held fixed) is absorbed by the crystal orientation, whose
    correction varies smoothly with phi.  The static model absorbs part of
    the simulated drift that way, so the refined frame is rotated by ~0.5 deg
    (dials.refine on the same data does the same).  The orientation is
    compared in the refined detector frame: U_true(phi) vs
    R(phi)^-1 T^-1 R(phi) U_refined(phi), T the rotation of the detector frame.
    """
    experiments, _, _ = integrated
    sim = simulation
    T = _frame(experiments[0].detector[0]) @ _frame(sim.detector[0]).T
    frame_rotation = _angle(T)
    assert frame_rotation < 1.0
    U_true = np.array(truth["orientation"]["U"]).reshape(-1, 3, 3)
    B_true = np.array(truth["orientation"]["B"]).reshape(3, 3)
    axis = experiments[0].goniometer.get_rotation_axis()
    for e in experiments:
        first = e.scan.get_image_range()[0]
        k = e.crystal.num_scan_points // 2
        R = rotation(axis, math.radians(e.scan.get_angle_from_array_index(first - 1 + k)))
        A = R.T @ T.T @ R @ np.array(e.crystal.get_A_at_scan_point(k)).reshape(3, 3)
        A_true = U_true[first - 1 + k] @ B_true
        change_of_basis = np.round(np.linalg.solve(A_true, A))
        assert abs(abs(np.linalg.det(change_of_basis)) - 1) < 1e-6
        mis = _angle(A @ np.linalg.inv(A_true @ change_of_basis))
        assert mis < 0.05, (e.scan.get_image_range(), mis, frame_rotation)


def test_rmsds(integrated):
    _, _, summary = integrated
    for b in summary["blocks"]:
        for key in ("rmsd_static", "rmsd_scan_varying"):
            r = b[key]
            assert r["x"] < 0.5 and r["y"] < 0.5 and r["phi"] < 0.5, (key, r)
            assert r["n"] > 1000
        # scan-varying refinement models the drift better than the static model
        assert b["rmsd_scan_varying"]["phi"] < b["rmsd_static"]["phi"]


def test_intensities_match_truth(integrated, truth):
    from cctbx import crystal, miller

    from dials.array_family import flex

    experiments, reflections, summary = integrated
    sel = reflections.get_flags(reflections.flags.integrated_prf)
    r = reflections.select(sel)
    scale = r["lp"] / r["qe"]
    I = r["intensity.prf.value"] * scale
    sigma = flex.sqrt(r["intensity.prf.variance"]) * scale
    symmetry = crystal.symmetry(unit_cell=truth["unit_cell"], space_group_symbol=truth["space_group"])
    asu = miller.set(symmetry, r["miller_index"], anomalous_flag=False).map_to_asu().indices()
    true_I = {tuple(h): v for h, v in zip(truth["intensities"]["miller_index"], truth["intensities"]["I"])}
    x, y = [], []
    for h, i, s in zip(asu, I, sigma):
        if s > 0 and i / s > 3 and tuple(h) in true_I:
            x.append(i)
            y.append(true_I[tuple(h)])
    assert len(x) > 20000
    assert np.corrcoef(x, y)[0, 1] >= 0.95
    # every block integrated, most by profile fitting
    for b in summary["blocks"]:
        assert b["integrated"] > 9000
        assert b["profile_fitted"] > 0.85 * b["integrated"]
        assert b["profile"] == "all blocks"  # the continuous model: one profile model


def test_log_reports_blocks_and_stages(processed):
    log = open(os.path.join(processed["dir"], "dials.process_gapped.log")).read()
    for stage in ("Import", "Spot finding", "Indexing", "Refinement", "Integration", "Export"):
        assert f"=== {stage} ===" in log and f"{stage} done in" in log
    assert "Block 2 (images 46-80)" in log
    assert "spots indexed" in log
    summary = processed["stdout"]
    assert "RMSD x (px)" in summary and "46-80" in summary and "84-120" in summary


def test_json_summary_layout(processed):
    """dials.process_gapped.json validates against its documented schema, and adds up."""
    import jsonschema

    schema_path = os.path.join(os.path.dirname(__import__("dials_gapfill").__file__), "report", "summary_schema.json")
    summary = json.load(open(os.path.join(processed["dir"], "dials.process_gapped.json")))
    jsonschema.validate(summary, json.load(open(schema_path)))
    totals, blocks = summary["totals"], summary["blocks"]
    assert totals["blocks"] == len(blocks) == 3
    for key in ("spots", "indexed", "integrated"):
        assert totals[key] == sum(b[key] for b in blocks)
    used = sum(b["n_images"] for b in blocks)
    first, last = summary["input"]["image_range"]
    assert used + totals["images_excluded"] == last - first + 1 == 120
    assert summary["per_image"]["image"] == [n for b in blocks for n in range(b["first"], b["last"] + 1)]
    assert [s["name"] for s in summary["timing"]["stages"]] == [
        "import", "spot finding", "bad images", "detector checks", "indexing", "refinement",
        "integration", "export", "scaling"
    ]
    names = {f["name"] for f in summary["files"]}
    assert {"integrated.expt", "integrated.refl", "integrated.mtz", "scaled.mtz", "merged.mtz"} <= names
    for name in names:
        assert os.path.exists(os.path.join(processed["dir"], name)), name


def test_gap_edge_reflections_flagged_with_true_partiality(integrated, truth, simulation):
    """Rocking curves cut by a gap are flagged, counted per block, and their
    DIALS partiality matches the fraction the simulator put on the block's images."""
    from scipy.stats import norm

    experiments, reflections, summary = integrated
    blocks = summary["blocks"]
    flagged = reflections["gap_edge"]
    ids = np.array(reflections["id"])
    cut = np.array(flagged)
    assert [b["gap_edge"] for b in blocks] == [int((cut & (ids == i)).sum()) for i in range(3)]
    assert summary["totals"]["gap_edge"] == int(cut.sum())
    # block 1 is cut by the gap at its end only, block 3 at its start only, block 2 at both;
    # the sweep's first and last images are ends, not gaps
    assert blocks[0]["sweep_end"] > 300 and blocks[2]["sweep_end"] > 300 and blocks[1]["sweep_end"] == 0
    assert min(b["gap_edge"] for b in blocks) > 300
    assert blocks[1]["gap_edge"] > 1.3 * blocks[0]["gap_edge"]
    z0 = np.array(reflections["bbox"].parts()[4])
    z1 = np.array(reflections["bbox"].parts()[5])
    assert np.all(z1[cut & (ids == 0)] == 40) and np.all(z0[cut & (ids == 2)] == 83)
    assert np.all(np.array(reflections["partiality"])[cut] < 0.9973)

    # truth: the fraction of each reflection's Gaussian rocking curve on its block's images
    A_true = np.array(truth["orientation"]["U"][0]).reshape(3, 3) @ np.array(truth["orientation"]["B"]).reshape(3, 3)
    C = np.round(np.linalg.solve(A_true, np.array(experiments[0].crystal.get_A_at_scan_point(0)).reshape(3, 3)))
    by_hkl = {}
    for j, h in enumerate(map(tuple, simulation.ref_hkl)):
        by_hkl.setdefault(h, []).append(j)
    osc0, width = truth["oscillation"]
    # (rows whose two parts either side of a gap were combined hold the sum of
    # two blocks' fractions: tests/test_gap_partials.py)
    sel = reflections.select(flagged & ~reflections["gap_combined"])
    hkl = np.array(list(sel["miller_index"]), dtype=float) @ C.T
    phi = osc0 + np.array(sel["xyzcal.px"].parts()[2]) * width
    ranges = [e.scan.get_image_range() for e in experiments]
    dials_p, true_p = [], []
    for h, p, i, part in zip(hkl, phi, sel["id"], sel["partiality"]):
        cands = by_hkl.get(tuple(int(round(v)) for v in h), [])
        near = [j for j in cands if abs(simulation.ref_phi[j] - p) < 1.0]
        if len(near) != 1:
            continue
        c, s = simulation.ref_phi[near[0]], simulation.ref_sigma_phi[near[0]]
        first, last = ranges[i]
        lo, hi = osc0 + (first - 1) * width, osc0 + last * width
        true_p.append(norm.cdf((hi - c) / s) - norm.cdf((lo - c) / s))
        dials_p.append(part)
    dials_p, true_p = np.array(dials_p), np.array(true_p)
    assert len(true_p) > 0.98 * len(sel)
    # measured: median 0.0006, 95th percentile 0.0096, max 0.016, r 0.99995
    err = np.abs(dials_p - true_p)
    assert np.median(err) < 0.005 and np.percentile(err, 95) < 0.03, (np.median(err), np.percentile(err, 95))
    assert np.corrcoef(dials_p, true_p)[0, 1] > 0.999


def test_gap_edge_intensities_corrected_by_partiality(integrated, truth):
    """Flagged partials above the export threshold, scaled by 1/partiality as
    DIALS' export does, agree with the true intensities as well as full ones."""
    from conftest import summation_against_truth

    _, reflections, summary = integrated
    r = reflections.select(reflections.get_flags(reflections.flags.integrated_sum))
    r = r.select(r["partiality"] > 0)
    partiality = np.array(r["partiality"])
    I, sigma, true_I = summation_against_truth(r, truth)
    good = (sigma > 0) & (I > 3 * sigma) & ~np.isnan(true_I)
    edge = np.array(r["gap_edge"]) & (partiality >= 0.4) & good
    full = ~np.array(r["gap_edge"]) & (partiality > 0.99) & good
    assert edge.sum() > 1000
    assert sum(b["gap_edge_exported"] for b in summary["blocks"]) >= edge.sum()
    cc_edge = np.corrcoef(I[edge], true_I[edge])[0, 1]
    cc_full = np.corrcoef(I[full], true_I[full])[0, 1]
    assert cc_edge >= 0.99 and cc_edge > cc_full - 0.005, (cc_edge, cc_full)
    assert abs(np.median(I[edge] / true_I[edge]) - 1) < 0.02
