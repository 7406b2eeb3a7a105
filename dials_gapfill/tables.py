"""Small helpers on reflection tables and experiment lists shared by the stages."""

from __future__ import annotations

import math
import uuid

from dials.array_family import flex

_IDENTIFIER_NAMESPACE = uuid.UUID("6f1c1d2e-9a4b-4c5d-8e7f-0a1b2c3d4e5f")


def block_identifier(template: str, first: int, last: int) -> str:
    """Deterministic experiment identifier of a block (same input, same id)."""
    return str(uuid.uuid5(_IDENTIFIER_NAMESPACE, f"{template}:{first}-{last}"))


def image_numbers(imageset) -> list[int]:
    first, last = imageset.get_scan().get_image_range()
    return list(range(first, last + 1))


def split_sequence(imageset, excluded) -> list:
    """Sub-sequences of `imageset` without the excluded image numbers."""
    numbers = image_numbers(imageset)
    if not set(excluded).intersection(numbers):
        return [imageset]
    first = numbers[0]
    # dxtbx slices sequences in batch coordinates: relative index + batch offset
    offset = imageset.get_scan().get_batch_offset()
    pieces, run = [], []
    for n in numbers + [None]:
        if n is not None and n not in excluded:
            run.append(n)
            continue
        if run:
            piece = imageset[run[0] - first + offset : run[-1] - first + 1 + offset]
            # dxtbx' convention, which DIALS relies on when it slices image sets by
            # array range (e.g. the integrator): batch offset = first image - 1
            scan = piece.get_scan()
            scan.set_batch_offset(run[0] - 1)
            piece.set_scan(scan)
            pieces.append(piece)
        run = []
    return pieces


def split_experiments(experiments, excluded, template):
    """Experiments cut at the excluded image numbers, with new identifiers.

    Beam, detector, goniometer and crystal objects stay shared with the input.
    """
    from dxtbx.model.experiment_list import Experiment, ExperimentList

    out = ExperimentList()
    for exp in experiments:
        for piece in split_sequence(exp.imageset, excluded):
            scan = piece.get_scan()
            first, last = scan.get_image_range()
            out.append(
                Experiment(
                    imageset=piece,
                    beam=exp.beam,
                    detector=exp.detector,
                    goniometer=exp.goniometer,
                    scan=scan,
                    crystal=exp.crystal,
                    identifier=block_identifier(template, first, last),
                )
            )
    return out


def blocks_of(experiments):
    """Block records (numbered 1..n in image order) of an experiment list."""
    from dials_gapfill.state import Block

    blocks = []
    for i, exp in enumerate(experiments, start=1):
        first, last = exp.scan.get_image_range()
        phi0, phi1 = exp.scan.get_oscillation_range()
        blocks.append(
            Block(number=i, first=first, last=last, phi_start=phi0, phi_end=phi1, identifier=exp.identifier)
        )
    return blocks


def image_numbers_of_z(z) -> list[int]:
    """Image number (1-based, as the file names) of frame coordinates z."""
    return [int(math.floor(v)) + 1 for v in z]


def assign_to_blocks(reflections, experiments) -> None:
    """Set ``id`` (and the identifier map) from each spot's image number.

    Spots whose centroid lies on no block's images get id -1.
    """
    z = reflections["xyzobs.px.value"].parts()[2]
    numbers = flex.int(image_numbers_of_z(z))
    ids = flex.int(len(reflections), -1)
    for k in list(reflections.experiment_identifiers().keys()):
        del reflections.experiment_identifiers()[k]
    for i, exp in enumerate(experiments):
        first, last = exp.scan.get_image_range()
        ids.set_selected((numbers >= first) & (numbers <= last), i)
        reflections.experiment_identifiers()[i] = exp.identifier
    reflections["id"] = ids


def keep_experiments(reflections, experiments, identifiers):
    """Subset of experiments (by identifier) and their reflections, renumbered."""
    from dxtbx.model.experiment_list import ExperimentList

    keep = [e for e in experiments if e.identifier in identifiers]
    kept = ExperimentList(keep)
    old_of = {v: k for k, v in reflections.experiment_identifiers()}
    ids = reflections["id"]
    new_ids = flex.int(len(reflections), -1)
    for new, exp in enumerate(kept):
        old = old_of.get(exp.identifier)
        if old is not None:
            new_ids.set_selected(ids == old, new)
    sel = new_ids >= 0
    out = reflections.select(sel)
    out["id"] = new_ids.select(sel)
    for k in list(out.experiment_identifiers().keys()):
        del out.experiment_identifiers()[k]
    for new, exp in enumerate(kept):
        out.experiment_identifiers()[new] = exp.identifier
    return out, kept


def per_experiment_counts(reflections, n_experiments, selection=None) -> list[int]:
    ids = reflections["id"]
    if selection is not None:
        ids = ids.select(selection)
    return [int((ids == i).count(True)) for i in range(n_experiments)]


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


def drop_short_blocks(experiments, min_images, report, why):
    """Experiments of at least `min_images` images; the others are reported as dropped."""
    import logging

    from dxtbx.model.experiment_list import ExperimentList

    kept = ExperimentList()
    for exp in experiments:
        first, last = exp.scan.get_image_range()
        if last - first + 1 >= min_images:
            kept.append(exp)
            continue
        reason = f"block of {last - first + 1} images is shorter than gaps.min_block_images{why}"
        logging.getLogger("dials.process_gapped").warning("Dropping images %d-%d: %s", first, last, reason)
        report.dropped_blocks.append({"first": first, "last": last, "reason": reason})
        for n in range(first, last + 1):
            report.exclude(n, "block too short", "auto")
    return kept


def renumber(table, table_experiments, experiments):
    """Renumber the ids of `table` (made for `table_experiments`) to the
    positions of those experiments in `experiments`, with the identifier map."""
    position = {e.identifier: i for i, e in enumerate(experiments)}
    ids = table["id"]
    new_ids = flex.int(len(table), -1)
    for i, exp in enumerate(table_experiments):
        new_ids.set_selected(ids == i, position[exp.identifier])
    table["id"] = new_ids
    for k in list(table.experiment_identifiers().keys()):
        del table.experiment_identifiers()[k]
    present = {e.identifier for e in table_experiments}
    for i, exp in enumerate(experiments):
        if exp.identifier in present:
            table.experiment_identifiers()[i] = exp.identifier
    return table


def concat(tables, experiments):
    """Rows of several tables (their common columns), ids as in `experiments`."""
    common = [k for k in tables[0].keys() if all(k in t for t in tables[1:])]
    out = flex.reflection_table()
    for part in tables:
        sub = flex.reflection_table()
        for k in common:
            sub[k] = part[k]
        out.extend(sub)
    for i, exp in enumerate(experiments):
        out.experiment_identifiers()[i] = exp.identifier
    return out


def mean_cell(crystal):
    """Unit cell of a crystal: the mean over its scan points, if it has them."""
    n = crystal.num_scan_points
    if n == 0:
        return list(crystal.get_unit_cell().parameters())
    cells = [crystal.get_unit_cell_at_scan_point(i).parameters() for i in range(n)]
    return [sum(c[k] for c in cells) / n for k in range(6)]

