"""Non-fatal faults: bad images become gaps, small blocks do not stop the run,
and runs are reproducible."""

from __future__ import annotations

import json
import os

import pytest

from conftest import process

pytestmark = pytest.mark.slow

PLANTED = {8: "blank", 16: "zero", 24: "overexposed", 30: "truncated", 33: "corrupt", 36: "garbage"}
REASONS = {
    8: "blank image",
    16: "all-zero image",
    24: "over-exposed image",
    30: "unreadable: truncated file",
    33: "unreadable: corrupt image data",
    36: "unreadable: not a recognised image format",
}


def _summary(out):
    return json.load(open(os.path.join(out, "dials.process_gapped.json")))


def _experiments(out):
    from dxtbx.model.experiment_list import ExperimentListFactory

    return ExperimentListFactory.from_json_file(os.path.join(out, "integrated.expt"), check_format=False)


def _run_ok(images, out, *phil):
    result = process(images, out, *phil)
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    return result


@pytest.fixture(scope="module")
def auto_and_manual(tiny_sweeps, tiny, tmp_path_factory):
    bad_sweep = tiny_sweeps.make(bad=PLANTED, name="planted")
    auto = str(tmp_path_factory.mktemp("auto"))
    manual = str(tmp_path_factory.mktemp("manual"))
    auto_result = _run_ok(bad_sweep, auto)
    _run_ok(tiny, manual, "exclude_images=" + ",".join(str(n) for n in sorted(PLANTED)))
    return auto, manual, auto_result


def test_bad_images_are_found_and_listed(auto_and_manual):
    auto, _, result = auto_and_manual
    excluded = {e["image"]: e for e in _summary(auto)["excluded_images"]}
    assert sorted(excluded) == sorted(PLANTED)
    for n, reason in REASONS.items():
        assert excluded[n]["reason"].startswith(reason), excluded[n]
        assert excluded[n]["by"] == "auto"
    blocks = [(b["first"], b["last"]) for b in _summary(auto)["blocks"]]
    assert blocks == [(1, 7), (9, 15), (17, 23), (25, 29), (31, 32), (34, 35), (37, 40)]
    # the terminal summary lists them with their reasons
    for reason in REASONS.values():
        assert reason in result.stdout


def test_auto_exclusion_equals_exclusion_by_hand(auto_and_manual):
    from dials_gapfill.simulation.compare import compare, load

    auto, manual, _ = auto_and_manual
    result = compare(*load(manual), *load(auto))
    assert result["blocks_a"] == result["blocks_b"]
    assert result["cell_rel_diff_max"] < 1e-6
    assert result["count_rel_diff"] == 0
    assert result["matched"] > 5000 and result["cc"] > 0.99999
    assert abs(result["median_ratio"] - 1) < 1e-6


@pytest.fixture(scope="module")
def one_image_block(tiny_sweeps):
    """Images 21 and 23 missing: image 22 is a block of its own."""
    return tiny_sweeps.make(omit=(21, 23), name="one_image_block")


@pytest.mark.parametrize("mode", ["pooled", "summation"])
def test_small_blocks_do_not_stop_the_run(one_image_block, tmp_path, mode):
    out = str(tmp_path / "out")
    # the 1-image block has ~300 strong spots: ask for more to force the small-block path
    twice = os.path.join(one_image_block, "sim_0005.cbf")
    _run_ok(
        [one_image_block, twice], out,
        "profile.gaussian_rs.min_spots.overall=1000",
        "profile.gaussian_rs.min_spots.per_degree=1000",
        f"integration.small_blocks.profile={mode}",
        "refinement.blocks.model=per_block",  # the per-block model's small-block refinement
        "refinement.blocks.min_images_scan_varying=2",  # (default 1: every block scan-varying, as dials.refine)
    )
    summary = _summary(out)
    blocks = {(b["first"], b["last"]): b for b in summary["blocks"]}
    assert sorted(blocks) == [(1, 20), (22, 22), (24, 40)]
    single = blocks[(22, 22)]
    assert single["n_images"] == 1 and single["integrated"] > 300
    assert single["refinement"] == "static crystal in the scan-varying job"
    crystals = {e.scan.get_image_range(): e.crystal for e in _experiments(out)}

    def spread(crystal):  # largest change of A over the scan points
        A = [crystal.get_A_at_scan_point(k) for k in range(crystal.num_scan_points)]
        return max(abs(a - b) for m in A for a, b in zip(m, A[0]))

    assert spread(crystals[(22, 22)]) == 0  # static, as said
    assert spread(crystals[(1, 20)]) > 1e-6
    assert blocks[(1, 20)]["refinement"] == "scan-varying"
    assert blocks[(1, 20)]["profile"] == "own" and blocks[(1, 20)]["profile_fitted"] > 1000
    if mode == "pooled":
        assert single["profile"] == "pooled over blocks"
        assert single["profile_fitted"] > 0.2 * single["integrated"]
    else:
        assert single["profile"] == "summation only" and single["profile_fitted"] == 0
        assert any("summation intensities" in w for w in summary["warnings"])
    assert any("given twice" in w for w in summary["warnings"])
    # the per-block crystals index in one basis: the partials cut by the
    # gaps are combined (gap_partials=combine, the default), none left apart
    from dials.array_family import flex

    from dials_gapfill.stages.integration import gap_partial_pairs

    reflections = flex.reflection_table.from_file(os.path.join(out, "integrated.refl"))
    assert summary["totals"]["gap_combined"] == reflections["gap_combined"].count(True) > 50
    assert gap_partial_pairs(_experiments(out), reflections) == []


def test_two_runs_give_the_same_mtz(tiny_sweeps, tmp_path):
    """Byte-identical except the times the MTZ library stamps into the file: the
    history record written by DIALS and the COLSRC record of each column
    (images 1-20 of the tiny sweep, with a gap)."""
    import gemmi
    import numpy as np

    sweep = tiny_sweeps.make(omit=(9, 10, *range(21, 41)), name="twice")
    outs = [str(tmp_path / f"run{i}") for i in (1, 2)]
    for out in outs:
        _run_ok(sweep, out)
    a, b = (open(os.path.join(o, "integrated.mtz"), "rb").read() for o in outs)
    assert len(a) == len(b)
    differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    stamps = [a.find(b"From DIALS")]
    start = 0
    while (start := a.find(b"COLSRC", start + 1)) > 0:
        stamps.append(start)
    assert stamps[0] > 0 and len(stamps) == 1 + 17  # 17 columns
    assert all(any(s <= i < s + 80 for s in stamps) for i in differ), differ[:5]  # (the time stamps only)
    ma, mb = (gemmi.read_mtz_file(os.path.join(o, "integrated.mtz")) for o in outs)
    assert np.array_equal(np.array(ma, copy=False), np.array(mb, copy=False))
    for name in ("integrated.expt",):
        assert open(os.path.join(outs[0], name)).read() == open(os.path.join(outs[1], name)).read()


def test_a_block_that_cannot_be_indexed_is_dropped(tiny, tmp_path):
    """Images 24-40 carry headers 30 deg off (a restart with a wrong datum):
    that block does not index with the crystal of the others and is dropped."""
    import dataclasses

    from dials_gapfill.simulation.simulate import Simulation, SimulationConfig, cbf_header_text, encode_minicbf

    from conftest import TINY

    config = SimulationConfig(**TINY)
    sim = Simulation(config)
    wrong = dataclasses.replace(config, osc_start=config.osc_start + 30.0)
    d = tmp_path / "wrong_start"
    d.mkdir()
    for n in list(range(1, 21)) + list(range(24, 41)):
        header = cbf_header_text(wrong if n >= 24 else config, n)
        (d / config.filename(n)).write_bytes(encode_minicbf(header, sim.render(n), f"img{n}"))
    out = str(tmp_path / "out")
    result = _run_ok(str(d), out)
    summary = _summary(out)
    assert [(b["first"], b["last"]) for b in summary["blocks"]] == [(1, 20)]
    assert summary["dropped_blocks"][0]["first"] == 24 and "indexed" in summary["dropped_blocks"][0]["reason"]
    assert {e["image"] for e in summary["excluded_images"] if e["reason"] == "block could not be indexed"} == set(range(24, 41))
    assert any("starts at 53.00 deg but its image number implies 23.00 deg" in w for w in summary["warnings"])
    assert any("dropped" in w for w in summary["warnings"]) and "dropped" in result.stdout
    assert summary["blocks"][0]["integrated"] > 4000
    # not on the rotation of the first block: per-block crystals instead of one
    assert any("one continuous model needs one rotation" in w for w in summary["warnings"])
