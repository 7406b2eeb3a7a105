"""Indexing stage: one crystal for all blocks (DIALS joint indexing).

Joint indexing is DIALS' ``dials.command_line.index.index`` on all blocks at
once.  If it fails, the largest block is indexed alone and its crystal is
used as the known model for all blocks.  Blocks that index poorly (a wrong
start angle, a damaged stretch) are dropped with a warning; the run fails
only when no block survives.
"""

from __future__ import annotations

import copy
import logging

from dials_gapfill.errors import GapfillError

logger = logging.getLogger("dials.process_gapped.indexing")


def _explain(e: Exception, params) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    ks = params.indexing.known_symmetry
    if ks.space_group is not None or ks.unit_cell is not None:
        sym = []
        if ks.space_group is not None:
            sym.append(f"space_group={ks.space_group}")
        if ks.unit_cell is not None:
            sym.append("unit_cell=" + ",".join(f"{v:g}" for v in ks.unit_cell.parameters()))
        return (
            f"indexing failed with {' '.join(sym)}: {text[:160]}: the lattice of the spots "
            "does not fit this symmetry; check indexing.known_symmetry (or leave it out)"
        )
    return (
        f"indexing failed: {text[:160]}: check the geometry (beam centre, distance, "
        "oscillation: geometry.*) or the spot finding (spotfinder.*)"
    )


def poorly_indexed_error(params, best_fraction):
    """The error when no block indexes well enough."""
    return GapfillError(
        _explain(RuntimeError(f"at best {100 * best_fraction:.0f}% of a block's spots were indexed"), params)
    )


def _restore_identifiers(indexed_experiments, indexed, experiments):
    """Give the indexed experiments the identifiers of their blocks.

    DIALS' indexer makes new experiments with new identifiers; each still
    holds the image set (and image range) of one input block.
    """
    by_range = {e.scan.get_image_range(): e.identifier for e in experiments}
    for exp in indexed_experiments:
        exp.identifier = by_range[exp.scan.get_image_range()]
    ids = indexed.experiment_identifiers()
    for k in list(ids.keys()):
        del ids[k]
    for i, exp in enumerate(indexed_experiments):
        ids[i] = exp.identifier
    return indexed_experiments, indexed


def index(experiments, reflections, params):
    """(experiments with one shared crystal, reflections with miller indices)."""
    return _restore_identifiers(*_index(experiments, reflections, params), experiments)


def _index(experiments, reflections, params):
    from dxtbx.model.experiment_list import ExperimentList

    from dials.algorithms.indexing import DialsIndexError
    from dials.command_line.index import index as dials_index

    from dials_gapfill.phil import dials_index_params

    ip = dials_index_params(params)  # one crystal: a small job
    ip.indexing.joint_indexing = True
    try:
        indexed_experiments, indexed = dials_index(experiments, [reflections], ip)
        return indexed_experiments, indexed
    except (DialsIndexError, ValueError, RuntimeError, AssertionError) as e:
        first_error = e
        if len(experiments) == 1:
            raise GapfillError(_explain(e, params)) from None
    logger.warning(
        "Joint indexing failed (%s); indexing the largest block alone",
        " ".join(str(first_error).split())[:120],
    )
    counts = [int((reflections["id"] == i).count(True)) for i in range(len(experiments))]
    largest = max(range(len(experiments)), key=lambda i: counts[i])
    single = ExperimentList([experiments[largest]])
    refl = reflections.select(reflections["id"] == largest)
    refl["id"] = refl["id"] * 0
    for k in list(refl.experiment_identifiers().keys()):
        del refl.experiment_identifiers()[k]
    refl.experiment_identifiers()[0] = experiments[largest].identifier
    try:
        found, _ = dials_index(single, [refl], copy.deepcopy(ip))
    except (DialsIndexError, ValueError, RuntimeError, AssertionError) as e:
        raise GapfillError(_explain(e, params)) from None
    crystal = found[0].crystal
    for exp in experiments:
        exp.crystal = crystal
    try:
        return dials_index(experiments, [reflections], ip)
    except (DialsIndexError, ValueError, RuntimeError, AssertionError) as e:
        raise GapfillError(_explain(e, params)) from None


def choose_bravais_lattice(experiments, reflections, params):
    """Refine the Bravais settings of the P1 solution and take one, as
    dials.refine_bravais_settings followed by dials.reindex.

    Returns (experiments, reflections, description).
    """
    import copy as _copy

    from dials.algorithms.indexing.bravais_settings import phil_scope as bravais_phil
    from dials.algorithms.indexing.bravais_settings import (
        refined_settings_from_refined_triclinic,
    )
    from dials.command_line.refine_bravais_settings import (
        eliminate_sys_absent,
        map_to_primitive,
    )

    from dials_gapfill.phil import _refinement, defaults, resolve_nproc

    wanted = str(params.indexing.bravais_lattice).strip()
    bp = defaults(bravais_phil)
    bp.nproc = resolve_nproc(params.mp.nproc)
    bp.refinement = _refinement(params)
    bp.refinement.reflections.reflections_per_degree = 100
    refl = reflections.select(reflections.get_flags(reflections.flags.indexed))
    if "shoebox" in refl:
        refl = _copy.deepcopy(refl)
        del refl["shoebox"]
    work = _copy.deepcopy(experiments)
    refl = eliminate_sys_absent(work, refl)
    cb_op_to_primitive = map_to_primitive(work, refl)
    settings = refined_settings_from_refined_triclinic(work, refl, bp, cb_op_to_primitive=cb_op_to_primitive)
    logger.info(str(settings))
    if wanted.lower() == "auto":
        chosen = next((s for s in settings if s.recommended and s.refined_experiments), settings[-1])
    else:
        matches = [s for s in settings if s["bravais"] == wanted and s.refined_experiments]
        if not matches:
            possible = ", ".join(sorted({s["bravais"] for s in settings}))
            raise GapfillError(
                f"indexing.bravais_lattice={wanted} is not a lattice of this cell: choose one of "
                f"{possible} (or auto)"
            )
        chosen = matches[0]
    cb_op = chosen["cb_op_inp_best"] * cb_op_to_primitive
    new_experiments = chosen.refined_experiments
    for new, old in zip(new_experiments, experiments):
        new.identifier = old.identifier
        new.imageset = old.imageset
    out = _copy.deepcopy(reflections)
    out["miller_index"] = cb_op.apply(out["miller_index"])
    description = (
        f"{chosen['bravais']} (setting {chosen.setting_number}, cb_op {cb_op.as_abc()}, "
        f"space group {chosen.refined_crystal.get_space_group().info()})"
    )
    logger.info("Bravais lattice chosen: %s", description)
    return new_experiments, out, description
