"""Bad images wherever they sit, whatever the input: every kind of bad image in
every position a user meets (first block, a later block, the first image after
a gap, the last image before a gap, the sweep's first and last images, two
side by side), from a file list, a template and a NeXus file, is found, named and cut out exactly as if the user had excluded it by
hand: same blocks, same statuses, and the same spot table, row for row.

The cells run the pipeline's first stages (import, spot finding, bad images)
in this process on a 20-image sweep with images 8-9 missing; a few cells run
to the MTZ in test_robustness.py and below (marked slow).
"""

from __future__ import annotations

import glob
import json
import os

import pytest

from conftest import NPROC, Sweeps, process

MATRIX = dict(n_images=20, osc_width=1.0, detector="pilatus300k", distance=150.0, seed=7)
GAP = (8, 9)
POSITIONS = {"first block": 4, "later block": 15, "first after gap": 10, "last before gap": 7}
KINDS = {
    "zero": "all-zero image",
    "blank": "blank image",
    "flare": "over-exposed image",
    "saturated": "saturated image",
    "truncated": "unreadable: truncated file",
    "corrupt": "unreadable: corrupt image data",
}
NEXUS_KINDS = ("zero", "blank", "flare", "saturated")  # a NeXus frame cannot be a broken file


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    return Sweeps(MATRIX, tmp_path_factory)


def _first_stages(images, *phil):
    """Import, spot finding and bad images, in this process: the state."""
    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from

    params = params_from([f"mp.nproc={NPROC}", *phil])
    return pipeline.Pipeline(params, images).run(stop_before="detector checks")


def _inputs(folder, how):
    if how == "file list":
        return sorted(glob.glob(os.path.join(folder, "sim_*.cbf"))), ()
    return [], (f"input.template={os.path.join(folder, 'sim_####.cbf')}",)


def _assert_same(auto, manual, image, reason):
    """`image`: the bad image's number, or a tuple of them."""
    bad = image if isinstance(image, tuple) else (image,)
    blocks = lambda s: [e.scan.get_image_range() for e in s.experiments]  # noqa: E731
    assert blocks(auto) == blocks(manual)
    not_used = {e["image"]: e for e in auto.report.excluded}
    for n in bad:
        assert not_used[n]["status"] == "bad" and not_used[n]["by"] == "auto"
        assert not_used[n]["reason"].startswith(reason), not_used[n]
    others = {n: (e["status"], e["reason"]) for n, e in not_used.items() if n not in bad}
    assert others == {n: (e["status"], e["reason"]) for n, e in
                      ((e["image"], e) for e in manual.report.excluded) if n not in bad}
    a, m = auto.reflections, manual.reflections
    assert len(a) == len(m) > 1000
    assert list(a["id"]) == list(m["id"])
    assert list(a["xyzobs.px.value"]) == list(m["xyzobs.px.value"])
    assert list(a["intensity.sum.value"]) == list(m["intensity.sum.value"])
    assert list(a["bbox"]) == list(m["bbox"])


@pytest.fixture(scope="module")
def manual_runs(sweeps):
    """Hand-excluded runs, by (input, image)."""
    cache = {}

    def get(how, image):
        if (how, image) not in cache:
            folder = sweeps.make(omit=GAP, name="clean")
            images, phil = _inputs(folder, how)
            cache[(how, image)] = _first_stages(images, *phil, f"exclude_images={image}")
        return cache[(how, image)]

    return get


@pytest.mark.parametrize("how", ["file list", "template"])
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_image_equals_exclusion_by_hand(sweeps, manual_runs, kind, position, how):
    image = POSITIONS[position]
    folder = sweeps.make(omit=GAP, bad={image: kind}, name=f"{kind}_{image}")
    images, phil = _inputs(folder, how)
    auto = _first_stages(images, *phil)
    _assert_same(auto, manual_runs(how, image), image, KINDS[kind])


# the sweep's own ends (neighbours on one side only) and two bad images side
# by side; from a file list (the input path does not depend on the position)
ENDS = {"first image": 1, "last image": 20}


@pytest.mark.parametrize("position", ENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_image_at_a_sweep_end_equals_exclusion_by_hand(sweeps, manual_runs, kind, position):
    image = ENDS[position]
    folder = sweeps.make(omit=GAP, bad={image: kind}, name=f"{kind}_{image}")
    images, phil = _inputs(folder, "file list")
    _assert_same(_first_stages(images, *phil), manual_runs("file list", image), image, KINDS[kind])


@pytest.mark.parametrize("kind", ["blank", "flare", "truncated"])
def test_two_bad_images_side_by_side_equal_exclusion_by_hand(sweeps, kind):
    folder = sweeps.make(omit=GAP, bad={3: kind, 4: kind}, name=f"{kind}_3_4")
    images, phil = _inputs(folder, "file list")
    clean, _ = _inputs(sweeps.make(omit=GAP, name="clean"), "file list")
    _assert_same(_first_stages(images, *phil), _first_stages(clean, "exclude_images=3:4"), (3, 4), KINDS[kind])



def test_a_run_of_blank_images_longer_than_the_neighbourhood_equals_exclusion_by_hand(sweeps):
    """A shutter that stayed closed for the later block's last 7 images, with
    gaps.neighbours=3: the images inside the run have only blank neighbours
    (their median is 0), so only the run as a whole, against the images
    before it, shows them blank; all seven are cut as by hand."""
    blank = tuple(range(14, 21))
    folder = sweeps.make(omit=GAP, bad={n: "blank" for n in blank}, name="blank_14_20")
    images, phil = _inputs(folder, "file list")
    clean, _ = _inputs(sweeps.make(omit=GAP, name="clean"), "file list")
    auto = _first_stages(images, *phil, "gaps.neighbours=3")
    _assert_same(auto, _first_stages(clean, "exclude_images=14:20", "gaps.neighbours=3"), blank, KINDS["blank"])
    reasons = {e["image"]: e["reason"] for e in auto.report.excluded}
    assert "one of 7 consecutive such images" in reasons[20], reasons

@pytest.fixture(scope="module")
def nexus_files(tmp_path_factory):
    from dials_gapfill.simulation.nexus_writer import write_nxmx
    from dials_gapfill.simulation.simulate import Simulation, SimulationConfig

    sim = Simulation(SimulationConfig(**MATRIX))
    root = tmp_path_factory.mktemp("nexus_matrix")
    cache = {}

    def get(bad=None):
        key = tuple(sorted((bad or {}).items()))
        if key not in cache:
            sim.config.bad_images = dict(bad or {})
            path = str(root / f"sim_{len(cache)}_master.h5")
            write_nxmx(sim, path, compression=None)
            sim.config.bad_images = {}
            cache[key] = path
        return cache[key]

    return get


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kind", NEXUS_KINDS)
def test_bad_nexus_frame_equals_exclusion_by_hand(nexus_files, kind, position):
    image = POSITIONS[position]
    gap = "exclude_images=%d:%d" % GAP
    auto = _first_stages([nexus_files({image: kind})], gap)
    manual = _first_stages([nexus_files()], f"{gap},{image}")
    # the gap is the user's here: the NeXus file holds every image
    _assert_same(auto, manual, image, KINDS[kind])


def test_bad_images_still_found_after_the_last_round_are_said(sweeps, monkeypatch):
    """Each round leaves out the over-exposed images first, else the others;
    what a look after the last round still finds is kept and said, naming
    the images and why (with one round here: the blank image 15 behind the
    over-exposed 4)."""
    from dials_gapfill.stages import bad_images

    folder = sweeps.make(omit=GAP, bad={4: "overexposed", 15: "blank"}, name="overexposed_4_blank_15")
    state = _first_stages([folder])
    assert {e["image"]: e["status"] for e in state.report.excluded if e["by"] == "auto"} == {4: "bad", 15: "bad"}
    assert not [w for w in state.report.warnings if "look bad too" in w]
    monkeypatch.setattr(bad_images, "ROUNDS", 1)
    state = _first_stages([folder])
    assert {e["image"]: e["status"] for e in state.report.excluded if e["by"] == "auto"} == {4: "bad"}
    (line,) = [w for w in state.report.warnings if "look bad too" in w]
    assert line.startswith("after 1 round of leaving out bad images these look bad too and were kept (image 15: "
                           "blank image (0 strong spots")
    assert line.endswith("check them, and leave them out with gaps.exclude_images if they are")


def test_not_given_is_not_missing(sweeps):
    """Files left out of a list are 'not given'; files that do not exist are
    'missing file'; exclude_images are 'excluded' by the user."""
    complete = sweeps.make(name="complete")
    files = [f for f in sorted(glob.glob(os.path.join(complete, "sim_*.cbf")))
             if int(f[-8:-4]) not in GAP]
    state = _first_stages(files, "exclude_images=15")
    statuses = {e["image"]: (e["status"], e["by"]) for e in state.report.excluded}
    assert statuses == {8: ("not given", "input"), 9: ("not given", "input"), 15: ("excluded", "user")}
    gapped = sweeps.make(omit=GAP, name="clean")
    state = _first_stages([gapped])
    assert {e["image"]: e["status"] for e in state.report.excluded} == {8: "missing file", 9: "missing file"}
    # xia2-style ranges that skip images: not given either
    template = os.path.join(complete, "sim_0001.cbf")
    state = _first_stages([], f"input.image={template}:1:7", f"input.image={template}:10:20")
    assert {e["image"]: e["status"] for e in state.report.excluded} == {8: "not given", 9: "not given"}


@pytest.mark.slow
@pytest.mark.parametrize("kind,position,how,model", [
    ("zero", "later block", "file list", "continuous"),
    ("flare", "first after gap", "template", "continuous"),
    ("blank", "last before gap", "file list", "per_block"),
])
def test_bad_image_run_to_the_mtz_equals_exclusion_by_hand(sweeps, tmp_path, kind, position, how, model):
    """The whole run, to the MTZ, with either crystal model: same blocks,
    same integrated count, same cell."""
    import gemmi

    image = POSITIONS[position]
    bad = sweeps.make(omit=GAP, bad={image: kind}, name=f"{kind}_{image}")
    clean = sweeps.make(omit=GAP, name="clean")
    outs = {}
    for label, folder, extra in (("auto", bad, ()), ("manual", clean, (f"exclude_images={image}",))):
        images, phil = _inputs(folder, how)
        out = str(tmp_path / label)
        result = process(images or [], out, *phil, *extra, f"refinement.blocks.model={model}")
        assert result.returncode == 0, result.stderr + result.stdout[-2000:]
        outs[label] = out
    summaries = {k: json.load(open(os.path.join(v, "dials.process_gapped.json"))) for k, v in outs.items()}
    auto, manual = summaries["auto"], summaries["manual"]
    assert [(b["first"], b["last"]) for b in auto["blocks"]] == [(b["first"], b["last"]) for b in manual["blocks"]]
    assert auto["totals"]["integrated"] == manual["totals"]["integrated"] > 3000
    for x, y in zip(auto["crystal"]["final"]["unit_cell"], manual["crystal"]["final"]["unit_cell"]):
        assert abs(x - y) < 1e-4
    for a, m in zip(auto["blocks"], manual["blocks"]):  # (per block: each block's own crystal)
        assert max(abs(x - y) for x, y in zip(a["unit_cell"], m["unit_cell"])) < 1e-4, (a, m)
        assert max(abs(x - y) for x, y in zip(a["U_mid"], m["U_mid"])) < 1e-6, (a, m)
    mtz = {k: gemmi.read_mtz_file(os.path.join(v, "integrated.mtz")) for k, v in outs.items()}
    assert mtz["auto"].nreflections == mtz["manual"].nreflections
    batches = sorted({int(b) for b in mtz["auto"].column_with_label("BATCH")})
    assert image not in batches and set(GAP).isdisjoint(batches)


# bad images in several sweeps: the last image of the first sweep, the first
# image of a later sweep, the last image before a gap in the third
PLANTED_IN_SWEEPS = {1: {12: "blank"}, 2: {1: "zero"}, 3: {6: "flare"}}


def _three_sweeps(directory, bad):
    import dataclasses

    from dials_gapfill.simulation.multisweep import MultiSweepConfig, default_sweeps, simulate_sweeps
    from dials_gapfill.simulation.simulate import SimulationConfig

    base = SimulationConfig(n_images=12, osc_width=1.0, detector="pilatus300k", distance=150.0, seed=7)
    settings = tuple(
        dataclasses.replace(s, omit=(7,) if k == 3 else (), bad_images=bad.get(k, {}))
        for k, s in enumerate(default_sweeps(3, "kappa"), start=1)
    )
    simulate_sweeps(MultiSweepConfig(base=base, goniometer="kappa", sweeps=settings), directory)
    return directory


@pytest.fixture(scope="module")
def several_sweeps(tmp_path_factory):
    """planted -> the folder of three sweeps with those bad images (each
    simulated once for the module's tests)."""
    made = {}

    def make(planted):
        key = repr(sorted((s, sorted(images.items())) for s, images in planted.items()))
        if key not in made:
            made[key] = _three_sweeps(str(tmp_path_factory.mktemp("three_sweeps")), planted)
        return made[key]

    return make


# runs of all-zero frames (a detector that stopped): to the end of the first
# sweep, from the start of the second
ZERO_RUNS = {1: {n: "zero" for n in range(5, 13)}, 2: {n: "zero" for n in range(1, 9)}}


@pytest.mark.parametrize("planted, expected", [
    (PLANTED_IN_SWEEPS, [(1, 1, 11), (2, 2, 12), (3, 1, 5), (3, 8, 12)]),
    (ZERO_RUNS, [(1, 1, 4), (2, 9, 12), (3, 1, 6), (3, 8, 12)]),
], ids=["one image each", "runs of all-zero frames"])
@pytest.mark.parametrize("how", ["folder", "file list", "templates"])
def test_bad_images_in_several_sweeps_equal_exclusion_by_hand(several_sweeps, planted, expected, how):
    """The blank test compares an image with its neighbours: a run of faulty
    frames is found at its ends, and from there frame by frame; the sweeps
    given as a folder, as all their files or as one template each."""

    def given(folder):
        if how == "folder":
            return [folder], ()
        if how == "file list":
            return sorted(glob.glob(os.path.join(folder, "*.cbf"))), ()
        return [], tuple(f"input.template={os.path.join(folder, f'sim_{k:02d}_####.cbf')}" for k in (1, 2, 3))

    images, phil = given(several_sweeps(planted))
    auto = _first_stages(images, *phil)
    by_hand = ",".join(f"{s}:{n}:{n}" for s, images in planted.items() for n in images)
    images, phil = given(several_sweeps({}))
    manual = _first_stages(images, *phil, f"exclude_images={by_hand}")
    blocks = lambda state: [(state.sweeps.sweep_of(e).number, *e.scan.get_image_range())  # noqa: E731
                            for e in state.experiments]
    assert blocks(auto) == blocks(manual) == expected
    not_used = {(e["sweep"], e["image"]): e for e in auto.report.excluded}
    for sweep, images in planted.items():
        for n, kind in images.items():
            entry = not_used.pop((sweep, n))
            assert entry["status"] == "bad" and entry["by"] == "auto", entry
            assert entry["reason"].startswith(KINDS[kind]), entry
    assert {k: e["status"] for k, e in not_used.items()} == {(3, 7): "missing file"}
    a, m = auto.reflections, manual.reflections
    assert len(a) == len(m) > 1000
    assert list(a["id"]) == list(m["id"])
    assert list(a["xyzobs.px.value"]) == list(m["xyzobs.px.value"])
    assert list(a["intensity.sum.value"]) == list(m["intensity.sum.value"])
