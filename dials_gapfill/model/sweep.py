"""The sweeps of a run: each ONE rotation with holes.

A ``Sweep`` owns every image number from the first to the last image of one
rotation (one template or one NeXus scan, at one goniometer setting), each
with its status (used, missing file, not given, excluded by the user, found
bad, dropped with its block) and who decided it; the blocks (runs of used
images) follow from the statuses, and so do the experiments, one per block,
cut from the imported image sequences.

``Sweeps`` holds the sweeps of one run, in order, and is the only place that
changes statuses: stages *propose* images to exclude, keyed by (sweep number,
image number), and ``Sweeps.exclude`` carries it out, returning the new
experiments and giving each block its spots: the spots it had if the block is
unchanged, spots found again on the new block if it was cut, in the order one
spot finding over the hand-excluded blocks gives.  Dropping blocks (too short,
not indexable) goes through it too, so the report's blocks, exclusions and
dropped blocks all come from here.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import uuid

from dials.array_family import flex
from dials.util.batch_handling import calculate_batch_offsets
from dxtbx.model import Scan
from dxtbx.model.experiment_list import Experiment, ExperimentList

from dials_gapfill.errors import GapfillError
from dials_gapfill.model.state import Record, block_names
from dials_gapfill.model.tables import image_numbers_of_z, join_blocks
from dials_gapfill.util import runs

logger = logging.getLogger("dials.process_gapped.sweep")
spots_logger = logging.getLogger("dials.process_gapped")

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


def setting_text(goniometer) -> str:
    """A goniometer's angles (multi-axis: the scan axis named) or its rotation axis."""
    g = goniometer
    if hasattr(g, "get_names"):
        scan_axis = g.get_scan_axis()
        return ", ".join(
            f"{n} scan" if k == scan_axis else f"{n} {a:.1f}"
            for k, (n, a) in enumerate(zip(g.get_names(), g.get_angles()))
        )
    return "axis " + ", ".join(f"{v:.3f}" for v in g.get_rotation_axis())


class Sweep:
    """Images and blocks of one rotation.

    sources: experiments of the imported image sequences (contiguous runs of
    readable files, or the images of one NeXus file), in image order, sharing
    one beam, detector and goniometer, the start angle of each taken from its
    image number.  number: the sweep's place in the run (1, 2, ...).
    """

    def __init__(self, template: str, sources, image_range, statuses=None, number: int = 1):
        self.template = template
        self.number = number
        self.n_files = 0  # files given (for the summary)
        # (goniometer, detector) as the headers give them, before the overrides
        self.header_models = None
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
        self.dropped_blocks: list[dict] = []  # {first, last, reason[, stats]}
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
        """Runs of used images, split where one imported sequence ends and
        the next begins (a block is one image set: dxtbx ends a sequence where
        the header angles do not follow on, e.g. a duplicated frame)."""
        starts = {src.scan.get_image_range()[0] for src in self.sources}
        out = []
        for first, last in runs(self.used()):
            cut = [n for n in range(first + 1, last + 1) if n in starts]
            for a, b in zip([first] + cut, [n - 1 for n in cut] + [last]):
                out.append((a, b))
        return out

    def not_used(self) -> list[dict]:
        """The images not used, with their status, reason and who decided."""
        return [i.as_dict() for n, i in sorted(self.images.items()) if i.status != USED]

    def gap_before(self, first: int) -> bool:
        """Images are missing just before image `first` (not the sweep's start)."""
        return first > self.image_range[0]

    def gap_after(self, last: int) -> bool:
        return last < self.image_range[1]

    @property
    def goniometer(self):
        return self.sources[0].goniometer

    def setting_text(self) -> str:
        return setting_text(self.goniometer)

    def describe(self, batch_offset: int = 0) -> dict:
        return {
            "number": self.number, "template": self.template, "image_range": list(self.image_range),
            "n_files": self.n_files, "n_blocks": len(self.blocks()), "goniometer": self.setting_text(),
            "batch_offset": batch_offset,
        }

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

    def identifiers(self) -> set[str]:
        return {block_identifier(self.template, first, last) for first, last in self.blocks()}

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

    # -- changes (through Sweeps) ---------------------------------------------

    def _set_status(self, images: dict[int, str], status: str, by: str) -> list[int]:
        """Mark used images; returns the image numbers that changed."""
        changed = []
        for n, reason in sorted(images.items()):
            image = self.images.get(n)
            if image is None or image.status != USED:
                continue
            image.status, image.reason, image.by = status, reason, by
            changed.append(n)
        return changed


class Sweeps:
    """The sweeps of one run, in order; the one place that changes images and blocks.

    Images are named by (sweep number, image number).  The experiments of the
    run are the blocks of every sweep, sweep by sweep, each in image order.
    """

    def __init__(self, sweeps):
        self.sweeps = list(sweeps)
        for k, sweep in enumerate(self.sweeps, start=1):
            sweep.number = k

    def __iter__(self):
        return iter(self.sweeps)

    def __len__(self):
        return len(self.sweeps)

    def __getitem__(self, k):
        return self.sweeps[k]

    # -- what there is ----------------------------------------------------------

    def experiments(self) -> ExperimentList:
        out = ExperimentList()
        for sweep in self.sweeps:
            out.extend(sweep.experiments())
        return out

    def used(self) -> list[tuple[int, int]]:
        return [(s.number, n) for s in self.sweeps for n in s.used()]

    def not_used(self) -> list[dict]:
        """Images not used, each with its sweep, status, reason and who decided."""
        return [dict(d, sweep=s.number) for s in self.sweeps for d in s.not_used()]

    @property
    def dropped_blocks(self) -> list[dict]:
        return [dict(d, sweep=s.number) for s in self.sweeps for d in s.dropped_blocks]

    def batch_offsets(self) -> dict[int, int]:
        """Sweep number -> the number added to an image number to give its MTZ
        batch: DIALS' rule (dials.util.batch_handling, as dials.export and
        dials.scale number several sweeps): image numbers kept where the
        sweeps' ranges do not overlap, else the next hundred (1-15, 101-115,
        201-215, ...).  One sweep: 0, BATCH is the image number."""
        ranges = [types.SimpleNamespace(scan=Scan(s.image_range, (0.0, 1.0))) for s in self.sweeps]
        return {s.number: offset for s, offset in zip(self.sweeps, calculate_batch_offsets(ranges))}

    def sweep_of(self, experiment) -> Sweep:
        """The sweep a block experiment belongs to."""
        for s in self.sweeps:
            if experiment.identifier in s.identifiers():
                return s
        raise KeyError(experiment.identifier)

    def image_name(self, key: tuple[int, int]) -> str:
        """'image 12', or 'image 12 of sweep 2' when the run has several sweeps."""
        s, n = key
        return f"image {n}" if len(self.sweeps) == 1 else f"image {n} of sweep {s}"

    def images_name(self, sweep_number: int, first: int, last: int) -> str:
        """'images 3-9', or 'images 3-9 of sweep 2' when the run has several sweeps."""
        where = f"images {first}-{last}"
        return where if len(self.sweeps) == 1 else f"{where} of sweep {sweep_number}"

    def exclude_images_value(self, key: tuple[int, int]) -> str:
        """The gaps.exclude_images value that leaves out one image."""
        s, n = key
        return f"{n}" if len(self.sweeps) == 1 else f"{s}:{n}:{n}"

    def gap_before(self, experiment) -> bool:
        """Images are missing just before the block (not its sweep's start)."""
        return self.sweep_of(experiment).gap_before(experiment.scan.get_image_range()[0])

    def gap_after(self, experiment) -> bool:
        return self.sweep_of(experiment).gap_after(experiment.scan.get_image_range()[1])

    # -- the operations that change images and blocks ----------------------------

    def exclude(self, images: dict[tuple[int, int], str], by: str, reflections=None, find_spots=None,
                status: str = BAD, min_block_images: int = 1):
        """Exclude images ((sweep, image) -> reason): (experiments, reflections).

        Blocks the exclusion makes shorter than `min_block_images` are dropped.
        With `reflections` (spots of the current blocks), the new blocks get
        their spots: an unchanged block keeps its own, a block that was cut gets
        spots found again by `find_spots(experiments) -> reflections` on the new
        block (DIALS joins spots across consecutive images, so spots touching an
        excluded image are not the spots of a run without it).  The table is in
        block order, ids renumbered: the table of one spot finding over the
        hand-excluded blocks.
        """
        before = {e.identifier for e in self.experiments()}
        for sweep in self.sweeps:
            mine = {n: r for (s, n), r in images.items() if s == sweep.number}
            for n in sweep._set_status(mine, status, by):
                logger.warning("Excluding %s: %s", self.image_name((sweep.number, n)), sweep.images[n].reason)
        self.drop_short_blocks(min_block_images, " after exclusions")
        experiments = self.experiments()
        if not len(experiments):
            raise GapfillError("no usable images left after excluding bad images: check the data")
        if reflections is None:
            return experiments, None
        new = ExperimentList([e for e in experiments if e.identifier not in before])
        fresh = find_spots(new) if len(new) else None
        return experiments, join_blocks([reflections] + ([fresh] if fresh is not None else []), experiments)

    def drop_block(self, experiment, reason: str, status_reason: str, stats=None) -> None:
        """Drop a whole block (e.g. it cannot be indexed): its images become
        'dropped' with `status_reason`, and the block is listed with `reason`."""
        sweep = self.sweep_of(experiment)
        first, last = experiment.scan.get_image_range()
        sweep._set_status({n: status_reason for n in range(first, last + 1)}, DROPPED, "auto")
        entry = {"first": first, "last": last, "reason": reason}
        if stats is not None:
            entry["stats"] = dict(stats)
        sweep.dropped_blocks.append(entry)

    def drop_short_blocks(self, min_images: int, why: str = "") -> list[dict]:
        """Drop blocks shorter than `min_images`; returns what was dropped."""
        dropped = []
        for sweep in self.sweeps:
            for first, last in sweep.blocks():
                if last - first + 1 >= min_images:
                    continue
                reason = f"block of {last - first + 1} images is shorter than gaps.min_block_images{why}"
                where = self.images_name(sweep.number, first, last)
                logger.warning("Dropping %s: %s", where, reason)
                sweep._set_status({n: "block too short" for n in range(first, last + 1)}, DROPPED, "auto")
                entry = {"first": first, "last": last, "reason": reason}
                sweep.dropped_blocks.append(entry)
                dropped.append(entry)
        return dropped


def spot_record(experiments, reflections, sweeps, spots_of_bad=None):
    """Strong spots per image (by centroid; zero for images of the blocks
    without any) and per block, as a Record.  Images found bad: their
    spots as counted before they were excluded (`spots_of_bad`, (sweep,
    image) -> n), else zero."""
    record = Record()
    names = block_names(experiments, sweeps)
    z = reflections["xyzobs.px.value"].parts()[2]
    ids = reflections["id"]
    for i, exp in enumerate(experiments):
        s = sweeps.sweep_of(exp).number
        first, last = exp.scan.get_image_range()
        counts = {n: 0 for n in range(first, last + 1)}
        for n in image_numbers_of_z(z.select(ids == i)):
            if n in counts:
                counts[n] += 1
        for n, c in counts.items():
            record.per_image[(s, n)] = {"spots": c}
        n_spots = int((ids == i).count(True))
        record.block(exp.identifier)["spots"] = n_spots
        spots_logger.info("%s: %d strong spots", names[exp.identifier], n_spots)
    for sweep in sweeps:
        for d in sweep.not_used():
            if d["status"] == BAD:
                key = (sweep.number, d["image"])
                record.per_image[key] = {"spots": (spots_of_bad or {}).get(key, 0)}
    return record


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
