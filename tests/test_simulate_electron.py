"""The electron-diffraction sweep: TimePix_SU SMV files that dxtbx reads with
its Timepix format class and the true geometry; crystal-tracking frames left
out or defocused; spots where the truth predicts them."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from conftest import run_cmd, tool

SHORT = dict(n_images=40, seed=3)  # frames 20 and 40 are tracking frames


@pytest.fixture(scope="module")
def ed_missing(tmp_path_factory):
    from dials_gapfill.simulation.electron import EDSimulationConfig, simulate_ed

    d = str(tmp_path_factory.mktemp("ed_missing"))
    return d, simulate_ed(EDSimulationConfig(**SHORT), d)


def _experiments(d):
    from dxtbx.model.experiment_list import ExperimentListFactory

    return ExperimentListFactory.from_filenames(sorted(glob.glob(os.path.join(d, "*.img"))))


def test_defaults_are_a_real_cred_experiment():
    from dials_gapfill.simulation.electron import EDSimulationConfig

    c = EDSimulationConfig()
    assert c.n_images >= 200 and 0.3 <= c.osc_width <= 0.5
    assert c.wavelength == 0.0251 and c.image_size == (512, 512)
    # resolution at the middle of the detector's edge: 0.8-1 A
    half_width = 256 * 0.055
    d_edge = c.wavelength / (2 * np.sin(0.5 * np.arctan(half_width / c.distance)))
    assert 0.8 < d_edge < 1.0
    assert c.tracking_frames == list(range(20, 241, 20))
    assert set(c.tracking_frames) <= set(c.omit)


def test_dxtbx_reads_timepix_su_with_the_true_geometry(ed_missing):
    d, truth = ed_missing
    experiments = _experiments(d)
    # frame 20 missing: two sequences, 1-19 and 21-39
    assert [e.scan.get_image_range() for e in experiments] == [(1, 19), (21, 39)]
    assert sorted(os.listdir(d))[:2] == ["ed_00001.img", "ed_00002.img"]
    assert truth["images_written"] == [i for i in range(1, 41) if i not in (20, 40)]
    assert truth["tracking"]["frames"] == [20, 40] and truth["radiation"] == "electrons"
    for exp in experiments:
        assert exp.imageset.get_format_class().__name__ == "FormatSMVTimePix_SU_512x512" == truth["format_class"]
        assert exp.beam.get_wavelength() == pytest.approx(0.0251)
        assert exp.beam.get_s0() == pytest.approx(truth["s0"])
        # the format's rotation axis, along neither detector axis
        axis = exp.goniometer.get_rotation_axis()
        assert axis == pytest.approx(truth["rotation_axis"]) and axis == pytest.approx((-0.755, -0.656, 0.0), abs=1e-3)
        assert min(abs(axis[0]), abs(axis[1])) > 0.5
        f = exp.scan.get_image_range()[0]
        assert exp.scan.get_angle_from_image_index(f, deg=True) == pytest.approx(-48.0 + (f - 1) * 0.4)
        assert exp.scan.get_oscillation()[1] == pytest.approx(0.4)
        assert len(exp.detector) == len(truth["panels"]) == 4
        for panel, p in zip(exp.detector, truth["panels"]):
            assert panel.get_origin() == pytest.approx(p["origin"])
            assert panel.get_pixel_size() == pytest.approx((0.055, 0.055))
            assert panel.get_image_size() == (254, 254)
        assert exp.detector[0].get_distance() == pytest.approx(530.0)
    assert 0.6 < truth["d_min"] < 0.7  # the detector's corners


def test_spots_found_where_the_truth_predicts_them(ed_missing):
    """DIALS' spot finder on frames 1-19; the true crystal predicts them
    within 1 px on the panel (DIALS' predictor, geometry from the files)."""
    from dxtbx.model import Crystal
    from dxtbx.model.experiment_list import ExperimentList

    from dials.array_family import flex
    from dials.command_line import find_spots

    d, truth = ed_missing
    exp = _experiments(d)[0]
    B = np.array(truth["orientation"]["B"]).reshape(3, 3)
    A = [np.array(u).reshape(3, 3) @ B for u in truth["orientation"]["U"][:20]]
    real = np.linalg.inv(A[0])
    crystal = Crystal(tuple(real[0]), tuple(real[1]), tuple(real[2]), space_group_symbol=truth["space_group"])
    crystal.set_A_at_scan_points([tuple(a.ravel()) for a in A])
    exp.crystal = crystal
    params = find_spots.working_phil.extract()
    params.spotfinder.mp.nproc = 1
    strong = flex.reflection_table.from_observations(ExperimentList([exp]), params)
    predicted = flex.reflection_table.from_predictions(exp, dmin=truth["d_min"])
    px, py, pz = (np.array(c) for c in predicted["xyzcal.px"].parts())
    ppanel = np.array(predicted["panel"])
    distances = []
    for (x, y, z), panel in zip(strong["xyzobs.px.value"], strong["panel"]):
        near = (np.abs(pz - z) < 1.5) & (ppanel == panel)
        if near.any():
            distances.append(np.min(np.hypot(px[near] - x, py[near] - y)))
        else:
            distances.append(np.inf)
    distances = np.array(distances)
    assert len(distances) > 100
    assert np.median(distances) < 0.5
    assert np.mean(distances < 1.0) > 0.85, np.mean(distances < 1.0)


def test_defocused_tracking_frames(tmp_path):
    """tracking=defocused: the frame is there, a bright disc around the beam
    centre and no Bragg spots; the frames around it are unchanged."""
    from dials_gapfill.simulation.electron import EDSimulationConfig, ed_simulation, simulate_ed

    config = EDSimulationConfig(n_images=21, tracking="defocused", seed=3)
    truth = simulate_ed(config, str(tmp_path))
    assert truth["images_written"] == list(range(1, 22))
    assert truth["bad_images"] == {"20": "defocused"} and truth["tracking"]["frames"] == [20]
    experiments = _experiments(str(tmp_path))
    assert len(experiments) == 1 and experiments[0].scan.get_image_range() == (1, 21)

    def raw(n):
        data = open(tmp_path / f"ed_{n:05d}.img", "rb").read()
        return np.frombuffer(data[512:], dtype="<u2").reshape(512, 512).astype(float)

    tracking, normal = raw(20), raw(19)
    bx, by = truth["beam_centre_raw_px"]
    yy, xx = np.mgrid[0:512, 0:512]
    r = np.hypot(xx + 0.5 - bx, yy + 0.5 - by)
    assert tracking[r < 40].mean() > 5 * normal[r < 40].mean()
    assert tracking[r > 90].max() < 30  # no Bragg spots outside the disc
    assert normal[r > 90].max() > 500
    # the same frames as a sweep without tracking, apart from frame 20
    other = ed_simulation(EDSimulationConfig(n_images=21, tracking="none", seed=3))
    assert np.array_equal(other.render(19).clip(0, 65535), normal)


def test_simulate_command_electron(tmp_path):
    result = run_cmd([tool("dials.simulate_sweep"), f"output.directory={tmp_path}", "electron=True",
                      "n_images=22", "ed.tracking=defocused", "ed.tracking_every=10"])
    assert result.returncode == 0, result.stderr
    truth = json.load(open(tmp_path / "ground_truth.json"))
    assert truth["format_class"] == "FormatSMVTimePix_SU_512x512"
    assert truth["tracking"]["frames"] == [10, 20] and len(truth["files"]) == 22
    assert truth["wavelength"] == pytest.approx(0.0251) and truth["config"]["osc_width"] == 0.4
    assert truth["unit_cell"] == [7.53, 11.15, 13.91, 90.0, 92.9, 90.0]


def test_timepix516_is_one_panel(tmp_path):
    """detector=timepix516: the wide pixels split, one panel, the other format class and axis."""
    from dials_gapfill.simulation.electron import EDSimulationConfig, simulate_ed

    truth = simulate_ed(EDSimulationConfig(detector="timepix516", n_images=3, tracking="none", seed=3), str(tmp_path))
    (exp,) = _experiments(str(tmp_path))
    assert exp.imageset.get_format_class().__name__ == "FormatSMVTimePix_SU_516x516" == truth["format_class"]
    assert len(exp.detector) == 1 and exp.detector[0].get_image_size() == (516, 516)
    assert exp.goniometer.get_rotation_axis() == pytest.approx((0.7826, -0.6226, 0.0), abs=1e-3)
    assert exp.detector[0].get_beam_centre_px(exp.beam.get_s0()) == pytest.approx(truth["beam_centre_raw_px"])
    assert exp.imageset.get_raw_data(1)[0].as_numpy_array().max() > 200  # spots


def test_electron_values_given_equal_to_the_xray_defaults_are_kept(tmp_path):
    """n_images=120 (the X-ray default, given) writes 120 frames, not the
    electron default's 240; ed.tracking=none (a PHIL choice read as None)
    is no tracking."""
    result = run_cmd([tool("dials.simulate_sweep"), f"output.directory={tmp_path}", "electron=True",
                      "n_images=120", "ed.tracking=none"])
    assert result.returncode == 0, result.stderr
    truth = json.load(open(tmp_path / "ground_truth.json"))
    assert len(truth["files"]) == 120 and truth["tracking"]["frames"] == []


def test_electron_values_from_a_phil_file_and_drift_are_kept(tmp_path):
    """electron=True: values given in a phil file are the user's, not left
    at the electron defaults; drift= is passed on."""
    from dials_gapfill.command_line.simulate_sweep import run

    phil = tmp_path / "ed.phil"
    phil.write_text("electron=True\nn_images=12\nosc_width=0.5\nprefix=mine\n")
    out = tmp_path / "out"
    assert run([str(phil), f"output.directory={out}", "drift=0", "ed.tracking=none"]) == 0
    truth = json.load(open(out / "ground_truth.json"))
    assert (truth["config"]["n_images"], truth["config"]["osc_width"], truth["config"]["prefix"]) == (12, 0.5, "mine")
    assert truth["drift"]["rate"] == 0 and truth["files"][0] == "mine_00001.img"
