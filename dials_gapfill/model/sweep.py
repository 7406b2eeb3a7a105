"""The sweep: ONE rotation with holes.

A ``Sweep`` owns every image number from the first to the last image of the
rotation, each with its status (used, missing file, not given, excluded by the
user, found bad, dropped with its block) and who decided it; the blocks (runs
of used images) follow from the statuses, and so do the experiments, one per
block, cut from the imported image sequences.  Nothing else decides what a
block is: stages *propose* images to exclude and ``Sweep.exclude`` carries it
out, returning the new experiments and giving each block its spots: the spots
it had if the block is unchanged, spots found again on the new block if it was
cut, in the order one spot finding over the hand-excluded blocks gives.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid

from dxtbx.model.experiment_list import Experiment, ExperimentList

from dials.array_family import flex

from dials_gapfill.errors import GapfillError
from dials_gapfill.model.tables import join_blocks
from dials_gapfill.util import runs

logger = logging.getLogger("dials.process_gapped.sweep")

USED = "used"
MISSING = "missing file"  # no file for this image number
NOT_GIVEN = "not given"  # the file exists but was not among the images given
EXCLUDED = "excluded"  # gaps.exclude_images
BAD = "bad"  # found bad (unreadable, blank, all-zero, over-exposed, saturated)
DROPPED = "dropped"  # its block was dropped (too short, not indexable)

_IDENTIFIER_NAMESPACE = uuid.UUID("6f1c1d2e-9a4b-4c5d-8e7f-0a1b2c3d4e5f")


def block_identifier(template: str, first: int, last: int) -> str:
    """Deterministic experiment identifier of a block (same input, same id)."""
    return str(uuid.uuid5(_IDENTIFIER_NAMESPACE, f"{template}:{first}-{last}"))


@dataclasses.dataclass
class Image:
    number: int
    status: str = USED
    reason: str = ""
    by: str = ""  # input, user or auto

    def as_dict(self) -> dict:
        return {"image": self.number, "status": self.status, "reason": self.reason, "by": self.by}


def _slice(imageset, first: int, last: int):
    """Images first..last (image numbers) of an ImageSequence.

    dxtbx slices sequences in batch coordinates (relative index + batch offset);
    the piece keeps dxtbx' convention batch offset = first image - 1, which
    DIALS relies on when it slices image sets by array range (the integrator).
    """
    start = imageset.get_scan().get_image_range()[0]
    offset = imageset.get_scan().get_batch_offset()
    piece = imageset[first - start + offset : last - start + 1 + offset]
    scan = piece.get_scan()
    scan.set_batch_offset(first - 1)
    piece.set_scan(scan)
    return piece


class Sweep:
    """Images, blocks and exclusions of one rotation sweep.

    sources: experiments of the imported image sequences (contiguous runs of
    readable files, or the images of one NeXus file), in image order, with one
    shared beam, detector and goniometer and the start angle of each taken
    from its image number.
    """

    def __init__(self, template: str, sources, image_range, statuses=None):
        self.template = template
        self.sources = list(sources)
        first, last = image_range
        self.images = {n: Image(n) for n in range(first, last + 1)}
        have = set()
        for exp in self.sources:
            a, b = exp.scan.get_image_range()
            have.update(range(a, b + 1))
        for n, image in self.images.items():
            if n not in have:
                image.status, image.reason, image.by = MISSING, "missing file", "input"
        for n, (status, reason, by) in (statuses or {}).items():
            self.images[n] = Image(n, status, reason, by)
        self.dropped_blocks: list[dict] = []  # {first, last, reason}
        self._experiments: dict[tuple[int, int], Experiment] = {}
        if not self.used():
            raise GapfillError("no images left to process: exclude fewer images")

    # -- what the statuses say ------------------------------------------------

    @property
    def image_range(self) -> tuple[int, int]:
        return min(self.images), max(self.images)

    def used(self) -> list[int]:
        return [n for n, i in sorted(self.images.items()) if i.status == USED]

    def blocks(self) -> list[tuple[int, int]]:
        return runs(self.used())

    def not_used(self) -> list[dict]:
        """The images not used, with their status, reason and who decided."""
        return [i.as_dict() for n, i in sorted(self.images.items()) if i.status != USED]

    def gap_before(self, first: int) -> bool:
        """Images are missing just before image `first` (not the sweep's start)."""
        return first > self.image_range[0]

    def gap_after(self, last: int) -> bool:
        return last < self.image_range[1]

    # -- experiments ----------------------------------------------------------

    def experiments(self) -> ExperimentList:
        """One experiment per block, in image order (the same objects while a
        block is unchanged; crystals are the caller's)."""
        out = ExperimentList()
        for first, last in self.blocks():
            exp = self._experiments.get((first, last))
            if exp is None:
                exp = self._make(first, last)
                self._experiments[(first, last)] = exp
            out.append(exp)
        return out

    def _make(self, first: int, last: int) -> Experiment:
        for src in self.sources:
            a, b = src.scan.get_image_range()
            if a <= first and last <= b:
                piece = src.imageset if (a, b) == (first, last) else _slice(src.imageset, first, last)
                return Experiment(
                    imageset=piece,
                    beam=src.beam,
                    detector=src.detector,
                    goniometer=src.goniometer,
                    scan=piece.get_scan(),
                    identifier=block_identifier(self.template, first, last),
                )
        raise AssertionError(f"block {first}-{last} lies in no imported sequence")

    # -- the one operation that changes blocks --------------------------------

    def set_status(self, images: dict[int, str], status: str, by: str) -> list[int]:
        """Mark used images; returns the image numbers that changed."""
        changed = []
        for n, reason in sorted(images.items()):
            image = self.images.get(n)
            if image is None or image.status != USED:
                continue
            image.status, image.reason, image.by = status, reason, by
            changed.append(n)
        return changed

    def exclude(self, images: dict[int, str], by: str, reflections=None, find_spots=None,
                status: str = BAD):
        """Exclude images (number -> reason): (experiments, reflections).

        With `reflections` (spots of the current blocks), the new blocks get
        their spots: an unchanged block keeps its own, a block that was cut gets
        spots found again by `find_spots(experiments) -> reflections` on the new
        block (DIALS joins spots across consecutive images, so spots touching an
        excluded image are not the spots of a run without it).  The table is in
        block order, ids renumbered: the table of one spot finding over the
        hand-excluded blocks.
        """
        before = {e.identifier for e in self.experiments()}
        changed = self.set_status(images, status, by)
        for n in changed:
            logger.warning("Excluding image %d: %s", n, self.images[n].reason)
        experiments = self.experiments()
        if not len(experiments):
            raise GapfillError("no usable images left after excluding bad images: check the data")
        if reflections is None:
            return experiments, None
        return experiments, self.spots_for(experiments, reflections, before, find_spots)

    def drop(self, first: int, last: int, reason: str) -> None:
        """Drop a whole block (e.g. it cannot be indexed)."""
        self.set_status({n: reason for n in range(first, last + 1)}, DROPPED, "auto")

    def spots_for(self, experiments, reflections, had_spots, find_spots):
        """The spots of `experiments`: kept where a block is unchanged (its
        identifier is in `had_spots`), found again where it is new."""
        new = ExperimentList([e for e in experiments if e.identifier not in had_spots])
        fresh = find_spots(new) if len(new) else None
        return join_blocks([reflections] + ([fresh] if fresh is not None else []), experiments)


def canonical_order(reflections):
    """Spots sorted by block, then centroid z, y, x.

    DIALS' spot finder labels pixels in the order its worker processes return
    them, so the order of a spot table depends on scheduling; refinement
    samples reflections in table order.  Sorting makes every run (and a run
    with images excluded automatically or by hand) see the same table.
    """
    if len(reflections) < 2:
        return reflections
    x, y, z = reflections["xyzobs.px.value"].parts()
    ids = reflections["id"]
    order = sorted(range(len(reflections)), key=lambda i: (ids[i], z[i], y[i], x[i]))
    return reflections.select(flex.size_t(order))
