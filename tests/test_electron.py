"""Electron diffraction with crystal-tracking frames (cRED / 3D ED; the case
behind dials/dials#2339): gaps.exclude_images_multiple, tracking frames
found automatically, and simulated cRED sweeps processed to an MTZ against
the truth.

The fast tests run import, spot finding and the bad-image stage in this
process on 60 simulated frames (every 20th a tracking frame); the slow ones
run dials.process_gapped with phil/electron_diffraction.phil on 80 frames.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np
import pytest

from conftest import NPROC, ROOT, process, process_ok

ED = dict(n_images=60, seed=3)  # frames 20, 40 and 60 are tracking frames
ED_LONG = dict(n_images=80, seed=3)  # 20, 40, 60, 80
PHIL = os.path.join(ROOT, "phil", "electron_diffraction.phil")
MULTIPLE = "gaps.exclude_images_multiple=20"


class EDSweeps:
    """One simulated cRED sweep without tracking, and variants whose tracking
    frames are missing or present as defocused, blank or zero-filled files
    (the other frames are symlinks: every frame has its own random stream,
    so they are the same frames)."""

    def __init__(self, config, root):
        from dials_gapfill.simulation.electron import EDSimulationConfig, simulate_ed

        self.config, self.root = config, root
        self.complete = str(root.mktemp("ed_complete"))
        self.truth = simulate_ed(EDSimulationConfig(tracking="none", **config), self.complete)
        self._cache = {}

    def files(self, folder):
        return sorted(glob.glob(os.path.join(folder, "*.img")))

    def with_tracking(self, mode, replace=None):
        """Folder of the sweep whose tracking frames are `mode`; `replace`:
        {image: bytes} written instead of those frames."""
        from dials_gapfill.simulation.electron import EDSimulationConfig, ed_simulation

        key = (mode, tuple(sorted((replace or {}).items())))
        if key in self._cache:
            return self._cache[key]
        config = EDSimulationConfig(tracking=mode, **self.config)
        d = str(self.root.mktemp(f"ed_{mode}"))
        sim = None
        for name in self.truth["files"]:
            n = int(name.split("_")[-1].split(".")[0])
            path = os.path.join(d, name)
            if replace and n in replace:
                with open(path, "wb") as fh:
                    fh.write(replace[n])
            elif n in config.tracking_frames:
                if mode == "missing":
                    continue
                sim = sim or ed_simulation(config)
                with open(path, "wb") as fh:
                    fh.write(sim.image_bytes(n))
            else:
                os.symlink(os.path.join(self.complete, name), path)
        self._cache[key] = d
        return d


@pytest.fixture(scope="module")
def ed(tmp_path_factory):
    return EDSweeps(ED, tmp_path_factory)


def _stages(images, *phil, stop="indexing"):
    """The pipeline's stages before `stop`, in this process: the state."""
    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from
    from dials_gapfill.validate import validate

    params = params_from([f"mp.nproc={NPROC}", *phil])
    validate(params)
    return pipeline.Pipeline(params, images).run(stop_before=stop)


def _blocks(state):
    return [e.scan.get_image_range() for e in state.experiments]


def _not_used(state):
    return {e["image"]: (e["status"], e["reason"], e["by"]) for e in state.report.excluded}


# --------------------------------------------------------------------------
# gaps.exclude_images_multiple
# --------------------------------------------------------------------------


def test_exclude_images_multiple_leaves_out_every_nth_image_unread(ed):
    """Every image whose number is a multiple of 20, as DIALS' option; the
    files are never opened (two of them are broken files here and are not
    reported bad); combined with exclude_images; each with its own reason."""
    broken = {20: b"not an image", 40: open(os.path.join(ed.complete, "ed_00040.img"), "rb").read()[:9000]}
    folder = ed.with_tracking("defocused", replace=broken)
    reason = "gaps.exclude_images_multiple=20"

    state = _stages(ed.files(folder), "exclude_images_multiple=20", stop="spot finding")
    assert _blocks(state) == [(1, 19), (21, 39), (41, 59)]
    assert _not_used(state) == {n: ("excluded", reason, "user") for n in (20, 40, 60)}
    assert state.report.inputs["exclude_images_multiple"] == 20

    state = _stages(ed.files(folder), "exclude_images_multiple=20", "exclude_images=30:31,40", stop="spot finding")
    assert _blocks(state) == [(1, 19), (21, 29), (32, 39), (41, 59)]
    user = ("excluded", "gaps.exclude_images", "user")
    assert _not_used(state) == {20: ("excluded", reason, "user"), 30: user, 31: user, 40: user,
                                60: ("excluded", reason, "user")}
    assert state.report.inputs["exclude_images"] == [[30, 31], [40, 40]]


def test_exclude_images_multiple_short_form_and_parameter_file(tmp_path):
    from dials_gapfill.phil import params_from

    phil = tmp_path / "cred.phil"
    phil.write_text("gaps {\n  exclude_images_multiple = 20\n}\n")
    for params in (params_from(["exclude_images_multiple=20"]), params_from([MULTIPLE]),
                   params_from(phil.read_text())):
        assert params.gaps.exclude_images_multiple == "20"
    assert params_from([]).gaps.exclude_images_multiple is None


@pytest.mark.parametrize("value, problem", [
    ("1", "would leave out every image"),
    ("0", "is below 2"),
    ("-20", "is below 2"),
    ("twenty", "is not a whole number"),
    ("2.5", "is not a whole number"),
    ("20,40", "is not a whole number"),
])
def test_exclude_images_multiple_bad_values_refused(value, problem):
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import params_from
    from dials_gapfill.validate import validate

    with pytest.raises(GapfillError) as e:
        validate(params_from([f"exclude_images_multiple={value}"]))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"gaps.exclude_images_multiple={value}")
    assert problem in message and "e.g. exclude_images_multiple=20" in message


def test_exclude_images_multiple_refused_before_any_work(ed, tmp_path):
    out = tmp_path / "out"
    result = process(ed.complete, str(out), "exclude_images_multiple=1")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "gaps.exclude_images_multiple=1 would leave out every image" in lines[0]
    assert not out.exists()


def test_exclude_images_multiple_applies_to_every_sweep(ed, tmp_path):
    """Two sweeps (two file-name templates): the multiples of each are left
    out; a multiple with no image in a sweep is said."""
    for prefix in ("a", "b"):  # (hard links: a file given twice under two names is used once)
        for n in range(1, 46):
            os.link(os.path.join(ed.complete, f"ed_{n:05d}.img"), tmp_path / f"{prefix}_{n:05d}.img")
    files = sorted(glob.glob(str(tmp_path / "*.img")))
    state = _stages(files, "exclude_images_multiple=20", stop="spot finding")
    assert _blocks(state) == [(1, 19), (21, 39), (41, 45)] * 2
    assert sorted((e["sweep"], e["image"]) for e in state.report.excluded) == [(1, 20), (1, 40), (2, 20), (2, 40)]
    assert {e["reason"] for e in state.report.excluded} == {"gaps.exclude_images_multiple=20"}

    state = _stages(files, "exclude_images_multiple=50", stop="spot finding")
    assert state.report.excluded == []
    assert any("exclude_images_multiple=50 leaves out no image of sweep 1" in w for w in state.report.warnings)


# --------------------------------------------------------------------------
# Tracking frames present as files, found automatically
# --------------------------------------------------------------------------


def test_defocused_tracking_frames_found_as_by_hand(ed):
    """Defocused tracking frames have as many 'spots' as a diffraction frame
    (the blank test cannot see them), but none continues into the frames
    before or after: found and named, the interval suggested, and the result
    is that of exclude_images_multiple=20 (same blocks, the same spots)."""
    folder = ed.with_tracking("defocused")
    auto = _stages(ed.files(folder), stop="detector checks")
    manual = _stages(ed.files(folder), MULTIPLE, stop="detector checks")
    assert _blocks(auto) == _blocks(manual) == [(1, 19), (21, 39), (41, 59)]
    not_used = _not_used(auto)
    assert sorted(not_used) == [20, 40, 60]
    for status, reason, by in not_used.values():
        assert (status, by) == ("bad", "auto")
        assert reason.startswith("not a rotation image (") and "crystal-tracking" in reason
    assert any("exclude_images_multiple=20" in w and "crystal-tracking" in w for w in auto.report.warnings)
    # their spots as found before they were left out (the spots-per-image
    # plot): the count their reason gives
    for n, (_, reason, _) in not_used.items():
        given = int(re.search(r"of its (\d+) strong spots", reason).group(1))
        assert auto.report.per_image[(1, n)]["spots"] == given > 5, (n, reason, auto.report.per_image[(1, n)])
    a, m = auto.reflections, manual.reflections
    assert len(a) == len(m) > 500
    assert list(a["id"]) == list(m["id"]) and list(a["bbox"]) == list(m["bbox"])


@pytest.mark.parametrize("mode, reason", [("blank", "blank image"), ("zero", "all-zero image")])
def test_blank_and_zero_tracking_frames_found(ed, mode, reason):
    state = _stages(ed.files(ed.with_tracking(mode)), stop="detector checks")
    assert _blocks(state) == [(1, 19), (21, 39), (41, 59)]
    not_used = _not_used(state)
    assert sorted(not_used) == [20, 40, 60]
    assert all(s == "bad" and r.startswith(reason) for s, r, _ in not_used.values()), not_used


def test_no_good_frame_excluded_and_no_x_ray_warnings(ed):
    """The sweep without tracking frames: no frame excluded and no data sanity
    warning (a Timepix' empty pixels, 0.4 counts of background, are not dead
    regions; no overloads; no beamstop)."""
    state = _stages(ed.files(ed.complete))
    assert _blocks(state) == [(1, 60)]
    assert state.report.excluded == [] and state.report.warnings == []


def test_dead_regions_counted_in_quanta():
    """The dead-region check sums pixels until a live bin expects 20 quanta,
    not 20 counts: for an integrating camera with 100 counts per electron at
    0.05 electrons per pixel, bins of 20 counts would read 0 four times in
    five and the whole panel would look dead; in quanta none of it is, and a
    96 x 96 region that reads 0 still is."""
    from dials_gapfill.sanity import dead_zeros

    rng = np.random.default_rng(5)
    total = sum(100 * rng.poisson(0.05, (512, 512)) for _ in range(5))
    valid = np.ones(total.shape, bool)
    assert dead_zeros(total, valid, 5, gain=1.0) > 100000
    assert dead_zeros(total, valid, 5, gain=100.0) == 0
    total[100:196, 200:296] = 0  # (found in whole bins of 9 x 9 pixels)
    assert 0.6 * 96**2 < dead_zeros(total, valid, 5, gain=100.0) <= 96**2


# --------------------------------------------------------------------------
# The whole pipeline against the truth (slow)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ed_long(tmp_path_factory):
    return EDSweeps(ED_LONG, tmp_path_factory)


@pytest.fixture(scope="module")
def ed_runs(ed_long, tmp_path_factory):
    """dials.process_gapped with phil/electron_diffraction.phil on the sweep
    without tracking frames, and on the sweep with defocused tracking frames
    left out by exclude_images_multiple=20 and found automatically."""
    defocused = ed_long.with_tracking("defocused")
    runs = {}
    for name, folder, extra in (("none", ed_long.complete, ()), ("multiple", defocused, (MULTIPLE,)),
                                ("auto", defocused, ())):
        out = str(tmp_path_factory.mktemp(f"ed_run_{name}"))
        process_ok(folder, out, PHIL, *extra)
        runs[name] = out
    return runs


def _summary(folder):
    with open(os.path.join(folder, "dials.process_gapped.json")) as fh:
        return json.load(fh)


def _against_truth(folder, truth):
    """(orientation errors, cell error, CC of summation intensities with the
    truth at I/sigma > 3 over the reflections exported, how many)."""
    from dials_gapfill.simulation.compare import (
        cell_error,
        indices_in_truth_basis,
        load,
        orientation_errors,
        summation_against_truth,
    )

    experiments, reflections = load(folder)
    r = reflections.select(reflections.get_flags(reflections.flags.integrated_sum) & (reflections["partiality"] >= 0.4))
    intensity, sigma, true = summation_against_truth(indices_in_truth_basis(experiments, r, truth), truth)
    ok = (sigma > 0) & (intensity > 3 * sigma) & np.isfinite(true)
    return (orientation_errors(experiments, truth), cell_error(experiments[0].crystal, truth),
            float(np.corrcoef(intensity[ok], true[ok])[0, 1]), int(ok.sum()))


@pytest.mark.slow
def test_tracking_frames_left_out_to_an_mtz(ed_runs):
    """Both ways to an MTZ; the images left out listed as what they are (in
    the JSON, which keeps its documented layout, and in the summary)."""
    import jsonschema

    multiple, auto = _summary(ed_runs["multiple"]), _summary(ed_runs["auto"])
    schema = os.path.join(ROOT, "dials_gapfill", "report", "summary_schema.json")
    for run, summary in (("multiple", multiple), ("auto", auto)):
        assert os.path.getsize(os.path.join(ed_runs[run], "integrated.mtz")) > 10000
        jsonschema.validate(summary, json.load(open(schema)))
    with open(os.path.join(ed_runs["multiple"], "dials.process_gapped.log")) as fh:
        assert "20, 40, 60, 80: gaps.exclude_images_multiple=20" in fh.read()
    assert [e["image"] for e in multiple["excluded_images"]] == [20, 40, 60, 80]
    assert {(e["status"], e["reason"], e["by"]) for e in multiple["excluded_images"]} == {
        ("excluded", "gaps.exclude_images_multiple=20", "user")}
    assert multiple["input"]["exclude_images_multiple"] == 20
    assert [e["image"] for e in auto["excluded_images"]] == [20, 40, 60, 80]
    assert all(e["status"] == "bad" and e["reason"].startswith("not a rotation image") for e in auto["excluded_images"])
    blocks = lambda s: [(b["first"], b["last"]) for b in s["blocks"]]  # noqa: E731
    assert blocks(auto) == blocks(multiple) == [(1, 19), (21, 39), (41, 59), (61, 79)]
    assert not [w for w in multiple["warnings"] + auto["warnings"] if "exclude_images_multiple" not in w]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["multiple", "auto"])
def test_against_the_truth_as_without_tracking_frames(ed_runs, ed_long, run):
    """Orientation error against the truth (median, worst over images) at
    most 1.25x that of the same frames without tracking images; the cell
    within 0.5 % (the distance fixed at the headers' camera length, which is
    the true one here); summation intensities correlate with the truth."""
    truth = ed_long.truth
    o_ref, _, _, _ = _against_truth(ed_runs["none"], truth)
    o, cell, cc, n = _against_truth(ed_runs[run], truth)
    assert o["median"] <= 1.25 * o_ref["median"] and o["worst"] <= 1.25 * o_ref["worst"], (o, o_ref)
    assert cell["rel_error_max"] < 0.005 and cell["angle_error_max"] < 0.1, cell
    assert cc >= 0.99 and n > 1000, (cc, n)


def test_the_camera_length_of_a_detector_of_several_panels(ed):
    """geometry.detector.distance= is how a camera length is corrected, and
    dxtbx sets it on a detector of one panel only (an AssertionError on the
    four panels of the 512 x 512 Timepix): named, with the override that
    moves the panels together, which then gives every panel that distance."""
    from dials_gapfill.errors import GapfillError

    images = sorted(glob.glob(os.path.join(ed.complete, "*.img")))[:6]
    with pytest.raises(GapfillError) as info:
        _stages(images, "geometry.detector.distance=530", stop="spot finding")
    message = str(info.value)
    assert message.startswith("geometry.detector.distance needs a detector of one panel; this one has 4: move them "
                              "together with geometry.detector.hierarchy.origin=x,y,z (now "), message
    x, y, z = (float(v) for v in message.split("(now ")[1].split(";")[0].split(","))
    state = _stages(images, f"geometry.detector.hierarchy.origin={x},{y},{-530}", stop="spot finding")
    assert [p.get_distance() for p in state.experiments[0].detector] == pytest.approx([530.0] * 4)
    assert z == pytest.approx(-state.sweeps[0].header_models[1][0].get_distance(), abs=1e-3)


def test_a_wavelength_override_far_from_the_headers_is_warned(ed):
    """geometry.beam.wavelength=1.0 (an X-ray value) on electron data runs to
    the end with a cell 40x too large and RMSDs that look normal: warned at
    import; a correction of the headers' value by a few % is not."""
    images = sorted(glob.glob(os.path.join(ed.complete, "*.img")))[:6]
    header = ed.truth["wavelength"]
    state = _stages(images, "geometry.beam.wavelength=1.0", stop="spot finding")
    assert [w for w in state.report.warnings if w.startswith("geometry.beam.wavelength=1 is ")] == [
        f"geometry.beam.wavelength=1 is {1.0 / header:.3g} times the headers' {header:.5g} Å: the cell scales "
        "with it; check it is the radiation of these images (X-rays 0.5-2 Å, electrons of 200-300 kV "
        "0.020-0.025 Å)"]
    state = _stages(images, f"geometry.beam.wavelength={header * 1.03}", stop="spot finding")
    assert not [w for w in state.report.warnings if "wavelength" in w], state.report.warnings
