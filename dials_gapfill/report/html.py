"""Self-contained HTML report of dials.process_gapped.

html_report(data) turns the machine-readable summary of a run (the contents of
dials.process_gapped.json, made by dials_gapfill.report.summary_dict) into one
HTML page: the table of the blocks, the crystal, the merging statistics and the
bookkeeping of the run (images not used, files, timing, versions), and plotly
plots of the strong spots over the whole sweep, the RMSDs, the crystal model
along the rotation and <I/sigma> against resolution.

The page is rendered from the jinja2 templates in templates/ with autoescape
on, so every text taken from the summary is escaped by jinja2. This module
only prepares the values: plain numbers and texts for the tables, and the plots
as plain plotly figure dicts, which the page hands to Plotly.newPlot as JSON
(jinja2's tojson, safe inside a <script> element).

plotly.js is embedded once, so that the page needs no network access. It is
the minified bundle of plotly.js 2.6.3 (npm package plotly.js-dist-min, MIT
licence in templates/plotly-LICENSE.txt; the plotly.js version Debian's
python3-plotly 5.4 ships), stored gzipped: the copy that plotly's Python
package returns on Debian (plotly.offline.get_plotlyjs()) is the unminified
build, 8.7 MB, which made every page at least that large.

Any part of the summary may be missing (a run that failed to scale, a single
block, no plot data): the page then shows a note instead of the plot or table.

A summary may describe several sweeps of one crystal (top-level "sweeps", and
a "sweep" number on blocks, images not used and per-image counts, where image
numbers repeat between sweeps). With more than one sweep, the blocks, the
images not used and the strong spots are shown sweep by sweep, and the plots
of the crystal model run over batch numbers (image number + the sweep's batch
offset); with one sweep the page is the page of a single-sweep run.
"""

from __future__ import annotations

import collections
import functools
import gzip
import json
import math
import re
from importlib import resources

import jinja2
from dials.report.analysis import formats as DIALS_FORMATS
from markupsafe import Markup, escape

from dials_gapfill.report.merging import LABELS as MERGING_LABELS
from dials_gapfill.util import range_text as compact_ranges
from dials_gapfill.util import runs as _runs
from dials_gapfill.util import esd_decimals, has_esd

# Colours of the blocks, the same in every plot (no grey, red or purple: those
# are the colours of the images not used).
BLOCK_COLOURS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#8c564b", "#e377c2",
    "#bcbd22", "#17becf", "#393b79", "#e7ba52", "#637939",
]

# With more blocks than this, the blocks are not listed in the plot legends
# (the colours repeat; hovering names the block).
MAX_LEGEND_BLOCKS = 10

# Categories of images that were not used: key, legend label, colour, bar
# pattern. Each status of an image (dials_gapfill.model.sweep) has its own.
CATEGORIES = [
    ("missing", "missing file", "#7f7f7f", ""),
    ("not-given", "not given (the file exists)", "#b8b8b8", "."),
    ("user", "excluded by user", "#9467bd", ""),
    ("auto", "bad image (found automatically)", "#d62728", ""),
    ("dropped", "dropped block", "#2f4f4f", "/"),
]
_CATEGORY = {key: (label, colour, pattern) for key, label, colour, pattern in CATEGORIES}
_ORDER = {key: i for i, (key, _, _, _) in enumerate(CATEGORIES)}

# The status of an image not used (sweep.py) -> its category.
STATUS_CATEGORY = {
    "missing file": "missing",
    "not given": "not-given",
    "excluded": "user",
    "bad": "auto",
    "dropped": "dropped",
}

CELL_LABELS = ["a (Å)", "b (Å)", "c (Å)", "α (°)", "β (°)", "γ (°)"]
ANGLE_LABELS = ["about x (°)", "about y (°)", "about z (°)"]

# The plots, in page order: element id and heading.
PLOTS = [
    ("plot-spots", "Strong spots per image"),
    ("plot-rmsd", "RMSDs per block"),
    ("plot-cell", "Scan-varying unit cell"),
    ("plot-orientation", "Scan-varying crystal orientation"),
    ("plot-isigi", "<I/σ(I)> against resolution"),
]

# Headings of the crystal-model plots when every block has a static model.
STATIC_TITLES = {
    "plot-cell": "Unit cell per block (static crystal models)",
    "plot-orientation": "Crystal orientation per block (static crystal models)",
}

CAPTIONS = {
    "plot-spots": (
        "Strong spots found on each image over the whole sweep. Shaded: images not used "
        "(hover for the reason); dashed lines: block boundaries."
    ),
    "plot-rmsd": "Positional RMSDs of the refined models of each block, static and scan-varying.",
    "plot-cell": (
        "Unit cell of the scan-varying crystal model at each image boundary, one line per "
        "block; shaded: images not used."
    ),
    "plot-orientation": (
        "Rotation of the crystal relative to the start of the first block, as angles about "
        "the laboratory x, y and z axes."
    ),
    "plot-isigi": "Mean I/σ(I) of the integrated reflections in shells of equal 1/d², per block.",
}

NO_PLOT = {
    "plot-spots": "No per-image spot counts in the summary.",
    "plot-rmsd": "No refinement RMSDs in the summary.",
    "plot-cell": "No scan-varying crystal model in the summary.",
    "plot-orientation": "No scan-varying crystal model in the summary.",
    "plot-isigi": "No integrated intensities in the summary.",
}

NAV = [
    ("summary", "Summary"), ("blocks", "Blocks"), ("merging", "Merging"),
    ("section-plot-spots", "Spots"), ("section-plot-rmsd", "RMSDs"),
    ("section-plot-cell", "Cell"), ("section-plot-orientation", "Orientation"),
    ("section-plot-isigi", "I/σ"), ("run", "Run details"),
]

# Columns of the table of resolution shells: heading, key, number format.
SHELL_COLUMNS = [
    ("d max", "d_max", ".2f"), ("d min", "d_min", ".2f"), ("Observations", "n_obs", "d"),
    ("Unique", "n_unique", "d"), ("Completeness (%)", "completeness", ".1f"),
    ("Multiplicity", "multiplicity", ".2f"), ("I/sigma", "i_over_sigma", ".1f"),
    ("CC half", "cc_half", ".4f"), ("Rmerge", "r_merge", ".3f"), ("Rpim", "r_pim", ".3f"),
]

PLOTLY_JS = "plotly-2.6.3.min.js.gz"

# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _is_number(value) -> bool:
    """True for a finite int or float (not a bool)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _fmt(value, spec: str = "") -> str:
    """Formatted number ("-" for None or NaN; other values as text). Not
    escaped: the templates escape."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if not _is_number(value):
        return str(value)
    if spec == "d" and isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        return spec.format(value) if "{" in spec else format(value, spec)
    except (ValueError, TypeError):
        return str(value)


def _text(value) -> str:
    """A value as text, "-" for None."""
    return "-" if value is None else str(value)


def _label(value) -> str:
    """Text for plotly (trace names, hover texts, annotations), which renders
    a subset of HTML in them: escaped ("-" for None)."""
    return str(escape(_text(value)))


def _templates_text(template) -> str:
    """The input's template, or several sweeps' templates, as one line."""
    if isinstance(template, (list, tuple)):
        return ", ".join(str(t) for t in template if t)
    return str(template or "")


def _int(value, default=None):
    """value as an int, or default if it is not a number."""
    return int(value) if _is_number(value) else default


def _finite(value):
    """Copy with NaN and infinities replaced by None (null in JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _number_order(key):
    """Sort key of block numbers given as text: numerically, then the rest."""
    text = str(key)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def _first(values):
    return values[0] if isinstance(values, (list, tuple)) and values else None


# ---------------------------------------------------------------------------
# The run: sweeps, blocks and the images not used
# ---------------------------------------------------------------------------

Excluded = collections.namedtuple("Excluded", "sweep image reason category")


def _sweeps(data) -> list:
    """The sweeps of the summary, in its order ([] if it names none)."""
    return [
        s for s in data.get("sweeps") or []
        if isinstance(s, dict) and _int(s.get("number")) is not None
    ]


def _grouped(data) -> bool:
    """The page shows the run sweep by sweep: the summary has several sweeps."""
    return len(_sweeps(data)) > 1


def _sweep_of(value, grouped):
    """Sweep number of an entry; None on a page of one sweep (and for an entry
    that does not say)."""
    return _int(value) if grouped else None


def _sweep_order(data):
    """Sort key of sweep numbers: the summary's order; unknown sweeps last."""
    order = {_int(s["number"]): i for i, s in enumerate(_sweeps(data))}
    return lambda sweep: (order.get(sweep, len(order)), -1 if sweep is None else sweep)


def _blocks(data) -> list:
    """The blocks of the summary with their image range (copies with their
    "sweep" set as the page uses it), in sweep and image order."""
    grouped = _grouped(data)
    blocks = [
        dict(b, sweep=_sweep_of(b.get("sweep"), grouped))
        for b in data.get("blocks") or []
        if isinstance(b, dict) and _int(b.get("first")) is not None and _int(b.get("last")) is not None
    ]
    sweep_key = _sweep_order(data)
    return sorted(blocks, key=lambda b: (sweep_key(b["sweep"]), b["first"]))


def _block_colours(data) -> dict:
    """Colour of each block number (also for blocks only named in plot data)."""
    numbers = [b.get("number") for b in _blocks(data)]
    plots = data.get("plots") or {}
    for sv in plots.get("scan_varying") or []:
        if isinstance(sv, dict):
            numbers.append(sv.get("block"))
    isigi = plots.get("isigi_vs_resolution") or {}
    numbers.extend(isigi.get("blocks") or {})
    colours = {}
    for n in numbers:
        if n is not None and str(n) not in colours:
            colours[str(n)] = BLOCK_COLOURS[len(colours) % len(BLOCK_COLOURS)]
    return colours


def _dropped(data) -> list:
    """Dropped blocks: (sweep, first, last, reason)."""
    grouped = _grouped(data)
    out = []
    for d in data.get("dropped_blocks") or []:
        d = d if isinstance(d, dict) else {}
        first, last = _int(d.get("first")), _int(d.get("last"))
        if first is not None and last is not None:
            out.append((_sweep_of(d.get("sweep"), grouped), first, last, d.get("reason")))
    return out


def _category(entry, sweep, image, dropped) -> str:
    """Category of an image not used: from its status, or for a summary
    without statuses from the reason and who decided."""
    status = entry.get("status")
    if status in STATUS_CATEGORY:
        return STATUS_CATEGORY[status]
    reason, by = entry.get("reason"), entry.get("by")
    if reason == "missing file":
        return "missing"
    if str(reason).startswith("not given"):
        return "not-given"
    if by == "input":
        return "missing"
    if by == "user" or reason == "gaps.exclude_images":
        return "user"
    in_dropped = any(
        first <= image <= last and s in (sweep, None) for s, first, last, _ in dropped
    )
    if in_dropped or str(reason).startswith("block "):
        return "dropped"
    return "auto"


def _excluded(data) -> list:
    """Images not used, as Excluded(sweep, image, reason, category), in sweep
    and image order."""
    grouped = _grouped(data)
    dropped = _dropped(data)
    out, seen = [], set()
    for e in data.get("excluded_images") or []:
        e = e if isinstance(e, dict) else {}
        image = _int(e.get("image"))
        sweep = _sweep_of(e.get("sweep"), grouped)
        if image is None or (sweep, image) in seen:
            continue
        seen.add((sweep, image))
        out.append(Excluded(sweep, image, e.get("reason"), _category(e, sweep, image, dropped)))
    # images of dropped blocks are listed as not used too; make sure of it
    for sweep, first, last, reason in dropped:
        if grouped and sweep is None:
            continue  # its sweep is unknown
        for image in range(first, last + 1):
            if (sweep, image) not in seen:
                seen.add((sweep, image))
                out.append(Excluded(sweep, image, f"dropped block: {reason}", "dropped"))
    sweep_key = _sweep_order(data)
    return sorted(out, key=lambda e: (sweep_key(e.sweep), e.image))


def _counts(data) -> dict:
    """Strong spots per image: (sweep, image) -> count."""
    per_image = data.get("per_image") or {}
    images = per_image.get("image") or []
    spots = per_image.get("spots") or []
    sweeps = per_image.get("sweep") or []
    grouped = _grouped(data)
    counts = {}
    for i, (n, s) in enumerate(zip(images, spots)):
        if _is_number(n):
            sweep = _sweep_of(sweeps[i] if i < len(sweeps) else None, grouped)
            counts[(sweep, int(n))] = s
    return counts


def _image_range(data, sweep=None):
    """First and last image number of the sweep (of the whole run on a page of
    one sweep)."""
    if sweep is None and not _grouped(data):
        given = (data.get("input") or {}).get("image_range")
    else:
        given = next((s.get("image_range") for s in _sweeps(data) if _int(s["number"]) == sweep), None)
    if isinstance(given, (list, tuple)) and len(given) == 2:
        lo, hi = _int(given[0]), _int(given[1])
        if lo is not None and hi is not None:
            return lo, hi
    numbers = [e.image for e in _excluded(data) if e.sweep == sweep]
    numbers += [n for s, n in _counts(data) if s == sweep]
    for b in _blocks(data):
        if b["sweep"] == sweep:
            numbers += [b["first"], b["last"]]
    return (int(min(numbers)), int(max(numbers))) if numbers else None


def _panel_sweeps(data) -> list:
    """The sweeps shown one by one: [None] on a page of one sweep, else the
    sweep numbers (and None for entries that name no sweep)."""
    if not _grouped(data):
        return [None]
    sweeps = [_int(s["number"]) for s in _sweeps(data)]
    named = {b["sweep"] for b in _blocks(data)} | {e.sweep for e in _excluded(data)}
    named |= {s for s, _ in _counts(data)}
    return sweeps + ([None] if None in named else [])


def _batch_offsets(data) -> dict:
    """sweep -> number added to its image numbers to place it on one axis with
    the others: its batch offset, or else right after the sweep before it."""
    offsets = {None: 0}
    if not _grouped(data):
        return offsets
    end = 0
    for s in _sweeps(data):
        number = _int(s["number"])
        image_range = _image_range(data, number) or (1, 1)
        offset = _int(s.get("batch_offset"))
        if offset is None:
            offset = end - (image_range[0] - 1)
        offsets[number] = offset
        end = max(end, image_range[1] + offset)
    return offsets


def _batch_range(data):
    """First and last batch (image number + offset) over the whole run."""
    offsets = _batch_offsets(data)
    ranges = []
    for sweep in _panel_sweeps(data):
        image_range = _image_range(data, sweep)
        if image_range:
            ranges.append([n + offsets.get(sweep, 0) for n in image_range])
    if not ranges:
        return None
    return min(lo for lo, _ in ranges), max(hi for _, hi in ranges)


def _sweep_view(data, sweep) -> dict:
    """What the page says of a sweep, above its blocks and images not used."""
    if sweep is None:
        return {"number": "?", "title": "Sweep not recorded", "description": "", "details": ""}
    entry = next((s for s in _sweeps(data) if _int(s["number"]) == sweep), {})
    image_range = _image_range(data, sweep)
    description = ", ".join(
        ([str(entry["template"])] if entry.get("template") else [])
        + ([f"images {image_range[0]}-{image_range[1]}"] if image_range else [])
    )
    title = f"Sweep {sweep}" + (f": {description}" if description else "")
    details = []
    if _is_number(entry.get("n_blocks")):
        details.append(f"{_fmt(entry['n_blocks'], 'd')} block" + ("" if _int(entry["n_blocks"]) == 1 else "s"))
    if _is_number(entry.get("batch_offset")):
        details.append(f"batch offset {_fmt(entry['batch_offset'], 'd')}")
    if entry.get("goniometer"):
        details.append(f"goniometer: {entry['goniometer']}")
    return {"number": sweep, "title": title, "description": description, "details": "; ".join(details)}


# ---------------------------------------------------------------------------
# Plots: plain plotly figure dicts ({"data": [...], "layout": {...}})
# ---------------------------------------------------------------------------


def _base_layout(**kwargs) -> dict:
    layout = {
        "font": {"family": "Helvetica, Arial, sans-serif", "size": 12},
        "margin": {"l": 70, "r": 20, "t": 40, "b": 50},
        "hovermode": "closest",
        "plot_bgcolor": "white",
        "legend": {"orientation": "h", "x": 0, "y": -0.18, "yanchor": "top"},
    }
    layout.update(kwargs)
    return layout


def _legend_below(layout, pixels=62, rows=2) -> None:
    """Horizontal legend `pixels` below the plot area (under the x axis title)."""
    margin = layout["margin"]
    margin["b"] = max(margin.get("b", 0), pixels + 20 * rows + 5)
    area = layout["height"] - margin["t"] - margin["b"]
    layout["legend"] = {"orientation": "h", "x": 0, "y": -pixels / area, "yanchor": "top"}


def _axis(title="", **kwargs) -> dict:
    axis = {
        "title": {"text": title},
        "showline": True,
        "linecolor": "#444",
        "mirror": True,
        "gridcolor": "#e5e5e5",
        "zeroline": False,
        "ticks": "outside",
    }
    axis.update(kwargs)
    return axis


def _grid_domains(n, gap=0.08):
    """Domains of n equal subplots side by side (or stacked)."""
    width = (1 - gap * (n - 1)) / n
    return [[i * (width + gap), i * (width + gap) + width] for i in range(n)]


def _subplot_title(text, xref, y) -> dict:
    return {
        "text": text, "xref": xref, "yref": "paper", "x": 0.5, "y": y,
        "xanchor": "center", "yanchor": "bottom", "showarrow": False,
        "font": {"size": 13},
    }


def _exclusion_shapes(excluded, xref, yref, offsets=None) -> list:
    """Translucent rectangles over the runs of images not used of one category
    (at image + the sweep's offset)."""
    offsets = offsets or {}
    shapes = []
    for key, _, colour, _ in CATEGORIES:
        batches = [e.image + offsets.get(e.sweep, 0) for e in excluded if e.category == key]
        for first, last in _runs(batches):
            shapes.append(
                {
                    "type": "rect", "xref": xref, "yref": yref, "layer": "below",
                    "x0": first - 0.5, "x1": last + 0.5, "y0": 0, "y1": 1,
                    "fillcolor": colour, "opacity": 0.25, "line": {"width": 0},
                }
            )
    return shapes


def _axis_id(letter, k) -> tuple:
    """(trace reference, layout key) of axis number k (1-based): ("y", "yaxis"),
    ("y3", "yaxis3")."""
    suffix = "" if k == 1 else str(k)
    return letter + suffix, f"{letter}axis{suffix}"


# Spots per sweep: pixels of a panel, between panels (x axis title of one,
# sweep title and block labels of the next) and above the first.
SWEEP_PANEL, SWEEP_GAP, SWEEP_TOP = 230, 100, 75


def spots_figure(data):
    """Strong spots per image over the whole sweep (one panel per sweep when
    there are several).

    One trace per block (a line broken where images are missing), with the
    images that were not used shaded by category (bars on a hidden axis behind
    the spots, with the reason on hover) and the block boundaries marked.
    """
    counts = _counts(data)
    excluded = _excluded(data)
    grouped = _grouped(data)
    panels = [(s, _image_range(data, s)) for s in _panel_sweeps(data)]
    panels = [(s, r) for s, r in panels if r is not None]
    if (not counts and not excluded) or not panels:
        return None
    blocks = _blocks(data)
    colours = _block_colours(data)
    many = len(blocks) > MAX_LEGEND_BLOCKS
    totals = collections.Counter(e.category for e in excluded)
    traces, shapes, annotations, axes = [], [], [], {}
    in_legend = set()
    # panels stacked from the top (fractions of the plot area)
    area = len(panels) * SWEEP_PANEL + (len(panels) - 1) * SWEEP_GAP
    domains = [
        [1 - (i * (SWEEP_PANEL + SWEEP_GAP) + SWEEP_PANEL) / area, 1 - i * (SWEEP_PANEL + SWEEP_GAP) / area]
        for i in range(len(panels))
    ]

    # panel i: x axis i+1; the images not used as bars on the hidden axis
    # y(2i+1) (range 0-1), the spots on y(2i+2) in front of them
    for i, (sweep, (lo, hi)) in enumerate(panels):
        x_id, x_key = _axis_id("x", i + 1)
        bar_id, bar_key = _axis_id("y", 2 * i + 1)
        spots_id, spots_key = _axis_id("y", 2 * i + 2)
        on_axes = {"xaxis": x_id} if grouped else {}

        for key, label, colour, pattern in CATEGORIES:
            rows = [(e.image, e.reason) for e in excluded if e.category == key and e.sweep == sweep]
            if not rows:
                continue
            marker = {"color": colour, "opacity": 0.35, "line": {"width": 0}}
            if pattern:
                marker["pattern"] = {"shape": pattern, "fgcolor": "#222", "size": 6}
            trace = {
                # (one legend entry for the panels of all sweeps: their count)
                "type": "bar", "name": f"{label} ({totals[key]}{' in all sweeps' if grouped else ''})",
                "x": [n for n, _ in rows], "y": [1] * len(rows), "width": 1,
                "yaxis": bar_id, "marker": marker,
                "hovertext": [f"image {n}: {_label(reason)}" for n, reason in rows],
                "hoverinfo": "text",
            }
            if grouped:
                trace.update(on_axes, legendgroup=key, showlegend=key not in in_legend)
            in_legend.add(key)
            traces.append(trace)

        # the strong spots, one trace per block; None breaks the line at images
        # without a count
        placed = set()
        for b in blocks:
            if b["sweep"] != sweep:
                continue
            x = list(range(b["first"], b["last"] + 1))
            y = [counts.get((sweep, n)) for n in x]
            placed.update(x)
            if not any(v is not None for v in y):
                continue
            where = f"sweep {_label(sweep)}, " if grouped else ""
            traces.append(
                {
                    "type": "scatter", "mode": "lines+markers" if len(x) <= 200 else "lines",
                    "name": f"block {_label(b.get('number'))} ({where}images {b['first']}-{b['last']})",
                    "x": x, "y": y, **on_axes, "yaxis": spots_id, "showlegend": not many,
                    "line": {"color": colours.get(str(b.get("number")), "#1f77b4"), "width": 1.5},
                    "marker": {"size": 4},
                    "hovertemplate": "image %{x}: %{y} spots<extra>block " + _label(b.get("number")) + "</extra>",
                }
            )
        other = sorted(n for s, n in counts if s == sweep and n not in placed)
        if other:
            traces.append(
                {
                    "type": "scatter", "mode": "markers", "name": "not in a block",
                    "x": other, "y": [counts[(sweep, n)] for n in other], **on_axes, "yaxis": spots_id,
                    "marker": {"color": "#444", "size": 4, "symbol": "x"},
                    "showlegend": "other" not in in_legend,
                    "hovertemplate": "image %{x}: %{y} spots<extra>not in a block</extra>",
                }
            )
            in_legend.add("other")

        # block boundaries: dashed lines and a label over each block (just the
        # number if there are many)
        for b in blocks:
            if b["sweep"] != sweep:
                continue
            colour = colours.get(str(b.get("number")), "#444")
            for x in (b["first"] - 0.5, b["last"] + 0.5):
                shapes.append(
                    {
                        "type": "line", "xref": x_id, "yref": f"{bar_id} domain" if grouped else "paper",
                        "x0": x, "x1": x, "y0": 0, "y1": 1,
                        "line": {"color": colour, "width": 1, "dash": "dash"},
                    }
                )
            annotations.append(
                {
                    "text": ("" if many else "block ") + _label(b.get("number")), "xref": x_id, "yref": "paper",
                    "x": 0.5 * (b["first"] + b["last"]), "y": domains[i][1], "yanchor": "bottom",
                    "showarrow": False, "font": {"color": colour},
                }
            )
        axes[x_key] = _axis("image number", range=[lo - 0.5, hi + 0.5])
        axes[bar_key] = {"range": [0, 1], "visible": False, "fixedrange": True}
        axes[spots_key] = _axis("strong spots", overlaying=bar_id, side="left", rangemode="tozero")
        if grouped:
            view = _sweep_view(data, sweep)
            axes[x_key].update(anchor=bar_id)
            axes[bar_key].update(domain=domains[i])
            axes[spots_key].update(anchor=x_id)
            annotations.append(
                {
                    "text": f"<b>{_label(view['title'])}</b>", "xref": f"{x_id} domain", "x": 0,
                    "xanchor": "left", "yref": "paper", "y": domains[i][1], "yanchor": "bottom", "yshift": 20,
                    "showarrow": False, "font": {"size": 13},
                }
            )

    n_legend = len([t for t in traces if t.get("showlegend", True)])
    legend_rows = max(1, math.ceil(n_legend / 4))  # the names are long: about four to a row
    if not grouped:
        layout = _base_layout(
            height=450, bargap=0, margin={"l": 70, "r": 20, "t": 55, "b": 50},
            **axes, shapes=shapes, annotations=annotations,
        )
        _legend_below(layout, rows=legend_rows)
        return {"data": traces, "layout": layout}

    bottom = 62 + 20 * legend_rows + 5
    layout = _base_layout(
        height=SWEEP_TOP + area + bottom, bargap=0, margin={"l": 70, "r": 20, "t": SWEEP_TOP, "b": bottom},
        **axes, shapes=shapes, annotations=annotations,
    )
    _legend_below(layout, rows=legend_rows)
    return {"data": traces, "layout": layout}


def rmsd_figure(data):
    """RMSDs of each block in x, y (px) and phi (images): static and scan-varying."""
    blocks = _blocks(data)
    kinds = [
        ("rmsd_static", "static", "#1f77b4"),
        ("rmsd_scan_varying", "scan-varying", "#ff7f0e"),
    ]
    if not any(isinstance(b.get(k), dict) for b in blocks for k, _, _ in kinds):
        return None
    components = [("x", "RMSD x (px)"), ("y", "RMSD y (px)"), ("phi", "RMSD φ (images)")]
    labels = [_label(b.get("number")) for b in blocks]
    traces, annotations = [], []
    layout = _base_layout(height=380, barmode="group", margin={"l": 60, "r": 20, "t": 40, "b": 40})
    for i, ((comp, title), domain) in enumerate(zip(components, _grid_domains(3))):
        suffix = "" if i == 0 else str(i + 1)
        for key, name, colour in kinds:
            rmsds = [b.get(key) if isinstance(b.get(key), dict) else {} for b in blocks]
            traces.append(
                {
                    "type": "bar", "name": name, "legendgroup": name, "showlegend": i == 0,
                    "x": labels, "y": [r.get(comp) for r in rmsds],
                    "customdata": [r.get("n") for r in rmsds],
                    "xaxis": "x" + suffix, "yaxis": "y" + suffix,
                    "marker": {"color": colour},
                    "hovertemplate": "block %{x}: %{y:.4f}<br>%{customdata} reflections<extra>"
                    + name + "</extra>",
                }
            )
        layout["xaxis" + suffix] = _axis("block", type="category", domain=domain, anchor="y" + suffix)
        layout["yaxis" + suffix] = _axis(anchor="x" + suffix, rangemode="tozero")
        annotations.append(_subplot_title(title, f"x{suffix} domain", 1.0))
    layout["annotations"] = annotations
    _legend_below(layout, rows=1)
    return {"data": traces, "layout": layout}


def _scan_varying_series(data, index_key, n_values):
    """Per block of plots.scan_varying, a dict: block number, static (one
    crystal model for the whole block), where on the x axis, hover label and
    values (n_values lists).

    Scan point i of a block is the start of image first + i: it is plotted at
    image boundary (first + i - 0.5), so a block covers its images exactly;
    consecutive scan points are given as x0 and dx rather than a list. A
    block with a single (static) crystal model is one point, at the centre of
    its images. With several sweeps, x is the batch: image + the sweep's offset.
    """
    plots = data.get("plots") or {}
    by_number = {str(b.get("number")): b for b in _blocks(data)}
    grouped = _grouped(data)
    offsets = _batch_offsets(data)
    out = []
    for sv in plots.get("scan_varying") or []:
        if not isinstance(sv, dict):
            continue
        images = sv.get("image") or []
        values = sv.get(index_key) or []
        points = [
            (int(n), v) for n, v in zip(images, values)
            if _is_number(n) and isinstance(v, (list, tuple)) and len(v) >= n_values
        ]
        if not points:
            continue
        block = by_number.get(str(sv.get("block")))
        sweep = block["sweep"] if block else None
        offset = offsets.get(sweep, 0)
        prefix = f"sweep {_label(sweep)}, " if grouped and sweep is not None else ""
        series = {"block": sv.get("block"), "static": len(points) == 1}
        numbers = [n for n, _ in points]
        if len(points) == 1 and block:
            series["x"] = [0.5 * (block["first"] + block["last"]) + offset]
            series["hover"] = f"{prefix}static model, images {block['first']}-{block['last']}"
        elif len(points) == 1:
            series["x"] = [numbers[0] + offset]
            series["hover"] = f"{prefix}static model, image {numbers[0]}"
        elif block and numbers == list(range(block["first"], block["last"] + 2)):
            series.update(x0=numbers[0] - 0.5 + offset, dx=1, customdata=numbers)
            series["hover"] = prefix + "start of image %{customdata}"
        else:
            series.update(x=[n + offset for n in numbers], customdata=numbers)
            series["hover"] = prefix + "image %{customdata}"
        series["values"] = [[v[k] for _, v in points] for k in range(n_values)]
        out.append(series)
    return out


def _static_blocks(data) -> tuple:
    """(block numbers with a static crystal model in the plot data, number of
    blocks in the plot data)."""
    series = _scan_varying_series(data, "cell", 6)
    return [s["block"] for s in series if s["static"]], len(series)


# Scan-varying values are plotted rounded to this many decimals (Å, degrees):
# finer digits are numerical noise (a constant 90° angle comes out of DIALS as
# 90.00000000000003), which plotly would otherwise scale up to fill the panel.
PLOT_DECIMALS = 5
# A panel spans at least this much (Å or degrees): a constant or nearly
# constant parameter is drawn as a flat line, labelled to 0.01.
MIN_SPAN = 0.02


def _rounded(values):
    return [round(v, PLOT_DECIMALS) if _is_number(v) else None for v in values]


def _value_axis(series, k):
    """y-axis settings of panel k: the range and tick labels the values deserve."""
    values = [v for s in series for v in s["values"][k] if _is_number(v)]
    if not values:
        return {}
    low, high = min(values), max(values)
    span = high - low
    if span < MIN_SPAN:
        # flat (to plotting precision): centre the line, ticks every 0.01
        mid = round((low + high) / 2, 2)
        half = max(0.6 * MIN_SPAN, (max(high - mid, mid - low)) * 1.2)
        return {"range": [mid - half, mid + half], "dtick": 0.01, "tickformat": ".2f", "autorange": False}
    decimals = min(PLOT_DECIMALS, max(2, math.ceil(-math.log10(span / 10))))
    return {"tickformat": f".{decimals}f"}


def _scan_varying_figure(data, index_key, labels, rows, cols, height):
    series = _scan_varying_series(data, index_key, len(labels))
    if not series:
        return None
    for s in series:
        s["values"] = [_rounded(v) for v in s["values"]]
    colours = _block_colours(data)
    excluded = _excluded(data)
    grouped = _grouped(data)
    offsets = _batch_offsets(data)
    x_range = _batch_range(data)
    x_range = [x_range[0] - 0.5, x_range[1] + 0.5] if x_range else None
    x_title = "batch (image number + batch offset of its sweep)" if grouped else "image number"
    traces, shapes, annotations = [], [], []
    layout = _base_layout(height=height, margin={"l": 80, "r": 20, "t": 40, "b": 50})
    x_domains = _grid_domains(cols, gap=0.09)
    y_domains = list(reversed(_grid_domains(rows, gap=0.14)))
    for k, label in enumerate(labels):
        suffix = "" if k == 0 else str(k + 1)
        row, col = divmod(k, cols)
        for s in series:
            number = s["block"]
            colour = colours.get(str(number), "#1f77b4")
            trace = {
                "type": "scatter", "name": f"block {_label(number)}", "legendgroup": f"block {_label(number)}",
                "showlegend": k == 0 and len(series) <= MAX_LEGEND_BLOCKS,
                "y": s["values"][k], "xaxis": "x" + suffix, "yaxis": "y" + suffix,
                "hovertemplate": s["hover"] + ": %{y:.5f}<extra>block " + _label(number) + "</extra>",
            }
            for key in ("x", "x0", "dx", "customdata"):
                if key in s:
                    trace[key] = s[key]
            if s["static"]:
                trace.update(mode="markers", marker={"color": colour, "size": 9, "symbol": "diamond"})
            else:
                trace.update(mode="lines", line={"color": colour, "width": 2})
            traces.append(trace)
        xaxis = _axis(x_title if row == rows - 1 else "", domain=x_domains[col], anchor="y" + suffix)
        if x_range:
            xaxis["range"] = x_range
        if k:
            xaxis["matches"] = "x"
        layout["xaxis" + suffix] = xaxis
        layout["yaxis" + suffix] = _axis(
            domain=y_domains[row], anchor="x" + suffix, exponentformat="none", **_value_axis(series, k)
        )
        shapes += _exclusion_shapes(excluded, "x" + suffix, f"y{suffix} domain", offsets)
        annotations.append(_subplot_title(label, f"x{suffix} domain", y_domains[row][1]))
    layout.update(shapes=shapes, annotations=annotations)
    _legend_below(layout, rows=max(1, math.ceil(min(len(series), MAX_LEGEND_BLOCKS) / 8)))
    return {"data": traces, "layout": layout}


def cell_figure(data):
    """Unit cell parameters against image number, one trace per block (a line
    for a scan-varying model, a point for a static one)."""
    return _scan_varying_figure(data, "cell", CELL_LABELS, rows=2, cols=3, height=600)


def orientation_figure(data):
    """Crystal orientation (three angles) against image number, one trace per
    block (a line for a scan-varying model, a point for a static one)."""
    return _scan_varying_figure(data, "orientation_deg", ANGLE_LABELS, rows=1, cols=3, height=380)


def isigi_figure(data):
    """<I/sigma> in resolution shells, one line per block.

    The x axis is 1/d^2 (shells of equal width there), labelled with d in
    Angstrom, so it runs from low to high resolution.
    """
    isigi = (data.get("plots") or {}).get("isigi_vs_resolution") or {}
    d_centre = isigi.get("d_centre") or []
    per_block = isigi.get("blocks") or {}
    if not d_centre or not per_block:
        return None
    shells = [(k, d) for k, d in enumerate(d_centre) if _is_number(d) and d > 0]
    if not shells:
        return None
    colours = _block_colours(data)
    x = [1 / d ** 2 for _, d in shells]
    traces = []
    for number in sorted(per_block, key=_number_order):
        values = per_block[number] or []
        y = [values[k] if k < len(values) and _is_number(values[k]) else None for k, _ in shells]
        if not any(v is not None for v in y):
            continue
        traces.append(
            {
                "type": "scatter", "mode": "lines+markers", "name": f"block {_label(number)}",
                "x": x, "y": y, "customdata": [d for _, d in shells],
                "line": {"color": colours.get(str(number), "#1f77b4"), "width": 2},
                "hovertemplate": "d = %{customdata:.2f} Å: %{y:.1f}<extra>block " + _label(number) + "</extra>",
            }
        )
    if not traces:
        return None
    layout = _base_layout(
        height=380,
        xaxis=_axis(
            "resolution (Å)", tickmode="array", tickvals=x,
            ticktext=[f"{d:.2f}" for _, d in shells],
        ),
        yaxis=_axis("<I/σ(I)>", rangemode="tozero"),
    )
    layout["legend"] = {"orientation": "v", "x": 1, "xanchor": "right", "y": 1}
    layout["showlegend"] = len(traces) <= MAX_LEGEND_BLOCKS
    return {"data": traces, "layout": layout}


FIGURES = {
    "plot-spots": spots_figure,
    "plot-rmsd": rmsd_figure,
    "plot-cell": cell_figure,
    "plot-orientation": orientation_figure,
    "plot-isigi": isigi_figure,
}


# ---------------------------------------------------------------------------
# What the templates show: plain values, escaped by jinja2
# ---------------------------------------------------------------------------


def _final_rmsd(block) -> dict:
    """RMSDs of the final refinement: scan-varying if it ran, else static."""
    for key in ("rmsd_scan_varying", "rmsd_static"):
        if isinstance(block.get(key), dict):
            return block[key]
    return {}


def _block_row(b) -> dict:
    rmsd = _final_rmsd(b)
    fraction = b.get("indexed_fraction")
    return {
        "number": b.get("number"), "first": b["first"], "last": b["last"],
        "n_images": b.get("n_images", b["last"] - b["first"] + 1),
        "phi_start": b.get("phi_start"), "phi_end": b.get("phi_end"), "spots": b.get("spots"),
        "indexed_percent": 100 * fraction if _is_number(fraction) else None,
        "rmsd_x": rmsd.get("x"), "rmsd_y": rmsd.get("y"), "rmsd_phi": rmsd.get("phi"),
        "refinement": b.get("refinement"), "profile": b.get("profile"),
        "integrated": b.get("integrated"), "gap_edge": b.get("gap_edge"), "mean_isigi": b.get("mean_isigi"),
    }


def _block_groups(data) -> list:
    """Rows of the blocks table: one group (without a heading) on a page of
    one sweep, else one group per sweep."""
    blocks = _blocks(data)
    grouped = _grouped(data)
    groups = []
    for sweep in _panel_sweeps(data):
        rows = [_block_row(b) for b in blocks if b["sweep"] == sweep]
        if rows or grouped:
            groups.append({"sweep": _sweep_view(data, sweep) if grouped else None, "blocks": rows})
    return groups if blocks else []


def _excluded_groups(data) -> list:
    """Rows of the table of images not used, grouped by category and reason
    (one group per sweep when there are several)."""
    excluded = _excluded(data)
    if not excluded:
        return []
    grouped = _grouped(data)
    groups = []
    for sweep in _panel_sweeps(data):
        by_reason = {}
        for e in excluded:
            if e.sweep == sweep:
                by_reason.setdefault((e.category, str(e.reason)), []).append(e.image)
        rows = []
        for (category, reason), images in sorted(by_reason.items(), key=lambda kv: (_ORDER[kv[0][0]], min(kv[1]))):
            label, colour, _ = _CATEGORY[category]
            rows.append(
                {"category": category, "label": label, "colour": colour, "reason": reason,
                 "images": compact_ranges(images), "count": len(images)}
            )
        if rows or grouped:
            groups.append({"sweep": _sweep_view(data, sweep) if grouped else None, "rows": rows})
    return groups


def _overview(data) -> list:
    """Key numbers of the run: rows {label, value, warning}."""
    inputs = data.get("input") or {}
    totals = data.get("totals") or {}
    final = (data.get("crystal") or {}).get("final") or {}
    scaling = data.get("scaling") or {}
    rows = []

    def row(label, value, warning=False):
        rows.append({"label": label, "value": value, "warning": warning})

    if _grouped(data):
        for sweep in _sweeps(data):
            view = _sweep_view(data, _int(sweep["number"]))
            row(f"Sweep {view['number']}", view["description"] or "-")
    else:
        image_range = _image_range(data)
        if inputs.get("template"):
            row("Images", inputs.get("template"))
        if image_range:
            row("Image range", f"{image_range[0]}-{image_range[1]}")
    if inputs.get("format"):
        row("Format", inputs.get("format"))
    dropped = data.get("dropped_blocks") or []
    row("Blocks", f"{len(_blocks(data))}" + (f" ({len(dropped)} dropped)" if dropped else ""))
    row("Images used / not used", f"{_fmt(totals.get('images_used'), 'd')} / {len(_excluded(data))}")
    cell = final.get("unit_cell") or []
    if len(cell) == 6:
        row("Unit cell (Å, °)", _cell_text(cell, final.get("unit_cell_esd")))
    if final.get("space_group"):
        row("Space group (integration)", final.get("space_group"))
    symmetry = scaling.get("symmetry") or {}
    if symmetry.get("space_group"):
        row("Space group (scaling)", symmetry.get("space_group"))
    scaled_cell = scaling.get("unit_cell") or []
    if len(scaled_cell) == 6:
        row("Unit cell as scaled (Å, °" + (f"; reindexed {symmetry['cb_op']})" if symmetry.get("cb_op") else ")"),
            _cell_text(scaled_cell, scaling.get("unit_cell_esd")))
    model = scaling.get("model") or {}
    if model.get("used"):
        text = f"{model['used']}, {_fmt(model.get('kept'), 'd')} observations kept"
        replaced = model.get("replaced")
        if isinstance(replaced, dict):
            text += (f" (DIALS' choice, {replaced.get('used')}, diverged: "
                     f"{_fmt(replaced.get('small_scales'), 'd')} scale factors below 0.001, "
                     f"{_fmt(replaced.get('kept'), 'd')} kept)")
        row("Scaling model", text, warning=isinstance(replaced, dict))
    if totals:
        row(
            "Reflections",
            f"{_fmt(totals.get('spots'), 'd')} strong spots, {_fmt(totals.get('indexed'), 'd')} "
            f"indexed, {_fmt(totals.get('integrated'), 'd')} integrated",
        )
    if scaling:
        row(
            "Resolution, completeness",
            f"{_fmt(_first(scaling.get('d_min')), '.2f')} Å, {_fmt(_first(scaling.get('completeness')), '.1f')} %",
        )
    seconds = (data.get("timing") or {}).get("total_seconds")
    if _is_number(seconds):
        row("Run time", f"{_fmt(seconds, '.1f')} s")
    warnings = data.get("warnings") or []
    if warnings:
        row("Warnings", f"{len(warnings)} (see below)", warning=True)
    return rows


def _cell_text(cell, esd) -> str:
    """'54.0122 ± 0.0050, ...': digits enough for each esd's first significant
    one; none for a value without (an angle the space group fixes: 0)."""
    esd = list(esd or []) + [None] * 6
    return ", ".join(
        _fmt(v, f".{esd_decimals(e)}f") + (f" ± {_fmt(e, f'.{esd_decimals(e)}f')}" if has_esd(e) else "")
        for v, e in zip(cell, esd))


def _cell_rows(data):
    """Rows of the crystal table, or None without a crystal model."""
    final = (data.get("crystal") or {}).get("final") or {}
    cell = final.get("unit_cell") or []
    if len(cell) != 6:
        return None
    esd = list(final.get("unit_cell_esd") or []) + [None] * 6
    spread = list(final.get("cell_spread") or []) + [None] * 6
    return [
        {"label": label, "value": v, "esd": e, "spread": s,
         "fmt": f".{esd_decimals(e)}f"}
        for label, v, e, s in zip(CELL_LABELS, cell, esd, spread)
    ]


def _merging(data):
    """Merging statistics as DIALS tabulates them (labels, digits): Overall,
    Low and High resolution shells; and the shells. None if not scaled."""
    scaling = data.get("scaling")
    if not isinstance(scaling, dict) or not scaling:
        return None
    rows = []
    for key, label in MERGING_LABELS.items():
        values = scaling.get(key)
        if not isinstance(values, (list, tuple)) or not values:
            continue
        values = list(values)[:3] + [None] * (3 - len(values[:3]))
        spec = DIALS_FORMATS[label].strip().lstrip("%0123456789")  # " %7.2f" -> ".2f"
        rows.append({"label": label, "values": [_fmt(v, spec) for v in values]})
    shells = [
        {key: s.get(key) for _, key, _ in SHELL_COLUMNS}
        for s in scaling.get("shells") or [] if isinstance(s, dict)
    ]
    return {
        "space_group": (scaling.get("symmetry") or {}).get("space_group") or "?",
        "rows": rows, "shells": shells,
    }


def _plots(data, figures) -> list:
    """Sections of the plots: id, heading, caption (drawn) or note."""
    grouped = _grouped(data)
    static, n_series = _static_blocks(data)
    out = []
    for plot_id, title in PLOTS:
        caption = CAPTIONS[plot_id]
        if plot_id == "plot-spots" and grouped:
            caption = caption.replace("over the whole sweep", "sweep by sweep")
        if plot_id in STATIC_TITLES and static:
            if len(static) == n_series:
                title = STATIC_TITLES[plot_id]
                caption = (
                    "The crystal model of each block is static (no scan points): one point per "
                    "block, at the centre of its images."
                    + (" " + CAPTIONS[plot_id] if plot_id == "plot-orientation" else "")
                )
            else:
                which = ", ".join(_text(n) for n in static)
                caption += (
                    f" Block{'s' if len(static) > 1 else ''} {which}: static crystal model, "
                    "one point (◆) at the centre of its images."
                )
        if plot_id in STATIC_TITLES and grouped:
            caption += " With several sweeps, the x axis is the batch: image number + the sweep's batch offset."
        out.append(
            {"id": plot_id, "title": title, "drawn": plot_id in figures,
             "caption": caption, "note": NO_PLOT[plot_id]}
        )
    return out


def _run_details(data) -> dict:
    """Dropped blocks, warnings, files, timing, versions and parameters."""
    grouped = _grouped(data)
    dropped = []
    for d in data.get("dropped_blocks") or []:
        d = d if isinstance(d, dict) else {}
        where = f"images {_text(d.get('first'))}-{_text(d.get('last'))}"
        if grouped and d.get("sweep") is not None:
            where = f"sweep {_text(d.get('sweep'))}, {where}"
        dropped.append({"where": where, "reason": _text(d.get("reason"))})
    timing = data.get("timing") or {}
    total = timing.get("total_seconds")
    stages = []
    for s in timing.get("stages") or []:
        if isinstance(s, dict):
            seconds = s.get("seconds")
            share = 100 * seconds / total if _is_number(seconds) and _is_number(total) and total > 0 else None
            stages.append({"name": s.get("name"), "seconds": seconds, "share": share})
    return {
        "dropped": dropped,
        "warnings": list(data.get("warnings") or []),
        "files": [
            {"name": f.get("name"), "kind": f.get("kind"), "reflections": f.get("reflections")}
            for f in data.get("files") or [] if isinstance(f, dict)
        ],
        "stages": stages,
        "total_seconds": total,
        "versions": list((data.get("versions") or {}).items()),
        "modified": ((data.get("parameters") or {}).get("modified") or "").strip(),
    }


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("dials_gapfill.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["num"] = _fmt
    env.filters["text"] = _text
    # the figures as compact JSON, in the order given (the page's plot order)
    env.policies["json.dumps_kwargs"] = {"sort_keys": False, "separators": (",", ":"), "allow_nan": False}
    return env


@functools.lru_cache(maxsize=1)
def _plotly_js() -> Markup:
    """The minified plotly.js bundle, to be embedded inline."""
    packed = resources.files(__package__).joinpath("templates").joinpath(PLOTLY_JS).read_bytes()
    text = gzip.decompress(packed).decode("utf-8")
    # "</script" inside the script element would end it early
    return Markup(re.sub(r"</(script)", r"<\\/\1", text, flags=re.IGNORECASE))


def html_report(data: dict) -> str:
    """The self-contained HTML report of a run, from its machine-readable summary."""
    data = data or {}
    figures = {}
    for plot_id, make in FIGURES.items():
        figure = make(data)
        if figure is not None:
            figures[plot_id] = _finite(figure)
    totals = data.get("totals") or {}
    context = {
        "program": data.get("program") or "dials.process_gapped",
        "template": _templates_text((data.get("input") or {}).get("template")),
        "nav": NAV,
        "overview": _overview(data),
        "cell": _cell_rows(data),
        "excluded": _excluded_groups(data),
        "block_groups": _block_groups(data),
        "totals": {k: totals.get(k) for k in ("images_used", "spots", "integrated", "gap_edge")} if totals else None,
        "merging": _merging(data),
        "shell_columns": SHELL_COLUMNS,
        "plots": _plots(data, figures),
        "run": _run_details(data),
        "figures": figures,
        "plotly_js": _plotly_js() if figures else "",
    }
    return _environment().get_template("report.html").render(context)


if __name__ == "__main__":
    # python -m dials_gapfill.report.html dials.process_gapped.json report.html
    import sys

    with open(sys.argv[1], encoding="utf-8") as fh:
        summary = json.load(fh)
    with open(sys.argv[2], "w", encoding="utf-8") as fh:
        fh.write(html_report(summary))
