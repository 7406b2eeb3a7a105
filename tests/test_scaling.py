"""The automatic resolution limit of the scaling stage (scaling.resolution.*,
overridden by scaling.d_min): on a simulated sweep whose signal fades before the
detector edge (B = 120 Å², P 41 21 2: CC½ falls through 0.3 near 3.0 Å while the
detector reaches 2.3 Å), and on one that is strong into the detector corners,
where the completeness falloff sets the limit."""

from __future__ import annotations

import json
import os

import gemmi
import pytest

from conftest import process_ok

# scaling.resolution.completeness_falloff's default
FALLOFF = 0.5

# the tiny sweep's geometry, weak at high resolution, with 4-fold symmetry for
# enough repeated observations to measure CC½ in thin shells
WEAK = dict(n_images=40, osc_width=1.0, detector="pilatus300k", distance=150.0, seed=42,
            wilson_b=120.0, space_group="P 41 21 2", unit_cell=(54.0, 54.0, 71.0, 90.0, 90.0, 90.0))


@pytest.fixture(scope="module")
def weak(tmp_path_factory):
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    directory = str(tmp_path_factory.mktemp("weak"))
    simulate(SimulationConfig(**WEAK), directory)
    return directory


@pytest.fixture(scope="module")
def weak_scaled(weak, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("weak_scaled"))
    result = process_ok(weak, out, "scale=True", "shelx=True")
    summary = json.load(open(os.path.join(out, "dials.process_gapped.json")))
    return {"dir": out, "stdout": result.stdout, "scaling": summary["scaling"], "summary": summary}


def _mtz_d_min(path):
    return gemmi.read_mtz_file(path).resolution_high()


def _params(*args, resolution=None):
    """Working parameters; scaling.resolution.* set even where phil.py does not
    (yet) define the scope (the scaling code reads it defensively)."""
    from types import SimpleNamespace

    from dials_gapfill.phil import params_from

    params = params_from(["scale=True", *args])
    if resolution is not None:
        if hasattr(params.scaling, "resolution"):
            for k, v in resolution.items():
                setattr(params.scaling.resolution, k, v)
        else:
            params.scaling.__inject__("resolution", SimpleNamespace(**resolution))
    return params


def _scale_in_process(directory, out, params):
    """scale() in process on a run's integrated.expt/.refl (DIALS outputs), writing the MTZ files."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.handlers.outputs import Outputs
    from dials_gapfill.stages.scaling import scale
    from dials_gapfill.model.state import Report

    experiments = ExperimentListFactory.from_json_file(os.path.join(directory, "integrated.expt"), check_format=False)
    reflections = flex.reflection_table.from_file(os.path.join(directory, "integrated.refl"))
    params.output.directory = out
    outputs = Outputs(out)
    outputs.check_writable()
    report = Report()
    _, record = scale(experiments, reflections, params, outputs)
    report.merge(record)
    outputs.commit()
    return report


@pytest.mark.slow
def test_resolution_limit_from_cc_half(weak_scaled):
    s = weak_scaled["scaling"]
    res = s["resolution"]
    # the limit is where the CC½ fit crosses 0.3, well inside the detector's 2.3 Å
    assert res["method"] == "cc_half" and res["crossed"] and res["cc_half"] == 0.3
    assert 2.7 < res["d_min"] < 3.4, res
    assert res["d_min_data"] < 2.4
    # said on the terminal, with the reason
    assert f"d_min {res['d_min']:.2f} Å from CC½ fit = 0.3" in weak_scaled["stdout"]
    # thousands of repeated measurements for a dozen scale parameters: the
    # merging statistics are not flagged as the fit's own
    model = s["model"]
    assert 0 < model["parameters"] < (s["n_obs"][0] - s["n_unique"][0]) / 5, (model, s["n_obs"], s["n_unique"])
    assert "repeated measurements" not in weak_scaled["stdout"]
    # the merging statistics end at the limit, and their outer shell is more
    # complete and stronger than the corner shell without the cut (47 %
    # complete, I/σ 0.2). The outer shell's own CC½ is not asserted: ~95 unique
    # reflections in a 0.05 Å shell scatter by ±0.15 about the fit's 0.3 (the
    # same intensities cut at 3.06 and 2.97 Å: 0.26 and -0.03).
    assert s["d_min"][0] == pytest.approx(res["d_min"], abs=0.02)
    assert s["completeness"][2] > 75
    assert s["i_over_sigma"][2] > 0.3
    assert s["shells"][-1]["d_min"] == pytest.approx(res["d_min"], abs=0.02)
    # scaled.mtz and merged.mtz end at the same limit
    for name in ("merged.mtz", "scaled.mtz"):
        d = _mtz_d_min(os.path.join(weak_scaled["dir"], name))
        assert res["d_min"] <= d < res["d_min"] + 0.03, (name, d)


@pytest.mark.slow
def test_shelx_files_hold_the_scaled_data(weak_scaled):
    """shelx=True: scaled.hkl holds the reflections of scaled.mtz (the same
    rows; intensities and sigmas up to one scale factor and the format's
    0.01); scaled.ins the wavelength and cell of scaled.mtz, the space group
    dials.symmetry found, and the esds of the one refined cell (ZERR: none
    for the angles P 4 21 2 fixes), within which the cell meets the truth."""
    import numpy as np
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    d, summary = weak_scaled["dir"], weak_scaled["summary"]
    mtz = gemmi.read_mtz_file(os.path.join(d, "scaled.mtz"))
    rows = [line for line in open(os.path.join(d, "scaled.hkl")) if line[:12].split() != ["0", "0", "0"]]
    files = {f["name"]: f for f in summary["files"]}
    assert files["scaled.hkl"]["reflections"] == files["scaled.mtz"]["reflections"] == len(rows) == mtz.nreflections
    hkl = np.array([(int(r[0:4]), int(r[4:8]), int(r[8:12]), float(r[12:20]), float(r[20:28])) for r in rows])
    symmetry = crystal.symmetry(unit_cell=mtz.cell.parameters, space_group_symbol=mtz.spacegroup.hm)
    indices = flex.miller_index([tuple(map(int, h)) for h in hkl[:, :3]])
    asu = np.array(miller.set(symmetry, indices, anomalous_flag=False).map_to_asu().indices())
    columns = [np.array(mtz.column_with_label(c), dtype=float) for c in ("H", "K", "L", "I", "SIGI")]
    k = np.abs(hkl[:, 3]).max() / np.abs(columns[3]).max()  # the scale to SHELX's fixed format
    # the observations of one unique reflection in the same order in both
    # files: by the values as the format rounds them
    ours = sorted(zip(map(tuple, asu), hkl[:, 3], hkl[:, 4]))
    theirs = sorted(zip(map(tuple, np.column_stack(columns[:3]).astype(int)), columns[3], columns[4]),
                    key=lambda t: (t[0], round(k * t[1], 2), round(k * t[2], 2)))
    assert [o[0] for o in ours] == [t[0] for t in theirs]
    i_hkl, s_hkl = np.array([o[1:] for o in ours]).T
    i_mtz, s_mtz = np.array([t[1:] for t in theirs]).T
    tolerance = 0.005 + 2e-6 * np.abs(i_hkl).max()  # the format's rounding; MTZ's float32
    assert np.abs(i_hkl - k * i_mtz).max() <= tolerance and np.abs(s_hkl - k * s_mtz).max() <= tolerance
    ins = {line.split()[0]: line.split()[1:] for line in open(os.path.join(d, "scaled.ins"))}
    symm = [line for line in open(os.path.join(d, "scaled.ins")) if line.startswith("SYMM")]
    cell = [float(v) for v in ins["CELL"]]
    assert cell[0] == pytest.approx(mtz.dataset(1).wavelength, abs=1e-5)
    assert cell[1:] == pytest.approx(list(mtz.cell.parameters), abs=1e-4)
    symmetry_found = summary["scaling"]["symmetry"]
    assert symmetry_found["space_group"] == "P 4 21 2" == mtz.spacegroup.hm and symmetry_found["cb_op"] == "a,b,c"
    assert len(symm) == len(mtz.spacegroup.operations().sym_ops) - 1 == 7
    zerr = [float(v) for v in ins["ZERR"]]
    assert zerr[0] == 8
    # the summary's cell as scaled: the files' cell and esds
    assert summary["scaling"]["unit_cell"] == pytest.approx(cell[1:], abs=1e-3)
    assert summary["scaling"]["unit_cell_esd"] == pytest.approx(zerr[1:], abs=1e-4)
    # reindexed by a,b,c: the esds of the refined cell's lengths
    assert zerr[1:4] == pytest.approx(summary["crystal"]["final"]["unit_cell_esd"][:3], abs=1e-4)
    assert zerr[4:] == [0, 0, 0]
    truth = np.array(WEAK["unit_cell"][:3])
    assert (np.abs(np.array(cell[1:4]) - truth) < 3 * np.array(zerr[1:4])).all(), (cell, zerr)


@pytest.mark.slow
def test_scaling_d_min_overrides(weak_scaled, tmp_path):
    """scaling.d_min wins over the CC½ fit (one scaling, cut at 2.6 Å)."""
    report = _scale_in_process(weak_scaled["dir"], str(tmp_path), _params("scaling.d_min=2.6"))
    res = report.scaling["resolution"]
    assert res["method"] == "user" and res["d_min"] == 2.6
    assert res["message"] == "d_min 2.60 Å from scaling.d_min"
    assert report.scaling["d_min"][0] == pytest.approx(2.6, abs=0.02)
    for name in ("merged.mtz", "scaled.mtz"):
        assert 2.6 <= _mtz_d_min(os.path.join(str(tmp_path), name)) < 2.63


@pytest.mark.slow
def test_completeness_criterion_and_no_cut(weak_scaled, tmp_path):
    """scaling.resolution.completeness cuts the detector corners (DIALS'
    completeness fit); with all criteria off all data are kept, and a shell
    without repeated observations has no CC½ (None, shown "-"), not 0. (The
    completeness falloff is off: on this sweep it cuts at 2.54 Å, next to the
    absolute criterion's 2.55 Å.)"""
    from dials_gapfill.report.merging import merging_table

    report = _scale_in_process(
        weak_scaled["dir"], str(tmp_path / "c"),
        _params(resolution={"cc_half": None, "completeness": 0.5, "completeness_falloff": None}),
    )
    res = report.scaling["resolution"]
    assert res["method"] == "completeness" and res["completeness"] == 0.5
    # the weak sweep's completeness falls to 50 % near 2.6 Å (corner of the detector at 2.3 Å)
    assert 2.4 < res["d_min"] < 2.9, res
    assert res["message"].startswith(f"d_min {res['d_min']:.2f} Å from completeness fit = 0.5")
    assert report.scaling["completeness"][2] > 35
    assert 0 <= _mtz_d_min(os.path.join(str(tmp_path / "c"), "merged.mtz")) - res["d_min"] < 0.03

    report = _scale_in_process(
        weak_scaled["dir"], str(tmp_path / "n"),
        _params(resolution={"cc_half": None, "completeness": None, "completeness_falloff": None}),
    )
    s = report.scaling
    assert s["resolution"]["method"] == "none" and s["resolution"]["d_min"] is None
    assert s["resolution"]["message"].startswith("no resolution cut")
    assert s["d_min"][0] == pytest.approx(s["resolution"]["d_min_data"], abs=0.01)
    for shell in s["shells"]:
        if shell["n_obs"] == shell["n_unique"]:
            assert shell["cc_half"] is None and shell["r_merge"] is None
    table = merging_table(s)
    assert "Resolution limit: no resolution cut" in table


def test_undefined_statistics_without_repeated_observations():
    from types import SimpleNamespace

    from dials_gapfill.stages.scaling import merging_summary

    def shell(d_min, n_obs, n_uniq, cc):
        return SimpleNamespace(
            d_max=d_min + 1, d_min=d_min, n_obs=n_obs, n_uniq=n_uniq, completeness=0.5,
            mean_redundancy=n_obs / n_uniq, i_over_sigma_mean=5.0, cc_one_half=cc,
            r_merge=0.0 if n_obs == n_uniq else 0.1, r_meas=0.0, r_pim=0.0,
        )

    stats = SimpleNamespace(overall=shell(2.0, 300, 150, 0.99), bins=[shell(5.0, 200, 100, 0.99), shell(2.0, 6, 6, 0.0)])
    out = merging_summary(stats)
    assert out["cc_half"] == [0.99, 0.99, None] and out["r_merge"][2] is None
    assert out["shells"][-1]["cc_half"] is None and out["shells"][0]["cc_half"] == 0.99


def test_merging_table_is_dials_table():
    """The summary's table is DIALS' (format_statistics of table_1_stats'
    labels); an undefined statistic is left blank, as DIALS leaves it."""
    from dials.report.analysis import format_statistics

    from dials_gapfill.report.merging import merging_table

    scaling = {
        "symmetry": {"space_group": "P 4 21 2"},
        "d_min": [2.0, 5.0, 2.0], "d_max": [30.0, 30.0, 2.1], "completeness": [99.0, 98.0, 97.0],
        "multiplicity": [3.0, 3.1, 1.0], "i_over_sigma": [10.0, 30.0, 1.0], "cc_half": [0.99, 0.995, None],
        "r_merge": [0.05, 0.02, None], "r_meas": [0.06, 0.03, None], "r_pim": [0.03, 0.01, None],
        "n_obs": [300, 100, 6], "n_unique": [100, 30, 6],
        "resolution": {"message": "d_min 2.00 Å from scaling.d_min"},
    }
    text = merging_table(scaling)
    dials_rows = format_statistics({"CC half": [0.99, 0.995, None], "Completeness": [99.0, 98.0, 97.0]})
    assert dials_rows.splitlines()[2] in text.splitlines()  # the CC half row, as DIALS writes it
    assert text.splitlines()[0].startswith("Merging statistics (space group P 4 21 2):")
    assert text.splitlines()[-1] == "Resolution limit: d_min 2.00 Å from scaling.d_min"
    # a caption longer than DIALS' first column (the scaling model named) goes
    # on its own line: the column headings stay over the numbers
    lines = merging_table({**scaling, "model": {"used": "physical"}}).splitlines()
    assert lines[0] == "Merging statistics (space group P 4 21 2, scaling model physical):"
    assert lines[1].index("Overall") < lines[2].index("2.00") + 4 < lines[1].index("Low"), lines[:3]


@pytest.mark.parametrize("op, space_group", [("a,b,c", "P 1"), ("b,c,a", "P 1"), ("a+b,-a+b,c", "P 1"),
                                              ("a,b,c", "P 4")])
def test_cell_esds_follow_the_reindexing(op, space_group):
    """cell_esd_in (the .ins file's ZERR): the unchanged basis gives dxtbx's
    own esds; another basis gives what 20000 draws of B from its covariance
    give there (within 5 %); an angle the space group fixes has none."""
    import numpy as np
    from cctbx import sgtbx, uctbx
    from dxtbx.model import Crystal

    from dials_gapfill.stages.scaling import cell_esd_in

    rng = np.random.default_rng(3)
    tetragonal = space_group == "P 4"
    cell = (54.0, 54.0, 71.0, 90, 90, 90) if tetragonal else (5.42, 8.13, 12.02, 90.2, 89.7, 90.1)
    uc = uctbx.unit_cell(cell)
    ortho = np.array(uc.orthogonalization_matrix()).reshape(3, 3)
    crystal = Crystal(*ortho.T.tolist(), sgtbx.space_group_info("P 1").group())
    b = np.array(crystal.get_B())
    half = rng.normal(size=(9, 9)) * 2e-4 * np.abs(b).max()
    covariance = half @ half.T
    crystal.set_B_covariance(tuple(covariance.ravel()))
    basis = crystal.change_basis(sgtbx.change_of_basis_op(op))
    if tetragonal:
        basis.set_space_group(sgtbx.space_group_info(space_group).group())
    esd = np.array(cell_esd_in(crystal, basis))
    if op == "a,b,c" and not tetragonal:
        assert esd == pytest.approx(np.array(crystal.get_cell_parameter_sd()), rel=1e-5)
    m = np.linalg.inv(np.array(crystal.get_A()).reshape(3, 3)) @ np.array(basis.get_A()).reshape(3, 3)
    reindexed = rng.multivariate_normal(b, covariance, size=20000).reshape(-1, 3, 3) @ m
    g = np.linalg.inv(np.transpose(reindexed, (0, 2, 1)) @ reindexed)  # the metric tensors
    lengths = np.sqrt(np.stack([g[:, 0, 0], g[:, 1, 1], g[:, 2, 2]], axis=1))
    angles = [np.degrees(np.arccos(g[:, i, j] / (lengths[:, i] * lengths[:, j]))) for i, j in ((1, 2), (0, 2), (0, 1))]
    spread = np.std(np.column_stack([lengths, *angles]), axis=0)
    if tetragonal:
        assert list(esd[3:]) == [0, 0, 0]
        assert esd[:3] == pytest.approx(spread[:3], rel=0.05)
    else:
        assert esd == pytest.approx(spread, rel=0.05)


# ---------------------------------------------------------------------------
# the completeness falloff: a sweep strong into the detector corners
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corners_scaled(tiny, tmp_path_factory):
    """The tiny sweep (40 x 1°, P 21 21 21, Pilatus 300K at 150 mm) with
    scaling: CC½ is above 0.9 in every shell where it can be measured, out to
    the detector corners at 2.3 Å, whose shells are far less complete than
    the rest."""
    out = str(tmp_path_factory.mktemp("corners_scaled"))
    result = process_ok(tiny, out, "scale=True")
    summary = json.load(open(os.path.join(out, "dials.process_gapped.json")))
    return {"dir": out, "stdout": result.stdout, "scaling": summary["scaling"]}


def _outer_and_median(shells):
    """Completeness of the outer shell and the median of the others (percent)."""
    import statistics

    return shells[-1]["completeness"], statistics.median(s["completeness"] for s in shells[:-1])


@pytest.mark.slow
def test_completeness_falloff_leaves_out_the_corners(corners_scaled):
    s = corners_scaled["scaling"]
    res = s["resolution"]
    assert res["method"] == "completeness_falloff" and res["completeness_falloff"] == FALLOFF, res
    assert res["d_min"] > res["d_min_data"] + 0.1, res
    # the outer shell of the table, as printed and written, is at least half as
    # complete as the median of the shells inside it, and measured more than once
    outer, median = _outer_and_median(s["shells"])
    assert outer >= FALLOFF * median, (outer, median)
    assert (res["outer_completeness"], res["inner_median_completeness"]) == pytest.approx((outer, median))
    assert s["completeness"][2] == pytest.approx(outer)
    assert s["cc_half"][2] is not None and s["shells"][-1]["cc_half"] is not None
    assert s["multiplicity"][2] > 1
    # said on the terminal, with the reason and the numbers
    line = (f"d_min {res['d_min']:.2f} Å from completeness falloff = {FALLOFF:g} (outer shell "
            f"{outer:.0f} % complete, the inner shells' median {median:.0f} %")
    assert line in corners_scaled["stdout"]
    # the statistics and both MTZ files end at the limit
    assert s["d_min"][0] == pytest.approx(res["d_min"], abs=0.02)
    for name in ("merged.mtz", "scaled.mtz"):
        d = _mtz_d_min(os.path.join(corners_scaled["dir"], name))
        assert res["d_min"] <= d < res["d_min"] + 0.03, (name, d)


@pytest.mark.slow
def test_scaling_d_min_overrides_the_falloff(corners_scaled, tmp_path):
    """scaling.d_min keeps the corners if asked (2.4 Å, past the falloff
    limit), and there the outer shell is far less complete than the rest."""
    report = _scale_in_process(corners_scaled["dir"], str(tmp_path), _params("scaling.d_min=2.4"))
    res = report.scaling["resolution"]
    assert corners_scaled["scaling"]["resolution"]["d_min"] > 2.5
    assert res["method"] == "user" and res["d_min"] == 2.4
    assert res["message"] == "d_min 2.40 Å from scaling.d_min"
    assert report.scaling["d_min"][0] == pytest.approx(2.4, abs=0.02)
    assert 2.4 <= _mtz_d_min(os.path.join(str(tmp_path), "merged.mtz")) < 2.43
    outer, median = _outer_and_median(report.scaling["shells"])
    assert outer < FALLOFF * median, (outer, median)


@pytest.mark.slow
def test_no_falloff_cut_without_corner_loss(tiny, tmp_path_factory):
    """The same sweep integrated only to 3.8 Å (prediction.d_min), inside the
    circle the detector inscribes about the beam (3.71 Å): every shell lies
    whole on the detector, the completeness does not fall off, nothing is cut."""
    out = str(tmp_path_factory.mktemp("no_corners"))
    result = process_ok(tiny, out, "scale=True", "prediction.d_min=3.8")
    s = json.load(open(os.path.join(out, "dials.process_gapped.json")))["scaling"]
    res = s["resolution"]
    assert res["method"] == "none" and res["d_min"] is None, res
    assert "completeness does not fall off towards the edge" in res["message"]
    assert res["message"] in result.stdout
    assert s["d_min"][0] == pytest.approx(res["d_min_data"], abs=0.01)
    assert 3.8 <= s["d_min"][0] < 3.9
    outer, median = _outer_and_median(s["shells"])
    assert outer >= FALLOFF * median, (outer, median)


@pytest.mark.parametrize("bad_image", [None, 20])
def test_kb_needs_two_blocks_as_the_bad_images_leave_them(tiny_sweeps, bad_image):
    """scaling.model=KB is judged on the blocks the bad-image stage leaves,
    before indexing: the whole tiny sweep is one block (refused, nothing
    indexed); a zero image found in its middle splits it in two (accepted,
    indexing runs on both)."""
    import glob

    from dials_gapfill import pipeline
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import params_from

    folder = tiny_sweeps.make(bad={bad_image: "zero"} if bad_image else None, name=f"kb_{bad_image}")
    params = params_from(["scale=True", "scaling.model=KB", "nproc=2"])
    run = pipeline.Pipeline(params, sorted(glob.glob(os.path.join(folder, "*.cbf"))))
    if bad_image is None:
        with pytest.raises(GapfillError, match="scaling.model=KB needs two or more blocks"):
            run.run(stop_before="refinement")
        assert [s["name"] for s in run.state.report.stages] == ["import", "spot finding", "bad images",
                                                                 "detector checks"]
        return
    state = run.run(stop_before="refinement")
    assert [e.scan.get_image_range() for e in state.experiments] == [(1, 19), (21, 40)]
    assert "indexing" in [s["name"] for s in state.report.stages]
    assert state.reflections.get_flags(state.reflections.flags.indexed).count(True) > 100


@pytest.mark.parametrize("model", ["KB", "physical"])
def test_merging_statistics_from_the_pairs_that_set_the_scales_are_flagged(tmp_path, model):
    """The four L-cysteine wedges (tests/data/l_cysteine_wedges/complete):
    about ten reflections are measured twice, and the scale parameters of the
    four blocks (KB: 2 each; physical: more) are fitted to those same pairs,
    so CC½ near 1 says nothing about the data: a warning names both counts.
    The counts are DIALS' own: the parameters of the scaled experiments'
    models, the observations and unique reflections of the merging table."""

    from dials_gapfill.stages.scaling import scale

    experiments, reflections = _stored_wedges()
    (scaled, _), record = scale(experiments, reflections, _params(f"scaling.model={model}"), None)
    s = record.scaling
    parameters = sum(c.n_params for e in scaled for c in e.scaling_model.components.values())
    assert s["model"]["parameters"] == parameters >= 2 * len(scaled), s["model"]
    differences = s["n_obs"][0] - s["n_unique"][0]
    assert 0 < differences < 5 * parameters, (differences, parameters)
    flagged = [w for w in record.warnings if "repeated measurements" in w]
    assert len(flagged) == 1, record.warnings
    assert f"rest on {differences} repeated measurements" in flagged[0]
    assert f"the {parameters} scale parameters of the {len(scaled)} blocks" in flagged[0]


def _stored_wedges(setting=None):
    """The four L-cysteine wedges as integrated once
    (tests/data/l_cysteine_wedges/complete): (experiments, reflections), in
    another setting of the crystal where `setting` (as a,b,c) is given."""
    from cctbx import sgtbx
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    folder = os.path.join(os.path.dirname(__file__), "data", "l_cysteine_wedges", "complete")
    experiments = ExperimentListFactory.from_json_file(os.path.join(folder, "integrated.expt"), check_format=False)
    reflections = flex.reflection_table.from_file(os.path.join(folder, "integrated.refl"))
    if setting:
        op = sgtbx.change_of_basis_op(setting)
        for exp in experiments:
            exp.crystal = exp.crystal.change_basis(op)
        reflections["miller_index"] = op.apply(reflections["miller_index"])
    return experiments, reflections


@pytest.mark.parametrize("op", ["a,b,c", "-a,-b,c", "b,a,-c", "a+b,-a+b,c", "a,b+c,c"])
def test_the_reindexing_operator_is_the_one_from_integrated_to_scaled_indices(op):
    """The change of basis the summary gives: from the integrated crystal to
    the one dials.symmetry chose, whatever its minimum cell (the simulated
    electron sweep, beta 87.1 deg: -a,-b,c, where DIALS' subgroup table says
    a,b,c from its minimum cell).  Checked on Miller indices."""
    from cctbx import sgtbx
    from cctbx.array_family import flex
    from dxtbx.model import Crystal

    from dials_gapfill.stages.scaling import reindexing_operator

    before = Crystal((7.5, 0.1, 0.2), (0.3, 11.1, -0.4), (-0.7, 0.2, 13.9), space_group_symbol="P 1")
    cb = sgtbx.change_of_basis_op(op)
    after = before.change_basis(cb)
    found = sgtbx.change_of_basis_op(reindexing_operator(before, after))
    h = flex.miller_index([(1, 2, 3), (-4, 0, 7), (2, -3, -5)])
    assert list(found.apply(h)) == list(cb.apply(h))


def test_the_summary_gives_the_operator_dials_symmetry_applied():
    """The stored L-cysteine integration in another setting (b,c,a): the
    operator in the symmetry record takes each reflection's integrated index
    to the one dials.symmetry gave it."""
    from cctbx import sgtbx

    from dials_gapfill.stages.scaling import determine_symmetry

    experiments, reflections = _stored_wedges("b,c,a")
    _, joint, record = determine_symmetry(experiments, reflections)
    assert record["space_group"] == "P 2 2 2" and record["cb_op"] != "a,b,c"
    assert len(joint) == len(reflections)
    op = sgtbx.change_of_basis_op(record["cb_op"])
    assert list(op.apply(reflections["miller_index"])) == list(joint["miller_index"])


def test_a_diverged_scaling_model_that_is_kept_is_said():
    """The stored L-cysteine integration scaled with scaling.model=physical
    (no other model tried): DIALS leaves out the observations whose scale
    factor came out below 0.001, its own sign of divergence; the run warns,
    with the count the JSON gives."""

    from dials_gapfill.phil import params_from
    from dials_gapfill.stages.scaling import scale

    experiments, reflections = _stored_wedges()
    _, record = scale(experiments, reflections, params_from(["nproc=1", "scale=True", "scaling.model=physical"]), None)
    small = record.scaling["model"]["small_scales"]
    assert small > 10
    said = [w for w in record.warnings if "scale factor came out below 0.001" in w]
    assert said == [f"DIALS' scaling model (physical) left out {small} observations whose scale factor came out "
                    "below 0.001, DIALS' own sign of a model that diverged where too few repeated observations "
                    "hold it"], record.warnings


def test_a_scaling_that_fails_at_the_resolution_limit_leaves_the_first_standing(monkeypatch):
    """The stored L-cysteine integration, scaling.resolution.misigma=30 (a
    limit at 1.01 A): where DIALS' scaling at the limit fails (made to fail
    here; docs/scaling.md has L-cysteine wedges on which the repeat at the
    CC½ limit failed in DIALS for every model), the first scaling, of all
    data, stands, and a warning says why there is no cut."""

    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages import scaling

    real = scaling._run_scaling

    def failing_at_a_limit(params, d_min, *args, **kwargs):
        if d_min:
            raise GapfillError("scaling failed: AssertionError in setup_binner_d_star_sq_step (__init__.py)")
        return real(params, d_min, *args, **kwargs)

    experiments, reflections = _stored_wedges()
    params = params_from(["nproc=1", "scale=True", "scaling.resolution.misigma=30"])
    monkeypatch.setattr(scaling, "_run_scaling", failing_at_a_limit)
    (scaled, joint), record = scaling.scale(experiments, reflections, params, None)
    resolution = record.scaling["resolution"]
    assert resolution["d_min"] is None and resolution["method"] == "none", resolution
    said = [w for w in record.warnings if "scaling again at 1.01 A" in w]
    assert len(said) == 1 and said[0].endswith("the scaled data of the scaling before it are kept"), record.warnings
    assert len(scaled) == record.scaling["blocks"] > 1 and len(joint) > 100


def test_the_symmetry_of_a_chosen_bravais_lattice_is_judged_by_the_intensities():
    """indexing.bravais_lattice gives the crystal a lattice's space group
    (oP: P 2 2 2); that is the metric's symmetry, not yet the intensities':
    dials.symmetry judges it before scaling, as when indexing stayed in P1
    (the stored L-cysteine integration, its crystals set to P 2 2 2)."""
    from cctbx import sgtbx

    from dials_gapfill.phil import params_from
    from dials_gapfill.stages.scaling import scale

    experiments, reflections = _stored_wedges()
    for exp in experiments:
        exp.crystal.set_space_group(sgtbx.space_group_info("P 2 2 2").group())
    _, record = scale(experiments, reflections, params_from(["nproc=1", "scale=True"]), None)
    symmetry = record.scaling["symmetry"]
    assert symmetry["determined"] is True and symmetry["laue_group"] == "P m m m", symmetry
    # a space group given is taken as given
    _, record = scale(experiments, reflections, params_from(["nproc=1", "scale=True", "space_group=P222"]), None)
    assert record.scaling["symmetry"] == {"space_group": "P 2 2 2", "determined": False}


def test_a_block_dials_symmetry_cannot_use_does_not_send_the_run_to_p1():
    """One block with no reflection dials.symmetry's filter keeps (here the
    stored L-cysteine integration in setting b,c,a, block 4's partialities
    set below 0.4): dials.symmetry refuses the whole run ("Some datasets have
    no reflection after prefiltering"); the other blocks' symmetry is found
    and applied to all, block 4's crystal and indices reindexed with the
    same operator, consistently (A h unchanged)."""
    from cctbx import sgtbx
    from scitbx import matrix

    from dials_gapfill.model.state import Record
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages.scaling import _symmetry

    experiments, reflections = _stored_wedges("b,c,a")
    fourth = reflections["id"] == 3
    reflections["partiality"].set_selected(fourth, 0.1)
    record = Record()
    out, table, symmetry = _symmetry(experiments, reflections, params_from(["scale=True"]), record)
    assert symmetry["determined"] and symmetry["space_group"] == "P 2 2 2", (symmetry, record.warnings)
    assert not [w for w in record.warnings if "failed" in w], record.warnings
    assert [str(e.crystal.get_space_group().info()) for e in out] == ["P 2 2 2"] * 4
    op = sgtbx.change_of_basis_op(symmetry["cb_op"])
    assert list(table["miller_index"]) == list(op.apply(reflections["miller_index"]))
    rows = fourth.iselection()[:20]
    before, after = matrix.sqr(experiments[3].crystal.get_A()), matrix.sqr(out[3].crystal.get_A())
    for k in rows:
        a = before * matrix.col(reflections["miller_index"][k])
        b = after * matrix.col(table["miller_index"][k])
        assert (a - b).length() < 1e-3 * a.length()


@pytest.mark.parametrize("which", ["complete", "gapped"])  # (scaled with KB; with the physical model)
def test_writing_mtz_files_leaves_the_crystal_models_as_they_were(tmp_path, which):
    """DIALS' MTZ export turns the models it is given into the Cambridge frame
    in place.  On the four wedges as integrated once: after integrated.mtz,
    the per-block MTZs and the scaled data are written, every block's
    crystal, beam and goniometer are unchanged (the report's orientations
    and the scaling come from them), each per-block MTZ gives its batches the
    orientation integrated.mtz gives them, and scaled.mtz the same ones
    (turned by the reindexing operator only)."""
    import numpy as np
    from cctbx import sgtbx

    from dials_gapfill.handlers.outputs import Outputs
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages.export import export
    from dials_gapfill.stages.scaling import scale

    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    folder = os.path.join(os.path.dirname(__file__), "data", "l_cysteine_wedges", which)
    experiments = ExperimentListFactory.from_json_file(os.path.join(folder, "integrated.expt"), check_format=False)
    reflections = flex.reflection_table.from_file(os.path.join(folder, "integrated.refl"))

    def models():
        return [(list(e.crystal.get_A()), [list(e.crystal.get_A_at_scan_point(i)) for i in range(e.crystal.num_scan_points)],
                 list(e.beam.get_s0()), list(e.goniometer.get_rotation_axis()), list(e.goniometer.get_setting_rotation()))
                for e in experiments]

    before = models()
    params = params_from(["scale=True", "output.per_block_mtz=True", f"output.directory={tmp_path}"])
    outputs = Outputs(str(tmp_path))
    outputs.check_writable()
    files = export(experiments, reflections, params, outputs).files
    (scaled, _), record = scale(experiments, reflections, params, outputs)
    outputs.commit()
    assert models() == before
    assert record.scaling["model"]["used"] == {"complete": "KB", "gapped": "KB, physical"}[which]

    def umats(path):
        return {b.number: np.array(list(b.floats)[6:15]).reshape(3, 3) for b in gemmi.read_mtz_file(str(path)).batches}

    combined = list(umats(tmp_path / "integrated.mtz").values())

    def found(u):
        return min(np.abs(u - c).max() for c in combined) < 1e-5

    block_files = [f["name"] for f in files if f["name"] != "integrated.mtz" and f["name"].endswith(".mtz")]
    assert len(block_files) == len(experiments) > 1, files
    for name in block_files:
        assert all(found(u) for u in umats(tmp_path / name).values()), name
    # scaled.mtz: the same crystal, in the basis the scaling chose (U turned
    # by the same orthogonal matrix Q at every image)
    crystal = experiments[0].crystal
    U = np.array(crystal.get_U()).reshape(3, 3)
    Q = U.T @ np.array(crystal.change_basis(sgtbx.change_of_basis_op(record.scaling["symmetry"]["cb_op"])).get_U()).reshape(3, 3)
    scaled_u = umats(tmp_path / "scaled.mtz")
    assert len(scaled_u) > 40
    assert all(found(u @ Q.T) for u in scaled_u.values()), record.scaling["symmetry"]["cb_op"]


def test_the_cell_as_scaled_is_reported_with_the_files_esds(tmp_path):
    """The summary gives the cell of the scaled data (the setting of
    scaled.mtz, merged.mtz and the SHELX files) with the esds the .ins file's
    ZERR line has; the wedges as integrated once, scaled in process."""
    import numpy as np

    from dials_gapfill.handlers.outputs import Outputs
    from dials_gapfill.phil import params_from
    from dials_gapfill.report.summary import cell_text
    from dials_gapfill.stages.scaling import scale

    experiments, reflections = _stored_wedges()
    outputs = Outputs(str(tmp_path))
    outputs.check_writable()
    _, record = scale(experiments, reflections,
                      params_from(["scale=True", "shelx=True", f"output.directory={tmp_path}"]), outputs)
    outputs.commit()
    s = record.scaling
    ins = {line.split()[0]: [float(v) for v in line.split()[1:]]
           for line in open(tmp_path / "scaled.ins") if line.startswith(("CELL", "ZERR"))}
    assert np.allclose(s["unit_cell"], ins["CELL"][1:], atol=1e-3)
    assert np.allclose(s["unit_cell"], gemmi.read_mtz_file(str(tmp_path / "merged.mtz")).cell.parameters, atol=1e-3)
    assert len(s["unit_cell_esd"]) == 6 and np.allclose(s["unit_cell_esd"], ins["ZERR"][1:], atol=1e-4)
    assert 0 < min(s["unit_cell_esd"][:3])
    assert cell_text(s["unit_cell"], s["unit_cell_esd"]).startswith(f"{s['unit_cell'][0]:.4f}(")
    # 1.5 deg wedges measure no reflection on an axis that a 2-fold screw
    # would extinguish (L-cysteine is P 21 21 21): said, not taken as P 2 2 2
    assert s["symmetry"]["space_group"] == "P 2 2 2"
    assert s["symmetry"]["screw_axes_undetermined"] == ["21a", "21b", "21c"]
    said = [w for w in record.warnings if "screw axes 21a, 21b, 21c would extinguish" in w]
    assert len(said) == 1 and "space group P 2 2 2 is one of several" in said[0], record.warnings


def test_esds_below_the_last_printed_digit_keep_one_significant_digit(tmp_path):
    """An electron-diffraction cell's esd of 0.00004 A: printed so, not 0.0000,
    in the summary and in the .ins file's ZERR line (DIALS writes 4 decimals)."""
    from dials_gapfill.report.summary import cell_text
    from dials_gapfill.stages.scaling import _zerr_digits

    cell, esd = [7.53012, 11.1501, 13.9102, 90.0, 92.9012, 90.0], [3.9e-5, 0.0003, 0.00021, 0.0, 0.0004, 0.0]
    assert cell_text(cell, esd).split() == ["7.53012(0.00004)", "11.1501(0.0003)", "13.9102(0.0002)", "90.0000",
                                            "92.9012(0.0004)", "90.0000"]
    # the angles a known space group fixes: dxtbx's esds of 1e-18 are none
    assert cell_text([54.0082, 62.0112, 71.0119, 90, 90, 90], [0.00497, 0.00611, 1e-5, 4.7e-19, 1.7e-18, 0]).split() \
        == ["54.0082(0.0050)", "62.0112(0.0061)", "71.01190(0.00001)", "90.0000", "90.0000", "90.0000"]
    ins = tmp_path / "x.ins"
    ins.write_text("TITL 14 in P2(1)/n\nCELL  0.02510   7.5301  11.1501  13.9102   90.000   92.901   90.000\n"
                   "ZERR    4.000   0.0000   0.0003   0.0002    0.000    0.000    0.000\nLATT 1\n")
    _zerr_digits(str(ins), esd)
    lines = ins.read_text().splitlines()
    assert lines[2].split() == ["ZERR", "4.000", "0.00004", "0.0003", "0.0002", "0.000", "0.0004", "0.000"]
    assert lines[1].startswith("CELL") and lines[3] == "LATT 1"


def test_dials_scaling_that_exits_is_one_error():
    """DIALS 3.12's scaler ends with sys.exit when no reflection is measured
    twice: the stored L-cysteine integration cut to one observation of each
    reflection (under the lattice's P 2 2 2) stops scaling with a
    GapfillError naming DIALS' reason, not a SystemExit that would end an
    API caller's interpreter."""
    from cctbx import crystal, miller
    from dials.array_family import flex

    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages.scaling import scale

    experiments, reflections = _stored_wedges()
    reflections = reflections.select(reflections.get_flags(reflections.flags.integrated_sum))
    symmetry = crystal.symmetry(experiments[0].crystal.get_unit_cell(), space_group_symbol="P 2 2 2")
    asu = miller.set(symmetry, reflections["miller_index"], anomalous_flag=False).map_to_asu().indices()
    seen, keep = set(), flex.bool(len(reflections), False)
    for i, h in enumerate(asu):
        if h not in seen:
            seen.add(h)
            keep[i] = True
    once = reflections.select(keep)
    assert 50 < len(once) < len(reflections)
    with pytest.raises(GapfillError) as e:
        scale(experiments, once, params_from(["nproc=1", "scale=True"]), None)
    assert str(e.value).startswith("scaling failed: Could not find any cross-dataset connected reflections"), e.value
    assert "\n" not in str(e.value)
