"""Small helpers without DIALS imports (the HTML report uses them too)."""

from __future__ import annotations


def runs(numbers) -> list:
    """Runs of consecutive integers: [41, 42, 43, 45] -> [(41, 43), (45, 45)]."""
    out = []
    for n in sorted(set(numbers)):
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return [tuple(r) for r in out]


def range_text(numbers) -> str:
    """Compact text of a set of integers: [41, 42, 43, 45] -> "41-43, 45"."""
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs(numbers))
