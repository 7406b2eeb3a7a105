"""Refinement stage: the crystal model chosen at indexing refines its crystal(s)."""

from __future__ import annotations

from dials_gapfill.model.state import Record


def run(state) -> Record:
    state.experiments, state.reflections, record = state.crystal_model.refine(
        state.experiments, state.reflections
    )
    return record
