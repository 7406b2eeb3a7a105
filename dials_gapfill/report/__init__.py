"""Reports of a run: the summary table, dials.process_gapped.json and the HTML report."""

from __future__ import annotations

import json
import logging
import math
import platform

from dials.algorithms.refinement.rotation_decomposition import (
    solve_r3_rotation_for_angles_given_axes,
)
from dials.algorithms.integration.report import flex_ios
from dials.array_family import flex
from dials.array_family.flex import Binner
from dials.util.version import dials_version
from scitbx import matrix

from dials_gapfill import __version__
from dials_gapfill.phil import working_text
from dials_gapfill.report.html import html_report
from dials_gapfill.model.tables import mean_cell

logger = logging.getLogger("dials.process_gapped.report")

LAYOUT_VERSION = 2


# dials.report's orientation decomposition axes (orientation_decomposition
# e1, e2, e3 defaults): the lab x, y and z axes
LAB_X, LAB_Y, LAB_Z = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)


def _orientation_angles(U, U_ref):
    """Rotation U U_ref^T as angles about the lab x, y, z axes (deg), decomposed
    as dials.report's ScanVaryingCrystalAnalyser does (R = Rz Ry Rx)."""
    R = matrix.sqr(U) * matrix.sqr(U_ref).transpose()
    z, y, x = solve_r3_rotation_for_angles_given_axes(R, LAB_Z, LAB_Y, LAB_X, deg=True)
    return [x, y, z]


def _scan_varying_plots(experiments, report):
    """Per block: cell and orientation at each scan point (image boundary).

    What dials.report's ScanVaryingCrystalAnalyser plots, but per block on one
    reference (the first block's first orientation, so that blocks line up
    across gaps), against image number, and with a scan-static block as one
    point; the analyser takes each crystal relative to its own static U and
    leaves static crystals out.
    """
    out = []
    U_ref = None
    for exp in experiments:
        c = exp.crystal
        first = exp.scan.get_image_range()[0]
        n = c.num_scan_points
        points = list(range(n)) if n else [0]
        Us = [c.get_U_at_scan_point(i) if n else c.get_U() for i in points]
        cells = [
            list(c.get_unit_cell_at_scan_point(i).parameters()) if n else list(c.get_unit_cell().parameters())
            for i in points
        ]
        if U_ref is None:
            U_ref = Us[0]
        out.append(
            {
                "block": report.block(exp.identifier).number,
                "image": [first + i for i in points],  # scan point i = start of image first + i
                "cell": cells,
                "orientation_deg": [_orientation_angles(U, U_ref) for U in Us],
            }
        )
    return out


def _isigi_vs_resolution(reflections, experiments, report, n_bins=10):
    """Mean I/sigma in shells of equal 1/d^2, per block.

    (DIALS' integration report bins each experiment on its own resolution
    shells; the plot compares blocks, so all share these shells.)"""

    if reflections is None or "intensity.sum.value" not in reflections:
        return None
    # integrated reflections only (a run stopped before integration holds
    # spot-finder intensities and unindexed rows)
    integrated = reflections.get_flags(reflections.flags.integrated_sum) | reflections.get_flags(
        reflections.flags.integrated_prf
    )
    r = reflections.select(integrated & (reflections["id"] >= 0))
    if len(r) == 0:
        return None
    if "d" not in r:
        r.compute_d(experiments)
    # profile-fitted where there is one, else summation
    prf = r.get_flags(r.flags.integrated_prf)
    isig = flex_ios(r["intensity.sum.value"], r["intensity.sum.variance"])
    if "intensity.prf.value" in r:
        isig.set_selected(prf, flex_ios(r["intensity.prf.value"], r["intensity.prf.variance"]).select(prf))
    variance = r["intensity.sum.variance"]
    if "intensity.prf.variance" in r:
        variance = flex.double(variance)
        variance.set_selected(prf, r["intensity.prf.variance"].select(prf))
    ok = variance > 0
    r, isig = r.select(ok), isig.select(ok)
    if len(r) == 0:
        return None
    s2 = 1.0 / flex.pow2(r["d"])
    lo, hi = flex.min(s2), flex.max(s2)
    width = (hi - lo) / n_bins
    # DIALS' binner: lower edges, the last shell open above (holds hi)
    binner = Binner(flex.double([lo + width * k for k in range(n_bins)]))
    result = {"d_centre": [1 / math.sqrt(lo + width * (k + 0.5)) for k in range(n_bins)], "blocks": {}}
    for i, exp in enumerate(experiments):
        mine = r["id"] == i
        indexer = binner.indexer(s2.select(mine))
        counts = indexer.sum(flex.bool(mine.count(True), True))
        means = indexer.mean(isig.select(mine))
        result["blocks"][str(report.block(exp.identifier).number)] = [
            float(m) if n else None for m, n in zip(means, counts)
        ]
    return result


def finalise(state) -> None:
    """Crystal numbers of the final models, per block and overall, and plot data."""

    report, experiments = state.report, state.experiments
    if experiments is None or not len(experiments) or experiments[0].crystal is None:
        return
    report.plots["scan_varying"] = _scan_varying_plots(experiments, report)
    if state.reflections is not None and "intensity.sum.value" in state.reflections:
        report.plots["isigi_vs_resolution"] = _isigi_vs_resolution(state.reflections, experiments, report)
    cells, weights = [], []
    for exp in experiments:
        block = report.block(exp.identifier)
        cell = mean_cell(exp.crystal)
        block.stats["unit_cell"] = cell
        if exp.crystal.num_scan_points:
            mid = exp.crystal.num_scan_points // 2
            block.stats["U_mid"] = list(exp.crystal.get_U_at_scan_point(mid))
        else:
            block.stats["U_mid"] = list(exp.crystal.get_U())
        cells.append(cell)
        weights.append(max(block.stats.get("integrated", 0), 1))
    total = sum(weights)
    mean = [sum(c[k] * w for c, w in zip(cells, weights)) / total for k in range(6)]
    # the esds of the one cell, from the refinement that determined it as one
    # (a mean of per-block esds would count the same spots several times)
    esd = report.crystal.get("cell_esd")
    report.crystal["final"] = {
        "unit_cell": mean,
        "unit_cell_esd": esd,
        "space_group": str(experiments[0].crystal.get_space_group().info()),
        "cell_spread": [max(c[k] for c in cells) - min(c[k] for c in cells) for k in range(6)],
        "n_crystal_models": len(experiments.crystals()),
    }


def _clean(value):
    """JSON-safe copy (NaN -> None, tuples -> lists)."""
    if isinstance(value, float):
        return None if (math.isnan(value) or math.isinf(value)) else value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def summary_dict(state, diff_phil: str = "") -> dict:
    """Everything of the summary, machine-readable (layout in README.md)."""

    report = state.report
    blocks = []
    for b in report.blocks:
        d = {k: v for k, v in b.as_dict().items() if k != "stats"}
        d.update(b.stats)
        blocks.append(d)
    per_image = sorted(report.per_image.items())
    excluded_images = {(e.get("sweep", 1), e["image"]) for e in report.excluded}
    try:
        working = state.params and working_text(state.params, state.images)
    except Exception:
        working = None
    return _clean(
        {
            "program": "dials.process_gapped",
            "layout_version": LAYOUT_VERSION,
            "versions": {
                "dials_gapfill": __version__,
                "dials": dials_version(),
                "python": platform.python_version(),
            },
            "parameters": {"modified": diff_phil, "working": working},
            "input": report.inputs,
            "sweeps": report.sweeps,
            "blocks": blocks,
            "dropped_blocks": report.dropped_blocks,
            "excluded_images": report.excluded,
            "crystal": report.crystal,
            "totals": {
                "blocks": len(report.blocks),
                "images_used": sum(b.n_images for b in report.blocks),
                "images_excluded": len(excluded_images),
                "spots": sum(b.stats.get("spots", 0) for b in report.blocks),
                "indexed": sum(b.stats.get("indexed", 0) for b in report.blocks),
                "integrated": sum(b.stats.get("integrated", 0) for b in report.blocks),
                "gap_edge": sum(b.stats.get("gap_edge", 0) for b in report.blocks),
                "gap_combined": sum(b.stats.get("gap_combined", 0) for b in report.blocks),
            },
            "per_image": {
                "sweep": [s for (s, _), _ in per_image],
                "image": [n for (_, n), _ in per_image],
                "spots": [d.get("spots") for _, d in per_image],
            },
            "scaling": report.scaling or None,
            "plots": report.plots,
            "files": report.files,
            "timing": {
                "total_seconds": report.inputs.get("total_seconds"),
                "stages": report.stages,
            },
            "warnings": report.warnings,
        }
    )


def write_reports(state, outputs, diff_phil: str = "") -> None:
    """dials.process_gapped.json and .html, through `outputs` (atomic)."""
    params = state.params
    out = params.output
    # the summary lists these files, so they are registered before being written
    if out.json:
        state.report.files.append({"name": out.json, "kind": "json summary"})
    if out.html:
        state.report.files.append({"name": out.html, "kind": "html report"})
    data = summary_dict(state, diff_phil)
    if out.json:

        def write_json(path):
            with open(path, "w") as fh:
                json.dump(data, fh, indent=1)

        outputs.write(out.json, write_json)
    if out.html:

        text = html_report(data)

        def write_html(path):
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)

        outputs.write(out.html, write_html)
