"""The interface of a crystal model: how the blocks of a run get their crystal."""

from __future__ import annotations


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

    def __init__(self, params):
        self.params = params

    def index(self, experiments, reflections):
        raise NotImplementedError

    def refine(self, experiments, reflections):
        raise NotImplementedError
