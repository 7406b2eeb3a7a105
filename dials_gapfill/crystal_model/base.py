"""The interface of a crystal model: how the blocks of a run get their crystal."""

from __future__ import annotations

import copy
import logging
import re

import iotbx.phil
from dials.algorithms.refinement.parameterisation.crystal_parameters import (
    CrystalUnitCellParameterisation,
)
from dials.algorithms.refinement.refiner import phil_scope as refiner_phil

from dials_gapfill import dials_compat
from dials_gapfill.errors import GapfillError
from dials_gapfill.model.state import block_names

logger = logging.getLogger("dials.process_gapped.refinement")


class CrystalModel:
    """index() then refine(), each returning (experiments, reflections, Record).

    index(experiments, reflections): block experiments (image order within each
    sweep, shared beam and detector, each sweep its goniometer) and their
    strong spots (``id`` = block) -> the blocks sharing one crystal, the spots
    with Miller indices (``id`` = block, -1 unindexed), and what was found.
    refine(experiments, reflections): the indexing result -> the blocks with
    their refined crystals (scan-varying where the model is), the indexed
    reflections used, and what was found: per block ``rmsd_static``,
    ``rmsd_scan_varying``, ``refinement`` and ``unit_cell_esd`` (None where the
    block's cell is not its own), and for the crystal ``static``, ``cell_esd``
    (the esds of the one cell), ``model`` and ``cells_tied``.
    """

    name = ""
    # the profile model of integration.profile_model=auto with this model
    profile_model = "per_block"

    def __init__(self, params, sweeps=None):
        self.params = params
        self.sweeps = sweeps  # the run's Sweeps, for block names in log lines

    def sweep_numbers(self, blocks) -> list[int]:
        """The run's number of each sweep of the block experiments `blocks`, in
        :func:`sweep_groups` order.  Without the run's sweeps: the position
        among them, from 1 (which skips a sweep left without blocks)."""
        groups = sweep_groups(blocks)
        if self.sweeps is None:
            return list(range(1, len(groups) + 1))
        return [self.sweeps.sweep_of(blocks[group[0]]).number for group in groups]

    def block_names(self, experiments) -> dict[str, str]:
        """identifier -> 'Block k (images a-b[ of sweep s])' (model.state.block_names)."""
        return block_names(experiments, self.sweeps)

    def index(self, experiments, reflections):
        raise NotImplementedError

    def refine(self, experiments, reflections):
        raise NotImplementedError


def tie_cells(rp, sigmas) -> None:
    """Restrain the unit cells of all crystals of a refinement job to their
    mean (DIALS' unit_cell.restraints.tie_to_group; DIALS ignores it for a
    scan-varying cell)."""
    extract = refiner_phil.fetch(
        iotbx.phil.parse(
            "refinement.parameterisation.crystal.unit_cell.restraints.tie_to_group {\n"
            f"  sigmas = {' '.join(str(s) for s in sigmas)}\n"
            "}"
        )
    ).extract()
    rp.refinement.parameterisation.crystal.unit_cell.restraints.tie_to_group = (
        extract.refinement.parameterisation.crystal.unit_cell.restraints.tie_to_group
    )


def one_cell(rp, crystal) -> None:
    """The unit cells of all crystals of a refinement job shift together:
    DIALS' equal-shift constraints on each cell parameter (unit_cell.
    constraints, one per parameter, applied to every crystal), so crystals
    that start with one cell keep one cell while each has its own
    orientation.  `crystal`'s symmetry sets how many parameters the cell has
    (6 in P1, 3 in an orthorhombic lattice): DIALS warns for a constraint on
    a parameter that does not exist."""
    n = CrystalUnitCellParameterisation(copy.deepcopy(crystal)).num_total()  # (it sets the crystal's B)
    text = "\n".join(
        "refinement.parameterisation.crystal.unit_cell.constraints {\n"
        f"  parameter = g_param_{k}\n"
        "}"
        for k in range(n)
    )
    extract = refiner_phil.fetch(iotbx.phil.parse(text)).extract()
    rp.refinement.parameterisation.crystal.unit_cell.constraints = (
        extract.refinement.parameterisation.crystal.unit_cell.constraints
    )


def refined_models(before, after):
    """For each block of `before`, the refined counterparts in `after` (same
    identifiers) of its beam, detector and goniometer: blocks that shared a
    model object share its refined one, and a block missing from `after`
    takes the refined model of another block that had the same object."""
    refined = {e.identifier: e for e in after}
    maps = {"beam": {}, "detector": {}, "goniometer": {}}
    for exp in before:
        new = refined.get(exp.identifier)
        if new is None:
            continue
        for name, mapping in maps.items():
            mapping.setdefault(id(getattr(exp, name)), getattr(new, name))
    for exp in before:
        for name, mapping in maps.items():
            old = getattr(exp, name)
            setattr(exp, name, mapping.get(id(old), old))


def sweep_groups(experiments) -> list[list[int]]:
    """Indices of the blocks of each sweep: consecutive blocks sharing one
    goniometer (every sweep has its own goniometer object)."""
    groups = []
    for i, exp in enumerate(experiments):
        if groups and exp.goniometer is experiments[groups[-1][-1]].goniometer:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def crystal_per_sweep(experiments) -> None:
    """A copy of the crystal for each sweep's blocks (shared within a sweep).

    One crystal for several sweeps holds only as far as the goniometer
    settings in the headers are exact: on the four L-cysteine sweeps the
    static refinement of one shared crystal ends at RMSDs of 0.5-1.6 px and
    1-2.3 images, one orientation per sweep (the cells tied) at 0.13-0.26 px.
    DIALS' own multi-sweep refinement (dials.refine) copies the crystal per
    experiment for the same reason."""
    for k, group in enumerate(sweep_groups(experiments)):
        if k == 0:
            continue
        crystal = copy.deepcopy(experiments[group[0]].crystal)
        for i in group:
            experiments[i].crystal = crystal


def fixing_sparse_sweeps(run, rp, experiments, said, fewest=False, numbers=None):
    """run(rp), a static or scan-varying job of `experiments`; where DIALS
    refuses a crystal's orientation for too few reflections (a sweep of one
    or two images of a sparse pattern: DIALS wants
    auto_reduction.min_nref_per_parameter spots for each parameter), the job
    again on FEWEST_NREF_PER_PARAMETER (with `fewest`: the continuous
    model), and where that is refused too, with those orientations fixed
    (they stay as indexing, or the job before, left them); the same for a
    detector (or beam, goniometer) that
    only such a sweep uses (sweep 4 of L-cysteine, at its own detector
    position).  said(the sweep numbers, from 1, what) each time.  DIALS'
    own remedy, auto_reduction.action=fix, ends in an AssertionError in DIALS
    3.12 where a job mixes static and scan-varying crystals.  `numbers`: the
    run's number of each sweep of `experiments` (:func:`sweeps_of`)."""
    fixed, fixed_models = set(), set()
    lowered = not fewest
    while True:
        try:
            return run(rp)
        except GapfillError as e:
            message = getattr(e, "dials_message", "")
            refused = dials_compat.crystals_refused_for_too_few_reflections(message, experiments) - fixed
            if not refused:
                rp = fixing_refused_models(message, rp, experiments, fixed_models, said, numbers)
                if rp is None:
                    raise
                continue
        if not lowered:
            lowered = True
            rp = fewer_reflections_per_parameter(rp, sweeps_of(experiments, refused, numbers))
            continue
        rp = copy.deepcopy(rp)
        fixed |= refused
        dials_compat.fix_crystal_orientations(rp, refused, experiments)
        said(sweeps_of(experiments, refused, numbers), "orientation")


# An orientation that DIALS refuses for fewer reflections per parameter than
# auto_reduction.min_nref_per_parameter (5) is refined on at least this many
# before it is fixed: each spot gives x, y and phi, so 3 spots are 9
# observations for its 3 angles.  Fixed as indexing (or the job before) left
# it, a sparse sweep's few spots would pull the shared cell and detector
# towards that orientation: L-cysteine sweep 1 as images 1-2 (12 strong
# spots, 4 left by outlier rejection) moved the cell to 0.16 % from the
# complete sweeps', against 0.05 % with its orientation refined.
FEWEST_NREF_PER_PARAMETER = 3


def fewer_reflections_per_parameter(rp, sweeps):
    """A copy of `rp` whose job refines a parameter on at least
    FEWEST_NREF_PER_PARAMETER reflections (not fewer than DIALS' own where
    that is lower); logged for `sweeps` (numbers from 1)."""
    rp = copy.deepcopy(rp)
    reduction = rp.refinement.parameterisation.auto_reduction
    wanted = reduction.min_nref_per_parameter
    reduction.min_nref_per_parameter = min(FEWEST_NREF_PER_PARAMETER, wanted)
    logger.info("Sweep(s) %s: fewer than %d reflections for the orientation; refined on at least %d per parameter",
                ", ".join(map(str, sweeps)), wanted, reduction.min_nref_per_parameter)
    return rp


def fixing_refused_models(message, rp, experiments, fixed, said, numbers=None):
    """A copy of `rp` with the beam, detector and goniometer parameters that
    DIALS' failed job named in `message` for too few reflections fixed
    (:func:`dials_compat.models_refused_for_too_few_reflections`), those not
    in `fixed` (which gains them); said(sweep numbers, "detector") for each
    kind of model.  None where the message names no new one."""
    refused = {name: ids for name, ids in
               dials_compat.models_refused_for_too_few_reflections(message, experiments).items()
               if name not in fixed}
    if not refused:
        return None
    rp = copy.deepcopy(rp)
    dials_compat.fix_model_parameters(rp, refused)
    fixed |= set(refused)
    kinds = {}
    for name, ids in refused.items():
        kinds.setdefault(re.match(r"[A-Za-z]+", name).group().lower(), set()).update(ids)
    for kind, ids in sorted(kinds.items()):
        said(sweeps_of(experiments, ids, numbers), kind)
    return rp


def sweep_number(numbers, g) -> int:
    """The run's number of the g-th of :func:`sweep_groups` (`numbers`:
    :meth:`CrystalModel.sweep_numbers`), else its position from 1."""
    return numbers[g] if numbers else g + 1


def sweeps_of(experiments, ids, numbers=None) -> list[int]:
    """The sweep numbers (:func:`sweep_number`) of the experiments `ids` (positions)."""
    groups = sweep_groups(experiments)
    return sorted({sweep_number(numbers, next(g for g, group in enumerate(groups) if i in group)) for i in ids})


def say_too_few_spots(record, sweeps, what="orientation", kept_as="indexing gave it") -> None:
    """The warning of :func:`fixing_sparse_sweeps`, once per run (log and record)."""
    which = f"sweep(s) {', '.join(str(s) for s in sweeps)}: too few spots to refine the {what} "
    said = f"{which}(DIALS' auto_reduction): kept as {kept_as}"
    # a sweep fixed in the static job is fixed again in the scan-varying one
    if not any(w.startswith(which) for w in record.warnings):
        record.warn(said)
        logger.warning("Warning: %s", said)
