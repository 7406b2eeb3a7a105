"""Detector-checks stage: data sanity of the detector as it is, read on a few
of the images used (dials_gapfill.sanity.spot_warnings)."""

from __future__ import annotations

import logging

from dials_gapfill import sanity
from dials_gapfill.model.state import Record

logger = logging.getLogger("dials.process_gapped")


def run(state) -> Record:
    record = Record()
    for line in sanity.spot_warnings(state.experiments, state.reflections, state.params):
        logger.warning("Warning: %s", line)
        record.warn(line)
    return record
