"""Export stage: integrated.expt/.refl, one unmerged MTZ whose BATCH is the
image number (plus its sweep's offset when there are several sweeps), and
(optionally) one MTZ per block and, with several sweeps, one per sweep.

MTZ files are written by dials.export's own ``export_mtz`` (its mtz.* options).
dxtbx gives a block starting at image n a batch offset of n - 1 (DIALS relies
on it to slice image sets by array range), and export_mtz keeps distinct
offsets, so the later blocks' BATCH numbers would not be their image numbers
(blocks 1-40, 46-80, 84-120 come out as batches 1-40, 91-125, 167-203).  The
MTZ files are written from copies of the experiments whose offsets are all 0,
so export_mtz numbers batches by image number; the blocks of a sweep hold
different image numbers (a gap separates them, or a folder where the
sweep's files go on), so batches cannot collide.  Several sweeps overlap in image
numbers: each sweep's blocks take its offset (Sweeps.batch_offsets, DIALS'
rule: 1-15, 101-115, 201-215, ...).  A sweep with an image 0 takes offset 1
for all its blocks (MTZ batches start at 1; DIALS' own numbering would shift
only the block that starts at 0).  integrated.expt keeps dxtbx' offsets, so
DIALS programs can read and re-slice it as usual.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re

import iotbx.mtz
from dials.command_line.export import export_mtz as dials_export_mtz
from dials.command_line.export import phil_scope as export_phil
from dxtbx.model.experiment_list import ExperimentList

from dials_gapfill import dials_compat
from dials_gapfill.errors import GapfillError, one_line
from dials_gapfill.validate import numbered_pattern
from dials_gapfill.handlers.outputs import Outputs
from dials_gapfill.phil import defaults
from dials_gapfill.model.state import Record
from dials_gapfill.model.tables import keep_experiments

logger = logging.getLogger("dials.process_gapped.export")


def image_number_batches(experiments):
    """Copies of the experiments with zero batch offsets: BATCH = image number."""

    out = ExperimentList()
    for exp in experiments:
        new = copy.copy(exp)
        new.scan = copy.deepcopy(exp.scan)
        new.scan.set_batch_offset(0)
        out.append(new)
    return out


# dials.export's message when every reflection is filtered out
NOTHING_TO_WRITE = "All data has been filtered from the reflection table"


def write_mtz(reflections, experiments, params, path, intensity=None, offsets=None):
    """dials.export's MTZ export with the mtz.* options (`offsets`: the batch
    offset of each experiment, None: DIALS'); returns the number of
    reflections written."""
    ep = defaults(export_phil)
    for name in (n for n in vars(ep.mtz) if not n.startswith("_")):  # dials.export's mtz scope is ours
        setattr(ep.mtz, name, copy.deepcopy(getattr(params.mtz, name)))
    ep.mtz.hklout = path
    ep.intensity = list(intensity or params.mtz.intensity)
    if offsets:
        experiments, reflections, offsets = dials_compat.in_mtz_batch_order(experiments, reflections, offsets)
    try:
        with dials_compat.mtz_batch_offsets(offsets) if offsets else contextlib.nullcontext(), \
                dials_compat.crystals_differ_explained():
            dials_export_mtz(ep, dials_compat.models_to_export(experiments), [copy.deepcopy(reflections)])
    except (ValueError, AssertionError, RuntimeError) as e:
        raise GapfillError(
            f"MTZ export failed: {one_line(e, 200)}: check mtz.*"
        ) from None
    return iotbx.mtz.object(path).n_reflections()


def export(experiments, reflections, params, outputs, sweeps=None) -> Record:
    """Write the integrated data; what was written, as a Record."""
    record = Record()
    out = params.output
    mtz_experiments = image_number_batches(experiments)
    offsets = None
    if sweeps is not None:  # (one sweep: 0, or 1 where it has an image 0: MTZ batches start at 1)
        by_sweep = sweeps.batch_offsets()
        offsets = [by_sweep[sweeps.sweep_of(e).number] for e in experiments]
    files = record.files
    if out.experiments:
        outputs.write(out.experiments, lambda p: experiments.as_file(p))
        files.append({"name": out.experiments, "kind": "experiments", "blocks": len(experiments)})
    if out.reflections:
        outputs.write(out.reflections, lambda p: reflections.as_file(p))
        files.append({"name": out.reflections, "kind": "reflections", "reflections": len(reflections)})
    # blocks integrated by summation only (integration.small_blocks.profile=
    # summation) have no profile-fitted intensities while the others have:
    # with them, the combined MTZ holds summation intensities (DIALS' export
    # would otherwise drop every reflection that was not profile fitted)
    prf = reflections.get_flags(reflections.flags.integrated_prf)
    summation_blocks = [
        i + 1 for i in range(len(experiments))
        if (reflections["id"] == i).count(True) and not ((reflections["id"] == i) & prf).count(True)
    ]
    if len(summation_blocks) == len(experiments):  # no profile fitting at all
        summation_blocks = []
    combined_intensity = list(params.mtz.intensity)
    if summation_blocks and "profile" in combined_intensity:
        combined_intensity = ["sum"]
        msg = (
            f"block(s) {', '.join(map(str, summation_blocks))} integrated by summation only: "
            f"{out.mtz} holds summation intensities (per-block MTZ files keep profile-fitted ones)"
        )
        logger.warning(msg)
        record.warn(msg)
    if out.mtz:
        counts = {}
        outputs.write(
            out.mtz,
            lambda p: counts.setdefault("n", write_mtz(reflections, mtz_experiments, params, p, combined_intensity, offsets)),
        )
        files.append({"name": out.mtz, "kind": "mtz", "reflections": counts["n"], "blocks": len(experiments)})
        logger.info("Wrote %d reflections of %d blocks to %s", counts["n"], len(experiments), out.mtz)

    def write_part(name, what, blocks, kind):
        """The MTZ of some blocks (indices); its reflection count, or None
        where none passes dials.export's filters (said)."""
        sub, sub_expts = keep_experiments(reflections, mtz_experiments, {experiments[i].identifier for i in blocks})
        counts = {}
        mine = [offsets[i] for i in blocks] if offsets else None
        try:
            outputs.write(name, lambda p: counts.setdefault("n", write_mtz(sub, sub_expts, params, p, kind, mine)))
        except GapfillError as e:
            if NOTHING_TO_WRITE not in str(e):
                raise
            # a block of an image or two: most of its reflections are
            # partials below mtz.partiality_threshold; the combined MTZ has
            # what the block adds to reflections of the others
            outputs.discard(name)
            msg = (
                f"{what}: no reflection passes dials.export's filters "
                f"(mtz.partiality_threshold={params.mtz.partiality_threshold:g}, ...): {name} not written"
            )
            logger.warning("Warning: %s", msg)
            record.warn(msg)
            return None
        return counts["n"]

    if out.mtz and out.per_block_mtz and len(experiments) > 1:
        for i, exp in enumerate(experiments):
            number, (first, last) = i + 1, exp.scan.get_image_range()
            name = out.block_mtz.format(block=number, first=first, last=last)
            kind = ["sum"] if number in summation_blocks else None
            n = write_part(name, f"block {number} (images {first}-{last})", [i], kind)
            if n is not None:
                files.append({"name": name, "kind": "block mtz", "block": number, "reflections": n})
    if out.mtz and out.per_sweep_mtz and sweeps is not None and len(sweeps) > 1:
        for sweep in sweeps:
            mine = [i for i, e in enumerate(experiments) if sweeps.sweep_of(e).number == sweep.number]
            if not mine:  # a sweep left without blocks
                continue
            first, last = sweep.image_range
            name = out.sweep_mtz.format(sweep=sweep.number, first=first, last=last)
            summation = any(i + 1 in summation_blocks for i in mine) and "profile" in params.mtz.intensity
            n = write_part(name, f"sweep {sweep.number}", mine, ["sum"] if summation else None)
            if n is not None:
                files.append({"name": name, "kind": "sweep mtz", "sweep": sweep.number, "reflections": n})
    if out.mtz:
        # an earlier run's block and sweep MTZs in this folder that this run
        # does not write (it had more blocks or sweeps, or this run writes
        # none beside its MTZ) go at commit: the folder then shows only this
        # run's
        written = {f["name"] for f in files}
        # (and those an earlier failed run kept beside earlier results)
        numbered = [p for p in (out.block_mtz, out.sweep_mtz) if p]
        for pattern in numbered + [Outputs.failed_name(p) for p in numbered]:
            for name in earlier_numbered(outputs.directory, pattern):
                if name not in written:
                    outputs.discard(name)
    return record


def earlier_numbered(directory, numbered) -> list[str]:
    """Names of the files in `directory` that a numbered name (a format with
    fields such as {block}, {sweep}, {first}, {last}: output.block_mtz,
    output.sweep_mtz) could have given."""
    pattern = numbered_pattern(numbered)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(n for n in names if re.fullmatch(pattern, n))


def run(state) -> Record | None:
    if state.outputs is None:
        return None
    return export(state.experiments, state.reflections, state.params, state.outputs, state.sweeps)
