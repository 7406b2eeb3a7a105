"""The HTML report: structure of the page, and the page rendered in headless Chromium.

The summaries are built here (a gapped 3-block sweep with most kinds of excluded
image, a sweep with an image of each status, static crystal models, two sweeps,
and a 1-block run without plot data or scaling), so these tests need no
processing and are fast. The browser test drives Debian's Chromium through the
DevTools protocol on a pipe (standard library only): it fails, not skips, if
Chromium is missing. Set GAPFILL_HTML_SCREENSHOT=path.png to keep the screenshot.
"""

from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time

import pytest

import dials_gapfill  # noqa: F401  (sets up libtbx for the venv before dials imports)
from dials_gapfill.report.html import (
    CATEGORIES,
    FIGURES,
    cell_figure,
    compact_ranges,
    html_report,
    isigi_figure,
    orientation_figure,
    spots_figure,
)

PLOT_IDS = ["plot-spots", "plot-rmsd", "plot-cell", "plot-orientation", "plot-isigi"]
NASTY = "<script>alert('x')</script>"


# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------


def _block(number, first, last, scan_varying=True):
    n = last - first + 1
    block = {
        "number": number, "first": first, "last": last, "n_images": n,
        "phi_start": 0.5 * (first - 1), "phi_end": 0.5 * last,
        "identifier": f"id-{number}", "spots": 200 * n, "indexed": 190 * n,
        "indexed_fraction": 0.95,
        "rmsd_static": {"x": 0.06 + 0.01 * number, "y": 0.05, "phi": 0.09, "n": 150 * n},
        "refinement": "scan-varying" if scan_varying else "static",
        "profile": "own", "integrated": 300 * n, "mean_isigi": 20.0 + number,
        "profile_fitted": 280 * n,
        "unit_cell": [54.0, 62.0, 71.0, 90.0, 90.0, 90.0],
        "unit_cell_esd": [0.01, 0.02, 0.07, 0.1, 0.1, 0.08],
    }
    if scan_varying:
        block["rmsd_scan_varying"] = {"x": 0.05, "y": 0.045, "phi": 0.08, "n": 149 * n}
    return block


def _scan_varying(number, first, last, static=False):
    points = [first] if static else list(range(first, last + 2))
    return {
        "block": number,
        "image": points,
        "cell": [[54 + 1e-4 * i, 62.0, 71.0, 90.0, 90.0 - 1e-4 * i, 90.0] for i in range(len(points))],
        "orientation_deg": [[1e-3 * i, -2e-3 * i, 5e-4 * i * i] for i in range(len(points))],
    }


def full_summary():
    """A 60-image sweep: 3 blocks (block 2 static only), missing files, images
    excluded by the user, a bad image, a dropped block, scaling and text that
    needs escaping."""
    blocks = [_block(1, 1, 15), _block(2, 21, 35, scan_varying=False), _block(3, 46, 60)]
    excluded = (
        [{"image": n, "reason": "missing file", "by": "input"} for n in (16, 17, 18)]
        + [{"image": n, "reason": "gaps.exclude_images", "by": "user"} for n in (19, 20)]
        + [{"image": 36, "reason": "blank image (3 strong spots; shutter or beam failure)", "by": "auto"}]
        + [{"image": 37, "reason": f"unreadable: {NASTY}", "by": "auto"}]
        + [{"image": n, "reason": "block could not be indexed", "by": "auto"} for n in range(38, 46)]
    )
    used = [n for b in blocks for n in range(b["first"], b["last"] + 1)]
    scaling = {
        "symmetry": {"laue_group": "P m m m", "space_group": "P 21 21 2", "cb_op": "a,b,c", "determined": True},
        "blocks": 3,
        "d_max": [54.0, 54.0, 1.74], "d_min": [1.71, 4.65, 1.71],
        "n_obs": [32771, 2690, 24], "n_unique": [15522, 1107, 24],
        "completeness": [59.1, 76.3, 1.9], "multiplicity": [2.11, 2.43, 1.0],
        "i_over_sigma": [28.8, 92.8, 3.6], "cc_half": [0.996, 0.9988, 0.0],
        "r_merge": [0.021, 0.010, 0.0], "r_meas": [0.026, 0.013, 0.0], "r_pim": [0.016, 0.008, 0.0],
        "shells": [
            {"d_max": 54.0, "d_min": 4.65, "n_obs": 2690, "n_unique": 1107, "completeness": 76.3,
             "multiplicity": 2.43, "i_over_sigma": 92.8, "cc_half": 0.9988, "r_merge": 0.0104, "r_pim": 0.008},
        ],
        "merged_reflections": 15522,
    }
    return {
        "program": "dials.process_gapped",
        "layout_version": 1,
        "versions": {"dials_gapfill": "0.1.0", "dials": "DIALS 3.12", "python": "3.11.2"},
        "parameters": {"modified": "gaps {\n  exclude_images = 19:20\n}\n", "working": None},
        "input": {
            "template": "/data/a&b/<x>_####.cbf", "n_files": 57, "exclude_images": [[19, 20]],
            "format": "FormatCBFMiniPilatus", "image_range": [1, 60], "total_seconds": 42.0,
        },
        "blocks": blocks,
        "dropped_blocks": [{"first": 38, "last": 45, "reason": "only 3% of its spots indexed"}],
        "excluded_images": excluded,
        "crystal": {
            "final": {
                "unit_cell": [54.0, 62.0, 71.0, 90.0, 90.0, 90.0],
                "unit_cell_esd": [0.014, 0.024, 0.076, 0.11, 0.096, 0.083],
                "space_group": "P 1",
                "cell_spread": [0.0002, 0.0014, 0.0005, 0.001, 0.0009, 0.0008],
                "n_crystal_models": 3,
            }
        },
        "totals": {"blocks": 3, "images_used": 45, "images_excluded": 15,
                   "spots": 9000, "indexed": 8550, "integrated": 13500},
        "per_image": {"image": used, "spots": [200 + (7 * n) % 40 for n in used]},
        "scaling": scaling,
        "files": [
            {"name": "integrated.expt", "kind": "experiments", "blocks": 3},
            {"name": "integrated.refl", "kind": "reflections", "reflections": 13500},
            {"name": "merged.mtz", "kind": "merged mtz", "reflections": 15522},
        ],
        "timing": {"total_seconds": 42.0, "stages": [{"name": "import", "seconds": 0.5},
                                                     {"name": "indexing", "seconds": 30.0},
                                                     {"name": "integration", "seconds": 11.5}]},
        "warnings": [f"block 2 looks odd: {NASTY}"],
        "plots": {
            "scan_varying": [_scan_varying(1, 1, 15), _scan_varying(2, 21, 35, static=True),
                             _scan_varying(3, 46, 60)],
            "isigi_vs_resolution": {
                "d_centre": [7.6, 4.4, 3.4, 2.9, 2.55],
                "blocks": {"1": [66.0, 37.0, 28.0, 21.0, 15.0],
                           "2": [64.0, 36.0, None, 20.0, 14.0],
                           "3": [62.0, 36.5, 28.9, 20.5, float("nan")]},
            },
        },
    }


def minimal_summary():
    """One block, no plot data, not scaled, no files or timing."""
    block = _block(1, 1, 20, scan_varying=False)
    return {
        "program": "dials.process_gapped",
        "input": {"template": "/data/x_####.cbf", "image_range": [1, 20]},
        "blocks": [block],
        "dropped_blocks": [],
        "excluded_images": [],
        "crystal": {"final": {"unit_cell": block["unit_cell"], "unit_cell_esd": None, "space_group": "P 1"}},
        "totals": {"blocks": 1, "images_used": 20, "spots": 4000, "indexed": 3800, "integrated": 6000},
        "per_image": {"image": list(range(1, 21)), "spots": [200] * 20},
        "scaling": None,
        "warnings": [],
    }


def status_summary():
    """A 40-image sweep with images of each status not used, as
    dials.process_gapped writes them (status, reason, who decided)."""
    data = minimal_summary()
    blocks = [_block(1, 1, 20), _block(2, 28, 35)]
    data["blocks"] = blocks
    data["input"]["image_range"] = [1, 40]
    data["excluded_images"] = (
        [{"image": n, "status": "missing file", "reason": "missing file", "by": "input"} for n in (21, 22)]
        + [{"image": n, "status": "not given", "reason": "not given (the file exists)", "by": "input"}
           for n in (23, 24, 25)]
        + [{"image": 26, "status": "excluded", "reason": "gaps.exclude_images", "by": "user"}]
        + [{"image": 27, "status": "bad", "reason": "blank image (2 strong spots)", "by": "auto"}]
        + [{"image": n, "status": "dropped", "reason": "block could not be indexed", "by": "auto"}
           for n in range(36, 41)]
    )
    data["dropped_blocks"] = [{"first": 36, "last": 40, "reason": "block could not be indexed"}]
    used = [n for b in blocks for n in range(b["first"], b["last"] + 1)]
    data["per_image"] = {"image": used, "spots": [200] * len(used)}
    return data


def static_summary():
    """The 3-block sweep of full_summary with a static crystal model for each
    block (one point per block in the plot data)."""
    data = full_summary()
    for b in data["blocks"]:
        b["refinement"] = "static"
        b.pop("rmsd_scan_varying", None)
    data["plots"]["scan_varying"] = [
        _scan_varying(n, first, last, static=True) for n, first, last in ((1, 1, 15), (2, 21, 35), (3, 46, 60))
    ]
    return data


def two_sweep_summary():
    """Two sweeps of one crystal whose image numbers overlap: sweep 1, images
    1-40 in blocks 1 (1-20) and 2 (24-40), 21-22 missing, 23 bad; sweep 2
    (batch offset 100), images 1-30 in block 3 (1-20, static), 21-22 missing,
    23-25 not given, 26-30 excluded by the user."""
    data = full_summary()
    blocks = [dict(_block(1, 1, 20), sweep=1), dict(_block(2, 24, 40), sweep=1),
              dict(_block(3, 1, 20, scan_varying=False), sweep=2)]
    data["sweeps"] = [
        {"number": 1, "template": "/data/s1_####.cbf", "image_range": [1, 40], "n_blocks": 2,
         "batch_offset": 0, "goniometer": "omega"},
        {"number": 2, "template": "/data/s2_####.cbf", "image_range": [1, 30], "n_blocks": 1,
         "batch_offset": 100, "goniometer": f"kappa 30 {NASTY}"},
    ]
    data["input"] = {"template": ["/data/s1_####.cbf", "/data/s2_####.cbf"], "format": "FormatCBFMiniPilatus",
                     "image_range": [1, 40]}
    data["blocks"] = blocks
    data["dropped_blocks"] = []
    data["excluded_images"] = (
        [{"image": n, "sweep": 1, "status": "missing file", "reason": "missing file", "by": "input"} for n in (21, 22)]
        + [{"image": 23, "sweep": 1, "status": "bad", "reason": "blank image", "by": "auto"}]
        + [{"image": n, "sweep": 2, "status": "missing file", "reason": "missing file", "by": "input"} for n in (21, 22)]
        + [{"image": n, "sweep": 2, "status": "not given", "reason": "not given (the file exists)", "by": "input"}
           for n in (23, 24, 25)]
        + [{"image": n, "sweep": 2, "status": "excluded", "reason": "gaps.exclude_images", "by": "user"}
           for n in range(26, 31)]
    )
    sweep1 = [n for b in blocks[:2] for n in range(b["first"], b["last"] + 1)]
    sweep2 = list(range(1, 21))
    data["per_image"] = {
        "image": sweep1 + sweep2,
        "spots": [200 + n for n in sweep1] + [500 + n for n in sweep2],
        "sweep": [1] * len(sweep1) + [2] * len(sweep2),
    }
    data["totals"] = {"blocks": 3, "images_used": 57, "images_excluded": 13,
                      "spots": 11400, "indexed": 10830, "integrated": 17100}
    data["plots"]["scan_varying"] = [_scan_varying(1, 1, 20), _scan_varying(2, 24, 40),
                                     _scan_varying(3, 1, 20, static=True)]
    return data


def long_summary(n_blocks=12, per_block=300, gap=10):
    """A long sweep (3720 images): blocks of 300 scan-varying images with 10
    missing files after each."""
    data = full_summary()
    blocks, scan_varying, excluded, used = [], [], [], []
    first = 1
    for k in range(1, n_blocks + 1):
        last = first + per_block - 1
        blocks.append(_block(k, first, last))
        scan_varying.append(_scan_varying(k, first, last))
        used += range(first, last + 1)
        excluded += [{"image": n, "status": "missing file", "reason": "missing file", "by": "input"}
                     for n in range(last + 1, last + 1 + gap)]
        first = last + 1 + gap
    data.update(blocks=blocks, excluded_images=excluded, dropped_blocks=[])
    data["input"]["image_range"] = [1, first - 1]
    data["per_image"] = {"image": used, "spots": [200 + n % 40 for n in used]}
    data["plots"]["scan_varying"] = scan_varying
    data["plots"]["isigi_vs_resolution"]["blocks"] = {
        str(k): [66.0, 37.0, 28.0, 21.0, 15.0] for k in range(1, n_blocks + 1)
    }
    return data


# ---------------------------------------------------------------------------
# Structure of the page
# ---------------------------------------------------------------------------


class _Page(html.parser.HTMLParser):
    """Elements of a page: ids, table rows by table id, script elements."""

    def __init__(self, text):
        super().__init__()
        self.ids, self.rows, self.scripts, self.external = set(), {}, [], []
        self._tables, self._in_script = [], False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "table":
            self._tables.append(attrs.get("id"))
        elif tag == "tr" and self._tables:
            self.rows.setdefault(self._tables[-1], []).append(attrs)
        elif tag == "script":
            self._in_script = True
            self.scripts.append("")
            if attrs.get("src"):
                self.external.append(attrs["src"])
        elif tag in ("link", "img", "iframe") and (attrs.get("href") or attrs.get("src")):
            self.external.append(attrs.get("href") or attrs.get("src"))

    def handle_endtag(self, tag):
        if tag == "table" and self._tables:
            self._tables.pop()
        elif tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def _figures(page):
    """The figures JSON of the page's last script."""
    script = page.scripts[-1]
    start = script.index("var figures = ") + len("var figures = ")
    return json.loads(script[start:script.index(";\n", start)])


def test_compact_ranges():
    assert compact_ranges([45, 41, 42, 43, 44, 81, 82, 83, 100]) == "41-45, 81-83, 100"
    assert compact_ranges([7]) == "7"
    assert compact_ranges([]) == ""


def test_full_report_structure():
    text = html_report(full_summary())
    page = _Page(text)
    # every plot, and nothing fetched from elsewhere: plotly.js is inline
    for plot_id in PLOT_IDS:
        assert plot_id in page.ids
    assert not page.external
    assert len(page.scripts) == 2 and len(page.scripts[0]) > 1_000_000
    assert "Plotly.newPlot" in page.scripts[1]
    assert set(_figures(page)) == set(PLOT_IDS)
    # a row per block, the merging table Overall/Low/High, one row per kind of exclusion
    block_rows = [r for r in page.rows["blocks-table"] if r.get("class") == "block-row"]
    assert [r["data-block"] for r in block_rows] == ["1", "2", "3"]
    assert len(page.rows["merging-table"]) == 1 + 11
    assert ">Overall<" in text and ">Low<" in text and ">High<" in text
    assert "P 21 21 2" in text
    categories = [r["data-category"] for r in page.rows["excluded-table"][1:]]
    assert categories == ["missing", "user", "auto", "auto", "dropped"]
    assert "16-18" in text and "38-45" in text
    for table in ("files-table", "timing-table", "versions-table", "cell-table", "shells-table"):
        assert table in page.ids
    # text from the summary is escaped, in the page and in the plot hover texts
    assert "<script>alert" not in text and "<x>" not in text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in text  # jinja2's autoescape (markupsafe)
    assert "/data/a&amp;b/&lt;x&gt;_####.cbf" in text
    assert "</script>" not in page.scripts[1] and "<" not in page.scripts[1].split("var figures = ")[1]


def test_spots_figure_shades_excluded_images_by_category():
    figure = spots_figure(full_summary())
    bars = {t["name"].rsplit(" (", 1)[0]: t for t in figure["data"] if t["type"] == "bar"}
    # every category but "not given", which this summary has none of
    assert set(bars) == {label for key, label, _, _ in CATEGORIES if key != "not-given"}
    assert bars["missing file"]["x"] == [16, 17, 18]
    assert bars["excluded by user"]["x"] == [19, 20]
    assert bars["bad image (found automatically)"]["x"] == [36, 37]
    assert bars["dropped block"]["x"] == list(range(38, 46))
    assert "&lt;script&gt;" in bars["bad image (found automatically)"]["hovertext"][1]
    lines = [t for t in figure["data"] if t["type"] == "scatter"]
    assert [t["x"][0] for t in lines] == [1, 21, 46]
    assert figure["layout"]["xaxis"]["range"] == [0.5, 60.5]
    # a dashed boundary on each side of each block
    assert len([s for s in figure["layout"]["shapes"] if s["type"] == "line"]) == 6


def test_isigi_figure_runs_low_to_high_resolution():
    figure = isigi_figure(full_summary())
    x = figure["data"][0]["x"]
    assert x == sorted(x)  # 1/d^2 increases
    assert figure["layout"]["xaxis"]["ticktext"][0] == "7.60"
    assert figure["data"][1]["y"][2] is None  # a shell without reflections
    assert figure["data"][2]["y"][4] is None  # NaN


def test_minimal_report_structure():
    text = html_report(minimal_summary())
    page = _Page(text)
    assert {"plot-spots", "plot-rmsd"} <= page.ids
    assert not {"plot-cell", "plot-orientation", "plot-isigi", "merging-table"} & page.ids
    assert "The blocks were not scaled." in text
    assert "No scan-varying crystal model in the summary." in text
    assert len([r for r in page.rows["blocks-table"] if r.get("class") == "block-row"]) == 1
    assert set(_figures(page)) == {"plot-spots", "plot-rmsd"}


def test_empty_summary():
    text = html_report({})
    page = _Page(text)
    assert not set(PLOT_IDS) & page.ids
    assert len(page.scripts) == 1  # no plotly.js without plots
    assert "No blocks were processed." in text


def test_page_size():
    """plotly.js once and minified: a few MB, not the 8.7 MB of Debian's
    unminified plotly.js."""
    text = html_report(full_summary())
    page = _Page(text)
    assert len(text.encode("utf-8")) < 4_000_000
    assert page.scripts[0].startswith("/**\n* plotly.js v2.6.3") and len(page.scripts[0]) < 3_800_000
    assert text.count("Copyright 2012-2021, Plotly, Inc.") == 1


def test_figures_of_a_long_sweep_are_compact():
    """The crystal-model plots of 3720 images carry each scan point's numbers
    and nothing repeated per point (no hover label text, no x list where x0
    and dx say it)."""
    data = long_summary()
    sizes = {plot_id: len(json.dumps(make(data), separators=(",", ":"))) for plot_id, make in FIGURES.items()}
    assert sum(sizes.values()) < 600_000, sizes  # 1.23 MB with a hover label per point and panel
    for trace in cell_figure(data)["data"] + orientation_figure(data)["data"]:
        assert "x" not in trace and trace["dx"] == 1
        assert all(isinstance(n, int) for n in trace["customdata"])


def test_each_status_is_shown_as_itself():
    data = status_summary()
    expected = {
        "missing file": [21, 22], "not given (the file exists)": [23, 24, 25], "excluded by user": [26],
        "bad image (found automatically)": [27], "dropped block": list(range(36, 41)),
    }
    for with_status in (True, False):  # and from reason and who decided, without statuses
        if not with_status:
            for e in data["excluded_images"]:
                del e["status"]
        page = _Page(html_report(data))
        categories = [r["data-category"] for r in page.rows["excluded-table"][1:]]
        assert categories == ["missing", "not-given", "user", "auto", "dropped"]
        bars = {t["name"].rsplit(" (", 1)[0]: t["x"] for t in spots_figure(data)["data"] if t["type"] == "bar"}
        assert bars == expected


def test_static_crystal_models_are_one_point_per_block():
    data = static_summary()
    for figure in (cell_figure(data), orientation_figure(data)):
        assert all(t["mode"] == "markers" and len(t["x"]) == 1 == len(t["y"]) for t in figure["data"])
        assert sorted({t["x"][0] for t in figure["data"]}) == [8.0, 28.0, 53.0]  # the centres of the blocks
    text = html_report(data)
    assert "Unit cell per block (static crystal models)" in text
    assert "Crystal orientation per block (static crystal models)" in text
    assert "Scan-varying crystal orientation" not in text
    assert "The crystal model of each block is static" in text
    # one static block among scan-varying ones: a point, named in the caption
    data = full_summary()
    block_2 = [t for t in orientation_figure(data)["data"] if t["name"] == "block 2"]
    assert block_2 and all(t["mode"] == "markers" and t["x"] == [28.0] for t in block_2)
    assert "Block 2: static crystal model" in html_report(data)


def test_two_sweeps_grouped_by_sweep():
    data = two_sweep_summary()
    text = html_report(data)
    page = _Page(text)
    # blocks and images not used: a heading row per sweep, then its rows
    rows = [(r["class"], r["data-sweep"], r.get("data-block")) for r in page.rows["blocks-table"] if r.get("class")]
    assert rows == [("sweep-row", "1", None), ("block-row", "1", "1"), ("block-row", "1", "2"),
                    ("sweep-row", "2", None), ("block-row", "2", "3")]
    rows = [(r.get("class"), r["data-sweep"], r.get("data-category")) for r in page.rows["excluded-table"][1:]]
    assert rows == [("sweep-row", "1", None), (None, "1", "missing"), (None, "1", "auto"),
                    ("sweep-row", "2", None), (None, "2", "missing"), (None, "2", "not-given"), (None, "2", "user")]
    assert "Sweep 2: /data/s2_####.cbf, images 1-30" in text
    assert "<p>/data/s1_####.cbf, /data/s2_####.cbf</p>" in text and "[&#39;" not in text  # the header
    assert "(1 block; batch offset 100" in text and "(2 blocks; batch offset 0" in text
    assert "kappa 30 &lt;script&gt;" in text and "<script>alert" not in text
    assert ">21-22<" in text and text.count(">21-22<") == 2  # the same image numbers in both sweeps

    # the strong spots: a panel per sweep, each on its own image axis
    figure = spots_figure(data)
    layout = figure["layout"]
    assert layout["xaxis"]["range"] == [0.5, 40.5] and layout["xaxis2"]["range"] == [0.5, 30.5]
    assert layout["yaxis3"]["domain"][1] < layout["yaxis"]["domain"][0]  # sweep 2 below sweep 1
    lines = {t["name"].split(" (")[0]: t for t in figure["data"] if t["type"] == "scatter"}
    assert (lines["block 1"]["xaxis"], lines["block 1"]["yaxis"], lines["block 1"]["y"][0]) == ("x", "y2", 201)
    assert (lines["block 3"]["xaxis"], lines["block 3"]["yaxis"], lines["block 3"]["y"][0]) == ("x2", "y4", 501)
    bars = [t for t in figure["data"] if t["type"] == "bar"]
    missing = [(t["xaxis"], t["yaxis"], t["x"]) for t in bars if t["legendgroup"] == "missing"]
    assert missing == [("x", "y", [21, 22]), ("x2", "y3", [21, 22])]
    shown = [t["legendgroup"] for t in bars if t["showlegend"]]
    assert sorted(shown) == sorted(set(shown)) == ["auto", "missing", "not-given", "user"]

    # the crystal model over batches: image number + the sweep's batch offset
    cell = cell_figure(data)
    panel = {t["name"]: t for t in cell["data"] if t["xaxis"] == "x"}
    assert panel["block 2"]["x0"] == 23.5 and panel["block 3"]["x"] == [110.5]
    assert cell["layout"]["xaxis"]["range"] == [0.5, 130.5]


def test_one_sweep_looks_as_without_sweeps():
    data = full_summary()
    data["sweeps"] = [{"number": 1, "template": data["input"]["template"], "image_range": [1, 60],
                       "n_blocks": 3, "batch_offset": 0, "goniometer": "omega"}]
    for entry in data["blocks"] + data["excluded_images"]:
        entry["sweep"] = 1
    data["per_image"]["sweep"] = [1] * len(data["per_image"]["image"])
    assert html_report(data) == html_report(full_summary())


# ---------------------------------------------------------------------------
# The page in headless Chromium
# ---------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--mute-audio",
]


def _chromium():
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        pytest.fail(
            "chromium is needed for the HTML report test and is not installed: "
            "run `WITH_TEST_TOOLS=1 bash scripts/bootstrap.sh` (or `make setup-test`)",
            pytrace=False,
        )
    return path


# Run in the child process: put the two pipe ends on fds 3 and 4 (where
# --remote-debugging-pipe expects them), then become chromium.
_EXEC_WITH_PIPE = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1:3]]
ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in fds]  # out of the way of 3 and 4
for fd in fds:
    os.close(fd)
os.dup2(ends[0], 3)
os.dup2(ends[1], 4)
for fd in ends:
    os.close(fd)
os.execv(sys.argv[3], sys.argv[3:])
"""


class DevTools:
    """Chromium driven through the DevTools protocol on --remote-debugging-pipe.

    Messages are JSON texts ended by a NUL byte: commands are written to the
    browser's fd 3, answers and events come back on its fd 4.
    """

    def __init__(self, chromium, profile, log):
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _EXEC_WITH_PIPE, str(to_browser), str(from_browser),
             chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
             "about:blank"],
            pass_fds=(to_browser, from_browser), stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._messages = queue.Queue()
        self._next_id = 0
        self.events = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        pending = b""
        while True:
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                self._messages.put(None)
                return
            *complete, pending = (pending + chunk).split(b"\0")
            for message in complete:
                self._messages.put(json.loads(message))

    def call(self, method, params=None, session=None, timeout=30):
        """Send a command and return its result; events met meanwhile are kept."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._to_browser, data):]
        deadline = time.monotonic() + timeout
        while True:
            try:
                answer = self._messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"chromium did not answer {method} within {timeout} s") from None
            if answer is None:
                raise AssertionError(f"chromium exited during {method}")
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise AssertionError(f"{method}: {answer['error']}")
                return answer["result"]
            self.events.append(answer)

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except AssertionError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)  # our own process group (start_new_session)
            self.proc.wait()
        os.close(self._to_browser)
        self._log.close()


class Tab:
    """One page of the browser: load a URL, evaluate JavaScript, collect errors."""

    def __init__(self, browser, width=1280, height=1000):
        self.browser, self.width = browser, width
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.resize(height)

    def call(self, method, params=None, timeout=30):
        return self.browser.call(method, params, session=self.session, timeout=timeout)

    def resize(self, height):
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def load(self, url, ready="true", timeout=30):
        """Open url and wait until the page is loaded and `ready` is true."""
        self.browser.events.clear()
        self.call("Page.navigate", {"url": url})
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"document.readyState === 'complete' && !!({ready})"):
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} not ready ({ready}) within {timeout} s; errors: {self.errors()}")
            time.sleep(0.2)

    def errors(self):
        """JavaScript exceptions, console.error/assert calls and browser errors (e.g. failed loads)."""
        found = []
        for event in list(self.browser.events):
            method, params = event.get("method"), event.get("params", {})
            if event.get("sessionId") != self.session:
                continue
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append((details.get("exception") or {}).get("description") or details.get("text"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(params["entry"].get("text"))
        return found

    def screenshot(self):
        """PNG of the whole page."""
        height = self.evaluate("document.documentElement.scrollHeight")
        self.resize(height)
        time.sleep(0.3)
        shot = self.call(
            "Page.captureScreenshot",
            {"format": "png", "clip": {"x": 0, "y": 0, "width": self.width, "height": height, "scale": 1}},
        )
        return base64.b64decode(shot["data"])


PLOT_STATE = """JSON.stringify(Array.from(document.querySelectorAll('div.plot')).map(function (d) {
  var r = d.getBoundingClientRect();
  return {id: d.id, svg: d.querySelectorAll('.main-svg').length, traces: d.querySelectorAll('.trace').length,
          x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width, height: r.height};
}))"""


def _check_plots_in_browser(tab, path, expected_ids):
    """Load a report; no errors, every plot drawn with its traces; the screenshot."""
    tab.load("file://" + str(path), ready="document.body.hasAttribute('data-plots-rendered')")
    time.sleep(0.3)  # let late errors arrive
    assert tab.errors() == []
    assert tab.evaluate("document.body.getAttribute('data-plots-rendered')") == str(len(expected_ids))
    plots = json.loads(tab.evaluate(PLOT_STATE))
    assert [p["id"] for p in plots] == expected_ids
    for p in plots:
        assert p["svg"] >= 1 and p["traces"] >= 1, p
        assert p["width"] > 500 and p["height"] > 200, p
    png = tab.screenshot()
    assert tab.errors() == []
    _check_screenshot(png, plots)
    return png


def _check_screenshot(png, plots):
    """Each plot's area of the screenshot is drawn on: many colours, not mostly white."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    for p in plots:
        box = (int(p["x"]), int(p["y"]), int(p["x"] + p["width"]), int(p["y"] + p["height"]))
        area = image.crop(box)
        colours = {colour: count for count, colour in area.getcolors(maxcolors=1 << 24)}
        assert len(colours) > 30, (p["id"], len(colours))
        assert colours.get((255, 255, 255), 0) < 0.98 * area.width * area.height, p["id"]


def test_report_in_chromium(tmp_path):
    chromium = _chromium()
    control = tmp_path / "control.html"
    control.write_text(
        "<html><body><script>console.error('control-error');"
        "null.f();</script></body></html>"
    )
    full = tmp_path / "full.html"
    full.write_text(html_report(full_summary()), encoding="utf-8")
    minimal = tmp_path / "minimal.html"
    minimal.write_text(html_report(minimal_summary()), encoding="utf-8")
    two_sweeps = tmp_path / "two_sweeps.html"
    two_sweeps.write_text(html_report(two_sweep_summary()), encoding="utf-8")

    browser = DevTools(chromium, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        tab = Tab(browser)
        # the errors of a broken page are seen (else the checks below prove nothing)
        tab.load("file://" + str(control))
        time.sleep(0.3)
        errors = tab.errors()
        assert any("control-error" in e for e in errors), errors
        assert any("TypeError" in e for e in errors), errors

        png = _check_plots_in_browser(tab, full, PLOT_IDS)
        if os.environ.get("GAPFILL_HTML_SCREENSHOT"):
            with open(os.environ["GAPFILL_HTML_SCREENSHOT"], "wb") as fh:
                fh.write(png)
        _check_plots_in_browser(tab, minimal, ["plot-spots", "plot-rmsd"])
        png = _check_plots_in_browser(tab, two_sweeps, PLOT_IDS)
        if os.environ.get("GAPFILL_HTML_SCREENSHOT_SWEEPS"):
            with open(os.environ["GAPFILL_HTML_SCREENSHOT_SWEEPS"], "wb") as fh:
                fh.write(png)
    finally:
        browser.close()


@pytest.mark.slow
def test_report_of_a_real_run_in_chromium(processed, tmp_path):
    """The report dials.process_gapped wrote for the simulated 3-block sweep."""
    chromium = _chromium()
    path = os.path.join(processed["dir"], "dials.process_gapped.html")
    browser = DevTools(chromium, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        _check_plots_in_browser(Tab(browser), path, PLOT_IDS)
    finally:
        browser.close()


def _noisy_summary():
    """A summary whose scan-varying angles carry DIALS' rounding noise
    (constant to 1e-10) while the c axis really changes."""
    data = full_summary()
    for sv in data["plots"]["scan_varying"]:
        n = len(sv["image"])
        sv["cell"] = [
            [54.0, 62.0, 71.0 + 0.05 * i, 90.00000000000003 + (1e-11 if i % 2 else -1e-11),
             89.99999999999997, 90.0 + 1e-10 * i]
            for i in range(n)
        ]
    return data


def test_flat_cell_angles_are_flat_lines_at_90():
    figure = cell_figure(_noisy_summary())
    layout = figure["layout"]
    alpha = [t for t in figure["data"] if t["yaxis"] == "y4"]
    assert alpha and all(v == 90.0 for t in alpha for v in t["y"])  # rounding noise rounded away
    for k in (4, 5, 6):  # α, β, γ: a flat line at 90, ticks every 0.01 labelled with 2 decimals
        axis = layout[f"yaxis{k}"]
        assert axis["tickformat"] == ".2f" and axis["dtick"] == 0.01, axis
        low, high = axis["range"]
        assert low < 90.0 < high and (low + high) / 2 == pytest.approx(90.0) and high - low < 0.05
    # a parameter that changes keeps plotly's own range
    c = layout["yaxis3"]
    assert "range" not in c and c["tickformat"] == ".2f"


def test_flat_cell_angles_in_chromium(tmp_path):
    """The tick labels plotly draws for the α panel: 89.99, 90.00, 90.01."""
    chromium = _chromium()
    path = tmp_path / "noisy.html"
    path.write_text(html_report(_noisy_summary()), encoding="utf-8")
    browser = DevTools(chromium, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        tab = Tab(browser)
        tab.load("file://" + str(path), ready="document.body.hasAttribute('data-plots-rendered')")
        labels = json.loads(tab.evaluate(
            "JSON.stringify(['y4tick', 'y5tick', 'y6tick', 'y3tick'].map(function (c) {"
            " return Array.from(document.querySelectorAll('#plot-cell .' + c + ' text'))"
            ".map(function (t) { return t.textContent; }); }))"
        ))
    finally:
        browser.close()
    for ticks in labels[:3]:
        assert ticks == ["89.99", "90.00", "90.01"], labels
    assert len(labels[3]) >= 3 and all(len(t.split(".")[1]) == 2 for t in labels[3]), labels[3]
