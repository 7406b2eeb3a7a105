"""Real rotation data: four 1.5-degree sweeps of one L-cysteine crystal
(../shared/data/l_cysteine: Pilatus 2M, three goniometer settings, 1-5 spots
per image).  Each sweep alone keeps every image (a sparse pattern is not a
fault); the four together, with images left out of two of them, process
with defaults to an MTZ; against the DIALS command-line chain on the same
complete images, run here."""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np
import pytest

from conftest import ROOT, process_ok, run_forked

DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "l_cysteine"))
# images left out: two images of sweep 1, one of sweep 3
LEFT_OUT = {1: (6, 7), 3: (10,)}
# The crystal's cell from all images of the four complete sweeps (these 60
# are their first 15 each): dials.two_theta_refine in DIALS' small-molecule
# tutorial (dials.github.io/documentation/tutorials/small_molecule_tutorial.html),
# esds 3-7e-5 A.  The cell dials.index gives on the 60 images, 5.494 8.204
# 12.155 A, is 0.9-1.3 % from it.
REFERENCE_CELL = (5.42183, 8.13282, 12.02218)


def _cell_error(cell):
    """Largest relative difference of the cell lengths from REFERENCE_CELL."""
    return float(np.max(np.abs(np.asarray(cell[:3]) / REFERENCE_CELL - 1)))


@pytest.fixture(scope="session")
def l_cysteine():
    if not glob.glob(os.path.join(DATA, "l-cyst_0*.cbf.bz2")):
        pytest.skip(f"the L-cysteine images are not here ({DATA}): see ../shared/README.md")
    return DATA


def _files(folder, sweep=None):
    pattern = f"l-cyst_0{sweep}_*.cbf.bz2" if sweep else "l-cyst_0*.cbf.bz2"
    return sorted(glob.glob(os.path.join(folder, pattern)))


@pytest.mark.parametrize("sweep", [1, 2, 3, 4])
def test_each_sweep_alone_keeps_every_image(l_cysteine, sweep):
    """Import, spot finding, bad images and detector checks of one sweep, in
    this process: no frame is called blank or over-exposed, and the detector
    check does not take a photon counter's empty pixels for a dead area."""
    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from

    state = pipeline.Pipeline(params_from(["nproc=2"]), _files(l_cysteine, sweep)).run(stop_before="indexing")
    assert [e.scan.get_image_range() for e in state.experiments] == [(1, 15)]
    assert state.report.excluded == []
    assert not [w for w in state.report.warnings if "read exactly 0" in w]
    assert sum(b.stats["spots"] for b in state.report.blocks) >= 25


@pytest.mark.slow
def test_one_sweep_alone_stops_at_the_profile_model_naming_the_fix(l_cysteine, tmp_path):
    """Sweep 1 alone (1.5 degrees, 54 strong spots) indexes and refines, and
    has fewer reference spots than DIALS' profile model needs (as the DIALS
    chain, which stops there too): one line, exit 1, counting the reference
    spots (not more than were indexed) and naming the parameters; with the
    parameter it names lowered, the sweep integrates to an MTZ."""
    import re

    import gemmi

    from conftest import process

    out = str(tmp_path / "alone")
    result = process(_files(l_cysteine, 1), out)
    assert result.returncode == 1
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    found = re.search(r"only (\d+) reference spots in all blocks together \(the indexed strong spots", err)
    assert found and "profile.gaussian_rs.min_spots.overall=50" in err and "sigma_m=" in err, err
    log = open(os.path.join(out, "dials.process_gapped.failed.log")).read()
    indexed = [int(n) for n in re.findall(r"Block 1 \(images 1-15\): (\d+) of \d+ spots indexed", log)]
    assert indexed and 0 < int(found.group(1)) <= indexed[-1] and int(found.group(1)) < 50, (found.group(0), indexed)
    fixed = str(tmp_path / "fixed")
    process_ok(_files(l_cysteine, 1), fixed, "profile.gaussian_rs.min_spots.overall=0")
    assert gemmi.read_mtz_file(os.path.join(fixed, "integrated.mtz")).nreflections > 20


def test_a_sweep_split_over_two_folders_reads_each_image_from_its_folder(l_cysteine, tmp_path):
    """Sweep 1 as images 1-7 in one folder and 8-15 in another (one name
    template): dxtbx joins such files into one sequence with the first
    folder's template, so images 8-15 were looked for there and excluded as
    unreadable.  Read folder by folder, every image comes from its own file
    and nothing is excluded; a block ends at the folder."""
    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from

    folders = {}
    for n, path in enumerate(_files(l_cysteine, 1), start=1):
        folder = tmp_path / ("first" if n <= 7 else "second")
        folder.mkdir(exist_ok=True)
        os.symlink(path, folder / os.path.basename(path))
        folders[n] = str(folder)
    state = pipeline.Pipeline(params_from(["nproc=1"]), [folders[1], folders[15]]).run(stop_before="indexing")
    assert [e.scan.get_image_range() for e in state.experiments] == [(1, 7), (8, 15)]
    assert state.report.excluded == []
    for exp in state.experiments:
        first, last = exp.scan.get_image_range()
        paths = [exp.imageset.get_path(k) for k in range(len(exp.imageset))]
        assert [os.path.dirname(p) for p in paths] == [folders[n] for n in range(first, last + 1)], paths
    assert sum(b.stats["spots"] for b in state.report.blocks) >= 50


def test_sweeps_in_folders_of_their_own_with_the_same_file_names(l_cysteine, tmp_path):
    """/data/s1/x_00001.cbf.bz2 ... /data/s4/x_00015.cbf.bz2, the layout many
    beamlines write: an image number in two folders makes each folder a sweep
    (as dials.import does; it was refused as the same image given twice).
    The same sweeps, settings and spots as from the files' own names."""
    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from

    folders = []
    for sweep in (1, 2, 3, 4):
        folder = tmp_path / f"s{sweep}"
        folder.mkdir()
        for n, path in enumerate(_files(l_cysteine, sweep), start=1):
            os.symlink(path, folder / f"x_{n:05d}.cbf.bz2")
        folders.append(str(folder))
    renamed = pipeline.Pipeline(params_from(["nproc=1"]), folders[::-1]).run(stop_before="bad images")
    named = pipeline.Pipeline(params_from(["nproc=1"]), _files(l_cysteine)).run(stop_before="bad images")
    assert [s.template for s in renamed.sweeps] == [os.path.join(f, "x_#####.cbf.bz2") for f in folders]
    assert [s.image_range for s in renamed.sweeps] == [(1, 15)] * 4 and renamed.report.excluded == []
    for a, b in zip(renamed.sweeps, named.sweeps):
        assert a.setting_text() == b.setting_text()
    assert [b.stats["spots"] for b in renamed.report.blocks] == [b.stats["spots"] for b in named.report.blocks]


def test_a_reference_geometry_keeps_what_tells_the_sweeps_apart(l_cysteine, tmp_path):
    """A reference_geometry holds one goniometer and one detector, and
    dials.import gives them to every image set: the sweeps' settings (phi 0,
    120, 240; sweep 4 a phi scan) and sweep 4's detector position (2-theta 0
    against 30 deg) would be erased.  Each is refused with the switch that
    keeps it; with the switches each sweep keeps its own, and the rest comes
    from the reference.  One sweep takes the reference whole, as
    dials.import does."""
    from dxtbx.model.experiment_list import ExperimentListFactory
    from scitbx import matrix

    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages.importer import import_images

    # sweep 1's headers, the detector moved 0.5 mm along its normal and the beam
    # tilted 0.1 deg: a calibration the images do not carry
    reference = ExperimentListFactory.from_filenames(_files(l_cysteine, 1)[:2])
    panel = reference[0].detector[0]
    panel.set_frame(panel.get_fast_axis(), panel.get_slow_axis(),
                    matrix.col(panel.get_origin()) + 0.5 * matrix.col(panel.get_normal()))
    s0 = matrix.col(reference[0].beam.get_s0())
    reference[0].beam.set_s0(s0.rotate_around_origin(matrix.col((0, 1, 0)), 0.1, deg=True))
    path = str(tmp_path / "reference.expt")
    reference.as_file(path)
    distance = panel.get_distance()

    def sweeps(files, *switches):
        params = params_from([f"reference_geometry={path}", *switches])
        return import_images(params, files)[0]

    with pytest.raises(GapfillError, match=r"one goniometer, but the headers differ for sweeps 1 and 2 \(GON_PHI 0.0, "
                       r"GON_OMEGA scan; GON_PHI 120.0, .*input.use_gonio_reference=False"):
        sweeps([l_cysteine])
    with pytest.raises(GapfillError, match=r"one detector, but the headers differ for sweeps 1 and 4 \(origins "
                       r"105.3 mm apart, normals 30.0 deg apart\): .*input.use_detector_reference=False"):
        sweeps([l_cysteine], "use_gonio_reference=False")
    three = sweeps(_files(l_cysteine, 1) + _files(l_cysteine, 2) + _files(l_cysteine, 3), "use_gonio_reference=False")
    assert [s.setting_text() for s in three] == [f"GON_PHI {phi}.0, GON_OMEGA scan" for phi in (0, 120, 240)]
    for sweep in three:
        assert sweep.sources[0].detector[0].get_distance() == pytest.approx(distance, abs=1e-6)
        assert sweep.sources[0].beam.get_s0() == pytest.approx(reference[0].beam.get_s0(), abs=1e-9)
    four = sweeps([l_cysteine], "use_gonio_reference=False", "use_detector_reference=False")
    assert [s.setting_text() for s in four][3] == "GON_PHI scan, GON_OMEGA 0.0"
    assert four[0].sources[0].detector is four[1].sources[0].detector is not four[3].sources[0].detector
    assert four[0].sources[0].detector[0].get_distance() == pytest.approx(distance - 0.5, abs=1e-6)
    assert four[3].sources[0].beam.get_s0() == pytest.approx(reference[0].beam.get_s0(), abs=1e-9)
    # the same through templates (each sweep one template)
    templates = [f"template={os.path.join(l_cysteine, f'l-cyst_0{k}_#####.cbf.bz2')}" for k in (1, 2, 3, 4)]
    with pytest.raises(GapfillError, match=r"headers differ for sweeps 1 and 2 .*input.use_gonio_reference=False"):
        sweeps([], *templates)
    (alone,) = sweeps(_files(l_cysteine, 2))
    assert alone.setting_text() == "GON_PHI 0.0, GON_OMEGA scan"
    assert alone.sources[0].detector[0].get_distance() == pytest.approx(distance, abs=1e-6)


@pytest.fixture(scope="session")
def dials_chain(l_cysteine, tmp_path_factory):
    """The DIALS 3.12 command line on all 60 images, as its README gives it:
    import, find_spots, index (joint), refine, integrate (min_spots lowered:
    with its defaults it stops), export.  (experiments, reflections, folder)."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    d = str(tmp_path_factory.mktemp("l_cysteine_dials"))
    steps = [
        ["dials.import", *_files(l_cysteine)],
        ["dials.find_spots", "imported.expt", "nproc=2"],
        ["dials.index", "imported.expt", "strong.refl", "joint_indexing=True"],
        ["dials.refine", "indexed.expt", "indexed.refl"],
        ["dials.integrate", "refined.expt", "refined.refl", "nproc=2",
         "profile.gaussian_rs.min_spots.overall=0", "profile.gaussian_rs.min_spots.per_degree=0"],
    ]
    for step in steps:
        result = run_forked(step, cwd=d)
        assert result.returncode == 0, (step, result.stdout[-2000:], result.stderr[-2000:])
    experiments = ExperimentListFactory.from_json_file(os.path.join(d, "integrated.expt"), check_format=False)
    return experiments, flex.reflection_table.from_file(os.path.join(d, "integrated.refl")), d


@pytest.fixture(scope="session")
def ours(l_cysteine, tmp_path_factory):
    """dials.process_gapped with defaults on all 60 images, and on the images
    without LEFT_OUT: {"complete": folder, "gapped": folder}."""
    runs = {}
    gapped = tmp_path_factory.mktemp("l_cysteine_gapped")
    for path in _files(l_cysteine):
        name = os.path.basename(path)
        sweep, image = int(name[8]), int(name[10:15])
        if image not in LEFT_OUT.get(sweep, ()):
            os.symlink(path, gapped / name)
    for name, images in (("complete", l_cysteine), ("gapped", str(gapped))):
        out = str(tmp_path_factory.mktemp(f"l_cysteine_{name}"))
        process_ok(images, out)
        runs[name] = out
    return runs


def _summary(folder):
    with open(os.path.join(folder, "dials.process_gapped.json")) as fh:
        return json.load(fh)


def _mean_cell(experiments):
    from dials_gapfill.model.tables import mean_cell

    return np.mean([mean_cell(c) for c in experiments.crystals()], axis=0)


@pytest.mark.slow
def test_four_sweeps_as_one_crystal_against_the_dials_chain(ours, dials_chain):
    chain_experiments, chain_reflections, _ = dials_chain
    summary = _summary(ours["complete"])
    assert [s["number"] for s in summary["sweeps"]] == [1, 2, 3, 4]
    assert [s["batch_offset"] for s in summary["sweeps"]] == [0, 100, 200, 300]
    final = summary["crystal"]["final"]
    # one crystal: one cell for the four sweeps, with its esds
    assert max(final["cell_spread"]) < 1e-6
    assert all(0 < e < 0.01 for e in final["unit_cell_esd"][:3])
    # the cell the DIALS chain refines (its four crystals' mean), within 0.3 %
    chain_cell = _mean_cell(chain_experiments)
    assert np.allclose(final["unit_cell"][:3], chain_cell[:3], rtol=0.003), (final["unit_cell"], chain_cell)
    # against the cell of the complete sweeps: within 0.05 %, and at least as
    # close as the chain's
    assert _cell_error(final["unit_cell"]) <= min(0.0005, _cell_error(chain_cell)), (final["unit_cell"], chain_cell)
    # at least as many reflections integrated as DIALS with min_spots lowered:
    # rows of integrated.refl on both sides (the totals count rows; DIALS'
    # flags.integrated asks for summation and profile fitting both)
    assert summary["totals"]["integrated"] >= len(chain_reflections), (summary["totals"]["integrated"],
                                                                      len(chain_reflections))
    assert summary["excluded_images"] == []
    # the log tells blocks of different sweeps with the same images apart
    # (sweep 2's first image has no spot in its scan-varying refinement)
    with open(os.path.join(ours["complete"], "dials.process_gapped.log")) as fh:
        said = [line for line in fh if "had no spot in the scan-varying refinement" in line]
    assert said and all(re.match(r"Block of images \d+-\d+ \(l-cyst_0\d_#####\.cbf\.bz2\): ", s) for s in said), said


@pytest.mark.slow
def test_spots_left_out_are_predicted_better_than_by_the_dials_chain(dials_chain, tmp_path):
    """The RMSDs of the spots a refinement used favour the model with more
    parameters: dials.refine's defaults give each sweep its own crystal, cell
    and orientation scan-varying (85 parameters on some 85 spots), ours one
    cell and an orientation per sweep.  The prediction of spots a model was
    not refined against measures how close it is: the chain's indexed spots
    in 10 folds, each predicted by the models refined on the other nine,
    scored on the spots both full refinements kept.  Pooled over the four
    sweeps ours are closer in x, y and phi (benchmarks/l_cysteine_rmsd.py,
    on the 78 spots four refinements kept: 0.26 / 0.45 px and 0.59 images
    against 1.01 / 2.21 px and 1.22 images)."""
    import copy

    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.crystal_model import ContinuousModel
    from dials_gapfill.phil import params_from
    from dials_gapfill.simulation.compare import held_out_residuals

    d = dials_chain[2]
    experiments = ExperimentListFactory.from_json_file(os.path.join(d, "indexed.expt"), check_format=False)
    indexed = flex.reflection_table.from_file(os.path.join(d, "indexed.refl"))
    indexed = indexed.select(indexed["id"] >= 0)
    folders = iter(range(100))

    def chain(exps, refl):
        folder = tmp_path / f"chain{next(folders)}"
        folder.mkdir()
        exps.as_file(str(folder / "in.expt"))
        refl.as_file(str(folder / "in.refl"))
        # a tenth of the spots out can leave a parameter with too few for
        # DIALS: it then offers to fix it and remove its spots
        for extra in ([], ["auto_reduction.action=remove"]):
            if run_forked(["dials.refine", "in.expt", "in.refl", *extra], cwd=str(folder)).returncode == 0:
                return ExperimentListFactory.from_json_file(str(folder / "refined.expt"), check_format=False)
        raise AssertionError(f"dials.refine failed in {folder}")

    def ours(exps, refl):
        return ContinuousModel(params_from(["nproc=1"])).refine(exps, refl)[0]

    def kept(table):
        x, y, z = table["xyzobs.px.value"].parts()
        used = table.get_flags(table.flags.used_in_refinement)
        return {(int(i), round(a, 3), round(b, 3), round(c, 3)) for i, a, b, c, u in zip(table["id"], x, y, z, used) if u}

    _, ours_table, _ = ContinuousModel(params_from(["nproc=1"])).refine(copy.deepcopy(experiments), copy.deepcopy(indexed))
    both = kept(flex.reflection_table.from_file(os.path.join(d, "refined.refl"))) & kept(ours_table)
    x, y, z = indexed["xyzobs.px.value"].parts()
    score = [k for k, key in enumerate(zip(indexed["id"], x, y, z))
             if (int(key[0]), round(key[1], 3), round(key[2], 3), round(key[3], 3)) in both]
    assert len(score) > 60
    rmsd = {}
    for name, refine in (("chain", chain), ("ours", ours)):
        residuals = held_out_residuals(refine, experiments, indexed, score)
        pooled = np.vstack([np.column_stack(r) for r in residuals.values()])
        assert len(pooled) == len(score)
        rmsd[name] = np.sqrt(np.mean(pooled ** 2, axis=0))
    assert (rmsd["ours"] <= rmsd["chain"]).all(), rmsd


@pytest.mark.slow
def test_the_sweeps_cells_shared_or_tied(dials_chain):
    """The continuous model on the chain's indexed spots: by default the four
    sweeps share one cell (DIALS' equal-shift constraints), its esds those
    of the one cell; refinement.blocks.continuous_sweep_cells=tied gives
    each sweep its own cell, restrained to their mean (tie_sigma), each with
    the esds DIALS gives it (a 1.5-degree wedge alone hardly fixes its cell:
    c 0.07-0.12 A).  The shared cell within 0.05 % of the complete sweeps'
    cell; the tied cells' mean within 0.1 %, each within 0.3 % (measured:
    0.022 % shared; tied at tie_sigma 0.01, 0.083 % and 0.183 % at worst:
    docs/sweeps.md)."""
    import copy

    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.crystal_model import ContinuousModel
    from dials_gapfill.phil import params_from

    d = dials_chain[2]
    experiments = ExperimentListFactory.from_json_file(os.path.join(d, "indexed.expt"), check_format=False)
    indexed = flex.reflection_table.from_file(os.path.join(d, "indexed.refl"))
    indexed = indexed.select(indexed["id"] >= 0)
    for cells in ("shared", "tied"):
        refined, _, record = ContinuousModel(
            params_from(["nproc=1", f"refinement.blocks.continuous_sweep_cells={cells}"])).refine(
            copy.deepcopy(experiments), copy.deepcopy(indexed))
        assert len(refined) == 4
        lengths = np.array([e.crystal.get_unit_cell().parameters()[:3] for e in refined])
        esds = np.array([e.crystal.get_cell_parameter_sd()[:3] for e in refined])
        assert (esds > 0).all(), esds
        if cells == "shared":
            assert np.ptp(lengths, axis=0).max() < 1e-6
            assert np.ptp(esds, axis=0).max() < 1e-9 and (esds < 0.01).all(), esds
            assert record.crystal["cell_esd"][:3] == pytest.approx(list(esds[0]), rel=1e-9)
        else:
            assert np.ptp(lengths, axis=0).max() > 1e-4, lengths
            assert np.ptp(esds, axis=0).max() > 1e-6, esds
        assert _cell_error(lengths.mean(axis=0)) < (0.0005 if cells == "shared" else 0.001), (cells, lengths)
        assert max(_cell_error(cell) for cell in lengths) < 0.003, (cells, lengths)


def _integrated_twice(reflections):
    """(block, Miller index) of rows that integrate one reflection twice in
    one block: the same index and direction of crossing, overlapping
    shoeboxes, and not parts of one prediction that DIALS' integrator split
    (those share a partial_id and do not overlap)."""
    from collections import defaultdict

    x0, x1, y0, y1, z0, z1 = reflections["bbox"].parts()
    rows = defaultdict(list)
    for i in range(len(reflections)):
        rows[(reflections["id"][i], reflections["miller_index"][i], reflections["entering"][i])].append(i)
    twice = set()
    for key, group in rows.items():
        for a in group:
            for b in group:
                if a < b and reflections["partial_id"][a] != reflections["partial_id"][b] and \
                        x0[a] < x1[b] and x0[b] < x1[a] and y0[a] < y1[b] and y0[b] < y1[a] and \
                        z0[a] < z1[b] and z0[b] < z1[a]:
                    twice.add(key[:2])
    return twice


def test_a_reflection_predicted_twice_in_a_block_is_integrated_once():
    """DIALS' scan-varying predictor predicts some reflections at the ends of
    a block's scan twice (its padding frames restart from the crystal of the
    scan's end frame), and both rows are integrated on the same pixels.  On
    the wedges as integrated once (tests/data/l_cysteine_wedges), the rows
    repeated_predictions drops leave every reflection once per block, and
    each dropped row repeats one kept (same block, index, crossing and
    shoebox pixels), the kept one nearer the block's frames."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.stages.integration import repeated_predictions

    seen = 0
    for name in ("gapped", "complete", "block_left_out"):
        folder = os.path.join(ROOT, "tests", "data", "l_cysteine_wedges", name)
        experiments = ExperimentListFactory.from_json_file(os.path.join(folder, "integrated.expt"), check_format=False)
        reflections = flex.reflection_table.from_file(os.path.join(folder, "integrated.refl"))
        twice = _integrated_twice(reflections)
        seen += len(twice)
        drop = repeated_predictions(experiments, reflections)
        keep = flex.bool(len(reflections), True)
        keep.set_selected(drop, False)
        kept = reflections.select(keep)
        assert not _integrated_twice(kept), name
        # only repeats dropped: each has a kept row of the same reflection, nearer the frames
        z = reflections["xyzcal.px"].parts()[2]
        for i in drop:
            lo, hi = experiments[reflections["id"][i]].scan.get_array_range()
            outside = max(lo - z[i], z[i] - hi, 0)
            same = [j for j in keep.iselection() if reflections["id"][j] == reflections["id"][i]
                    and reflections["miller_index"][j] == reflections["miller_index"][i]
                    and reflections["entering"][j] == reflections["entering"][i]]
            assert len(same) == 1, (name, i)
            assert max(lo - z[same[0]], z[same[0]] - hi, 0) <= outside
        assert len(drop) == len(reflections) - len(kept) >= len(twice)
    assert seen > 0  # the stored runs hold such repeats


@pytest.mark.slow
def test_four_sweeps_with_images_left_out(ours):
    import gemmi

    complete, gapped = _summary(ours["complete"]), _summary(ours["gapped"])
    blocks = [(b["sweep"], b["first"], b["last"]) for b in gapped["blocks"]]
    assert blocks == [(1, 1, 5), (1, 8, 15), (2, 1, 15), (3, 1, 9), (3, 11, 15), (4, 1, 15)]
    # no good image excluded: the images not used are those left out
    assert sorted((e["sweep"], e["image"], e["status"]) for e in gapped["excluded_images"]) == [
        (1, 6, "missing file"), (1, 7, "missing file"), (3, 10, "missing file")]
    # one cell, within 0.3 % of the complete run's
    final = gapped["crystal"]["final"]
    assert max(final["cell_spread"]) < 1e-6
    assert np.allclose(final["unit_cell"][:3], complete["crystal"]["final"]["unit_cell"][:3], rtol=0.003)
    assert _cell_error(final["unit_cell"]) < 0.0005, final["unit_cell"]
    # BATCH unique over the sweeps: image number + the sweep's offset
    mtz = gemmi.read_mtz_file(os.path.join(ours["gapped"], "integrated.mtz"))
    batches = {b.number for b in mtz.batches}
    expected = {100 * (s - 1) + n for s in (1, 2, 3, 4) for n in range(1, 16) if n not in LEFT_OUT.get(s, ())}
    assert batches == expected
    assert set(np.array(mtz.column_with_label("BATCH"), dtype=int)) <= expected
    assert mtz.nreflections > 80
    # each reflection integrated once per block, and once per image in the MTZ
    from dials.array_family import flex

    for run in ours.values():
        assert not _integrated_twice(flex.reflection_table.from_file(os.path.join(run, "integrated.refl")))
        mtz = gemmi.read_mtz_file(os.path.join(run, "integrated.mtz"))
        rows = np.array(mtz, copy=False)[:, [mtz.column_labels().index(c) for c in ("H", "K", "L", "M/ISYM", "BATCH")]]
        assert len(np.unique(rows, axis=0)) == len(rows)


@pytest.mark.slow
def test_scaling_the_wedges_keeps_the_strong_data_cc_half_cannot_judge(ours, tmp_path, caplog):
    """scale() on the four wedges with images left out (multiplicity 1.2),
    as integrated once and kept in tests/data/l_cysteine_wedges (whether CC½
    can be fitted at all there turns on ten reflections more or less): CC½
    can be measured only at low resolution, and beyond it merged <I/σ> says
    the data are strong, so they are kept (cut where CC½ can last be
    measured, most reflections would go); the Laue group dials.symmetry picks
    from a hundred reflections is reported as uncertain, and its warnings
    about normalising them and its CC½ resolution filter reach the log as
    one line, without a traceback.  The wedges as integrated now, with and without the images
    left out, are scaled to the edge of the data.  On all 60 images as
    integrated once (a few reflections at scan ends integrated twice) DIALS'
    physical model diverges and the run scales with KB instead; as
    integrated now, DIALS' model holds."""
    import logging

    import gemmi
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.handlers.outputs import Outputs
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages.scaling import scale

    kept = os.path.join(ROOT, "tests", "data", "l_cysteine_wedges")
    results = {}
    for name, folder, misigma in (("default", os.path.join(kept, "gapped"), None),
                                  ("cc_half_only", os.path.join(kept, "gapped"), "None"),
                                  ("complete_kept", os.path.join(kept, "complete"), None),
                                  ("complete_auto", os.path.join(kept, "complete"), None),
                                  ("gapped", ours["gapped"], None), ("complete", ours["complete"], None)):
        experiments = ExperimentListFactory.from_json_file(os.path.join(folder, "integrated.expt"),
                                                           check_format=False)
        reflections = flex.reflection_table.from_file(os.path.join(folder, "integrated.refl"))
        params = params_from(["scale=True", f"output.directory={tmp_path / name}"]
                             + ([f"scaling.resolution.misigma={misigma}"] if misigma else [])
                             + (["shelx=True"] if name == "complete" else [])
                             # DIALS' physical model as it came out: 54 reflections kept
                             + (["scaling.model=physical"] if name == "complete_kept" else []))
        outputs = Outputs(str(tmp_path / name))
        outputs.check_writable()
        caplog.clear()
        with caplog.at_level(logging.INFO):
            (_, joint), record = scale(experiments, reflections, params, outputs)
        outputs.commit()
        results[name] = (record.scaling, record.warnings, list(caplog.records), record.files, joint)
    default, warnings, records, _, _ = results["default"]
    cut = results["cc_half_only"][0]
    # CC½ above 0.3 as far as it can be measured, well inside the data
    assert cut["resolution"]["method"] == "cc_half" and not cut["resolution"]["crossed"]
    d_cc = cut["resolution"]["d_min"]
    assert d_cc > 1.5 * cut["resolution"]["d_min_data"], cut["resolution"]
    # by default the strong data beyond it are kept: to the edge, or at least
    # well beyond the CC½ limit
    assert default["resolution"]["d_min_misigma"] < d_cc
    assert default["resolution"]["d_min"] is None or default["resolution"]["d_min"] < 0.8 * d_cc, default["resolution"]
    n_kept, n_cut = default["n_obs"][0], cut["n_obs"][0]
    assert n_kept > 2 * n_cut, (n_kept, n_cut)
    assert gemmi.read_mtz_file(str(tmp_path / "default" / "scaled.mtz")).resolution_high() < 0.8 * d_cc
    # the Laue group is said to be uncertain
    assert default["symmetry"]["likelihood"] < 0.5
    assert any("Laue group" in w and "uncertain" in w for w in warnings), warnings
    # DIALS' own messages kept, their tracebacks not: dials.symmetry's
    # normalisation and CC½ resolution filter, which fail on so few
    # reflections
    every = [r for name in results for r in results[name][2]]
    assert [r for r in records if "normalise the intensities" in r.getMessage()]
    assert [r for r in every if "CC½ resolution filter failed" in r.getMessage()]
    assert not [r for r in every if r.exc_info], "a traceback in the log"
    # all 60 images, and the wedges as integrated now: all data kept
    for name in ("complete_kept", "gapped", "complete"):
        resolution = results[name][0]["resolution"]
        assert resolution["d_min"] is None, (name, resolution)
        scaled = gemmi.read_mtz_file(str(tmp_path / name / "scaled.mtz"))
        assert scaled.resolution_high() < 1.01 * resolution["d_min_data"], name
    # the files SHELX reads (shelx=True, all 60 images): the reflections of
    # scaled.mtz; the one cell, its esds as refined (reindexed by a,b,c),
    # none for the angles the space group fixes
    files = {f["name"]: f for f in results["complete"][3]}
    hkl = [line for line in open(tmp_path / "complete" / "scaled.hkl") if line[:12].split() != ["0", "0", "0"]]
    assert files["scaled.hkl"]["reflections"] == files["scaled.mtz"]["reflections"] == len(hkl) == scaled.nreflections
    ins = {line.split()[0]: [float(v) for v in line.split()[1:]]
           for line in open(tmp_path / "complete" / "scaled.ins") if line.startswith(("CELL", "ZERR"))}
    assert ins["CELL"][1:] == pytest.approx(list(scaled.cell.parameters), abs=1e-4)
    assert results["complete"][0]["symmetry"]["cb_op"] == "a,b,c"
    final = _summary(ours["complete"])["crystal"]["final"]
    assert ins["ZERR"][1:4] == pytest.approx(final["unit_cell_esd"][:3], abs=1e-4)
    assert ins["ZERR"][4:] == [0, 0, 0]  # an orthorhombic Laue group (measured: P m m m)
    # all 60 images as integrated once (tests/data/l_cysteine_wedges/complete,
    # with the rows DIALS' predictor repeated at scan ends): DIALS' physical
    # model (dials.scale's choice) diverges (measured: 63 scale factors below
    # 0.001, 54 of 117 kept, factors -3.2 to 21.6), so the run scales with KB,
    # said as a warning: every observation above the partiality cut-off
    # scaled, by factors near one
    scaling, warnings, _, auto_files, joint = results["complete_auto"]
    model = scaling["model"]
    assert model["requested"] == "auto" and model["used"] == "KB", model
    assert model["replaced"]["used"] == "physical" and model["replaced"]["small_scales"] > 10, model
    assert model["small_scales"] == 0, model
    assert any("scaling model (physical) diverged" in w and "scaled with KB" in w for w in warnings), warnings
    good = ~joint.get_flags(joint.flags.bad_for_scaling, all=False)
    above = joint["partiality"] >= 0.4
    assert good.count(True) == (above & good).count(True) == above.count(True) == model["kept"] > 100, model
    assert model["replaced"]["kept"] < 0.6 * model["kept"], model
    factors = np.array(joint["inverse_scale_factor"].select(good))
    assert 0.1 < factors.min() and factors.max() < 10, (factors.min(), factors.max())
    assert scaling["cc_half"][0] > 0.99, scaling["cc_half"]
    assert {f["name"]: f for f in auto_files}["scaled.mtz"]["reflections"] == model["kept"]
    # scaling.model=physical keeps DIALS' model as it came out
    experiments = ExperimentListFactory.from_json_file(os.path.join(kept, "complete", "integrated.expt"),
                                                       check_format=False)
    reflections = flex.reflection_table.from_file(os.path.join(kept, "complete", "integrated.refl"))
    _, record = scale(experiments, reflections, params_from(["scale=True", "scaling.model=physical"]), None)
    assert record.scaling["model"] == {"requested": "physical", **model["replaced"]}
    # and says so, not only in the counts
    said = [w for w in record.warnings if "left out" in w and "scale factor came out below 0.001" in w]
    assert len(said) == 1 and f"left out {model['replaced']['small_scales']} observations" in said[0], record.warnings
    # all 60 images as integrated now (each reflection once per block): DIALS'
    # physical model does not diverge, and keeps as many observations
    scaling, _, _, _, joint = results["complete"]
    now = scaling["model"]
    assert now["used"] == "physical" and now["small_scales"] == 0 and "replaced" not in now, now
    good = ~joint.get_flags(joint.flags.bad_for_scaling, all=False)
    above = joint["partiality"] >= 0.4
    assert good.count(True) == above.count(True) == now["kept"] > 100, now
    factors = np.array(joint["inverse_scale_factor"].select(good))
    assert 0.1 < factors.min() and factors.max() < 10, (factors.min(), factors.max())
    assert scaling["cc_half"][0] > 0.99, scaling["cc_half"]
    assert files["scaled.mtz"]["reflections"] == now["kept"]


@pytest.mark.slow

def test_a_block_the_scaler_removes_is_said(tmp_path):
    """The wedges without images 6-7 of sweep 2 and 10 of sweep 4, as
    integrated once (tests/data/l_cysteine_wedges/block_left_out): the last
    block, images 11-15 of sweep 4, shares no reflection with the others and
    DIALS' scaler removes it ("Removed datasets: [5]" in its log only).  The
    run says which block is in none of the scaled files, in a warning and in
    the JSON's scaling.blocks_left_out."""
    import gemmi
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.handlers.outputs import Outputs
    from dials_gapfill.model.state import block_names
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages.scaling import scale

    folder = os.path.join(ROOT, "tests", "data", "l_cysteine_wedges", "block_left_out")
    experiments = ExperimentListFactory.from_json_file(os.path.join(folder, "integrated.expt"), check_format=False)
    reflections = flex.reflection_table.from_file(os.path.join(folder, "integrated.refl"))
    assert [e.scan.get_image_range() for e in experiments] == [(1, 15), (1, 5), (8, 15), (1, 15), (1, 9), (11, 15)]
    identifiers = list(experiments.identifiers())
    params = params_from(["scale=True", "shelx=True", f"output.directory={tmp_path}"])
    outputs = Outputs(str(tmp_path))
    outputs.check_writable()
    (scaled, joint), record = scale(experiments, reflections, params, outputs, names=block_names(experiments))
    outputs.commit()
    assert record.scaling["blocks_left_out"] == [6]
    assert record.scaling["blocks"] == 5
    assert list(scaled.identifiers()) == identifiers[:5]
    assert set(joint.experiment_identifiers().values()) == set(identifiers[:5])
    said = [w for w in record.warnings if "left out of the scaled data" in w]
    assert len(said) == 1 and said[0].startswith("Block 6 (images 11-15): "), record.warnings
    assert "scaled.mtz, merged.mtz, scaled.hkl" in said[0]
    # scaled.mtz: a batch for every image of the five blocks kept, none of the sixth
    mtz = gemmi.read_mtz_file(str(tmp_path / "scaled.mtz"))
    assert len(mtz.batches) == 15 + 5 + 8 + 15 + 9


def test_cc_half_over_fewer_than_three_reflections_is_not_a_number(tmp_path):
    """The wedges as integrated once (tests/data/l_cysteine_wedges/gapped),
    scaled: in shells where one or two reflections were measured more than
    once iotbx reports CC½ 0 (one) or +-1 (two, whatever the data); they are
    left out (null), the overall CC½ stays."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.handlers.outputs import Outputs
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages.scaling import scale

    folder = os.path.join(ROOT, "tests", "data", "l_cysteine_wedges", "gapped")
    experiments = ExperimentListFactory.from_json_file(os.path.join(folder, "integrated.expt"), check_format=False)
    reflections = flex.reflection_table.from_file(os.path.join(folder, "integrated.refl"))
    outputs = Outputs(str(tmp_path))
    outputs.check_writable()
    _, record = scale(experiments, reflections, params_from(["scale=True", f"output.directory={tmp_path}"]), outputs)
    shells = record.scaling["shells"]
    assert all(s["n_obs"] - s["n_unique"] >= 3 for s in shells if s["cc_half"] is not None), shells
    assert any(s["cc_half"] is None and 0 < s["n_obs"] - s["n_unique"] < 3 for s in shells), shells
    assert record.scaling["cc_half"][0] > 0.9
    assert not [w for w in record.warnings if "hardly agree" in w]


@pytest.mark.parametrize("image,spots_enough,model", [(1, True, "continuous"), (14, True, "continuous"),
                                                      (14, False, "per_block")])
def test_a_sweep_of_one_image_among_whole_ones(l_cysteine, image, spots_enough, model):
    """Sweeps 1 and 3 whole and one image of sweep 2: 7 strong spots on image
    1, 4 on image 14.  Outlier rejection in one distribution with the other
    sweeps would leave it fewer than DIALS needs for its orientation (5 per
    parameter): its spots are kept unjudged; with 4 spots in all DIALS
    refuses that orientation.  The continuous model refines it on 3 per
    parameter (base.FEWEST_NREF_PER_PARAMETER); the per-block model keeps
    it as indexing gave it, said once.  The one cell stays within 0.1 % of
    the complete sweeps' cell.  The
    per-block model searches for the lattice in all blocks jointly when
    there are several sweeps (on sweep 1's block alone, its crystal indexed
    14 % of sweep 3's spots: refused as another crystal)."""
    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages import refinement

    files = _files(l_cysteine, 1) + [os.path.join(l_cysteine, f"l-cyst_02_{image:05d}.cbf.bz2")] + _files(l_cysteine, 3)
    state = pipeline.Pipeline(params_from(["nproc=1", f"refinement.blocks.model={model}"]), files).run(
        stop_before="refinement")
    assert [(s.number, s.image_range) for s in state.sweeps] == [(1, (1, 15)), (2, (image, image)), (3, (1, 15))]
    one = [e for e in state.experiments if e.scan.get_image_range() == (image, image)]
    assert len(one) == 1
    before = one[0].crystal.get_U()
    record = refinement.run(state)
    too_few = [w for w in record.warnings if "too few spots to refine the orientation" in w]
    one = [e for e in state.experiments if e.scan.get_image_range() == (image, image)][0]
    moved = max(abs(a - b) for a, b in zip(before, one.crystal.get_U()))
    if spots_enough:
        assert not too_few and moved > 1e-6, (record.warnings, moved)
    else:
        assert too_few == ["sweep(s) 2: too few spots to refine the orientation (DIALS' auto_reduction): kept as "
                           "indexing gave it"], record.warnings
        assert moved < 1e-9, moved
    cell = state.experiments[0].crystal.get_unit_cell().parameters()
    assert _cell_error(cell) < 0.001, cell


@pytest.mark.slow
def test_a_sweep_that_keeps_no_spot_after_re_indexing(l_cysteine, caplog):
    """Sweeps 1 and 3 whole and image 6 of sweep 2 (2 strong spots): its
    orientation stays as indexing gave it; re-indexed against the
    scan-varying model, the sweep kept none of its spots, and DIALS' refiner
    stopped on an experiment without observations ("min() argument is an
    empty array").  The sweep keeps the indexing of the job before.  Sweeps
    1 and 3 alone index to a cell 0.8 % from the complete sweeps' (DIALS'
    joint indexing; the run then stops at integration, 47 indexed spots):
    refined, the cell comes within 0.5 %."""
    import logging

    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from

    files = _files(l_cysteine, 1) + [os.path.join(l_cysteine, "l-cyst_02_00006.cbf.bz2")] + _files(l_cysteine, 3)
    with caplog.at_level(logging.INFO, logger="dials.process_gapped"):
        state = pipeline.Pipeline(params_from(["nproc=1"]), files).run(stop_before="integration")
    assert [(s.number, s.image_range) for s in state.sweeps] == [(1, (1, 15)), (2, (6, 6)), (3, (1, 15))]
    assert [w for w in state.report.warnings if "too few spots" in w] == [
        "sweep(s) 2: too few spots to refine the orientation (DIALS' auto_reduction): kept as indexing gave it"]
    assert "sweep(s) 2 kept no spot for refinement: their indexing before stands" in caplog.text
    assert {state.sweeps.sweep_of(e).number for e in state.experiments} == {1, 2, 3}
    cell = state.experiments[0].crystal.get_unit_cell().parameters()
    assert _cell_error(cell) < 0.005, cell
    # a block none of whose spots refinement kept has no RMSDs (the JSON
    # schema's rmsd is an object), not null ones
    rmsds = [(b.stats.get("images"), key, b.stats[key]) for b in state.report.blocks
             for key in ("rmsd_static", "rmsd_scan_varying") if key in b.stats]
    assert rmsds and all(r is not None for _, _, r in rmsds), rmsds


@pytest.mark.slow
def test_a_sweep_left_without_blocks_keeps_the_others_numbers(l_cysteine, caplog):
    """Sweep 2 as images 1-2 with gaps.min_block_images=3: its one block is
    dropped at import and the sweep has none.  The crystal model's lines
    name the other sweeps by the run's numbers, not by their position among
    the sweeps with blocks (sweep 4, whose spots outlier rejection leaves
    too few, was called sweep 3)."""
    import logging
    import re

    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from

    with caplog.at_level(logging.INFO, logger="dials.process_gapped"):
        state = pipeline.Pipeline(params_from(["nproc=1", "exclude_images=2:3:15", "gaps.min_block_images=3"]),
                                  _files(l_cysteine)).run(stop_before="integration")
    assert [state.sweeps.sweep_of(e).number for e in state.experiments] == [1, 3, 4]
    assert [(d["sweep"], d["first"], d["last"]) for d in state.report.dropped_blocks] == [(2, 1, 2)]
    assert re.search(r"Sweep 4: \d+ of its spots left by outlier rejection", caplog.text), caplog.text[-3000:]
    for k, sweep in enumerate((1, 3, 4), start=1):
        assert f"Block {k} (images 1-15 of sweep {sweep}): RMSD x" in caplog.text


@pytest.mark.slow
def test_a_sweep_of_two_images_is_oriented_not_fixed(l_cysteine):
    """Images 1-2 of sweep 1 (12 strong spots) with sweeps 2-4 whole.  In the
    last scan-varying job outlier rejection leaves sweep 1 four spots, fewer
    than DIALS wants for its orientation (5 per parameter).  Fixed as the job
    before left it, those four pulled the one cell to 0.16 % from the
    complete sweeps' (c: 12.0419 A); the orientation refined on 3 per
    parameter, 0.05 % (sweeps 2-4 alone: 0.04 %)."""
    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from

    files = _files(l_cysteine, 1)[:2] + _files(l_cysteine, 2) + _files(l_cysteine, 3) + _files(l_cysteine, 4)
    state = pipeline.Pipeline(params_from(["nproc=1"]), files).run(stop_before="integration")
    assert [(s.number, s.image_range) for s in state.sweeps] == [(1, (1, 2)), (2, (1, 15)), (3, (1, 15)), (4, (1, 15))]
    assert not [w for w in state.report.warnings if "too few spots" in w], state.report.warnings
    cell = state.experiments[0].crystal.get_unit_cell().parameters()
    assert _cell_error(cell) < 0.001, cell


@pytest.mark.slow
@pytest.mark.parametrize("model", ["continuous", "per_block"])
def test_a_sweep_of_single_image_blocks(l_cysteine, tmp_path, model):
    """exclude_images=1:2:14 leaves sweep 1 as images 1 and 15: every spot of
    it cut by a gap.  Indexing: in a lattice search without such spots and
    indexed afterwards against the crystal of the other sweeps, it was
    predicted only as well as the headers give its goniometer setting (1 of
    35 spots: refused as another crystal); its spots join the search, and
    both its blocks index as the other sweeps do.  Integration: DIALS'
    integrate leaves out a block none of whose reference spots matched a
    prediction (its image was then neither used nor listed as excluded); it
    is integrated on its own by summation.  A block MTZ with no reflection
    above the partiality threshold is not written, and said so."""
    import gemmi

    out = str(tmp_path / "out")
    os.makedirs(out)
    for n in (1, 2, 9):  # an earlier run's block MTZs (it had 9 blocks or more)
        with open(os.path.join(out, f"integrated_{n}.mtz"), "w") as fh:
            fh.write("old")
    process_ok(l_cysteine, out, "exclude_images=1:2:14", f"refinement.blocks.model={model}")
    summary = _summary(out)
    blocks = [(b["sweep"], b["first"], b["last"]) for b in summary["blocks"]]
    assert blocks == [(1, 1, 1), (1, 15, 15), (2, 1, 15), (3, 1, 15), (4, 1, 15)]
    assert min(b["indexed_fraction"] for b in summary["blocks"]) >= 0.5, summary["blocks"]
    assert all(b["integrated"] > 0 for b in summary["blocks"]), summary["blocks"]
    # every image used or listed
    assert summary["totals"]["images_used"] + len(summary["excluded_images"]) == 60
    # the per-block model's cells are each block's own (measured: 0.18 %)
    assert _cell_error(summary["crystal"]["final"]["unit_cell"]) < (0.001 if model == "continuous" else 0.003)
    batches = {b.number for b in gemmi.read_mtz_file(os.path.join(out, "integrated.mtz")).batches}
    assert {1, 15} <= batches
    for n in (1, 2):
        path = os.path.join(out, f"integrated_{n}.mtz")
        written = [f for f in summary["files"] if f["name"] == f"integrated_{n}.mtz"]
        if written:
            assert gemmi.read_mtz_file(path).nreflections == written[0]["reflections"] > 0
        else:  # not written by this run: said, and no earlier file left with its name
            assert any(f"integrated_{n}.mtz not written" in w for w in summary["warnings"]), summary["warnings"]
            assert not os.path.exists(path)
    # no block MTZ beyond this run's five blocks is left beside its own; a
    # sweep's MTZ holds its blocks' reflections
    assert not os.path.exists(os.path.join(out, "integrated_9.mtz"))
    assert sorted(f for f in os.listdir(out) if f.startswith("integrated_")) == sorted(
        f["name"] for f in summary["files"] if f["kind"] in ("block mtz", "sweep mtz"))
    sweeps = {f["sweep"]: f["reflections"] for f in summary["files"] if f["kind"] == "sweep mtz"}
    blocks = {f["block"]: f["reflections"] for f in summary["files"] if f["kind"] == "block mtz"}
    assert [sweeps[s] for s in (2, 3, 4)] == [blocks[b] for b in (3, 4, 5)]
    if 1 in blocks or 2 in blocks:
        assert sweeps[1] == blocks.get(1, 0) + blocks.get(2, 0)
    else:
        assert 1 not in sweeps and any("integrated_sweep1.mtz not written" in w for w in summary["warnings"])


@pytest.mark.slow
def test_two_wedges_the_static_crystal_indexes_its_spots(l_cysteine):
    """Sweeps 1 and 3 alone: their scan-varying jobs move the beam (6.8 deg
    in the spindle plane, DIALS' beam parameters as dials.refine has them)
    and the orientation with it.  DIALS reads each block's static crystal
    where it needs one for the block (dials.integrate's masking of a
    neighbour's pixels in the reference spots): left at the static job's
    orientation it indexed 0 of 36 spots, every reference pixel was masked
    and no profile model was made ("only 0 indexed strong spots").  Each
    block's static crystal indexes its spots as its scan points do, and with
    DIALS' minimum of spots lowered below the 47 there are, the blocks are
    integrated with profiles."""
    from dials.algorithms.spot_prediction import PixelToMillerIndex

    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages import integration

    files = _files(l_cysteine, 1) + _files(l_cysteine, 3)
    params = params_from(["nproc=1", "profile.gaussian_rs.min_spots.overall=40"])
    state = pipeline.Pipeline(params, files).run(stop_before="integration")
    table = state.reflections
    for i, exp in enumerate(state.experiments):
        assert exp.crystal.num_scan_points == 16
        static = PixelToMillerIndex(exp.beam, exp.detector, exp.goniometer, exp.scan, exp.crystal)
        mine = table.select((table["id"] == i) & table.get_flags(table.flags.indexed))
        assert len(mine) >= 15
        off = [max(abs(a - b) for a, b in zip(static.h(p, x, y, z), hkl))
               for p, (x, y, z), hkl in zip(mine["panel"], mine["xyzobs.px.value"], mine["miller_index"])]
        assert sum(d < 0.25 for d in off) >= 0.9 * len(off), sorted(off)
    integration.run(state)
    done = state.reflections.select(state.reflections.get_flags(state.reflections.flags.integrated_prf))
    assert len(done) >= 50, len(done)
    assert set(done["id"]) == {0, 1}


@pytest.mark.slow
@pytest.mark.parametrize("sweep,image,dropped", [(2, 11, ()), (3, 3, ()), (4, 3, ()), (4, 7, ()), (4, 11, ())])
def test_one_image_left_out_of_a_later_sweep(l_cysteine, sweep, image, dropped):
    """One image missing in sweep 2, 3 or 4 (benchmarks/l_cysteine_gaps.py).
    Each of these stopped with defaults, the DIALS chain's dials.index
    crashing on (4, 3) as well:
    - (2, 11): a refinement macro-cycle of DIALS' joint indexing failed, and
      DIALS' indexer deleted its last experiment (sweep 4) and went on; the
      lattice search on the spots of all 4 sweeps came back with 3
      ("IndexError: Index out of range").  Such a search now counts as failed.
    - (4, 3): the lattice search without the spots cut by the gap failed and
      the search with all spots indexed them; they were then indexed again
      against that model's predictions, 4 of 16 found, and sweep 4 fell
      below the reflections DIALS needs to refine its detector.
    - (3, 3): images 1-2 of sweep 3 index too few spots (all their spots
      are cut by the gap: indexed against the predictions of the lattice
      search's model, 1 of 9 found).  Dropped, the spots table of the other
      blocks kept the old image-set numbers, so sweep 3 had no reflections
      in refinement.  The block is judged on the spots the lattice search
      could judge, and kept.
    - (4, 11): 14 of sweep 4's 27 indexed spots are neither cut by the gap
      nor by the scan's ends, and only theirs had a phi that counted: the
      sweep's orientation went astray, its spots were outliers and the cell's
      esds came out 30-150 times smaller than in every other run.
    - (4, 7): sweep 4 has fewer spots not cut by the gap than DIALS' outlier
      rejection judges on their own, so all sweeps were judged in one
      distribution, in which sweep 4 (a phi RMSD of ~0.5 images against
      0.1-0.3 in the others) kept 8 of 26 and its detector could no longer
      be refined.  A sweep left fewer spots than an orientation asks (15)
      keeps its spots not cut by a gap."""
    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from

    files = [f for f in _files(l_cysteine) if not f.endswith(f"l-cyst_{sweep:02d}_{image:05d}.cbf.bz2")]
    state = pipeline.Pipeline(params_from(["nproc=1"]), files).run(stop_before="integration")
    report = state.report
    excluded = sorted((e.get("sweep"), e["image"], e["status"]) for e in report.excluded)
    assert excluded == sorted([(sweep, image, "not given")] +
                              [(sweep, n, "dropped") for n in dropped]), excluded
    # every sweep refined with the one crystal, its cell within 0.1 % of the
    # complete sweeps' (measured 0.06 % at worst over 14 ways of leaving
    # images out; 0.02 % with none)
    sweeps_of_blocks = {state.sweeps.sweep_of(e).number for e in state.experiments}
    assert sweeps_of_blocks == {1, 2, 3, 4}
    cells = [e.crystal.get_unit_cell().parameters() for e in state.experiments]
    assert np.ptp(np.array(cells), axis=0).max() < 1e-6
    assert _cell_error(cells[0]) < 0.001, cells[0]
    # esds as the other runs give them (5e-4 to 1.2e-3 A for a, b)
    esd = report.crystal["cell_esd"]
    assert all(2e-4 < e < 5e-3 for e in esd[:3]), esd
    table = state.reflections
    used = table.get_flags(table.flags.used_in_refinement)
    for i, exp in enumerate(state.experiments):
        assert exp.crystal.num_scan_points == exp.scan.get_num_images() + 1
    for s in (1, 2, 3, 4):
        mine = flex_sum(used, table["id"], [i for i, e in enumerate(state.experiments)
                                           if state.sweeps.sweep_of(e).number == s])
        assert mine >= 5, (s, mine)
    assert set(table["imageset_id"]) == set(range(len(state.experiments)))


@pytest.mark.slow
def test_blocks_of_two_images_between_gaps_are_kept(l_cysteine, tmp_path):
    """Images 4 and 7 of sweep 1 and 6 and 9 of sweep 3 left out: blocks 5-6
    and 7-8 between two gaps.  All 14 spots of images 7-8 of sweep 3 are cut
    by a gap, left out of the lattice search and matched to the unrefined
    crystal's predictions (their phi a fraction of an image off): 2 of 14.
    Counted against all 14 (14 %, below indexing.blocks.min_indexed_fraction)
    the block was dropped; it is judged on the spots the search could judge,
    kept, and integrated."""
    gone = {(1, 4), (1, 7), (3, 6), (3, 9)}
    d = tmp_path / "images"
    d.mkdir()
    for f in _files(l_cysteine):
        name = os.path.basename(f)
        if (int(name[8]), int(name[10:15])) not in gone:
            os.symlink(f, d / name)
    out = str(tmp_path / "out")
    process_ok(str(d), out)
    summary = _summary(out)
    blocks = [(b["sweep"], b["first"], b["last"]) for b in summary["blocks"]]
    assert blocks == [(1, 1, 3), (1, 5, 6), (1, 8, 15), (2, 1, 15), (3, 1, 5), (3, 7, 8), (3, 10, 15), (4, 1, 15)]
    assert summary["dropped_blocks"] == []
    assert sorted((e["sweep"], e["image"], e["status"]) for e in summary["excluded_images"]) == \
        sorted((s, n, "missing file") for s, n in gone)
    assert all(b["integrated"] > 0 for b in summary["blocks"]), summary["blocks"]
    # the cell as close as with one image left out (0.06 % at worst)
    assert _cell_error(summary["crystal"]["final"]["unit_cell"]) < 0.001, summary["crystal"]["final"]


@pytest.mark.slow
def test_the_orthorhombic_lattice_of_four_sweeps_with_gaps(l_cysteine, caplog):
    """indexing.bravais_lattice=auto on the four sweeps with images 6-7 of
    sweep 1 and 10 of sweep 3 left out: DIALS' Bravais settings recommend
    oP (L-cysteine is P2(1)2(1)2(1)); every sweep's crystal keeps the one
    cell, its angles 90 deg, its lengths within 0.1 % of the complete
    sweeps' (measured 0.046-0.058 %).  The one cell is tied through DIALS'
    equal-shift constraints on the parameters the lattice has (3 in oP):
    a constraint on one it lacks made DIALS warn 12 times."""
    import logging

    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from

    files = [f for f in _files(l_cysteine)
             if not any(f.endswith(f"l-cyst_{s:02d}_{n:05d}.cbf.bz2") for s, ns in LEFT_OUT.items() for n in ns)]
    assert len(files) == 57
    with caplog.at_level(logging.INFO):
        state = pipeline.Pipeline(params_from(["nproc=1", "indexing.bravais_lattice=auto"]), files).run(
            stop_before="integration")
    assert state.report.crystal["bravais_lattice"].startswith("oP"), state.report.crystal["bravais_lattice"]
    assert {state.sweeps.sweep_of(e).number for e in state.experiments} == {1, 2, 3, 4}
    cells = np.array([e.crystal.get_unit_cell().parameters() for e in state.experiments])
    assert np.ptp(cells, axis=0).max() < 1e-6
    assert cells[0][3:] == pytest.approx([90, 90, 90], abs=1e-9)
    assert _cell_error(cells[0]) < 0.001, cells[0]
    assert "No pair of parameters to link by constraint" not in caplog.text


def flex_sum(flags, ids, experiments):
    """Rows flagged in `flags` whose id is one of `experiments`."""
    return sum(int((flags & (ids == i)).count(True)) for i in experiments)


@pytest.mark.slow
@pytest.mark.parametrize("left_out,blocks,cell_tolerance", [
    ({4: (7,)}, [[(1, 15)], [(1, 15)], [(1, 15)], [(1, 6), (8, 15)]], 0.001),
    ({2: (6, 7), 4: (10,)}, [[(1, 15)], [(1, 5), (8, 15)], [(1, 15)], [(1, 9), (11, 15)]], 0.001),
    # (its static cell: 0.19 %, 0.20 % with that block's spots all flagged)
    ({2: (6, 7)}, [[(1, 15)], [(1, 5), (8, 15)], [(1, 15)], [(1, 15)]], 0.0025),
])
def test_per_block_model_with_sweeps_split_into_small_blocks(l_cysteine, left_out, blocks, cell_tolerance):
    """The per-block model where sparse sweeps are split into blocks of 7-19
    spots: DIALS' joint indexing of the blocks fails (its indexer deletes its
    last experiment), and the lattice search on each sweep's blocks joined
    into one scan indexes every block with one crystal.  Judged block by
    block, DIALS' outlier rejection would flag every spot of a block below
    its minimum of 20: a sweep of such blocks then kept a detector no spot
    held while the shared beam moved (without images 6-7 of sweep 2 and 10
    of sweep 4, sweeps 2 and 4 predicted 7-384 px off, their blocks
    integrated with <I/sigma> 0.0-5.8).  The static jobs judge the spots
    sweep by sweep: every block keeps spots, refined to RMSDs below a pixel,
    nothing is fixed for too few spots, and the one cell stays within 0.1 %
    of the complete sweeps' (where measured so).  Where only some of a sweep's blocks are below
    that minimum (without images 6-7 of sweep 2: its block 1-5 of 10 spots),
    those blocks' spots are judged with their sweep and the others block by
    block (that block had kept no spot, and no reference spot for profile
    fitting)."""
    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from

    files = [f for f in _files(l_cysteine)
             if int(f[-13:-8]) not in left_out.get(int(os.path.basename(f)[8]), ())]
    state = pipeline.Pipeline(params_from(["nproc=1", "refinement.blocks.model=per_block"]), files).run(
        stop_before="integration")
    report = state.report
    assert [sweep.blocks() for sweep in state.sweeps] == blocks
    assert not [w for w in report.warnings if "too few spots to refine" in w], report.warnings
    static = report.crystal["static"]["unit_cell"]
    assert _cell_error(static) < cell_tolerance, static
    table = state.reflections
    used = table.get_flags(table.flags.used_in_refinement)
    for i, exp in enumerate(state.experiments):
        rmsd = report.find_block(exp.identifier).stats.get("rmsd_static")
        assert rmsd and rmsd["n"] >= 5 and rmsd["x"] < 1 and rmsd["y"] < 1 and rmsd["phi"] < 1, (i, rmsd)
        assert (used & (table["id"] == i)).count(True) >= 5


@pytest.mark.slow
def test_the_small_molecule_example_file_on_the_wedges(l_cysteine, tmp_path):
    """phil/high_mosaicity.phil, offered for small molecules, on the four
    wedges as a user runs it: one crystal over the four sweeps, its cell as
    close to the reference as with the defaults, and summation intensities
    (no profile-fitted rows) in an MTZ of every block."""
    import gemmi

    out = str(tmp_path / "out")
    process_ok(os.path.join(ROOT, "phil", "high_mosaicity.phil"), out, f"images={l_cysteine}")
    summary = _summary(out)
    assert [(b["sweep"], b["first"], b["last"]) for b in summary["blocks"]] == [(s, 1, 15) for s in (1, 2, 3, 4)]
    assert _cell_error(summary["crystal"]["final"]["unit_cell"]) < 0.0005, summary["crystal"]["final"]
    assert summary["totals"]["indexed"] > 0.75 * summary["totals"]["spots"], summary["totals"]
    from dials.array_family import flex

    reflections = flex.reflection_table.from_file(os.path.join(out, "integrated.refl"))
    assert reflections.get_flags(reflections.flags.integrated_sum).count(True) > 200
    assert reflections.get_flags(reflections.flags.integrated_prf).count(True) == 0
    mtz = gemmi.read_mtz_file(os.path.join(out, "integrated.mtz"))
    assert mtz.nreflections > 90 and sorted(set(mtz.column_with_label("BATCH").array // 100)) == [0, 1, 2, 3]
