"""Crystal models behind one interface (:class:`CrystalModel`): ``continuous``
(one crystal across the gaps of each sweep) and ``per_block`` (a crystal per
block, the documented DIALS recipe)."""

from __future__ import annotations

from dials_gapfill.crystal_model.base import CrystalModel
from dials_gapfill.crystal_model.continuous import ContinuousModel, check_blocks
from dials_gapfill.crystal_model.per_block import PerBlockModel
from dials_gapfill.errors import GapfillError

MODELS = {m.name: m for m in (ContinuousModel, PerBlockModel)}


def make(params, name=None, **options) -> CrystalModel:
    """The model named by refinement.blocks.model (or `name`)."""
    return MODELS[name or params.refinement.blocks.model](params, **options)


def choose(params, experiments):
    """(model, warning or None): the model asked for, or per_block where the
    continuous model cannot describe the blocks (e.g. a block whose start
    angle is not on its sweep's rotation: a wrong header); such a block is
    then dropped at indexing."""
    if params.refinement.blocks.model == ContinuousModel.name:
        try:
            check_blocks(experiments)
        except GapfillError as e:
            return PerBlockModel(params), f"{e}: using refinement.blocks.model=per_block"
    return make(params), None


__all__ = ["CrystalModel", "ContinuousModel", "PerBlockModel", "choose", "make"]
