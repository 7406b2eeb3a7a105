"""Bad inputs and faults: each asserts the exit code, the message and the output
folder afterwards.

A fatal case: one line on stderr naming the problem and the fix, exit != 0, no
traceback, no result file under a final name, earlier results intact.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import NPROC, WORKERS, process, tool

PRODUCTS = ("integrated.expt", "integrated.refl", "integrated.mtz", "dials.process_gapped.json",
            "dials.process_gapped.html", "dials.process_gapped.log")
LOG = "dials.process_gapped.log"
FAILED_LOG = "dials.process_gapped.failed.log"


def _seed_old_results(out):
    """Earlier results with the final names, to check they survive a failure."""
    os.makedirs(out, exist_ok=True)
    for name in PRODUCTS:
        with open(os.path.join(out, name), "w") as fh:
            fh.write(f"old {name}\n")


def _check_failure(result, out, expected, code=1):
    err = result.stderr.strip()
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], err)
    assert "Traceback" not in result.stderr + result.stdout
    assert len(err.splitlines()) == 1, err
    assert err.startswith("dials.process_gapped: error: "), err
    for text in expected:
        assert text in err, (text, err)
    if os.path.isdir(out):
        for name in PRODUCTS:  # earlier results untouched, nothing new
            path = os.path.join(out, name)
            assert open(path).read() == f"old {name}\n", name
        leftovers = [f for f in os.listdir(out) if ".tmp-" in f]
        assert not leftovers, leftovers
        assert not glob.glob(os.path.join(out, "integrated_*.mtz"))
    return err


def _write_cbf(directory, config, image, data):
    from dials_gapfill.simulation.simulate import cbf_header_text, encode_minicbf

    path = os.path.join(directory, config.filename(image))
    with open(path, "wb") as fh:
        fh.write(encode_minicbf(cbf_header_text(config, image), data, f"img{image}"))


def _tiny_variant(tiny, tmp_path, name, **changes):
    """A copy of the tiny sweep header geometry with other settings (few images)."""
    from dials_gapfill.simulation.simulate import Simulation, SimulationConfig

    from conftest import TINY

    d = tmp_path / name
    d.mkdir()
    config = SimulationConfig(**{**TINY, **changes})
    sim = Simulation(config)
    for n in config.image_numbers:
        _write_cbf(str(d), config, n, sim.render(n))
    return d, sim


# ----------------------------------------------------------------------------
# fatal cases (most stop before any processing)
# ----------------------------------------------------------------------------


def _case_nonexistent(tiny, tmp_path):
    return ["/no/such/place/image_0001.cbf"], ["no such file or directory", "check the path"]


def _case_empty_glob(tiny, tmp_path):
    return [str(tmp_path / "nothing_*.cbf")], ["no files match", "check the path"]


def _case_empty_folder(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    return [str(tmp_path / "empty")], ["no image files in directory"]


def _case_non_image_among_images(tiny, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("beamline notes")
    return [f"{tiny}/sim_*.cbf", str(notes)], ["not an image", "notes.txt", "remove it"]


def _case_unreadable_without_auto_exclude(tiny, tmp_path):
    d = tmp_path / "sweep"
    shutil.copytree(tiny, d, symlinks=True)
    os.remove(d / "sim_0007.cbf")
    (d / "sim_0007.cbf").write_bytes(b"\x00not an image" * 400)
    return [str(d), "gaps.auto_exclude=False"], ["image 7", "not a readable image", "exclude_images=7"]


def _case_truncated_without_auto_exclude(tiny, tmp_path):
    d = tmp_path / "sweep"
    shutil.copytree(tiny, d, symlinks=True)
    data = open(os.path.join(tiny, "sim_0009.cbf"), "rb").read()
    os.remove(d / "sim_0009.cbf")
    (d / "sim_0009.cbf").write_bytes(data[: len(data) // 3])
    return [str(d), "gaps.auto_exclude=False"], ["image 9", "truncated", "exclude_images=9"]


def _case_all_blank(tiny, tmp_path):
    d, sim = _tiny_variant(tiny, tmp_path, "blank", n_images=12)
    for n in range(1, 13):
        _write_cbf(str(d), sim.config, n, sim.render(n, "blank"))
    return [str(d)], ["no strong spots on any image", "blank"]


def _case_mixed_detectors(tiny, tmp_path):
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    d = tmp_path / "mixed"
    simulate(SimulationConfig(n_images=3, detector="pilatus300k", seed=1), str(d))
    simulate(SimulationConfig(n_images=3, first_image=4, osc_start=1.5, detector="pilatus1m", seed=1), str(d))
    return [f"{d}/sim_*.cbf"], ["mixed detectors", "487x619", "981x1043", "separately"]


def _case_mixed_wavelengths(tiny, tmp_path):
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    d = tmp_path / "mixed"
    simulate(SimulationConfig(n_images=3, detector="pilatus300k", seed=1), str(d))
    simulate(SimulationConfig(n_images=3, first_image=4, osc_start=1.5, detector="pilatus300k", seed=1, wavelength=1.2), str(d))
    return [f"{d}/sim_*.cbf"], ["mixed wavelengths", "0.97950", "1.20000", "separately"]


def _case_another_crystal(tiny, tmp_path):
    """Two sweeps, the second of another crystal (the same cell, another
    orientation): refused at indexing, not processed as one sweep."""
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    d = tmp_path / "two_crystals"
    for prefix, seed in (("a", 42), ("b", 7)):
        simulate(SimulationConfig(n_images=8, osc_width=1.0, detector="pilatus300k", distance=150.0, seed=seed,
                                  prefix=prefix), str(d))
    return [str(d)], ["sweep 2 (b_####.cbf) does not index on the crystal of the other sweeps", "another crystal",
                      "run of its own"]


def _case_another_crystal_per_block(tiny, tmp_path):
    """The same with the per-block model: its lattice search on all blocks
    takes the other crystal here, and names sweep 1."""
    args, _ = _case_another_crystal(tiny, tmp_path)
    return args + ["refinement.blocks.model=per_block"], [
        "does not index on the crystal of the other sweeps", "another crystal", "run of its own"]


def _case_sweep_without_spots(tiny, tmp_path):
    """Three sweeps, every image of the second all-zero: named, not handed
    to the lattice search (which then found no lattice for the other two)."""
    from test_bad_image_matrix import _three_sweeps

    d = _three_sweeps(str(tmp_path / "zero_sweep"), {2: {n: "zero" for n in range(1, 13)}})
    return [d], ["no strong spots on any image of sweep 2 (sim_02_####.cbf; images 1, 7 and 12 of 12 looked at: all-zero image",
                 "leave its files out"]


def _case_sweep_of_blank_images(tiny, tmp_path):
    """The same with every image of the second sweep blank (background
    only): no fault in its pixels, said as blank."""
    from test_bad_image_matrix import _three_sweeps

    d = _three_sweeps(str(tmp_path / "blank_sweep"), {2: {n: "blank" for n in range(1, 13)}})
    return [d], ["no strong spots on any image of sweep 2 (sim_02_####.cbf; blank images, no diffraction)"]


def _case_exclude_outside(tiny, tmp_path):
    return [tiny, "exclude_images=50:60"], ["outside the images", "1-40"]


def _case_exclude_everything(tiny, tmp_path):
    return [tiny, "exclude_images=1:40"], ["no images left"]


def _case_exclude_malformed(tiny, tmp_path):
    return [tiny, "exclude_images=4-6"], ["cannot read '4-6'", "first:last"]


def _case_exclude_reversed(tiny, tmp_path):
    return [tiny, "exclude_images=6:4"], ["first <= last"]


def _case_image_range_reversed(tiny, tmp_path):
    return [tiny, f"image={tiny}/sim_0001.cbf:10:5"], ["input.image=", "last image 5 is before first 10",
                                                 "sim_0001.cbf:5:10"]


def _case_unknown_parameter(tiny, tmp_path):
    return [tiny, "exlude_images=4"], ["unknown parameter", "did you mean", "gaps.exclude_images"]


def _case_wrong_type(tiny, tmp_path):
    return [tiny, "mp.nproc=many"], ["mp.nproc", "many"]


def _case_nproc_zero(tiny, tmp_path):
    return [tiny, "nproc=0"], ["mp.nproc", "minimum"]


def _case_nproc_negative(tiny, tmp_path):
    return [tiny, "nproc=-2"], ["mp.nproc", "minimum"]


def _case_njobs_without_a_cluster(tiny, tmp_path):
    return [tiny, "mp.njobs=2"], ["mp.njobs=2 is the number of cluster jobs", "mp.method=slurm"]


def _case_phil_file_missing(tiny, tmp_path):
    return [tiny, str(tmp_path / "missing.phil")], ["no such parameter file", "missing.phil"]


def _case_phil_file_unreadable(tiny, tmp_path):
    bad = tmp_path / "broken.phil"
    bad.write_text("gaps {\n  exclude_images = 3\n")  # unclosed scope
    return [tiny, str(bad)], ["syntax error", str(bad), "line 1", "no matching"]


def _case_phil_file_syntax_error_line(tiny, tmp_path):
    bad = tmp_path / "typo.phil"
    bad.write_text("# settings\ngaps {\n  exclude_images = 3\n}\n}\nscaling.run = True\n")
    return [tiny, str(bad)], ["syntax error", str(bad), "line 5", "fix that line"]


def _case_phil_file_unknown_parameter(tiny, tmp_path):
    bad = tmp_path / "unknown.phil"
    bad.write_text("scaling.run = True\ngaps.exclud = 4\n")
    return [tiny, str(bad)], [str(bad), "line 2", "unknown parameter 'gaps.exclud'", "gaps.exclude_images"]


def _case_phil_file_is_a_folder(tiny, tmp_path):
    (tmp_path / "settings.phil").mkdir()
    return [tiny, str(tmp_path / "settings.phil")], ["settings.phil"]


def _case_image_folder_not_utf8(tiny, tmp_path):
    d = tmp_path / "caf\udce9"  # (Latin-1 é: the byte 0xe9 in the name)
    shutil.copytree(tiny, d, symlinks=True)
    return [str(d)], [f"the path '{tmp_path}/caf\\xe9' is not valid UTF-8", "rename it"]


def _case_hash_in_the_image_folder(tiny, tmp_path):
    d = tmp_path / "run#2"
    shutil.copytree(tiny, d, symlinks=True)
    return [str(d)], [f"the folder '{d}' has '#' in its path", "image-number digit", "rename the folder"]


def _case_output_not_writable(tiny, tmp_path):
    return [tiny, "output.directory=/proc/gapfill-out"], ["cannot create the output folder", "output.directory="]


def _case_output_folder_is_a_file(tiny, tmp_path):
    (tmp_path / "afile").write_text("x")
    return [tiny, f"output.directory={tmp_path / 'afile'}"], ["output folder", "output.directory="]


def _case_indexing_impossible(tiny, tmp_path):
    """Strong spots everywhere, but at random positions: no lattice."""
    from dials_gapfill.simulation.simulate import Simulation, SimulationConfig

    from conftest import TINY

    d = tmp_path / "random"
    d.mkdir()
    config = SimulationConfig(**{**TINY, "n_images": 12})
    sim = Simulation(config)
    ny, nx = sim.background.shape
    for n in config.image_numbers:
        rng = np.random.default_rng([7, n])
        image = sim.background.copy()
        yy, xx = np.mgrid[0:ny, 0:nx]
        for x, y in zip(rng.uniform(20, nx - 20, 80), rng.uniform(20, ny - 20, 80)):
            sl = (slice(int(y) - 4, int(y) + 5), slice(int(x) - 4, int(x) + 5))
            image[sl] += 400 * np.exp(-((xx[sl] - x) ** 2 + (yy[sl] - y) ** 2) / 2)
        data = rng.poisson(image).astype(np.int32)
        data[sim.gap_mask] = -1
        _write_cbf(str(d), config, n, data)
    return [str(d)], ["indexing failed", "geometry"]


def _case_space_group_incompatible(tiny, tmp_path):
    # the first 12 images (an image= range): DIALS' indexer tries all its
    # candidate lattices before it gives up, a cost that grows with the spots
    images = f"image={os.path.join(tiny, 'sim_0001.cbf')}:1:12"
    return [[], images, "space_group=P6"], ["indexing failed with space_group=P 6", "indexing.known_symmetry"]


# parameters that PHIL accepts but that could only fail at the end of the run:
# refused before any image is read


def _case_partiality_threshold_above_one(tiny, tmp_path):
    return [tiny, "mtz.partiality_threshold=2"], ["mtz.partiality_threshold=2", "from 0 to 1"]


def _case_partiality_threshold_negative(tiny, tmp_path):
    return [tiny, "mtz.partiality_threshold=-1"], ["mtz.partiality_threshold=-1", "from 0 to 1"]


def _case_mtz_d_min_negative(tiny, tmp_path):
    return [tiny, "mtz.d_min=-2"], ["mtz.d_min=-2", "positive"]


def _case_scaling_d_min_zero(tiny, tmp_path):
    return [tiny, "scale=True", "scaling.d_min=0"], ["scaling.d_min=0", "positive"]


def _case_mtz_hklout(tiny, tmp_path):
    return [tiny, "mtz.hklout=x.mtz"], ["mtz.hklout", "output.mtz="]


def _case_output_name_with_folder(tiny, tmp_path):
    return [tiny, "output.mtz=sub/x.mtz"], ["output.mtz='sub/x.mtz'", "plain file name", "output.directory="]


def _case_experiments_extension(tiny, tmp_path):
    return [tiny, "output.experiments=integrated.txt"], ["output.experiments", ".expt"]


def _case_output_names_collide(tiny, tmp_path):
    return [tiny, "output.json=integrated.mtz"], ["output.json and output.mtz", "different names"]


def _case_block_mtz_without_block(tiny, tmp_path):
    return [tiny, "output.block_mtz=blocks.mtz"], ["output.block_mtz", "{block}"]


def _case_block_mtz_images_only(tiny, tmp_path):
    # blocks of different sweeps can cover the same images: {block} is needed
    return [tiny, "output.block_mtz=b_{first}-{last}.mtz"], ["output.block_mtz", "two blocks one file", "{block}"]


def _case_block_mtz_unknown_field(tiny, tmp_path):
    return [tiny, "output.block_mtz=b_{blok}.mtz"], ["output.block_mtz", "{block}"]


def _case_sweep_mtz_without_sweep(tiny, tmp_path):
    return [tiny, "output.sweep_mtz=sweeps.mtz"], ["output.sweep_mtz", "{sweep}"]


def _case_sweep_mtz_same_as_block_mtz(tiny, tmp_path):
    return [tiny, "output.sweep_mtz=integrated_{sweep}.mtz"], [
        "output.sweep_mtz and output.block_mtz", "different names"]


def _case_shelx_without_scaling(tiny, tmp_path):
    return [tiny, "shelx=True"], ["output.shelx=True", "scale=True"]


def _case_shelx_name_with_folder(tiny, tmp_path):
    return [tiny, "scale=True", "shelx=True", "output.shelx_name=sub/x"], [
        "output.shelx_name='sub/x'", "plain file name"]


def _case_shelx_name_with_extension(tiny, tmp_path):
    return [tiny, "scale=True", "shelx=True", "output.shelx_name=foo.hkl"], [
        "output.shelx_name='foo.hkl' would give foo.hkl.hkl", "output.shelx_name=foo"]


def _case_sweep_of_damaged_and_unrecognised_files(tiny, tmp_path):
    # a second sweep whose every file is truncated or not an image at all
    d = tmp_path / "other"
    d.mkdir()
    data = open(os.path.join(tiny, "sim_0001.cbf"), "rb").read()
    (d / "bad_0001.cbf").write_bytes(data[: len(data) // 2])
    (d / "bad_0002.cbf").write_bytes(b"\x00not an image" * 400)
    return [tiny, str(d)], ["none of the images of sweep", "(bad_####.cbf) can be read",
                            "to process the other sweeps, leave its files out"]


def _case_reference_geometry_of_two_detectors(tiny, tmp_path):
    # the L-cysteine wedges as integrated: two detector positions
    two = os.path.join(os.path.dirname(__file__), "data", "l_cysteine_wedges", "complete", "integrated.expt")
    return [tiny, f"reference_geometry={two}"], [
        "applying the geometry failed", "2 detector definitions",
        "give a reference_geometry file with one detector"]


def _case_reference_geometry_not_there(tiny, tmp_path):
    return [tiny, f"reference_geometry={tmp_path}/modles.expt"], [
        f"input.reference_geometry={tmp_path}/modles.expt: no such file", "give the models.expt"]


def _case_mtz_name_a_block_mtz_also_gives(tiny, tmp_path):
    return [tiny, "output.mtz=integrated_2.mtz"], [
        "output.mtz='integrated_2.mtz' is also a name output.block_mtz='integrated_{block}.mtz' gives",
        "different names"]


def _case_shelx_file_is_another_output(tiny, tmp_path):
    return [tiny, "scale=True", "shelx=True", "output.log=scaled.hkl"], [
        "output.log and output.shelx_name are both 'scaled.hkl'", "different names"]


def _case_kb_scaling_of_one_block(tiny, tmp_path):
    # known only once the blocks are: refused after spot finding, before indexing
    return [tiny, "scale=True", "scaling.model=KB"], ["scaling.model=KB", "two or more blocks", "scaling.model=auto"]


def _case_bravais_lattice_unknown(tiny, tmp_path):
    return [tiny, "indexing.bravais_lattice=oQ"], ["indexing.bravais_lattice=oQ", "oP"]


def _case_tie_sigma_zero(tiny, tmp_path):
    return [tiny, "refinement.blocks.tie_sigma=0,0.01,0.01,0.01,0.01,0.01"], ["tie_sigma", "positive"]


def _case_tie_sigma_zero_for_tied_sweep_cells(tiny, tmp_path):
    return [tiny, "refinement.blocks.tie_cells=False", "refinement.blocks.continuous_sweep_cells=tied",
            "refinement.blocks.tie_sigma=0.01,0.01,0,0.01,0.01,0.01"], ["tie_sigma", "positive"]


def _case_cell_does_not_fit_space_group(tiny, tmp_path):
    return [tiny, "space_group=P4", "unit_cell=54,62,71,90,90,90"], [
        "unit_cell=54,62,71,90,90,90 does not fit space_group=P 4", "tetragonal"]


VALIDATION_CASES = {
    "cell_does_not_fit_space_group",
    "partiality_threshold_above_one", "partiality_threshold_negative", "mtz_d_min_negative",
    "scaling_d_min_zero", "mtz_hklout", "output_name_with_folder", "experiments_extension",
    "output_names_collide", "block_mtz_without_block", "block_mtz_images_only", "block_mtz_unknown_field",
    "sweep_mtz_without_sweep", "sweep_mtz_same_as_block_mtz",
    "shelx_without_scaling", "shelx_name_with_folder", "shelx_file_is_another_output",
    "bravais_lattice_unknown", "tie_sigma_zero", "tie_sigma_zero_for_tied_sweep_cells", "image_range_reversed", "reference_geometry_not_there",
}


CASES = {name[6:]: f for name, f in sorted(globals().items()) if name.startswith("_case_")}
SLOW_CASES = {"indexing_impossible", "space_group_incompatible", "all_blank", "another_crystal",
              "another_crystal_per_block"}
# the parameter checks run in this process (below); these few also through the
# command line, for its exit code, stderr and untouched folder
VALIDATION_ON_THE_COMMAND_LINE = {"partiality_threshold_above_one", "output_names_collide", "image_range_reversed"}
# refused once the blocks are known, before the work that is worth saving
BEFORE_INDEXING = {"kb_scaling_of_one_block"}


@pytest.mark.parametrize("case", sorted(VALIDATION_CASES))
def test_parameters_refused_before_any_work(case, tmp_path):
    """validate() on the parsed parameters: the same one-line message the
    command prints."""
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import params_from
    from dials_gapfill.validate import validate

    args, expected = CASES[case]("/no/such/images", tmp_path)
    with pytest.raises(GapfillError) as info:
        validate(params_from(args[1:]))
    message = str(info.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, (text, message)


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c
     for c in CASES if c not in VALIDATION_CASES or c in VALIDATION_ON_THE_COMMAND_LINE],
)
def test_fatal_bad_input(case, tiny, tmp_path):
    args, expected = CASES[case](tiny, tmp_path)
    out = str(tmp_path / "out")
    if not any("output.directory=" in a for a in args):
        _seed_old_results(out)
    result = process(args[0], out, *args[1:], timeout=900)
    _check_failure(result, out, expected)
    if case in VALIDATION_CASES:
        # refused before anything was read or written: not even a log
        assert sorted(os.listdir(out)) == sorted(PRODUCTS), os.listdir(out)
        assert "log of this run" not in result.stderr
    if case in BEFORE_INDEXING:
        log = open(os.path.join(out, FAILED_LOG)).read()
        assert "=== Spot finding ===" in log and "=== Indexing ===" not in log


def test_an_output_folder_whose_name_is_not_utf8_is_refused_before_any_work(tiny, tmp_path):
    """The log, and at the end the MTZ file, cannot hold the name: the run
    would go to its end and fail there, files left behind."""
    out = str(tmp_path / "out\udce9")
    result = process(tiny, out)
    _check_failure(result, out, ["output.directory: the name '", "out\\xe9' is not valid UTF-8",
                                 "choose another output.directory"])
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)  # (not even the folder made)


def test_validation_comes_before_reading_images(tmp_path):
    """A bad parameter is reported even when the images do not exist."""
    out = str(tmp_path / "out")
    result = process("/no/such/images_*.cbf", out, "mtz.partiality_threshold=1.5")
    _check_failure(result, out, ["mtz.partiality_threshold=1.5"])
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------
# faults during a run
# ----------------------------------------------------------------------------


def _run_until(tiny, out, marker, sig):
    """Start a run, send `sig` when `marker` appears in its log; return the result."""
    _seed_old_results(out)
    args = [tool("dials.process_gapped"), tiny, f"output.directory={out}", f"nproc={WORKERS}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the log of a run in progress has a temporary name (the old log stays)
    pattern = os.path.join(out, ".dials.process_gapped.tmp-*.log")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        logs = glob.glob(pattern)
        if logs and marker in open(logs[0]).read():
            time.sleep(1.0)  # well inside the stage
            proc.send_signal(sig)
            break
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_sigint_during_integration(tiny, tmp_path):
    out = str(tmp_path / "out")
    result = _run_until(tiny, out, "=== Integration ===", signal.SIGINT)
    err = _check_failure(result, out, ["interrupted by SIGINT", "earlier results are untouched"], code=130)
    # the interrupted run's log is kept aside, the previous log untouched
    _check_failed_log(out, err, ["=== Integration ===", "interrupted by SIGINT"])


def _check_failed_log(out, err, expected):
    failed = os.path.join(out, FAILED_LOG)
    assert f"log of this run: {failed}" in err, err
    text = open(failed).read()
    for line in expected:
        assert line in text, line
    assert open(os.path.join(out, LOG)).read() == f"old {LOG}\n"
    assert not os.path.exists(os.path.join(out, ".dials.process_gapped.lock"))


@pytest.mark.slow
def test_sigterm(tiny, tmp_path):
    out = str(tmp_path / "out")
    result = _run_until(tiny, out, "=== Refinement ===", signal.SIGTERM)
    err = _check_failure(result, out, ["interrupted by SIGTERM"], code=143)
    _check_failed_log(out, err, ["=== Refinement ===", "interrupted by SIGTERM"])


def test_failed_run_keeps_the_previous_log(tmp_path):
    """A run that fails after its log was started: the old log stays, the new
    one is kept as dials.process_gapped.failed.log."""
    out = str(tmp_path / "out")
    _seed_old_results(out)
    result = process(str(tmp_path / "nothing_*.cbf"), out)
    err = _check_failure(result, out, ["no files match"])
    _check_failed_log(out, err, ["dials-gapfill", "Error: no files match"])


def test_output_folder_in_use_is_refused(tiny, tmp_path):
    """While a run holds the output folder (here: this test process, through
    the same lock), a second run into it refuses with one line."""
    from dials_gapfill.handlers.outputs import Outputs

    out = str(tmp_path / "out")
    _seed_old_results(out)
    holder = Outputs(out)
    holder.lock()
    try:
        result = process(tiny, out)
        err = _check_failure(result, out, ["is in use by another dials.process_gapped run",
                                           f"pid {os.getpid()}", "output.directory="])
        assert "log of this run" not in err and not os.path.exists(os.path.join(out, FAILED_LOG))
        assert open(holder.lock_path).read().split() == [str(os.getpid())]
    finally:
        holder.unlock()
    assert not os.path.exists(holder.lock_path)


def test_stale_lock_is_taken_over(tmp_path):
    """A lock file left by a run that died does not block the next run."""
    out = str(tmp_path / "out")
    _seed_old_results(out)
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = os.path.join(out, ".dials.process_gapped.lock")
    with open(lock, "w") as fh:
        fh.write(f"{dead.pid}\n")
    result = process(str(tmp_path / "nothing_*.cbf"), out)
    err = _check_failure(result, out, ["no files match"])  # it ran: the lock was taken over
    assert "in use" not in err
    assert not os.path.exists(lock)


@pytest.mark.slow
def test_disk_full_while_writing(tiny, tmp_path):
    """Outputs on a 1 MB tmpfs: the first big file does not fit."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    out = str(mnt / "out")
    script = (
        f"mount -t tmpfs -o size=1m tmpfs {mnt} && mkdir {out} && "
        + " && ".join(f"echo 'old {n}' > {out}/{n}" for n in PRODUCTS)
        + f" && {tool('dials.process_gapped')} {tiny} output.directory={out} nproc={NPROC}; "
        + f"rc=$?; ls -a {out} > {tmp_path}/listing; "
        + " ".join(f"cat {out}/{n} >> {tmp_path}/contents;" for n in PRODUCTS)
        + f" umount {mnt}; exit $rc"
    )
    cmd = ["unshare", "--mount", "sh", "-c", script]
    if os.geteuid() != 0:
        cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    err = result.stderr.strip()
    assert result.returncode == 1, (result.stdout[-2000:], err)
    assert "Traceback" not in result.stdout + result.stderr
    assert len(err.splitlines()) == 1 and "disk full while writing" in err, err
    assert "output.directory=" in err
    listing = (tmp_path / "listing").read_text().split()
    assert not [f for f in listing if ".tmp-" in f], listing
    assert (tmp_path / "contents").read_text() == "".join(f"old {n}\n" for n in PRODUCTS)


def test_disk_full_while_the_mtz_is_written(tmp_path):
    """iotbx's MTZ writer reports a full disk as "MTZ file read error": the
    folder being full is what the message says (the stored L-cysteine
    integration, 69 KiB of MTZ, into a 16 KiB tmpfs)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    code = (
        "import os\n"
        "from dials.array_family import flex\n"
        "from dxtbx.model.experiment_list import ExperimentListFactory\n"
        "from dials_gapfill.errors import GapfillError\n"
        "from dials_gapfill.handlers.outputs import Outputs\n"
        "from dials_gapfill.phil import params_from\n"
        "from dials_gapfill.stages.export import write_mtz\n"
        f"d = {os.path.join(os.path.dirname(__file__), 'data', 'l_cysteine_wedges', 'complete')!r}\n"
        "e = ExperimentListFactory.from_json_file(os.path.join(d, 'integrated.expt'), check_format=False)\n"
        "r = flex.reflection_table.from_file(os.path.join(d, 'integrated.refl'))\n"
        f"outputs = Outputs({str(mnt)!r})\n"
        "try:\n"
        "    outputs.write('integrated.mtz', lambda p: write_mtz(r, e, params_from(['nproc=1']), p))\n"
        "except GapfillError as x:\n"
        "    print(x)\n"
        "outputs.rollback()\n"
        "print(os.listdir(outputs.directory))\n"
    )
    script = f"mount -t tmpfs -o size=16k tmpfs {mnt} && {sys.executable} -c \"$0\"; rc=$?; umount {mnt}; exit $rc"
    cmd = ["unshare", "--mount", "sh", "-c", script, code]
    if os.geteuid() != 0:
        cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, code]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    said, left = result.stdout.strip().splitlines()[-2:]
    assert said == (f"disk full while writing integrated.mtz in {mnt}: free some space or choose another "
                    "folder with output.directory="), said
    assert left == "[]"


@pytest.mark.slow
def test_late_failure_keeps_integrated_data_and_folder_is_locked(tiny, tmp_path):
    """An export that fails at the end (no reflection within mtz.d_min=100, which
    only the data can tell) keeps the complete integrated data and says so:
    beside an earlier run's results as integrated.failed.expt/.refl, the
    earlier files all untouched; meanwhile a second run into the folder is
    refused.  The next successful run removes them with the failed log."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    out = str(tmp_path / "out")
    _seed_old_results(out)
    # what an earlier failed run kept and this one will not: it goes with
    # that run's failed log, which this run's replaces
    for name in ("integrated.failed.mtz", "integrated_3.failed.mtz", "integrated.failed.expt"):
        with open(os.path.join(out, name), "w") as fh:
            fh.write("an earlier failed run's\n")
    args = [tool("dials.process_gapped"), tiny, f"output.directory={out}", f"nproc={NPROC}", "mtz.d_min=100"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        if glob.glob(os.path.join(out, ".dials.process_gapped.tmp-*.log")):
            break
        time.sleep(0.2)
    second = process(tiny, out)
    stdout, stderr = first.communicate(timeout=1200)
    assert first.poll() is not None
    err = second.stderr.strip()
    assert second.returncode == 1 and len(err.splitlines()) == 1, err
    assert f"is in use by another dials.process_gapped run (pid {first.pid})" in err, err

    err = stderr.strip()
    assert first.returncode == 1, (stdout[-2000:], err)
    assert len(err.splitlines()) == 1 and "Traceback" not in stdout + stderr, err
    assert "MTZ export failed" in err and "mtz." in err
    assert (f"the integrated data, complete, are kept as integrated.failed.expt and integrated.failed.refl in {out} "
            "(the earlier results there are untouched)") in err
    experiments = ExperimentListFactory.from_json_file(os.path.join(out, "integrated.failed.expt"),
                                                       check_format=False)
    reflections = flex.reflection_table.from_file(os.path.join(out, "integrated.failed.refl"))
    assert len(experiments) == 1 and experiments[0].scan.get_image_range() == (1, 40)
    assert reflections.get_flags(reflections.flags.integrated).count(True) > 5000
    for name in PRODUCTS:  # the earlier results as they were
        assert open(os.path.join(out, name)).read() == f"old {name}\n", name
    assert "MTZ export failed" in open(os.path.join(out, FAILED_LOG)).read()
    assert not [f for f in os.listdir(out) if f.startswith(".")], os.listdir(out)
    assert sorted(f for f in os.listdir(out) if ".failed." in f) == [
        FAILED_LOG, "integrated.failed.expt", "integrated.failed.refl"], os.listdir(out)
    # a successful run leaves one run's results
    assert process(tiny, out).returncode == 0
    left = os.listdir(out)
    assert not [f for f in left if ".failed." in f], left
    assert len(ExperimentListFactory.from_json_file(os.path.join(out, "integrated.expt"), check_format=False)) == 1


@pytest.mark.parametrize("folder", ["dials.process_gapped.json", "integrated_2.mtz"])
def test_an_output_that_cannot_take_its_name_leaves_the_earlier_results_whole(tiny, tmp_path, folder):
    """A folder where an output would go (the JSON, or a block's MTZ, whose
    numbers are known only later) stops the run before any processing, with
    one line, and none of the earlier files is replaced; no temporary file
    or lock is left, and the run's log is the failed log.  (The renaming at
    the end, for a folder made meanwhile, is all or none:
    test_renaming_is_undone_when_one_rename_fails.)"""
    out = str(tmp_path / "out")
    _seed_old_results(out)
    if os.path.exists(os.path.join(out, folder)):
        os.remove(os.path.join(out, folder))
    os.mkdir(os.path.join(out, folder))
    result = process(tiny, out, timeout=900)
    err = result.stderr.strip()
    assert result.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in result.stdout + err, err
    assert f"cannot write {folder}" in err and "a folder of that name" in err, err
    for name in PRODUCTS:
        if name != folder:
            assert open(os.path.join(out, name)).read() == f"old {name}\n", name
    assert sorted(os.listdir(out)) == sorted(set(PRODUCTS + (FAILED_LOG, folder))), os.listdir(out)
    log = open(os.path.join(out, FAILED_LOG)).read()
    assert "a folder of that name" in log and "=== Spot finding ===" not in log


def test_a_failed_run_replaces_what_an_earlier_failed_run_kept(tiny, tmp_path):
    """The failed files in a folder are one run's: a run that fails
    replaces the earlier failed run's log, and the data that run kept
    (integrated.failed.*, its failed block and sweep MTZs) go with it.  The
    earlier results and a user's own files stay."""
    out = str(tmp_path / "out")
    _seed_old_results(out)
    earlier_failed = ["integrated.failed.expt", "integrated.failed.refl", "integrated.failed.mtz",
                      "integrated_2.failed.mtz", "integrated_sweep1.failed.mtz"]
    for name in earlier_failed + [FAILED_LOG, "notes.failed.txt", "integrated_2.mtz"]:
        with open(os.path.join(out, name), "w") as fh:
            fh.write(f"old {name}\n")
    os.mkdir(os.path.join(out, "integrated_3.mtz"))  # (fails the run before any processing)
    result = process(tiny, out, timeout=900)
    err = result.stderr.strip()
    assert result.returncode == 1 and "cannot write integrated_3.mtz" in err, err
    for name in PRODUCTS + ("notes.failed.txt", "integrated_2.mtz"):
        assert open(os.path.join(out, name)).read() == f"old {name}\n", name
    assert not [n for n in earlier_failed if os.path.exists(os.path.join(out, n))], os.listdir(out)
    log = open(os.path.join(out, FAILED_LOG)).read()
    assert "cannot write integrated_3.mtz" in log and "integrated.failed.expt" in log


def test_renaming_is_undone_when_one_rename_fails(tmp_path, monkeypatch):
    """Outputs.commit(): where a rename fails midway (here made to fail for
    the second file), the first file is put back with the earlier one."""
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.handlers.outputs import Outputs

    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"old {name}")
    outputs = Outputs(str(tmp_path))
    for name in ("a.txt", "b.txt"):
        outputs.write(name, lambda p, name=name: open(p, "w").write(f"new {name}"))
    real = os.replace

    def failing(src, dst):
        if str(dst).endswith("b.txt") and ".tmp-" in str(src) and ".old." not in str(src):
            raise OSError(13, "Permission denied")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(GapfillError, match="cannot write b.txt"):
        outputs.commit()
    monkeypatch.setattr(os, "replace", real)
    outputs.rollback()
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a.txt": "old a.txt", "b.txt": "old b.txt"}


def test_a_sweep_that_does_not_index_names_changed_spot_finding():
    """The refusal of a sweep that does not index on the others' crystal
    names the spot finder's settings where they were changed: with
    min_spot_size=2 the L-cysteine wedges' sweep 2 (noise spots) is refused
    so, with DIALS' defaults it indexes."""
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages.indexing import changed_spotfinding

    assert changed_spotfinding(params_from(["nproc=1", "scale=True"])) == []
    assert changed_spotfinding(params_from(["spotfinder.filter.min_spot_size=2", "nproc=1"])) == [
        "spotfinder.filter.min_spot_size=2"]


def test_a_sweep_that_does_not_index_names_the_goniometer_override_given():
    """Where every block of a sweep fails to index on the other sweeps'
    crystal, a goniometer override (which moves every sweep's rotation the
    same way) is named beside another crystal as the likely cause."""
    from types import SimpleNamespace

    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages.indexing import another_crystal

    sweeps = [SimpleNamespace(number=n, template=f"/d/s{n}_####.cbf") for n in (1, 2)]
    experiments = [SimpleNamespace(identifier=str(n)) for n in (1, 2)]
    for phil, said in [(["nproc=1"], None),
                       (["geometry.goniometer.invert_rotation_axis=True"],
                        "or a goniometer override (geometry.goniometer.invert_rotation_axis=True: try the headers')")]:
        with pytest.raises(GapfillError) as info:
            another_crystal(sweeps, sweeps, experiments, {"1"}, [0.9, 0.11], 0.2, params_from(phil))
        message = str(info.value)
        assert message.startswith("sweep 2 (s2_####.cbf) does not index on the crystal of the other sweeps "
                                  "(at best 11% of a block's spots"), message
        assert (said is None and "override" not in message) or said in message, message


def test_scaling_d_min_beyond_every_reflection_is_one_line():
    """scaling.d_min beyond the data's lowest resolution: refused in one
    line naming the data's range (DIALS 3.12's scaler would drop every
    block and stop on an IndexError); a d_min inside the range passes."""
    from dials.array_family import flex

    from dials_gapfill.errors import GapfillError
    from dials_gapfill.stages.scaling import check_d_min

    table = flex.reflection_table()
    table["d"] = flex.double([4.07, 2.0, 0.59, 50.0])
    table.set_flags(flex.bool([True, True, True, False]), table.flags.integrated_sum)
    check_d_min(table, None)
    check_d_min(table, 4.0)
    with pytest.raises(GapfillError) as e:
        check_d_min(table, 5)  # (the 50 Å reflection was not integrated)
    assert str(e.value) == ("scaling.d_min=5 leaves no reflection: the integrated data reach from 4.07 to "
                            "0.59 A; give a scaling.d_min below 4.07")


@pytest.mark.slow
def test_a_scaling_failure_keeps_every_mtz_of_several_sweeps(tmp_path):
    """Scaling, the last stage, fails on the four L-cysteine sweeps beside an
    earlier run's results: one line naming the problem; the integrated data
    and every MTZ export wrote (all sweeps, each block, each sweep) are kept
    as *.failed.*, complete, with BATCH unique across the sweeps; the earlier
    files, numbered MTZ files included, are untouched."""
    import iotbx.mtz

    data = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "l_cysteine"))
    if not glob.glob(os.path.join(data, "l-cyst_0*.cbf.bz2")):
        pytest.skip(f"the L-cysteine images are not here ({data}): see ../shared/README.md")
    out = str(tmp_path / "out")
    _seed_old_results(out)
    numbered = [f"integrated_{k}.mtz" for k in range(1, 5)] + [f"integrated_sweep{k}.mtz" for k in range(1, 5)]
    for name in numbered:
        with open(os.path.join(out, name), "w") as fh:
            fh.write(f"old {name}\n")
    result = process(data, out, "scale=True", "scaling.d_min=100")
    err = result.stderr.strip()
    assert result.returncode == 1 and "Traceback" not in result.stdout + err, (result.stdout[-2000:], err)
    assert len(err.splitlines()) == 1 and err.startswith("dials.process_gapped: error: scaling.d_min=100 "
                                                         "leaves no reflection"), err
    assert ("the integrated data, complete, are kept as integrated.failed.expt, integrated.failed.refl, "
            f"integrated.failed.mtz and 8 per-block and per-sweep MTZ files in {out} "
            "(the earlier results there are untouched)") in err, err
    for name in PRODUCTS + tuple(numbered):
        assert open(os.path.join(out, name)).read() == f"old {name}\n", name
    kept = ["integrated.failed.expt", "integrated.failed.refl", "integrated.failed.mtz"] + [
        n.replace(".mtz", ".failed.mtz") for n in numbered]
    assert sorted(os.listdir(out)) == sorted(PRODUCTS + tuple(numbered) + tuple(kept) + (FAILED_LOG,))
    batches = [b.num() for b in iotbx.mtz.object(os.path.join(out, "integrated.failed.mtz")).batches()]
    assert len(batches) == len(set(batches)) == 60
    per_sweep = [{b.num() for b in iotbx.mtz.object(os.path.join(out, f"integrated_sweep{k}.failed.mtz")).batches()}
                 for k in range(1, 5)]
    assert set().union(*per_sweep) == set(batches) and sum(map(len, per_sweep)) == 60
    assert "scaling.d_min=100 leaves no reflection" in open(os.path.join(out, FAILED_LOG)).read()


def test_a_scaling_failure_inside_dials_names_where_and_the_limit():
    """DIALS' scaler stopping on a bare assert (cctbx's resolution binner,
    with 14 reflections within scaling.d_min=2 of the L-cysteine wedges as
    integrated once) is one line naming the exception, where it was raised,
    the limit and how many reflections it left."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages.scaling import scale

    folder = os.path.join(os.path.dirname(__file__), "data", "l_cysteine_wedges", "complete")
    experiments = ExperimentListFactory.from_json_file(os.path.join(folder, "integrated.expt"), check_format=False)
    reflections = flex.reflection_table.from_file(os.path.join(folder, "integrated.refl"))
    with pytest.raises(GapfillError) as e:
        scale(experiments, reflections, params_from(["nproc=1", "scale=True", "scaling.d_min=2"]), None)
    assert str(e.value) == (
        "scaling failed with scaling.d_min=2 (14 integrated reflections within it): AssertionError in "
        "setup_binner_d_star_sq_step (__init__.py): give a smaller scaling.d_min, or run without scaling.run "
        "and scale integrated.expt/integrated.refl with dials.scale")


def test_no_reference_spot_for_a_profile_model_is_one_line_with_min_spots_zero(monkeypatch):
    """profile.gaussian_rs.min_spots.overall=0 (what the DIALS chain needs on
    sparse sweeps) and no block's reference spots matched to a prediction
    (here none kept, in place of the matching): one line naming the way
    out, not a division by zero."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import dials_integrate_params, params_from
    from dials_gapfill.stages import integration

    folder = os.path.join(os.path.dirname(__file__), "data", "l_cysteine_wedges", "complete")
    experiments = ExperimentListFactory.from_json_file(os.path.join(folder, "integrated.expt"), check_format=False)
    reference = flex.reflection_table.from_file(os.path.join(folder, "integrated.refl"))
    monkeypatch.setattr(integration, "_matched_reference", lambda ip, e, r: r.select(flex.bool(len(r), False)))
    ip = dials_integrate_params(params_from(["nproc=1", "profile.gaussian_rs.min_spots.overall=0"]))
    with pytest.raises(GapfillError) as e:
        integration._pooled_profiles(ip, experiments, reference, list(range(len(experiments))))
    assert str(e.value) == (
        "no block's reference spots (the indexed strong spots that refinement kept and that match a prediction, "
        "0 in all) give a profile model: set profile.gaussian_rs.parameters.sigma_b= and sigma_m= (degrees)")


def test_one_line_of_an_exception():
    from dials_gapfill.errors import one_line

    assert one_line(ValueError("two\n  lines")) == "two lines"
    assert one_line(ValueError("x" * 50), 10) == "x" * 10

    def binner():
        raise AssertionError  # (as a bare assert in cctbx)

    try:
        binner()
    except AssertionError as e:
        assert one_line(e) == "AssertionError in binner (test_bad_inputs.py)"
    else:
        raise AssertionError("not raised")


def test_a_signal_during_the_renaming_waits_for_its_end(tmp_path):
    """SIGINT while the outputs take their final names (Job.__exit__ holds
    the signals): every file is renamed first, then the signal is
    delivered, once, to the handler that was there."""
    from dials_gapfill.api import signals_held
    from dials_gapfill.handlers.outputs import Outputs

    outputs = Outputs(str(tmp_path))
    for name in ("a.txt", "b.txt"):
        outputs.write(name, lambda p, name=name: open(p, "w").write(name))
    delivered = []  # (the handler of this process, whatever an import set before)
    previous = signal.signal(signal.SIGINT, lambda signum, frame: delivered.append(sorted(os.listdir(tmp_path))))
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)  # held, not delivered
            renamed = [os.path.basename(f) for f in outputs.commit()]
            assert delivered == []
    finally:
        signal.signal(signal.SIGINT, previous)
    assert renamed == ["a.txt", "b.txt"]
    assert delivered == [["a.txt", "b.txt"]]  # once, after every file had its name
