"""Bad-image stage: blank, all-zero and over-exposed images become gaps.

Runs on the strong spots of all blocks, so no image is read a second time
(only the few suspects are opened, to tell an all-zero image from a blank
one).  Blank images are found per block with DIALS' own
``dials.util.detect_blanks.blank_counts_analysis`` (one histogram slot per
image); over-exposed images by the median strong-spot intensity against their
neighbours.  Found images are cut out of their blocks exactly like
``gaps.exclude_images``, and spots touching them are dropped.
"""

from __future__ import annotations

import logging
import statistics

logger = logging.getLogger("dials.process_gapped.bad_images")


def _blank_images(reflections, experiments, fraction) -> dict[int, int]:
    """Image number -> spot count, for images DIALS' blank analysis calls blank."""
    from dials.util.detect_blanks import blank_counts_analysis

    blank = {}
    for i, exp in enumerate(experiments):
        refl = reflections.select(reflections["id"] == i)
        first, last = exp.scan.get_image_range()
        if last - first + 1 < 3:
            continue  # nothing to compare with
        if len(refl) == 0:
            for n in range(first, last + 1):
                blank[n] = 0
            continue
        analysis = blank_counts_analysis(
            refl, exp.scan, phi_step=abs(exp.scan.get_oscillation()[1]), fractional_loss=fraction
        )
        counts = analysis["data"][0]["y"]
        for start, end in analysis["blank_regions"]:
            # regions are in array coordinates: frame z covers image z + 1
            for z in range(int(start), int(end)):
                n = z + 1
                if first <= n <= last:
                    blank[n] = int(counts[n - first]) if n - first < len(counts) else 0
    return blank


def _overexposed_images(reflections, experiments, factor, neighbours) -> dict[int, float]:
    """Image number -> ratio of its median spot intensity to its neighbours'."""
    from dials_gapfill.tables import image_numbers_of_z

    z = reflections["xyzobs.px.value"].parts()[2]
    numbers = image_numbers_of_z(z)
    intensity = list(reflections["intensity.sum.value"])
    by_image: dict[int, list[float]] = {}
    for n, v in zip(numbers, intensity):
        by_image.setdefault(n, []).append(v)
    medians = {n: statistics.median(v) for n, v in by_image.items() if len(v) >= 3}
    found = {}
    for exp in experiments:
        first, last = exp.scan.get_image_range()
        for n in range(first, last + 1):
            if n not in medians:
                continue
            around = [
                medians[m]
                for m in range(n - neighbours, n + neighbours + 1)
                if m != n and first <= m <= last and m in medians
            ]
            if len(around) < 2:
                continue
            reference = statistics.median(around)
            if reference > 0 and medians[n] > factor * reference:
                found[n] = medians[n] / reference
    return found


def _is_all_zero(experiments, image: int) -> bool:
    for exp in experiments:
        first, last = exp.scan.get_image_range()
        if first <= image <= last:
            data = exp.imageset.get_raw_data(image - first)
            return all(d.all_le(0) for d in data)
    return False


def find_bad_images(reflections, experiments, params) -> dict[int, str]:
    """Image number -> reason, for images that should become gaps."""
    g = params.gaps
    bad = {}
    for n, count in _blank_images(reflections, experiments, g.blank_fraction).items():
        if _is_all_zero(experiments, n):
            bad[n] = "all-zero image (beam dump or detector failure)"
        else:
            bad[n] = f"blank image ({count} strong spots; shutter or beam failure)"
    for n, ratio in _overexposed_images(
        reflections, experiments, g.overexposed_factor, g.neighbours
    ).items():
        bad.setdefault(n, f"over-exposed image (spots {ratio:.0f}x brighter than neighbours)")
    return bad


def drop_spots_touching(reflections, images) -> object:
    """Remove strong spots whose shoebox touches any of the image numbers."""
    from dials.array_family import flex

    if not images:
        return reflections
    bbox = reflections["bbox"]
    z0 = bbox.parts()[4]
    z1 = bbox.parts()[5]
    keep = flex.bool(len(reflections), True)
    for n in images:
        # frames [z0, z1) cover images z0 + 1 .. z1
        keep &= ~((z0 < n) & (z1 >= n))
    return reflections.select(keep)
