#!/usr/bin/env python3
"""How far the observed phi of refined spots lies from the prediction, by
where in its sweep the spot is predicted.

A spot whose rocking curve a sweep's first or last image cuts has its phi
centroid pulled into the scan (the same as a spot cut by a gap). For the
spots used in refinement of a dials.process_gapped run (``integrated.refl``)
this prints, per block, the mean of z_obs - z_cal (images) in bins of the
predicted image: a block's ends at a sweep's ends or at a gap show the pull,
its middle what the model leaves.

    .venv/bin/python benchmarks/scan_end_bias.py <output folder>/integrated.refl
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dials_gapfill  # noqa: E402,F401  (before dials)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit(__doc__.split("\n\n")[-1].strip())
    from dials.array_family import flex

    table = flex.reflection_table.from_file(argv[0])
    table = table.select(table.get_flags(table.flags.used_in_refinement))
    z_obs = np.array(table["xyzobs.px.value"].parts()[2])
    z_cal = np.array(table["xyzcal.px"].parts()[2])
    block = np.array(table["imageset_id"] if "imageset_id" in table else table["id"])
    for b in sorted(set(block)):
        here = block == b
        first, last = int(np.floor(z_cal[here].min())), int(np.ceil(z_cal[here].max()))
        edges = sorted({first, first + 1, first + 2, last - 2, last - 1, last}
                       | set(np.linspace(first, last, 6).round().astype(int)))
        print(f"block {b + 1}: {here.sum()} spots used in refinement")
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = here & (z_cal >= lo) & (z_cal < hi if hi < last else z_cal <= hi)
            if sel.any():
                print(f"  predicted in images {lo + 1:4d}-{hi:<4d} n {sel.sum():6d}  mean z_obs - z_cal "
                      f"{(z_obs[sel] - z_cal[sel]).mean():+.4f} images")


if __name__ == "__main__":
    main()
