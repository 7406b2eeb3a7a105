"""Import: gaps found, gaps forced, models shared; input errors named."""

from __future__ import annotations

import os

import pytest

from conftest import GAPS, ROOT, SNASE, SNASE_GEOMETRY, run_cmd, tool


def _import(*args, positional=()):
    from dials_gapfill.stages.importer import import_images
    from dials_gapfill.phil import working_params
    from dials_gapfill.model.state import Report

    report = Report()
    sweeps, record = import_images(working_params("\n".join(args)), list(positional))
    experiments = sweeps.experiments()
    report.sync(sweeps, experiments)
    report.merge(record)
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
    # a template where file names go (the shell leaves # alone)
    by_positional_template, _ = _import(positional=[f"{sim_gapped}/sim_####.cbf"])
    by_xia2, _ = _import(
        f"input.image={sim_gapped}/sim_0001.cbf:1:40",
        f"input.image={sim_gapped}/sim_0001.cbf:46:120",
    )
    expected = [(1, 40), (46, 80), (84, 120)]
    for experiments in (by_dir, by_glob, by_template, by_positional_template, by_xia2):
        assert _blocks(experiments) == expected
    partial, _ = _import(f"input.image={sim_gapped}/sim_0001.cbf:10:60")
    assert _blocks(partial) == [(10, 40), (46, 60)]
    from dials_gapfill.errors import GapfillError

    with pytest.raises(GapfillError, match=r"no files match .*sim_#####.cbf.*: check the path; # stands for"):
        _import(positional=[f"{sim_gapped}/sim_#####.cbf"])


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


# The error cases of the import (no images, unreadable files, mixed detectors,
# bad exclusion lists, ...) are in test_bad_inputs.py with the other bad inputs.


@pytest.fixture
def small_sweep(tmp_path_factory):
    """Ten tiny images (Pilatus 300K)."""
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    d = tmp_path_factory.mktemp("tiny")
    simulate(SimulationConfig(n_images=10, detector="pilatus300k", seed=3), str(d))
    os.remove(d / "ground_truth.json")
    return d


def test_same_file_twice_is_used_once(small_sweep):
    files = [str(small_sweep / "sim_0003.cbf")] * 2 + [str(small_sweep)]
    experiments, report = _import(positional=files)
    assert _blocks(experiments) == [(1, 10)]
    assert any("given twice" in w for w in report.warnings)
    assert report.inputs["n_files"] == 10  # each file counted once


def test_a_sweep_given_twice_is_one_warning(small_sweep):
    """A glob given twice repeats every file: one warning counts them."""
    files = sorted(str(small_sweep / f) for f in os.listdir(small_sweep))
    experiments, report = _import(positional=files + files[2:])
    assert _blocks(experiments) == [(1, 10)]
    (line,) = [w for w in report.warnings if "given twice" in w]
    assert line.startswith("8 files were given twice or more (") and files[2] in line and files[-1] in line


def test_a_few_files_given_twice_are_all_named(small_sweep):
    """Two files given twice: both named, no '...' between them."""
    a, b = str(small_sweep / "sim_0005.cbf"), str(small_sweep / "sim_0006.cbf")
    experiments, report = _import(positional=[str(small_sweep), a, b])
    assert _blocks(experiments) == [(1, 10)]
    (line,) = [w for w in report.warnings if "given twice" in w]
    assert line == f"2 files were given twice or more ({a}, {b}); each is used once"


def test_help_and_config(tmp_path):
    result = run_cmd([tool("dials.process_gapped"), "-h"])
    assert result.returncode == 0 and "exclude_images" in result.stdout
    result = run_cmd([tool("dials.process_gapped"), "-c", "-e", "2"])
    assert result.returncode == 0
    for scope in ("input {", "gaps {", "spotfinder {", "indexing {", "refinement {",
                  "integration {", "mtz {", "scaling {", "output {", "mp {", "geometry {"):
        assert scope in result.stdout, scope


def test_mixed_goniometers_are_refused(sim_gapped):
    """miniCBF headers carry no goniometer: give one block another rotation axis."""
    import glob

    from dxtbx.model import GoniometerFactory
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.errors import GapfillError
    from dials_gapfill.stages.importer import adopt_experiments
    from dials_gapfill.phil import working_params

    experiments = ExperimentListFactory.from_filenames(sorted(glob.glob(os.path.join(sim_gapped, "*.cbf"))))
    assert len(experiments) == 3
    tilted = GoniometerFactory.known_axis((0.0, 1.0, 0.0))
    experiments[1].goniometer = tilted
    experiments[1].imageset.set_goniometer(tilted)
    with pytest.raises(GapfillError, match="mixed goniometers: images 1-40 and 46-80 differ"):
        adopt_experiments(experiments, working_params(""))


def test_a_sweep_of_stills_among_rotation_sweeps_is_named():
    """Real images: an L-cysteine rotation sweep with three SNase stills."""
    import glob

    from dials_gapfill.errors import GapfillError

    rotation = sorted(glob.glob(os.path.join(ROOT, "..", "shared", "data", "l_cysteine", "l-cyst_01_0000[1-3].cbf.bz2")))
    stills = sorted(glob.glob(os.path.join(SNASE, "snc_newhead_0000[1-3].img.bz2")))
    if len(rotation) < 3 or len(stills) < 3:
        pytest.skip("the L-cysteine and SNase images are not here: see ../shared/README.md")
    with pytest.raises(GapfillError, match=r"^the images of sweep 2 \(snc_newhead_#####.img.bz2\) are stills"):
        _import(positional=rotation + stills)


def test_a_sweep_of_broken_links_is_named(tmp_path):
    """Sweep 1 of L-cysteine whole and sweep 2 as links to files that are
    gone: the one line names the sweep and its template, and how to process
    the other."""
    import glob

    from dials_gapfill.errors import GapfillError

    files = sorted(glob.glob(os.path.join(ROOT, "..", "shared", "data", "l_cysteine", "l-cyst_01_0000[1-3].cbf.bz2")))
    if len(files) != 3:
        pytest.skip("the L-cysteine images are not here: see ../shared/README.md")
    for f in files:
        os.symlink(f, tmp_path / os.path.basename(f))
    for n in (1, 2, 3):
        os.symlink(tmp_path / "gone" / f"x_{n}", tmp_path / f"l-cyst_02_{n:05d}.cbf.bz2")
    with pytest.raises(GapfillError, match=r"^none of the images of sweep 2 \(l-cyst_02_#####.cbf.bz2\) can be "
                                           r"read: check the files \(to process the other sweeps, leave its files out\)$"):
        _import(positional=[str(tmp_path)])


def test_a_truncated_image_in_a_later_sweep_is_named_and_dxtbx_stays_quiet(tmp_path, capfd):
    """Real images: image 7 of L-cysteine sweep 3 cut short (a broken bzip2
    stream).  dxtbx cannot read the files together; read one by one, that
    file is excluded as a broken bzip2 file and the others make their sweeps, and
    dxtbx' lines from C++ about scans it cannot join stay off the terminal.
    Image 9, a whole bzip2 file of something else, is named as not an image."""
    import bz2
    import glob

    files = sorted(glob.glob(os.path.join(ROOT, "..", "shared", "data", "l_cysteine", "l-cyst_0[23]_*.cbf.bz2")))
    if len(files) != 30:
        pytest.skip("the L-cysteine images are not here: see ../shared/README.md")
    for f in files:
        name = os.path.basename(f)
        if name == "l-cyst_03_00007.cbf.bz2":
            with open(f, "rb") as fh:
                (tmp_path / name).write_bytes(fh.read(30000))
        elif name == "l-cyst_03_00009.cbf.bz2":
            (tmp_path / name).write_bytes(bz2.compress(b"beamline notes\n" * 100))
        else:
            os.symlink(f, tmp_path / name)
    capfd.readouterr()
    experiments, report = _import(positional=[str(tmp_path)])
    out = capfd.readouterr().out
    # the run's sweeps are numbered in the order given: L-cysteine sweep 3 is sweep 2
    excluded = [(e["sweep"], e["image"], e["status"], e["reason"].split(" (")[0]) for e in report.excluded]
    assert excluded == [(2, 7, "bad", "unreadable: truncated or corrupt bz2 file"),
                        (2, 9, "bad", "unreadable: not a recognised image format")], excluded
    assert _blocks(experiments) == [(1, 15), (1, 6), (8, 8), (10, 15)]
    assert "Internal Error" not in out, out


def test_a_gzip_image_damaged_inside_is_a_bad_image(tmp_path):
    """Real images gzipped, image 2's compressed stream damaged in the middle
    (zlib's "invalid distance too far back", not an end of file): a bad
    image, excluded, the others read."""
    import glob
    import gzip

    files = sorted(glob.glob(os.path.join(ROOT, "..", "shared", "data", "l_cysteine", "l-cyst_01_0000[1-4].cbf.bz2")))
    if len(files) != 4:
        pytest.skip("the L-cysteine images are not here: see ../shared/README.md")
    import bz2

    for k, f in enumerate(files, start=1):
        with bz2.open(f) as fh:
            data = gzip.compress(fh.read())
        if k == 2:
            data = bytearray(data)
            for i in range(400, 404):
                data[i] ^= 0xFF
            data = bytes(data)
        (tmp_path / f"y_{k:05d}.cbf.gz").write_bytes(data)
    experiments, report = _import(positional=[str(tmp_path)])
    excluded = [(e["image"], e["status"], e["reason"].split(" (")[0]) for e in report.excluded]
    assert excluded == [(2, "bad", "unreadable: truncated or corrupt gzip file")], excluded
    assert _blocks(experiments) == [(1, 1), (3, 4)]


def test_a_folder_with_other_files_beside_the_images(tmp_path, caplog):
    """A folder as users have them: the images, a notes file without an
    image number, a thumbnail; an Eiger master's data files.  The images are
    taken, the rest left out and named in the log, as dials.import takes a
    folder."""
    import glob
    import logging

    from dials_gapfill.stages.importer import _listdir_images

    files = sorted(glob.glob(os.path.join(ROOT, "..", "shared", "data", "l_cysteine", "l-cyst_01_0000[1-5].cbf.bz2")))
    if len(files) != 5:
        pytest.skip("the L-cysteine images are not here: see ../shared/README.md")
    for f in files:
        os.symlink(f, tmp_path / os.path.basename(f))
    (tmp_path / "processing_notes").write_text("crystal 1, 100 K\n")
    (tmp_path / "l-cyst_01_00001.jpeg").write_bytes(b"\xff\xd8\xff\xe0 a thumbnail")
    caplog.set_level(logging.INFO)
    experiments, report = _import(positional=[str(tmp_path)])
    assert _blocks(experiments) == [(1, 5)] and report.excluded == []
    assert "not taken as images: l-cyst_01_00001.jpeg, processing_notes" in caplog.text
    for name in ("x_master.h5", "x_data_000001.h5", "x_data_000002.h5"):
        (tmp_path / name).write_bytes(b"")
    names = [os.path.basename(p) for p in _listdir_images(str(tmp_path))]
    assert names == [os.path.basename(f) for f in files] + ["x_master.h5"]


def test_experiments_are_numbered_as_images_and_left_as_they_were(tiny, tmp_path):
    """Two sweeps whose file names sort one way and folders the other
    (data/b/a_####.cbf, data/a/b_####.cbf): the same sweep numbers from the
    files and from an ExperimentList of them, so exclude_images=1:3:4 leaves
    out the same images on both routes; the caller's ExperimentList keeps
    its crystal and its own models (the run works on a copy)."""
    import glob

    from dxtbx.model import Crystal
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.phil import working_params
    from dials_gapfill.stages.importer import adopt_experiments, import_images

    for folder, prefix, first in (("b", "a", 1), ("a", "b", 11)):
        os.makedirs(tmp_path / folder)
        for k in range(1, 11):
            os.symlink(os.path.join(tiny, f"sim_{first + k - 1:04d}.cbf"), tmp_path / folder / f"{prefix}_{k:04d}.cbf")
    files = sorted(glob.glob(str(tmp_path / "*" / "*.cbf")))
    params = working_params("gaps.exclude_images=1:3:4")

    def excluded(sweeps):
        return [(os.path.basename(s.template), [e.scan.get_image_range() for e in s.experiments()]) for s in sweeps]

    from_files, _ = import_images(params, files)
    experiments = ExperimentListFactory.from_filenames(files)
    crystal = Crystal((10, 0, 0), (0, 11, 0), (0, 0, 12), "P 1")
    experiments[0].crystal = crystal
    beam, detector = experiments[0].beam, experiments[1].detector
    wavelength = beam.get_wavelength()
    adopted, _ = adopt_experiments(experiments, params)
    assert excluded(adopted) == excluded(from_files) == [
        ("a_####.cbf", [(1, 2), (5, 10)]), ("b_####.cbf", [(1, 10)])]
    assert experiments[0].crystal is crystal
    assert experiments[0].beam is beam and experiments[1].detector is detector
    assert all(e.beam is not beam for s in adopted for e in s.experiments())
    adopted[0].experiments()[0].beam.set_wavelength(2 * wavelength)
    assert beam.get_wavelength() == wavelength


def test_unpadded_numbers_number_the_sweeps_in_image_order(tiny, tmp_path):
    """img_1.cbf ... img_12.cbf: dxtbx reads two templates (img_#.cbf,
    img_##.cbf), as dials.import does, so two sweeps; sweep 1 is images 1-9
    (the narrower number first), not 10-12 as the templates' characters sort."""
    from dials_gapfill.phil import working_params
    from dials_gapfill.stages.importer import import_images

    for k in range(1, 13):
        os.symlink(os.path.join(tiny, f"sim_{k:04d}.cbf"), tmp_path / f"img_{k}.cbf")
    sweeps, _ = import_images(working_params(""), [str(tmp_path)])
    assert [(os.path.basename(s.template), s.image_range) for s in sweeps] == [
        ("img_#.cbf", (1, 9)), ("img_##.cbf", (10, 12))]
    assert [s.blocks() for s in sweeps] == [[(1, 9)], [(10, 12)]]
    # from experiments dials.import made: it sorts img_1 before img_10, so
    # img_1 and img_2-9 are two sequences, which are one block here too
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.stages.importer import adopt_experiments

    imported = ExperimentListFactory.from_filenames(sorted(str(p) for p in tmp_path.iterdir()))
    assert [e.scan.get_image_range() for e in imported] == [(1, 1), (10, 12), (2, 9)]
    adopted, _ = adopt_experiments(imported, working_params(""))
    assert [(os.path.basename(s.template), s.blocks()) for s in adopted] == [
        ("img_#.cbf", [(1, 9)]), ("img_##.cbf", [(10, 12)])]
    block = adopted.experiments()[0]
    assert block.imageset.paths() == [str(tmp_path / f"img_{k}.cbf") for k in range(1, 10)]
    assert block.scan.get_oscillation() == (0.0, 1.0)
    ours, files = block.imageset.get_raw_data(8)[0], sweeps.experiments()[0].imageset.get_raw_data(8)[0]
    assert (ours.as_numpy_array() == files.as_numpy_array()).all()  # (image 9 through the joined sequence)
    assert [e.scan.get_image_range() for e in imported] == [(1, 1), (10, 12), (2, 9)]  # (the caller's as they were)


def _past_360(folder):
    """20 x 1 deg simulated from 350 deg, the headers of images 11-20
    saying 0-9 deg (a goniometer that reports angles modulo 360)."""
    import re

    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    simulate(SimulationConfig(n_images=20, osc_start=350.0, osc_width=1.0, detector="pilatus300k",
                              distance=150.0, seed=42), folder)
    for k in range(11, 21):
        path = os.path.join(folder, f"sim_{k:04d}.cbf")
        with open(path, "rb") as fh:
            data = fh.read()
        wrapped = re.sub(rb"# Start_angle (\d+\.\d+) deg\.",
                         lambda m: b"# Start_angle %.4f deg." % (float(m.group(1)) - 360), data, count=1)
        assert wrapped != data
        with open(path, "wb") as fh:
            fh.write(wrapped)
    return folder


def test_headers_that_go_past_360_deg_again_from_0_are_one_rotation(tmp_path):
    """A sweep from 350 deg whose headers say 0-9 deg for images 11-20 (a
    goniometer that reports angles modulo 360): with images 9-12 left out,
    the second block starts at 362 deg, a whole turn on from its headers,
    so the blocks lie on one rotation (the continuous model's check passes)
    and no header is called wrong."""
    from dials_gapfill.crystal_model.continuous import check_blocks

    folder = _past_360(str(tmp_path / "images"))
    experiments, report = _import("gaps.exclude_images=9:12", positional=[folder])
    assert [(e.scan.get_image_range(), e.scan.get_oscillation()) for e in experiments] == [
        ((1, 8), (350.0, 1.0)), ((13, 20), (362.0, 1.0))]
    assert not report.warnings, report.warnings
    check_blocks(experiments)


def test_the_experiment_list_route_takes_sweeps_as_the_file_route(tiny, tmp_path):
    """From dials.import's ExperimentList, as from the files: one sweep split
    over two folders is one sweep (exclude_images=9:10 needs no sweep
    number), and headers that go on from 0 after 360 deg are a whole turn
    on, on one rotation."""
    import glob

    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.phil import working_params
    from dials_gapfill.stages.importer import adopt_experiments, import_images

    for folder, numbers in (("d1", range(1, 5)), ("d2", range(7, 13))):
        os.makedirs(tmp_path / folder)
        for k in numbers:
            os.symlink(os.path.join(tiny, f"sim_{k:04d}.cbf"), tmp_path / folder / f"sim_{k:04d}.cbf")
    files = sorted(glob.glob(str(tmp_path / "d*" / "*.cbf")))
    params = working_params("gaps.exclude_images=9:10")
    ranges = lambda sweeps: [[e.scan.get_image_range() for e in s.experiments()] for s in sweeps]  # noqa: E731
    from_files, _ = import_images(params, files)
    adopted, _ = adopt_experiments(ExperimentListFactory.from_filenames(files), params)
    assert ranges(adopted) == ranges(from_files) == [[(1, 4), (7, 8), (11, 12)]]

    wrapped = _past_360(str(tmp_path / "wrapped"))
    files = [os.path.join(wrapped, f"sim_{k:04d}.cbf") for k in list(range(1, 9)) + list(range(13, 21))]
    adopted, record = adopt_experiments(ExperimentListFactory.from_filenames(files), working_params(""))
    assert [(e.scan.get_image_range(), e.scan.get_oscillation()) for e in adopted[0].experiments()] == [
        ((1, 8), (350.0, 1.0)), ((13, 20), (362.0, 1.0))]
    assert not record.warnings, record.warnings


def test_sweeps_are_numbered_in_one_order():
    """Numbered templates by file name (narrower numbers first), then folder;
    NeXus files after them by file name, then folder, whatever order they
    were given in (dials.import sorts them too)."""
    from dials_gapfill.stages.importer import _sweep_order

    given = ["/z/sim_master.h5", "/b/x_####.cbf", "/a/img_##.cbf", "/a/sim_master.h5", "/c/img_#.cbf",
             "/a/a_master.h5"]
    assert _sweep_order(given) == ["/c/img_#.cbf", "/a/img_##.cbf", "/b/x_####.cbf", "/a/a_master.h5",
                                   "/a/sim_master.h5", "/z/sim_master.h5"]
