"""The state the pipeline's stages share: models, reflections and the report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Block:
    """One contiguous run of images: one experiment (one ImageSequence + Scan)."""

    number: int  # 1, 2, ... in image order
    first: int  # first image number (as in the file names)
    last: int
    phi_start: float
    phi_end: float
    identifier: str = ""
    stats: dict = field(default_factory=dict)  # filled by the stages

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


class Record:
    """What a stage found: statistics per block (by identifier) and about the
    crystal, for the pipeline to put into the report."""

    def __init__(self, experiments):
        self._names = {
            e.identifier: "Block %d (images %d-%d)" % (i, *e.scan.get_image_range())
            for i, e in enumerate(experiments, start=1)
        }
        self.blocks: dict[str, dict] = {}
        self.crystal: dict = {}

    def block(self, identifier: str) -> dict:
        return self.blocks.setdefault(identifier, {})

    def name(self, identifier: str) -> str:
        return self._names[identifier]


def blocks_of(experiments, previous=()):
    """Block records (numbered 1..n in image order) of an experiment list;
    a block already in `previous` (same identifier) keeps its statistics."""
    known = {b.identifier: b for b in previous}
    blocks = []
    for i, exp in enumerate(experiments, start=1):
        first, last = exp.scan.get_image_range()
        phi0, phi1 = exp.scan.get_oscillation_range()
        old = known.get(exp.identifier)
        blocks.append(
            Block(number=i, first=first, last=last, phi_start=phi0, phi_end=phi1,
                  identifier=exp.identifier, stats=old.stats if old else {})
        )
    return blocks


@dataclass
class Report:
    """Everything the summary, the JSON and the HTML report show."""

    inputs: dict = field(default_factory=dict)
    blocks: list = field(default_factory=list)  # Block, in image order
    dropped_blocks: list = field(default_factory=list)  # dicts: block, reason
    excluded: list = field(default_factory=list)  # dicts: image, status, reason, by (from the sweep)
    stages: list = field(default_factory=list)  # dicts: name, seconds, ...
    warnings: list = field(default_factory=list)
    crystal: dict = field(default_factory=dict)
    per_image: dict = field(default_factory=dict)  # image number -> dict
    scaling: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    plots: dict = field(default_factory=dict)  # data for the HTML report

    def sync(self, sweep, experiments) -> None:
        """Blocks and images not used, as the sweep has them now."""
        self.blocks = blocks_of(experiments, self.blocks)
        self.excluded = sweep.not_used()
        self.dropped_blocks = list(sweep.dropped_blocks)

    def add(self, record) -> None:
        """A stage's Record: its block statistics and crystal entries."""
        for identifier, stats in record.blocks.items():
            self.block(identifier).stats.update(stats)
        self.crystal.update(record.crystal)

    def block(self, identifier: str) -> Block:
        for b in self.blocks:
            if b.identifier == identifier:
                return b
        raise KeyError(identifier)


@dataclass
class State:
    """What flows through the pipeline."""

    params: Any
    images: list = field(default_factory=list)  # command-line image arguments
    sweep: Any = None  # dials_gapfill.model.sweep.Sweep: images, blocks, exclusions
    experiments: Any = None  # dxtbx ExperimentList, one experiment per block
    reflections: Any = None  # the current dials reflection table
    report: Report = field(default_factory=Report)
    scaled: Any = None  # (experiments, reflections) after optional scaling
    outputs: Any = None  # dials_gapfill.handlers.outputs.Outputs, or None: write nothing
