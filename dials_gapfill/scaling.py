"""Scaling stage (optional)."""

from __future__ import annotations

from dials_gapfill.errors import GapfillError


def scale(experiments, reflections, params, report, outputs):
    raise GapfillError("scaling.run=True is not available yet")
