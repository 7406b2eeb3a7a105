"""Bad-image stage: blank, all-zero, over-exposed images and images that are
not part of the rotation become gaps.

Runs on the strong spots of all blocks, so no image is read a second time
(only the suspects and the images without a strong spot are opened, to tell
an all-zero or saturated frame from a blank one).  An image is blank when it
has far fewer strong spots than its neighbours, or belongs to a run of images
without a spot where the images around the run have many; over-exposed when its spots
are far brighter, and not a rotation image (a crystal-tracking frame of
electron diffraction, a defocused or displaced frame) when its spots, unlike
its neighbours', do not continue into the images before and after it.  Each
decision is a test of significance as well as of size, so that the chance
spread of a sparse pattern (1-5 spots per image, spot intensities that
differ 30-fold) is not taken for a fault.  The stage only proposes: the
sweeps (``Sweeps.exclude``) cut the images out of their blocks and give the
cut blocks their spots again.

Over-exposed images are excluded first: their huge spots join the spots of
the neighbouring images in DIALS' 3D spot finding, which would make the
neighbours look blank.
"""

from __future__ import annotations

import logging
import math
import statistics

from scipy.stats import binom, mannwhitneyu, poisson

from dials_gapfill.errors import GapfillError
from dials_gapfill.frames import frame_fault
from dials_gapfill.model.state import Record
from dials_gapfill.model.sweep import BAD, spot_record
from dials_gapfill.model.tables import image_numbers_of_z
from dials_gapfill.util import range_text

logger = logging.getLogger("dials.process_gapped.bad_images")

ROUNDS = 3


def _per_image(reflections, experiments, sweeps, values=None) -> dict:
    """(sweep, image) -> the strong spots' `values` (their count without
    `values`), for every image of the blocks (by centroid)."""
    out = {}
    for i, exp in enumerate(experiments):
        s = sweeps.sweep_of(exp).number
        first, last = exp.scan.get_image_range()
        for n in range(first, last + 1):
            out[(s, n)] = 0 if values is None else []
        mine = reflections.select(reflections["id"] == i)
        numbers = image_numbers_of_z(mine["xyzobs.px.value"].parts()[2])
        column = mine[values] if values is not None else None
        for k, n in enumerate(numbers):
            if (s, n) not in out:
                continue
            if values is None:
                out[(s, n)] += 1
            else:
                out[(s, n)].append(column[k])
    return out


def _neighbours(key, keys, neighbours) -> list:
    """The images of the same sweep within `neighbours` of `key` (not itself)."""
    s, n = key
    return [(s, m) for m in range(n - neighbours, n + neighbours + 1) if m != n and (s, m) in keys]


def _images_per_sweep(keys) -> dict:
    out = {}
    for s, _ in keys:
        out[s] = out.get(s, 0) + 1
    return out


def _blank_images(counts, params) -> dict:
    """(sweep, image) -> spot count, for images with far fewer strong spots
    than their neighbours: at most gaps.blank_fraction of the median count of
    the gaps.neighbours images each side (in the same sweep), and fewer than a
    Poisson count with that median would give by chance (probability below
    gaps.significance / images in the sweep).

    DIALS' own blank analysis (dials.detect_blanks: a fraction of the block's
    best image) calls 1 in 20 frames of a sparse pattern (mean 3 spots per
    image: P(0 spots) = 5 %) blank; the Poisson test does not, and on dense
    data (hundreds of spots) it calls the same frames blank as DIALS.
    """
    g = params.gaps
    per_sweep = _images_per_sweep(counts)
    blank = {}
    for key, k in counts.items():
        around = [counts[m] for m in _neighbours(key, counts, g.neighbours)]
        if len(around) < 2:
            continue  # nothing to compare with
        expected = statistics.median(around)
        if k <= g.blank_fraction * expected and poisson.cdf(k, expected) < g.significance / per_sweep[key[0]]:
            blank[key] = k
    return blank


def _blank_runs(counts, params) -> dict:
    """(sweep, image) -> (run length, expected count), for the images of runs
    of two or more consecutive images without a strong spot where the images
    around the run have spots: a Poisson count with the median of the
    gaps.neighbours images each side of the run (same sweep) would give no
    spot on so many images, exp(-length * median), with probability below
    gaps.significance / images in the sweep.

    The blank test of one image cannot see such a run once it is longer than
    half the neighbourhood: the neighbours' median is then 0 (a shutter that
    stayed closed for 20 images).  A sparse pattern's empty frames come one
    at a time: on the four L-cysteine sweeps (1-9 spots per image, medians
    1-3) no two consecutive images are without a spot, and two would need a
    median above 4.8 around them to be called blank (15 images: threshold
    6.7e-5).
    """
    g = params.gaps
    per_sweep = _images_per_sweep(counts)
    found = {}
    for sweep in sorted(per_sweep):
        numbers = sorted(n for s, n in counts if s == sweep)
        run = []
        for n in numbers + [None]:
            if n is not None and counts[(sweep, n)] == 0 and (not run or n == run[-1] + 1):
                run.append(n)
                continue
            if len(run) >= 2:
                before = [m for m in numbers if run[0] - g.neighbours <= m < run[0]]
                after = [m for m in numbers if run[-1] < m <= run[-1] + g.neighbours]
                around = [counts[(sweep, m)] for m in before + after]
                expected = statistics.median(around) if len(around) >= 2 else 0
                if expected > 0 and math.exp(-len(run) * expected) < g.significance / per_sweep[sweep]:
                    found.update({(sweep, m): (len(run), expected) for m in run})
            run = [n] if n is not None and counts[(sweep, n)] == 0 else []
    return found


def _overexposed_images(reflections, experiments, params, sweeps) -> dict:
    """(sweep, image) -> ratio of its median spot intensity to its
    neighbours', for images whose strong spots are brighter than those of the
    gaps.neighbours images each side by more than gaps.overexposed_factor (in
    the median) and not by chance: a one-sided Mann-Whitney rank test of the
    image's spot intensities against the neighbours' spots, probability below
    gaps.significance / images in the sweep.

    Spot intensities follow Wilson's distribution, so on a sparse pattern the
    median of 2 or 3 spots is often 5-30 times that of the neighbours' spots
    (real L-cysteine frames); the rank test then gives probabilities of 0.01
    to 0.1, far from significant, while a frame with hundreds of spots all
    brighter gives ~1e-100.
    """
    g = params.gaps
    values = _per_image(reflections, experiments, sweeps, "intensity.sum.value")
    per_sweep = _images_per_sweep(values)
    found = {}
    for key, mine in values.items():
        if not mine:
            continue
        pool = [v for m in _neighbours(key, values, g.neighbours) for v in values[m]]
        if len(pool) < 3:
            continue
        reference = statistics.median(pool)
        ratio = statistics.median(mine) / reference if reference > 0 else 0.0
        if ratio <= g.overexposed_factor:
            continue
        p = mannwhitneyu(mine, pool, alternative="greater").pvalue
        if p < g.significance / per_sweep[key[0]]:
            found[key] = ratio
    return found


def _continuity(reflections, experiments, sweeps) -> dict:
    """(sweep, image) -> (strong spots on the image, how many of them continue
    into the image before or after it), for every image of the blocks; None
    for the image of a one-image block, which cannot show continuity.

    A spot is on every image its bounding box spans (z0 < n <= z1 in frame
    coordinates, image n covering [n - 1, n)); it continues when it spans more
    than one image.
    """
    out = {}
    for i, exp in enumerate(experiments):
        s = sweeps.sweep_of(exp).number
        first, last = exp.scan.get_image_range()
        spots = [0] * (last - first + 1)
        continuing = [0] * (last - first + 1)
        for box in reflections.select(reflections["id"] == i)["bbox"]:
            z0, z1 = box[4], box[5]
            for n in range(max(z0 + 1, first), min(z1, last) + 1):
                spots[n - first] += 1
                if z1 - z0 >= 2:
                    continuing[n - first] += 1
        for k in range(last - first + 1):
            out[(s, first + k)] = (spots[k], continuing[k]) if last > first else None
    return out


def _isolated_images(reflections, experiments, params, sweeps) -> dict:
    """(sweep, image) -> (spots, continuing, neighbours' fraction) for images
    that are not part of the rotation: the fraction of their strong spots that
    continue into the image before or after is at most gaps.isolated_fraction
    of the median fraction of the gaps.neighbours images each side, and a
    binomial count with the neighbours' fraction would give so few by chance
    with probability below gaps.significance / images in the sweep.

    In rotation data a reflection's rocking curve crosses image boundaries, so
    a steady share of every image's spots continues into its neighbours (0.98
    on 0.4-degree electron-diffraction frames, 0.6 on 1-degree X-ray frames,
    0.5 on SNase, 0.9 on L-cysteine; about half that on the images at a
    block's ends, which have one neighbour).  A crystal-tracking frame of cRED
    data (a defocused image of the crystal, taken while the rotation goes on)
    has features but no Bragg spots: DIALS finds about as many "spots" on it
    as on a diffraction image, so the blank test cannot see it, but none of
    them continues (0-2 of 20 on the simulated sweep).
    """
    g = params.gaps
    counts = _continuity(reflections, experiments, sweeps)
    per_sweep = _images_per_sweep(counts)
    found = {}
    for key, value in counts.items():
        if not value or not value[0]:
            continue
        spots, continuing = value
        near = [counts[m] for m in _neighbours(key, counts, g.neighbours) if counts[m] and counts[m][0]]
        if len(near) < 2:
            continue  # nothing to compare with
        expected = min(statistics.median(c / s for s, c in near), 1.0)
        if expected <= 0 or continuing > g.isolated_fraction * expected * spots:
            continue
        # the chance of so few with the neighbours' pooled fraction, which
        # (+1/2 in 1, as Jeffreys' prior) is never exactly 1: where every
        # neighbouring spot continues, one image of 2 spots that do not is
        # not proof
        pooled = min(expected, (sum(c for _, c in near) + 0.5) / (sum(s for s, _ in near) + 1))
        if binom.cdf(continuing, spots, pooled) < g.significance / per_sweep[key[0]]:
            found[key] = (spots, continuing, expected)
    return found


def _isolated_reason(spots, continuing, expected) -> str:
    return (
        f"not a rotation image ({continuing} of its {spots} strong spots continue into the image "
        f"before or after it, {100 * expected:.0f} % on its neighbours): a crystal-tracking, "
        "defocused or displaced frame"
    )


def regular_hint(sweeps) -> list[str]:
    """Advice when the images found bad in a sweep are (nearly) all the
    multiples of one N, as the crystal-tracking frames of cRED data are:
    gaps.exclude_images_multiple leaves them out without reading them."""
    lines = []
    for sweep in sweeps:
        bad = sorted(n for n, image in sweep.images.items() if image.status == BAD and image.by == "auto")
        if len(bad) < 3:
            continue
        every = 0
        for n in bad:
            every = math.gcd(every, n)
        if every < 2:
            continue
        first, last = sweep.image_range
        if len(bad) < 0.8 * len(range((first + every - 1) // every * every, last + 1, every)):
            continue  # e.g. 10, 30, 50: not what a multiple of 10 would leave out
        where = "" if len(sweeps) == 1 else f" of sweep {sweep.number}"
        lines.append(
            f"images {range_text(bad)}{where} (every {every}th image number) were found bad: "
            f"crystal-tracking frames? exclude_images_multiple={every} leaves them out without "
            "reading them"
        )
    return lines


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
    bad = {}
    counts = _per_image(reflections, experiments, sweeps)  # strong spots, (sweep, image) -> n
    for key, count in _blank_images(counts, params).items():
        # why has it no spots: look at the few suspects' pixels
        bad[key] = frame_fault(*_frame(experiments, sweeps, key)) or (
            f"blank image ({count} strong spots; shutter or beam failure)"
        )
    for key, (length, expected) in _blank_runs(counts, params).items():
        if key not in bad:
            bad[key] = frame_fault(*_frame(experiments, sweeps, key)) or (
                f"blank image (no strong spot, one of {length} consecutive such images; "
                f"{expected:g} on the images around them; shutter or beam failure)"
            )
    for key, ratio in _overexposed_images(reflections, experiments, params, sweeps).items():
        bad.setdefault(key, f"over-exposed image (spots {ratio:.0f}x brighter than neighbours)")
    for key, numbers in _isolated_images(reflections, experiments, params, sweeps).items():
        if key not in bad:
            bad[key] = frame_fault(*_frame(experiments, sweeps, key)) or _isolated_reason(*numbers)
    # An image without a strong spot is looked at (its own pixels): an
    # all-zero or wholly saturated frame is a fault whatever its neighbours,
    # and the blank test, which compares an image with its neighbours, does
    # not see a run of such frames longer than half the neighbourhood (a
    # detector that stopped).  Dense data have hardly any such images; a
    # sparse pattern's empty frames are read once and kept, as their pixels
    # are not all zero.
    for key, count in sorted(counts.items()):
        if count == 0 and key not in bad:
            fault = frame_fault(*_frame(experiments, sweeps, key))
            if fault:
                bad[key] = fault
    return bad


def run(state) -> Record | None:
    params, sweeps = state.params, state.sweeps
    found = False
    spots_of_bad = {}  # (sweep, image) -> its strong spots, before it was excluded
    left = {}  # what a look after the last round still finds: said, not excluded
    for round_ in range(ROUNDS + 1):
        bad = find_bad_images(state.reflections, state.experiments, params, sweeps)
        if not bad:
            break
        if round_ == ROUNDS:
            left = bad
            break
        found = True
        counts = _per_image(state.reflections, state.experiments, sweeps)
        used = len(sweeps.used())
        if len(bad) >= used:
            raise GapfillError(
                f"all {used} images are bad ({next(iter(bad.values()))}, ...): no diffraction "
                "to process; check the data collection"
            )
        over = {k: r for k, r in bad.items() if r.startswith("over-exposed")}
        spots_of_bad.update({k: counts.get(k, 0) for k in (over or bad)})
        state.experiments, state.reflections = sweeps.exclude(
            over or bad, "auto", state.reflections, state.find_spots,
            min_block_images=params.gaps.min_block_images,
        )
    if not found:
        logger.info("No bad images found")
        return None
    record = spot_record(state.experiments, state.reflections, sweeps, spots_of_bad)
    for line in regular_hint(sweeps):
        logger.warning(line)
        record.warn(line)
    if left:
        # each round's exclusions change the neighbours the next judges by;
        # after ROUNDS of them what is still found is left to the user
        named = "; ".join(f"{sweeps.image_name(k)}: {reason}" for k, reason in sorted(left.items()))
        line = (f"after {ROUNDS} round{'s' if ROUNDS != 1 else ''} of leaving out bad images these look bad too "
                f"and were kept ({named}): check them, and leave them out with gaps.exclude_images if they are")
        logger.warning("Warning: %s", line)
        record.warn(line)
    return record
