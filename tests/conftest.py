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

import pytest

import dials_gapfill  # noqa: F401  (sets up libtbx for the venv before dials imports)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SNASE = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "snase"))
BIN = os.path.dirname(sys.executable)
NPROC = os.environ.get("GAPFILL_TEST_NPROC", "2")

# The standard test sweep: 120 images of 0.5 deg on a Pilatus 1M.
STANDARD = dict(n_images=120, seed=42)
GAPS = list(range(41, 46)) + list(range(81, 84))


def tool(name):
    """Path of a console script installed with this package (or on PATH)."""
    path = os.path.join(BIN, name)
    return path if os.path.exists(path) else shutil.which(name) or name


def run_cmd(args, cwd=None, timeout=1200, env=None):
    """Run a command; return CompletedProcess with text output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def process(images, out, *phil, cwd=None, timeout=1200):
    """Run dials.process_gapped; return the CompletedProcess."""
    args = [tool("dials.process_gapped")]
    args += images if isinstance(images, list) else [images]
    args += [f"output.directory={out}", f"nproc={NPROC}", *phil]
    return run_cmd(args, cwd=cwd, timeout=timeout)


def _simulate(directory, **config):
    from dials_gapfill.simulate import SimulationConfig, simulate

    simulate(SimulationConfig(**config), directory)
    return directory


@pytest.fixture(scope="session")
def sim_complete(tmp_path_factory):
    """The complete standard sweep: images 1-120 and ground_truth.json."""
    return _simulate(str(tmp_path_factory.mktemp("sim_complete")), **STANDARD)


@pytest.fixture(scope="session")
def make_sweep(sim_complete, tmp_path_factory):
    """make_sweep(omit=..., bad={image: mode}) -> folder of the standard sweep."""
    from dials_gapfill.simulate import Simulation, SimulationConfig

    cache = {}
    simulation = {}

    def make(omit=(), bad=None, name=None):
        key = (tuple(sorted(omit)), tuple(sorted((bad or {}).items())))
        if key in cache:
            return cache[key]
        d = str(tmp_path_factory.mktemp(name or "sweep"))
        truth = json.load(open(os.path.join(sim_complete, "ground_truth.json")))
        for f in truth["files"]:
            n = int(f.split("_")[-1].split(".")[0])
            if n in omit:
                continue
            if bad and n in bad:
                if "sim" not in simulation:
                    simulation["sim"] = Simulation(SimulationConfig(**STANDARD))
                sim = simulation["sim"]
                sim.config.bad_images = {n: bad[n]}
                with open(os.path.join(d, f), "wb") as fh:
                    fh.write(sim.image_bytes(n))
                sim.config.bad_images = {}
            else:
                os.symlink(os.path.join(sim_complete, f), os.path.join(d, f))
        cache[key] = d
        return d

    return make


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
    result = process(sim_gapped, out, "scale=True")
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    return {"dir": out, "stdout": result.stdout, "stderr": result.stderr}


@pytest.fixture(scope="session")
def snase():
    if not os.path.isdir(SNASE):
        pytest.skip(f"the SNase images are not here ({SNASE}): see ../shared/README.md")
    return SNASE


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
