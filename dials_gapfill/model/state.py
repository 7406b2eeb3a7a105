"""What the pipeline's stages share: the state that flows through them, the
record each stage returns, and the report the pipeline builds from them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Block:
    """One contiguous run of images: one experiment (one ImageSequence + Scan)."""

    number: int  # 1, 2, ... in run order (sweep by sweep, image order within)
    first: int  # first image number (as in the file names)
    last: int
    phi_start: float
    phi_end: float
    identifier: str = ""
    sweep: int = 1
    stats: dict = field(default_factory=dict)  # from the stages' records

    @property
    def n_images(self) -> int:
        return self.last - self.first + 1

    @property
    def label(self) -> str:
        return f"{self.first}-{self.last}"

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["n_images"] = self.n_images
        return d


def block_names(experiments, sweeps=None) -> dict[str, str]:
    """identifier -> 'Block k (images a-b)', for log messages; 'Block k
    (images a-b of sweep s)' when `sweeps` (the run's Sweeps) holds several."""

    def where(e):
        first, last = e.scan.get_image_range()
        if sweeps is None or len(sweeps) == 1:  # (a single sweep's blocks need not be looked up)
            return f"images {first}-{last}"
        return sweeps.images_name(sweeps.sweep_of(e).number, first, last)

    return {e.identifier: f"Block {i} ({where(e)})" for i, e in enumerate(experiments, start=1)}


@dataclass
class Record:
    """What a stage found, for the pipeline to merge into the report: the one
    way a stage reports."""

    blocks: dict = field(default_factory=dict)  # identifier -> statistics
    crystal: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    per_image: dict = field(default_factory=dict)  # (sweep, image) -> dict
    files: list = field(default_factory=list)  # dicts: name, kind, ...
    scaling: dict = field(default_factory=dict)
    plots: dict = field(default_factory=dict)

    def block(self, identifier: str) -> dict:
        return self.blocks.setdefault(identifier, {})

    def warn(self, line: str) -> None:
        if line not in self.warnings:
            self.warnings.append(line)


def blocks_of(experiments, sweeps, previous=()):
    """Block records (numbered 1..n in run order) of an experiment list;
    a block already in `previous` (same identifier) keeps its statistics."""
    known = {b.identifier: b for b in previous}
    blocks = []
    for i, exp in enumerate(experiments, start=1):
        first, last = exp.scan.get_image_range()
        # (rounded: a start plus n widths in binary is 20.000000000000004)
        phi0, phi1 = (round(v, 9) for v in exp.scan.get_oscillation_range())
        old = known.get(exp.identifier)
        blocks.append(
            Block(number=i, first=first, last=last, phi_start=phi0, phi_end=phi1,
                  identifier=exp.identifier, sweep=sweeps.sweep_of(exp).number if sweeps else 1,
                  stats=old.stats if old else {})
        )
    return blocks


# warnings of checks that run again on more data (sanity.py: after refinement,
# then after integration)
REPEATED_CHECKS = ("stills posing as rotation data?",)


@dataclass
class Report:
    """Everything the summary, the JSON and the HTML report show.

    Written only by the pipeline: the stages' records are merged in
    (``merge``), the blocks and images not used come from the sweeps
    (``sync``)."""

    inputs: dict = field(default_factory=dict)
    sweeps: list = field(default_factory=list)  # dicts: number, template, image_range, ...
    blocks: list = field(default_factory=list)  # Block, in run order
    dropped_blocks: list = field(default_factory=list)  # dicts: first, last, reason
    excluded: list = field(default_factory=list)  # dicts: image, status, reason, by
    stages: list = field(default_factory=list)  # dicts: name, seconds
    warnings: list = field(default_factory=list)
    crystal: dict = field(default_factory=dict)
    per_image: dict = field(default_factory=dict)  # (sweep, image) -> dict
    scaling: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    plots: dict = field(default_factory=dict)  # data for the HTML report

    def sync(self, sweeps, experiments) -> None:
        """Blocks and images not used, as the sweeps have them now."""
        if sweeps is None:
            return
        if experiments is not None:
            self.blocks = blocks_of(experiments, sweeps, self.blocks)
        offsets = sweeps.batch_offsets()
        self.sweeps = [s.describe(offsets[s.number]) for s in sweeps]
        self.excluded = sweeps.not_used()
        self.dropped_blocks = sweeps.dropped_blocks

    def merge(self, record: Record | None) -> None:
        """A stage's record."""
        if record is None:
            return
        for identifier, stats in record.blocks.items():
            block = self.find_block(identifier)
            if block is not None:
                block.stats.update(stats)
        self.crystal.update(record.crystal)
        for line in record.warnings:
            if line in self.warnings:
                continue
            # a check run again later on more data ("stills posing as rotation
            # data?" after refinement, then after integration): its later word
            # stands in the earlier's place (the log keeps both)
            topic = next((t for t in REPEATED_CHECKS if line.startswith(t)), None)
            earlier = [k for k, w in enumerate(self.warnings) if topic and w.startswith(topic)]
            if earlier:
                self.warnings[earlier[0]] = line
            else:
                self.warnings.append(line)
        self.inputs.update(record.inputs)
        for key, values in record.per_image.items():
            self.per_image.setdefault(key, {}).update(values)
        self.files.extend(record.files)
        self.scaling.update(record.scaling)
        self.plots.update(record.plots)

    def find_block(self, identifier: str) -> Block | None:
        return next((b for b in self.blocks if b.identifier == identifier), None)

    def block(self, identifier: str) -> Block:
        block = self.find_block(identifier)
        if block is None:
            raise KeyError(identifier)
        return block


@dataclass
class State:
    """What flows through the pipeline."""

    params: Any
    images: list = field(default_factory=list)  # command-line image arguments
    sweeps: Any = None  # dials_gapfill.model.sweep.Sweeps: images, blocks, exclusions
    experiments: Any = None  # dxtbx ExperimentList, one experiment per block
    reflections: Any = None  # the current dials reflection table
    crystal_model: Any = None  # dials_gapfill.crystal_model.CrystalModel, chosen at indexing
    find_spots: Any = None  # experiments -> strong spots (set by spot finding; cut blocks need it)
    report: Report = field(default_factory=Report)
    scaled: Any = None  # (experiments, reflections) after optional scaling
    outputs: Any = None  # dials_gapfill.handlers.outputs.Outputs, or None: write nothing
