"""Spot-finding stage: DIALS' spot finder over all blocks in one pass."""

from __future__ import annotations

import logging

from dials_gapfill.errors import GapfillError

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


def find_spots(experiments, params, report):
    """Strong spots of every block (with shoeboxes, as dials.find_spots writes them).

    Returns (reflections, unreadable) where `unreadable` maps image numbers whose
    pixels could not be read to a reason; the caller decides what to do.
    """
    from dials.array_family import flex
    from dials.algorithms.shoebox import MaskCode

    from dials_gapfill.phil import dials_spotfinder_params

    sf_params = dials_spotfinder_params(params)
    try:
        reflections = flex.reflection_table.from_observations(experiments, sf_params)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        bad = _unreadable_images(experiments)
        if not bad:
            raise GapfillError(
                f"spot finding failed: {' '.join(str(e).split())[:200]}: check the "
                "images and spotfinder.* parameters"
            ) from None
        return None, bad
    good = MaskCode.Foreground | MaskCode.Valid
    reflections["n_signal"] = reflections["shoebox"].count_mask_values(good)
    for i, exp in enumerate(experiments):
        reflections.experiment_identifiers()[i] = exp.identifier
    return reflections, {}


def spot_counts_per_image(reflections, experiments) -> dict[int, int]:
    """Strong spots per image number (by centroid), including zeros."""
    from dials_gapfill.tables import image_numbers_of_z

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
