"""Self-contained HTML report of dials.process_gapped.

html_report(data) turns the machine-readable summary of a run (the contents of
dials.process_gapped.json, made by dials_gapfill.report.summary_dict) into one
HTML page: the table of the blocks, the crystal, the merging statistics and the
bookkeeping of the run (excluded images, files, timing, versions), and plotly
plots of the strong spots over the whole sweep, the RMSDs, the scan-varying
crystal model and <I/sigma> against resolution.

plotly.js is embedded inline and the figures are plain JSON handed to
Plotly.newPlot, so the page needs no network access when opened. Every text
taken from the summary is escaped. Any part of the summary may be missing (a
run that failed to scale, a single block, no plot data): the page then shows
a note instead of the plot or table.
"""

from __future__ import annotations

import html
import json
import math

from dials.report.analysis import formats as DIALS_FORMATS

from dials_gapfill.report.merging import LABELS as MERGING_LABELS
from dials_gapfill.util import range_text as compact_ranges
from dials_gapfill.util import runs as _runs

# Colours of the blocks, the same in every plot (no grey, red or purple: those
# are the colours of the excluded images).
BLOCK_COLOURS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#8c564b", "#e377c2",
    "#bcbd22", "#17becf", "#393b79", "#e7ba52", "#637939",
]

# With more blocks than this, the blocks are not listed in the plot legends
# (the colours repeat; hovering names the block).
MAX_LEGEND_BLOCKS = 10

# Categories of images that were not used: key, legend label, colour, bar pattern.
CATEGORIES = [
    ("missing", "missing file", "#7f7f7f", ""),
    ("user", "excluded by user", "#9467bd", ""),
    ("auto", "bad image (found automatically)", "#d62728", ""),
    ("dropped", "dropped block", "#2f4f4f", "/"),
]
_CATEGORY = {key: (label, colour, pattern) for key, label, colour, pattern in CATEGORIES}

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

# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _e(value) -> str:
    """Escaped text of a value from the summary ("-" for None)."""
    return "-" if value is None else html.escape(str(value))


def _is_number(value) -> bool:
    """True for a finite int or float (not a bool)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _fmt(value, spec: str = "") -> str:
    """Escaped, formatted number; "-" for None or NaN, other values as text."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if not _is_number(value):
        return _e(value)
    if spec == "d" and isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        return _e(spec.format(value) if "{" in spec else format(value, spec))
    except (ValueError, TypeError):
        return _e(value)


def _int(value, default=None):
    """value as an int, or default if it is not a number."""
    return int(value) if _is_number(value) else default


def _json_for_script(value) -> str:
    """JSON safe to embed in a <script> element (no '<', '>' or '&')."""
    text = json.dumps(_finite(value), separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite(value):
    """Copy with NaN and infinities replaced by None (null in JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _blocks(data) -> list:
    """The blocks of the summary with their image range, in image order."""
    blocks = [
        b for b in data.get("blocks") or []
        if isinstance(b, dict) and _int(b.get("first")) is not None and _int(b.get("last")) is not None
    ]
    return sorted(blocks, key=lambda b: b["first"])


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


def _number_order(key):
    """Sort key of block numbers given as text: numerically, then the rest."""
    text = str(key)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def _image_range(data):
    """First and last image number of the whole sweep."""
    image_range = (data.get("input") or {}).get("image_range")
    if isinstance(image_range, (list, tuple)) and len(image_range) == 2:
        lo, hi = _int(image_range[0]), _int(image_range[1])
        if lo is not None and hi is not None:
            return lo, hi
    numbers = [n for n, _, _ in _excluded(data)]
    numbers += [n for n in (data.get("per_image") or {}).get("image") or [] if _is_number(n)]
    for b in _blocks(data):
        numbers += [b["first"], b["last"]]
    return (int(min(numbers)), int(max(numbers))) if numbers else None


def _excluded(data) -> list:
    """Images not used: (image, reason, category key), sorted by image.

    Categories: missing files; images excluded by the user
    (gaps.exclude_images); images of blocks that were dropped (too short,
    could not be indexed); other bad images found automatically (blank,
    all-zero, over-exposed, unreadable).
    """
    dropped = []
    for d in data.get("dropped_blocks") or []:
        first, last = _int((d or {}).get("first")), _int((d or {}).get("last"))
        if first is not None and last is not None:
            dropped.append((first, last, d.get("reason")))

    def category(image, reason, by):
        if reason == "missing file" or by == "input":
            return "missing"
        if by == "user" or reason == "gaps.exclude_images":
            return "user"
        if any(first <= image <= last for first, last, _ in dropped) or str(reason).startswith("block "):
            return "dropped"
        return "auto"

    out, seen = [], set()
    for e in data.get("excluded_images") or []:
        image = _int((e or {}).get("image"))
        if image is None or image in seen:
            continue
        seen.add(image)
        out.append((image, e.get("reason"), category(image, e.get("reason"), e.get("by"))))
    # images of dropped blocks are listed as excluded too; make sure of it
    for first, last, reason in dropped:
        for image in range(first, last + 1):
            if image not in seen:
                seen.add(image)
                out.append((image, f"dropped block: {reason}", "dropped"))
    return sorted(out, key=lambda e: e[0])


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


def _exclusion_shapes(excluded, xref, yref) -> list:
    """Translucent rectangles over the runs of excluded images of one category."""
    shapes = []
    for key, _, colour, _ in CATEGORIES:
        images = [n for n, _, c in excluded if c == key]
        for first, last in _runs(images):
            shapes.append(
                {
                    "type": "rect", "xref": xref, "yref": yref, "layer": "below",
                    "x0": first - 0.5, "x1": last + 0.5, "y0": 0, "y1": 1,
                    "fillcolor": colour, "opacity": 0.25, "line": {"width": 0},
                }
            )
    return shapes


def spots_figure(data):
    """Strong spots per image over the whole sweep.

    One trace per block (a line broken where images are missing), with the
    images that were not used shaded by category (bars on a hidden axis behind
    the spots, with the reason on hover) and the block boundaries marked.
    """
    per_image = data.get("per_image") or {}
    images, spots = per_image.get("image") or [], per_image.get("spots") or []
    counts = {
        int(n): s for n, s in zip(images, spots) if _is_number(n)
    }
    excluded = _excluded(data)
    image_range = _image_range(data)
    if (not counts and not excluded) or image_range is None:
        return None
    lo, hi = image_range
    blocks = _blocks(data)
    colours = _block_colours(data)
    traces = []

    # shading of the images not used: one bar trace per category, on the hidden
    # axis y (range 0-1); the spots are on y2 in front of them
    for key, label, colour, pattern in CATEGORIES:
        rows = [(n, reason) for n, reason, c in excluded if c == key]
        if not rows:
            continue
        marker = {"color": colour, "opacity": 0.35, "line": {"width": 0}}
        if pattern:
            marker["pattern"] = {"shape": pattern, "fgcolor": "#222", "size": 6}
        traces.append(
            {
                "type": "bar", "name": f"{label} ({len(rows)})",
                "x": [n for n, _ in rows], "y": [1] * len(rows), "width": 1,
                "yaxis": "y", "marker": marker,
                "hovertext": [f"image {n}: {html.escape(str(reason))}" for n, reason in rows],
                "hoverinfo": "text",
            }
        )

    # the strong spots, one trace per block; None breaks the line at images
    # without a count
    many = len(blocks) > MAX_LEGEND_BLOCKS
    placed = set()
    for b in blocks:
        x = list(range(b["first"], b["last"] + 1))
        y = [counts.get(n) for n in x]
        placed.update(x)
        if not any(v is not None for v in y):
            continue
        traces.append(
            {
                "type": "scatter", "mode": "lines+markers" if len(x) <= 200 else "lines",
                "name": f"block {_e(b.get('number'))} (images {b['first']}-{b['last']})",
                "x": x, "y": y, "yaxis": "y2", "showlegend": not many,
                "line": {"color": colours.get(str(b.get("number")), "#1f77b4"), "width": 1.5},
                "marker": {"size": 4},
                "hovertemplate": "image %{x}: %{y} spots<extra>block " + _e(b.get("number")) + "</extra>",
            }
        )
    other = sorted(n for n in counts if n not in placed)
    if other:
        traces.append(
            {
                "type": "scatter", "mode": "markers", "name": "not in a block",
                "x": other, "y": [counts[n] for n in other], "yaxis": "y2",
                "marker": {"color": "#444", "size": 4, "symbol": "x"},
                "hovertemplate": "image %{x}: %{y} spots<extra>not in a block</extra>",
            }
        )

    # block boundaries: dashed lines and a label over each block (just the
    # number if there are many)
    shapes, annotations = [], []
    for b in blocks:
        colour = colours.get(str(b.get("number")), "#444")
        for x in (b["first"] - 0.5, b["last"] + 0.5):
            shapes.append(
                {
                    "type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x,
                    "y0": 0, "y1": 1, "line": {"color": colour, "width": 1, "dash": "dash"},
                }
            )
        annotations.append(
            {
                "text": ("" if many else "block ") + _e(b.get("number")), "xref": "x", "yref": "paper",
                "x": 0.5 * (b["first"] + b["last"]), "y": 1, "yanchor": "bottom",
                "showarrow": False, "font": {"color": colour},
            }
        )
    layout = _base_layout(
        height=450,
        bargap=0,
        margin={"l": 70, "r": 20, "t": 55, "b": 50},
        xaxis=_axis("image number", range=[lo - 0.5, hi + 0.5]),
        yaxis={"range": [0, 1], "visible": False, "fixedrange": True},
        yaxis2=_axis("strong spots", overlaying="y", side="left", rangemode="tozero"),
        shapes=shapes,
        annotations=annotations,
    )
    # the legend names are long: about four to a row
    in_legend = [t for t in traces if t.get("showlegend", True)]
    _legend_below(layout, rows=max(1, math.ceil(len(in_legend) / 4)))
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
    labels = [_e(b.get("number")) for b in blocks]
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
    """Per block of plots.scan_varying: (block, x, hover labels, [series_k]).

    Scan point i of a block is the start of image first + i: it is plotted at
    image boundary (first + i - 0.5), so a block covers its images exactly. A
    block with a single (static) crystal model is drawn as a flat line over
    its images.
    """
    plots = data.get("plots") or {}
    by_number = {str(b.get("number")): b for b in _blocks(data)}
    out = []
    for sv in plots.get("scan_varying") or []:
        if not isinstance(sv, dict):
            continue
        images = sv.get("image") or []
        values = sv.get(index_key) or []
        points = [
            (n, v) for n, v in zip(images, values)
            if _is_number(n) and isinstance(v, (list, tuple)) and len(v) >= n_values
        ]
        if not points:
            continue
        block = by_number.get(str(sv.get("block")))
        if len(points) == 1 and block:
            x = [block["first"] - 0.5, block["last"] + 0.5]
            points = [points[0], points[0]]
            where = [f"static model, images {block['first']}-{block['last']}"] * 2
        elif block and len(points) == block["last"] - block["first"] + 2:
            x = [n - 0.5 for n, _ in points]
            where = [f"start of image {n}" for n, _ in points]
        else:
            x = [n for n, _ in points]
            where = [f"image {n}" for n, _ in points]
        series = [[v[k] for _, v in points] for k in range(n_values)]
        out.append((sv.get("block"), x, where, series))
    return out


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
    values = [v for _, _, _, vals in series for v in vals[k] if _is_number(v)]
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
    series = [(number, x, where, [_rounded(v) for v in values]) for number, x, where, values in series]
    colours = _block_colours(data)
    excluded = _excluded(data)
    image_range = _image_range(data)
    x_range = [image_range[0] - 0.5, image_range[1] + 0.5] if image_range else None
    traces, shapes, annotations = [], [], []
    layout = _base_layout(height=height, margin={"l": 80, "r": 20, "t": 40, "b": 50})
    x_domains = _grid_domains(cols, gap=0.09)
    y_domains = list(reversed(_grid_domains(rows, gap=0.14)))
    for k, label in enumerate(labels):
        suffix = "" if k == 0 else str(k + 1)
        row, col = divmod(k, cols)
        for number, x, where, values in series:
            traces.append(
                {
                    "type": "scatter", "mode": "lines" if len(x) > 1 else "markers",
                    "name": f"block {_e(number)}", "legendgroup": f"block {_e(number)}",
                    "showlegend": k == 0 and len(series) <= MAX_LEGEND_BLOCKS,
                    "x": x, "y": values[k], "customdata": where,
                    "xaxis": "x" + suffix, "yaxis": "y" + suffix,
                    "line": {"color": colours.get(str(number), "#1f77b4"), "width": 2},
                    "hovertemplate": "%{customdata}: %{y:.5f}<extra>block " + _e(number) + "</extra>",
                }
            )
        xaxis = _axis("image number" if row == rows - 1 else "", domain=x_domains[col], anchor="y" + suffix)
        if x_range:
            xaxis["range"] = x_range
        if k:
            xaxis["matches"] = "x"
        layout["xaxis" + suffix] = xaxis
        layout["yaxis" + suffix] = _axis(
            domain=y_domains[row], anchor="x" + suffix, exponentformat="none", **_value_axis(series, k)
        )
        shapes += _exclusion_shapes(excluded, "x" + suffix, f"y{suffix} domain")
        annotations.append(_subplot_title(label, f"x{suffix} domain", y_domains[row][1]))
    layout.update(shapes=shapes, annotations=annotations)
    _legend_below(layout, rows=max(1, math.ceil(min(len(series), MAX_LEGEND_BLOCKS) / 8)))
    return {"data": traces, "layout": layout}


def cell_figure(data):
    """Scan-varying unit cell parameters against image number, one trace per block."""
    return _scan_varying_figure(data, "cell", CELL_LABELS, rows=2, cols=3, height=600)


def orientation_figure(data):
    """Scan-varying crystal orientation (three angles) against image number."""
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
                "type": "scatter", "mode": "lines+markers", "name": f"block {_e(number)}",
                "x": x, "y": y, "customdata": [d for _, d in shells],
                "line": {"color": colours.get(str(number), "#1f77b4"), "width": 2},
                "hovertemplate": "d = %{customdata:.2f} Å: %{y:.1f}<extra>block " + _e(number) + "</extra>",
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

NO_PLOT = {
    "plot-spots": "No per-image spot counts in the summary.",
    "plot-rmsd": "No refinement RMSDs in the summary.",
    "plot-cell": "No scan-varying crystal model in the summary.",
    "plot-orientation": "No scan-varying crystal model in the summary.",
    "plot-isigi": "No integrated intensities in the summary.",
}


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def _table(header, rows, table_id="", css="", row_attrs=None, foot=None) -> str:
    """An HTML table; header and cells are already escaped HTML."""
    attrs = (f' id="{table_id}"' if table_id else "") + (f' class="{css}"' if css else "")
    out = [f"<table{attrs}>"]
    if header:
        out.append("<thead><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr></thead>")
    out.append("<tbody>")
    for i, row in enumerate(rows):
        extra = row_attrs[i] if row_attrs else ""
        out.append(f"<tr{extra}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    out.append("</tbody>")
    if foot:
        out.append("<tfoot><tr>" + "".join(f"<td>{c}</td>" for c in foot) + "</tr></tfoot>")
    out.append("</table>")
    return "\n".join(out)


def _final_rmsd(block) -> dict:
    """RMSDs of the final refinement: scan-varying if it ran, else static."""
    for key in ("rmsd_scan_varying", "rmsd_static"):
        if isinstance(block.get(key), dict):
            return block[key]
    return {}


def block_table(data) -> str:
    blocks = _blocks(data)
    if not blocks:
        return '<p class="note">No blocks were processed.</p>'
    header = [
        "Block", "Images", "φ range (°)", "Strong spots", "Indexed (%)",
        "RMSD x (px)", "RMSD y (px)", "RMSD φ (images)", "Refinement", "Profile",
        "Integrated", "Cut by a gap", "&lt;I/σ(I)&gt;",
    ]
    rows, attrs = [], []
    for b in blocks:
        rmsd = _final_rmsd(b)
        fraction = b.get("indexed_fraction")
        n_images = b.get("n_images", b["last"] - b["first"] + 1)
        rows.append(
            [
                _e(b.get("number")),
                f"{b['first']}-{b['last']} ({_fmt(n_images, 'd')})",
                f"{_fmt(b.get('phi_start'), '.1f')} to {_fmt(b.get('phi_end'), '.1f')}",
                _fmt(b.get("spots"), "d"),
                _fmt(100 * fraction if _is_number(fraction) else None, ".1f"),
                _fmt(rmsd.get("x"), ".3f"),
                _fmt(rmsd.get("y"), ".3f"),
                _fmt(rmsd.get("phi"), ".3f"),
                _e(b.get("refinement")),
                _e(b.get("profile")),
                _fmt(b.get("integrated"), "d"),
                _fmt(b.get("gap_edge"), "d"),
                _fmt(b.get("mean_isigi"), ".1f"),
            ]
        )
        attrs.append(f' class="block-row" data-block="{_e(b.get("number"))}"')
    totals = data.get("totals") or {}
    foot = None
    if totals:
        foot = [
            "Total", _fmt(totals.get("images_used"), "d"), "", _fmt(totals.get("spots"), "d"),
            "", "", "", "", "", "", _fmt(totals.get("integrated"), "d"),
            _fmt(totals.get("gap_edge"), "d"), "",
        ]
    return _table(header, rows, table_id="blocks-table", css="numbers", row_attrs=attrs, foot=foot)


def crystal_table(data) -> str:
    final = (data.get("crystal") or {}).get("final") or {}
    cell = final.get("unit_cell") or []
    if len(cell) != 6:
        return '<p class="note">No crystal model.</p>'
    esd = final.get("unit_cell_esd") or [None] * 6
    spread = final.get("cell_spread") or [None] * 6
    rows = [
        [label, _fmt(v, ".4f"), _fmt(e, ".4f"), _fmt(s, ".4f")]
        for label, v, e, s in zip(CELL_LABELS, cell, list(esd) + [None] * 6, list(spread) + [None] * 6)
    ]
    return _table(
        ["Cell", "Value", "ESD", "Spread across blocks (max - min)"], rows,
        table_id="cell-table", css="numbers",
    )


def excluded_table(data) -> str:
    """Images not used, grouped by reason, with compact ranges."""
    excluded = _excluded(data)
    if not excluded:
        return '<p class="note">All images were used.</p>'
    groups = {}
    for image, reason, category in excluded:
        groups.setdefault((category, str(reason)), []).append(image)
    order = [key for key, _, _, _ in CATEGORIES]
    rows, attrs = [], []
    for (category, reason), images in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), min(kv[1]))):
        label, colour, _ = _CATEGORY[category]
        rows.append(
            [
                f'<span class="swatch" style="background:{colour}"></span>{_e(label)}',
                _e(reason), _e(compact_ranges(images)), str(len(images)),
            ]
        )
        attrs.append(f' data-category="{category}"')
    return _table(["Category", "Reason", "Images", "Number"], rows, table_id="excluded-table", row_attrs=attrs)


def merging_table(scaling) -> str:
    """The merging statistics as DIALS tabulates them (labels, digits):
    Overall, Low and High resolution shells."""
    rows = []
    for key, label in MERGING_LABELS.items():
        values = scaling.get(key)
        if not isinstance(values, (list, tuple)) or not values:
            continue
        values = list(values)[:3] + [None] * (3 - len(values[:3]))
        spec = DIALS_FORMATS[label].strip().lstrip("%0123456789")  # " %7.2f" -> ".2f"
        rows.append([_e(label)] + [_fmt(v, spec) for v in values])
    if not rows:
        return '<p class="note">No merging statistics.</p>'
    return _table(["", "Overall", "Low", "High"], rows, table_id="merging-table", css="numbers")


def shells_table(scaling) -> str:
    """Merging statistics per resolution shell (folded away by default)."""
    shells = [s for s in scaling.get("shells") or [] if isinstance(s, dict)]
    if not shells:
        return ""
    columns = [
        ("d max", "d_max", ".2f"), ("d min", "d_min", ".2f"), ("Observations", "n_obs", "d"),
        ("Unique", "n_unique", "d"), ("Completeness (%)", "completeness", ".1f"),
        ("Multiplicity", "multiplicity", ".2f"), ("I/sigma", "i_over_sigma", ".1f"),
        ("CC half", "cc_half", ".4f"), ("Rmerge", "r_merge", ".3f"), ("Rpim", "r_pim", ".3f"),
    ]
    rows = [[_fmt(s.get(key), fmt) for _, key, fmt in columns] for s in shells]
    table = _table([label for label, _, _ in columns], rows, table_id="shells-table", css="numbers")
    return f"<details><summary>Statistics per resolution shell</summary>\n{table}\n</details>"


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------

CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { background: #2a3f5f; color: white; padding: 12px 24px; }
header h1 { margin: 0; font-size: 22px; }
header p { margin: 4px 0 0 0; font-size: 13px; color: #dde; word-break: break-all; }
nav { position: sticky; top: 0; background: #eef1f6; padding: 6px 24px; border-bottom: 1px solid #ccd;
      font-size: 13px; z-index: 10; }
nav a { margin-right: 14px; color: #2a3f5f; text-decoration: none; }
main { padding: 8px 24px 40px 24px; max-width: 1400px; }
section { background: white; border: 1px solid #dde; border-radius: 4px; padding: 8px 16px 12px 16px;
          margin: 14px 0; }
h2 { font-size: 18px; margin: 6px 0 10px 0; color: #2a3f5f; }
h3 { font-size: 15px; margin: 14px 0 6px 0; }
table { border-collapse: collapse; font-size: 13px; margin: 4px 0 8px 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e3e3e3; text-align: left; vertical-align: top; }
th { background: #eef1f6; }
tbody tr:nth-child(even) { background: #f7f8fb; }
tfoot td { font-weight: bold; border-top: 2px solid #ccd; }
table.numbers td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
table.numbers th:not(:first-child) { text-align: right; }
.note { color: #666; font-style: italic; }
.warning { color: #8a4b00; }
.swatch { display: inline-block; width: 11px; height: 11px; margin-right: 6px; opacity: 0.6;
          vertical-align: baseline; }
.plot { width: 100%; }
.caption { font-size: 12px; color: #555; margin: 0 0 4px 0; }
.columns { display: flex; flex-wrap: wrap; gap: 0 40px; }
pre { background: #f4f4f4; padding: 8px; font-size: 12px; overflow-x: auto; }
"""

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

SCRIPT = """
(function () {
  "use strict";
  var figures = %s;
  var config = {responsive: true, displaylogo: false};
  var rendered = [];
  Object.keys(figures).forEach(function (id) {
    try {
      rendered.push(Plotly.newPlot(id, figures[id].data, figures[id].layout, config));
    } catch (err) {
      console.error("dials.process_gapped report: plot " + id + " failed: " + err);
    }
  });
  Promise.all(rendered).then(function () {
    document.body.setAttribute("data-plots-rendered", String(rendered.length));
  }, function (err) {
    console.error("dials.process_gapped report: " + err);
  });
})();
"""


def _overview(data) -> str:
    """Key numbers of the run as a two-column table."""
    inputs = data.get("input") or {}
    totals = data.get("totals") or {}
    final = (data.get("crystal") or {}).get("final") or {}
    scaling = data.get("scaling") or {}
    image_range = _image_range(data)
    rows = []
    if inputs.get("template"):
        rows.append(["Images", _e(inputs.get("template"))])
    if image_range:
        rows.append(["Image range", f"{image_range[0]}-{image_range[1]}"])
    if inputs.get("format"):
        rows.append(["Format", _e(inputs.get("format"))])
    blocks = _blocks(data)
    dropped = data.get("dropped_blocks") or []
    text = f"{len(blocks)}"
    if dropped:
        text += f" ({len(dropped)} dropped)"
    rows.append(["Blocks", text])
    rows.append(
        [
            "Images used / not used",
            f"{_fmt(totals.get('images_used'), 'd')} / {len(_excluded(data))}",
        ]
    )
    cell = final.get("unit_cell") or []
    if len(cell) == 6:
        esd = list(final.get("unit_cell_esd") or []) + [None] * 6
        parts = [
            f"{_fmt(v, '.4f')}" + (f" ± {_fmt(e, '.4f')}" if _is_number(e) else "")
            for v, e in zip(cell, esd)
        ]
        rows.append(["Unit cell (Å, °)", ", ".join(parts)])
    if final.get("space_group"):
        rows.append(["Space group (integration)", _e(final.get("space_group"))])
    symmetry = scaling.get("symmetry") or {}
    if symmetry.get("space_group"):
        rows.append(["Space group (scaling)", _e(symmetry.get("space_group"))])
    if totals:
        rows.append(
            [
                "Reflections",
                f"{_fmt(totals.get('spots'), 'd')} strong spots, {_fmt(totals.get('indexed'), 'd')} "
                f"indexed, {_fmt(totals.get('integrated'), 'd')} integrated",
            ]
        )
    if scaling:
        rows.append(
            [
                "Resolution, completeness",
                f"{_fmt(_first(scaling.get('d_min')), '.2f')} Å, "
                f"{_fmt(_first(scaling.get('completeness')), '.1f')} %",
            ]
        )
    seconds = (data.get("timing") or {}).get("total_seconds")
    if _is_number(seconds):
        rows.append(["Run time", f"{_fmt(seconds, '.1f')} s"])
    warnings = data.get("warnings") or []
    if warnings:
        rows.append(["Warnings", f'<span class="warning">{len(warnings)} (see below)</span>'])
    return _table(None, rows, table_id="overview-table")


def _first(values):
    return values[0] if isinstance(values, (list, tuple)) and values else None


def _run_details(data) -> str:
    """Dropped blocks, warnings, files, timing, versions and parameters."""
    out = []
    dropped = data.get("dropped_blocks") or []
    out.append("<h3>Dropped blocks</h3>")
    if dropped:
        out.append('<ul id="dropped-blocks">')
        for d in dropped:
            d = d or {}
            out.append(f"<li>images {_e(d.get('first'))}-{_e(d.get('last'))}: {_e(d.get('reason'))}</li>")
        out.append("</ul>")
    else:
        out.append('<p class="note">None.</p>')

    warnings = data.get("warnings") or []
    out.append("<h3>Warnings</h3>")
    if warnings:
        out.append('<ul id="warnings">' + "".join(f'<li class="warning">{_e(w)}</li>' for w in warnings) + "</ul>")
    else:
        out.append('<p class="note">None.</p>')

    out.append('<div class="columns"><div>')
    files = [f for f in data.get("files") or [] if isinstance(f, dict)]
    out.append("<h3>Files written</h3>")
    if files:
        rows = [[_e(f.get("name")), _e(f.get("kind")), _fmt(f.get("reflections"), "d")] for f in files]
        out.append(_table(["File", "Contents", "Reflections"], rows, table_id="files-table"))
    else:
        out.append('<p class="note">None.</p>')
    out.append("</div><div>")

    timing = data.get("timing") or {}
    stages = [s for s in timing.get("stages") or [] if isinstance(s, dict)]
    total = timing.get("total_seconds")
    out.append("<h3>Timing</h3>")
    if stages:
        rows = []
        for s in stages:
            seconds = s.get("seconds")
            share = 100 * seconds / total if _is_number(seconds) and _is_number(total) and total > 0 else None
            rows.append([_e(s.get("name")), _fmt(seconds, ".1f"), _fmt(share, ".0f")])
        out.append(
            _table(
                ["Stage", "Seconds", "% of total"], rows, table_id="timing-table", css="numbers",
                foot=["Total", _fmt(total, ".1f"), ""],
            )
        )
    else:
        out.append('<p class="note">No timing.</p>')
    out.append("</div><div>")

    versions = data.get("versions") or {}
    out.append("<h3>Versions</h3>")
    if versions:
        rows = [[_e(k), _e(v)] for k, v in versions.items()]
        out.append(_table(["Software", "Version"], rows, table_id="versions-table"))
    else:
        out.append('<p class="note">Not recorded.</p>')
    out.append("</div></div>")

    modified = ((data.get("parameters") or {}).get("modified") or "").strip()
    out.append("<h3>Parameters changed from the defaults</h3>")
    out.append(f"<pre>{_e(modified)}</pre>" if modified else '<p class="note">None (all defaults).</p>')
    return "\n".join(out)


def _plotly_js() -> str:
    """The plotly.js library, to be embedded inline."""
    import plotly.offline

    return plotly.offline.get_plotlyjs()


def html_report(data: dict) -> str:
    """The self-contained HTML report of a run, from its machine-readable summary."""
    data = data or {}
    figures = {}
    for plot_id, make in FIGURES.items():
        figure = make(data)
        if figure is not None:
            figures[plot_id] = figure

    # the plots, each with a caption (or a note if there is nothing to plot)
    plot_sections = []
    for plot_id, title in PLOTS:
        body = (
            f'<p class="caption">{_e(CAPTIONS[plot_id])}</p>\n<div id="{plot_id}" class="plot"></div>'
            if plot_id in figures
            else f'<p class="note">{_e(NO_PLOT[plot_id])}</p>'
        )
        plot_sections.append(f'<section id="section-{plot_id}">\n<h2>{_e(title)}</h2>\n{body}\n</section>')

    scaling = data.get("scaling")
    if isinstance(scaling, dict) and scaling:
        space_group = (scaling.get("symmetry") or {}).get("space_group")
        merging = (
            f"<h2>Merging statistics (space group {_e(space_group or '?')})</h2>\n"
            f"{merging_table(scaling)}\n{shells_table(scaling)}"
        )
    else:
        merging = '<h2>Merging statistics</h2>\n<p class="note">The blocks were not scaled.</p>'

    inputs = data.get("input") or {}
    program = data.get("program") or "dials.process_gapped"
    nav = [
        ("summary", "Summary"), ("blocks", "Blocks"), ("merging", "Merging"),
        ("section-plot-spots", "Spots"), ("section-plot-rmsd", "RMSDs"),
        ("section-plot-cell", "Cell"), ("section-plot-orientation", "Orientation"),
        ("section-plot-isigi", "I/σ"), ("run", "Run details"),
    ]
    page = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(program)} report</title>",
        f"<style>{CSS}</style>",
        # plotly.js inline: the page works offline
        f'<script type="text/javascript">{_plotly_js()}</script>' if figures else "",
        "</head>",
        "<body>",
        "<header>",
        f"<h1>{_e(program)}</h1>",
        f"<p>{_e(inputs.get('template') or '')}</p>",
        "</header>",
        "<nav>" + "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in nav) + "</nav>",
        "<main>",
        '<section id="summary">',
        "<h2>Summary</h2>",
        '<div class="columns"><div>',
        _overview(data),
        "</div><div>",
        crystal_table(data),
        "</div></div>",
        "<h3>Images not used</h3>",
        excluded_table(data),
        "</section>",
        '<section id="blocks">',
        "<h2>Blocks</h2>",
        block_table(data),
        "</section>",
        f'<section id="merging">\n{merging}\n</section>',
        *plot_sections,
        '<section id="run">',
        "<h2>Run details</h2>",
        _run_details(data),
        "</section>",
        "</main>",
        # the figures; body[data-plots-rendered] is set once they are drawn
        f"<script>{SCRIPT % _json_for_script(figures)}</script>",
        "</body>",
        "</html>",
    ]
    return "\n".join(line for line in page if line) + "\n"


if __name__ == "__main__":
    # python -m dials_gapfill.report.html dials.process_gapped.json report.html
    import sys

    with open(sys.argv[1], encoding="utf-8") as fh:
        summary = json.load(fh)
    with open(sys.argv[2], "w", encoding="utf-8") as fh:
        fh.write(html_report(summary))
