"""The simulator: dxtbx reads its files with the true geometry; it is deterministic."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from conftest import run_cmd, tool


def _hashes(directory):
    return {
        f: hashlib.sha256(open(os.path.join(directory, f), "rb").read()).hexdigest()
        for f in sorted(os.listdir(directory))
        if f.endswith(".cbf")
    }


SMALL = dict(n_images=6, detector="pilatus300k", seed=5)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    d = str(tmp_path_factory.mktemp("small"))
    simulate(SimulationConfig(**SMALL), d)
    return d


def test_dxtbx_reads_the_true_geometry(sim_complete, truth):
    from dxtbx.model.experiment_list import ExperimentListFactory

    files = [os.path.join(sim_complete, f) for f in truth["files"]]
    experiments = ExperimentListFactory.from_filenames(files)
    assert len(experiments) == 1
    exp = experiments[0]
    assert exp.imageset.get_format_class().__name__ == "FormatCBFMiniPilatus"
    assert exp.scan.get_image_range() == (1, 120)
    assert exp.scan.get_oscillation() == pytest.approx((0.0, 0.5))
    assert exp.beam.get_wavelength() == pytest.approx(truth["wavelength"], abs=1e-6)
    panel = exp.detector[0]
    assert panel.get_image_size() == tuple(truth["image_size"]) == (981, 1043)
    assert panel.get_distance() == pytest.approx(truth["distance_mm"], abs=1e-4)
    centre = panel.get_beam_centre_px(exp.beam.get_s0())
    assert centre == pytest.approx(truth["beam_centre_px"], abs=1e-3)
    assert exp.goniometer.get_rotation_axis() == pytest.approx(truth["rotation_axis"])
    # the pixels: module gaps are -1, counts are non-negative elsewhere
    data = exp.imageset.get_raw_data(10)[0].as_numpy_array()
    assert data.min() == -1 and data.max() > 100
    assert (data >= 0).mean() > 0.9


def test_ground_truth_content(truth):
    assert truth["unit_cell"] == [54.0, 62.0, 71.0, 90.0, 90.0, 90.0]
    assert len(truth["orientation"]["U"]) == 121  # one per image boundary
    assert len(truth["intensities"]["I"]) == len(truth["intensities"]["miller_index"]) > 10000
    assert truth["n_predicted"] > 20000
    # the crystal drifts: the orientation changes through the scan
    import numpy as np

    U0 = np.array(truth["orientation"]["U"][0]).reshape(3, 3)
    U1 = np.array(truth["orientation"]["U"][-1]).reshape(3, 3)
    angle = np.degrees(np.arccos((np.trace(U1 @ U0.T) - 1) / 2))
    assert angle == pytest.approx(0.01 * 60, abs=1e-6)


def test_same_seed_gives_identical_files(small, tmp_path):
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    simulate(SimulationConfig(**SMALL), str(tmp_path))
    assert _hashes(str(tmp_path)) == _hashes(small)
    assert len(_hashes(small)) == 6


def test_omitting_images_does_not_change_the_others(small, tmp_path):
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    simulate(SimulationConfig(omit=(2, 3), **SMALL), str(tmp_path))
    full, gapped = _hashes(small), _hashes(str(tmp_path))
    assert sorted(gapped) == ["sim_0001.cbf", "sim_0004.cbf", "sim_0005.cbf", "sim_0006.cbf"]
    for name, digest in gapped.items():
        assert full[name] == digest
    truth = json.load(open(tmp_path / "ground_truth.json"))
    assert truth["omitted"] == [2, 3] and truth["images_written"] == [1, 4, 5, 6]


def test_another_seed_gives_other_images(small, tmp_path):
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    simulate(SimulationConfig(**{**SMALL, "seed": 6}), str(tmp_path))
    assert set(_hashes(str(tmp_path)).values()).isdisjoint(_hashes(small).values())


def test_bad_image_modes(tmp_path):
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    bad = {2: "blank", 3: "zero", 4: "overexposed", 5: "truncated", 6: "garbage"}
    simulate(SimulationConfig(bad_images=bad, **SMALL), str(tmp_path))
    path = lambda n: str(tmp_path / f"sim_{n:04d}.cbf")  # noqa: E731

    def pixels(n):
        exp = ExperimentListFactory.from_filenames([path(n)])[0]
        return exp.imageset.get_raw_data(0)[0].as_numpy_array()

    normal, blank, zero, over = pixels(1), pixels(2), pixels(3), pixels(4)
    active = normal >= 0
    assert zero[active].max() == 0
    # blank: background only, so no bright spot pixels but similar background
    assert blank[active].max() < 0.2 * normal[active].max()
    assert 0.5 < blank[active].mean() / normal[active].mean() < 1.0
    assert over[active].mean() > 100 * normal[active].mean()
    # truncated: a CBF header promising more bytes than the file has
    from dials_gapfill.stages.importer import damaged_reason

    assert damaged_reason(path(5)).startswith("unreadable: truncated file")
    assert damaged_reason(path(1)) is None
    # garbage: not a CBF at all
    assert open(path(6), "rb").read(6) != b"###CBF"
    unhandled = []
    ExperimentListFactory.from_filenames([path(6)], unhandled=unhandled)
    assert unhandled == [path(6)]


def test_simulate_command(tmp_path):
    result = run_cmd(
        [tool("dials.simulate_sweep"), f"output.directory={tmp_path}", "n_images=4",
         "detector=pilatus300k", "omit=2", "bad_images=4:zero"]
    )
    assert result.returncode == 0, result.stderr
    assert "Wrote 3 images" in result.stdout
    assert sorted(os.listdir(tmp_path)) == [
        "ground_truth.json", "sim_0001.cbf", "sim_0003.cbf", "sim_0004.cbf"
    ]
    truth = json.load(open(tmp_path / "ground_truth.json"))
    assert truth["bad_images"] == {"4": "zero"}


def test_accelerating_drift_in_orientations_and_truth(tmp_path):
    """U(phi) = R(axis, drift*phi + acceleration*phi^2) U(0), recorded in ground_truth.json."""
    import numpy as np

    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    config = dict(n_images=3, osc_width=2.0, detector="pilatus300k", seed=5,
                  unit_cell=(57, 57, 150, 90, 90, 90), space_group="P 41 21 2",
                  drift=0.01, drift_acceleration=0.004)
    truth = simulate(SimulationConfig(**config), str(tmp_path))
    assert truth["drift"]["acceleration"] == 0.004 and truth["drift"]["rate"] == 0.01
    assert truth["space_group"] == "P 41 21 2"
    U = [np.array(u).reshape(3, 3) for u in truth["orientation"]["U"]]
    for k, phi in enumerate(truth["orientation"]["phi"]):
        angle = np.degrees(np.arccos(min(1.0, (np.trace(U[k] @ U[0].T) - 1) / 2)))
        assert angle == pytest.approx(0.01 * phi + 0.004 * phi**2, abs=1e-4)


def test_first_image_number_does_not_move_the_spots(tmp_path):
    """first_image=1001 writes the same spots as first_image=1 (it wrote blank images:
    the predictor's z counts from first_image - 1, which the simulator took as 0)."""
    import numpy as np
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.simulation.simulate import Simulation, SimulationConfig

    a = Simulation(SimulationConfig(**SMALL))
    b = Simulation(SimulationConfig(first_image=1001, **SMALL))
    assert np.allclose(a.ref_phi, b.ref_phi) and len(b.ref_phi) > 100
    signal_a, signal_b = a.expected_signal(3), b.expected_signal(1003)
    assert signal_b.sum() > 1000 and np.allclose(signal_a, signal_b)
    result = run_cmd([tool("dials.simulate_sweep"), f"output.directory={tmp_path}", "n_images=2",
                      "first_image=1001", "detector=pilatus300k", "drift_acceleration=0.01"])
    assert result.returncode == 0, result.stderr
    exp = ExperimentListFactory.from_filenames([str(tmp_path / "sim_1002.cbf")])[0]
    data = exp.imageset.get_raw_data(0)[0].as_numpy_array()
    assert data.max() > 1000  # spots, not background only
    truth = json.load(open(tmp_path / "ground_truth.json"))
    assert truth["drift"]["acceleration"] == 0.01


def test_the_gauges_of_the_orientation_error():
    """compare.orientation_errors on crystals built from the truth itself
    (no images: the simulator's truth and its models), every 10th image
    missing.  The truth scores 0 whatever the gauge.  A constant error about
    the spindle, which DIALS does not leave free (its beam is fixed in the
    spindle plane), is removed by a full gauge but kept by the gauge
    perpendicular to the spindle and by none; an error of each block's own
    is kept by all three; `images` judges only those images."""
    import copy

    import numpy as np
    from dxtbx.model import Experiment, ExperimentList, ScanFactory

    from dials_gapfill.simulation import compare
    from dials_gapfill.simulation.simulate import Simulation, SimulationConfig, rotation

    config = SimulationConfig(n_images=40, osc_width=0.5, detector="pilatus300k", drift=0.01, seed=42)
    sim = Simulation(config)
    truth = sim.ground_truth()
    B = np.array(truth["orientation"]["B"]).reshape(3, 3)
    U = [np.array(u).reshape(3, 3) for u in truth["orientation"]["U"]]
    blocks = [(1, 9), (11, 19), (21, 29), (31, 39)]
    spindle = np.array(truth["rotation_axis"])
    tilts = [rotation(axis, 0.01) for axis in ([1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.6, 0.8, 0])]

    def crystals(offset):
        out = ExperimentList()
        for b, (f, l) in enumerate(blocks):
            scan = ScanFactory.make_scan(image_range=(f, l), exposure_times=0.1,
                                         oscillation=(config.osc_start + (f - 1) * config.osc_width, config.osc_width),
                                         epochs={i: 0.1 * i for i in range(f, l + 1)}, deg=True)
            crystal = copy.deepcopy(sim.crystal)
            crystal.reset_scan_points()
            crystal.set_A_at_scan_points([tuple((offset(b) @ U[k] @ B).ravel()) for k in range(f - 1, l + 1)])
            out.append(Experiment(beam=sim.beam, detector=sim.detector, goniometer=sim.goniometer, scan=scan,
                                  crystal=crystal))
        return out

    for gauge in compare.GAUGES:
        assert compare.orientation_errors(crystals(lambda b: np.eye(3)), truth, gauge=gauge)["worst"] < 1e-5
    about_spindle = crystals(lambda b: rotation(spindle, 0.02))
    assert compare.orientation_errors(about_spindle, truth)["worst"] < 1e-6
    for gauge in ("perpendicular", "none"):
        errors = compare.orientation_errors(about_spindle, truth, gauge=gauge)
        assert errors["median"] == pytest.approx(0.02, abs=1e-6) and errors["worst"] == pytest.approx(0.02, abs=1e-6)
    own = crystals(lambda b: tilts[b])
    for gauge in compare.GAUGES:
        assert compare.orientation_errors(own, truth, gauge=gauge)["median"] > 0.004
    judged = compare.orientation_errors(own, truth, images=range(11, 20))
    # one block: its tilt (in the crystal frame, turning with phi) is nearly all gauge
    assert judged["images"] == list(range(11, 20)) and judged["worst"] < 0.001


def test_headers_and_file_names_give_dxtbx_the_sweep_simulated(tmp_path):
    """Angles keep every digit in the headers (0.00125 deg written 0.0013 made
    dxtbx read 7 sweeps) and image numbers one width over the sweep
    (sim_9999 and sim_10000 are two templates), for one sweep and several."""
    import glob

    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.command_line.simulate_sweep import run

    def sweeps(folder):
        experiments = ExperimentListFactory.from_filenames(sorted(glob.glob(str(folder / "*.cbf"))))
        return [(e.scan.get_image_range(), e.scan.get_oscillation()) for e in experiments]

    assert run([f"output.directory={tmp_path / 'fine'}", "detector=pilatus300k", "n_images=20",
                "osc_width=0.00125"]) == 0
    assert sweeps(tmp_path / "fine") == [((1, 20), (0.0, 0.00125))]
    assert run([f"output.directory={tmp_path / 'many'}", "detector=pilatus300k", "n_images=4",
                "first_image=9998", "osc_start=12.34567"]) == 0
    assert sweeps(tmp_path / "many") == [((9998, 10001), (12.34567, 0.5))]
    assert run([f"output.directory={tmp_path / 'two'}", "detector=pilatus300k", "n_images=3", "sweeps=2",
                "osc_width=0.00125"]) == 0
    assert sweeps(tmp_path / "two") == [((1, 3), (0.0, 0.00125))] * 2


@pytest.mark.parametrize("args, said", [
    (["osc_width=0"], "osc_width element is less than the minimum allowed value"),
    (["n_images=abc"], "n_images"),
    (["unit_cell=1,2,3"], "unit_cell"),
    (["space_group=P99"], "space_group 'P99': not a space group symbol"),
    (["unit_cell=10,10,10,90,90,120", "space_group=P4"], "does not have the symmetry of space_group P4"),
    (["seed=-1"], "seed must be >= 0"),
    (["prefix=sub/sim"], "without a folder"),
    (["bad_images=abc:blank"], "bad_images: cannot read 'abc:blank'"),
    (["n_images=5", "bad_images=30:blank"], "bad_images: image 30 is not in the sweep (images 1-5)"),
    (["n_images=5", "omit=10"], "omit: image 10 is not in the sweep (images 1-5)"),
    (["n_images=5", "omit=1:5"], "omit leaves no image of 1-5 to write"),
    (["sweep { n_images=0 }"], "sweep.n_images"),
    (["sweep { angles=kappa:abc }"], "sweep angles: cannot read 'kappa:abc'"),
    (["electron=True", "ed.tracking_every=1"], "ed.tracking_every"),
    (["electron=True"], "electron=True takes its detector from ed.detector"),
])
def test_bad_parameters_give_one_line_and_write_nothing(tmp_path, capsys, args, said):
    from dials_gapfill.command_line.simulate_sweep import run

    out = tmp_path / "out"
    assert run([f"output.directory={out}", "detector=pilatus300k", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dials.simulate_sweep: error: ") and said in err and "\n" not in err, err
    assert not out.exists()


def test_a_folder_holding_a_sweep_is_refused(tmp_path, capsys):
    """An image omitted now but written by an earlier run would fill the gap."""
    from dials_gapfill.command_line.simulate_sweep import run

    assert run([f"output.directory={tmp_path}", "detector=pilatus300k", "n_images=5"]) == 0
    before = sorted(os.listdir(tmp_path))
    assert run([f"output.directory={tmp_path}", "detector=pilatus300k", "n_images=5", "omit=3"]) == 1
    err = capsys.readouterr().err
    assert "already holds ground_truth.json and 5 image files (sim_0001.cbf, ...)" in err
    assert sorted(os.listdir(tmp_path)) == before


def test_the_comparison_of_two_runs_keeps_the_blocks_of_several_sweeps_apart():
    """Four sweeps of images 1-15 (the L-cysteine wedges as integrated once):
    four blocks of the same image numbers, each compared with its own."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.simulation.compare import compare

    folder = os.path.join(os.path.dirname(__file__), "data", "l_cysteine_wedges", "complete")
    experiments = ExperimentListFactory.from_json_file(os.path.join(folder, "integrated.expt"), check_format=False)
    reflections = flex.reflection_table.from_file(os.path.join(folder, "integrated.refl"))
    assert [e.scan.get_image_range() for e in experiments] == [(1, 15)] * 4
    result = compare(experiments, reflections, experiments, reflections)
    assert [(b["sweep"], b["images"]) for b in result["blocks"]] == [(k, [1, 15]) for k in (1, 2, 3, 4)]
    assert result["integrated_a"] == result["integrated_b"] == len(reflections)
    assert result["count_rel_diff"] == 0 and result["cell_rel_diff_max"] == 0


def test_scan_end_tails_are_the_rocking_curves_the_scan_cuts():
    """With scan_end_tails the end images record the tails of reflections
    centred beyond them: images 5-8 of a sweep then show on image 5 what
    images 1-12 of the same crystal show there (no drift, so the crystal is
    the same at the same phi); without, image 5 lacks those tails.  The
    reflections centred inside the scan are the same either way."""
    import numpy as np

    from dials_gapfill.simulation.simulate import Simulation, SimulationConfig

    common = dict(osc_width=1.0, detector="pilatus300k", distance=150.0, seed=5, drift=0.0)
    whole = Simulation(SimulationConfig(n_images=12, scan_end_tails=True, **common))
    part = dict(n_images=4, first_image=5, osc_start=4.0, **common)
    cut, plain = Simulation(SimulationConfig(scan_end_tails=True, **part)), Simulation(SimulationConfig(**part))
    assert np.allclose(cut.expected_signal(5), whole.expected_signal(5), rtol=1e-9, atol=1e-9)
    assert np.allclose(cut.expected_signal(8), whole.expected_signal(8), rtol=1e-9, atol=1e-9)
    inside = (cut.ref_phi >= 4.0) & (cut.ref_phi < 8.0)
    assert np.array_equal(cut.ref_hkl[inside], plain.ref_hkl) and np.allclose(cut.ref_phi[inside], plain.ref_phi)
    gained = cut.expected_signal(5).sum() / plain.expected_signal(5).sum() - 1
    assert gained > 0.05, gained  # (measured 13 % on a 6-image sweep's first image)
    assert cut.ground_truth()["config"]["scan_end_tails"] is True
