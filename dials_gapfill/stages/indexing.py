"""Indexing stage: one crystal for all blocks, by the crystal model chosen
here (refinement.blocks.model), then the blocks that index poorly dropped.

Blocks that index poorly (a wrong start angle, a damaged stretch) are dropped
with a warning; the run fails only when no block survives.  With
``indexing.bravais_lattice`` the P1 solution's Bravais settings are refined
and one is taken, as dials.refine_bravais_settings and dials.reindex would.
"""

from __future__ import annotations

import copy
import logging
import os

from dials.algorithms.indexing.bravais_settings import phil_scope as bravais_phil
from dials.algorithms.indexing.bravais_settings import (
    refined_settings_from_refined_triclinic,
)
from dials.algorithms.refinement.refinement_helpers import set_obs_s1
from dials.array_family import flex
from dials.command_line.refine_bravais_settings import (
    eliminate_sys_absent,
    map_to_primitive,
)

from dials_gapfill import crystal_model
from dials_gapfill.errors import GapfillError, indexing_failure
from dials_gapfill.model.state import Record, block_names
from dials_gapfill.model.tables import keep_blocks
from dials_gapfill.phil import _refinement, defaults, master_phil, resolve_nproc

logger = logging.getLogger("dials.process_gapped.indexing")
stage_logger = logging.getLogger("dials.process_gapped")


def poorly_indexed_error(params, best_fraction):
    """The error when no block indexes well enough."""
    return GapfillError(
        indexing_failure(RuntimeError(f"at best {100 * best_fraction:.0f}% of a block's spots were indexed"), params)
    )


def changed_spotfinding(params) -> list[str]:
    """The spotfinder.* parameters given other than their defaults, as name=value."""
    return changed_parameters(params, "spotfinder.")


def changed_parameters(params, prefix) -> list[str]:
    """The parameters under `prefix` given other than their defaults, as name=value."""
    master = master_phil()
    diff = master.fetch_diff(source=master.format(params))
    return [f"{d.path}={' '.join(str(w.value) for w in d.object.words)}"
            for d in diff.all_definitions() if d.path.startswith(prefix)]


def another_crystal(sweeps, owners, experiments, keep, fractions, threshold, params=None) -> None:
    """Refuse a run in which every block of one sweep fails to index on the
    crystal that indexes the others: a block lost within a sweep is damage
    (dropped, as above), a whole sweep lost is most likely another crystal,
    and a run that went on without it would not be the run asked for."""
    if len(sweeps) < 2:
        return
    for sweep in sweeps:
        mine = [i for i, owner in enumerate(owners) if owner is sweep]
        if mine and not any(experiments[i].identifier in keep for i in mine):
            best = max(fractions[i] for i in mine)
            # spots of noise (a spot finder set for weaker spots) look the same
            changed = changed_spotfinding(params) if params is not None else []
            noise = f", or spots of noise ({', '.join(changed)}: try DIALS' defaults)" if changed else ""
            # a goniometer override moves every sweep's rotation the same way
            # where the headers gave each its own
            given = changed_parameters(params, "geometry.goniometer.") if params is not None else []
            noise += f", or a goniometer override ({', '.join(given)}: try the headers')" if given else ""
            raise GapfillError(
                f"sweep {sweep.number} ({os.path.basename(sweep.template)}) does not index on the crystal of the "
                f"other sweeps (at best {100 * best:.0f}% of a block's spots, "
                f"indexing.blocks.min_indexed_fraction={threshold}): images of another crystal{noise}? "
                "Process that sweep in a run of its own, or leave it out"
            )


def _drop(sweeps, record, exp, sweep, reason, stats) -> None:
    """Drop the block `exp` (of `sweep`) as not indexed, with `reason`."""
    # by its images, not its number: the blocks after it are numbered anew
    first, last = exp.scan.get_image_range()
    name = f"the block of {sweeps.images_name(sweep.number, first, last)}"
    stage_logger.warning("Dropping %s: %s", name, reason)
    record.warn(f"{name} dropped: {reason}")
    sweeps.drop_block(exp, reason, "block could not be indexed", stats=stats)


def run(state) -> Record:
    params, sweeps = state.params, state.sweeps
    record = Record()
    model, warning = crystal_model.choose(params, state.experiments, sweeps)
    if warning:
        stage_logger.warning("Warning: %s", warning)
        record.warn(warning)
    state.crystal_model = model
    before = list(state.experiments)
    spots = {e.identifier: int((state.reflections["id"] == i).count(True)) for i, e in enumerate(before)}
    experiments, indexed, found = model.index(state.experiments, state.reflections)
    # DIALS' indexer deletes the last experiment when a refinement
    # macro-cycle fails with it and goes on (Indexer.index); the per-block
    # searches take such a result, the block is then dropped as not indexed
    returned = {e.identifier for e in experiments}
    lost = [e for e in before if e.identifier not in returned]
    # the spots the lattice search could judge, where the model says which
    # (the continuous model: not the gap-edge spots it left out and could not
    # match before refinement); the report keeps indexed / all spots
    judged = {ident: stats.pop("spots_judged") for ident, stats in found.blocks.items() if "spots_judged" in stats}
    record.blocks.update({ident: stats for ident, stats in found.blocks.items() if stats})
    for line in found.warnings:
        record.warn(line)
    names = block_names(experiments, sweeps)
    flags = indexed.get_flags(indexed.flags.indexed)
    keep, fractions = set(), []
    owners = [sweeps.sweep_of(e) for e in experiments]  # before any block is dropped
    threshold = params.indexing.blocks.min_indexed_fraction
    for i, exp in enumerate(experiments):
        n_indexed = int(((indexed["id"] == i) & flags).count(True))
        n_spots = spots[exp.identifier]
        stats = record.block(exp.identifier)
        of_all = n_indexed / n_spots if n_spots else 0.0  # as reported
        stats.update(indexed=n_indexed, indexed_fraction=of_all)
        # judged on the spots the lattice search judged (not cut by a gap);
        # on all of them where it judged none (a block whose every spot is cut)
        n_judged = judged.get(exp.identifier, n_spots) or n_spots
        fraction = n_indexed / n_judged if n_judged else 0.0
        fractions.append(fraction)
        if n_judged == n_spots:
            stage_logger.info("%s: %d of %d spots indexed (%.1f%%)", names[exp.identifier], n_indexed, n_spots,
                              100 * fraction)
        else:
            stage_logger.info("%s: %d of %d spots indexed (%.1f%% of the %d the lattice search judged; the others "
                              "are cut by a gap)", names[exp.identifier], n_indexed, n_spots, 100 * fraction, n_judged)
        if fraction >= threshold and n_indexed > 0:
            keep.add(exp.identifier)
            continue
        judged_by = "" if n_judged == n_spots else " judged by the lattice search"
        _drop(sweeps, record, exp, owners[i], (
            f"only {100 * fraction:.0f}% of its spots{judged_by} indexed "
            f"(indexing.blocks.min_indexed_fraction={threshold})"
        ), {"spots": n_spots, "indexed": n_indexed, "indexed_fraction": of_all})
    for exp in lost:
        owners.append(sweeps.sweep_of(exp))
        fractions.append(0.0)
        _drop(sweeps, record, exp, owners[-1], "DIALS' indexer left it out (a refinement macro-cycle failed with it)",
              {"spots": spots[exp.identifier], "indexed": 0, "indexed_fraction": 0.0})
    if not keep:
        raise poorly_indexed_error(params, max(fractions))
    another_crystal(sweeps, owners, list(experiments) + lost, keep, fractions, threshold, params)
    if len(keep) < len(experiments):
        indexed, experiments = keep_blocks(indexed, experiments, keep)
    if params.indexing.bravais_lattice not in (None, "None", "none", ""):
        experiments, indexed, chosen = choose_bravais_lattice(experiments, indexed, params)
        record.crystal["bravais_lattice"] = chosen
    crystal = experiments[0].crystal
    record.crystal["indexing"] = {
        "unit_cell": list(crystal.get_unit_cell().parameters()),
        "space_group": str(crystal.get_space_group().info()),
    }
    state.experiments, state.reflections = experiments, indexed
    return record


def choose_bravais_lattice(experiments, reflections, params):
    """Refine the Bravais settings of the P1 solution and take one, as
    dials.refine_bravais_settings followed by dials.reindex.

    Returns (experiments, reflections, description).
    """
    wanted = str(params.indexing.bravais_lattice).strip()
    bp = defaults(bravais_phil)
    bp.nproc = resolve_nproc(params.mp.nproc)
    bp.refinement = _refinement(params)
    bp.refinement.reflections.reflections_per_degree = 100
    refl = reflections.select(reflections.get_flags(reflections.flags.indexed))
    if "s1" not in refl:  # the continuous model's indexing hands on no s1: the observed one
        refl["s1"] = flex.vec3_double(len(refl), (0.0, 0.0, 0.0))
        set_obs_s1(refl, experiments)
    if "shoebox" in refl:
        refl = copy.deepcopy(refl)
        del refl["shoebox"]
    work = copy.deepcopy(experiments)
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
    out = copy.deepcopy(reflections)
    out["miller_index"] = cb_op.apply(out["miller_index"])
    description = (
        f"{chosen['bravais']} (setting {chosen.setting_number}, cb_op {cb_op.as_abc()}, "
        f"space group {chosen.refined_crystal.get_space_group().info()})"
    )
    logger.info("Bravais lattice chosen: %s", description)
    return new_experiments, out, description
