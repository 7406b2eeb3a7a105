"""Spot finding on the cluster jobs.

DIALS' spot finder cuts each block into chunks of images and hands them,
with its picklable per-image task, to one parallel map
(``dials_compat.spot_finder_map``); here that map sends them to the jobs:
``mp.nproc`` consecutive chunks per task, run on the job with DIALS' own
multiprocessing.  Each task returns DIALS' per-image strong-pixel lists,
which DIALS joins in this process into 3D spots as it joins its local
workers' lists (spots across a chunk boundary are not cut).
"""

from __future__ import annotations

import contextlib
import logging

from dials.util.mp import batch_multi_node_parallel_map

from dials_gapfill import dials_compat
from dials_gapfill.cluster.session import job_cores, session

logger = logging.getLogger("dials.process_gapped.cluster")


def _spot_task(func, chunks):
    """Job side: DIALS' own multiprocessing map over this task's image chunks;
    the results of the image indices as DIALS' local route hands them to its
    callback."""
    indices = [i for chunk in chunks for i in chunk]
    nproc = min(job_cores(), len(chunks))
    if nproc > 1:
        results = []
        batch_multi_node_parallel_map(
            func=func, iterable=indices, nproc=nproc, njobs=1, cluster_method="multiprocessing",
            chunksize=max(len(c) for c in chunks), callback=results.append,
        )
        return results
    return [func(i) for i in indices]


@contextlib.contextmanager
def spot_finding(params):
    """While active, DIALS' spot finder sends its image chunks to the cluster jobs."""
    s = session(params)

    def on_the_jobs(func, chunks, nproc, callback):
        # a task: nproc consecutive chunks, run on one job with nproc processes
        tasks = [chunks[i : i + nproc] for i in range(0, len(chunks), nproc)]
        for task_results in s.map(_spot_task, tasks, "spot finding", shared=func):
            for result in task_results:
                callback(result)

    with dials_compat.spot_finder_map(on_the_jobs) as replaced:
        if not replaced:
            logger.warning("Cluster: this DIALS' spot finder has no parallel map to replace: spots found in this process")
        yield s


def spotfinder_mp(params) -> dict:
    """DIALS' spotfinder.mp for a cluster run: njobs jobs of `cores` processes."""
    return {"nproc": params.mp.cluster.cores, "njobs": params.mp.njobs, "method": "dask"}
