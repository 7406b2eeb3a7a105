"""Import: gaps found, gaps forced, models shared; input errors named."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import GAPS, SNASE_GEOMETRY, process, run_cmd, tool


def _import(*args, positional=()):
    from dials_gapfill.importer import import_images
    from dials_gapfill.phil import working_params
    from dials_gapfill.state import Report

    report = Report()
    experiments = import_images(working_params("\n".join(args)), list(positional), report)
    return experiments, report


def _blocks(experiments):
    return [e.scan.get_image_range() for e in experiments]


def _assert_shared(experiments):
    for e in experiments:
        assert e.beam is experiments[0].beam
        assert e.detector is experiments[0].detector
        assert e.goniometer is experiments[0].goniometer
        assert e.imageset.get_beam() is experiments[0].beam


def test_gaps_in_the_file_list_make_blocks(sim_gapped):
    experiments, report = _import(positional=[sim_gapped])
    assert _blocks(experiments) == [(1, 40), (46, 80), (84, 120)]
    assert [e.scan.get_oscillation() for e in experiments] == [(0.0, 0.5), (22.5, 0.5), (41.5, 0.5)]
    _assert_shared(experiments)
    assert len({e.identifier for e in experiments}) == 3
    assert [x["image"] for x in report.excluded] == GAPS
    assert {x["reason"] for x in report.excluded} == {"missing file"}


def test_glob_template_and_xia2_image_forms_agree(sim_gapped):
    by_dir, _ = _import(positional=[sim_gapped])
    by_glob, _ = _import(f"input.images={sim_gapped}/sim_*.cbf")
    by_template, _ = _import(f"input.template={sim_gapped}/sim_####.cbf")
    by_xia2, _ = _import(
        f"input.image={sim_gapped}/sim_0001.cbf:1:40",
        f"input.image={sim_gapped}/sim_0001.cbf:46:120",
    )
    expected = [(1, 40), (46, 80), (84, 120)]
    for experiments in (by_dir, by_glob, by_template, by_xia2):
        assert _blocks(experiments) == expected
    partial, _ = _import(f"input.image={sim_gapped}/sim_0001.cbf:10:60")
    assert _blocks(partial) == [(10, 40), (46, 60)]


def test_exclusion_splits_and_never_opens_excluded_files(sim_complete, sim_gapped, tmp_path):
    # a copy of the complete sweep whose excluded images are garbage
    for name in os.listdir(sim_complete):
        if name.endswith(".cbf"):
            n = int(name[4:8])
            if n in GAPS:
                (tmp_path / name).write_bytes(b"not an image at all" * 100)
            else:
                os.symlink(os.path.join(sim_complete, name), tmp_path / name)
    forced, report = _import("gaps.exclude_images=41:45,81:83", positional=[str(tmp_path)])
    found, _ = _import(positional=[sim_gapped])
    assert _blocks(forced) == _blocks(found) == [(1, 40), (46, 80), (84, 120)]
    assert [e.scan.get_oscillation() for e in forced] == [e.scan.get_oscillation() for e in found]
    _assert_shared(forced)
    assert {x["reason"] for x in report.excluded} == {"gaps.exclude_images"}
    # single numbers and several ranges
    more, _ = _import("gaps.exclude_images=41:45,81:83,100", positional=[str(tmp_path)])
    assert _blocks(more) == [(1, 40), (46, 80), (84, 99), (101, 120)]


def test_snase_gap_gets_the_right_start_angle(snase_gapped):
    experiments, _ = _import(*SNASE_GEOMETRY, positional=[snase_gapped])
    assert _blocks(experiments) == [(1, 39), (46, 96)]
    assert experiments[0].scan.get_oscillation() == pytest.approx((0.0, 1.0))
    # dials.import would start this block at 0 deg; image n starts at n - 1 deg
    assert experiments[1].scan.get_oscillation() == pytest.approx((45.0, 1.0))
    _assert_shared(experiments)
    panel = experiments[0].detector[0]
    assert panel.get_distance() == pytest.approx(57.27, abs=1e-3)
    assert panel.get_beam_centre_px(experiments[0].beam.get_s0()) == pytest.approx(
        (532.61, 500.53), abs=1e-3
    )


def test_reference_geometry(snase, snase_gapped):
    ref = os.path.join(snase, "refined_experiments.json")
    experiments, _ = _import(
        f"input.reference_geometry={ref}", "geometry.scan.oscillation=0,1", positional=[snase_gapped]
    )
    assert _blocks(experiments) == [(1, 39), (46, 96)]
    assert experiments[1].scan.get_oscillation() == pytest.approx((45.0, 1.0))
    _assert_shared(experiments)


# ----------------------------------------------------------------------------
# errors: one line naming the problem and the fix, non-zero exit, no traceback
# ----------------------------------------------------------------------------


def _fails(args, expected, tmp_path, code=1):
    result = process(args, str(tmp_path / "out"), timeout=300)
    assert result.returncode == code, result.stdout[-2000:] + result.stderr
    err = result.stderr.strip()
    assert "Traceback" not in result.stderr + result.stdout
    assert len(err.splitlines()) == 1, err
    assert err.startswith("dials.process_gapped: error: ")
    for text in expected:
        assert text in err, err
    produced = os.listdir(tmp_path / "out") if (tmp_path / "out").exists() else []
    assert not [f for f in produced if f.endswith((".expt", ".refl", ".mtz", ".json", ".html"))]
    return err


@pytest.fixture
def small_sweep(tmp_path_factory):
    """Ten tiny images (Pilatus 300K), for import errors."""
    from dials_gapfill.simulate import SimulationConfig, simulate

    d = tmp_path_factory.mktemp("tiny")
    simulate(SimulationConfig(n_images=10, detector="pilatus300k", seed=3), str(d))
    os.remove(d / "ground_truth.json")
    return d


def test_error_no_images(tmp_path):
    _fails(["/no/such/place/x_*.cbf"], ["no files match", "check the path"], tmp_path)
    _fails(["/no/such/file_0001.cbf"], ["no such file or directory"], tmp_path)
    (tmp_path / "empty").mkdir()
    _fails([str(tmp_path / "empty")], ["no image files in directory"], tmp_path)


def test_error_not_an_image(small_sweep, tmp_path):
    (small_sweep / "notes.txt").write_text("hello")
    _fails(
        [f"{small_sweep}/sim_*.cbf", str(small_sweep / "notes.txt")],
        ["not an image of a numbered sweep", "notes.txt", "remove it"],
        tmp_path,
    )


def test_error_unreadable_image_without_auto_exclude(small_sweep, tmp_path):
    (small_sweep / "sim_0005.cbf").write_bytes(b"garbage" * 1000)
    _fails(
        [str(small_sweep), "gaps.auto_exclude=False"],
        ["image 5", "not a readable image", "exclude_images=5"],
        tmp_path,
    )


def test_error_nothing_left_after_exclusion(small_sweep, tmp_path):
    _fails([str(small_sweep), "exclude_images=1:10"], ["no images left"], tmp_path)


def test_error_exclusion_outside_images(small_sweep, tmp_path):
    _fails([str(small_sweep), "exclude_images=20:30"], ["outside the images", "1-10"], tmp_path)


def test_error_malformed_exclusion(small_sweep, tmp_path):
    _fails([str(small_sweep), "exclude_images=4-6"], ["cannot read '4-6'", "first:last"], tmp_path)
    _fails([str(small_sweep), "exclude_images=6:4"], ["first <= last"], tmp_path)


def test_error_duplicate_image_numbers(small_sweep, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(small_sweep / "sim_0003.cbf", other / "sim_0003.cbf")
    _fails(
        [f"{small_sweep}/sim_*.cbf", str(other / "sim_0003.cbf")],
        ["image number 3 given twice"],
        tmp_path,
    )


def test_same_file_twice_is_used_once(small_sweep):
    files = [str(small_sweep / "sim_0003.cbf")] * 2 + [str(small_sweep)]
    experiments, report = _import(positional=files)
    assert _blocks(experiments) == [(1, 10)]
    assert any("given twice" in w for w in report.warnings)


def test_error_mixed_wavelengths_and_detectors(tmp_path):
    from dials_gapfill.simulate import SimulationConfig, simulate

    mixed = tmp_path / "mixed"
    simulate(SimulationConfig(n_images=4, detector="pilatus300k", seed=1), str(mixed))
    simulate(
        SimulationConfig(n_images=4, first_image=5, osc_start=2.0, detector="pilatus300k", seed=1, wavelength=1.2),
        str(mixed),
    )
    _fails([f"{mixed}/sim_*.cbf"], ["mixed wavelengths", "0.97950", "1.20000", "separately"], tmp_path)

    detectors = tmp_path / "detectors"
    simulate(SimulationConfig(n_images=4, detector="pilatus300k", seed=1), str(detectors))
    simulate(
        SimulationConfig(n_images=4, first_image=5, osc_start=2.0, detector="pilatus1m", seed=1),
        str(detectors),
    )
    _fails([f"{detectors}/sim_*.cbf"], ["mixed detectors", "487x619", "981x1043"], tmp_path)


def test_error_stills_need_an_oscillation(snase, tmp_path):
    files = [os.path.join(snase, f"snc_newhead_{n:05d}.img.bz2") for n in range(1, 4)]
    _fails(files, ["stills", "geometry.scan.oscillation=start,width"], tmp_path)


def test_help_and_config(tmp_path):
    result = run_cmd([tool("dials.process_gapped"), "-h"])
    assert result.returncode == 0 and "exclude_images" in result.stdout
    result = run_cmd([tool("dials.process_gapped"), "-c", "-e", "2"])
    assert result.returncode == 0
    for scope in ("input {", "gaps {", "spotfinder {", "indexing {", "refinement {",
                  "integration {", "mtz {", "scaling {", "output {", "mp {", "geometry {"):
        assert scope in result.stdout, scope
