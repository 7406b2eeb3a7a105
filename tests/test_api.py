"""The Python API, xia2-style: process_gapped(images or experiments, params)."""

from __future__ import annotations

import glob
import json
import os
import sys

import pytest

from conftest import ROOT


def _imported(folder):
    from dxtbx.model.experiment_list import ExperimentListFactory

    return ExperimentListFactory.from_filenames(sorted(glob.glob(os.path.join(folder, "*.cbf"))))


@pytest.mark.slow
def test_api_from_images_writes_only_when_asked(tiny, tmp_path, monkeypatch):
    from dials_gapfill import process_gapped
    monkeypatch.chdir(tmp_path)
    result = process_gapped(tiny, ["nproc=2", "exclude_images=21:23"])
    assert os.listdir(tmp_path) == []  # nothing written
    assert [e.scan.get_image_range() for e in result.experiments] == [(1, 20), (24, 40)]
    assert len(result.experiments.crystals()) == 2
    assert result.experiments[0].detector is result.experiments[1].detector
    n = len(result.reflections)
    assert n == result.summary["totals"]["integrated"] > 8000
    assert result.reflections.get_flags(result.reflections.flags.integrated_prf).count(True) > 0.8 * n
    first = result.summary["excluded_images"][0]
    assert (first["image"], first["reason"], first["by"]) == (21, "gaps.exclude_images", "user")
    assert result.files == []

    out = tmp_path / "written"
    # an earlier run's files that this run does not write: its log (the API
    # writes none), a failed log and what a failed run kept go when this
    # run's files are committed; a file of the user's stays
    out.mkdir()
    earlier = ["dials.process_gapped.failed.log", "dials.process_gapped.log", "integrated.failed.expt",
               "integrated_3.failed.mtz"]
    for name in earlier + ["notes.txt"]:
        (out / name).write_text("an earlier run's\n")
    # and what its JSON lists, under names this run does not use; scaled.mtz
    # and merged.mtz as it lists them (as dials.export and dials.merge write
    # them, unlisted, they would stay)
    other_names = ["report.html", "b_1_20.mtz", "foo.json", "scaled.mtz", "merged.mtz", "scaled.hkl", "scaled.ins"]
    for name in other_names:
        (out / name).write_text("an earlier run's\n")
    (out / "dials.process_gapped.json").write_text(json.dumps({"program": "dials.process_gapped", "files": [
        {"name": n} for n in other_names + ["../notes.txt", "dials.process_gapped.json"]]}))
    written = process_gapped(
        [tiny], f"mp.nproc=2\ngaps.exclude_images=21:23\noutput.directory={out}", write_files=True
    )
    assert not [name for name in earlier + other_names if (out / name).exists()]
    (out / "notes.txt").unlink()
    # a stage that does not run (scaling, scale=False) is not listed as taking 0.0 s
    assert "scaling" not in [s["name"] for s in written.summary["timing"]["stages"]]
    assert "integration" in [s["name"] for s in written.summary["timing"]["stages"]]
    names = sorted(os.path.basename(f) for f in written.files)
    assert names == sorted(os.listdir(out)) and "integrated.mtz" in names
    assert "dials.process_gapped.log" not in names  # the log belongs to the command line
    assert written.summary["totals"]["integrated"] == n
    # the parameters as changed, the images included: what reproduces the run
    modified = written.summary["parameters"]["modified"]
    assert f'images = "{tiny}"' in modified and "exclude_images = \"21:23\"" in modified, modified
    assert f'images = "{tiny}"' in written.summary["parameters"]["working"]


@pytest.mark.slow
def test_api_from_imported_experiments(tiny_sweeps):
    """Start from an ExperimentList (e.g. what dials.import made): the same
    options as from images, exclude_images included."""
    from dials_gapfill import process_gapped
    gapped = tiny_sweeps.make(omit=(10, 11), name="api_gapped")
    experiments = _imported(gapped)
    assert len(experiments) == 2
    result = process_gapped(experiments=experiments, params=["nproc=2", "scale=True", "exclude_images=25:26"])
    assert [e.scan.get_image_range() for e in result.experiments] == [(1, 9), (12, 24), (27, 40)]
    assert result.experiments[0].beam is result.experiments[1].beam
    excluded = {e["image"]: e["by"] for e in result.summary["excluded_images"]}
    assert excluded == {10: "input", 11: "input", 25: "user", 26: "user"}
    assert result.summary["input"]["exclude_images"] == [[25, 26]]
    # scaling in process: the scaled data come back too
    scaled_experiments, scaled = result.scaled
    assert len(scaled_experiments) == 3 and "inverse_scale_factor" in scaled
    assert result.summary["scaling"]["cc_half"][0] > 0.9


# ----------------------------------------------------------------------------
# refusals, before any work (fast)
# ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("foreseen", [True, False], ids=["gapfill_error", "error_not_foreseen"])
def test_an_error_after_integration_carries_the_integrated_data(tiny, monkeypatch, foreseen):
    """A stage after integration failing (scaling.d_min beyond every
    reflection; or an error nobody foresaw there, raised in its place) gives
    the API caller the integrated data on the error, as the command keeps
    them on disc."""
    from dials_gapfill import process_gapped
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.stages import scaling

    if not foreseen:
        def check_d_min(reflections, d_min):
            raise ZeroDivisionError("float division by zero")

        monkeypatch.setattr(scaling, "check_d_min", check_d_min)
    with pytest.raises(GapfillError if foreseen else ZeroDivisionError) as e:
        process_gapped(tiny, ["nproc=2", "scale=True", "scaling.d_min=100"])
    if foreseen:
        assert "scaling.d_min=100 leaves no reflection" in str(e.value)
        assert str(e.value).endswith("the integrated experiments and reflections are in this error's .result")
    else:
        assert str(e.value) == "float division by zero"
    result = e.value.result
    assert [x.scan.get_image_range() for x in result.experiments] == [(1, 40)]
    n = result.reflections.get_flags(result.reflections.flags.integrated).count(True)
    assert n > 5000 and result.summary["totals"]["integrated"] == len(result.reflections)
    assert result.scaled is None and result.files == []


@pytest.mark.parametrize(
    "param, expected",
    [
        ("geometry.detector.distance=120", "geometry.detector.distance is applied when images are imported"),
        ("geometry.scan.oscillation=0,1", "give it to dials.import, or pass the images instead"),
        ("input.reference_geometry=/x/models.expt", "input.reference_geometry is applied when images"),
        ("format.dynamic_shadowing=True", "format.dynamic_shadowing"),
        ("input.template=/data/x_####.cbf", "give either images or experiments"),
    ],
)
def test_api_refuses_import_options_with_experiments(tiny, param, expected, tmp_path, monkeypatch):
    from dials_gapfill import process_gapped
    from dials_gapfill.errors import GapfillError

    monkeypatch.chdir(tmp_path)
    experiments = _imported(tiny)
    with pytest.raises(GapfillError) as info:
        process_gapped(experiments=experiments, params=[param], write_files=True)
    message = str(info.value)
    assert expected in message and "\n" not in message, message
    assert os.listdir(tmp_path) == []  # refused before any work


def test_experiment_lists_among_the_images_are_read_or_refused_with_one_line(tiny, tmp_path, monkeypatch):
    """An .expt given as images (as DIALS' programs take it) is read as
    experiments=; with images besides it, missing or unreadable it is
    refused before any work, and nothing is written."""
    from dials_gapfill import process_gapped
    from dials_gapfill.api import Job
    from dials_gapfill.errors import GapfillError

    monkeypatch.chdir(tmp_path)
    _imported(tiny).as_file("imported.expt")
    (tmp_path / "broken.expt").write_text('{"__id__": "ExperimentList",')
    with Job(["exclude_images=5:6"], ["imported.expt"]) as job:
        assert job.images == [] and [e.scan.get_image_range() for e in job.experiments] == [(1, 40)]
    with Job(["input.images=imported.expt"]) as job:
        assert list(job.params.input.images) == [] and len(job.experiments) == 1
        assert 'images = "imported.expt"' in job.diff_phil
    cases = [
        (dict(images=["imported.expt", tiny]), "imported.expt is an experiment list: give either images or "
                                               "experiment lists (.expt, as dials.import writes them), not both"),
        (dict(images="imported.expt", params=[f"input.template={tiny}/sim_####.cbf"]), "not both"),
        (dict(images="imported.expt", experiments=_imported(tiny)), "not both"),
        (dict(images="missing.expt"), "no such experiment list: missing.expt: check the path"),
        (dict(images="broken.expt"), "cannot read the experiment list broken.expt ("),
    ]
    before = sorted(os.listdir(tmp_path))
    for kwargs, said in cases:
        with pytest.raises(GapfillError) as info:
            process_gapped(write_files=True, **kwargs)
        assert said in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert sorted(os.listdir(tmp_path)) == before


def test_api_takes_the_tolerances_with_experiments(tiny_sweeps):
    """input.tolerance.* decides which models the blocks of experiments given
    to the API share: two blocks whose wavelengths differ by 5e-6 A share one
    beam within input.tolerance.beam.wavelength=1e-5 and are refused as mixed
    wavelengths within 1e-7."""
    import copy
    import glob

    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.api import check_experiments_params
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages.importer import adopt_experiments

    folder = tiny_sweeps.make(omit=range(15, 18), name="tolerance")

    def blocks():
        files = sorted(glob.glob(os.path.join(folder, "*.cbf")))
        experiments = ExperimentListFactory.from_filenames(files)
        assert [e.scan.get_image_range() for e in experiments] == [(1, 14), (18, 40)]
        beam = copy.deepcopy(experiments[1].beam)  # (dxtbx gave both blocks one beam)
        beam.set_wavelength(beam.get_wavelength() + 5e-6)
        experiments[1].beam = beam
        experiments[1].imageset.set_beam(beam)
        assert experiments[0].beam is not experiments[1].beam
        return experiments

    loose = params_from(["input.tolerance.beam.wavelength=1e-5"])
    check_experiments_params(loose)
    sweeps, _ = adopt_experiments(blocks(), loose)
    (sweep,) = sweeps.sweeps
    assert len(sweep.sources) == 2 and sweep.sources[0].beam is sweep.sources[1].beam
    with pytest.raises(GapfillError, match="mixed wavelengths or beams: images 1-14 and 18-40 differ"):
        adopt_experiments(blocks(), params_from(["input.tolerance.beam.wavelength=1e-7"]))


def test_api_validates_parameters_first(tmp_path, monkeypatch):
    from dials_gapfill import process_gapped
    from dials_gapfill.errors import GapfillError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(GapfillError, match=r"mtz.partiality_threshold=2.0 is not a fraction"):
        process_gapped("/no/such/x_*.cbf", ["mtz.partiality_threshold=2"], write_files=True)
    with pytest.raises(GapfillError, match="give either images or experiments"):
        process_gapped("/no/such/x_*.cbf", experiments=[object()])
    assert os.listdir(tmp_path) == []


def test_api_refuses_a_folder_in_use(tiny, tmp_path):
    from dials_gapfill import process_gapped
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.handlers.outputs import Outputs

    out = tmp_path / "out"
    holder = Outputs(str(out))
    holder.check_writable()
    holder.lock()
    try:
        with pytest.raises(GapfillError, match=f"in use by another dials.process_gapped run \\(pid {os.getpid()}\\)"):
            process_gapped(tiny, [f"output.directory={out}"], write_files=True)
    finally:
        holder.unlock()
    assert os.listdir(out) == []


def test_dials_exiting_inside_a_stage_is_one_error_and_nothing_is_written(tiny, tmp_path, monkeypatch):
    """DIALS code that ends with sys.exit("message") inside a stage (its
    scaler and reflection selection do) stops the run with one GapfillError
    naming the stage: the API caller's interpreter goes on, the folder is
    left as it was and free for the next run.  (The exit is raised in place
    of the spot-finding stage: no DIALS stage exits on the test sweep.)"""
    from dials_gapfill import pipeline, process_gapped
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.handlers import workers

    stage = next(s for s in pipeline.STAGES if s.name == "spot finding")

    def exits(state):
        sys.exit("\nCould not find anything,\nstopping.")

    monkeypatch.setattr(stage, "run", exits)
    out = tmp_path / "out"
    with pytest.raises(GapfillError) as e:
        process_gapped(tiny, [f"output.directory={out}"], write_files=True)
    assert str(e.value) == "spot finding stopped inside DIALS: Could not find anything, stopping."
    assert os.listdir(out) == []
    # the host's own exit (a signal handler's sys.exit(0), raised here in a
    # run in memory) is not DIALS': it goes on, the run's hold on DIALS'
    # workers and the process's one-run lock released
    held = []

    def host_exits(state):
        held.append(workers._held)
        sys.exit(0)

    monkeypatch.setattr(stage, "run", host_exits)
    with pytest.raises(SystemExit) as e:
        process_gapped(tiny, ["nproc=1"])
    assert e.value.code == 0
    assert held == [1] and workers._held == 0
    monkeypatch.setattr(stage, "run", exits)
    with pytest.raises(GapfillError, match="^spot finding stopped inside DIALS: Could not find anything, stopping.$"):
        process_gapped(tiny, ["nproc=1"])


def test_one_run_at_a_time_in_a_process(tiny):
    """Two runs in two threads of one host would undo each other's changes
    to the process (DIALS functions replaced during a stage, stdout and
    stderr captured): the second is refused with one line while the first
    is on, and runs once it has ended."""
    import threading

    from dials_gapfill import process_gapped
    from dials_gapfill.api import Job
    from dials_gapfill.errors import GapfillError

    refused = []

    def second():
        try:
            process_gapped(tiny, ["nproc=1"])
        except GapfillError as e:
            refused.append(str(e))

    with Job(["nproc=1"], [tiny]):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
    assert refused == ["another dials.process_gapped run is active in this process (another thread's, or the "
                       "one this call was made from): run them one after the other, or each in its own process"], refused
    # a Job that fails on entering frees the process for the next
    with pytest.raises(GapfillError):
        with Job(["nproc=1", "mtz.partiality_threshold=2"], [tiny]):
            pass
    with Job(["nproc=1"], [tiny]):
        pass


@pytest.mark.parametrize("params,said", [
    ("output {\n  per_block_mtz = False\n  htm = None\n}\n", ["line 3", "unknown parameter 'output.htm'",
                                                             "did you mean output.html"]),
    ("scale = True\nnproc = 2\n", ["line 1", "unknown parameter 'scale'", "write its full name, scaling.run"]),
    ("mp.nproc=one", ["mp.nproc", "one"]),
    (5, ["params of type int"]),
])
def test_parameters_the_api_cannot_use_are_one_gapfill_error(params, said):
    """PHIL text with an unknown name (the line and the closest names, as the
    command line says of a parameter file), a value that cannot be read, a
    type that is no parameters: one GapfillError, before any work."""
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import params_from

    with pytest.raises(GapfillError) as info:
        params_from(params)
    message = str(info.value)
    assert "\n" not in message
    for text in said:
        assert text in message, (text, message)


def test_the_api_reads_parameter_files_words_and_dicts():
    """Each shipped parameter file's text (comments, quotes, scopes) is
    read as PHIL; one line of words with short forms, spaces round "=", and
    a dict, as the command line reads them."""
    from dials_gapfill.command_line.process_gapped import parse
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import master_phil, params_from

    for name in sorted(os.listdir(os.path.join(ROOT, "phil"))):
        path = os.path.join(ROOT, "phil", name)
        from_text = params_from(open(path).read() + "\nmp.nproc = 1\n")
        from_file, _, _, _ = parse([path, "nproc=1", "/data/x_*.cbf"], master_phil())
        assert master_phil().format(from_text).as_str() == master_phil().format(from_file).as_str(), name
    for given in ("nproc = 3 scale=True", {"nproc": 3, "scale": True}, ["nproc=3", "scale=True"]):
        params = params_from(given)
        assert (params.mp.nproc, params.scaling.run) == (3, True), given
    # on one line a # is part of a word (a template), as on the command line
    for given in ("template=/d/x_####.cbf nproc=3", "input.template=/d/x_####.cbf mp.nproc=3"):
        params = params_from(given)
        assert (params.input.template, params.mp.nproc) == (["/d/x_####.cbf"], 3), given
    assert params_from("mp.nproc = 3 # a comment\nscaling.run = True").mp.nproc == 3  # (PHIL text)
    # braces in a value on one line are words; scopes on one line are PHIL
    assert params_from("output.block_mtz=b_{block}.mtz nproc=4").output.block_mtz == "b_{block}.mtz"
    assert params_from("mp { nproc = 3 }").mp.nproc == 3
    # a list in a dict: the parameter once per item, as on the command line
    given = params_from({"input.images": ["/d/a_*.cbf", "/d/b_*.cbf"], "exclude_images": ["41:45", "81:83"]})
    words = parse(["images=/d/a_*.cbf", "images=/d/b_*.cbf", "exclude_images=41:45", "exclude_images=81:83"],
                  master_phil())[0]
    assert given.input.images == ["/d/a_*.cbf", "/d/b_*.cbf"]
    assert master_phil().format(given).as_str() == master_phil().format(words).as_str()
    with pytest.raises(GapfillError, match=r"^unknown parameter 'outptu.directory=x'; did you mean output.directory"):
        params_from("nproc=1 outptu.directory=x")


def test_experiments_that_cannot_read_their_images_are_refused(tmp_path):
    """Loaded with check_format=False, experiments cannot read their images:
    refused with one line naming the fix, before the folder is touched."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill import process_gapped
    from dials_gapfill.errors import GapfillError

    expt = os.path.join(ROOT, "tests", "data", "l_cysteine_wedges", "complete", "integrated.expt")
    experiments = ExperimentListFactory.from_json_file(expt, check_format=False)
    out = tmp_path / "out"
    with pytest.raises(GapfillError, match=r"check_format=False\): load them with"):
        process_gapped(experiments=experiments, params=[f"output.directory={out}"], write_files=True)
    assert not out.exists()


def test_experiments_whose_sweeps_share_one_goniometer_object_stay_several_sweeps(tiny, tmp_path):
    """dials.import reference_geometry= gives every sweep the reference's one
    goniometer object (and an .expt keeps it one): each sweep is still a
    sweep of its own, its blocks told from the next sweep's."""
    from dials_gapfill.crystal_model.base import sweep_groups
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages.importer import adopt_experiments

    for prefix in ("a", "b"):
        for k in range(1, 11):
            os.symlink(os.path.join(tiny, f"sim_{k:04d}.cbf"), tmp_path / f"{prefix}_{k:04d}.cbf")
    experiments = _imported(str(tmp_path))
    assert len(experiments) == 2
    for exp in experiments:  # (as dials.import's ReferenceGeometryUpdater)
        exp.goniometer = experiments[0].goniometer
        exp.imageset.set_goniometer(experiments[0].goniometer)
    sweeps, _ = adopt_experiments(experiments, params_from(["exclude_images=2:5:6"]))
    blocks = sweeps.experiments()
    assert [(sweeps.sweep_of(e).number, e.scan.get_image_range()) for e in blocks] == [
        (1, (1, 10)), (2, (1, 4)), (2, (7, 10))]
    assert sweep_groups(blocks) == [[0], [1, 2]]
