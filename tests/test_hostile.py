"""What a new user and a hostile machine hit: blocks of one image, a broken
symbolic link given five ways, a duplicated frame, a killed worker."""

from __future__ import annotations

import json
import os

import pytest

from conftest import assert_block_integrated_by_summation, process_ok


def _import(*phil, positional=()):
    from dials_gapfill.model.state import Report
    from dials_gapfill.phil import working_params
    from dials_gapfill.stages.importer import import_images

    report = Report()
    sweeps, record = import_images(working_params("\n".join(phil)), list(positional))
    report.sync(sweeps, sweeps.experiments())
    report.merge(record)
    return sweeps, report


# ---------------------------------------------------------------------------
# a broken symbolic link: one rule, one true label, whichever way it is given
# ---------------------------------------------------------------------------


@pytest.fixture
def dangling(tiny, tmp_path):
    """The tiny sweep with image 7 a symbolic link to a file that is gone."""
    d = tmp_path / "sweep"
    d.mkdir()
    for name in sorted(os.listdir(tiny)):
        if name.endswith(".cbf"):
            target = str(tmp_path / "gone.cbf") if name == "sim_0007.cbf" else os.path.join(tiny, name)
            os.symlink(target, d / name)
    return d


def _given(d, how):
    """(PHIL, positional arguments) giving the 40 images sim_0001.cbf ... of
    folder `d` the way `how` says."""
    return {
        "folder": ((), [d]),
        "file list": ((), sorted(os.path.join(d, n) for n in os.listdir(d))),
        "glob": ((f"input.images={d}/sim_*.cbf",), []),
        "template": ((f"input.template={d}/sim_####.cbf",), []),
        "xia2 range": ((f"input.image={d}/sim_0001.cbf:1:40",), []),
    }[how]


@pytest.mark.parametrize("how", ["folder", "file list", "glob", "template", "xia2 range"])
def test_a_broken_link_is_an_unreadable_image_however_given(dangling, how):
    phil, positional = _given(str(dangling), how)
    sweeps, report = _import(*phil, positional=positional)
    assert [e.scan.get_image_range() for e in sweeps.experiments()] == [(1, 6), (8, 40)]
    (entry,) = report.excluded
    assert (entry["image"], entry["status"], entry["by"]) == (7, "bad", "auto")
    assert entry["reason"] == f"unreadable: broken symbolic link to {dangling.parent / 'gone.cbf'}"


def test_a_broken_link_without_auto_exclude_is_refused_in_one_line(dangling):
    from dials_gapfill.errors import GapfillError

    with pytest.raises(GapfillError, match=r"image 7 \(.*sim_0007.cbf\) is broken symbolic link to .*: "
                                           r"leave it out with exclude_images=7"):
        _import("gaps.auto_exclude=False", positional=[str(dangling)])


# ---------------------------------------------------------------------------
# a duplicated frame: a bad image with its reason, or one line naming the fix
# ---------------------------------------------------------------------------


@pytest.fixture(params=["copy", "link"])
def duplicated(tiny, tmp_path, request):
    """The tiny sweep with image 10's file copied as image 11, or image 11 a
    link to image 10's file (one file, two image numbers)."""
    import shutil

    d = tmp_path / "sweep"
    d.mkdir()
    for name in sorted(os.listdir(tiny)):
        if name.endswith(".cbf") and name != "sim_0011.cbf":
            os.symlink(os.path.join(tiny, name), d / name)
    if request.param == "copy":
        shutil.copy(os.path.join(tiny, "sim_0010.cbf"), d / "sim_0011.cbf")
    else:
        os.symlink("sim_0010.cbf", d / "sim_0011.cbf")
    return d


@pytest.mark.parametrize("phil", [(), ("geometry.scan.oscillation=0,1",), ("input.template={d}/sim_####.cbf",)],
                         ids=["folder", "oscillation override", "template"])
def test_a_duplicated_frame_is_a_bad_image(duplicated, phil):
    """Its header repeats image 10's angle: dxtbx cannot join it to either
    neighbour; it is left out with that reason, before and whatever the
    geometry override says (which would otherwise hide it)."""
    d = str(duplicated)
    phil = [p.format(d=d) for p in phil]
    sweeps, report = _import(*phil, positional=[] if any("template" in p for p in phil) else [d])
    assert [e.scan.get_image_range() for e in sweeps.experiments()] == [(1, 10), (12, 40)]
    (entry,) = report.excluded
    assert (entry["image"], entry["status"], entry["by"]) == (11, "bad", "auto")
    assert entry["reason"] == "duplicate frame (its header angle 9 deg repeats image 10's)"
    assert not report.warnings


def test_a_duplicated_frame_without_auto_exclude_is_refused_in_one_line(duplicated, tmp_path):
    from conftest import process

    out = tmp_path / "out"
    result = process(str(duplicated), str(out), "gaps.auto_exclude=False")
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert sorted(os.listdir(out)) == ["dials.process_gapped.failed.log"]  # (nothing else written)
    (line,) = result.stderr.strip().splitlines()
    assert (" " + line).split(" (log of this run")[0].endswith("image 11 is a duplicate frame (its header angle 9 deg repeats image 10's): "
                         "leave it out with exclude_images=11 (or set gaps.auto_exclude=True)")
    # and the fix it names works
    sweeps, report = _import("gaps.auto_exclude=False", "gaps.exclude_images=11", positional=[str(duplicated)])
    assert [e.scan.get_image_range() for e in sweeps.experiments()] == [(1, 10), (12, 40)]
    assert [(e["image"], e["status"]) for e in report.excluded] == [(11, "excluded")]


# ---------------------------------------------------------------------------
# every block one image: the default model never fails where per_block does not
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kept", [tuple(range(1, 30, 2)), (1, 10)], ids=["every other image", "images 1 and 10"])
def test_blocks_of_one_image_process_with_defaults(tiny_sweeps, tiny, truth_tiny, tmp_path, kept):
    from dials_gapfill.simulation.compare import load, orientation_errors

    folder = tiny_sweeps.make(omit=[n for n in range(1, 41) if n not in kept], name="one_image_blocks")
    out = str(tmp_path / "out")
    process_ok(folder, out)
    summary = json.load(open(os.path.join(out, "dials.process_gapped.json")))
    assert [(b["first"], b["last"]) for b in summary["blocks"]] == [(n, n) for n in kept]
    assert any("every spot is cut by a gap" in w for w in summary["warnings"])
    assert summary["crystal"]["model"] == "per_block"
    assert summary["totals"]["integrated"] > 300 * len(kept)
    errors = orientation_errors(load(out)[0], truth_tiny)
    assert errors["worst"] < 0.05, errors


def test_the_continuous_model_searches_with_the_cut_spots_when_nothing_else_is_left(tiny_sweeps):
    """Forced onto blocks of one image, the continuous model's lattice search
    has no spot that a gap did not cut: it searches again with all spots and
    says so, rather than failing."""
    import glob

    from dials_gapfill.crystal_model import ContinuousModel
    from dials_gapfill.phil import params_from
    from dials_gapfill.simulation import compare

    folder = tiny_sweeps.make(omit=[n for n in range(1, 41) if n not in (1, 3, 5, 7)], name="four_single_images")
    experiments = compare.import_blocks(sorted(glob.glob(os.path.join(folder, "*.cbf"))))
    spots = compare.strong_spots(experiments, nproc=2)
    model = ContinuousModel(params_from(["nproc=2"]))
    blocks, indexed, record = model.index(experiments, spots)
    assert any("searched again with all" in w for w in record.warnings)
    ok = indexed.get_flags(indexed.flags.indexed) & (indexed["id"] >= 0)
    assert ok.count(True) > 0.9 * len(spots)
    assert len(blocks.crystals()) == 1


def test_more_processes_than_cores_is_warned_about(tmp_path):
    from dials.util.mp import available_cores

    from dials_gapfill.api import _machine_warnings
    from dials_gapfill.phil import params_from

    cores = available_cores()
    (line,) = _machine_warnings(params_from([f"nproc={cores + 62}"]))
    assert f"mp.nproc={cores + 62} is more than the {cores} cores available" in line and f"nproc={cores}" in line
    assert _machine_warnings(params_from([f"nproc={cores}"])) == []
    assert _machine_warnings(params_from([])) == []


@pytest.mark.slow
def test_a_killed_integration_worker_is_named_in_the_message(tiny, tmp_path):
    """One of integration's worker processes killed (as the out-of-memory
    killer would): one line saying so and what to do, not 'check
    integration.*'."""
    import glob
    import signal
    import subprocess
    import time

    import psutil

    from conftest import WORKERS, tool

    out = str(tmp_path / "out")
    proc = subprocess.Popen([tool("dials.process_gapped"), tiny, f"output.directory={out}", f"nproc={WORKERS}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and killed is None:
        logs = glob.glob(os.path.join(out, ".dials.process_gapped.tmp-*.log"))
        if logs and "Modelling reflection profiles" in open(logs[0]).read():
            children = psutil.Process(proc.pid).children()
            if children:
                killed = children[0].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    _, stderr = proc.communicate(timeout=600)
    assert killed is not None, "no worker seen during integration"
    err = stderr.strip()
    assert proc.returncode == 1 and len(err.splitlines()) == 1, err
    assert "integration failed: one of its worker processes was killed (SIGKILL" in err, err
    assert "nproc=" in err and "check integration.*" not in err


@pytest.mark.slow
def test_a_per_block_crystal_covers_images_without_spots_at_a_block_end(tiny_sweeps):
    """Blank images 36-40 kept (auto_exclude=False): DIALS' refiner trims the
    block's scan to the images with spots and refines the crystal's scan
    points over those only.  The per-block model's crystal still has one
    scan point per image of the block (+1), so DIALS predicts it
    scan-varying (its predictor takes a crystal of another length as
    static, silently): the trimmed-off images keep the last refined
    orientation."""
    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from

    blank = tiny_sweeps.make(bad={k: "blank" for k in range(36, 41)}, name="blank_end")
    params = params_from(["nproc=1", "gaps.auto_exclude=False", "refinement.blocks.model=per_block"])
    state = pipeline.Pipeline(params, [blank]).run(stop_before="integration")
    (exp,) = state.experiments
    assert exp.scan.get_image_range() == (1, 40)
    crystal = exp.crystal
    assert crystal.num_scan_points == 41
    last = [crystal.get_A_at_scan_point(k) for k in range(36, 41)]
    assert all(a == last[-1] for a in last)  # held beyond the last refined image
    assert crystal.get_A_at_scan_point(0) != last[-1]  # and scan-varying where it was refined


@pytest.mark.slow
def test_a_block_dials_indexer_leaves_out_is_dropped_as_not_indexed(tiny_sweeps, monkeypatch):
    """DIALS' indexer deletes its last experiment when a refinement
    macro-cycle fails with it, and goes on (Indexer.index); the per-block
    searches take such a result.  The block it left out is dropped as not
    indexed, named and counted, not carried on as processed: here the
    per-block model's result with its last block taken out, as DIALS'
    indexer does (its spots unindexed)."""
    from dials_gapfill import crystal_model, pipeline
    from dials_gapfill.crystal_model.per_block import PerBlockModel
    from dials_gapfill.model.state import Report
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages import indexing

    class LastLeftOut(PerBlockModel):
        def index(self, experiments, reflections):
            found, indexed, record = super().index(experiments, reflections)
            last = len(found) - 1
            sel = indexed["id"] == last
            indexed["id"].set_selected(sel, -1)
            indexed["miller_index"].set_selected(sel, (0, 0, 0))
            indexed.unset_flags(sel, indexed.flags.indexed)
            del found[last]
            indexed.experiment_identifiers().__delitem__(last)
            return found, indexed, record

    gapped = tiny_sweeps.make(omit=(20, 21), name="gap_20_21")
    params = params_from(["nproc=1", "refinement.blocks.model=per_block"])
    state = pipeline.Pipeline(params, [gapped]).run(stop_before="indexing")
    assert [e.scan.get_image_range() for e in state.experiments] == [(1, 19), (22, 40)]
    monkeypatch.setattr(crystal_model, "choose", lambda p, e, s=None: (LastLeftOut(p, s), None))
    record = indexing.run(state)
    assert [e.scan.get_image_range() for e in state.experiments] == [(1, 19)]
    assert set(state.reflections.select(state.reflections["id"] >= 0)["id"]) == {0}
    (sweep,) = state.sweeps
    (dropped,) = sweep.dropped_blocks
    assert (dropped["first"], dropped["last"]) == (22, 40)
    assert "DIALS' indexer left it out" in dropped["reason"] and dropped["stats"]["spots"] > 1000
    assert any("22-40" in w and "dropped" in w for w in record.warnings), record.warnings
    report = Report()
    report.sync(state.sweeps, state.experiments)
    assert {e["image"] for e in report.excluded} == {20, 21} | set(range(22, 41))


@pytest.mark.slow
def test_a_block_without_reference_spots_is_integrated_by_summation(tiny_sweeps, caplog):
    """A block none of whose reference spots is left (here all of block 2's
    flagged bad for refinement, as outlier rejection flags a short block's
    few spots): DIALS' run over several blocks leaves it out ("Removing
    experiment 1"); it is integrated on its own by summation, with the other
    block's profile parameters, and kept in its place."""
    import logging

    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages import integration

    gapped = tiny_sweeps.make(omit=(20, 21), name="gap_20_21")
    state = pipeline.Pipeline(params_from(["nproc=1"]), [gapped]).run(stop_before="integration")
    reference = state.reflections
    second = reference["id"] == 1
    assert second.count(True) > 100
    reference.set_flags(second, reference.flags.bad_for_refinement)
    caplog.set_level(logging.INFO)
    experiments, reflections, record = integration.integrate(
        state.experiments, reference, state.params, state.sweeps, "per_block")
    assert_block_integrated_by_summation(experiments, reflections, record, caplog.text, [(1, 19), (22, 40)], 1, 1000)


# ---------------------------------------------------------------------------
# names dxtbx cannot take: '#' in a folder, bytes that are not UTF-8; backup
# copies beside the images
# ---------------------------------------------------------------------------


def _linked_sweep(tiny, folder):
    """The tiny sweep's images, linked into `folder` (made here)."""
    os.makedirs(folder)
    for name in sorted(os.listdir(tiny)):
        if name.endswith(".cbf"):
            os.symlink(os.path.join(tiny, name), os.path.join(folder, name))
    return folder


@pytest.mark.parametrize("how", ["folder", "file list", "glob", "template", "xia2 range"])
def test_a_hash_in_the_image_folder_is_refused_naming_the_folder(tiny, tmp_path, how):
    """dxtbx takes everything from the first # of a sweep's path to the last
    for the image number: every image of run#2/sim_####.cbf would be
    'not a recognised image format'.  Refused in one line that says why and
    what works, which does: the same folder through a link without '#'."""
    from dials_gapfill.errors import GapfillError

    d = _linked_sweep(tiny, str(tmp_path / "run#2"))
    phil, positional = _given(d, how)
    with pytest.raises(GapfillError) as info:
        _import(*phil, positional=positional)
    assert str(info.value) == (
        f"the folder '{d}' has '#' in its path, which dxtbx reads as an image-number digit: rename the folder, "
        "or give the images from a folder without '#' (a symbolic link to this one works)")
    os.symlink(d, tmp_path / "run2")
    sweeps, report = _import(positional=[str(tmp_path / "run2")])
    assert [e.scan.get_image_range() for e in sweeps.experiments()] == [(1, 40)] and not report.excluded
    # the same in a file name
    named = tmp_path / "named"
    named.mkdir()
    for k in range(1, 41):
        os.symlink(os.path.join(tiny, f"sim_{k:04d}.cbf"), named / f"sim#1_{k:04d}.cbf")
    with pytest.raises(GapfillError) as info:
        _import(positional=[str(named)])
    assert str(info.value) == (
        "the file name 'sim#1_0001.cbf' has '#' in it, which dxtbx reads as an image-number digit: rename the "
        "files, or give them through symbolic links whose names have no '#'")


def test_image_names_that_are_not_utf8_are_refused_before_dxtbx_reads_them(tiny, tmp_path, monkeypatch):
    """A name in another encoding (Latin-1 'café'): dxtbx cannot open it and
    the log cannot hold it.  Named, as the shell writes it, wherever it is
    given: the folder itself (checked with the parameters), or files found
    in a folder or by a glob."""
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import params_from
    from dials_gapfill.validate import validate

    d = _linked_sweep(tiny, str(tmp_path / "caf\udce9"))
    said = f"the path '{tmp_path}/caf\\xe9' is not valid UTF-8 (dxtbx cannot open it, nor the log hold it): rename it"
    for params, images in [([], [d]), ([f"input.images={d}/sim_*.cbf"], []),
                           ([f"input.template={d}/sim_####.cbf"], []), ([f"input.image={d}/sim_0001.cbf:1:40"], [])]:
        with pytest.raises(GapfillError) as info:
            validate(params_from(params), images)
        assert str(info.value).startswith(said), (params, images, str(info.value))
    # relative paths, from a working folder whose name is not UTF-8
    monkeypatch.chdir(d)
    for params, images in [([], ["."]), (["input.images=sim_*.cbf"], []), (["input.template=sim_####.cbf"], []),
                           (["output.directory=out"], [tiny])]:
        with pytest.raises(GapfillError) as info:
            validate(params_from(params), images)
        assert f"'{tmp_path}/caf\\xe9" in str(info.value), (params, images, str(info.value))
    monkeypatch.chdir(tmp_path)
    # a folder with a plain name whose files' names are not UTF-8
    (tmp_path / "cafe").mkdir()
    for n in range(1, 41):
        os.symlink(os.path.join(tiny, f"sim_{n:04d}.cbf"), tmp_path / "cafe" / f"caf\udce9_{n:04d}.cbf")
    for how in ([str(tmp_path / "cafe")], [f"{tmp_path}/cafe/*.cbf"]):
        with pytest.raises(GapfillError) as info:
            _import(positional=how)
        assert str(info.value).startswith(f"the path '{tmp_path}/cafe/caf\\xe9_0001.cbf' is not valid UTF-8"), str(info.value)


def test_backup_and_temporary_copies_in_a_folder_are_not_images(tiny, tmp_path, caplog):
    """sim_0006.cbf.bak (an editor's backup) and a half-copied
    sim_0013.cbf.part in the folder given: left out and named in the log,
    not taken as sweeps of their own (the .bak would be integrated as sweep
    2, the .part would stop the run); so are they from a glob that matches
    other files.  A file named on the command line, or a glob matching only
    such copies, is read whatever its ending."""
    import logging
    import shutil

    d = _linked_sweep(tiny, str(tmp_path / "sweep"))
    shutil.copy(os.path.join(tiny, "sim_0006.cbf"), os.path.join(d, "sim_0006.cbf.bak"))
    with open(os.path.join(tiny, "sim_0013.cbf"), "rb") as fh:
        open(os.path.join(d, "sim_0013.cbf.part"), "wb").write(fh.read(20000))
    for name in ("sim_0020.cbf~", "sim_0021.cbf.orig", "sim_0022.cbf.tmp", "sim_0023.cbf.swp"):
        os.symlink(os.path.join(tiny, "sim_0001.cbf"), os.path.join(d, name))
    open(os.path.join(d, "notes_caf\udce9.txt"), "w").close()  # (named in the log as the shell writes it)
    caplog.set_level(logging.INFO)
    sweeps, report = _import(positional=[d])
    assert [s.template for s in sweeps] == [os.path.join(d, "sim_####.cbf")]
    assert [e.scan.get_image_range() for e in sweeps.experiments()] == [(1, 40)] and not report.excluded
    assert (f"In {d}, not taken as images: notes_caf\\xe9.txt, sim_0006.cbf.bak, sim_0013.cbf.part, sim_0020.cbf~, "
            "sim_0021.cbf.orig, sim_0022.cbf.tmp, sim_0023.cbf.swp") in caplog.text
    sweeps, _ = _import(positional=[d, os.path.join(d, "sim_0006.cbf.bak")])
    assert [s.template for s in sweeps] == [os.path.join(d, "sim_####.cbf"), os.path.join(d, "sim_####.cbf.bak")]
    # a glob that matches the copies as well leaves them out, as the folder does
    caplog.clear()
    sweeps, report = _import(positional=[os.path.join(d, "sim_*")])
    assert [s.template for s in sweeps] == [os.path.join(d, "sim_####.cbf")] and not report.excluded
    assert (f"Matching {d}/sim_*, not taken as images: sim_0006.cbf.bak, sim_0013.cbf.part, sim_0020.cbf~, "
            "sim_0021.cbf.orig, sim_0022.cbf.tmp, sim_0023.cbf.swp") in caplog.text
    sweeps, _ = _import(positional=[os.path.join(d, "*.bak")])  # (asked for by name)
    assert [s.template for s in sweeps] == [os.path.join(d, "sim_####.cbf.bak")]


def test_images_whose_headers_give_a_negative_oscillation_width_are_said_to_be_so(tiny, tmp_path):
    """A rotation recorded in the other sense, written as a negative
    Angle_increment: dxtbx's scan model refuses it, which read as 'not a
    recognised image format'.  Said as what it is, with what works."""
    from dials_gapfill.errors import GapfillError

    d = tmp_path / "reversed"
    d.mkdir()
    for n in range(1, 6):
        data = open(os.path.join(tiny, f"sim_{n:04d}.cbf"), "rb").read()
        start = f"# Start_angle {n - 1:.4f} deg.".encode()
        assert start in data and b"# Angle_increment 1.0000 deg." in data
        data = data.replace(start, f"# Start_angle {6 - n:.4f} deg.".encode())
        (d / f"sim_{n:04d}.cbf").write_bytes(data.replace(b"# Angle_increment 1.0000 deg.",
                                                          b"# Angle_increment -1.0000 deg."))
    with pytest.raises(GapfillError) as info:
        _import(positional=[str(d)])
    assert str(info.value) == (
        "none of the images (sim_####.cbf) can be read: its header gives a negative oscillation width, which dxtbx "
        "cannot read: rewrite the headers with a positive width and the rotation axis inverted")


@pytest.mark.parametrize("phil", [("output.json=sim_0006.cbf",), ("output.log=sim_0001.cbf",),
                                  ("output.per_block_mtz=True", "output.block_mtz=sim_{block:04d}.cbf")])
def test_an_output_that_would_replace_an_input_image_is_refused(tiny, tmp_path, phil):
    """The output folder is the images' folder and an output has an image's
    name: refused before any image is read, every image as it was (the MTZ
    outputs need the .mtz extension, so only other outputs can collide)."""
    import hashlib
    import shutil

    from conftest import process

    d = tmp_path / "images"
    d.mkdir()
    for n in range(1, 7):
        shutil.copy(os.path.join(tiny, f"sim_{n:04d}.cbf"), d)
    before = {f: hashlib.md5((d / f).read_bytes()).hexdigest() for f in os.listdir(d)}
    result = process(str(d), str(d), *phil)
    assert result.returncode == 1
    err = result.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    if "block_mtz" in phil[-1]:
        assert err.startswith("dials.process_gapped: error: output.block_mtz='sim_{block:04d}.cbf' needs the "
                              "extension .mtz"), err
    else:
        name = phil[0].split("=")[1]
        assert err.startswith(f"dials.process_gapped: error: the output {name} would replace the input file "
                              f"{d}/{name}: give that output another name"), err
    assert {f: hashlib.md5((d / f).read_bytes()).hexdigest() for f in before} == before
    assert sorted(os.listdir(d)) == sorted(before)  # (refused before the log is started: nothing written)


@pytest.mark.parametrize("route", ["template", "nexus", "experiments"])
def test_an_output_that_would_replace_an_input_is_refused_on_every_input_route(tiny, tmp_path, route):
    """The same refusal where the images come as a template, as one NeXus
    file, or as an experiment list (an earlier run's integrated.expt, which
    this run's default output.experiments would replace)."""
    import hashlib
    import shutil

    from conftest import process

    d = tmp_path / "in"
    d.mkdir()
    if route == "nexus":
        from dials_gapfill.simulation.nexus_writer import simulate_nexus
        from dials_gapfill.simulation.simulate import SimulationConfig

        simulate_nexus(SimulationConfig(n_images=4, osc_width=0.5, detector="pilatus300k", seed=11), str(d))
        args, name = [str(d / "sim_master.h5"), "output.json=sim_master.h5"], "sim_master.h5"
    else:
        for n in range(1, 7):
            shutil.copy(os.path.join(tiny, f"sim_{n:04d}.cbf"), d)
        if route == "template":
            args, name = [str(d / "sim_####.cbf"), "output.log=sim_0003.cbf"], "sim_0003.cbf"
        else:
            from dxtbx.model.experiment_list import ExperimentListFactory

            files = sorted(str(d / f) for f in os.listdir(d))
            ExperimentListFactory.from_filenames(files).as_file(str(d / "integrated.expt"))
            args, name = [str(d / "integrated.expt")], "integrated.expt"
    before = {f: hashlib.md5((d / f).read_bytes()).hexdigest() for f in os.listdir(d)}
    result = process(args[:1], str(d), *args[1:])
    assert result.returncode == 1
    err = result.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"dials.process_gapped: error: the output {name} would replace the input file "
                          f"{d}/{name}: give that output another name"), err
    assert {f: hashlib.md5((d / f).read_bytes()).hexdigest() for f in os.listdir(d)} == before


def test_a_reader_that_leaves_early_does_not_stop_the_run(tiny, tmp_path):
    """dials.process_gapped ... | head -3 (or a pager quit early): the pipe
    closes under the run, which finishes and writes its files, without a
    traceback (each logging call printed one, then the run stopped with
    BrokenPipeError)."""
    import subprocess

    from conftest import tool

    images = _linked_sweep(tiny, str(tmp_path / "images"))
    for name in os.listdir(images):
        if name.startswith("sim_") and int(name[4:8]) > 8:
            os.remove(os.path.join(images, name))
    out = tmp_path / "out"
    proc = subprocess.Popen([tool("dials.process_gapped"), images, "nproc=1", f"output.directory={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    proc.stdout.close()  # (the reader leaves after one line)
    stderr = proc.stderr.read()
    assert proc.wait(timeout=600) == 0, stderr
    assert first.startswith("DIALS") and "Traceback" not in stderr and "Logging error" not in stderr, stderr
    summary = json.load(open(out / "dials.process_gapped.json"))
    assert [(b["first"], b["last"]) for b in summary["blocks"]] == [(1, 8)]
    assert os.path.getsize(out / "integrated.mtz") > 10000
