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

from dials.array_family import flex
from dials.util.detect_blanks import blank_counts_analysis

from dials_gapfill.model.tables import image_numbers_of_z

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
        # one histogram slot per image; the slots' own flags, not
        # blank_regions: DIALS 3.12's blank_regions_from_sel drops a blank
        # last slot (it tests the slot before it), i.e. a blank image just
        # before a gap or at the end of the sweep
        slots = analysis["data"][0]
        assert len(slots["y"]) == last - first + 1
        for k, (count, is_blank) in enumerate(zip(slots["y"], slots["blank"])):
            if is_blank:
                blank[first + k] = int(count)
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


def _frame(experiments, image: int):
    """(experiment, raw data) of an image number."""
    for exp in experiments:
        first, last = exp.scan.get_image_range()
        if first <= image <= last:
            return exp, exp.imageset.get_raw_data(image - first)
    raise KeyError(image)


def _whole_frame_fault(exp, data) -> str | None:
    """All-zero or saturated: what a frame is as a whole, or None."""
    if all(d.all_le(0) for d in data):
        return "all-zero image (beam dump or detector failure)"
    n_valid = n_over = 0
    for panel, d in zip(exp.detector, data):
        d = d.as_double().as_1d()
        n_valid += (d >= 0).count(True)
        n_over += (d >= panel.get_trusted_range()[1]).count(True)
    if n_valid and n_over > 0.5 * n_valid:
        return (
            f"saturated image ({100 * n_over / n_valid:.0f}% of pixels at the overload value; "
            "detector or beam failure)"
        )
    return None


def _mean_counts(data) -> float:
    """Mean counts of the valid pixels (>= 0)."""
    total, n = 0.0, 0
    for d in data:
        d = d.as_double().as_1d()
        ok = d >= 0
        total += flex.sum(d.select(ok))
        n += ok.count(True)
    return total / n if n else 0.0


def whole_frame_faults(experiments, params) -> dict[int, str]:
    """Images that are bad as a whole: saturated, or over-exposed (mean counts
    above gaps.overexposed_factor times the neighbours' median).

    For when DIALS' spot finder gave up on an image with more strong pixels
    than spotfinder.filter.max_strong_pixel_fraction allows (a frame
    over-exposed as a whole, e.g. a beam dump through an open shutter): it
    does not say which image, so the images are read once more.
    """
    g = params.gaps
    bad = {}
    for exp in experiments:
        first = exp.scan.get_image_range()[0]
        means = []
        for i in range(len(exp.imageset)):
            data = exp.imageset.get_raw_data(i)
            fault = _whole_frame_fault(exp, data)
            if fault:
                bad[first + i] = fault
            means.append(_mean_counts(data))
        for i, m in enumerate(means):
            if first + i in bad:
                continue
            around = [
                means[j]
                for j in range(max(0, i - g.neighbours), min(len(means), i + g.neighbours + 1))
                if j != i and first + j not in bad
            ]
            if not around:
                continue
            reference = statistics.median(around)
            if reference > 0 and m > g.overexposed_factor * reference:
                bad[first + i] = (
                    f"over-exposed image (mean counts {m / reference:.0f}x its neighbours'; "
                    "too many strong pixels for spot finding)"
                )
    return bad


def find_bad_images(reflections, experiments, params) -> dict[int, str]:
    """Image number -> reason, for images that should become gaps."""
    g = params.gaps
    bad = {}
    for n, count in _blank_images(reflections, experiments, g.blank_fraction).items():
        # why has it no spots: look at the few suspects' pixels
        bad[n] = _whole_frame_fault(*_frame(experiments, n)) or (
            f"blank image ({count} strong spots; shutter or beam failure)"
        )
    for n, ratio in _overexposed_images(
        reflections, experiments, g.overexposed_factor, g.neighbours
    ).items():
        bad.setdefault(n, f"over-exposed image (spots {ratio:.0f}x brighter than neighbours)")
    return bad
