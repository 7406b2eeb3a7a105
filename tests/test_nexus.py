"""The simulator's NeXus (NXmx) output: dxtbx reads the CBF sweep's geometry and
pixels from one HDF5 file, and the importer splits it at gaps.exclude_images."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from conftest import run_cmd, tool

TINY = dict(n_images=12, osc_width=0.5, detector="pilatus300k", seed=11)


@pytest.fixture(scope="module")
def simulation():
    from dials_gapfill.simulation.simulate import Simulation, SimulationConfig

    return Simulation(SimulationConfig(**TINY))


@pytest.fixture(scope="module")
def cbf_sweep(tmp_path_factory):
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    d = str(tmp_path_factory.mktemp("tiny_cbf"))
    truth = simulate(SimulationConfig(**TINY), d)
    return d, truth


@pytest.fixture(scope="module")
def nexus_sweep(tmp_path_factory):
    from dials_gapfill.simulation.nexus_writer import simulate_nexus
    from dials_gapfill.simulation.simulate import SimulationConfig

    d = str(tmp_path_factory.mktemp("tiny_nexus"))
    truth = simulate_nexus(SimulationConfig(**TINY), d)
    return os.path.join(d, "sim_master.h5"), truth


def _read(paths):
    from dxtbx.model.experiment_list import ExperimentListFactory

    return ExperimentListFactory.from_filenames(paths)


def _pixels(imageset, index):
    return imageset.get_raw_data(index)[0].as_numpy_array()


def _import(path, *phil):
    from dials_gapfill.stages.importer import import_images
    from dials_gapfill.phil import working_params
    from dials_gapfill.model.state import Report

    report = Report()
    sweeps, record = import_images(working_params("\n".join(phil)), [path])
    experiments = sweeps.experiments()
    report.sync(sweeps, experiments)
    report.merge(record)
    return experiments, report


def test_dxtbx_reads_one_sequence_with_the_cbf_geometry_and_pixels(nexus_sweep, cbf_sweep):
    from dxtbx.imageset import ImageSequence
    from dxtbx.model.experiment_list import (
        BeamComparison,
        DetectorComparison,
        GoniometerComparison,
    )

    path, truth = nexus_sweep
    cbf_dir, cbf_truth = cbf_sweep
    experiments = _read([path])
    assert len(experiments) == 1
    nx = experiments[0]
    assert isinstance(nx.imageset, ImageSequence)
    assert nx.imageset.get_format_class().__name__ == truth["format_class"] == "FormatNXmx"
    (cbf,) = _read([os.path.join(cbf_dir, f) for f in cbf_truth["files"]])

    # the true geometry (ground truth of the CBF sweep) ...
    assert nx.beam.get_wavelength() == pytest.approx(cbf_truth["wavelength"], abs=1e-9)
    assert nx.beam.get_s0() == pytest.approx(cbf_truth["s0"], abs=1e-9)
    panel = nx.detector[0]
    assert panel.get_image_size() == tuple(cbf_truth["image_size"]) == (487, 619)
    assert panel.get_pixel_size() == pytest.approx(cbf_truth["pixel_size_mm"], abs=1e-12)
    assert panel.get_distance() == pytest.approx(cbf_truth["distance_mm"], abs=1e-9)
    assert panel.get_beam_centre_px(nx.beam.get_s0()) == pytest.approx(
        cbf_truth["beam_centre_px"], abs=1e-9
    )
    assert nx.goniometer.get_rotation_axis() == pytest.approx((1.0, 0.0, 0.0), abs=1e-12)
    assert nx.goniometer.get_rotation_axis() == pytest.approx(cbf_truth["rotation_axis"])
    assert nx.scan.get_image_range() == (1, 12)
    assert nx.scan.get_oscillation() == pytest.approx((0.0, 0.5), abs=1e-12)
    for i in range(12):
        assert nx.scan.get_image_oscillation(i + 1) == pytest.approx(
            cbf.scan.get_image_oscillation(i + 1), abs=1e-9
        )
    assert list(nx.scan.get_exposure_times()) == pytest.approx([0.1] * 12)

    # ... the same models as dxtbx reads from the CBF files
    for a, b in ((nx.detector[0], cbf.detector[0]),):
        assert a.get_fast_axis() == pytest.approx(b.get_fast_axis(), abs=1e-12)
        assert a.get_slow_axis() == pytest.approx(b.get_slow_axis(), abs=1e-12)
        assert a.get_origin() == pytest.approx(b.get_origin(), abs=1e-9)
        assert a.get_trusted_range() == b.get_trusted_range() == (-1, 1048500)
        assert a.get_thickness() == pytest.approx(b.get_thickness())
        assert a.get_material() == b.get_material() == "Si"
        assert a.get_mu() == pytest.approx(b.get_mu())
        assert a.get_type() == b.get_type()
    assert BeamComparison()(nx.beam, cbf.beam)
    assert nx.beam.get_polarization_normal() == cbf.beam.get_polarization_normal()
    assert nx.beam.get_polarization_fraction() == cbf.beam.get_polarization_fraction()
    assert DetectorComparison()(nx.detector, cbf.detector)
    assert GoniometerComparison()(nx.goniometer, cbf.goniometer)
    assert nx.goniometer.get_fixed_rotation() == cbf.goniometer.get_fixed_rotation()
    assert nx.goniometer.get_setting_rotation() == cbf.goniometer.get_setting_rotation()

    # identical pixels, image by image, and the same mask (module gaps)
    for i in range(12):
        a, b = _pixels(nx.imageset, i), _pixels(cbf.imageset, i)
        assert a.dtype == b.dtype and a.shape == b.shape == (619, 487)
        assert np.array_equal(a, b), f"image {i + 1} differs"
    mask_nx = nx.imageset.get_mask(3)[0].as_numpy_array()
    mask_cbf = cbf.imageset.get_mask(3)[0].as_numpy_array()
    assert np.array_equal(mask_nx, mask_cbf) and not mask_nx.all()

    # ground truth: the same as the CBF sweep's, apart from the files
    assert truth["files"] == ["sim_master.h5"]
    assert truth["images_written"] == list(range(1, 13))
    for key in ("s0", "beam_centre_px", "distance_mm", "oscillation", "image_range", "n_predicted"):
        assert truth[key] == cbf_truth[key]
    on_disk = json.load(open(os.path.join(os.path.dirname(path), "ground_truth.json")))
    assert on_disk["files"] == ["sim_master.h5"]


def test_the_file_is_nxmx_and_deterministic(simulation, nexus_sweep, tmp_path):
    import h5py

    from dials_gapfill.simulation.nexus_writer import write_nxmx

    path, _ = nexus_sweep
    again = str(tmp_path / "again.h5")
    assert write_nxmx(simulation, again) == list(range(1, 13))
    digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    assert digest(again) == digest(path)
    assert sorted(os.listdir(tmp_path)) == ["again.h5"]  # no temporary file left
    with h5py.File(path, "r") as fh:
        assert fh["/entry/definition"][()] == b"NXmx"
        data = fh["/entry/data/data"]
        assert data.shape == (12, 619, 487) and data.dtype == np.int32
        assert fh["/entry/instrument/detector/data"] == data  # hard link
        assert fh["/entry/sample/depends_on"][()] == b"/entry/sample/transformations/omega"
        omega = fh["/entry/sample/transformations/omega"]
        assert omega.attrs["transformation_type"] == "rotation"
        assert list(omega[()]) == pytest.approx([0.5 * i for i in range(12)])


def test_a_contiguous_part_of_the_sweep(simulation, tmp_path):
    from dials_gapfill.simulation.nexus_writer import write_nxmx

    path = str(tmp_path / "part.h5")
    assert write_nxmx(simulation, path, images=[7, 5, 6]) == [5, 6, 7]
    (exp,) = _read([path])
    assert exp.scan.get_image_range() == (1, 3)  # dxtbx numbers a NeXus file from 1
    assert exp.scan.get_oscillation() == pytest.approx((2.0, 0.5), abs=1e-12)
    for k, image in enumerate((5, 6, 7)):
        assert np.array_equal(_pixels(exp.imageset, k), simulation.render(image))

    single = str(tmp_path / "single.h5")
    write_nxmx(simulation, single, images=[12], compression=None)
    (exp,) = _read([single])
    assert exp.scan.get_image_range() == (1, 1)
    assert exp.scan.get_oscillation() == pytest.approx((5.5, 0.5), abs=1e-12)
    assert np.array_equal(_pixels(exp.imageset, 0), simulation.render(12))

    with pytest.raises(ValueError, match="cannot have holes"):
        write_nxmx(simulation, str(tmp_path / "holes.h5"), images=[1, 2, 4])
    with pytest.raises(ValueError, match="not in the simulated sweep"):
        write_nxmx(simulation, str(tmp_path / "outside.h5"), images=[12, 13])
    assert sorted(os.listdir(tmp_path)) == ["part.h5", "single.h5"]


def test_bad_image_modes(tmp_path):
    from dials_gapfill.simulation.nexus_writer import write_nxmx
    from dials_gapfill.simulation.simulate import Simulation, SimulationConfig

    sim = Simulation(SimulationConfig(**dict(TINY, n_images=3, bad_images={2: "zero"})))
    path = str(tmp_path / "bad.h5")
    write_nxmx(sim, path)
    (exp,) = _read([path])
    zero = _pixels(exp.imageset, 1)
    assert zero.max() == 0 and zero.min() == -1  # zero counts, gaps still -1
    assert np.array_equal(_pixels(exp.imageset, 2), sim.render(3))

    sim.config.bad_images = {2: "garbage"}
    with pytest.raises(ValueError, match="garbage"):
        write_nxmx(sim, str(tmp_path / "garbage.h5"))


def test_import_splits_at_the_excluded_images(nexus_sweep, simulation):
    path, _ = nexus_sweep
    experiments, report = _import(path, "gaps.exclude_images=4:5,9")
    assert [e.scan.get_image_range() for e in experiments] == [(1, 3), (6, 8), (10, 12)]
    assert [e.scan.get_oscillation() for e in experiments] == pytest.approx(
        [(0.0, 0.5), (2.5, 0.5), (4.5, 0.5)], abs=1e-12
    )
    assert [(b.first, b.last) for b in report.blocks] == [(1, 3), (6, 8), (10, 12)]
    assert [x["image"] for x in report.excluded] == [4, 5, 9]
    assert report.inputs["format"] == "FormatNXmx"
    first = experiments[0]
    for e in experiments:
        assert e.beam is first.beam
        assert e.detector is first.detector
        assert e.goniometer is first.goniometer
        assert e.imageset.get_beam() is first.beam
        assert e.imageset.get_detector() is first.detector
        assert e.imageset.get_goniometer() is first.goniometer
    assert len({e.identifier for e in experiments}) == 3
    # block 2 starts with image 6
    assert np.array_equal(_pixels(experiments[1].imageset, 0), simulation.render(6))
    assert np.array_equal(_pixels(experiments[2].imageset, 2), simulation.render(12))


def test_a_nexus_file_in_a_folder_with_hash_is_read(nexus_sweep, simulation, tmp_path):
    """'#' in a folder is refused for numbered image files (dxtbx reads it
    as an image-number digit of their template), not for a NeXus file, which
    dxtbx opens by its name: the same blocks and pixels as from elsewhere."""
    path, _ = nexus_sweep
    hashed = tmp_path / "run#1"
    hashed.symlink_to(os.path.dirname(path))
    experiments, report = _import(str(hashed / os.path.basename(path)), "gaps.exclude_images=4:5")
    assert [e.scan.get_image_range() for e in experiments] == [(1, 3), (6, 12)]
    assert [x["image"] for x in report.excluded] == [4, 5]
    assert experiments[0].imageset.paths()[0] == str(hashed / os.path.basename(path))
    assert np.array_equal(_pixels(experiments[1].imageset, 6), simulation.render(12))


def test_exclusion_outside_the_images_is_named(nexus_sweep):
    from dials_gapfill.errors import GapfillError

    path, _ = nexus_sweep
    with pytest.raises(GapfillError, match=r"range 11:13 reaches past the images \(1-12\)"):
        _import(path, "gaps.exclude_images=11:13")
    with pytest.raises(GapfillError, match="range 20:20 lies outside the images"):
        _import(path, "gaps.exclude_images=2,20")


def test_simulate_sweep_command_writes_nexus(tmp_path):
    out = tmp_path / "out"
    args = [tool("dials.simulate_sweep"), "format=nexus", "n_images=4", "detector=pilatus300k"]
    result = run_cmd(args + ["seed=11", "prefix=tiny", f"output.directory={out}"], timeout=600)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "Wrote 4 images (FormatNXmx" in result.stdout
    assert sorted(os.listdir(out)) == ["ground_truth.json", "tiny_master.h5"]
    truth = json.load(open(out / "ground_truth.json"))
    assert truth["files"] == ["tiny_master.h5"]
    assert truth["images_written"] == [1, 2, 3, 4]
    assert truth["format_class"] == "FormatNXmx"
    (exp,) = _read([str(out / "tiny_master.h5")])
    assert exp.scan.get_image_range() == (1, 4)

    # what one NeXus file cannot hold is refused with a one-line reason
    refused = run_cmd(args + ["omit=2", f"output.directory={tmp_path / 'no'}"], timeout=600)
    assert refused.returncode == 1
    assert "cannot have holes" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "no").exists()


def test_a_nexus_file_whose_header_says_zero_width(nexus_sweep, tmp_path):
    """The file's omega says 0 deg per image (omega_end = omega): dxtbx
    reads its 12 images as 12 stills.  Without an override the run is
    refused in one line naming the option; with
    geometry.scan.oscillation=start,width all 12 images are one sweep."""
    import shutil

    import h5py

    from dials_gapfill.errors import GapfillError

    path = str(tmp_path / "zero_master.h5")
    shutil.copy(nexus_sweep[0], path)
    with h5py.File(path, "r+") as f:
        axes = f["/entry/sample/transformations"]
        start = float(axes["omega"][0])
        for name in ("omega", "omega_end"):
            axes[name][...] = np.full(axes[name].shape, start)
        axes["omega_increment_set"][...] = 0.0
    with pytest.raises(GapfillError) as e:
        _import(path)
    assert "geometry.scan.oscillation" in str(e.value), str(e.value)
    experiments, _ = _import(path, "geometry.scan.oscillation=0,0.5")
    assert [x.scan.get_image_range() for x in experiments] == [(1, 12)]


@pytest.mark.slow
def test_a_nexus_sweep_to_the_mtz_equals_its_cbf_files(tmp_path):
    """The same simulated images as one NeXus file and as CBF files, with a
    flare frame (found) and images 8-9 excluded: the same blocks, the same
    cell, the same integrated intensities, and MTZ batches the image numbers."""
    import gemmi
    from dials.array_family import flex

    from conftest import process_ok
    from dials_gapfill.simulation.nexus_writer import simulate_nexus
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    config = dict(n_images=24, osc_width=1.0, detector="pilatus300k", distance=150.0, seed=42, bad_images={15: "flare"})
    runs = {}
    for kind, write in (("nexus", simulate_nexus), ("cbf", simulate)):
        images = str(tmp_path / kind)
        write(SimulationConfig(**config), images)
        out = str(tmp_path / f"{kind}_out")
        process_ok(os.path.join(images, "sim_master.h5") if kind == "nexus" else images, out, "exclude_images=8:9")
        with open(os.path.join(out, "dials.process_gapped.json")) as fh:
            summary = json.load(fh)
        runs[kind] = (summary, flex.reflection_table.from_file(os.path.join(out, "integrated.refl")),
                      gemmi.read_mtz_file(os.path.join(out, "integrated.mtz")))
    (nexus, nexus_refl, nexus_mtz), (cbf, cbf_refl, cbf_mtz) = runs["nexus"], runs["cbf"]
    assert [(b["first"], b["last"]) for b in nexus["blocks"]] == [(1, 7), (10, 14), (16, 24)]
    assert [e["image"] for e in nexus["excluded_images"]] == [e["image"] for e in cbf["excluded_images"]] == [8, 9, 15]
    assert [b["integrated"] for b in nexus["blocks"]] == [b["integrated"] for b in cbf["blocks"]]
    assert nexus["totals"]["integrated"] > 5000
    assert np.allclose(nexus["crystal"]["final"]["unit_cell"], cbf["crystal"]["final"]["unit_cell"], rtol=1e-9, atol=1e-9)
    assert list(nexus_refl["miller_index"]) == list(cbf_refl["miller_index"])
    assert np.allclose(nexus_refl["intensity.sum.value"].as_numpy_array(), cbf_refl["intensity.sum.value"].as_numpy_array())
    images = set(range(1, 25)) - {8, 9, 15}
    assert {b.number for b in nexus_mtz.batches} == {b.number for b in cbf_mtz.batches} == images
    assert nexus_mtz.nreflections == cbf_mtz.nreflections > 4000
