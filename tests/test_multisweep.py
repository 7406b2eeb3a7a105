"""Several sweeps of one crystal, each with gaps, in one run: import (which
images make a sweep, exclusions by sweep, refusals), then a whole run on three
simulated sweeps at different kappa settings against the simulator's truth and
against the same images without gaps, processed the same way."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import process_ok, summation_against_truth

# 3 sweeps of 30 x 1 deg (Pilatus 300K) at kappa settings (0, 0), (40, 120), (-40, 240)
MULTI = dict(n_images=30, osc_width=1.0, detector="pilatus300k", distance=150.0, seed=42)
# what each sweep leaves out: every 10th image, a 3-image gap, one image
OMIT = {1: (10, 20, 30), 2: (14, 15, 16), 3: (21,)}
BLOCKS = [(1, 1, 9), (1, 11, 19), (1, 21, 29), (2, 1, 13), (2, 17, 30), (3, 1, 20), (3, 22, 30)]


@pytest.fixture(scope="session")
def three_sweeps(tmp_path_factory):
    """(complete folder, gapped folder, truth): the gapped folder links the files kept."""
    from dials_gapfill.simulation.multisweep import MultiSweepConfig, simulate_sweeps
    from dials_gapfill.simulation.simulate import SimulationConfig

    complete = str(tmp_path_factory.mktemp("three_sweeps"))
    truth = simulate_sweeps(MultiSweepConfig(base=SimulationConfig(**MULTI), goniometer="kappa", n_sweeps=3),
                            complete)
    gapped = str(tmp_path_factory.mktemp("three_sweeps_gapped"))
    for name in sorted(os.listdir(complete)):
        if not name.endswith(".cbf"):
            continue
        sweep, image = int(name[4:6]), int(name[7:11])
        if image not in OMIT[sweep]:
            os.symlink(os.path.join(complete, name), os.path.join(gapped, name))
    return complete, gapped, truth


def _import(*phil, positional=()):
    from dials_gapfill.model.state import Report
    from dials_gapfill.phil import working_params
    from dials_gapfill.stages.importer import import_images

    report = Report()
    sweeps, record = import_images(working_params("\n".join(phil)), list(positional))
    experiments = sweeps.experiments()
    report.sync(sweeps, experiments)
    report.merge(record)
    return sweeps, experiments, report


def test_one_sweep_per_template_with_its_goniometer_setting(three_sweeps):
    _, gapped, truth = three_sweeps
    sweeps, experiments, report = _import(positional=[gapped])
    assert [(sweeps.sweep_of(e).number, *e.scan.get_image_range()) for e in experiments] == BLOCKS
    assert [s["number"] for s in report.sweeps] == [1, 2, 3]
    assert [s["batch_offset"] for s in report.sweeps] == [0, 100, 200]
    # one beam and one detector (one position); each sweep its own goniometer,
    # shared by its blocks, with the setting the files say
    assert len(experiments.beams()) == len(experiments.detectors()) == 1
    assert len(experiments.goniometers()) == 3
    for sweep, expected in zip(sweeps, truth["sweeps"]):
        blocks = sweep.experiments()
        assert all(e.goniometer is blocks[0].goniometer for e in blocks)
        S = np.array(blocks[0].goniometer.get_setting_rotation())
        assert np.allclose(S, np.array(expected["setting_rotation"]).ravel(), atol=1e-6)
    # images not used, with their sweep
    missing = sorted((e["sweep"], e["image"]) for e in report.excluded)
    assert missing == sorted((s, n) for s, images in OMIT.items() for n in images if n != 30)


def test_exclusions_name_their_sweep(three_sweeps):
    from dials_gapfill.errors import GapfillError

    _, gapped, _ = three_sweeps
    sweeps, experiments, report = _import("gaps.exclude_images=2:5:6,3:30:30", positional=[gapped])
    blocks = [(sweeps.sweep_of(e).number, *e.scan.get_image_range()) for e in experiments]
    assert (2, 1, 4) in blocks and (2, 7, 13) in blocks and (3, 22, 29) in blocks
    assert {(e["sweep"], e["image"]) for e in report.excluded if e["by"] == "user"} == {(2, 5), (2, 6), (3, 30)}
    with pytest.raises(GapfillError, match=r"does not say which of the 3 sweeps: write sweep:first:last"):
        _import("gaps.exclude_images=5:6", positional=[gapped])
    with pytest.raises(GapfillError, match="names sweep 4, but there are 3 sweeps"):
        _import("gaps.exclude_images=4:5:6", positional=[gapped])
    # a sweep is left out by leaving out its files, not by excluding all its images
    with pytest.raises(GapfillError, match=r"leaves no image of sweep 2 \(sim_02_####.cbf\): .* leave its files out"):
        _import("gaps.exclude_images=2:1:30", positional=[gapped])


def test_every_input_form_gives_the_same_sweeps(three_sweeps):
    """A folder, one glob or template per sweep, and image= ranges (xia2's
    form): the same three sweeps and blocks; two ranges of one template are
    one sweep with a gap, as one range with the images left out."""
    complete, gapped, _ = three_sweeps
    expected = BLOCKS
    forms = {
        "folder": ([gapped], ()),
        "globs": ([os.path.join(gapped, f"sim_0{s}_*.cbf") for s in (1, 2, 3)], ()),
        "templates": ([], [f"input.template={os.path.join(gapped, f'sim_0{s}_####.cbf')}" for s in (1, 2, 3)]),
        "image ranges": ([], [f"input.image={os.path.join(complete, f'sim_0{s}_0001.cbf')}:{a}:{b}"
                              for s, a, b in BLOCKS]),
    }
    for name, (positional, phil) in forms.items():
        sweeps, experiments, report = _import(*phil, positional=positional)
        assert [(sweeps.sweep_of(e).number, *e.scan.get_image_range()) for e in experiments] == expected, name
        assert [s["batch_offset"] for s in report.sweeps] == [0, 100, 200], name
        assert len(experiments.goniometers()) == 3, name


def test_one_nexus_file_per_sweep(tmp_path):
    """Two NeXus files, one sweep each (NXmx: one scan per file), with
    exclusions by sweep: two sweeps, their blocks and batch offsets."""
    from dials_gapfill.simulation.nexus_writer import simulate_nexus
    from dials_gapfill.simulation.simulate import SimulationConfig

    files = []
    for k, start in enumerate((0.0, 60.0)):
        config = SimulationConfig(n_images=8, osc_width=1.0, osc_start=start, detector="pilatus300k",
                                  distance=150.0, seed=42, prefix=f"w{k}")
        truth = simulate_nexus(config, str(tmp_path / f"s{k}"))
        files.append(os.path.join(tmp_path / f"s{k}", truth["files"][0]))
    sweeps, experiments, report = _import("gaps.exclude_images=1:4:4,2:6:7", positional=files)
    assert [(sweeps.sweep_of(e).number, *e.scan.get_image_range()) for e in experiments] == [
        (1, 1, 3), (1, 5, 8), (2, 1, 5), (2, 8, 8)]
    assert [e.scan.get_oscillation()[0] for e in experiments] == pytest.approx([0.0, 4.0, 60.0, 67.0])
    assert [s["batch_offset"] for s in report.sweeps] == [0, 100]
    assert {(e["sweep"], e["image"]) for e in report.excluded} == {(1, 4), (2, 6), (2, 7)}
    # one beam, one detector; same goniometer setting, so the sweeps differ by their scans only
    assert len(experiments.beams()) == len(experiments.detectors()) == 1


@pytest.mark.parametrize("override,said", [
    ("geometry.goniometer.angles=0,0,0",
     "geometry.goniometer.angles would give all 3 sweeps one goniometer setting, but the headers differ for "
     "sweeps 1 and 2 (GON_PHI 0.0, GON_KAPPA 0.0, GON_OMEGA scan; GON_PHI 120.0, GON_KAPPA 40.0, GON_OMEGA scan)"),
    ("geometry.goniometer.axis=-1,0,0",
     "geometry.goniometer.axis sets the axis of a single-axis goniometer, but the images of sweep 1 "
     "(sim_01_####.cbf) have a multi-axis one (GON_PHI, GON_KAPPA, GON_OMEGA): give geometry.goniometer.axes="),
])
def test_a_goniometer_override_that_would_erase_or_miss_the_settings_is_refused(three_sweeps, override, said):
    """dials.import gives every sweep the same angles (erasing the settings
    that tell the sweeps' orientations apart), and leaves a multi-axis
    goniometer's axes as they are when given a single axis, without a word."""
    from dials_gapfill.errors import GapfillError

    _, gapped, _ = three_sweeps
    with pytest.raises(GapfillError) as info:
        _import(override, positional=[gapped])
    assert str(info.value).startswith(said), str(info.value)


def test_a_sweep_at_another_wavelength_is_refused(tmp_path):
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    simulate(SimulationConfig(n_images=3, detector="pilatus300k", seed=1, prefix="a"), str(tmp_path))
    simulate(SimulationConfig(n_images=3, detector="pilatus300k", seed=1, prefix="b", wavelength=1.2), str(tmp_path))
    with pytest.raises(GapfillError, match=r"mixed wavelengths or beams: sweeps 1 \(a_####.cbf\) and 2 \(b_####.cbf\)"):
        _import(positional=[str(tmp_path)])


def test_a_sweep_on_another_detector_is_refused_a_moved_detector_is_not(tmp_path):
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    other = tmp_path / "other"
    simulate(SimulationConfig(n_images=3, detector="pilatus300k", seed=1, prefix="a"), str(other))
    simulate(SimulationConfig(n_images=3, detector="pilatus1m", seed=1, prefix="b"), str(other))
    with pytest.raises(GapfillError, match="mixed detectors: sweeps 1 .* and 2 .*: process each sweep separately"):
        _import(positional=[str(other)])
    moved = tmp_path / "moved"
    simulate(SimulationConfig(n_images=3, detector="pilatus300k", seed=1, prefix="a"), str(moved))
    simulate(SimulationConfig(n_images=3, detector="pilatus300k", seed=1, prefix="b", distance=250.0), str(moved))
    sweeps, experiments, _ = _import(positional=[str(moved)])
    assert len(sweeps) == 2 and len(experiments.detectors()) == 2 and len(experiments.beams()) == 1


# ---------------------------------------------------------------------------
# whole runs
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def multi_runs(three_sweeps, tmp_path_factory):
    """dials.process_gapped with defaults on the gapped sweeps (scale=True) and
    on the complete ones: {"gapped": folder, "complete": folder}."""
    complete, gapped, _ = three_sweeps
    out = {}
    for name, images, phil in (("gapped", gapped, ["scale=True"]), ("complete", complete, [])):
        folder = str(tmp_path_factory.mktemp(f"multi_{name}"))
        process_ok(images, folder, *phil)
        out[name] = folder
    return out


def _experiments(folder):
    from dxtbx.model.experiment_list import ExperimentListFactory

    return ExperimentListFactory.from_json_file(os.path.join(folder, "integrated.expt"), check_format=False)


def _summary(folder):
    with open(os.path.join(folder, "dials.process_gapped.json")) as fh:
        return json.load(fh)


@pytest.mark.slow
def test_one_crystal_across_three_sweeps_against_the_truth(multi_runs, three_sweeps):
    from dxtbx.model.experiment_list import ExperimentList

    from dials_gapfill.simulation import compare

    truth = three_sweeps[2]
    gapped, complete = _experiments(multi_runs["gapped"]), _experiments(multi_runs["complete"])
    assert [e.scan.get_image_range() for e in gapped] == [b[1:] for b in BLOCKS]
    # every block its slice of its sweep's scan-varying crystal
    for exp in gapped:
        assert exp.crystal.num_scan_points == exp.scan.get_num_images() + 1
    # the orientation at every image against the same sweeps without gaps,
    # one gauge rotation for all three sweeps (their relative orientations
    # count): within 1.25x; measured 1.05x in the median (0.0088 against
    # 0.0084 deg) and 1.04x at the worst image, on seeds 1 and 2 1.02/1.00x
    # and 1.11/1.08x (benchmarks/multisweep.py, docs/sweeps.md).  Each sweep
    # alone (its own gauge rotation removed) within 1.4x.
    errors, reference = compare.orientation_errors(gapped, truth), compare.orientation_errors(complete, truth)
    assert errors["median"] <= 1.25 * reference["median"], (errors["median"], reference["median"])
    assert errors["worst"] <= 1.25 * reference["worst"], (errors["worst"], reference["worst"])
    for sweep in (1, 2, 3):
        mine = ExperimentList([e for e in gapped if compare.sweep_of(e, truth) == sweep])
        ref = ExperimentList([e for e in complete if compare.sweep_of(e, truth) == sweep])
        e, r = compare.orientation_errors(mine, truth), compare.orientation_errors(ref, truth)
        assert e["median"] <= 1.4 * r["median"], (sweep, e["median"], r["median"])
    # one cell, near the truth
    for exp in gapped:
        assert compare.cell_error(exp.crystal, truth)["rel_error_max"] < 0.0005
    final = _summary(multi_runs["gapped"])["crystal"]["final"]
    assert max(final["cell_spread"][:3]) < 0.005


@pytest.mark.slow
def test_intensities_of_three_sweeps_against_the_truth(multi_runs, three_sweeps):
    from dials.array_family import flex

    truth = three_sweeps[2]
    r = flex.reflection_table.from_file(os.path.join(multi_runs["gapped"], "integrated.refl"))
    r = r.select(r.get_flags(r.flags.integrated_sum) & (r["partiality"] > 0.99))
    intensity, sigma, true = summation_against_truth(r, truth)
    ok = np.isfinite(true) & (intensity / sigma > 3)
    assert ok.sum() > 10000
    assert np.corrcoef(intensity[ok], true[ok])[0, 1] >= 0.999


@pytest.mark.slow
def test_mtz_batches_are_image_numbers_plus_the_sweep_offset(multi_runs):
    import gemmi

    folder = multi_runs["gapped"]
    summary = _summary(folder)
    offsets = {s["number"]: s["batch_offset"] for s in summary["sweeps"]}
    assert offsets == {1: 0, 2: 100, 3: 200}
    expected = {offsets[s] + n for s, first, last in BLOCKS for n in range(first, last + 1)}
    for name in ("integrated.mtz", "scaled.mtz"):
        mtz = gemmi.read_mtz_file(os.path.join(folder, name))
        batches = set(np.array(mtz.column_with_label("BATCH"), dtype=int))
        assert batches == expected, name
        assert sorted(b.number for b in mtz.batches) == sorted(expected)
    # a block's own MTZ: its images plus its sweep's offset
    for number, (s, first, last) in enumerate(BLOCKS, start=1):
        mtz = gemmi.read_mtz_file(os.path.join(folder, f"integrated_{number}.mtz"))
        mine = set(range(first + offsets[s], last + offsets[s] + 1))
        assert {b.number for b in mtz.batches} == mine, number
        assert mtz.nreflections > 100 and set(np.array(mtz.column_with_label("BATCH"), dtype=int)) <= mine
    # a sweep's own MTZ: all its blocks, the same batches; the three share
    # out the reflections of integrated.mtz
    def rows(mtz):
        return set(zip(*(np.array(mtz.column_with_label(c), dtype=int) for c in ("BATCH", "H", "K", "L"))))

    whole = rows(gemmi.read_mtz_file(os.path.join(folder, "integrated.mtz")))
    written = {f["sweep"]: f for f in summary["files"] if f["kind"] == "sweep mtz"}
    assert sorted(written) == [1, 2, 3]
    parts = []
    for s in (1, 2, 3):
        mtz = gemmi.read_mtz_file(os.path.join(folder, f"integrated_sweep{s}.mtz"))
        mine = {offsets[s] + n for t, first, last in BLOCKS if t == s for n in range(first, last + 1)}
        assert sorted(b.number for b in mtz.batches) == sorted(mine), s
        assert mtz.nreflections == written[s]["reflections"] > 1000
        parts.append(rows(mtz))
    assert sum(len(p) for p in parts) == len(whole)
    assert set().union(*parts) == whole


@pytest.mark.slow
def test_scaling_merges_all_sweeps(multi_runs):
    summary = _summary(multi_runs["gapped"])
    scaling = summary["scaling"]
    assert scaling["blocks"] == len(BLOCKS)
    assert scaling["symmetry"]["space_group"] == "P 21 21 21"
    assert scaling["cc_half"][0] > 0.99 and scaling["multiplicity"][0] > 2
    # DIALS' physical model, not diverged on 7 blocks of 9-20 images
    assert scaling["model"]["used"] == "physical" and scaling["model"]["small_scales"] == 0, scaling["model"]
    assert [b["sweep"] for b in summary["blocks"]] == [b[0] for b in BLOCKS]
    assert os.path.exists(os.path.join(multi_runs["gapped"], "merged.mtz"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["continuous", "per_block"])
def test_a_block_of_another_crystal_in_a_later_sweep_is_dropped(tmp_path, model):
    """Three sweeps of 12 images; images 9-12 of sweep 2 are of another
    crystal (the same cell, another orientation) behind a missing image 8.
    That block does not index on the one crystal and is dropped, named by
    its images and sweep; the rest goes to the MTZ (the continuous model: one cell),
    whose batches are the images kept plus their sweep's offset."""
    import dataclasses

    import gemmi

    from dials_gapfill.simulation.multisweep import MultiSweepConfig, default_sweeps, simulate_sweeps
    from dials_gapfill.simulation.simulate import SimulationConfig

    truths = {}
    for name, seed in (("ours", 7), ("other", 8)):
        base = SimulationConfig(n_images=12, osc_width=1.0, detector="pilatus300k", distance=150.0, seed=seed)
        settings = tuple(dataclasses.replace(s) for s in default_sweeps(3, "kappa"))
        truths[name] = simulate_sweeps(MultiSweepConfig(base=base, goniometer="kappa", sweeps=settings),
                                       str(tmp_path / name))
    images = tmp_path / "images"
    images.mkdir()
    for f in sorted(os.listdir(tmp_path / "ours")):
        if not f.endswith(".cbf"):
            continue
        sweep, image = int(f[4:6]), int(f[7:11])
        if (sweep, image) != (2, 8):
            source = "other" if sweep == 2 and image >= 9 else "ours"
            os.symlink(tmp_path / source / f, images / f)
    out = str(tmp_path / "out")
    process_ok(str(images), out, f"refinement.blocks.model={model}")

    summary = _summary(out)
    assert [(b["sweep"], b["first"], b["last"]) for b in summary["blocks"]] == [(1, 1, 12), (2, 1, 7), (3, 1, 12)]
    assert [(d["sweep"], d["first"], d["last"]) for d in summary["dropped_blocks"]] == [(2, 9, 12)]
    assert "indexed" in summary["dropped_blocks"][0]["reason"]
    assert sorted((e["sweep"], e["image"], e["status"]) for e in summary["excluded_images"]) == \
        [(2, 8, "missing file")] + [(2, n, "dropped") for n in range(9, 13)]
    # named by its images: the blocks after it are numbered anew (block 3 is
    # now images 1-12 of sweep 3)
    assert any(w.startswith("the block of images 9-12 of sweep 2 dropped: ") for w in summary["warnings"]), \
        summary["warnings"]
    assert not [w for w in summary["warnings"] if w.startswith("block 3")], summary["warnings"]
    assert all(b["integrated"] > 1000 for b in summary["blocks"]), summary["blocks"]
    with open(os.path.join(out, "dials.process_gapped.log")) as fh:
        log = fh.read()
    for k, (sweep, first, last) in enumerate(((1, 1, 12), (2, 1, 7), (3, 1, 12)), start=1):
        assert f"Block {k} (images {first}-{last} of sweep {sweep}): RMSD x" in log  # the model's own lines
    experiments = _experiments(out)
    assert [e.scan.get_image_range() for e in experiments] == [(1, 12), (1, 7), (1, 12)]
    cells = [e.crystal.get_unit_cell().parameters() for e in experiments]
    if model == "continuous":  # one cell; the per-block model refines one crystal per block
        assert np.ptp(np.array(cells), axis=0).max() < 1e-6, cells
    for cell in cells:
        assert all(abs(c / t - 1) < 5e-4 for c, t in zip(cell[:3], truths["ours"]["unit_cell"][:3])), cell
    expected = set(range(1, 13)) | set(range(101, 108)) | set(range(201, 213))
    mtz = gemmi.read_mtz_file(os.path.join(out, "integrated.mtz"))
    assert set(np.array(mtz.column_with_label("BATCH"), dtype=int)) == expected
    block_2 = gemmi.read_mtz_file(os.path.join(out, "integrated_2.mtz"))
    assert {b.number for b in block_2.batches} == set(range(101, 108))
    assert block_2.nreflections > 100 and set(np.array(block_2.column_with_label("BATCH"), dtype=int)) <= set(range(101, 108))


@pytest.mark.slow
def test_a_short_sweep_among_long_ones_keeps_its_orientation(tmp_path_factory):
    """A 3 x 1 deg sweep between two 12-image ones: most of its spots are cut
    by its own first or last image, whose centroids the cut pulls inward.
    Their phi, taken as observed in the scan-varying jobs, was fitted as a
    turn about the spindle (worst orientation error 0.130 deg, median 0.065;
    CC(I, I_true) 0.989); compared with a rocking curve cut by the scan's end
    it is 0.0124 / 0.0067 deg, as the long sweeps (0.016 / 0.009)."""
    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from
    from dials_gapfill.simulation.compare import orientation_errors
    from dials_gapfill.simulation.multisweep import MultiSweepConfig, SweepConfig, simulate_sweeps
    from dials_gapfill.simulation.simulate import SimulationConfig

    folder = str(tmp_path_factory.mktemp("short_sweep"))
    truth = simulate_sweeps(MultiSweepConfig(
        base=SimulationConfig(n_images=12, osc_width=1.0, detector="pilatus300k", distance=150.0, seed=42),
        sweeps=(SweepConfig(scan_axis="omega", angles={}),
                SweepConfig(scan_axis="omega", angles={"kappa": 40.0, "phi": 120.0}, n_images=3),
                SweepConfig(scan_axis="omega", angles={"kappa": -40.0, "phi": 240.0}))), folder)
    state = pipeline.Pipeline(params_from(["nproc=1"]), [folder]).run(stop_before="integration")
    assert [e.scan.get_image_range() for e in state.experiments] == [(1, 12), (1, 3), (1, 12)]
    errors = orientation_errors(state.experiments, truth)["per_sweep"]
    long_worst = max(errors[1]["worst"], errors[3]["worst"])
    assert long_worst < 0.03
    assert errors[2]["worst"] < 1.5 * long_worst and errors[2]["median"] < 0.02


def test_mtz_batch_headers_are_the_reflections_batches_whatever_the_sweeps_order(tmp_path):
    """DIALS' MTZ writer numbers an experiment's batch headers on from the
    largest batch already written when that is larger than its own, and
    leaves its reflections' BATCH: sweeps whose batches come out lower than
    an earlier sweep's (images 1-18, 1-18, 95-104: batches 1-18, 201-218,
    95-104) had rows pointing at batches without a header.  Here the four
    stored L-cysteine wedges (images 1-15 each) with offsets 300, 200, 0, 100."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory
    from iotbx import mtz

    from dials_gapfill.phil import params_from
    from dials_gapfill.stages.export import image_number_batches, write_mtz

    folder = os.path.join(os.path.dirname(__file__), "data", "l_cysteine_wedges", "complete")
    experiments = ExperimentListFactory.from_json_file(os.path.join(folder, "integrated.expt"), check_format=False)
    reflections = flex.reflection_table.from_file(os.path.join(folder, "integrated.refl"))
    offsets = [300, 200, 0, 100]
    path = str(tmp_path / "integrated.mtz")
    n = write_mtz(reflections, image_number_batches(experiments), params_from(["nproc=1"]), path, offsets=offsets)
    m = mtz.object(path)
    headers = {b.num(): (b.phistt(), b.phiend()) for b in m.batches()}
    assert sorted(headers) == [o + k for o in (0, 100, 200, 300) for k in range(1, 16)]
    # every row's batch has its header, whose phi is that image's of its sweep
    batch = [int(b) for b in m.get_column("BATCH").extract_values()]
    assert n == len(batch) > 100 and set(batch) <= set(headers)
    for exp, offset in zip(experiments, offsets):
        for image in range(1, 16):
            angles = (exp.scan.get_angle_from_image_index(image), exp.scan.get_angle_from_image_index(image + 1))
            assert headers[offset + image] == pytest.approx(angles, abs=1e-4)
