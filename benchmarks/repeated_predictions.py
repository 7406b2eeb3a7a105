#!/usr/bin/env python
"""Reflections predicted twice in one block, in integrated.refl files.

DIALS' scan-varying predictor predicts the frames of its padding with the
crystal of the scan's end frame, so a reflection near a scan's end can be
predicted twice, on the same pixels
(``dials_gapfill.stages.integration.repeated_predictions``, which
dials.process_gapped drops).  For each folder holding integrated.expt and
integrated.refl (a DIALS chain's, or a dials.process_gapped run's) this
prints the rows, the repeats that function finds, how many of them are a
second row that would go into an MTZ of summation intensities (both rows
integrated by summation with partiality >= 0.4) or of profile-fitted ones
(both profile fitted, partiality >= 0.4).

Usage::

    .venv/bin/python benchmarks/repeated_predictions.py FOLDER [FOLDER ...]

(e.g. the ``chain``, ``continuous``, ``per_block`` and ``gapless`` folders of
``benchmarks/chain_truth.py --workdir /tmp/ct``).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import dials_gapfill  # noqa: E402,F401  (libtbx set-up before DIALS)
from dials.array_family import flex  # noqa: E402
from dxtbx.model.experiment_list import ExperimentListFactory  # noqa: E402

from dials_gapfill.stages.integration import repeated_predictions  # noqa: E402


def count(folder):
    experiments = ExperimentListFactory.from_json_file(os.path.join(folder, "integrated.expt"), check_format=False)
    reflections = flex.reflection_table.from_file(os.path.join(folder, "integrated.refl"))
    drop = repeated_predictions(experiments, reflections)
    keep = flex.bool(len(reflections), True)
    keep.set_selected(drop, False)
    part = reflections["partiality"] >= 0.4
    by_sum = reflections.get_flags(reflections.flags.integrated_sum) & part
    by_prf = reflections.get_flags(reflections.flags.integrated_prf) & part
    kept_rows = {}
    for j in keep.iselection():
        kept_rows.setdefault((reflections["id"][j], reflections["miller_index"][j], reflections["entering"][j]), []).append(j)
    twice = {"sum": 0, "prf": 0}
    for i in drop:
        partner = kept_rows[(reflections["id"][i], reflections["miller_index"][i], reflections["entering"][i])]
        for name, flag in (("sum", by_sum), ("prf", by_prf)):
            if flag[i] and any(flag[j] for j in partner):
                twice[name] += 1
    return len(reflections), len(drop), twice["sum"], twice["prf"]


def main(folders):
    print("| run | rows | repeated predictions | second rows in a summation MTZ | in a profile-fitted MTZ |")
    print("|---|---:|---:|---:|---:|")
    for folder in folders:
        print("| {} | {} | {} | {} | {} |".format(folder, *count(folder)))


if __name__ == "__main__":
    main(sys.argv[1:])
