"""The xia2-style merging-statistics table."""

from __future__ import annotations

ROWS = [
    ("High resolution limit", "d_min", "{:.2f}"),
    ("Low resolution limit", "d_max", "{:.2f}"),
    ("Completeness (%)", "completeness", "{:.1f}"),
    ("Multiplicity", "multiplicity", "{:.2f}"),
    ("I/sigma", "i_over_sigma", "{:.1f}"),
    ("CC half", "cc_half", "{:.4f}"),
    ("Rmerge(I)", "r_merge", "{:.3f}"),
    ("Rmeas(I)", "r_meas", "{:.3f}"),
    ("Rpim(I)", "r_pim", "{:.3f}"),
    ("Total observations", "n_obs", "{:.0f}"),
    ("Total unique", "n_unique", "{:.0f}"),
    ("Anomalous completeness (%)", "anomalous_completeness", "{:.1f}"),
    ("Anomalous multiplicity", "anomalous_multiplicity", "{:.2f}"),
]


def merging_table(scaling: dict) -> str:
    sym = scaling.get("symmetry", {})
    lines = [f"Merging statistics (space group {sym.get('space_group', '?')}):"]
    lines.append(f"{'':32s}{'Overall':>10s}{'Low':>10s}{'High':>10s}")
    for label, key, fmt in ROWS:
        values = scaling.get(key)
        if not values:
            continue
        cells = []
        for v in values:
            try:
                cells.append(fmt.format(v) if v is not None else "-")
            except (ValueError, TypeError):
                cells.append(str(v))
        lines.append(f"{label:32s}" + "".join(f"{c:>10s}" for c in cells))
    resolution = scaling.get("resolution") or {}
    if resolution.get("message"):
        lines.append(f"Resolution limit: {resolution['message']}")
    return "\n".join(lines)
