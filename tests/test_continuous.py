"""ONE continuous crystal model across the gaps (dials_gapfill.crystal_model.continuous), on
real DIALS runs against the simulator's truth.  The harness is DIALS only
(dxtbx import, shared models, from_observations), not the pipeline."""

from __future__ import annotations

import json
import os

import pytest

from conftest import TINY, Sweeps

# the tiny sweep (40 x 1 deg, Pilatus 300K) with every 8th image missing:
# blocks 1-7, 9-15, 17-23, 25-31, 33-39, 40 (and the sweep's own ends)
EVERY_8TH = [8, 16, 24, 32, 39]


def _files(folder):
    names = sorted(f for f in os.listdir(folder) if f.endswith(".cbf"))
    return [os.path.join(folder, f) for f in names]


def _run(folder, truth_folder, phil=(), **refine_kw):
    from dials_gapfill.crystal_model import ContinuousModel
    from dials_gapfill.phil import params_from
    from dials_gapfill.simulation import compare

    files = _files(folder)
    with open(os.path.join(truth_folder, "ground_truth.json")) as fh:
        truth = json.load(fh)
    experiments = compare.import_blocks(files)
    spots = compare.strong_spots(experiments, nproc=2)
    params = params_from(["nproc=2", *phil])
    model = ContinuousModel(params, **refine_kw)
    blocks, indexed, _ = model.index(experiments, spots)
    refined_blocks, refined, record = model.refine(blocks, indexed)
    return dict(
        experiments=experiments, spots=spots, blocks=blocks, indexed=indexed,
        refined_blocks=refined_blocks, refined=refined, record=record, truth=truth,
    )


@pytest.fixture(scope="module")
def every_8th(tiny_sweeps, tiny):
    return _run(tiny_sweeps.make(omit=EVERY_8TH, name="every8"), tiny)


@pytest.fixture(scope="module")
def gapless(tiny):
    return _run(tiny, tiny)


def _indexed_fraction(run):
    """Indexed spots after refinement (refine returns the indexed ones) / all spots."""
    table = run["refined"]
    ok = table.get_flags(table.flags.indexed) & (table["id"] >= 0)
    return ok.count(True) / len(run["spots"])


def test_blocks_keep_their_images_and_share_one_crystal_after_indexing(every_8th):
    experiments, blocks = every_8th["experiments"], every_8th["blocks"]
    assert [e.scan.get_image_range() for e in blocks] == [
        (1, 7), (9, 15), (17, 23), (25, 31), (33, 38), (40, 40)
    ]
    assert [e.identifier for e in blocks] == [e.identifier for e in experiments]
    assert len(blocks.crystals()) == 1 and len(blocks.detectors()) == 1 and len(blocks.beams()) == 1
    for exp, block in zip(experiments, blocks):
        assert block.imageset is exp.imageset and block.scan is exp.scan
    # reflections: ids are blocks, z on each block's own images
    table = every_8th["indexed"]
    assert set(table.experiment_identifiers().values()) == {e.identifier for e in blocks}
    z = table["xyzobs.px.value"].parts()[2]
    for i, exp in enumerate(blocks):
        f, l = exp.scan.get_image_range()
        zi = z.select(table["id"] == i)
        assert len(zi) > 0 and min(zi) >= f - 1 and max(zi) < l


def test_spots_left_unindexed_keep_their_sweep_and_block(every_8th):
    # a spot the lattice search did not index may be indexed by a later model:
    # on the continuous scan it must keep its sweep and image set, and come
    # back to its own block
    from dials.array_family import flex

    from dials_gapfill.crystal_model.continuous import Joined

    blocks = every_8th["blocks"]
    table = every_8th["indexed"].copy()
    image_sets = list(table["imageset_id"])
    assert min(image_sets) == 0 and max(image_sets) == len(blocks) - 1
    ids = table["id"]
    for i in range(0, len(table), 5):
        ids[i] = -1
    unindexed = [i for i in range(len(table)) if ids[i] < 0]
    joined = Joined(blocks)
    continuous = joined.to_continuous(table)
    assert set(continuous["sweep"]) == {0} and set(continuous["imageset_id"]) == {0}
    assert list(continuous["block"]) == image_sets
    assert [i for i, v in enumerate(continuous["id"]) if v < 0] == unindexed
    continuous["id"] = flex.int(len(continuous), 0)  # all indexed by a later model
    back = joined.to_blocks(continuous, blocks)
    assert list(back["id"]) == image_sets


def test_outlier_rejection_predicts_with_the_scan_varying_crystal(every_8th):
    # outlier rejection and the held-out RMSDs predict the refined spots
    # themselves: with a scan-varying crystal that must be the refiner's own
    # prediction (the crystal at each spot's z), not its static A
    import numpy as np

    from dials.algorithms.refinement.prediction.managed_predictors import ExperimentsPredictorFactory

    from dials_gapfill.crystal_model.continuous import predict_at_observed_z

    blocks, table = every_8th["refined_blocks"], every_8th["refined"]
    assert all(e.crystal.num_scan_points for e in blocks)
    used = table.select(table.get_flags(table.flags.used_in_refinement))
    refiner_xy = np.array(used["xyzcal.mm"].parts()[:2])
    ours = predict_at_observed_z(used.copy(), blocks)
    ours_xy = np.array(ours["xyzcal.mm"].parts()[:2])
    pixel = blocks[0].detector[0].get_pixel_size()[0]
    difference = np.hypot(*(ours_xy - refiner_xy)) / pixel
    # measured: median 0.0005 px, 99 % below 0.005 px (the refiner evaluates
    # the smoother at z, we interpolate between scan points)
    assert len(used) > 500 and np.median(difference) < 0.002 and np.percentile(difference, 99) < 0.02
    del ours["ub_matrix"]  # DIALS then predicts with each crystal's static A
    ExperimentsPredictorFactory.from_experiments(blocks)(ours)
    static = np.hypot(*(np.array(ours["xyzcal.mm"].parts()[:2]) - refiner_xy)) / pixel
    # each block's static A is its orientation at its middle image: off by
    # as much as the crystal turns in half a block (measured: median 0.0015
    # px, 2.5x; 99th percentile 0.027 px, 5x)
    assert np.median(static) > 2 * np.median(difference)
    assert np.percentile(static, 99) > 3 * np.percentile(difference, 99)


def test_gap_edge_spots_touch_a_gap_and_not_the_sweep_ends(every_8th):
    from dials_gapfill.crystal_model.continuous import gap_edge_spots

    table, blocks = every_8th["spots"], every_8th["experiments"]
    edge = gap_edge_spots(blocks, table)
    z0, z1 = table["bbox"].parts()[4], table["bbox"].parts()[5]
    ids = table["id"]
    for i in range(len(table)):
        f, l = blocks[ids[i]].scan.get_image_range()
        touches_gap = (f > 1 and z0[i] <= f - 1) or (l < 40 and z1[i] >= l)
        assert edge[i] == touches_gap
    # the sweep's first image (1) and last image (40) are not gaps, but 40 is
    # a one-image block after a gap: all its spots touch that gap
    first_block = ids == 0
    assert (edge & first_block & (z0 == 0) & (z1 < 7)).count(True) == 0
    assert (edge & (ids == 5)).count(True) == (ids == 5).count(True) > 0
    # short blocks: most spots are cut by a gap, which is the point
    assert 0.25 < edge.count(True) / len(table) < 0.95


def test_scan_end_spots_touch_the_sweeps_own_first_or_last_image(every_8th):
    from dials_gapfill.crystal_model.continuous import gap_edge_spots, scan_end_spots

    table, blocks = every_8th["spots"], every_8th["experiments"]
    end = scan_end_spots(blocks, table)
    z0, z1 = table["bbox"].parts()[4], table["bbox"].parts()[5]
    ids = table["id"]
    last = len(blocks) - 1
    assert blocks[0].scan.get_image_range()[0] == 1 and blocks[last].scan.get_image_range()[1] == 40
    for i in range(len(table)):
        assert end[i] == ((ids[i] == 0 and z0[i] == 0) or (ids[i] == last and z1[i] >= 40))
    assert 0 < (end & (ids == 0)).count(True) < (ids == 0).count(True)
    # the one-image last block after a gap: its spots touch both the gap and the scan's end
    assert (end & (ids == last)).count(True) == (ids == last).count(True)
    assert (end & gap_edge_spots(blocks, table) & (ids == last)).count(True) == (ids == last).count(True)


def test_scan_end_spots_are_treated_as_gap_edge_spots_unless_they_are_most(every_8th):
    """refinement.blocks.continuous_scan_ends=xy (the default): the spots a
    sweep's own ends cut join the gap-edge spots (no phi weight in the static
    jobs, their phi against a cut rocking curve in the scan-varying ones;
    xyz: only the gap-edge spots); a sweep whose spots are mostly cut by its
    ends keeps their phi."""
    import copy

    from dials_gapfill.crystal_model import ContinuousModel
    from dials_gapfill.crystal_model.continuous import scan_end_spots
    from dials_gapfill.phil import params_from

    blocks, indexed = every_8th["blocks"], every_8th["indexed"]
    raw = ContinuousModel(params_from(["nproc=1", "refinement.blocks.continuous_scan_ends=xyz"]))._start(
        blocks, copy.deepcopy(indexed))
    xy = ContinuousModel(params_from(["nproc=1"]))
    job = xy._start(blocks, copy.deepcopy(indexed))
    end = scan_end_spots(blocks, job.table)
    # the job keeps them, by block: the sigma_m of modelled gap edges is
    # estimated without them (the last block's spots touch the sweep's last image)
    assert list(job.scan_end) == list(end)
    assert (job.scan_end & (job.table["block"] == len(blocks) - 1)).count(True) > 0
    first_block = job.table["block"] == 0
    n_end = (end & first_block & ~job.edge).count(True)
    assert n_end > 10
    assert (job.xy_edge & end & first_block & ~job.edge).count(True) == n_end
    assert (raw.xy_edge & end & first_block & ~raw.edge).count(True) == 0
    assert list(raw.edge) == list(job.edge)  # the gap-edge flag itself is unchanged
    # a sweep whose spots are mostly cut by its ends: their phi stays
    from dials.array_family import flex

    rows = copy.deepcopy(indexed)
    keep = scan_end_spots(blocks, rows) | (flex.size_t_range(len(rows)) % 100 == 0)
    mostly_ends = xy._start(blocks, rows.select(keep))
    ends = scan_end_spots(blocks, mostly_ends.table)
    assert ends.count(True) >= 0.5 * len(mostly_ends.table)
    assert (mostly_ends.xy_edge & ends & ~mostly_ends.edge).count(True) == 0


def test_cut_rocking_curve_centroid():
    """The centroid of frames that record a Gaussian rocking curve cut at a
    block's end: the curve's centre where nothing is cut, the last frame's
    centre where the centre lies beyond the cut (and then it does not move
    with it), nothing where no frame records it."""
    import numpy as np

    from dials_gapfill.crystal_model.continuous import _cut_centroid

    def one(zc, s, first, end):
        return float(_cut_centroid(np.array([zc]), np.array([s]), np.array([first]), np.array([end]))[0])

    assert abs(one(50.3, 2.0, 0, 100) - 50.3) < 0.01
    slope = (one(50.35, 2.0, 0, 100) - one(50.25, 2.0, 0, 100)) / 0.1
    assert abs(slope - 1) < 0.01
    assert abs(one(10.4, 0.1, 0, 10) - 9.5) < 1e-6
    assert abs(one(10.45, 0.1, 0, 10) - one(10.35, 0.1, 0, 10)) < 1e-6
    # a broad curve centred on the end: pulled into the block by ~0.8 s
    assert 9.9 - 0.8 * 2.0 < one(10.0, 2.0, 0, 10) < 10.0 - 0.7 * 2.0
    assert np.isnan(one(20.0, 0.1, 0, 10))


def test_gap_edges_modelled_phi(every_8th, caplog):
    """refinement.blocks.continuous_gap_edges: modelled (the default) against
    xy on the same indexed spots.  modelled: sigma_m from the uncut spots
    near the simulator's 0.12 deg, phi weight for part of the gap-edge spots,
    and the crystal at least as close to the truth as with x, y only
    (measured on the tiny sweep without every 8th image: median 0.0052
    against 0.0063 deg, worst 0.036 against 0.042)."""
    import copy
    import logging
    import re

    from dials_gapfill.crystal_model import ContinuousModel
    from dials_gapfill.phil import params_from
    from dials_gapfill.simulation import compare

    truth = every_8th["truth"]

    def refine(choice):
        model = ContinuousModel(params_from(["nproc=2", f"refinement.blocks.continuous_gap_edges={choice}"]))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dials.process_gapped"):
            blocks, _, _ = model.refine(copy.deepcopy(every_8th["blocks"]), copy.deepcopy(every_8th["indexed"]))
        return blocks, caplog.text

    xy, xy_log = refine("xy")
    assert "rocking curve cut by the gap" not in xy_log
    modelled, log = refine("modelled")
    found = re.findall(r"sigma_m ([0-9.]+) deg from the uncut spots\) for (\d+) of (\d+)", log)
    assert found, log[-2000:]
    sigma_m, n, edge = float(found[-1][0]), int(found[-1][1]), int(found[-1][2])
    assert 0.08 < sigma_m < 0.2 and 0.2 * edge < n < edge
    e_modelled, e_xy = compare.orientation_errors(modelled, truth), compare.orientation_errors(xy, truth)
    assert e_modelled["median"] <= e_xy["median"], (e_modelled["median"], e_xy["median"])
    assert e_modelled["worst"] <= e_xy["worst"], (e_modelled["worst"], e_xy["worst"])
    for exp in modelled:
        assert compare.cell_error(exp.crystal, truth)["rel_error_max"] < 0.002
    # the default is modelled: the module's run is the same model
    assert abs(compare.orientation_errors(every_8th["refined_blocks"], truth)["median"] - e_modelled["median"]) < 1e-9


def test_gap_edge_spots_are_indexed_like_the_others(every_8th, gapless):
    spots, table = every_8th["indexed"], every_8th["refined"]  # all spots / indexed ones
    assert len(spots) == len(every_8th["spots"])
    ok = table.get_flags(table.flags.indexed) & (table["id"] >= 0)
    assert ok.count(True) == len(table)
    edge_fraction = table["gap_edge"].count(True) / spots["gap_edge"].count(True)
    inner_fraction = (~table["gap_edge"]).count(True) / (~spots["gap_edge"]).count(True)
    assert edge_fraction > 0.9 and edge_fraction > inner_fraction - 0.05
    # ids and image sets are the blocks
    assert list(table["imageset_id"]) == list(table["id"])
    # indexed fraction of ALL spots within 2 points of the same images without gaps
    assert _indexed_fraction(every_8th) >= _indexed_fraction(gapless) - 0.02


def test_one_crystal_sliced_onto_the_blocks(every_8th):
    import numpy as np

    blocks = every_8th["refined_blocks"]
    assert [e.identifier for e in blocks] == [e.identifier for e in every_8th["experiments"]]
    assert len(blocks.detectors()) == len(blocks.beams()) == len(blocks.goniometers()) == 1
    for exp in blocks:
        assert exp.crystal.num_scan_points == exp.scan.get_num_images() + 1
    # continuity: the slices are cut from one smooth model, so the orientation
    # changes across a one-image gap (two scan intervals) by about twice the
    # change within one image
    a, b = blocks[0].crystal, blocks[1].crystal
    last = np.array(a.get_A_at_scan_point(a.num_scan_points - 1))
    first = np.array(b.get_A_at_scan_point(0))
    step = np.array(a.get_A_at_scan_point(a.num_scan_points - 2))
    assert np.abs(first - last).max() < 3 * np.abs(last - step).max() + 1e-9
    # one cell for all blocks
    cells = {tuple(round(v, 6) for v in e.crystal.get_unit_cell().parameters()) for e in blocks}
    assert len(cells) == 1
    record = every_8th["record"]
    assert set(record.blocks) == {e.identifier for e in blocks}
    for r in record.blocks.values():
        assert {"rmsd_static", "rmsd_scan_varying", "refinement"} <= set(r)
    assert len(record.crystal["cell_esd"]) == 6


def test_orientation_and_cell_against_truth(every_8th, gapless):
    from dials_gapfill.simulation import compare
    truth = every_8th["truth"]
    gapped = compare.orientation_errors(every_8th["refined_blocks"], truth)
    full = compare.orientation_errors(gapless["refined_blocks"], truth)
    assert gapped["median"] < 0.02 and gapped["worst"] < 0.1
    assert gapped["median"] <= 1.25 * full["median"], (gapped["median"], full["median"])
    # image 40 is a block of one image at the sweep's end, behind the gap at 39:
    # its orientation is extrapolated over the gap from one image's spots (0.036
    # deg against 0.020-0.022 without the gap); every other image as without gaps
    end = gapped["images"].index(40)
    inner = [e for i, e in zip(gapped["images"], gapped["errors_deg"]) if i != 40]
    full_at = dict(zip(full["images"], full["errors_deg"]))
    assert max(inner) <= 1.25 * full["worst"], (max(inner), full["worst"])
    assert gapped["errors_deg"][end] <= 2 * full_at[40]
    for exp in every_8th["refined_blocks"]:
        assert compare.cell_error(exp.crystal, truth)["rel_error_max"] < 0.002
    # the static model of indexing is worse than the scan-varying one
    assert compare.orientation_errors(every_8th["blocks"], truth)["median"] > gapped["median"]


def test_orientation_error_metric_is_zero_for_the_truth(tiny):
    """The metric itself: the simulator's own crystal gives zero error, and a
    common rotation of everything (the gauge) is removed."""
    import numpy as np
    from dxtbx.model import Crystal
    from dxtbx.model.experiment_list import ExperimentList

    from dials_gapfill.simulation import compare
    files = _files(tiny)
    with open(os.path.join(tiny, "ground_truth.json")) as fh:
        truth = json.load(fh)
    experiments = ExperimentList([compare.import_blocks(files)[0]])
    B = np.array(truth["orientation"]["B"]).reshape(3, 3)
    # a gauge rotation G: beam and detector turned about the sample, every
    # laboratory-frame setting matrix R(phi) A follows, A' = R(phi)^-1 G R(phi) A
    G = compare.rotation((0.3, 0.5, 0.8), 0.7)
    axis = truth["rotation_axis"]
    mats = []
    for phi, U in zip(truth["orientation"]["phi"], truth["orientation"]["U"]):
        Rphi = compare.rotation(axis, phi)
        mats.append(Rphi.T @ G @ Rphi @ np.array(U).reshape(3, 3) @ B)
    real = np.linalg.inv(mats[0])
    crystal = Crystal(tuple(real[0]), tuple(real[1]), tuple(real[2]), space_group_symbol="P1")
    crystal.set_A_at_scan_points([tuple(m.ravel()) for m in mats])
    experiments[0].crystal = crystal
    result = compare.orientation_errors(experiments, truth)
    assert result["worst"] < 1e-3 and result["gauge_deg"] == pytest.approx(0.7, abs=1e-3)
    # an error at one image is seen there
    mats[10] = compare.rotation((1, 0, 0), 0.2) @ mats[10]
    mats[11] = compare.rotation((1, 0, 0), 0.2) @ mats[11]
    crystal.set_A_at_scan_points([tuple(m.ravel()) for m in mats])
    result = compare.orientation_errors(experiments, truth)
    assert result["errors_deg"][10] == pytest.approx(0.2, abs=0.02)
    # as a lab-frame vector: about the spindle (x), the sign of the rotation applied
    assert truth["rotation_axis"] == [1.0, 0.0, 0.0]
    assert result["vectors_deg"][10] == pytest.approx([0.2, 0.0, 0.0], abs=0.02)
    assert result["median"] < 0.02


def test_tiny_blocks_of_one_to_three_images(tiny_sweeps, tiny):
    """Blocks of 1, 2 and 3 images inside the continuous model just work."""
    from dials_gapfill.simulation import compare
    omit = [5, 7, 10, 14, 18, 19, 20]  # blocks 1-4, 6, 8-9, 11-13, 15-17, 21-40
    run = _run(tiny_sweeps.make(omit=omit, name="tiny_blocks"), tiny)
    blocks = run["refined_blocks"]
    assert [e.scan.get_num_images() for e in blocks] == [4, 1, 2, 3, 3, 20]
    table, spots = run["refined"], run["spots"]
    for i, exp in enumerate(blocks):
        assert exp.crystal.num_scan_points == exp.scan.get_num_images() + 1
        assert (table["id"] == i).count(True) >= 0.85 * (spots["id"] == i).count(True)
    errors = compare.orientation_errors(blocks, run["truth"])
    small = [e for n, e in zip(errors["images"], errors["errors_deg"]) if n <= 17]
    assert max(small) < 0.1
    assert _indexed_fraction(run) > 0.9
    # every block has RMSDs; the one-image block's spots are all cut by gaps
    for exp in blocks:
        r = run["record"].blocks[exp.identifier]["rmsd_scan_varying"]
        assert r is not None and r["x"] < 1.0 and r["y"] < 1.0
    assert run["record"].blocks[blocks[1].identifier]["rmsd_scan_varying"].get("phi_biased")


@pytest.mark.slow
def test_a_30_degree_gap_is_not_singular(tmp_path_factory):
    """60 x 1 deg with images 16-45 missing, smoother checkpoints every 10 deg:
    two or three checkpoints inside the gap have no data; refinement must still
    converge and be right (and the cell esds come from the static job)."""
    from dials_gapfill.simulation import compare
    sweeps = Sweeps(dict(TINY, n_images=60), tmp_path_factory)
    run = _run(
        sweeps.make(omit=range(16, 46), name="gap30"), sweeps.complete,
        phil=["refinement.parameterisation.crystal.orientation.smoother.interval_width_degrees=10"],
    )
    blocks = run["refined_blocks"]
    assert [e.scan.get_image_range() for e in blocks] == [(1, 15), (46, 60)]
    errors = compare.orientation_errors(blocks, run["truth"])
    assert errors["worst"] < 0.06 and errors["median"] < 0.03
    assert compare.cell_error(blocks[0].crystal, run["truth"])["rel_error_max"] < 0.001
    esd = run["record"].crystal["cell_esd"]
    assert all(v == v and v < 0.02 for v in esd[:3])  # finite, small
    assert blocks[0].crystal.num_scan_points == 16 and blocks[1].crystal.num_scan_points == 16


@pytest.mark.slow
def test_a_gap_that_leaves_checkpoints_without_reflections_is_said(tmp_path):
    """Two 6-image wedges 60 deg apart in one sweep: checkpoints (every 12
    deg) inside the gap have no reflection, DIALS refuses the sweep's
    scan-varying orientation and it stays static: said in a warning that
    names the gap, with the per-block model as the alternative; the static
    orientation is still close to the truth."""
    from dials_gapfill.simulation import compare
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    folder = str(tmp_path / "wedges")
    simulate(SimulationConfig(**dict(TINY, n_images=72, omit=tuple(range(7, 67)))), folder)
    run = _run(folder, folder)
    blocks = run["refined_blocks"]
    assert [e.scan.get_image_range() for e in blocks] == [(1, 6), (67, 72)]
    assert all(e.crystal.num_scan_points == 0 for e in blocks)
    warnings = [w for w in run["record"].warnings if "stays static" in w]
    assert warnings == [
        "the sweep's crystal orientation stays static, not scan-varying: the 60-deg gap between images 6 and 67 "
        "leaves the smoother's checkpoints there (every 12 deg) without reflections, so DIALS refuses the "
        "parameters; refinement.blocks.model=per_block gives each block its own scan-varying crystal"], warnings
    errors = compare.orientation_errors(blocks, run["truth"])
    assert errors["worst"] < 0.05, errors


def test_the_checkpoint_spacing_chosen_on_left_out_reflections(every_8th):
    # the last scan-varying job repeated with finer checkpoints on the same
    # reflections and random sample: kept only where the reflections the
    # sample left out are predicted better, and where it is not kept the
    # result is exactly the job's without the choice
    import copy

    import numpy as np

    from dials_gapfill.crystal_model import ContinuousModel
    from dials_gapfill.crystal_model.continuous import FINER_SPACING, FINER_Z, held_out_score
    from dials_gapfill.phil import params_from

    # the tiny sweep has fewer spots than 200 per degree: a smaller sample
    # leaves reflections out
    params = params_from(["nproc=2", "refinement.reflections.reflections_per_degree=20"])
    runs = {}
    for choose in (True, False, "auto"):
        model = ContinuousModel(params, choose_spacing=choose)
        blocks, table, record = model.refine(copy.deepcopy(every_8th["blocks"]), copy.deepcopy(every_8th["indexed"]))
        runs[choose] = (model.last, blocks, table, record)
    last, blocks, table, record = runs[True]
    choice = last["spacing_choice"]
    assert choice["widths"] == [12.0, 12.0 * FINER_SPACING]
    coarse, fine = choice["scores"]
    assert coarse == held_out_score(last["out_of_sample"][-2]) and fine == held_out_score(last["out_of_sample"][-1])
    # kept only where clearly better on the same left-out rows
    assert choice["chosen"] == (choice["widths"][1] if choice["paired_z"] < -FINER_Z else 12.0)
    assert choice["chosen"] == 12.0 or fine < coarse
    described = next(iter(record.blocks.values()))["refinement"]
    assert f"checkpoints every {choice['chosen']:g} deg" in described
    _, other_blocks, other_table, _ = runs[False]
    same = [np.allclose(a.crystal.get_A_at_scan_point(k), b.crystal.get_A_at_scan_point(k), atol=0, rtol=0)
            for a, b in zip(blocks, other_blocks) for k in range(a.crystal.num_scan_points)]
    if choice["chosen"] == 12.0:
        assert all(same) and list(table["xyzcal.px"]) == list(other_table["xyzcal.px"])
    else:
        assert not all(same)
    # "auto" (the default) tries the finer spacing only after a re-index
    # cycle that indexed more, and then is the run that always tries it,
    # else the one that never does
    auto_last, auto_blocks, auto_table, _ = runs["auto"]
    cycled = any(c["indexed_more"] for c in auto_last["reindex_cycles"])
    twin_blocks, twin_table = (blocks, table) if cycled else (other_blocks, other_table)
    assert len(auto_last["spacing_choice"]["widths"]) == (2 if cycled else 1)
    assert list(auto_table["xyzcal.px"]) == list(twin_table["xyzcal.px"])
    assert all(np.allclose(a.crystal.get_A_at_scan_point(k), b.crystal.get_A_at_scan_point(k), atol=0, rtol=0)
               for a, b in zip(auto_blocks, twin_blocks) for k in range(a.crystal.num_scan_points))


def test_outlier_rejection_gives_the_same_outliers_on_any_number_of_processes(every_8th):
    # DIALS' MCD jobs (one per block and phi range) run on several processes,
    # each from a seed of its own: the outliers must not depend on nproc
    import copy

    from dials_gapfill.crystal_model.continuous import Joined, gap_edge_spots, reject_outliers
    from dials_gapfill.phil import dials_refine_params, params_from

    blocks, indexed = every_8th["blocks"], every_8th["indexed"]
    joined = Joined(blocks)
    table = joined.to_continuous(indexed)
    table["gap_edge"] = gap_edge_spots(blocks, table)
    table.centroid_px_to_mm(joined.experiments)
    refinable = table.get_flags(table.flags.indexed) & (table["id"] >= 0)
    rp = dials_refine_params(params_from([]))
    flags = {}
    for nproc in (1, 2, 1):
        t = copy.deepcopy(table)
        counts = reject_outliers(t, refinable, joined.experiments, rp, by_block=True, nproc=nproc)
        flags.setdefault(nproc, []).append((counts, list(t.get_flags(t.flags.centroid_outlier))))
    assert flags[1][0] == flags[1][1] == flags[2][0]
    counts, outliers = flags[2][0]
    assert counts["inner"] > 0 and sum(outliers) == sum(counts.values())


def test_sweeps_dials_refuses_to_make_scan_varying_are_named_from_its_message():
    """DIALS' auto-reduction names the parameters it cannot determine
    (Crystal<k>... for the k-th crystal of the job): those experiments'
    crystals stay static in the job; another message names none."""
    from dxtbx.model import Crystal, Experiment
    from dxtbx.model.experiment_list import ExperimentList

    from dials_gapfill.dials_compat import crystals_refused_for_too_few_reflections

    crystals = [Crystal((5.0 + k, 0, 0), (0, 6.0, 0), (0, 0, 7.0), space_group_symbol="P 1") for k in range(3)]
    # four experiments, the last two sharing the third crystal
    experiments = ExperimentList([Experiment(crystal=c) for c in (crystals[0], crystals[1], crystals[2], crystals[2])])
    message = ("Too few reflections to parameterise Crystal3Phi1_sample0, Crystal3Phi2_sample0, "
               "Crystal1g_param_0.\nTry setting refinement.parameterisation.auto_reduction.action")
    assert crystals_refused_for_too_few_reflections(message, experiments) == {0, 2, 3}
    assert crystals_refused_for_too_few_reflections("Crystal1 diverged", experiments) == set()
    assert crystals_refused_for_too_few_reflections("Too few reflections to parameterise Beam1Mu1.",
                                                    experiments) == set()


def test_a_detector_dials_refuses_for_too_few_reflections_is_fixed_by_name():
    """A sweep at its own detector position with a few spots left: DIALS
    names that detector's parameters (Detector<k>... for the k-th detector of
    the job); they go on the detector's fix_list, where DIALS' own name
    matching (string_sel, the model identifier as prefix) fixes them for
    that detector and for no other."""
    from dials.algorithms.refinement.refinement_helpers import string_sel
    from dxtbx.model import Crystal, Detector, Experiment
    from dxtbx.model.experiment_list import ExperimentList

    from dials_gapfill.dials_compat import fix_model_parameters, models_refused_for_too_few_reflections
    from dials_gapfill.phil import dials_refine_params, params_from

    crystal = Crystal((5.0, 0, 0), (0, 6.0, 0), (0, 0, 7.0), space_group_symbol="P 1")
    first, second = Detector(), Detector()
    experiments = ExperimentList([Experiment(crystal=crystal, detector=d) for d in (first, first, second)])
    message = ("Too few reflections to parameterise Detector2Dist, Detector2Shift1, Detector2Tau1, "
               "Crystal3Phi1.\nTry setting refinement.parameterisation.auto_reduction.action")
    refused = models_refused_for_too_few_reflections(message, experiments)
    assert refused == {"Detector2Dist": {2}, "Detector2Shift1": {2}, "Detector2Tau1": {2}}
    assert models_refused_for_too_few_reflections("Detector2 diverged", experiments) == {}
    rp = dials_refine_params(params_from([]))
    beam_before = rp.refinement.parameterisation.beam.fix_list
    fix_model_parameters(rp, refused)
    fix_list = rp.refinement.parameterisation.detector.fix_list
    names = ["Dist", "Shift1", "Shift2", "Tau1", "Tau2", "Tau3"]
    assert string_sel(fix_list, names, "Detector2") == [True, True, False, True, False, False]
    assert string_sel(fix_list, names, "Detector1") == [False] * 6
    assert rp.refinement.parameterisation.beam.fix_list == beam_before


def test_levmar_stops_on_rmsds_steady_over_two_steps():
    """dials_compat.steady_levmar: DIALS' LevMar stops when one step changes
    every RMSD by less than 0.01 %, which its damped first step can do (the
    RMSDs of a scan-varying job on an electron sweep, in mm, mm and rad);
    inside the block it stops only after two such steps in a row, and DIALS'
    own class is back afterwards."""
    from dials.algorithms.refinement import engine

    from dials_gapfill import dials_compat

    first = [(0.0014392, 0.0015468, 0.0015889), (0.0014391, 0.0015467, 0.0015888)]
    moving = first + [(0.0014388, 0.0015460, 0.0015870)]
    steady = moving + [(0.0014388, 0.0015460, 0.0015870)]

    def stops(cls, rows):
        refinery = cls.__new__(cls)
        refinery.history = engine.Journal()
        refinery.history.add_column("rmsd")
        for row in rows:
            refinery.history.add_row()
            refinery.history.set_last_cell("rmsd", row)
        return refinery.test_rmsd_convergence()

    dials_levmar = engine.LevenbergMarquardtIterations
    assert stops(dials_levmar, first)
    with dials_compat.steady_levmar() as done:
        assert done
        ours = engine.LevenbergMarquardtIterations
        assert ours is not dials_levmar and issubclass(ours, dials_levmar)
    assert engine.LevenbergMarquardtIterations is dials_levmar
    assert not stops(ours, first)
    assert not stops(ours, moving)
    assert not stops(ours, steady[1:])  # steady only in the last step
    assert stops(ours, [steady[0]] + steady[1:2] + steady[1:2] + steady[1:2])
    assert stops(ours, steady + steady[-1:])


def test_a_sweep_offset_as_a_whole_gets_its_uncut_spots_back():
    """After outlier rejection in one distribution: a sweep left fewer spots
    than DIALS refines a parameter on (5) keeps all of them; one left fewer
    than an orientation asks (15) and less than half of its own (sweep 4 of
    L-cysteine without image 7: 8 of 26) keeps those not cut by a gap, its
    cut ones still judged; one left a share like the others' (sweep 2 of all
    60 images: 14 of 23) and one left enough keep what rejection left."""
    import numpy as np
    from dials.array_family import flex

    from dials_gapfill.crystal_model.continuous import spots_given_back

    sizes = {0: 40, 1: 26, 2: 23, 3: 10}
    kept_of = {0: 30, 1: 8, 2: 14, 3: 3}
    sweep, cut, kept = [], [], []
    for g, n in sizes.items():
        sweep += [g] * n
        cut += [i % 3 == 0 for i in range(n)]  # every third spot cut by a gap
        kept += [i < kept_of[g] for i in range(n)]
    table = flex.reflection_table()
    table["sweep"] = flex.int(sweep)
    table["gap_edge"] = flex.bool(cut)
    refinable = flex.bool(len(table), True)
    refinable[len(table) - 1] = False  # a row outside the job stays out
    before = flex.bool(kept)
    after = spots_given_back(table, refinable, before, 5)
    assert list(before) == kept  # not changed in place
    sweep, cut, after = np.array(sweep), np.array(cut), np.array(after)
    refinable = np.array(refinable)
    for g in (0, 2):
        assert (after[sweep == g] == np.array(kept)[sweep == g]).all()
    mine = sweep == 1
    assert after[mine & ~cut].all()
    assert (after[mine & cut] == np.array(kept)[mine & cut]).all()
    assert after[mine & cut].sum() < (mine & cut).sum()
    assert (after[sweep == 3] == refinable[sweep == 3]).all() and after[sweep == 3].sum() == 9
