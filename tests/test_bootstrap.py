"""Where DIALS comes from: the decision of scripts/bootstrap.sh, without building anything.

`bash scripts/bootstrap.sh --route` prints the route `make demo` and `make test` take:
`system` (/usr/bin/python3 imports DIALS), `apt` (apt has a `dials` candidate: Debian 12) or
`root` (neither, as on Debian 13: a Debian 12 root with DIALS, scripts/dials-root.sh).  The
probes are the real script's, given stand-ins: SYS_PYTHON is a fake Python that imports or
does not, APT_CACHE a fake apt-cache printing what apt-cache prints.  Then the Makefile's
wiring (`make -n`) and the Debian mirror scripts/dials-root.sh would give debootstrap.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import ROOT

BOOTSTRAP = os.path.join(ROOT, "scripts", "bootstrap.sh")
DIALS_ROOT = os.path.join(ROOT, "scripts", "dials-root.sh")

CANDIDATE = """dials:
  Installed: (none)
  Candidate: 3.12.1+dfsg3-5
  Version table:
     3.12.1+dfsg3-5 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
"""
NO_CANDIDATE = """dials:
  Installed: (none)
  Candidate: (none)
  Version table:
"""


def _exe(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def stubs(tmp_path):
    """Fake probes: a Python that imports DIALS or not, an apt-cache with or without dials."""
    made = {
        "importable": _exe(tmp_path / "python-with-dials", "#!/bin/sh\nexit 0\n"),
        "not importable": _exe(tmp_path / "python-without-dials", "#!/bin/sh\nexit 1\n"),
        "apt candidate": _exe(tmp_path / "apt-cache-12", f"#!/bin/sh\ncat <<'EOF'\n{CANDIDATE}EOF\n"),
        "no candidate": _exe(tmp_path / "apt-cache-13", f"#!/bin/sh\ncat <<'EOF'\n{NO_CANDIDATE}EOF\n"),
        # apt-cache policy of a name apt has never heard of prints nothing
        "unknown": _exe(tmp_path / "apt-cache-unknown", "#!/bin/sh\nexit 0\n"),
        "no apt": str(tmp_path / "no-such-apt-cache"),
        "no marker": str(tmp_path / "no-marker"),
    }
    (tmp_path / "os-release-13").write_text('ID=debian\nVERSION_ID="13"\nVERSION_CODENAME=trixie\n')
    (tmp_path / "os-release-12").write_text('ID=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\n')
    made["debian 13"] = str(tmp_path / "os-release-13")
    made["debian 12"] = str(tmp_path / "os-release-12")
    made["no os-release"] = str(tmp_path / "no-os-release")
    return made


def _env(python, apt_cache, marker, **extra):
    env = dict(os.environ)
    for name in ("GAPFILL_DIALS", "GAPFILL_ROOT_MARKER", "VENV", "MAKEFLAGS", "MFLAGS", "OS_RELEASE"):
        env.pop(name, None)
    # the distribution: Debian 13 (no dials package) unless a test says otherwise
    extra.setdefault("OS_RELEASE", os.path.join(os.path.dirname(python), "os-release-13"))
    env.update(SYS_PYTHON=python, APT_CACHE=apt_cache, GAPFILL_ROOT_MARKER=marker, **extra)
    return env


def route(python, apt_cache, marker, **extra):
    result = subprocess.run(
        ["bash", BOOTSTRAP, "--route"], env=_env(python, apt_cache, marker, **extra),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_dials_importable_takes_the_system(stubs):
    # what the apt-cache says does not matter then
    for apt in ("apt candidate", "no candidate", "no apt"):
        assert route(stubs["importable"], stubs[apt], stubs["no marker"]) == "system"


def test_apt_candidate_installs_from_debian(stubs):
    assert route(stubs["not importable"], stubs["apt candidate"], stubs["no marker"]) == "apt"


def test_neither_takes_the_root(stubs):
    for apt in ("no candidate", "unknown", "no apt"):
        assert route(stubs["not importable"], stubs[apt], stubs["no marker"]) == "root", apt
        assert route(stubs["not importable"], stubs[apt], stubs["no marker"],
                     OS_RELEASE=stubs["no os-release"]) == "root", apt


def test_debian_12_with_apt_lists_never_read_installs_from_debian(stubs):
    # a new Debian 12 container: apt-cache knows no dials until apt-get update
    # has run, but the distribution has it: apt (update, install), not a 5 GB root
    for apt in ("no candidate", "unknown", "apt candidate"):
        assert route(stubs["not importable"], stubs[apt], stubs["no marker"],
                     OS_RELEASE=stubs["debian 12"]) == "apt", apt
    # DIALS already there: the system, whatever the distribution
    assert route(stubs["importable"], stubs["no candidate"], stubs["no marker"],
                 OS_RELEASE=stubs["debian 12"]) == "system"


def test_switch_forces_the_root(stubs):
    assert route(stubs["importable"], stubs["apt candidate"], stubs["no marker"], GAPFILL_DIALS="root") == "root"
    assert route(stubs["importable"], stubs["apt candidate"], stubs["no marker"], GAPFILL_DIALS="auto") == "system"
    result = subprocess.run(
        ["bash", BOOTSTRAP, "--route"],
        env=_env(stubs["importable"], stubs["apt candidate"], stubs["no marker"], GAPFILL_DIALS="conda"),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "GAPFILL_DIALS=conda" in result.stderr


def test_inside_the_root_never_a_root_again(stubs, tmp_path):
    marker = tmp_path / "dials-gapfill-root"
    marker.write_text("the root's marker\n")
    for python in ("importable", "not importable"):
        assert route(stubs[python], stubs["no candidate"], str(marker), GAPFILL_DIALS="root") == "system"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_makefile_runs_the_targets_in_the_root_only_on_the_root_route(stubs):
    def dry_run(target, python, apt_cache, **extra):
        result = subprocess.run(
            ["make", "-n", "--no-print-directory", target], cwd=ROOT,
            env=_env(python, apt_cache, stubs["no marker"], **extra),
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    normal = dry_run("demo", stubs["importable"], stubs["no candidate"])
    assert normal[0] == "VENV=.venv bash scripts/bootstrap.sh"
    # (the simulator refuses a folder holding images: a second make demo starts afresh)
    assert normal[1] == "rm -rf demo/images"
    assert normal[2].startswith(".venv/bin/dials.simulate_sweep output.directory=demo/images ")
    assert not any("dials-root" in line for line in normal)
    assert dry_run("test", stubs["not importable"], stubs["apt candidate"])[-1] == ".venv/bin/python -m pytest -ra --durations=30 -n 2 --dist loadgroup tests"

    for target in ("demo", "test", "test-fast", "setup"):
        for python, apt, extra in (("not importable", "no candidate", {}),
                                   ("importable", "apt candidate", {"GAPFILL_DIALS": "root"})):
            lines = dry_run(target, stubs[python], stubs[apt], **extra)
            assert lines == [
                f"bash scripts/dials-root.sh run make --no-print-directory {target} VENV=.venv-root NPROC=2 DEMO=demo"
            ], (target, python, apt, extra)
    # make clean stays on the host
    assert dry_run("clean", stubs["not importable"], stubs["no candidate"]) == ["rm -rf demo .pytest_cache"]


def _mirrors(etc):
    env = dict(os.environ, GAPFILL_APT_ETC=str(etc))
    for name in ("GAPFILL_ROOT_MIRROR", "GAPFILL_ROOT_SECURITY_MIRROR"):
        env.pop(name, None)
    result = subprocess.run(["bash", DIALS_ROOT, "mirrors"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_debootstrap_gets_the_machines_debian_mirror(tmp_path):
    # deb822, as on Debian 12 and 13, with another vendor's repository first
    d = tmp_path / "deb822" / "sources.list.d"
    d.mkdir(parents=True)
    (d / "a-vendor.sources").write_text(
        "Types: deb\nURIs: https://packages.example.com/apt\nSuites: cloud-sdk\nComponents: main\n")
    (d / "debian.sources").write_text(
        "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n"
        "URIs: http://mirror.example.org/debian/\nSuites: trixie trixie-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example.org/debian-security\nSuites: trixie-security\nComponents: main\n")
    assert _mirrors(tmp_path / "deb822") == ["http://mirror.example.org/debian", "http://mirror.example.org/debian-security"]

    # one-line sources.list, with options and a disabled line
    (tmp_path / "oneline").mkdir()
    (tmp_path / "oneline" / "sources.list").write_text(
        "# deb http://old.example.org/debian bookworm main\n"
        "deb [arch=amd64] http://apt-cache.local:3142/debian bookworm main\n")
    assert _mirrors(tmp_path / "oneline") == ["http://apt-cache.local:3142/debian", "http://apt-cache.local:3142/debian-security"]

    # nothing configured: Debian's own redirector
    (tmp_path / "empty").mkdir()
    assert _mirrors(tmp_path / "empty") == ["http://deb.debian.org/debian", "http://deb.debian.org/debian-security"]
