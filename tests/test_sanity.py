"""Data sanity warnings (dials_gapfill.stages.sanity) on real DIALS outputs.

SNase (../shared/data/snase: stepped stills, 16-bit overloads that wrapped, a
dewarped image whose outside reads 0) must give the warnings; the simulator's
rotation sweeps (complete, gapped, small) must give none.
"""

from __future__ import annotations

import glob
import json
import os

import pytest

from conftest import NPROC, SNASE_GEOMETRY, process, run_forked, tool

from dials_gapfill import sanity
def _import_and_find_spots(images, directory, *geometry):
    """dials.import + dials.find_spots (the DIALS programs); (experiments, strong spots)."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    os.makedirs(directory, exist_ok=True)
    result = run_forked([tool("dials.import"), *images, *geometry], cwd=directory)
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    result = run_forked([tool("dials.find_spots"), "imported.expt", f"nproc={NPROC}"], cwd=directory)
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    experiments = ExperimentListFactory.from_json_file(
        os.path.join(directory, "imported.expt"), check_format=True
    )
    reflections = flex.reflection_table.from_file(os.path.join(directory, "strong.refl"))
    return experiments, reflections


def _integrated(directory):
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    experiments = ExperimentListFactory.from_json_file(
        os.path.join(directory, "integrated.expt"), check_format=False
    )
    reflections = flex.reflection_table.from_file(os.path.join(directory, "integrated.refl"))
    return experiments, reflections


def _snase_files(snase, first, last):
    return [os.path.join(snase, f"snc_newhead_{n:05d}.img.bz2") for n in range(first, last + 1)]


# ---------------------------------------------------------------- detector


def test_snase_detector_warnings(snase, tmp_path):
    """Wrapped overloads and the unmasked zero outside of the dewarped image,
    from spot finding on 10 SNase images."""
    experiments, spots = _import_and_find_spots(_snase_files(snase, 1, 10), str(tmp_path), *SNASE_GEOMETRY)
    stats = sanity.detector_stats(experiments, 5)
    # ../shared/README.md: about 16 wrapped pixels and 107 >= 60000 per image,
    # 44,479 zero pixels per image; the trusted range flags none of them
    assert len(stats["images"]) == 5
    assert 5 <= stats["wrapped"] / 5 <= 40
    assert 80 <= stats["near_ceiling"] / 5 <= 200
    assert stats["zeros"] / 5 == pytest.approx(44479, rel=0.02)
    # the beamstop shadow, a circle of radius about 20 px at (533, 500), is not masked
    assert stats["shadow"]["radius"] == 20 and stats["shadow"]["unmasked"] == 1.0
    assert stats["shadow"]["centre"] == pytest.approx((532.61, 500.53), abs=0.01)
    warnings = sanity.spot_warnings(experiments, spots, None)
    assert len(warnings) == 3, warnings
    assert warnings[0].startswith("wrapped detector overloads") and "65535" in warnings[0]
    assert "read exactly 0" in warnings[1] and "4.2 %" in warnings[1]
    assert warnings[2].startswith("unmasked beamstop shadow") and "untrusted.circle=533,501,25" in warnings[2]
    assert all("\n" not in w for w in warnings)


@pytest.mark.parametrize("omit", [(), tuple(range(15, 19))], ids=["complete", "gapped"])
def test_simulated_sweeps_no_detector_warnings(tiny_sweeps, tmp_path, omit):
    sweep = tiny_sweeps.make(omit=omit, name="sanity_tiny") if omit else tiny_sweeps.complete
    images = sorted(glob.glob(os.path.join(sweep, "*.cbf")))
    experiments, spots = _import_and_find_spots(images, str(tmp_path))
    assert len(experiments) == (2 if omit else 1)
    stats = sanity.detector_stats(experiments, 5)
    assert stats["wrapped"] == 0 and stats["near_ceiling"] == 0 and stats["zeros"] == 0
    assert stats["shadow"] is None
    assert sanity.spot_warnings(experiments, spots, None) == []


def test_sanity_can_be_switched_off(tiny_sweeps, tmp_path):
    from types import SimpleNamespace

    off = SimpleNamespace(sanity=SimpleNamespace(run=False, sample_images=5))
    assert sanity.spot_warnings([], None, off) == []
    assert sanity.integration_warnings([], None, off) == []
    assert sanity.refinement_warnings([], None, off) == []
    # nothing to read or too few reflections: no warning, no exception
    assert sanity.spot_warnings([], None, None) == []
    from dials.array_family import flex

    assert sanity.integration_warnings(None, flex.reflection_table(), None) == []
    assert sanity.refinement_warnings(None, flex.reflection_table(), None) == []


# ---------------------------------------------------------------- integrated


@pytest.mark.slow
def test_snase_stills_warning(snase_processed):
    """SNase images in two blocks, the run of test_export."""
    experiments, reflections = _integrated(snase_processed)
    stats = sanity.stills_statistic(reflections)
    # measured on the whole gapped sweep: edge/centre 0.54 (22 % vs 41 % strong)
    assert stats["ratio"] < 0.65 and stats["z"] > 10, stats
    # the indexed strong spots are predicted mostly near image centres
    # (whole gapped sweep: 2011 within 0.1 image of a boundary vs 7868 of a centre)
    spots = sanity.spot_position_statistic(reflections)
    assert spots["ratio"] < 0.4 and spots["z"] > 10, spots
    early = sanity.refinement_warnings(experiments, reflections, None)
    assert len(early) == 1 and early[0].startswith("stills posing as rotation data"), early
    warnings = sanity.integration_warnings(experiments, reflections, None)
    stills = [w for w in warnings if w.startswith("stills posing as rotation data")]
    assert len(stills) == 1 and "indexed strong spots" in stills[0] and "I/σ > 3" in stills[0], warnings
    # and the background: about 30 % of the fully recorded reflections below -3 sigma
    assert any("I/σ < -3" in w for w in warnings), warnings
    # the run's summary keeps the later word of the check in the earlier's place
    with open(os.path.join(snase_processed, "dials.process_gapped.json")) as fh:
        said = [w for w in json.load(fh)["warnings"] if w.startswith("stills posing as rotation data")]
    assert len(said) == 1 and "I/σ > 3" in said[0], said


def test_a_check_run_again_on_more_data_keeps_one_warning():
    from dials_gapfill.model.state import Record, Report

    report = Report()
    for lines in (["stills posing as rotation data? 10 spots: early", "another warning"],
                  ["stills posing as rotation data? 40 spots; and more: later"]):
        record = Record()
        for line in lines:
            record.warn(line)
        report.merge(record)
    assert report.warnings == ["stills posing as rotation data? 40 spots; and more: later", "another warning"]


@pytest.mark.slow
def test_simulated_sweep_no_integration_warnings(processed):
    """The gapped standard sweep (0.5° images, three blocks): no false alarm."""
    experiments, reflections = _integrated(processed["dir"])
    stats = sanity.stills_statistic(reflections)
    assert 0.9 < stats["ratio"] < 1.1, stats
    assert sanity.spot_position_statistic(reflections)["ratio"] > 0.7
    assert sanity.refinement_warnings(experiments, reflections, None) == []
    assert sanity.integration_warnings(experiments, reflections, None) == []


@pytest.mark.slow
def test_small_gapped_sweep_no_integration_warnings(tiny_sweeps, tmp_path):
    """40 images of 1° with a gap (two small blocks): no false alarm."""
    sweep = tiny_sweeps.make(omit=tuple(range(15, 19)), name="sanity_tiny")
    out = str(tmp_path / "out")
    result = process(sweep, out)
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    experiments, reflections = _integrated(out)
    assert len(experiments) == 2
    assert sanity.refinement_warnings(experiments, reflections, None) == []
    assert sanity.integration_warnings(experiments, reflections, None) == []
    assert "stills posing" not in result.stdout


def test_rows_no_refinement_predicted_do_not_count_as_at_a_boundary():
    """Indexed rows that no refinement job predicted (its outliers) hold
    xyzcal.px (0, 0, 0); a z of 0 is an image boundary.  Stills-like
    predictions (all near image centres) with a tenth such rows give the
    statistic of the predicted rows alone."""
    import random

    from dials.array_family import flex

    rng = random.Random(3)
    rows = [(100.0, 100.0, k + 0.5 + rng.uniform(-0.05, 0.05)) for k in range(400)]

    def table(xyz):
        t = flex.reflection_table()
        t["xyzcal.px"] = flex.vec3_double(xyz)
        t.set_flags(flex.bool(len(t), True), t.flags.indexed)
        return t

    alone = sanity.spot_position_statistic(table(rows))
    assert alone["edge"] == 0 and alone["centre"] == 400
    assert sanity.spot_position_statistic(table(rows + [(0.0, 0.0, 0.0)] * 40)) == alone


def test_a_beamstop_shadow_on_another_panel_is_masked_where_the_warning_says(tmp_path):
    """A 512 x 512 Timepix is four panels, and its beam is not on the first:
    the warning names the panel, and the dials.generate_mask region it gives
    masks the shadow there (given without the panel, the circle masked the
    same pixels of panel 0)."""
    import numpy as np
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.simulation.electron import EDSimulationConfig, ed_simulation

    sim = ed_simulation(EDSimulationConfig(n_images=6, seed=3))
    shadow = None
    files = []
    for n in range(1, 7):
        data = sim.render(n).astype(float)
        if shadow is None:
            detector = sim.detector
            k = next(i for i, p in enumerate(detector) if
                     all(0 <= c < s for c, s in zip(p.get_beam_centre_px(sim.beam.get_s0()), p.get_image_size())))
            fast, slow = detector[k].get_beam_centre_px(sim.beam.get_s0())
            ox, oy = detector[k].get_raw_image_offset()
            yy, xx = np.mgrid[0:data.shape[0], 0:data.shape[1]]
            shadow = (xx + 0.5 - (fast + ox)) ** 2 + (yy + 0.5 - (slow + oy)) ** 2 < 14**2
        data[shadow] *= 0.03
        files.append(str(tmp_path / sim.config.filename(n)))
        with open(files[-1], "wb") as fh:
            fh.write(sim.fmt.encode(sim.config, n, data, os.path.basename(files[-1])))
    assert k != 0
    experiments = ExperimentListFactory.from_filenames(files)
    warnings = [w for w in sanity.spot_warnings(experiments, None, None) if "beamstop" in w]
    assert len(warnings) == 1 and f"on panel {k})" in warnings[0], warnings
    scope = warnings[0].split("a parameter file holding ")[1].split(", so that")[0]
    assert scope.startswith(f"untrusted {{ panel = {k}; circle = "), warnings[0]
    experiments.as_file(str(tmp_path / "imported.expt"))
    (tmp_path / "shadow.phil").write_text(scope + "\n")
    result = run_forked([tool("dials.generate_mask"), "imported.expt", "shadow.phil"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    import pickle

    with open(tmp_path / "pixels.mask", "rb") as fh:
        masks = pickle.load(fh)
    masked = [int((~m.as_numpy_array()).sum()) for m in masks]
    assert masked[k] > 400 and sum(masked) == masked[k], masked  # (a circle of radius 19 or so, on panel k only)
