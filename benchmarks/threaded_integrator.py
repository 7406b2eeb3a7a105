#!/usr/bin/env python3
"""DIALS' 3d_threaded integrator against its standard 3d integrator, block by block.

dials.process_gapped integrates with DIALS' standard integrator.  The
threaded one (integration.integrator=3d_threaded) fails on gapped sweeps in
DIALS 3.12 for three reasons, each met here from outside for the
comparison:

1. "Task can only handle 1 imageset" (dials/algorithms/integration/
   parallel_integrator.py, IntegrationJob.__call__): one block per call.
2. "Unknown background algorithm" (BackgroundCalculatorFactory.create): it
   knows simple/glm/gmodel, not Auto; Auto is resolved as DIALS'
   AutoBackgroundExt does (glm on counting detectors).
3. "Programmer Error: bad array range": the job slices the image set with
   indices relative to its array range, while dxtbx' ImageSequence slicing
   (dxtbx/imageset.py, _imagesequence.__getitem__) subtracts the scan's
   batch offset (the first array index), so every block not starting at
   image 1 fails; a copy of the block's scan gets batch offset 0.

Prints, per block, the wall clock of both and how their integrated counts
and intensities (summation and profile-fitted, matched by Miller index and
image) compare.

  .venv/bin/python benchmarks/threaded_integrator.py /path/to/gapped/images [nproc=2 ...]
"""
from __future__ import annotations

import copy
import sys
import time
import numpy as np
from dials_gapfill import pipeline
from dials_gapfill.phil import params_from, dials_integrate_params
from dials.command_line.integrate import run_integration
from dials_gapfill.model.tables import keep_experiments
params = params_from(sys.argv[2:] or ["nproc=2"])
st = pipeline.Pipeline(params, [sys.argv[1]]).run(stop_before="integration")
E, R = st.experiments, st.reflections
def integ(integrator, e, fix):
    ip = dials_integrate_params(params)
    ip.integration.integrator = integrator
    if integrator == "3d_threaded":
        ip.integration.background.algorithm = "glm"
    r, x = keep_experiments(R, E, {e.identifier})
    x = copy.deepcopy(x); r = copy.deepcopy(r)
    if fix:
        s = x[0].imageset.get_scan(); s.set_batch_offset(0); x[0].imageset.set_scan(s)
    t = time.time()
    xx, rr, _ = run_integration(ip, x, r)
    return rr, time.time() - t
for e in E:
    a, ta = integ("3d", e, False)
    try:
        b, tb = integ("3d_threaded", e, True)
    except Exception as ex:
        print(e.scan.get_image_range(), "threaded ERROR", str(ex)[:100]); continue
    def key(r): return {(tuple(h), int(round(z))): k for k, (h, z) in enumerate(zip(r["miller_index"], r["xyzcal.px"].parts()[2]))}
    ka, kb = key(a), key(b)
    common = [k for k in ka if k in kb]
    out = [e.scan.get_image_range(), "3d %.1f s, threaded %.1f s" % (ta, tb), "sum flags %d/%d" % (a.get_flags(a.flags.integrated_sum).count(True), b.get_flags(b.flags.integrated_sum).count(True)), "prf %d/%d" % (a.get_flags(a.flags.integrated_prf).count(True), b.get_flags(b.flags.integrated_prf).count(True)), "matched", len(common)]
    for col in ("intensity.sum.value", "intensity.prf.value"):
        if col in a and col in b:
            x = np.array([a[col][ka[k]] for k in common]); y = np.array([b[col][kb[k]] for k in common])
            ok = np.isfinite(x) & np.isfinite(y) & (x != 0) & (y != 0)
            out.append("%s CC %.6f" % (col.split(".")[1], np.corrcoef(x[ok], y[ok])[0, 1]))
    print(*out, flush=True)
