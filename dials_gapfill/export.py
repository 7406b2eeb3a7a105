"""Export stage: integrated.expt/.refl, one unmerged MTZ with BATCH equal to
the image number, and (optionally) one MTZ per block.

MTZ files are written by DIALS' own ``dials.util.export_mtz.export_mtz``.
dxtbx gives a block starting at image n a batch offset of n - 1 (so that it
can slice image sets by array index), and export_mtz keeps distinct offsets,
so the later blocks' BATCH numbers would not be their image numbers (blocks
1-40, 46-80, 84-120 come out as batches 1-40, 91-125, 167-203).  Setting
every offset to 0 lets export_mtz number batches by image number; blocks
never touch (a gap separates them), so batches cannot collide.  The offsets
are zero in integrated.expt too, so ``dials.scale`` keeps the numbering.
"""

from __future__ import annotations

import copy
import logging

from dials_gapfill.errors import GapfillError

logger = logging.getLogger("dials.process_gapped.export")


def image_number_batches(experiments) -> None:
    """BATCH = image number: zero batch offsets (blocks are separated by gaps)."""
    for exp in experiments:
        exp.scan.set_batch_offset(0)


def write_mtz(reflections, experiments, params, path):
    """DIALS' export_mtz with the mtz.* options; returns the number of reflections."""
    from dials.util.export_mtz import export_mtz

    m = params.mtz
    try:
        mtz = export_mtz(
            copy.deepcopy(reflections),
            experiments,
            intensity_choice=list(m.intensity),
            filename=path,
            best_unit_cell=m.best_unit_cell,
            partiality_threshold=m.partiality_threshold,
            combine_partials=m.combine_partials,
            min_isigi=m.min_isigi,
            filter_ice_rings=m.filter_ice_rings,
            d_min=m.d_min,
            force_static_model=m.force_static_model,
            crystal_name=m.crystal_name,
            project_name=m.project_name,
        )
    except (ValueError, AssertionError, RuntimeError) as e:
        raise GapfillError(
            f"MTZ export failed: {' '.join(str(e).split())[:200]}: check mtz.*"
        ) from None
    return mtz.n_reflections()


def export(experiments, reflections, params, report, outputs):
    from dials_gapfill.tables import keep_experiments

    out = params.output
    image_number_batches(experiments)
    files = report.files
    if out.experiments:
        outputs.write(out.experiments, lambda p: experiments.as_file(p))
        files.append({"name": out.experiments, "kind": "experiments", "blocks": len(experiments)})
    if out.reflections:
        outputs.write(out.reflections, lambda p: reflections.as_file(p))
        files.append({"name": out.reflections, "kind": "reflections", "reflections": len(reflections)})
    if out.mtz:
        counts = {}
        outputs.write(out.mtz, lambda p: counts.setdefault("n", write_mtz(reflections, experiments, params, p)))
        files.append({"name": out.mtz, "kind": "mtz", "reflections": counts["n"], "blocks": len(experiments)})
        logger.info("Wrote %d reflections of %d blocks to %s", counts["n"], len(experiments), out.mtz)
    if out.mtz and out.per_block_mtz and len(experiments) > 1:
        for i, exp in enumerate(experiments):
            block = report.block(exp.identifier)
            name = out.block_mtz.format(block=block.number, first=block.first, last=block.last)
            sub, sub_expts = keep_experiments(reflections, experiments, {exp.identifier})
            counts = {}
            outputs.write(name, lambda p: counts.setdefault("n", write_mtz(sub, sub_expts, params, p)))
            files.append(
                {"name": name, "kind": "block mtz", "block": block.number, "reflections": counts["n"]}
            )
