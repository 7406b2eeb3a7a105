"""Self-contained HTML report (plotly)."""

from __future__ import annotations

import html
import json


def html_report(data: dict) -> str:
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>dials.process_gapped</title></head>"
        f"<body><pre>{html.escape(json.dumps(data, indent=1))}</pre></body></html>"
    )
