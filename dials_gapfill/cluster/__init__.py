"""Spot finding and integration on a batch cluster (Slurm, SGE, PBS, LSF) through Dask.

``mp.method=slurm`` (or ``sge``, ``pbs``, ``lsf``) runs the two heavy stages
as tasks on jobs that dask-jobqueue submits to the scheduler; everything else
(import, indexing, refinement, export, scaling) stays in this process.  The
jobs are started once per run (on the first stage that needs them), reused by
the later stages and cancelled when the run ends, fails or is interrupted.

The package, by role:

- ``checks``: mp.* checked before any work (validate()); with Slurm, the job
  script the session will submit is given to ``sbatch --test-only``.
- ``session``: the Dask session (the jobs, the map of tasks onto them,
  retries, cancel) and the job side of a task.
- ``spotfinding``, ``integration``: what the two stages run on the jobs.

The two places where DIALS hands its work to a parallel map are replaced
through ``dials_gapfill.dials_compat`` (``spot_finder_map``,
``integration_processor_map``) for the duration of a call.

What a task is (the split follows DIALS' own rules, so the result is what
the local run gives, row for row):

- spot finding: DIALS' spot finder cuts each block into chunks of images
  (``ExtractSpots._find_spots``: ``mp.njobs`` x ``mp.nproc`` chunks; a long
  block is cut too) and hands them, with its picklable per-image task
  (``ExtractSpotsParallelTask``, made by DIALS for its cluster back-ends), to
  ``batch_multi_node_parallel_map``.  That one function is replaced, for
  the duration of the call, by one that sends the chunks to the cluster jobs
  (``mp.nproc`` chunks per task, run on the job with DIALS' own
  multiprocessing); each task returns DIALS' per-image strong-pixel lists,
  and DIALS joins them in this process into 3D spots exactly as it joins its
  worker processes' lists (spots across a chunk boundary are not cut).
- integration, at least as many blocks as jobs: one task per block: the
  block's experiment (as a dict, the content of an .expt file), its reference
  reflections and DIALS' integration parameters; the job runs DIALS'
  ``run_integration`` on it with ``mp.nproc`` processes and returns the
  integrated table and the block's profile model.  DIALS models profiles and
  integrates each experiment on its own, so a block integrated alone is
  integrated as in the run over all blocks; the small blocks' pooled profile
  model is made in this process beforehand, as in a local run.
- integration, fewer blocks than jobs (a sweep that is one long block):
  frame ranges.  DIALS' ``run_integration`` runs in this process with its
  cluster parameters ``njobs`` = k = ceil(mp.njobs / blocks), ``nproc`` =
  cores: its processor cuts each block into k x cores frame ranges (its
  ``JobList``: block size from ``integration.block.*``, overlap from the
  reflections' bounding boxes), splits the reflections between them
  (``JobList.split``, ``ReflectionManager``: a reflection across a boundary
  becomes partial rows, none lost or counted twice) and hands its per-range
  tasks to ``multi_node_parallel_map``, grouped by ``nproc``.  That function
  is replaced, for the duration of the call, by one that sends each group
  to a job, which runs the tasks as DIALS runs them locally
  (``execute_parallel_task``, ``cores`` processes).  Each pass goes through
  it: profile modelling (each range returns its modeller; DIALS accumulates
  them here and finalizes the block's reference profiles from all ranges),
  profile validation if DIALS does it, then integration with the finalized
  model.  DIALS' executors (Boost.Python) cannot be pickled, their content
  can: a task travels as its parts (the executor's class, arguments and
  state, the experiments and the processor parameters once per job; frame
  range and reflections per task) and is rebuilt on the job, together with
  the background and centroid algorithms DIALS set for the run.  The result
  is the local run's with ``nproc`` = k x cores.

DIALS' own cluster routes (``drmaa``, and ``sge``/``lsf``/``pbs`` through
libtbx) do not work with DIALS 3.12 (SGE syntax sent to any DRMAA, the
integration task cannot be pickled): ``mp.method=drmaa`` is refused before
any work, and ``sge``/``lsf``/``pbs`` mean dask-jobqueue's clusters.

(The function ``session`` hides the module of the same name as an attribute
of this package: import the module's other names with
``from dials_gapfill.cluster.session import ...``.)
"""

from __future__ import annotations

from dials_gapfill.cluster.checks import check
from dials_gapfill.cluster.integration import frame_range_jobs, integrate
from dials_gapfill.cluster.session import (
    JOB_NAME,
    METHODS,
    ClusterError,
    Session,
    close,
    is_cluster,
    job_options,
    job_script,
    session,
    stats,
)
from dials_gapfill.cluster.spotfinding import spot_finding, spotfinder_mp

__all__ = [
    "JOB_NAME",
    "METHODS",
    "ClusterError",
    "Session",
    "check",
    "close",
    "frame_range_jobs",
    "integrate",
    "is_cluster",
    "job_options",
    "job_script",
    "session",
    "spot_finding",
    "spotfinder_mp",
    "stats",
]
