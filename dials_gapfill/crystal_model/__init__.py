"""Crystal models behind one interface (:class:`CrystalModel`): ``continuous``
(one crystal across the gaps of each sweep) and ``per_block`` (a crystal per
block, the documented DIALS recipe)."""

from __future__ import annotations

from dials_gapfill.crystal_model.base import CrystalModel
from dials_gapfill.crystal_model.continuous import ContinuousModel, check_blocks
from dials_gapfill.crystal_model.per_block import PerBlockModel
from dials_gapfill.errors import GapfillError

MODELS = {m.name: m for m in (ContinuousModel, PerBlockModel)}


def make(params, name=None, sweeps=None, **options) -> CrystalModel:
    """The model named by refinement.blocks.model (or `name`); `sweeps` (the
    run's Sweeps) names each block's sweep in its log lines."""
    return MODELS[name or params.refinement.blocks.model](params, sweeps=sweeps, **options)


# Where every block has at most this many images, every spot is cut by a gap
# and the continuous model has nothing to join the blocks with; per block
# crystals then follow the crystal more closely (every other image of 40 x 1
# deg missing: orientation against the truth median/worst 0.014/0.038 deg
# continuous, 0.006/0.019 per block; images 1 and 10 only: 0.062 and 0.016).
SHORTEST_JOINED_BLOCKS = 2


def choose(params, experiments, sweeps=None):
    """(model, warning or None): the model asked for, or per_block where the
    continuous model cannot describe the blocks (e.g. a block whose start
    angle is not on its sweep's rotation: a wrong header; such a block is
    then dropped at indexing) or has nothing to gain (every block of one or
    two images)."""
    if params.refinement.blocks.model == ContinuousModel.name:
        try:
            check_blocks(experiments)
        except GapfillError as e:
            return PerBlockModel(params, sweeps), f"{e}: using refinement.blocks.model=per_block"
        if len(experiments) > 1 and all(e.scan.get_num_images() <= SHORTEST_JOINED_BLOCKS for e in experiments):
            return PerBlockModel(params, sweeps), (
                f"every block has at most {SHORTEST_JOINED_BLOCKS} images, so every spot is cut by a gap: "
                "using refinement.blocks.model=per_block (a crystal per block)"
            )
    return make(params, sweeps=sweeps), None


__all__ = ["CrystalModel", "ContinuousModel", "PerBlockModel", "choose", "make"]
