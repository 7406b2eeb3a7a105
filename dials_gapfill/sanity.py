"""Data sanity checks: warnings a crystallographer should read, one line each.

Each function returns a list of one-line warnings, each saying what was seen
and the number behind it; an empty list when nothing is wrong. They never
raise on odd input (a check that cannot be made is skipped) and cost little:

- ``spot_warnings(experiments, reflections, params)`` after spot finding:
  reads a few images (``sanity.sample_images``, default 5) and looks for
  16-bit overloads that wrapped around (pixels inside saturated spot cores
  that read below the local background), near-saturated pixels that the
  trusted range does not flag, large regions of pixels that read exactly
  0 but count as valid (outside the active area, unmasked), and an unmasked
  beamstop shadow (rings around the beam centre far darker than outside).
- ``refinement_warnings(experiments, reflections, params)`` after
  refinement (indexed strong spots with predictions ``xyzcal.px``): stepped
  stills posing as rotation data, seen early: the strong spots are predicted
  mostly near image centres, whereas in rotation data where a reflection
  crosses the Ewald sphere within its image is uniform.
- ``integration_warnings(experiments, reflections, params)`` after
  integration: stepped stills posing as rotation data (the same spot
  statistic when the table keeps the strong flags, and: fully recorded
  reflections predicted near an image boundary are rarely strong, whereas in
  rotation data the recorded intensity does not depend on where in its image
  a reflection crosses the Ewald sphere), and a large fraction of
  significantly negative intensities (background wrong).

Thresholds, and what was measured with them (dials-gapfill README, "Data
sanity warnings"): SNase (stepped stills) vs the simulator's rotation data.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import ndimage

logger = logging.getLogger("dials.process_gapped.sanity")


# stills: fraction of strong (I/sigma > 3) fully recorded reflections predicted
# within EDGE of an image boundary, relative to those within EDGE of an image
# centre. SNase 0.54; simulated rotation sweeps 0.93-0.98 (tiny, weak).
STILLS_EDGE = 0.1  # images
STILLS_RATIO = 0.75
# stills, from the indexed strong spots: how many are predicted within
# STILLS_EDGE of a boundary relative to within STILLS_EDGE of a centre.
# SNase 0.26; simulated rotation sweeps 0.92 (tiny), 0.76 (weak: B = 120 Å², split
# weak spots at boundaries fall below the spot-finding threshold).
SPOTS_RATIO = 0.45
STILLS_MIN_Z = 5.0  # significance of the difference (two-proportion z)
STILLS_MIN_N = 100  # reflections in each group
STILLS_MIN_STRONG = 30  # strong reflections at image centres
# negative intensities: fraction of fully recorded reflections with I/sigma < -3.
# SNase about 0.3, simulated sweeps 0.000.
NEGATIVE_FRACTION = 0.02
# detector: pixels >= HIGH * trusted maximum are near saturation; a pixel next
# to one that reads below WRAP_BACKGROUND * the local background is wrapped.
HIGH = 0.5
NEAR_CEILING = 0.9
WRAP_BACKGROUND = 0.5
WRAPPED_PER_IMAGE = 1.0
# zeros: pixels that read exactly 0 on every sampled image, in connected
# regions of at least ZERO_REGION pixels, above ZERO_FRACTION of the detector
# (SNase: 44,479 px, 4.2 %).  A photon counter with little background reads 0
# in most pixels of every image (L-cysteine: 89.5 %), in other places each
# time; so the test is made on bins of pixels summed over the sampled images,
# each bin large enough that a live one would expect ZERO_EXPECTED counts at
# the images' mean background: a live bin reads 0 with probability
# exp(-ZERO_EXPECTED) = 2e-9.  Counts are divided by the panel's gain first:
# an integrating camera (the CMOS cameras of electron diffraction; dxtbx'
# MRC format gives a Ceta gain 26) records 26 counts per electron, so 20
# counts are less than one electron and read 0 half the time.
ZERO_REGION = 1000
ZERO_FRACTION = 0.01
ZERO_EXPECTED = 20.0
ZERO_BIN_MAX = 32
# beamstop shadow: rings around the beam centre (5 px wide, out to SHADOW_SEARCH
# px) whose median is below SHADOW_LEVEL * the brightest ring, contiguous from
# the centre, at least SHADOW_MIN_RADIUS px and mostly unmasked. SNase: radius
# 20 px, 0.07-0.4 of the ring outside it; simulated sweeps: flat (no shadow).
SHADOW_SEARCH = 150
SHADOW_LEVEL = 0.5
SHADOW_MIN_RADIUS = 10


def _setting(params, name, default):
    scope = getattr(params, "sanity", None) if params is not None else None
    value = getattr(scope, name, default) if scope is not None else default
    return default if value is None else value


def enabled(params) -> bool:
    return bool(_setting(params, "run", True))


# --------------------------------------------------------------------------
# after spot finding: the detector
# --------------------------------------------------------------------------


def _sample(experiments, n):
    """Up to n (experiment, index in its imageset, image number), evenly spaced."""
    images = []
    seen = set()
    for exp in experiments:
        imageset = exp.imageset
        if imageset is None or id(imageset) in seen:
            continue
        seen.add(id(imageset))
        first = exp.scan.get_image_range()[0] if exp.scan is not None else 1
        for i in range(len(imageset)):
            images.append((exp, i, first + i))
    if len(images) <= n:
        return images
    step = len(images) / n
    return [images[int(step * (k + 0.5))] for k in range(n)]


def _ring_medians(a, valid, centre, r_max=SHADOW_SEARCH, step=5):
    """Median of the valid pixels in rings of `step` px around centre (fast, slow)."""
    cx, cy = centre
    x0, x1 = max(int(cx - r_max), 0), min(int(cx + r_max) + 1, a.shape[1])
    y0, y1 = max(int(cy - r_max), 0), min(int(cy + r_max) + 1, a.shape[0])
    if x0 >= x1 or y0 >= y1:
        return None, None
    crop, ok = a[y0:y1, x0:x1], valid[y0:y1, x0:x1]
    yy, xx = np.indices(crop.shape)
    r = np.hypot(xx + x0 - cx, yy + y0 - cy)
    medians, unmasked = [], []
    for lo in range(0, r_max, step):
        ring = (r >= lo) & (r < lo + step)
        good = ring & ok
        medians.append(float(np.median(crop[good])) if good.sum() >= 10 else None)
        unmasked.append(int(good.sum()) / max(int(ring.sum()), 1))
    return medians, unmasked


def _panel_stats(data, trusted_max):
    """(near_ceiling, wrapped, wrapped values, pixels as int64) of one panel's pixels."""
    a = data.as_numpy_array().astype(np.int64)
    high = a >= HIGH * trusted_max
    near_ceiling = int(((a >= NEAR_CEILING * trusted_max) & (a < trusted_max)).sum())
    wrapped, values = 0, []
    if high.any():
        around = ndimage.binary_dilation(high, structure=np.ones((3, 3), bool)) & ~high
        for y, x in zip(*np.nonzero(around)):
            window = a[max(y - 7, 0) : y + 8, max(x - 7, 0) : x + 8]
            background = np.median(window[window < HIGH * trusted_max])
            if background > 0 and a[y, x] < WRAP_BACKGROUND * background:
                wrapped += 1
                values.append((int(a[y, x]), float(background)))
    return near_ceiling, wrapped, values, a


def dead_zeros(total, valid, n_images, gain=1.0) -> int:
    """Pixels in large connected regions that read 0 on every one of
    `n_images` images, beyond chance: `total` the panel's counts summed over
    the images, `valid` the pixels valid (>= 0) in all of them, `gain` the
    panel's counts per detected quantum.  Pixels are summed in square bins
    large enough to expect ZERO_EXPECTED quanta at the mean background; a bin
    that is valid and reads 0 is dead."""
    n_valid = int(valid.sum())
    if not n_valid or not n_images:
        return 0
    mean = float(total[valid].sum()) / (n_valid * n_images) / (gain if gain > 0 else 1.0)
    if mean <= 0:
        side = ZERO_BIN_MAX
    else:
        side = min(ZERO_BIN_MAX, max(1, math.ceil(math.sqrt(ZERO_EXPECTED / (n_images * mean)))))
    ny, nx = total.shape[0] // side, total.shape[1] // side
    if not nx or not ny:
        return 0
    crop = (slice(0, ny * side), slice(0, nx * side))
    counts = np.where(valid, total, 0)[crop].reshape(ny, side, nx, side).sum(axis=(1, 3))
    live = valid[crop].reshape(ny, side, nx, side).all(axis=(1, 3))
    zero = live & (counts == 0)
    if zero.sum() * side * side < ZERO_REGION:
        return 0
    labels, n = ndimage.label(zero)
    if not n:
        return 0
    sizes = np.bincount(labels.ravel())[1:] * side * side
    return int(sizes[sizes >= ZERO_REGION].sum())


def _shadow_radius(medians, step=5):
    """(radius, brightest ring inside, background outside) of the largest disc
    around the beam centre whose every ring is below SHADOW_LEVEL times the
    median of the 5 rings just outside it; None when there is none."""
    best = None
    for n in range(SHADOW_MIN_RADIUS // step, min(100 // step, len(medians) - 5) + 1):
        inside = medians[:n]
        outside = [m for m in medians[n : n + 5] if m is not None]
        if any(m is None for m in inside) or len(outside) < 3:
            continue
        level = float(np.median(outside))
        if level > 0 and max(inside) < SHADOW_LEVEL * level:
            best = (n * step, max(inside), level)
    return best


def detector_stats(experiments, n_images=5) -> dict:
    """Pixel statistics of up to n_images images (for spot_warnings and the report)."""
    out = {"images": [], "near_ceiling": 0, "wrapped": 0, "wrapped_values": [], "zeros": 0,
           "pixels": 0, "trusted_max": None, "trusted_min": None, "shadow": None}
    rings = []
    sums, valids, zero_valid = {}, {}, True  # per panel: counts summed over the images, valid in all
    gains = {}
    for exp, index, number in _sample(experiments, n_images):
        try:
            data = exp.imageset.get_raw_data(index)
        except Exception:  # unreadable images are the bad-image stage's business
            continue
        panels = list(exp.detector) if exp.detector is not None else []
        if not panels:
            continue
        masks = None  # the static mask (dials.generate_mask, format masks), if any
        try:
            lookup = exp.imageset.external_lookup.mask
            if lookup.data is not None and not lookup.data.empty():
                masks = tuple(lookup.data.tile(k).data() for k in range(len(panels)))
        except Exception:
            masks = None
        out["images"].append(number)
        for k, (panel, pixels) in enumerate(zip(panels, data)):
            tmin, tmax = panel.get_trusted_range()
            out["trusted_max"] = tmax if out["trusted_max"] is None else max(out["trusted_max"], tmax)
            out["trusted_min"] = tmin if out["trusted_min"] is None else min(out["trusted_min"], tmin)
            near, wrapped, values, a = _panel_stats(pixels, tmax)
            out["near_ceiling"] += near
            out["wrapped"] += wrapped
            out["wrapped_values"] += values
            zero_valid &= tmin < 0  # a 0 counts as a valid pixel
            gains[k] = panel.get_gain()
            if k in sums and sums[k].shape == a.shape:
                sums[k] += np.clip(a, 0, None)
                valids[k] &= a >= 0
            elif k not in sums:
                sums[k], valids[k] = np.clip(a, 0, None), a >= 0
            out["pixels"] += a.size
            # the beam centre on this panel: rings around it
            try:
                fast, slow = panel.get_beam_centre_px(exp.beam.get_s0())
            except (RuntimeError, ValueError):
                continue
            nf, ns = panel.get_image_size()
            if not (0 <= fast < nf and 0 <= slow < ns):
                continue
            a = pixels.as_numpy_array()
            valid = (a > tmin) & (a < tmax)
            if masks is not None:
                valid &= masks[k].as_numpy_array()
            medians, unmasked = _ring_medians(a, valid, (fast, slow))
            if medians is not None:
                rings.append((medians, unmasked, (fast, slow), k))
    n = len(out["images"])
    if zero_valid and n:
        # (per image, as the other counts: the same dead pixels on every image)
        out["zeros"] = n * sum(dead_zeros(sums[k], valids[k], n, gains.get(k, 1.0)) for k in sums)
    if rings:
        medians = [
            float(np.median([m[i] for m, _, _, _ in rings if m[i] is not None]))
            if any(m[i] is not None for m, _, _, _ in rings) else None
            for i in range(len(rings[0][0]))
        ]
        unmasked = [float(np.mean([u[i] for _, u, _, _ in rings])) for i in range(len(rings[0][1]))]
        shadow = _shadow_radius(medians)
        if shadow:
            radius, inside, outside = shadow
            n = radius // 5
            if np.mean(unmasked[:n]) > 0.5:
                out["shadow"] = {
                    "radius": radius, "centre": rings[0][2], "panel": rings[0][3], "panels": len(panels),
                    "inside": min(m for m in medians[:n] if m is not None) / outside,
                    "inside_max": inside / outside,
                    "unmasked": float(np.mean(unmasked[:n])),
                }
    return out


def spot_warnings(experiments, reflections=None, params=None) -> list[str]:
    """Warnings about the detector, from a few images (call after spot finding).

    experiments: the imported blocks (imagesets readable); reflections: the
    strong spots (not needed by the present checks); params: the working
    parameters (sanity.sample_images read defensively). Costs about 0.3 s
    per image read.
    """
    if not enabled(params):
        return []
    try:
        stats = detector_stats(experiments, int(_setting(params, "sample_images", 5)))
    except Exception as e:  # a sanity check must never stop processing
        logger.debug("detector checks skipped: %s", e)
        return []
    n = len(stats["images"])
    if not n:
        return []
    warnings = []
    tmax = stats["trusted_max"]
    which = f"{n} sampled image{'s' if n > 1 else ''} ({', '.join(map(str, stats['images']))})"
    if stats["wrapped"] >= max(3, WRAPPED_PER_IMAGE * n):
        values = np.array([v for v, _ in stats["wrapped_values"]])
        backgrounds = np.array([b for _, b in stats["wrapped_values"]])
        warnings.append(
            f"wrapped detector overloads: {stats['wrapped'] / n:.0f} pixels per image next to "
            f"saturated spot cores (≥ {HIGH * tmax:.0f}) read below the local background "
            f"(median {np.median(values):.0f} vs {np.median(backgrounds):.0f}; {which}), and "
            f"{stats['near_ceiling'] / n:.0f} per image are ≥ {NEAR_CEILING:.0%} of the trusted "
            f"maximum {tmax:.0f} without being flagged: the counter overflowed and wrapped, so the "
            "strongest spots' intensities are wrong; flag them with a lower maximum, e.g. "
            f"geometry.detector.panel.trusted_range={stats['trusted_min']:g},{math.floor(NEAR_CEILING * tmax / 1000) * 1000}"
        )
    if stats["pixels"] and stats["zeros"] >= ZERO_FRACTION * stats["pixels"]:
        warnings.append(
            f"{stats['zeros'] / n:.0f} pixels per image ({100 * stats['zeros'] / stats['pixels']:.1f} %) "
            f"read exactly 0 in large connected regions and count as valid (trusted minimum "
            f"{stats['trusted_min']:g}; {which}): probably outside the active area (e.g. a "
            "dewarped CCD image); mask them (dials.generate_mask) so that background and "
            "completeness are not computed from them"
        )
    shadow = stats.get("shadow")
    if shadow:
        fx, sy = shadow["centre"]
        circle = f"{fx:.0f},{sy:.0f},{shadow['radius'] + 5}"
        on, how = "", f"e.g. dials.generate_mask untrusted.circle={circle}"
        if shadow.get("panels", 1) > 1:
            # the centre is in the pixels of the panel it is on, and
            # dials.generate_mask puts a circle on panel 0 unless told; on its
            # command line untrusted.panel= and untrusted.circle= would be two
            # regions (the whole panel, and the circle on panel 0)
            on = f" on panel {shadow['panel']}"
            how = (f"e.g. dials.generate_mask with a parameter file holding untrusted {{ panel = {shadow['panel']}; "
                   f"circle = {circle} }}")
        warnings.append(
            f"unmasked beamstop shadow? Within {shadow['radius']} px of the beam centre "
            f"({fx:.0f}, {sy:.0f}{on}) the pixels read {shadow['inside']:.2f}-{shadow['inside_max']:.2f} "
            f"of the background around it, and {100 * shadow['unmasked']:.0f} % of them count as "
            f"valid ({which}): mask it, {how}, so that spots and background there are not used"
        )
    return warnings


# --------------------------------------------------------------------------
# after integration: the reflections
# --------------------------------------------------------------------------


def _fully_recorded_sums(reflections):
    """numpy (I/sigma, z predicted) of summation-integrated, fully recorded reflections."""
    r = reflections
    if "intensity.sum.value" not in r or "xyzcal.px" not in r:
        return None, None
    sel = r.get_flags(r.flags.integrated_sum)
    if "partiality" in r:
        sel &= r["partiality"] > 0.99
    r = r.select(sel)
    if not len(r):
        return None, None
    intensity = np.array(r["intensity.sum.value"])
    variance = np.array(r["intensity.sum.variance"])
    ok = variance > 0
    isig = intensity[ok] / np.sqrt(variance[ok])
    z = np.array(r["xyzcal.px"].parts()[2])[ok]
    return isig, z


def _two_proportions(k1, n1, k2, n2):
    """z of the difference of two proportions (pooled standard error)."""
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(max(pooled * (1 - pooled) * (1 / n1 + 1 / n2), 1e-12))
    return (k1 / n1 - k2 / n2) / se


def spot_position_statistic(reflections) -> dict | None:
    """Where in their images the indexed strong spots are predicted.

    Uses reflections flagged indexed (or strong) with xyzcal.px. Returns
    {"centre": spots within STILLS_EDGE of an image centre, "edge": within
    STILLS_EDGE of a boundary, "ratio": edge / centre, "z": significance of the
    difference from equal numbers}, or None when too few spots. In rotation
    data the ratio is about 1 (a reflection crosses the Ewald sphere anywhere
    in its image); stepped stills record only reflections near image centres.
    """
    r = reflections
    if r is None or "xyzcal.px" not in r or not len(r):
        return None
    sel = r.get_flags(r.flags.indexed) | r.get_flags(r.flags.used_in_refinement)
    # (rows no refinement job predicted, e.g. its outliers, hold (0, 0, 0):
    # a z of 0 would count as a boundary)
    sel &= r["xyzcal.px"].norms() > 0
    if sel.count(True) == 0:
        return None
    z = np.array(r["xyzcal.px"].parts()[2])[np.array(sel)]
    distance = np.abs(z - np.floor(z) - 0.5)
    n_c = int((distance < STILLS_EDGE).sum())
    n_e = int((distance > 0.5 - STILLS_EDGE).sum())
    if n_c < STILLS_MIN_N:
        return None
    # equal numbers expected: binomial z of the centre share of centre + edge
    n = n_c + n_e
    zscore = (n_c - n / 2) / math.sqrt(n / 4)
    return {"centre": n_c, "edge": n_e, "ratio": n_e / n_c, "z": zscore}


def _spot_evidence(stats):
    return (
        f"indexed strong spots are predicted within {STILLS_EDGE:g} image of an image boundary "
        f"{stats['ratio']:.2f} times as often as within {STILLS_EDGE:g} of an image centre "
        f"({stats['edge']} vs {stats['centre']}; rotation data: about 1)"
    )


def _stills_consequence(experiments):
    osc = None
    try:
        if experiments is not None and len(experiments) and experiments[0].scan is not None:
            osc = experiments[0].scan.get_oscillation()[1]
    except Exception:
        pass
    width = f"{osc:g}° " if osc else ""
    return (
        f"each image records only part of its {width}oscillation (stepped stills, or a "
        "shutter/rotation fault), so partials do not add up and the intensities will not merge"
    )


def refinement_warnings(experiments, reflections, params=None) -> list[str]:
    """Stills posing as rotation data, from the indexed strong spots (call after
    refinement, with the reflections used in refinement and their xyzcal.px).
    Pure numpy: milliseconds."""
    if not enabled(params):
        return []
    try:
        stats = spot_position_statistic(reflections)
        if stats and stats["ratio"] < SPOTS_RATIO and stats["z"] > STILLS_MIN_Z:
            return [f"stills posing as rotation data? {_spot_evidence(stats)}: {_stills_consequence(experiments)}"]
    except Exception as e:  # a sanity check must never stop processing
        logger.debug("refinement checks skipped: %s", e)
    return []


def stills_statistic(reflections) -> dict | None:
    """How strongly the recorded intensity depends on where in its image a
    reflection is predicted (rotation data: not at all).

    Returns {"centre": fraction strong within STILLS_EDGE of an image centre,
    "edge": fraction strong within STILLS_EDGE of a boundary, "ratio",
    "z": significance, "n_centre", "n_edge"}, or None when too few reflections.
    """
    isig, z = _fully_recorded_sums(reflections)
    if isig is None:
        return None
    distance = np.abs(z - np.floor(z) - 0.5)  # 0 at the image centre, 0.5 at a boundary
    centre = distance < STILLS_EDGE
    edge = distance > 0.5 - STILLS_EDGE
    n_c, n_e = int(centre.sum()), int(edge.sum())
    s_c, s_e = int((isig[centre] > 3).sum()), int((isig[edge] > 3).sum())
    if n_c < STILLS_MIN_N or n_e < STILLS_MIN_N or s_c < STILLS_MIN_STRONG:
        return None
    f_c, f_e = s_c / n_c, s_e / n_e
    return {"centre": f_c, "edge": f_e, "ratio": f_e / f_c, "z": _two_proportions(s_c, n_c, s_e, n_e),
            "n_centre": n_c, "n_edge": n_e}


def integration_warnings(experiments, reflections, params=None) -> list[str]:
    """Warnings about the integrated intensities (call after integration).

    experiments: the integrated blocks; reflections: DIALS' integrated
    reflections of all blocks (intensity.sum.*, xyzcal.px, partiality,
    flags); params: the working parameters (sanity.run read defensively).
    Pure numpy on the table: well under a second for 10^5 reflections.
    """
    if not enabled(params):
        return []
    warnings = []
    try:
        stats = stills_statistic(reflections)
        spots = spot_position_statistic(reflections)
        evidence = []
        if spots and spots["ratio"] < SPOTS_RATIO and spots["z"] > STILLS_MIN_Z:
            evidence.append(_spot_evidence(spots))
        if stats and stats["ratio"] < STILLS_RATIO and stats["z"] > STILLS_MIN_Z:
            evidence.append(
                f"fully recorded reflections predicted within {STILLS_EDGE:g} image of an image "
                f"boundary are strong (I/σ > 3) {stats['ratio']:.2f} times as often as those at "
                f"image centres ({100 * stats['edge']:.0f} % vs {100 * stats['centre']:.0f} % of "
                f"{stats['n_edge']} and {stats['n_centre']}; rotation data: about 1)"
            )
        if evidence:
            warnings.append(
                f"stills posing as rotation data? {'; '.join(evidence)}: {_stills_consequence(experiments)}"
            )
        isig, _ = _fully_recorded_sums(reflections)
        if isig is not None and len(isig) >= STILLS_MIN_N:
            negative = float(np.mean(isig < -3))
            if negative > NEGATIVE_FRACTION:
                warnings.append(
                    f"{100 * negative:.1f} % of the fully recorded reflections have I/σ < -3 "
                    f"({int((isig < -3).sum())} of {len(isig)}; with a correct background model "
                    "well under 1 %): the background under the spots is overestimated (overlapping "
                    "spots, unmasked artefacts or overloads, or data that are not rotation data)"
                )
    except Exception as e:  # a sanity check must never stop processing
        logger.debug("integration checks skipped: %s", e)
    return warnings
