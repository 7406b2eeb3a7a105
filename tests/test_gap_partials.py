"""Reflections whose rocking curve spans a gap are measured once
(integration.gap_partials=combine, the default): the two partial
observations either side of a gap become one row in integrated.refl and the
MTZ, with its counts and partialities added, and that one row agrees with
the truth as well as uncut reflections do.  The tiny sweep (1 deg images)
with every 6th image missing: one-image gaps, hundreds of such reflections."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import process_ok, summation_against_truth

OMIT = tuple(range(6, 41, 6))


@pytest.fixture(scope="module")
def every_6th(tiny_sweeps):
    return tiny_sweeps.make(omit=OMIT, name="every6th")


@pytest.fixture(scope="module")
def separate(every_6th, tmp_path_factory):
    from dials_gapfill.simulation.compare import load

    out = str(tmp_path_factory.mktemp("gap_partials_separate"))
    process_ok(every_6th, out, "integration.gap_partials=separate")
    return load(out)


@pytest.fixture(scope="module")
def combined(every_6th, tmp_path_factory):
    from dials_gapfill.simulation.compare import load

    out = str(tmp_path_factory.mktemp("gap_partials"))
    process_ok(every_6th, out)
    experiments, reflections = load(out)
    with open(os.path.join(out, "dials.process_gapped.json")) as fh:
        summary = json.load(fh)
    return experiments, reflections, summary, out


def _key(table, i):
    return tuple(table["miller_index"][i]), round(table["xyzcal.px"][i][2], 1)


def test_each_gap_spanning_reflection_becomes_one_row(separate, combined):
    from dials_gapfill.stages.integration import gap_partial_pairs

    s_expts, s_refl = separate
    c_expts, c_refl, summary, _ = combined
    assert [e.scan.get_image_range() for e in c_expts] == [e.scan.get_image_range() for e in s_expts]
    pairs = gap_partial_pairs(s_expts, s_refl)
    assert len(pairs) > 100, len(pairs)
    # none left after combination, one row fewer per combined pair, each
    # counted (a part matching two others is left alone: measured 1 of 1424)
    assert gap_partial_pairs(c_expts, c_refl) == []
    flagged = c_refl["gap_combined"]
    n = flagged.count(True)
    assert n >= 0.99 * len(pairs)
    assert len(c_refl) == len(s_refl) - n
    assert summary["totals"]["gap_combined"] == n
    assert sum(b["gap_combined"] for b in summary["blocks"]) == n
    assert sum(b["integrated"] for b in summary["blocks"]) == len(c_refl)
    # the row's summation counts, variances and partiality are the two parts' sums
    rows = {_key(c_refl, i): i for i in flagged.iselection()}
    Is, Vs, P = s_refl["intensity.sum.value"], s_refl["intensity.sum.variance"], s_refl["partiality"]
    checked = 0
    for i, j in pairs:
        k = rows.get(_key(s_refl, i))
        if k is None:
            continue
        checked += 1
        assert c_refl["intensity.sum.value"][k] == pytest.approx(Is[i] + Is[j], rel=1e-9)
        assert c_refl["intensity.sum.variance"][k] == pytest.approx(Vs[i] + Vs[j], rel=1e-9)
        # (partialities agree to 1e-3 between the two runs: measured equal
        # but for one row in 1424, 0.49981 against 0.50000)
        assert c_refl["partiality"][k] == pytest.approx(min(1.0, P[i] + P[j]), abs=1e-3)
        assert c_refl["id"][k] == (s_refl["id"][i] if P[i] >= P[j] else s_refl["id"][j])
    assert checked >= 0.95 * len(pairs)  # found by (hkl, z to 0.1 image): measured 1386 of 1424


def _cc_with_truth(table, rows, truth):
    I, sigma, true_I = summation_against_truth(table.select(rows), truth)
    good = (sigma > 0) & (I > 3 * sigma) & ~np.isnan(true_I)
    return np.corrcoef(I[good], true_I[good])[0, 1], int(good.sum())


def test_measured_once_agrees_with_the_truth_as_uncut_reflections_do(separate, combined, truth_tiny):
    """Summation intensities / partiality (as dials.export scales them) against
    the simulator's: the combined rows that go to the MTZ (partiality >=
    mtz.partiality_threshold, 0.4) as well as uncut reflections of the same
    resolution range; and all combined rows better than each part alone.
    (On this sweep most of a spanning reflection's rocking curve falls in the
    one-degree gap: median combined partiality 0.05; measured CC 0.9985 for the
    112 exported combined rows against 0.9997 uncut; all rows 0.91 combined,
    0.75 each part alone.)"""
    from dials.array_family import flex

    from dials_gapfill.stages.integration import gap_partial_pairs

    c_expts, c_refl, _, _ = combined
    s_expts, s_refl = separate
    integrated = c_refl.get_flags(c_refl.flags.integrated_sum) & (c_refl["partiality"] > 0)
    exported = integrated & (c_refl["partiality"] >= 0.4)
    d = c_refl.compute_d(c_expts)
    comb = exported & c_refl["gap_combined"]
    lo, hi = flex.min(d.select(comb)), flex.max(d.select(comb))
    uncut = exported & (c_refl["partiality"] > 0.99) & ~c_refl["gap_edge"] & (d >= lo) & (d <= hi)
    cc_comb, n_comb = _cc_with_truth(c_refl, comb, truth_tiny)
    cc_uncut, n_uncut = _cc_with_truth(c_refl, uncut, truth_tiny)
    assert n_comb > 50 and n_uncut > 100
    assert cc_comb >= cc_uncut - 0.002, (cc_comb, n_comb, cc_uncut, n_uncut)
    # every combined row against each part alone
    parts = flex.bool(len(s_refl), False)
    for i, j in gap_partial_pairs(s_expts, s_refl):
        parts[i] = parts[j] = True
    s_integrated = s_refl.get_flags(s_refl.flags.integrated_sum) & (s_refl["partiality"] > 0)
    cc_parts, n_parts = _cc_with_truth(s_refl, parts & s_integrated, truth_tiny)
    cc_all, n_all = _cc_with_truth(c_refl, integrated & c_refl["gap_combined"], truth_tiny)
    assert cc_parts < cc_all, (cc_parts, n_parts, cc_all, n_all)


def test_the_mtz_holds_each_reflection_once(separate, combined):
    """In integrated.mtz no reflection appears on both sides of a gap (the same
    indices, rotation angles within 1.5 images); the same check finds such
    pairs among the separate rows."""
    import gemmi

    _, _, _, out = combined
    mtz = gemmi.read_mtz_file(os.path.join(out, "integrated.mtz"))
    data = np.array(mtz, copy=False)
    col = {c.label: i for i, c in enumerate(mtz.columns)}
    width = 1.0  # degrees per image (the tiny sweep)

    def duplicates(hkl, isym, rot):
        seen, n = {}, 0
        for h, s, r in zip(map(tuple, hkl), isym, rot):
            for r0 in seen.get((h, s), ()):
                if abs(r - r0) < 1.5 * width:
                    n += 1
            seen.setdefault((h, s), []).append(r)
        return n

    hkl = data[:, [col["H"], col["K"], col["L"]]].astype(int)
    assert duplicates(hkl, data[:, col["M/ISYM"]].astype(int), data[:, col["ROT"]]) == 0
    s_expts, s_refl = separate
    z = np.array(s_refl["xyzcal.px"].parts()[2])
    osc0, w = s_expts[0].scan.get_oscillation()
    sep_hkl = np.array(list(s_refl["miller_index"]), dtype=int)
    assert duplicates(sep_hkl, np.zeros(len(z), dtype=int), osc0 + z * w) > 100


def test_one_profile_model_from_all_blocks(combined, truth_tiny):
    """With the continuous model (the default) the blocks share one profile
    model (integration.profile_model=auto: all_blocks), made from the strong
    spots of all blocks whose rocking curves are not cut by a gap; its
    mosaicity is the simulator's."""
    experiments, _, summary, out = combined
    sigma_b = {round(e.profile.sigma_b(deg=True), 9) for e in experiments}
    sigma_m = {round(e.profile.sigma_m(deg=True), 9) for e in experiments}
    assert len(experiments) == 7 and len(sigma_b) == 1 and len(sigma_m) == 1, (sigma_b, sigma_m)
    assert [b["profile"] for b in summary["blocks"]] == ["all blocks"] * 7
    assert sigma_m.pop() == pytest.approx(truth_tiny["mosaicity_deg"], rel=0.05)
    log = open(os.path.join(out, "dials.process_gapped.log")).read()
    assert "reference spots cut by a gap left out of the sigma calculation" in log


def test_a_part_that_holds_the_reflection_is_not_summed_with_a_sliver(separate):
    """A pair whose larger part holds 99 % of the reflection keeps that part
    as it is (the sliver across the gap adds a shoebox of noise, and whatever
    overlaps it); other pairs are summed.  On this steady sweep no pair has
    such a part (on drifting ones many do): ten pairs are given one."""
    from dials.array_family import flex

    from dials_gapfill.stages.integration import ONE_PART_HOLDS_IT, combine_gap_partials, gap_partial_pairs

    s_expts, s_refl = separate
    table = s_refl.copy()
    table["row"] = flex.int(range(len(table)))
    pairs = gap_partial_pairs(s_expts, table)
    part = table["partiality"]
    planted = set()
    for i, j in pairs[:40:4]:
        keep = i if part[i] >= part[j] else j
        part[keep] = 0.995
        planted.add((i, j))
    table["partiality"] = part
    out, n = combine_gap_partials(s_expts, table)
    rows = {r: k for k, r in enumerate(out["row"])}
    I = table["intensity.sum.value"]
    whole = summed = 0
    for i, j in pairs:
        keep, drop = (i, j) if part[i] >= part[j] else (j, i)
        if keep not in rows or drop in rows:
            continue  # a part in two pairs
        k = rows[keep]
        if part[keep] >= ONE_PART_HOLDS_IT:
            whole += 1
            assert (i, j) in planted
            assert out["intensity.sum.value"][k] == I[keep] and not out["gap_combined"][k]
        else:
            summed += 1
            assert out["intensity.sum.value"][k] == I[keep] + I[drop] and out["gap_combined"][k]
    assert whole == len(planted) == 10 and summed == n > 1000


def _split_over_folders(tiny, tmp_path, last_in_first=20, omit=()):
    """The tiny sweep's files in two folders: 1..last_in_first, the rest."""
    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir()
    b.mkdir()
    for name in sorted(os.listdir(tiny)):
        if not name.endswith(".cbf"):
            continue
        n = int(name.split("_")[-1].split(".")[0])
        if n not in omit:
            os.symlink(os.path.join(tiny, name), (a if n <= last_in_first else b) / name)
    return str(a), str(b)


def test_spots_at_a_folder_boundary_are_cut_as_at_a_gap(tiny, tmp_path):
    """A sweep split over two folders, no image missing: spots are found
    block by block, so one recorded on both sides of the boundary is cut
    there, and the continuous model treats those as gap-edge spots (phi
    not trusted), as integration treats that boundary."""
    from dials_gapfill.crystal_model.continuous import gap_edge_spots, scan_end_spots
    from dials_gapfill.phil import params_from
    from dials_gapfill.pipeline import Pipeline

    state = Pipeline(params_from(["nproc=1"]), list(_split_over_folders(tiny, tmp_path))).run(stop_before="indexing")
    experiments, spots = state.experiments, state.reflections
    assert [e.scan.get_image_range() for e in experiments] == [(1, 20), (21, 40)]
    edge = gap_edge_spots(experiments, spots)
    z0, z1 = spots["bbox"].parts()[4], spots["bbox"].parts()[5]
    at_boundary = ((spots["id"] == 0) & (z1 >= 20)) | ((spots["id"] == 1) & (z0 <= 20))
    assert at_boundary.count(True) > 100
    assert list(edge) == list(at_boundary)
    assert (edge & scan_end_spots(experiments, spots)).count(True) == 0


def test_blocks_of_one_rotation_and_of_other_sweeps(tiny, tmp_path):
    """Which neighbouring blocks a reflection can span: those of one
    rotation, after a gap or where the files go on in another folder (no
    image missing); never a block of another sweep (another file-name
    template going on with the rotation; the L-cysteine wedges, four sweeps
    whose image numbers are each 1-15)."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.phil import params_from
    from dials_gapfill.pipeline import Pipeline
    from dials_gapfill.stages.integration import one_rotation

    folders = _split_over_folders(tiny, tmp_path, omit=(31, 32))
    state = Pipeline(params_from(["nproc=1"]), list(folders)).run(stop_before="spot finding")
    blocks = state.sweeps.experiments()
    assert [e.scan.get_image_range() for e in blocks] == [(1, 20), (21, 30), (33, 40)]
    assert [one_rotation(blocks[i], blocks[i + 1]) for i in range(2)] == [True, True]
    assert not one_rotation(blocks[1], blocks[0])
    # images 21-40 under another name: the same rotation, another sweep
    other = tmp_path / "rep"
    other.mkdir()
    for n in range(21, 41):
        os.symlink(os.path.join(tiny, f"sim_{n:04d}.cbf"), other / f"rep_{n:04d}.cbf")
    state = Pipeline(params_from(["nproc=1"]), [folders[0], str(other)]).run(stop_before="spot finding")
    by_range = {e.scan.get_image_range(): e for e in state.sweeps.experiments()}
    assert sorted(by_range) == [(1, 20), (21, 40)]
    assert not one_rotation(by_range[(1, 20)], by_range[(21, 40)])
    wedges = ExperimentListFactory.from_json_file(
        os.path.join(os.path.dirname(__file__), "data", "l_cysteine_wedges", "complete", "integrated.expt"),
        check_format=False)
    assert [one_rotation(wedges[i], wedges[i + 1]) for i in range(3)] == [False] * 3


@pytest.mark.slow
def test_a_sweep_going_on_in_another_folder_measures_the_boundary_once(tiny, tmp_path):
    """The tiny sweep's files in two folders, no image missing: two blocks
    (each folder is read as its own sequence), and each reflection whose
    rocking curve spans images 20 and 21 is one row, as across a gap."""
    from dials_gapfill.simulation.compare import load
    from dials_gapfill.stages.integration import gap_partial_pairs

    out = str(tmp_path / "out")
    process_ok(list(_split_over_folders(tiny, tmp_path)), out)
    experiments, reflections = load(out)
    assert [e.scan.get_image_range() for e in experiments] == [(1, 20), (21, 40)]
    with open(os.path.join(out, "dials.process_gapped.json")) as fh:
        summary = json.load(fh)
    combined = reflections["gap_combined"].count(True)
    assert combined == summary["totals"]["gap_combined"] > 100
    assert gap_partial_pairs(experiments, reflections) == []  # none left in two parts
