"""Spot-finding stage: DIALS' spot finder over all blocks in one pass.

Images that stop DIALS' spot finder (pixels that cannot be read, a frame
over-exposed as a whole, above ``spotfinder.filter.max_strong_pixel_fraction``)
are found, proposed for exclusion to the sweeps, and the spots found again
without them.  The stage leaves ``state.find_spots`` for the stages that cut
blocks later (their cut blocks get their spots found again).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import statistics
import sys

from dials.algorithms.shoebox import MaskCode
from dials.array_family import flex

from dials_gapfill import cluster
from dials_gapfill.errors import GapfillError
from dials_gapfill.frames import frame_fault, mean_counts
from dials_gapfill.model.state import Record
from dials_gapfill.model.sweep import canonical_order, spot_record
from dials_gapfill.phil import dials_spotfinder_params
from dials_gapfill.util import captured, range_text

logger = logging.getLogger("dials.process_gapped.spotfinding")


class TooManyStrongPixels(GapfillError):
    """DIALS' spot finder met an image with more strong pixels than
    spotfinder.filter.max_strong_pixel_fraction allows (it does not say which)."""


def _image_keys(experiments, sweeps):
    """(experiment, index in its image set, (sweep, image number)) of every image."""
    for exp in experiments:
        s = sweeps.sweep_of(exp).number
        first = exp.scan.get_image_range()[0]
        for i in range(len(exp.imageset)):
            yield exp, i, (s, first + i)


def _unreadable_images(experiments, sweeps) -> dict:
    """(sweep, image) -> reason, for images whose pixels cannot be read."""
    bad = {}
    for exp, i, key in _image_keys(experiments, sweeps):
        try:
            exp.imageset.get_raw_data(i)
        except Exception as e:  # any reader failure makes the image unusable
            bad[key] = f"unreadable: {type(e).__name__}: {' '.join(str(e).split())[:80]}"
    return bad


def find_spots(experiments, params, sweeps):
    """Strong spots of every block (with shoeboxes, as dials.find_spots writes
    them), in canonical order (sweep.canonical_order).

    Returns (reflections, bad): when the spot finder fails on unreadable
    pixels, `bad` maps those (sweep, image) to a reason and reflections is
    None; the caller excludes them.  TooManyStrongPixels: an image is strong
    as a whole (the caller finds which).
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
        bad = _unreadable_images(experiments, sweeps)
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


def spots_of_readable_blocks(experiments, params, sweeps):
    """find_spots for blocks already known to be readable (a failure now is an error)."""
    reflections, bad = find_spots(experiments, params, sweeps)
    if bad:
        key, reason = next(iter(sorted(bad.items())))
        raise GapfillError(
            f"{sweeps.image_name(key)} cannot be used ({reason}): leave it out with exclude_images={sweeps.exclude_images_value(key)}"
        )
    return reflections


def whole_frame_faults(experiments, params, sweeps) -> dict:
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
        s = sweeps.sweep_of(exp).number
        first = exp.scan.get_image_range()[0]
        means = []
        for i in range(len(exp.imageset)):
            data = exp.imageset.get_raw_data(i)
            fault = frame_fault(exp, data)
            if fault:
                bad[(s, first + i)] = fault
            means.append(mean_counts(data))
        for i, m in enumerate(means):
            if (s, first + i) in bad:
                continue
            around = [
                means[j]
                for j in range(max(0, i - g.neighbours), min(len(means), i + g.neighbours + 1))
                if j != i and (s, first + j) not in bad
            ]
            if not around:
                continue
            reference = statistics.median(around)
            if reference > 0 and m > g.overexposed_factor * reference:
                bad[(s, first + i)] = (
                    f"over-exposed image (mean counts {m / reference:.0f}x its neighbours'; "
                    "too many strong pixels for spot finding)"
                )
    return bad


def _find_or_blame(experiments, params, sweeps):
    """find_spots, or the images to blame when it failed: (reflections, bad)."""
    try:
        return find_spots(experiments, params, sweeps)
    except TooManyStrongPixels:
        bad = whole_frame_faults(experiments, params, sweeps) if params.gaps.auto_exclude else {}
        if not bad:
            raise
        return None, bad


def _sweeps_without_spots(experiments, reflections, sweeps) -> None:
    """Refuse a run with a sweep without a strong spot on any image while the
    others have them: nothing in that sweep can be indexed, and its images
    cannot be judged blank against its own neighbours; the lattice search
    over all sweeps is not to be given a sweep that holds nothing."""
    if len(sweeps) < 2:
        return
    ids = set(reflections["id"])
    for sweep in sweeps:
        mine = [i for i, e in enumerate(experiments) if sweeps.sweep_of(e) is sweep]
        if mine and not ids & set(mine):
            # the first, middle and last image looked at (not every one: the
            # run stops here), so that the message says whether it is all of them
            frames = [(experiments[i], k) for i in mine for k in range(len(experiments[i].imageset))]
            sampled = sorted({0, len(frames) // 2, len(frames) - 1})
            faults = {}
            for j in sampled:
                exp, k = frames[j]
                faults[exp.scan.get_image_range()[0] + k] = frame_fault(exp, exp.imageset.get_raw_data(k))
            numbers = sorted(faults)
            said = set(faults.values())
            if said == {None}:
                what = "blank images, no diffraction"
            elif len(said) == 1:
                where = numbers[0] if len(numbers) == 1 else f"{', '.join(map(str, numbers[:-1]))} and {numbers[-1]}"
                what = (f"image{'s' if len(numbers) > 1 else ''} {where} of {len(frames)} looked at: "
                        f"{said.pop()}")
            else:
                what = "; ".join(f"image {n}: {f or 'no diffraction'}" for n, f in faults.items())
            raise GapfillError(
                f"no strong spots on any image of sweep {sweep.number} ({os.path.basename(sweep.template)}; "
                f"{what}): leave its files out of the input, or check the spot finding settings (spotfinder.*)"
            )


def run(state) -> Record:
    params, sweeps = state.params, state.sweeps
    reflections, bad = _find_or_blame(state.experiments, params, sweeps)
    for _ in range(3):
        if not bad:
            break
        # images that stopped the spot finder (unreadable pixels, a frame
        # over-exposed as a whole): excluded, then spots found without them
        if not params.gaps.auto_exclude:
            key, reason = next(iter(sorted(bad.items())))
            raise GapfillError(
                f"{sweeps.image_name(key)} cannot be used ({reason}): leave it out with exclude_images={sweeps.exclude_images_value(key)} "
                "(or set gaps.auto_exclude=True)"
            )
        state.experiments, _ = sweeps.exclude(bad, "auto", min_block_images=params.gaps.min_block_images)
        reflections, bad = _find_or_blame(state.experiments, params, sweeps)
    if bad:
        raise GapfillError(
            f"images {range_text(sorted(n for _, n in bad))} cannot be read: leave them out with exclude_images="
        )
    if len(reflections) == 0:
        raise GapfillError(
            "no strong spots on any image: the images are blank (no diffraction); check "
            "the shutter and beam, or the spot finding settings (spotfinder.*)"
        )
    _sweeps_without_spots(state.experiments, reflections, sweeps)
    state.reflections = reflections
    state.find_spots = functools.partial(spots_of_readable_blocks, params=params, sweeps=sweeps)
    return spot_record(state.experiments, reflections, sweeps)
