"""The virtual environment is a whole DIALS environment, like dials.python.

A fresh venv is made in a temporary folder by scripts/bootstrap.sh (the code
`make test` and `make demo` run, without installing this package), and a new
Python process in it imports dxtbx, dials or cctbx first thing, with
LIBTBX_BUILD unset, and sees the same libtbx environment (DIALS' sources and
static files) as the system Python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SYS_PYTHON = os.environ.get("SYS_PYTHON", "/usr/bin/python3")

# what libtbx tells a program about its environment
PROBE = """
import json, sys
{first}
import libtbx.load_env, libtbx
env = libtbx.env
print(json.dumps({{
    "prefix": sys.prefix,
    "static": env.find_in_repositories("dials/static/css"),
    "dials": env.dist_path("dials"),
    "dxtbx": env.dist_path("dxtbx"),
    "bin": abs(env.bin_path),
    "lib": abs(env.lib_path),
    "gapfill_imported": "dials_gapfill" in sys.modules,
}}))
"""


def _clean_env():
    env = dict(os.environ)
    for name in ("LIBTBX_BUILD", "PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def _probe(python, first, cwd):
    result = subprocess.run(
        [python, "-c", PROBE.format(first=first)], cwd=cwd, env=_clean_env(),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, (first, result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    if not os.path.exists(SYS_PYTHON):
        pytest.skip(f"{SYS_PYTHON} is not here")
    check = subprocess.run([SYS_PYTHON, "-c", "import dials, dxtbx, cctbx"], capture_output=True,
                           env=_clean_env())
    if check.returncode:
        pytest.skip(f"DIALS is not installed for {SYS_PYTHON}")
    venv = str(tmp_path_factory.mktemp("venv") / "venv")
    env = _clean_env()
    env.update(VENV=venv, BOOTSTRAP_VENV_ONLY="1", SYS_PYTHON=SYS_PYTHON)
    for _ in range(2):  # the second run must be a no-op that still succeeds (idempotent)
        result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "bootstrap.sh")], env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
    return venv


@pytest.mark.parametrize("first", ["import dxtbx", "import dials", "import cctbx",
                                   "from dials.util.version import dials_version; dials_version()",
                                   "import scitbx.array_family.flex; import dials.array_family.flex"])
def test_fresh_venv_imports_dials_first_thing(fresh_venv, first, tmp_path):
    python = os.path.join(fresh_venv, "bin", "python")
    system = _probe(SYS_PYTHON, first, str(tmp_path))
    venv = _probe(python, first, str(tmp_path))
    assert os.path.realpath(venv["prefix"]) == os.path.realpath(fresh_venv)
    assert not venv["gapfill_imported"]
    # the same environment as the system Python's (what dials.python sees)
    for key in ("static", "dials", "dxtbx", "bin", "lib"):
        assert venv[key] == system[key], (key, venv[key], system[key])
    assert venv["static"] and os.path.isdir(venv["static"])


def test_fresh_venv_runs_a_dials_program(fresh_venv, tmp_path):
    """A DIALS command-line program, run with the venv's Python."""
    python = os.path.join(fresh_venv, "bin", "python")
    result = subprocess.run(
        [python, "-c", "import sys; from dials.command_line.show import run; sys.argv=['dials.show']; run([])"],
        cwd=str(tmp_path), env=_clean_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dials.show" in result.stdout or "Usage" in result.stdout or "usage" in result.stdout, result.stdout


def test_project_venv_if_this_is_one():
    """The venv running these tests (made by the same script) imports dxtbx first too."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests do not run in a venv")
    result = subprocess.run([sys.executable, "-c", "import dxtbx, dials, cctbx"], env=_clean_env(),
                            cwd="/", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
