"""Reports of a run: the summary table, dials.process_gapped.json and the HTML report."""

from __future__ import annotations

import json
import logging
import math
import platform

logger = logging.getLogger("dials.process_gapped.report")

LAYOUT_VERSION = 1


def _mean_cell(crystal):
    """Unit cell of a crystal: the mean over its scan points, if it has them."""
    n = crystal.num_scan_points
    if n == 0:
        return list(crystal.get_unit_cell().parameters())
    cells = [crystal.get_unit_cell_at_scan_point(i).parameters() for i in range(n)]
    return [sum(c[k] for c in cells) / n for k in range(6)]


def finalise(state) -> None:
    """Crystal numbers of the final models, per block and overall."""
    report, experiments = state.report, state.experiments
    if experiments is None or not len(experiments) or experiments[0].crystal is None:
        return
    cells, weights = [], []
    for exp in experiments:
        block = report.block(exp.identifier)
        cell = _mean_cell(exp.crystal)
        block.stats["unit_cell"] = cell
        try:
            esd = list(exp.crystal.get_cell_parameter_sd())
        except Exception:
            esd = []
        block.stats["unit_cell_esd"] = esd if any(esd) else None
        if exp.crystal.num_scan_points:
            mid = exp.crystal.num_scan_points // 2
            block.stats["U_mid"] = list(exp.crystal.get_U_at_scan_point(mid))
        else:
            block.stats["U_mid"] = list(exp.crystal.get_U())
        cells.append(cell)
        weights.append(max(block.stats.get("integrated", 0), 1))
    total = sum(weights)
    mean = [sum(c[k] * w for c, w in zip(cells, weights)) / total for k in range(6)]
    esds = [b.stats.get("unit_cell_esd") for b in report.blocks if b.stats.get("unit_cell_esd")]
    esd = [max(e[k] for e in esds) for k in range(6)] if esds else None
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
    from dials.util.version import dials_version

    from dials_gapfill import __version__

    report = state.report
    blocks = []
    for b in report.blocks:
        d = {k: v for k, v in b.as_dict().items() if k != "stats"}
        d.update(b.stats)
        blocks.append(d)
    per_image = sorted(report.per_image.items())
    excluded_images = {e["image"] for e in report.excluded}
    try:
        working = state.params and _working_phil_text(state.params)
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
            },
            "per_image": {
                "image": [n for n, _ in per_image],
                "spots": [d.get("spots") for _, d in per_image],
            },
            "scaling": report.scaling or None,
            "files": report.files,
            "timing": {
                "total_seconds": report.inputs.get("total_seconds"),
                "stages": report.stages,
            },
            "warnings": report.warnings,
        }
    )


def _working_phil_text(params) -> str:
    from dials_gapfill.phil import master_phil

    return master_phil().format(python_object=params).as_str()


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
        from dials_gapfill.report.html import html_report

        text = html_report(data)

        def write_html(path):
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)

        outputs.write(out.html, write_html)
