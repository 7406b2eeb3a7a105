"""Shared fixtures: simulated sweeps (made once per session) and processed runs.

Every sweep is cut from one deterministic simulation: images are independent
of each other (one random stream per image), so a gapped sweep is the
complete sweep with some files left out (symlinks to the same files), and a
sweep with bad images has just those files replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import forked

import dials_gapfill  # noqa: F401  (sets up libtbx for the venv before dials imports)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SNASE = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "snase"))
BIN = os.path.dirname(sys.executable)
# One process per run: pytest-xdist already keeps every core busy (make test:
# -n 2), and on a busy core a run's worker processes cost CPU (their start-up,
# DIALS imported again) without making it faster. Tests about worker
# processes (signals, kills, progress, parallel equals serial) ask for WORKERS.
NPROC = os.environ.get("GAPFILL_TEST_NPROC", "1")
WORKERS = "2"

# The standard test sweep: 120 images of 0.5 deg on a Pilatus 1M.
STANDARD = dict(n_images=120, seed=42)
GAPS = list(range(41, 46)) + list(range(81, 84))


def summation_against_truth(reflections, truth):
    """(intensities, sigmas, true intensities): see
    dials_gapfill.simulation.compare.summation_against_truth."""
    from dials_gapfill.simulation.compare import summation_against_truth as against

    return against(reflections, truth)


def assert_block_integrated_by_summation(experiments, reflections, record, log, blocks, k, n_summed):
    """Integration's result where block k (from 0) had no reference spot left:
    the blocks in their places (`blocks`: image ranges), block k said and
    integrated by summation only (more than n_summed), the others profile
    fitted."""
    assert [e.scan.get_image_range() for e in experiments] == blocks
    first, last = blocks[k]
    assert f"Block of images {first}-{last}: none of its reference spots matched a prediction" in log
    prf = reflections.get_flags(reflections.flags.integrated_prf)
    summed = reflections.get_flags(reflections.flags.integrated_sum)
    mine = reflections["id"] == k
    assert (mine & summed).count(True) > n_summed and (mine & prf).count(True) == 0
    assert (~mine & prf).count(True) > 1000
    assert record.blocks[experiments[k].identifier]["profile"] == "summation only"


def tool(name):
    """Path of a console script installed with this package (or on PATH)."""
    path = os.path.join(BIN, name)
    return path if os.path.exists(path) else shutil.which(name) or name


def run_cmd(args, cwd=None, timeout=1200, env=None):
    """Run a command; return CompletedProcess with text output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    start = time.monotonic()
    result = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )
    _log_run(args, start)
    return result


def _log_run(args, start):
    """GAPFILL_TEST_RUNLOG=file: one JSON line per command the tests run
    (which commands the suite spends its time on)."""
    if os.environ.get("GAPFILL_TEST_RUNLOG"):
        with open(os.environ["GAPFILL_TEST_RUNLOG"], "a") as fh:
            fh.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST"), "args": list(map(str, args)),
                                 "seconds": round(time.monotonic() - start, 1)}) + "\n")


def run_forked(args, cwd=None, timeout=1200):
    """A command of this package or DIALS (args[0]) as run_cmd would run it,
    in a process forked from a server that has imported them (tests/forked.py):
    a CompletedProcess with text output. GAPFILL_TEST_SUBPROCESS=1 runs the
    console scripts instead."""
    if os.environ.get("GAPFILL_TEST_SUBPROCESS") or forked.entry_point(str(args[0])) is None:
        return run_cmd(args, cwd=cwd, timeout=timeout)
    import tempfile

    args = list(map(str, args))
    with tempfile.TemporaryDirectory(prefix="forked-") as d:
        paths = [os.path.join(d, "stdout"), os.path.join(d, "stderr")]
        start = time.monotonic()
        child = forked.context().Process(target=forked.main, args=(args, cwd or os.getcwd(), dict(os.environ), *paths))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(args, timeout)
        stdout, stderr = (open(p, encoding="utf-8", errors="replace").read() for p in paths)
    _log_run(args, start)
    return subprocess.CompletedProcess(args, child.exitcode, stdout, stderr)


def process(images, out, *phil, cwd=None, timeout=1200):
    """Run dials.process_gapped (run_forked); return the CompletedProcess."""
    args = [tool("dials.process_gapped")]
    args += images if isinstance(images, list) else [images]
    args += [f"output.directory={out}", f"nproc={NPROC}", *phil]
    return run_forked(args, cwd=cwd, timeout=timeout)


def process_ok(images, out, *phil):
    """Run dials.process_gapped, which must succeed; the CompletedProcess."""
    result = process(images, out, *phil)
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    return result


def _simulate(directory, **config):
    from dials_gapfill.simulation.simulate import SimulationConfig, simulate

    simulate(SimulationConfig(**config), directory)
    return directory


# A small sweep for runs that only need to finish (robustness, options):
# 40 images of 1 deg on a Pilatus 300K; about 30 s through the whole pipeline.
TINY = dict(n_images=40, osc_width=1.0, detector="pilatus300k", distance=150.0, seed=42)


class Sweeps:
    """Variants of one simulated sweep: files left out (symlinks to the rest)
    and bad images planted (only those files rewritten)."""

    def __init__(self, config, root):
        self.config = config
        self.root = root
        self.complete = _simulate(str(root.mktemp("complete")), **config)
        self._cache = {}
        self._simulation = None

    def make(self, omit=(), bad=None, name="sweep"):
        from dials_gapfill.simulation.simulate import Simulation, SimulationConfig

        key = (tuple(sorted(omit)), tuple(sorted((bad or {}).items())))
        if key in self._cache:
            return self._cache[key]
        d = str(self.root.mktemp(name))
        truth = json.load(open(os.path.join(self.complete, "ground_truth.json")))
        for f in truth["files"]:
            n = int(f.split("_")[-1].split(".")[0])
            if n in omit:
                continue
            if bad and n in bad:
                if self._simulation is None:
                    self._simulation = Simulation(SimulationConfig(**self.config))
                sim = self._simulation
                sim.config.bad_images = {n: bad[n]}
                with open(os.path.join(d, f), "wb") as fh:
                    fh.write(sim.image_bytes(n))
                sim.config.bad_images = {}
            else:
                os.symlink(os.path.join(self.complete, f), os.path.join(d, f))
        self._cache[key] = d
        return d


@pytest.fixture(scope="session")
def standard_sweeps(tmp_path_factory):
    return Sweeps(STANDARD, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sweeps(tmp_path_factory):
    return Sweeps(TINY, tmp_path_factory)


@pytest.fixture(scope="session")
def sim_complete(standard_sweeps):
    """The complete standard sweep: images 1-120 and ground_truth.json."""
    return standard_sweeps.complete


@pytest.fixture(scope="session")
def make_sweep(standard_sweeps):
    """make_sweep(omit=..., bad={image: mode}) -> folder of the standard sweep."""
    return standard_sweeps.make


@pytest.fixture(scope="session")
def tiny(tiny_sweeps):
    """The complete tiny sweep (40 images)."""
    return tiny_sweeps.complete


@pytest.fixture(scope="session")
def truth_tiny(tiny):
    with open(os.path.join(tiny, "ground_truth.json")) as fh:
        return json.load(fh)


@pytest.fixture(scope="session")
def sim_gapped(make_sweep):
    """The standard sweep without images 41-45 and 81-83: three blocks."""
    return make_sweep(omit=GAPS, name="sim_gapped")


@pytest.fixture(scope="session")
def truth(sim_complete):
    with open(os.path.join(sim_complete, "ground_truth.json")) as fh:
        return json.load(fh)


@pytest.fixture(scope="session")
def processed(sim_gapped, tmp_path_factory):
    """dials.process_gapped on the gapped standard sweep, with scaling."""
    out = str(tmp_path_factory.mktemp("processed"))
    result = process_ok(sim_gapped, out, "scale=True")
    return {"dir": out, "stdout": result.stdout, "stderr": result.stderr}


@pytest.fixture(scope="session")
def snase():
    if not os.path.isdir(SNASE):
        pytest.skip(f"the SNase images are not here ({SNASE}): see ../shared/README.md")
    return SNASE


# the SNase images processed by test_export and test_sanity: two blocks, 35
# of the 96 images (92 s alone, benchmarks/results/2026-12-05-forked-commands.md)
SNASE_PROCESSED_BLOCKS = [(1, 20), (46, 60)]


@pytest.fixture(scope="session")
def snase_processed(snase, tmp_path_factory):
    """dials.process_gapped on the SNase images of SNASE_PROCESSED_BLOCKS:
    one run shared by the export and sanity tests."""
    d = tmp_path_factory.mktemp("snase_two_blocks")
    for first, last in SNASE_PROCESSED_BLOCKS:
        for n in range(first, last + 1):
            name = f"snc_newhead_{n:05d}.img.bz2"
            os.symlink(os.path.join(snase, name), d / name)
    out = str(tmp_path_factory.mktemp("snase_processed"))
    result = process(str(d), out, *SNASE_GEOMETRY)
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    return out


# ---------------------------------------------------------------------------
# Running the suite on several pytest-xdist workers (make test: -n 2 --dist loadgroup)
# ---------------------------------------------------------------------------

# Files whose tests share a session fixture that runs the whole pipeline go
# to one worker (each worker has its own session: on two workers the run
# would be made twice).
GROUPS = {
    "test_pipeline.py": "processed",
    "test_html.py": "processed",
    "test_export.py": "processed",
    "test_sanity.py": "processed",
    "test_equivalence.py": "processed",
}
# Minutes on an idle 2-core machine, roughly (make test prints the slowest
# tests): the longest groups start first, so that no long group starts last
# while the other worker idles.
COST = {"processed": 14, "test_slurm.py": 6, "test_bad_inputs.py": 4, "test_api.py": 3,
        "test_bad_image_matrix.py": 3, "test_robustness.py": 3, "test_cli.py": 3}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("xdist"):
        return

    def group(item):
        name = os.path.basename(str(item.fspath))
        return GROUPS.get(name, name)

    for item in items:
        item.add_marker(pytest.mark.xdist_group(name=group(item)))
    # stable: within a group the collection order stays
    items.sort(key=lambda item: -COST.get(group(item), 1))


SNASE_GEOMETRY = [
    "geometry.scan.oscillation=0,1",
    "geometry.detector.fast_slow_beam_centre=532.61,500.53",
    "geometry.detector.distance=57.27",
    "geometry.goniometer.axis=1,0,0",
]


@pytest.fixture(scope="session")
def snase_gapped(snase, tmp_path_factory):
    """The SNase images without 40-45: blocks 1-39 and 46-96."""
    d = tmp_path_factory.mktemp("snase_gapped")
    for name in sorted(os.listdir(snase)):
        if not name.endswith(".img.bz2"):
            continue
        n = int(name.split("_")[-1].split(".")[0])
        if 40 <= n <= 45:
            continue
        os.symlink(os.path.join(snase, name), d / name)
    return str(d)
