"""Bad-image stage: blank, all-zero and over-exposed images become gaps.

Runs on the strong spots of all blocks, so no image is read a second time
(only the few suspects are opened, to tell an all-zero image from a blank
one, or a saturated one).  Blank images are found per block with DIALS' own
``dials.util.detect_blanks.blank_counts_analysis`` (one histogram slot per
image); over-exposed images by the median strong-spot intensity against their
neighbours.  The stage only proposes: the sweeps (``Sweeps.exclude``) cut the
images out of their blocks and give the cut blocks their spots again.

Over-exposed images are excluded first: their huge spots join the spots of
the neighbouring images in DIALS' 3D spot finding, which would make the
neighbours look blank.
"""

from __future__ import annotations

import logging
import statistics

from dials.util.detect_blanks import blank_counts_analysis

from dials_gapfill.errors import GapfillError
from dials_gapfill.frames import frame_fault
from dials_gapfill.model.state import Record
from dials_gapfill.model.sweep import spot_record
from dials_gapfill.model.tables import image_numbers_of_z

logger = logging.getLogger("dials.process_gapped.bad_images")

ROUNDS = 3


def _blank_images(reflections, experiments, fraction, sweeps) -> dict:
    """(sweep, image) -> spot count, for images DIALS' blank analysis calls blank."""
    blank = {}
    for i, exp in enumerate(experiments):
        s = sweeps.sweep_of(exp).number
        refl = reflections.select(reflections["id"] == i)
        first, last = exp.scan.get_image_range()
        if last - first + 1 < 3:
            continue  # nothing to compare with
        if len(refl) == 0:
            for n in range(first, last + 1):
                blank[(s, n)] = 0
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
                blank[(s, first + k)] = int(count)
    return blank


def _overexposed_images(reflections, experiments, factor, neighbours, sweeps) -> dict:
    """(sweep, image) -> ratio of its median spot intensity to its neighbours'."""
    found = {}
    for i, exp in enumerate(experiments):
        s = sweeps.sweep_of(exp).number
        first, last = exp.scan.get_image_range()
        mine = reflections.select(reflections["id"] == i)
        by_image: dict[int, list[float]] = {}
        for n, v in zip(image_numbers_of_z(mine["xyzobs.px.value"].parts()[2]), mine["intensity.sum.value"]):
            by_image.setdefault(n, []).append(v)
        medians = {n: statistics.median(v) for n, v in by_image.items() if len(v) >= 3}
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
                found[(s, n)] = medians[n] / reference
    return found


def _frame(experiments, sweeps, key):
    """(experiment, raw data) of an image."""
    s, image = key
    for exp in experiments:
        first, last = exp.scan.get_image_range()
        if first <= image <= last and sweeps.sweep_of(exp).number == s:
            return exp, exp.imageset.get_raw_data(image - first)
    raise KeyError(key)


def find_bad_images(reflections, experiments, params, sweeps) -> dict:
    """(sweep, image) -> reason, for images that should become gaps."""
    g = params.gaps
    bad = {}
    for key, count in _blank_images(reflections, experiments, g.blank_fraction, sweeps).items():
        # why has it no spots: look at the few suspects' pixels
        bad[key] = frame_fault(*_frame(experiments, sweeps, key)) or (
            f"blank image ({count} strong spots; shutter or beam failure)"
        )
    for key, ratio in _overexposed_images(
        reflections, experiments, g.overexposed_factor, g.neighbours, sweeps
    ).items():
        bad.setdefault(key, f"over-exposed image (spots {ratio:.0f}x brighter than neighbours)")
    return bad


def run(state) -> Record | None:
    params, sweeps = state.params, state.sweeps
    found = False
    for _ in range(ROUNDS):
        bad = find_bad_images(state.reflections, state.experiments, params, sweeps)
        if not bad:
            break
        found = True
        used = len(sweeps.used())
        if len(bad) >= used:
            raise GapfillError(
                f"all {used} images are bad ({next(iter(bad.values()))}, ...): no diffraction "
                "to process; check the data collection"
            )
        over = {k: r for k, r in bad.items() if r.startswith("over-exposed")}
        state.experiments, state.reflections = sweeps.exclude(
            over or bad, "auto", state.reflections, state.find_spots,
            min_block_images=params.gaps.min_block_images,
        )
    else:
        logger.info("Stopped looking for bad images after %d rounds", ROUNDS)
    if not found:
        logger.info("No bad images found")
        return None
    return spot_record(state.experiments, state.reflections, sweeps)
