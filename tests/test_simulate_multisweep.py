"""Several sweeps of one crystal on a multi-axis goniometer: dxtbx reads each
sweep with its own setting, the truth predicts the spots DIALS finds in every
sweep, the crystal is the same in all; one plain sweep is written as before."""

from __future__ import annotations

import glob
import hashlib
import json
import os

import numpy as np
import pytest

from conftest import run_cmd, tool

BASE = dict(n_images=3, detector="pilatus300k", seed=5)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """3 sweeps (kappa goniometer, default settings) of 3 images; (folder, truth)."""
    from dials_gapfill.simulation.multisweep import MultiSweepConfig, simulate_sweeps
    from dials_gapfill.simulation.simulate import SimulationConfig

    d = str(tmp_path_factory.mktemp("three_sweeps"))
    truth = simulate_sweeps(MultiSweepConfig(base=SimulationConfig(**BASE), n_sweeps=3), d)
    return d, truth


@pytest.fixture(scope="module")
def experiments(three):
    from dxtbx.model.experiment_list import ExperimentListFactory

    d, _ = three
    return ExperimentListFactory.from_filenames(sorted(glob.glob(os.path.join(d, "*.cbf"))))


def _with_true_crystals(experiments, truth, gauge=None):
    """The experiments, each with its sweep's true scan-varying crystal; with
    `gauge` (a rotation G), as if beam and detector had turned about the
    sample: every laboratory setting matrix S R(phi) F A becomes G S R(phi) F A."""
    from dxtbx.model import Crystal

    from dials_gapfill.simulation.compare import _truth_SRF, sweep_of, sweep_truth
    from dials_gapfill.simulation.simulate import rotation

    for exp in experiments:
        st = sweep_truth(truth, sweep_of(exp, truth))
        B = np.array(st["orientation"]["B"]).reshape(3, 3)
        f, l = exp.scan.get_image_range()
        first = st["image_range"][0]
        A = [np.array(st["orientation"]["U"][n - first]).reshape(3, 3) @ B for n in range(f, l + 2)]
        if gauge is not None:
            S, axis, F = _truth_SRF(st)
            phis = st["orientation"]["phi"][f - first : l - first + 2]
            M = [S @ rotation(axis, phi) @ F for phi in phis]
            A = [np.linalg.inv(m) @ gauge @ m @ a for m, a in zip(M, A)]
        real = np.linalg.inv(A[0])  # rows are a, b, c
        crystal = Crystal(tuple(real[0]), tuple(real[1]), tuple(real[2]), space_group_symbol=truth["space_group"])
        crystal.set_A_at_scan_points([tuple(a.ravel()) for a in A])
        exp.crystal = crystal
    return experiments


def test_dxtbx_reads_each_sweep_with_its_setting(three, experiments):
    _, truth = three
    assert len(experiments) == len(truth["sweeps"]) == 3
    for exp, s in zip(experiments, truth["sweeps"]):
        assert exp.imageset.get_format_class().__name__ == "FormatCBFFullPilatus" == truth["format_class"]
        assert os.path.basename(exp.imageset.get_template()) == s["template"] == f"sim_{s['sweep']:02d}_####.cbf"
        g = exp.goniometer
        assert type(g).__name__ == "MultiAxisGoniometer"
        assert list(g.get_names()) == ["GON_PHI", "GON_KAPPA", "GON_OMEGA"]
        assert g.get_setting_rotation() == pytest.approx(s["setting_rotation"], abs=1e-9)
        assert g.get_fixed_rotation() == pytest.approx(s["fixed_rotation"], abs=1e-9)
        assert g.get_rotation_axis_datum() == pytest.approx(s["rotation_axis"])
        assert list(g.get_angles()) == pytest.approx([s["angles"]["phi"], s["angles"]["kappa"], s["angles"]["omega"]])
        assert exp.scan.get_image_range() == tuple(s["image_range"]) == (1, 3)
        assert exp.scan.get_oscillation() == pytest.approx(s["oscillation"])
        # beam and detector as the single-sweep miniCBF files have them
        panel = exp.detector[0]
        assert panel.get_distance() == pytest.approx(truth["distance_mm"], abs=1e-6)
        assert panel.get_beam_centre_px(exp.beam.get_s0()) == pytest.approx(truth["beam_centre_px"], abs=1e-6)
        assert exp.beam.get_s0() == pytest.approx(truth["s0"])
    # three different settings: kappa 0/40/-40, phi 0/120/240
    assert [s["angles"]["kappa"] for s in truth["sweeps"]] == [0.0, 40.0, -40.0]
    F = [np.array(s["fixed_rotation"]).reshape(3, 3) for s in truth["sweeps"]]
    assert np.allclose(F[0], np.eye(3))
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.allclose(F[i], F[j], atol=1e-3)


def test_truth_is_a_lab_frame_rotation_of_one_crystal(three, experiments):
    """Predictions of the true crystals lie on the Ewald sphere at S R(phi) F U B h
    (numpy from ground_truth.json alone), and the crystal at the goniometer datum
    starts every sweep where the drift left it."""
    from dials.array_family import flex

    from dials_gapfill.simulation.compare import _rotation_angle_deg, sweep_of, sweep_truth
    from dials_gapfill.simulation.multisweep import lab_setting_matrix
    from dials_gapfill.simulation.simulate import rotation

    _, truth = three
    s0 = np.array(truth["s0"])
    for exp in _with_true_crystals(experiments, truth):
        k = sweep_of(exp, truth)
        st = sweep_truth(truth, k)
        refl = flex.reflection_table.from_predictions(exp, dmin=truth["d_min"])
        assert len(refl) > 50
        phis = np.degrees(np.array(refl["xyzcal.mm"].parts()[2]))
        osc0, width = st["oscillation"]
        for i in range(0, len(refl), max(1, len(refl) // 25)):
            h = np.array(refl["miller_index"][i], dtype=float)
            phi = phis[i]
            j = min(int((phi - osc0) // width), len(st["orientation"]["U"]) - 2)
            frac = (phi - osc0) / width - j
            U = (1 - frac) * np.array(st["orientation"]["U"][j]) + frac * np.array(st["orientation"]["U"][j + 1])
            r = lab_setting_matrix(st, phi, U) @ h
            s1 = s0 + r
            assert np.linalg.norm(s1) == pytest.approx(np.linalg.norm(s0), rel=2e-5)
            assert np.array(refl["s1"][i]) == pytest.approx(s1, abs=2e-4)
        # the drift carries on through the sweeps
        U0 = np.array(truth["orientation"]["U0"]).reshape(3, 3)
        start = np.array(st["orientation"]["U"][0]).reshape(3, 3)
        angle = _rotation_angle_deg(start @ U0.T)
        assert angle == pytest.approx(truth["drift"]["rate"] * st["drift_start_deg"], abs=1e-6)
        assert st["drift_start_deg"] == pytest.approx((k - 1) * 3 * 0.5)
        R = rotation(truth["drift"]["axis"], truth["drift"]["rate"] * st["drift_start_deg"])
        assert np.allclose(R @ U0, start, atol=1e-9)


def test_spots_found_where_the_truth_predicts_them(three, experiments):
    """DIALS' spot finder on every sweep; each strong spot within 1 px of a
    reflection the true crystal predicts (DIALS' predictor, the goniometer
    dxtbx read from the files)."""
    from dials.array_family import flex
    from dials.command_line import find_spots

    _, truth = three
    experiments = _with_true_crystals(experiments, truth)
    params = find_spots.working_phil.extract()
    params.spotfinder.mp.nproc = 1
    for i, exp in enumerate(experiments):
        from dxtbx.model.experiment_list import ExperimentList

        one = ExperimentList([exp])
        strong = flex.reflection_table.from_observations(one, params)
        predicted = flex.reflection_table.from_predictions(exp, dmin=truth["d_min"])
        px, py, pz = (np.array(c) for c in predicted["xyzcal.px"].parts())
        distances = []
        for x, y, z in strong["xyzobs.px.value"]:
            near = np.abs(pz - z) < 1.5
            distances.append(np.min(np.hypot(px[near] - x, py[near] - y)))
        distances = np.array(distances)
        assert len(distances) > 30, f"sweep {i + 1}: {len(distances)} strong spots"
        assert np.median(distances) < 0.5, f"sweep {i + 1}"
        assert np.mean(distances < 1.0) > 0.85, f"sweep {i + 1}: {np.mean(distances < 1.0)}"


def test_same_reflection_same_true_intensity_in_every_sweep(three):
    from cctbx import crystal, miller

    from dials.array_family import flex

    from dials_gapfill.simulation.multisweep import MultiSweepConfig, MultiSweepSimulation
    from dials_gapfill.simulation.simulate import SimulationConfig

    _, truth = three
    msim = MultiSweepSimulation(MultiSweepConfig(base=SimulationConfig(**BASE), n_sweeps=3))
    true_I = dict(zip(map(tuple, truth["intensities"]["miller_index"]), truth["intensities"]["I"]))
    symmetry = crystal.symmetry(unit_cell=truth["unit_cell"], space_group_symbol=truth["space_group"])
    seen = {}
    for k, sim in enumerate(msim.sweeps, start=1):
        assert np.array_equal(sim.true_I, msim.sweeps[0].true_I)
        hkl = flex.miller_index([tuple(int(v) for v in h) for h in sim.ref_hkl])
        asu = miller.set(symmetry, hkl, anomalous_flag=False).map_to_asu().indices()
        for h, a in zip(asu, sim.ref_asu):
            assert sim.true_I[a] == pytest.approx(true_I[tuple(h)], abs=1e-3)
            seen.setdefault(tuple(h), set()).add(k)
    # the sweeps see the crystal differently, and share reflections
    assert sum(len(v) > 1 for v in seen.values()) > 10
    assert len({len(sim.ref_hkl) for sim in msim.sweeps}) > 1


def test_omitted_and_bad_images_per_sweep(tmp_path):
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.simulation.multisweep import MultiSweepConfig, SweepConfig, simulate_sweeps
    from dials_gapfill.simulation.simulate import SimulationConfig

    config = MultiSweepConfig(
        base=SimulationConfig(n_images=2, detector="pilatus300k", seed=5),
        goniometer="fixed_chi",
        sweeps=(
            SweepConfig(bad_images={1: "zero"}),
            SweepConfig(angles={"phi": 120}, omit=(3,), first_image=3),
            SweepConfig(scan_axis="phi", osc_start=10.0, prefix="phi_scan"),
        ),
    )
    truth = simulate_sweeps(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [
        "ground_truth.json", "phi_scan_0001.cbf", "phi_scan_0002.cbf",
        "sim_01_0001.cbf", "sim_01_0002.cbf", "sim_02_0004.cbf",
    ]
    assert [s["images_written"] for s in truth["sweeps"]] == [[1, 2], [4], [1, 2]]
    assert truth["sweeps"][1]["omitted"] == [3] and truth["sweeps"][0]["bad_images"] == {"1": "zero"}

    def pixels(name):
        exp = ExperimentListFactory.from_filenames([str(tmp_path / name)])[0]
        return exp, exp.imageset.get_raw_data(0)[0].as_numpy_array()

    _, zero = pixels("sim_01_0001.cbf")
    assert zero.max() == 0
    exp, _ = pixels("phi_scan_0002.cbf")
    assert exp.goniometer.get_scan_axis() == 0  # phi, innermost
    assert exp.scan.get_oscillation() == pytest.approx((10.5, 0.5))
    assert list(exp.goniometer.get_angles()) == pytest.approx([10.5, 0.0])  # (phi, omega)
    # the same image number in two sweeps: other noise
    _, a = pixels("sim_01_0002.cbf")
    _, b = pixels("phi_scan_0002.cbf")
    assert not np.array_equal(a, b)


def test_compare_several_sweeps(three, experiments):
    """orientation_errors: each experiment against its own sweep's truth; an
    error put into one sweep shows in that sweep."""
    from dials_gapfill.simulation.compare import cell_error, orientation_errors
    from dials_gapfill.simulation.simulate import rotation

    _, truth = three
    experiments = _with_true_crystals(experiments, truth)
    result = orientation_errors(experiments, truth)
    assert result["worst"] < 1e-6 and result["sweeps"] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert cell_error(experiments[1].crystal, truth)["rel_error_max"] < 1e-9
    # one gauge for all sweeps is removed
    experiments = _with_true_crystals(experiments, truth, gauge=rotation((0.3, 0.5, 0.8), 0.7))
    result = orientation_errors(experiments, truth)
    assert result["worst"] < 1e-4 and result["gauge_deg"] == pytest.approx(0.7, abs=1e-4)
    # turn sweep 3's crystal by 0.3 degrees
    crystal = experiments[2].crystal
    R = rotation((0.0, 0.6, 0.8), 0.3)
    crystal.set_A_at_scan_points(
        [tuple((R @ np.array(crystal.get_A_at_scan_point(i)).reshape(3, 3)).ravel()) for i in range(crystal.num_scan_points)]
    )
    result = orientation_errors(experiments, truth)
    # the gauge takes a third of it, the rest is sweep 3's
    assert result["per_sweep"][3]["median"] == pytest.approx(0.2, abs=0.03)
    assert result["per_sweep"][1]["median"] == pytest.approx(0.1, abs=0.03)


# md5 of the tiny sweep SimulationConfig(n_images=6, detector="pilatus300k", seed=5),
# computed before several sweeps were added: one sweep's files are unchanged
SINGLE_SWEEP_MD5 = {
    "ground_truth.json": "b36a54c0c8410dba49321c9109406aeb",
    "sim_0001.cbf": "c011e36c01054e20f70cf859c8999bb7",
    "sim_0002.cbf": "a4f9f672da2a68f5a0612e12ed21fb72",
    "sim_0003.cbf": "2b16dbbca4282785b4374b3755bac9a0",
    "sim_0004.cbf": "0edba440eab7596d181bc4bbe6c6079d",
    "sim_0005.cbf": "03fa34c596c76c6ac34b8dc1e02cf8f7",
    "sim_0006.cbf": "c3802d666a673cd2bce5101c3a79a305",
}


def test_single_sweep_output_unchanged(tmp_path):
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    simulate(SimulationConfig(n_images=6, detector="pilatus300k", seed=5), str(tmp_path))
    md5 = {f: hashlib.md5((tmp_path / f).read_bytes()).hexdigest() for f in sorted(os.listdir(tmp_path))}
    assert md5 == SINGLE_SWEEP_MD5


def test_simulate_command_several_sweeps(tmp_path):
    out = tmp_path / "a"
    result = run_cmd([tool("dials.simulate_sweep"), f"output.directory={out}", "sweeps=2",
                      "n_images=2", "detector=pilatus300k", "goniometer=three_circle"])
    assert result.returncode == 0, result.stderr
    assert "Wrote 2 sweeps, 4 images" in result.stdout
    truth = json.load(open(out / "ground_truth.json"))
    assert [s["angles"] for s in truth["sweeps"]] == [
        {"omega": 0.0, "chi": 0.0, "phi": 0.0}, {"omega": 0.0, "chi": 45.0, "phi": 120.0}]
    out = tmp_path / "b"
    result = run_cmd([tool("dials.simulate_sweep"), f"output.directory={out}", "n_images=2",
                      "detector=pilatus300k", "sweep { angles=kappa:40,phi:120; omit=2 }",
                      "sweep { scan_axis=phi; angles=kappa:-40,omega:30; n_images=3; bad_images=1:zero }"])
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == [
        "ground_truth.json", "sim_01_0001.cbf", "sim_02_0001.cbf", "sim_02_0002.cbf", "sim_02_0003.cbf"]
    truth = json.load(open(out / "ground_truth.json"))
    assert truth["sweeps"][1]["scan_axis"] == "phi" and truth["sweeps"][1]["bad_images"] == {"1": "zero"}
    assert truth["sweeps"][1]["angles"] == {"omega": 30.0, "kappa": -40.0, "phi": 0.0}


def test_import_blocks_keeps_each_sweeps_goniometer(three):
    from dials_gapfill.simulation.compare import import_blocks, sweep_of

    d, truth = three
    blocks = import_blocks([os.path.join(d, f) for f in truth["files"]])
    assert [e.identifier for e in blocks] == ["block-1-1-3", "block-2-1-3", "block-3-1-3"]
    for exp, s in zip(blocks, truth["sweeps"]):
        assert sweep_of(exp, truth) == s["sweep"]
        assert exp.goniometer.get_fixed_rotation() == pytest.approx(s["fixed_rotation"], abs=1e-9)
    assert blocks[1].detector is blocks[0].detector and blocks[2].beam is blocks[0].beam
