"""What a frame is as a whole, from its pixels: all-zero, saturated, its mean
counts.  Read only for the few frames under suspicion (a blank candidate, a
frame that stopped DIALS' spot finder)."""

from __future__ import annotations

from dials.array_family import flex


def frame_fault(experiment, data) -> str | None:
    """All-zero or saturated: what a frame is as a whole, or None.

    data: the frame's raw data (one array per panel) of `experiment`.
    """
    if all(d.all_le(0) for d in data):
        return "all-zero image (beam dump or detector failure)"
    n_valid = n_over = 0
    for panel, d in zip(experiment.detector, data):
        d = d.as_double().as_1d()
        n_valid += (d >= 0).count(True)
        n_over += (d >= panel.get_trusted_range()[1]).count(True)
    if n_valid and n_over > 0.5 * n_valid:
        return (
            f"saturated image ({100 * n_over / n_valid:.0f}% of pixels at the overload value; "
            "detector or beam failure)"
        )
    return None


def mean_counts(data) -> float:
    """Mean counts of the valid pixels (>= 0)."""
    total, n = 0.0, 0
    for d in data:
        d = d.as_double().as_1d()
        ok = d >= 0
        total += flex.sum(d.select(ok))
        n += ok.count(True)
    return total / n if n else 0.0
