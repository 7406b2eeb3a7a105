"""The Python API, xia2-style: process_gapped(images or experiments, params)."""

from __future__ import annotations

import glob
import os

import pytest

pytestmark = pytest.mark.slow


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
    assert result.summary["excluded_images"][0] == {"image": 21, "reason": "gaps.exclude_images", "by": "user"}
    assert result.files == []

    out = tmp_path / "written"
    written = process_gapped(
        [tiny], f"mp.nproc=2\ngaps.exclude_images=21:23\noutput.directory={out}", write_files=True
    )
    names = sorted(os.path.basename(f) for f in written.files)
    assert names == sorted(os.listdir(out)) and "integrated.mtz" in names
    assert "dials.process_gapped.log" not in names  # the log belongs to the command line
    assert written.summary["totals"]["integrated"] == n


def test_api_from_imported_experiments(tiny_sweeps):
    """Start from an ExperimentList (e.g. what dials.import made)."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill import process_gapped

    gapped = tiny_sweeps.make(omit=(10, 11), name="api_gapped")
    experiments = ExperimentListFactory.from_filenames(sorted(glob.glob(os.path.join(gapped, "*.cbf"))))
    assert len(experiments) == 2
    result = process_gapped(experiments=experiments, params="nproc=2 scale=True")
    assert [e.scan.get_image_range() for e in result.experiments] == [(1, 9), (12, 40)]
    assert result.experiments[0].beam is result.experiments[1].beam
    assert [e["image"] for e in result.summary["excluded_images"]] == [10, 11]
    # scaling in process: the scaled data come back too
    scaled_experiments, scaled = result.scaled
    assert len(scaled_experiments) == 2 and "inverse_scale_factor" in scaled
    assert result.summary["scaling"]["cc_half"][0] > 0.9
