"""Image exclusions as the user writes them (gaps.exclude_images)."""

from __future__ import annotations

import re

from dials_gapfill.errors import GapfillError

EXAMPLE = "exclude_images=41:45,81"


def exclusion_ranges(values) -> list[tuple[int | None, int, int]]:
    """``["41:45,81", "2:5:7"]`` -> ``[(None, 41, 45), (None, 81, 81), (2, 5, 7)]``.

    A range is ``first:last`` or one number; ``sweep:first:last`` names the
    sweep (1, 2, ... in the order of the summary) when a run has several.
    """
    ranges = []
    for value in values or []:
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            for token in str(item).replace(" ", ",").split(","):
                if not token:
                    continue
                parts = token.split(":")
                if len(parts) > 3 or not all(re.fullmatch(r"\d+", p) for p in parts):
                    raise GapfillError(
                        f"gaps.exclude_images: cannot read {token!r}: give image "
                        "numbers (as the files number them) and first:last ranges separated by commas, e.g. "
                        f"{EXAMPLE} (sweep:first:last with several sweeps)"
                    )
                numbers = [int(p) for p in parts]
                sweep = numbers.pop(0) if len(numbers) == 3 else None
                first, last = numbers[0], numbers[-1]
                if last < first:  # (image 0 is an image where a sweep's files start at 0)
                    raise GapfillError(
                        f"gaps.exclude_images: range {token!r} is empty: "
                        "write ranges as first:last with first <= last, e.g. 41:45"
                    )
                if sweep is not None and sweep < 1:
                    raise GapfillError(
                        f"gaps.exclude_images: {token!r} names sweep {sweep}: sweeps are numbered from 1"
                    )
                ranges.append((sweep, first, last))
    return ranges


MULTIPLE_EXAMPLE = "exclude_images_multiple=20"


def exclusion_multiple(value) -> int | None:
    """gaps.exclude_images_multiple as a number: None when not set.

    DIALS' meaning (dials.find_spots and dials.integrate from DIALS 3.17):
    every image whose number is a multiple of N is left out, e.g. the
    crystal-tracking frames that cRED data collection puts at every 20th
    image.  N = 1 would leave out every image, so N >= 2.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    text = str(value).strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        raise GapfillError(
            f"gaps.exclude_images_multiple={text} is not a whole number: give one N >= 2 to leave "
            f"out every image whose number is a multiple of N, e.g. {MULTIPLE_EXAMPLE}"
        )
    n = int(text)
    if n < 2:
        what = "would leave out every image" if n == 1 else "is below 2"
        raise GapfillError(
            f"gaps.exclude_images_multiple={n} {what}: give N >= 2 to leave out every image whose "
            f"number is a multiple of N, e.g. {MULTIPLE_EXAMPLE} (or None)"
        )
    return n


def multiples(n: int | None, numbers) -> list[int]:
    """The image numbers among `numbers` that are multiples of n (none for None)."""
    if not n:
        return []
    return sorted(k for k in set(numbers) if k % n == 0)


def multiple_reason(n: int) -> str:
    """The reason an image left out by gaps.exclude_images_multiple is listed with."""
    return f"gaps.exclude_images_multiple={n}"
