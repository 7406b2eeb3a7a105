"""Bad-image stage: blank, all-zero and over-exposed images become gaps.

Runs on the strong spots of all blocks, so no image is read a second time
(only the few suspects are opened, to tell an all-zero image from a blank
one, or a saturated one).  Blank images are found per block with DIALS' own
``dials.util.detect_blanks.blank_counts_analysis`` (one histogram slot per
image); over-exposed images by the median strong-spot intensity against their
neighbours.  The stage only proposes: the sweep (``Sweep.exclude``) cuts the images out of
their blocks and gives the cut blocks their spots again.
"""

from __future__ import annotations

import logging
import statistics

from dials.util.detect_blanks import blank_counts_analysis

from dials_gapfill.tables import image_numbers_of_z

logger = logging.getLogger("dials.process_gapped.bad_images")


def _blank_images(reflections, experiments, fraction) -> dict[int, int]:
    """Image number -> spot count, for images DIALS' blank analysis calls blank."""
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


def _blank_reason(experiments, image: int, count: int) -> str:
    """Why an image without spots has none: all-zero, saturated or blank."""
    for exp in experiments:
        first, last = exp.scan.get_image_range()
        if not first <= image <= last:
            continue
        data = exp.imageset.get_raw_data(image - first)
        if all(d.all_le(0) for d in data):
            return "all-zero image (beam dump or detector failure)"
        n_valid = n_over = 0
        for panel, d in zip(exp.detector, data):
            d = d.as_double().as_1d()
            valid = d >= 0
            n_valid += valid.count(True)
            n_over += (d >= panel.get_trusted_range()[1]).count(True)
        if n_valid and n_over > 0.5 * n_valid:
            return (
                f"saturated image ({100 * n_over / n_valid:.0f}% of pixels at the overload value; "
                "detector or beam failure)"
            )
    return f"blank image ({count} strong spots; shutter or beam failure)"


def find_bad_images(reflections, experiments, params) -> dict[int, str]:
    """Image number -> reason, for images that should become gaps."""
    g = params.gaps
    bad = {}
    for n, count in _blank_images(reflections, experiments, g.blank_fraction).items():
        bad[n] = _blank_reason(experiments, n, count)
    for n, ratio in _overexposed_images(
        reflections, experiments, g.overexposed_factor, g.neighbours
    ).items():
        bad.setdefault(n, f"over-exposed image (spots {ratio:.0f}x brighter than neighbours)")
    return bad
