"""Indexing stage: one crystal for all blocks.

``indexing.blocks.lattice_search`` chooses where DIALS looks for the lattice:

- ``largest`` (default): DIALS' indexer (``Indexer.from_parameters``: the
  basis-vector search, the evaluation of candidate solutions and the
  refinement protocol of dials.index) on the largest block, then DIALS'
  known-orientation indexer on ALL blocks with that crystal, so every block
  is indexed and refined with the one crystal.  The cost of the search does
  not grow with the number of blocks (each candidate is refined with every
  block in a joint search, which is what makes dials.index slower on a
  gapped sweep than on the same images without gaps).
- ``joint``: dials.index's joint indexing of all blocks at once
  (``dials.command_line.index.index``), exactly as the CLI.

If the search fails on the largest block, the joint search is tried (and the
other way round).  Blocks that index poorly (a wrong start angle, a damaged
stretch) are dropped with a warning by the pipeline; the run fails only when
no block survives.
"""

from __future__ import annotations

import copy
import logging

from dials.algorithms.indexing import DialsIndexError, indexer
from dials.algorithms.indexing.bravais_settings import phil_scope as bravais_phil
from dials.algorithms.indexing.bravais_settings import (
    refined_settings_from_refined_triclinic,
)
from dials.algorithms.indexing.known_orientation import IndexerKnownOrientation
from dials.algorithms.refinement.refinement_helpers import set_obs_s1
from dials.array_family import flex
from dials.command_line.index import index as dials_index
from dials.command_line.refine_bravais_settings import (
    eliminate_sys_absent,
    map_to_primitive,
)
from dxtbx.model import Experiment
from dxtbx.model.experiment_list import ExperimentList

from dials_gapfill.errors import GapfillError, indexing_failure
from dials_gapfill.crystal_model.lattice import staged_search
from dials_gapfill.phil import _refinement, defaults, dials_index_params, resolve_nproc

logger = logging.getLogger("dials.process_gapped.indexing")


def poorly_indexed_error(params, best_fraction):
    """The error when no block indexes well enough."""
    return GapfillError(
        indexing_failure(RuntimeError(f"at best {100 * best_fraction:.0f}% of a block's spots were indexed"), params)
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

    ip = dials_index_params(params)  # one crystal: a small refinement job
    ip.indexing.joint_indexing = True
    searches = [_search_largest_block, _search_joint]
    if params.indexing.blocks.lattice_search == "joint" or len(experiments) == 1:
        searches.reverse()
    if len(experiments) == 1:
        searches = searches[:1]
    failures = []
    for search in searches:
        try:
            found = search(experiments, reflections, copy.deepcopy(ip), params)
        except (DialsIndexError, ValueError, RuntimeError, AssertionError) as e:
            failures.append(e)
            logger.warning(
                "Lattice search (%s) failed: %s", search.__doc__.split(":")[0],
                " ".join(str(e).split())[:160],
            )
            continue
        return _restore_identifiers(*found, experiments)
    raise GapfillError(indexing_failure(failures[0], params))


def _search_joint(experiments, reflections, ip, params):
    """all blocks jointly: dials.index on every block at once."""

    n_spots = int((reflections["id"] >= 0).count(True))
    return staged_search(lambda p: dials_index(experiments, [reflections], p), ip, n_spots, params)


def _search_largest_block(experiments, reflections, ip, params):
    """largest block: DIALS' indexer on the block with most spots, then all
    blocks indexed with its crystal (known orientation)."""

    counts = [int((reflections["id"] == i).count(True)) for i in range(len(experiments))]
    largest = max(range(len(experiments)), key=lambda i: counts[i])
    logger.info(
        "Lattice search on block %d (%d spots), then all %d blocks with its crystal",
        largest + 1, counts[largest], len(experiments),
    )
    refl = reflections.select(reflections["id"] == largest)
    refl["id"] = flex.int(len(refl), 0)
    for k in list(refl.experiment_identifiers().keys()):
        del refl.experiment_identifiers()[k]
    refl.experiment_identifiers()[0] = experiments[largest].identifier
    refl["imageset_id"] = refl["id"]
    def run(p):
        # DIALS' indexer refines the beam and detector in place: each search
        # (the quick one, then perhaps the full one) starts from the input models
        e = experiments[largest]
        fresh = ExperimentList([Experiment(
            imageset=e.imageset, beam=copy.deepcopy(e.beam), detector=copy.deepcopy(e.detector),
            goniometer=copy.deepcopy(e.goniometer), scan=copy.deepcopy(e.scan), identifier=e.identifier,
        )])
        search = indexer.Indexer.from_parameters(copy.deepcopy(refl), fresh, params=copy.deepcopy(p))
        search.index()
        return search.refined_experiments, search.refined_reflections

    found = staged_search(run, ip, len(refl), params)[0][0]
    crystal = found.crystal

    # every block with that crystal and the geometry refined with it (the
    # crystal only fits that geometry): DIALS' known-orientation indexer, with
    # one crystal, beam, detector and goniometer shared by all blocks (as
    # DIALS' joint indexing builds them)
    table = copy.deepcopy(reflections)
    table["imageset_id"] = table["id"]
    blocks = ExperimentList()
    for exp in experiments:
        block = copy.copy(exp)
        block.beam, block.detector, block.goniometer = found.beam, found.detector, found.goniometer
        blocks.append(block)
    if ip.indexing.known_symmetry.space_group is None:
        ip.indexing.known_symmetry.space_group = crystal.get_space_group().info()
    joint = JointKnownOrientation(table, blocks, ip, [crystal])
    joint.index()
    indexed = copy.deepcopy(joint.refined_reflections)
    indexed.extend(joint.unindexed_reflections)
    return joint.refined_experiments, indexed


class JointKnownOrientation(IndexerKnownOrientation):
    """DIALS' IndexerKnownOrientation, but with ONE crystal for all image sets.

    Its own find_lattices pairs one known crystal with one image set (it is made
    for several lattices); joint indexing instead shares one crystal between
    all image sets, which is what this returns.
    """
    def find_lattices(self):
        crystal = self.known_orientations[0]
        cb_op = crystal.get_space_group().info().change_of_basis_op_to_primitive_setting()
        crystal = crystal.change_basis(cb_op)
        return ExperimentList(
            [
                Experiment(
                    imageset=e.imageset, beam=e.beam, detector=e.detector,
                    goniometer=e.goniometer, scan=e.scan, crystal=crystal,
                )
                for e in self.experiments
            ]
        )


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
