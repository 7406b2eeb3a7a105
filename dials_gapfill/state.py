"""The state the pipeline's stages share: models, reflections and the report."""

from __future__ import annotations

import contextlib
import dataclasses
import time
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


@dataclass
class Report:
    """Everything the summary, the JSON and the HTML report show."""

    inputs: dict = field(default_factory=dict)
    blocks: list = field(default_factory=list)  # Block, in image order
    dropped_blocks: list = field(default_factory=list)  # dicts: block, reason
    excluded: list = field(default_factory=list)  # dicts: image, reason, by
    stages: list = field(default_factory=list)  # dicts: name, seconds, ...
    warnings: list = field(default_factory=list)
    crystal: dict = field(default_factory=dict)
    per_image: dict = field(default_factory=dict)  # image number -> dict
    scaling: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    plots: dict = field(default_factory=dict)  # data for the HTML report
    dials_seconds: float = 0.0  # wall time inside DIALS calls

    @contextlib.contextmanager
    def in_dials(self):
        """Account the wall time of a DIALS call (for the performance report)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.dials_seconds += time.perf_counter() - t0

    def exclude(self, image: int, reason: str, by: str) -> None:
        if not any(e["image"] == image for e in self.excluded):
            self.excluded.append({"image": int(image), "reason": reason, "by": by})
            self.excluded.sort(key=lambda e: e["image"])

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
    experiments: Any = None  # dxtbx ExperimentList, one experiment per block
    reflections: Any = None  # the current dials reflection table
    report: Report = field(default_factory=Report)
    scaled: Any = None  # (experiments, reflections) after optional scaling
    outputs: Any = None  # dials_gapfill.output.Outputs, or None: write nothing
