"""Spot-finding stage: DIALS' spot finder over all blocks in one pass."""

from __future__ import annotations

import logging
import statistics

from dials.algorithms.shoebox import MaskCode
from dials.array_family import flex

from dials_gapfill.errors import GapfillError
from dials_gapfill.phil import dials_spotfinder_params
from dials_gapfill.sweep import canonical_order
from dials_gapfill.tables import image_numbers_of_z

logger = logging.getLogger("dials.process_gapped.spotfinding")


def _unreadable_images(experiments) -> dict[int, str]:
    """Image number -> reason, for images whose pixels cannot be read."""
    bad = {}
    for exp in experiments:
        imageset = exp.imageset
        first = exp.scan.get_image_range()[0]
        for i in range(len(imageset)):
            try:
                imageset.get_raw_data(i)
            except Exception as e:  # any reader failure makes the image unusable
                bad[first + i] = f"unreadable: {type(e).__name__}: {' '.join(str(e).split())[:80]}"
    return bad


def _mean_counts(imageset, i) -> float:
    """Mean counts of the valid pixels (>= 0) of image i of an image set."""
    total, n = 0.0, 0
    for data in imageset.get_raw_data(i):
        d = data.as_double().as_1d()
        ok = d >= 0
        total += flex.sum(d.select(ok))
        n += ok.count(True)
    return total / n if n else 0.0


def _overexposed_frames(experiments, factor, neighbours) -> dict[int, str]:
    """Images whose mean counts exceed `factor` times their neighbours' median.

    Used only when DIALS' spot finder gave up on an image (more strong pixels
    than spotfinder.filter.max_strong_pixel_fraction allows: a frame
    over-exposed as a whole, e.g. a beam dump through an open shutter); the
    spot finder does not say which image, so the images are read once more.
    """
    bad = {}
    for exp in experiments:
        first = exp.scan.get_image_range()[0]
        means = [_mean_counts(exp.imageset, i) for i in range(len(exp.imageset))]
        for i, m in enumerate(means):
            around = [means[j] for j in range(max(0, i - neighbours), min(len(means), i + neighbours + 1)) if j != i]
            if not around:
                continue
            reference = statistics.median(around)
            if reference > 0 and m > factor * reference:
                bad[first + i] = (
                    f"over-exposed image (mean counts {m / reference:.0f}x its neighbours'; "
                    "too many strong pixels for spot finding)"
                )
    return bad


def find_spots(experiments, params):
    """Strong spots of every block (with shoeboxes, as dials.find_spots writes
    them), in canonical order (sweep.canonical_order).

    Returns (reflections, bad): when the spot finder fails, `bad` maps the
    image numbers that made it fail (unreadable pixels, a frame over-exposed as
    a whole) to a reason and reflections is None; the caller excludes them.
    """
    sf_params = dials_spotfinder_params(params)
    try:
        reflections = flex.reflection_table.from_observations(experiments, sf_params)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        text = " ".join(str(e).split())
        bad = _unreadable_images(experiments)
        if not bad and "strong pixels" in text:
            bad = _overexposed_frames(experiments, params.gaps.overexposed_factor, params.gaps.neighbours)
            if not bad:
                raise GapfillError(
                    f"spot finding failed: {text[:160]}: no single image is over-exposed; raise "
                    "spotfinder.filter.max_strong_pixel_fraction or check spotfinder.threshold.*"
                ) from None
        if not bad:
            raise GapfillError(
                f"spot finding failed: {text[:200]}: check the images and spotfinder.* parameters"
            ) from None
        return None, bad
    good = MaskCode.Foreground | MaskCode.Valid
    reflections["n_signal"] = reflections["shoebox"].count_mask_values(good)
    for i, exp in enumerate(experiments):
        reflections.experiment_identifiers()[i] = exp.identifier
    return canonical_order(reflections), {}


def spot_counts_per_image(reflections, experiments) -> dict[int, int]:
    """Strong spots per image number (by centroid), including zeros."""
    counts = {}
    for exp in experiments:
        first, last = exp.scan.get_image_range()
        for n in range(first, last + 1):
            counts[n] = 0
    z = reflections["xyzobs.px.value"].parts()[2]
    for n in image_numbers_of_z(z):
        if n in counts:
            counts[n] += 1
    return counts
