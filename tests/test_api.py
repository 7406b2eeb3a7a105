"""The Python API, xia2-style: process_gapped(images or experiments, params)."""

from __future__ import annotations

import glob
import os

import pytest


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
    # an earlier run's files that this run (no scaling) does not write: its
    # scaled outputs and a failed log go when this run's files are
    # committed; a file of the user's stays
    out.mkdir()
    earlier = ["scaled.mtz", "merged.mtz", "scaled.hkl", "scaled.ins", "dials.process_gapped.failed.log"]
    for name in earlier + ["notes.txt"]:
        (out / name).write_text("an earlier run's\n")
    written = process_gapped(
        [tiny], f"mp.nproc=2\ngaps.exclude_images=21:23\noutput.directory={out}", write_files=True
    )
    assert not [name for name in earlier if (out / name).exists()]
    (out / "notes.txt").unlink()
    # a stage that does not run (scaling, scale=False) is not listed as taking 0.0 s
    assert "scaling" not in [s["name"] for s in written.summary["timing"]["stages"]]
    assert "integration" in [s["name"] for s in written.summary["timing"]["stages"]]
    names = sorted(os.path.basename(f) for f in written.files)
    assert names == sorted(os.listdir(out)) and "integrated.mtz" in names
    assert "dials.process_gapped.log" not in names  # the log belongs to the command line
    assert written.summary["totals"]["integrated"] == n


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


def test_api_takes_the_tolerances_with_experiments(tiny_sweeps):
    """input.tolerance.* decides which models the blocks share: it applies."""
    from dials_gapfill.api import check_experiments_params
    from dials_gapfill.phil import params_from

    check_experiments_params(params_from(["input.tolerance.beam.wavelength=1e-5", "exclude_images=3"]))


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
