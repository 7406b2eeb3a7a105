"""Every option of the DIALS steps has the name it has in that DIALS program.

For each program the scopes dials.process_gapped includes are walked
definition by definition: each path must exist in dials.process_gapped's
master scope with the same type and the same default.  The documented
exceptions: per-step parallelism (one ``mp`` scope replaces it), and the
defaults we set on purpose (listed here and in README.md).
"""

from __future__ import annotations

import pytest

# per-step parallelism, replaced by mp.nproc / mp.method / mp.njobs
REPLACED_BY_MP = {
    "spotfinder.mp.nproc", "spotfinder.mp.method", "spotfinder.mp.njobs",
    "spotfinder.mp.chunksize", "spotfinder.mp.min_chunksize",
    "indexing.nproc", "refinement.mp.nproc", "refinement.reflections.outlier.nproc",
    "integration.mp.nproc", "integration.mp.method", "integration.mp.njobs",
}
# defaults that differ on purpose
OUR_DEFAULTS = {"mtz.hklout": "None (the file name comes from output.mtz)"}


def _programs():
    from dials.command_line import export, find_spots, index, integrate, refine

    return {
        "dials.find_spots": (find_spots.working_phil, ("spotfinder",)),
        "dials.index": (index.working_phil, ("indexing",)),
        "dials.refine": (refine.working_phil, ("refinement",)),
        "dials.integrate": (integrate.working_phil, ("integration", "profile", "prediction")),
        "dials.export": (export.phil_scope, ("mtz",)),
    }


def _default(definition) -> str:
    return " ".join(w.value for w in definition.words)


def _definitions(scope):
    return {d.path: d for d in scope.all_definitions()}


@pytest.mark.parametrize("program", ["dials.find_spots", "dials.index", "dials.refine",
                                     "dials.integrate", "dials.export"])
def test_dials_options_keep_their_names(program):
    from dials_gapfill.phil import master_phil

    scope, tops = _programs()[program]
    ours = {d.path: d for d in master_phil().all_definitions()}
    theirs = {p: d.object for p, d in _definitions(scope).items() if p.split(".")[0] in tops}
    assert len(theirs) >= 5
    missing, differ = [], []
    for path, definition in theirs.items():
        mine = ours.get(path)
        if mine is None:
            if path in REPLACED_BY_MP or any(path.startswith(p + ".") for p in REPLACED_BY_MP):
                continue
            missing.append(path)
            continue
        mine = mine.object
        if str(mine.type) != str(definition.type):
            differ.append(f"{path}: type {mine.type} vs {definition.type}")
        elif _default(mine) != _default(definition) and path not in OUR_DEFAULTS:
            differ.append(f"{path}: default {_default(mine)!r} vs {_default(definition)!r}")
    assert not missing, f"{program} options missing in dials.process_gapped: {missing[:10]}"
    assert not differ, f"{program} options that differ: {differ[:10]}"


def test_the_cli_lists_them(tmp_path):
    """What a user types for dials.integrate is printed by -c -a2 -e3 here too."""
    from conftest import run_cmd, tool

    out = run_cmd([tool("dials.process_gapped"), "-c", "-a2", "-e3"]).stdout
    lines = out.splitlines()
    for line in ("profile", "prediction {", "  gaussian_rs", "spotfinder", "mtz"):
        assert line in lines, line
