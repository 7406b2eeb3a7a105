"""The merging-statistics table (overall, inner shell, outer shell): the
numbers of dials.scale's summary table (dials.report.analysis.table_1_stats),
printed by DIALS' format_statistics."""

from __future__ import annotations

from dials.report.analysis import format_statistics

# The summary's keys (scaling.<key>: [overall, inner shell, outer shell]) and
# DIALS' labels for them (table_1_stats, format_statistics), in table order.
LABELS = {
    "d_min": "High resolution limit",
    "d_max": "Low resolution limit",
    "completeness": "Completeness",
    "multiplicity": "Multiplicity",
    "i_over_sigma": "I/sigma",
    "cc_half": "CC half",
    "r_merge": "Rmerge(I)",
    "r_meas": "Rmeas(I)",
    "r_pim": "Rpim(I)",
    "n_obs": "Total observations",
    "n_unique": "Total unique",
    "anomalous_completeness": "Anomalous completeness",
    "anomalous_multiplicity": "Anomalous multiplicity",
}


def merging_table(scaling: dict) -> str:
    """DIALS' table of scaling (the summary's dict); undefined values blank."""
    sym = scaling.get("symmetry", {})
    stats = {label: scaling[key] for key, label in LABELS.items() if scaling.get(key)}
    model = (scaling.get("model") or {}).get("used")
    caption = f"space group {sym.get('space_group', '?')}" + (f", scaling model {model}" if model else "")
    title = f"Merging statistics ({caption}):"
    # DIALS pads the caption to its first column (44 characters): a longer one
    # goes on its own line, so that the column headings stay over their numbers
    text = format_statistics(stats, caption=title) if len(title) <= 44 else title + "\n" + format_statistics(stats)
    resolution = scaling.get("resolution") or {}
    if resolution.get("message"):
        text += f"Resolution limit: {resolution['message']}"
    return text.rstrip("\n")
