"""The xia2-style summary: a table per block, then the overall numbers."""

from __future__ import annotations

import math

from dials.util import tabulate

from dials_gapfill.report.merging import merging_table
from dials_gapfill.util import esd_decimals, has_esd, range_text


def _f(v, fmt):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt)


def cell_text(cell, esd=None) -> str:
    """'54.0122(0.0050)  62.0159(0.0068) ...': each value with its esd (digits
    enough for the esd's first significant one), or alone."""
    esd = list(esd or []) + [None] * 6
    return "  ".join(f"{v:.{esd_decimals(e)}f}({e:.{esd_decimals(e)}f})" if has_esd(e) else f"{v:.4f}"
                     for v, e in zip(cell, esd))


def block_rows(report):
    several = len(report.sweeps) > 1
    rows = []
    for b in report.blocks:
        s = b.stats
        rmsd = s.get("rmsd_scan_varying") or s.get("rmsd_static") or {}
        frac = s.get("indexed_fraction")
        rows.append(
            [
                b.number,
                b.label,
                f"{b.phi_start:.1f} to {b.phi_end:.1f}",
                s.get("spots", "-"),
                _f(100 * frac if frac is not None else None, ".1f"),
                _f(rmsd.get("x"), ".3f"),
                _f(rmsd.get("y"), ".3f"),
                _f(rmsd.get("phi"), ".3f"),
                s.get("integrated", "-"),
                s.get("gap_edge", "-"),
                _f(s.get("mean_isigi"), ".1f"),
            ]
        )
        if several:
            rows[-1].insert(0, b.sweep)
    return rows


BLOCK_HEADER = [
    "block", "images", "phi (deg)", "spots", "% indexed",
    "RMSD x (px)", "RMSD y (px)", "RMSD phi (img)", "integrated", "cut by gap", "<I/sig>",
]


def _batches(report, sweep) -> str:
    """The MTZ batches of a sweep's blocks (image number + its offset)."""
    numbers = {n + sweep["batch_offset"] for b in report.blocks if b.sweep == sweep["number"]
               for n in range(b.first, b.last + 1)}
    return range_text(numbers) if numbers else "-"


def summary_text(report, directory=None) -> str:
    several = len(report.sweeps) > 1
    lines = ["", "=" * 30 + " dials.process_gapped summary " + "=" * 30, ""]
    if several:
        lines.append(tabulate(
            [[s["number"], s["template"], f"{s['image_range'][0]}-{s['image_range'][1]}", s["n_blocks"],
              s["goniometer"], _batches(report, s)]
             for s in report.sweeps],
            ["sweep", "template", "images", "blocks", "goniometer", "MTZ batches"],
        ))
        lines.append("")
    lines.append(tabulate(block_rows(report), (["sweep"] if several else []) + BLOCK_HEADER))
    lines.append("")
    c = report.crystal.get("final") or {}
    if c:
        cell = c.get("unit_cell", [])
        esd = c.get("unit_cell_esd") or [None] * 6
        lines.append(f"Unit cell:     {cell_text(cell, esd)}")
        lines.append(f"Space group:   {c.get('space_group', '-')}")
        if c.get("cell_spread") is not None:
            lines.append(
                "Cell spread across blocks (max - min, A / deg): "
                + " ".join(f"{v:.4f}" for v in c["cell_spread"])
            )
    n_images = sum(b.n_images for b in report.blocks)
    if several:
        of = f"{len(report.sweeps)} sweeps"
    else:
        first, last = report.inputs.get("image_range", ["?", "?"])
        of = f"{first}-{last}"
    lines.append(f"Blocks:        {len(report.blocks)} ({n_images} images used of {of})")
    if not several and report.sweeps and report.sweeps[0].get("batch_offset"):
        offset = report.sweeps[0]["batch_offset"]
        lines.append(f"MTZ batches:   {_batches(report, report.sweeps[0])} (image number + {offset}: "
                     "MTZ batches start at 1)")
    lines.append(
        "Totals:        "
        f"{sum(b.stats.get('spots', 0) for b in report.blocks)} strong spots, "
        f"{sum(b.stats.get('indexed', 0) for b in report.blocks)} indexed, "
        f"{sum(b.stats.get('integrated', 0) for b in report.blocks)} integrated"
    )
    if report.excluded:
        lines.append("Images not used:")
        for sweep in sorted({e.get("sweep", 1) for e in report.excluded}):
            by_reason = {}
            for e in report.excluded:
                if e.get("sweep", 1) == sweep:
                    by_reason.setdefault(e["reason"], []).append(e["image"])
            where = f"sweep {sweep}: " if several else ""
            for reason, images in by_reason.items():
                lines.append(f"  {where}{range_text(images)}: {reason}")
    for d in report.dropped_blocks:
        where = f" of sweep {d.get('sweep', 1)}" if several else ""
        lines.append(f"Dropped block {d['first']}-{d['last']}{where}: {d['reason']}")
    if report.scaling:
        lines.append("")
        scaled = report.scaling
        if scaled.get("unit_cell"):
            # the setting of the scaled and merged data (and the SHELX files)
            sym = scaled.get("symmetry") or {}
            how = ", ".join([sym.get("space_group", "?")] + ([f"reindexed {sym['cb_op']}"] if sym.get("cb_op") else []))
            lines.append(f"Unit cell as scaled ({how}): {cell_text(scaled['unit_cell'], scaled.get('unit_cell_esd'))}")
        lines.append(merging_table(report.scaling))
    if report.warnings:
        lines.append("Warnings:")
        lines.extend(f"  {w}" for w in report.warnings)
    if report.files:
        where = f" (in {directory})" if directory else ""
        lines.append(f"Files written{where}:")
        for f in report.files:
            extra = f", {f['reflections']} reflections" if "reflections" in f else ""
            lines.append(f"  {f['name']}  ({f['kind']}{extra})")
    times = ", ".join(f"{s['name']} {s['seconds']:.1f} s" for s in report.stages)
    if times:
        lines.append(f"Time:          {report.inputs.get('total_seconds', 0):.1f} s ({times})")
    return "\n".join(lines)
