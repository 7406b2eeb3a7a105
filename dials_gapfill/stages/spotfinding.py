"""Spot-finding stage: DIALS' spot finder over all blocks in one pass."""

from __future__ import annotations

import contextlib
import logging
import sys

from dials.algorithms.shoebox import MaskCode
from dials.array_family import flex

from dials_gapfill import cluster
from dials_gapfill.errors import GapfillError
from dials_gapfill.phil import dials_spotfinder_params
from dials_gapfill.model.sweep import canonical_order
from dials_gapfill.model.tables import image_numbers_of_z
from dials_gapfill.util import captured

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


class TooManyStrongPixels(GapfillError):
    """DIALS' spot finder met an image with more strong pixels than
    spotfinder.filter.max_strong_pixel_fraction allows (it does not say which)."""


def find_spots(experiments, params):
    """Strong spots of every block (with shoeboxes, as dials.find_spots writes
    them), in canonical order (sweep.canonical_order).

    Returns (reflections, bad): when the spot finder fails on unreadable
    pixels, `bad` maps those image numbers to a reason and reflections is None;
    the caller excludes them.  TooManyStrongPixels: an image is strong as a
    whole (the caller finds which).
    """
    sf_params = dials_spotfinder_params(params)
    if cluster.is_cluster(params):
        cluster.session(params)  # --- cluster: the jobs start here (its messages not captured)
    try:
        # a worker that fails prints its traceback (libtbx easy_mp, to stdout):
        # it goes to the log only
        with captured(1) as out, captured(2) as err:
            # --- cluster: mp.method=slurm|sge|pbs|lsf sends DIALS' image chunks to the jobs
            with cluster.spot_finding(params) if cluster.is_cluster(params) else contextlib.nullcontext():
                reflections = flex.reflection_table.from_observations(experiments, sf_params)
    except (KeyboardInterrupt, SystemExit, cluster.ClusterError):
        raise
    except Exception as e:
        logger.debug("Spot finding failed:\n%s%s", out.text, err.text)
        text = " ".join(str(e).split())
        bad = _unreadable_images(experiments)
        if not bad and "strong pixels" in text:
            raise TooManyStrongPixels(
                f"spot finding failed: {text[:160]}: no single image is over-exposed; raise "
                "spotfinder.filter.max_strong_pixel_fraction or check spotfinder.threshold.*"
            ) from None
        if not bad:
            raise GapfillError(
                f"spot finding failed: {text[:200]}: check the images and spotfinder.* parameters"
            ) from None
        return None, bad
    sys.stdout.write(out.text)
    sys.stderr.write(err.text)
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
