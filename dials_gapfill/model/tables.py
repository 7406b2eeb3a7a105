"""Reflection tables of blocks: DIALS' own selection by experiment identifier,
plus the one thing DIALS has no helper for (below)."""

from __future__ import annotations

import math

from dials.array_family import flex
from dxtbx.model.experiment_list import ExperimentList


def image_numbers_of_z(z) -> list[int]:
    """Image number (1-based, as the file names) of frame coordinates z."""
    return [int(math.floor(v)) + 1 for v in z]


def join_blocks(tables, experiments):
    """One table holding, for each experiment of `experiments` in that order,
    its rows from whichever of `tables` has its identifier; ``id`` (and
    ``imageset_id``: each block has its own image set) is the experiment's
    position, the identifier map complete.

    DIALS' ``reflection_table.concat`` renumbers ids over the experiments that
    have rows (an experiment without rows would shift the ids of the ones
    after it) and ``extend`` fills a column one table lacks with zeros; here
    ids are positions and only the columns all contributing tables have are
    kept (e.g. summation-only blocks have no profile-fitting columns).
    """
    parts = []
    for i, exp in enumerate(experiments):
        table = next((t for t in tables if exp.identifier in t.experiment_identifiers().values()), None)
        if table is None:
            continue
        part = table.select_on_experiment_identifiers([exp.identifier])
        part["id"] = flex.int(len(part), i)
        if "imageset_id" in part:
            part["imageset_id"] = flex.int(len(part), i)
        parts.append(part)
    out = flex.reflection_table()
    if parts:
        common = [k for k in parts[0].keys() if all(k in p for p in parts[1:])]
        for part in (p for p in parts if len(p)):
            sub = flex.reflection_table()
            for k in common:
                sub[k] = part[k]
            out.extend(sub)
    for i, exp in enumerate(experiments):
        out.experiment_identifiers()[i] = exp.identifier
    return out


def keep_experiments(reflections, experiments, identifiers):
    """Subset of experiments (by identifier) and their reflections, renumbered."""
    kept = ExperimentList([e for e in experiments if e.identifier in identifiers])
    return join_blocks([reflections], kept), kept


def keep_blocks(reflections, experiments, identifiers):
    """Subset of blocks (by identifier) and all their spots, unindexed ones
    (``id`` -1) included, found by ``imageset_id`` (a block's position: each
    block has its own image set); ``id`` and ``imageset_id`` renumbered.
    (:func:`keep_experiments` keeps only rows with an experiment's id: after
    indexing, the unindexed spots, which indexing against the refined model
    may still take up.)"""
    if "imageset_id" not in reflections:
        return keep_experiments(reflections, experiments, identifiers)
    positions = [i for i, e in enumerate(experiments) if e.identifier in identifiers]
    kept = ExperimentList([experiments[i] for i in positions])
    iset = reflections["imageset_id"]
    sel = flex.bool(len(reflections), False)
    for old in positions:
        sel |= iset == old
    out = reflections.select(sel)
    ids, isets = out["id"], out["imageset_id"]
    new_ids, new_isets = flex.int(len(out), -1), flex.int(len(out), -1)
    for new, old in enumerate(positions):
        new_ids.set_selected(ids == old, new)
        new_isets.set_selected(isets == old, new)
    out["id"], out["imageset_id"] = new_ids, new_isets
    set_identifiers(out, kept)
    return out, kept


def set_identifiers(table, experiments) -> None:
    """The table's identifier map: id i is experiments[i]."""
    ids = table.experiment_identifiers()
    for k in list(ids.keys()):
        del ids[k]
    for i, exp in enumerate(experiments):
        ids[i] = exp.identifier


def rmsds(reflections, experiment_id):
    """RMSD x, y (px) and phi (images) of reflections used in refinement."""
    sel = (reflections["id"] == experiment_id) & reflections.get_flags(
        reflections.flags.used_in_refinement
    )
    if "xyzcal.px" not in reflections:
        return None
    sub = reflections.select(sel)
    if len(sub) == 0:
        return None
    xo, yo, zo = sub["xyzobs.px.value"].parts()
    xc, yc, zc = sub["xyzcal.px"].parts()
    n = len(sub)
    return (
        math.sqrt(flex.sum_sq(xc - xo) / n),
        math.sqrt(flex.sum_sq(yc - yo) / n),
        math.sqrt(flex.sum_sq(zc - zo) / n),
        n,
    )


def mean_cell(crystal):
    """Unit cell of a crystal: the mean over its scan points, if it has them."""
    n = crystal.num_scan_points
    if n == 0:
        return list(crystal.get_unit_cell().parameters())
    cells = [crystal.get_unit_cell_at_scan_point(i).parameters() for i in range(n)]
    return [sum(c[k] for c in cells) / n for k in range(6)]

