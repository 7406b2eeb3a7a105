"""Spot finding and integration on a batch cluster (Slurm, SGE, PBS, LSF) through Dask.

``mp.method=slurm`` (or ``sge``, ``pbs``, ``lsf``) runs the two heavy stages
as tasks on jobs that dask-jobqueue submits to the scheduler; everything else
(import, indexing, refinement, export, scaling) stays in this process.  The
jobs are started once per run (on the first stage that needs them), reused by
the later stages and cancelled when the run ends, fails or is interrupted.

What a task is (the split follows DIALS' own rules, so the result is what
the local run gives, row for row):

- spot finding: DIALS' spot finder cuts each block into chunks of images
  (``ExtractSpots._find_spots``: ``mp.njobs`` x ``mp.nproc`` chunks; a long
  block is cut too) and hands them, with its picklable per-image task
  (``ExtractSpotsParallelTask``, made by DIALS for its cluster back-ends), to
  ``batch_multi_node_parallel_map``.  Here that one function is replaced, for
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
  is replaced here, for the duration of the call, by one that sends each
  group to a job, which runs the tasks as DIALS runs them locally
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
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

from dials_gapfill.errors import GapfillError

logger = logging.getLogger("dials.process_gapped.cluster")

# mp.method -> (dask_jobqueue class, scheduler commands it needs)
METHODS = {
    "slurm": ("SLURMCluster", ("sbatch", "squeue", "scancel")),
    "sge": ("SGECluster", ("qsub", "qstat", "qdel")),
    "pbs": ("PBSCluster", ("qsub", "qstat", "qdel")),
    "lsf": ("LSFCluster", ("bsub", "bjobs", "bkill")),
}

JOB_NAME = "dials-gapfill"


class ClusterError(GapfillError):
    """The cluster could not run a task (no scheduler, jobs that keep dying)."""


def is_cluster(params) -> bool:
    return getattr(getattr(params, "mp", None), "method", None) in METHODS


# --------------------------------------------------------------------------
# Checks before any work
# --------------------------------------------------------------------------


def check(params) -> None:
    """Raise GapfillError (one line) if mp.* cannot work; called by validate()."""
    mp = params.mp
    method = mp.method
    if method == "drmaa":
        raise GapfillError(
            "mp.method=drmaa does not work with DIALS 3.12 (SGE syntax sent to any DRMAA; the "
            "integration task cannot be pickled): use mp.method=slurm (or sge, pbs, lsf), which "
            "runs through Dask (pip install 'dials-gapfill[cluster]')"
        )
    if method not in METHODS:
        return
    try:
        import dask_jobqueue  # noqa: F401
        import distributed  # noqa: F401
    except ImportError:
        raise GapfillError(
            f"mp.method={method} needs Dask and dask-jobqueue: pip install 'dials-gapfill[cluster]' "
            "(or pip install distributed dask-jobqueue) into this Python, or use mp.method=multiprocessing"
        ) from None
    from dask.utils import parse_bytes

    c = mp.cluster
    try:
        parse_bytes(str(c.memory))
    except Exception:
        raise GapfillError(
            f"mp.cluster.memory={c.memory} is not an amount of memory: give e.g. 4GB or 16GiB"
        ) from None
    if c.walltime is not None and not _walltime_ok(str(c.walltime)):
        raise GapfillError(
            f"mp.cluster.walltime={c.walltime} is not a time: give HH:MM:SS (e.g. 02:00:00)"
        )
    commands = METHODS[method][1]
    missing = [cmd for cmd in commands if shutil.which(cmd) is None]
    if missing:
        raise GapfillError(
            f"mp.method={method}: no {method.upper()} scheduler here ({', '.join(missing)} not found): "
            "run on a machine that can submit jobs, or use mp.method=multiprocessing"
        )
    if method == "slurm":
        _check_slurm(c)


def _walltime_ok(text: str) -> bool:
    parts = text.split(":")
    return 1 <= len(parts) <= 3 and all(p.isdigit() for p in parts)


def _run(args, timeout=30):
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, f"{args[0]} did not answer within {timeout} s"
    return r.returncode, " ".join((r.stderr or r.stdout).split())


def _check_slurm(c) -> None:
    code, text = _run(["sinfo", "-h", "-o", "%P"])
    if code != 0:
        raise GapfillError(
            f"mp.method=slurm: Slurm does not answer (sinfo: {text[:160]}): check that slurmctld "
            "runs, or use mp.method=multiprocessing"
        )
    # the job's directives, checked by Slurm itself without submitting a job
    script = "#!/bin/sh\n" + "".join(f"#SBATCH {line}\n" for line in _slurm_directives(c)) + "true\n"
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as fh:
        fh.write(script)
        fh.flush()
        code, text = _run(["sbatch", "--test-only", fh.name])
    if code != 0:
        text = text.replace("sbatch: error: ", "")
        raise GapfillError(
            f"mp.cluster settings refused by Slurm ({text[:200]}): fix mp.cluster.queue, cores, "
            "memory, walltime or job_extra"
        )


def _slurm_directives(c) -> list[str]:
    from dask.utils import parse_bytes

    lines = [f"-J {JOB_NAME}", "-n 1", f"--cpus-per-task={c.cores}"]
    lines.append(f"--mem={max(1, parse_bytes(str(c.memory)) // 2**20)}M")
    if c.queue:
        lines.append(f"-p {c.queue}")
    if c.walltime:
        lines.append(f"-t {c.walltime}")
    lines += list(c.job_extra or [])
    return lines


# --------------------------------------------------------------------------
# The session: one set of jobs per run
# --------------------------------------------------------------------------


class Session:
    """A dask-jobqueue cluster with its client, its job folder and what it ran."""

    def __init__(self, params):
        import dask
        import dask_jobqueue
        from distributed import Client

        mp = params.mp
        c = mp.cluster
        self.method = mp.method
        self.njobs = mp.njobs
        self.cores = c.cores
        self.key = _key(params)
        base = c.log_directory or os.path.join(os.path.expanduser("~"), ".cache", "dials-gapfill")
        os.makedirs(base, exist_ok=True)
        # job scripts and job logs: a folder of this run, outside the output folder, removed at the end
        self.directory = tempfile.mkdtemp(prefix=f"cluster-{os.getpid()}-", dir=base)
        self.job_ids: set[str] = set()
        self.submitted: set[str] = set()
        self.tasks = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.task_seconds = []
        cls = getattr(dask_jobqueue, METHODS[mp.method][0])
        kwargs = job_options(params, self.directory)
        self._config = dask.config.set(
            {
                # a task whose worker dies is given to another job this often, then fails
                "distributed.scheduler.allowed-failures": c.retries,
                "distributed.worker.daemon": False,
                "distributed.admin.tick.limit": "1h",
            }
        )
        self._config.__enter__()
        self._handlers = _wrap_signal_handlers(self)
        # at exit, this close runs before distributed's own exit hooks (last
        # registered, first run): the workers are told to stop while the
        # scheduler still runs, then the jobs are cancelled
        atexit.register(close)
        t0 = time.perf_counter()
        self.cluster = cls(**kwargs)
        self.client = Client(self.cluster)
        # dead jobs are replaced: the number of jobs is held at njobs
        self.cluster.adapt(minimum_jobs=mp.njobs, maximum_jobs=mp.njobs)
        logger.info(
            "Cluster: %d %s job(s) of %d core(s), %s, walltime %s%s (job files in %s)",
            mp.njobs, mp.method, c.cores, c.memory, c.walltime,
            f", queue {c.queue}" if c.queue else "", self.directory,
        )
        logger.debug("Job script:\n%s", self.cluster.job_script())
        try:
            self.client.wait_for_workers(1, timeout=c.start_timeout)
        except BaseException as e:
            pending = self._job_states()
            self.close()
            if isinstance(e, (KeyboardInterrupt, SystemExit)) or not isinstance(e, Exception):
                raise
            raise ClusterError(
                f"no {mp.method} job started within mp.cluster.start_timeout={c.start_timeout} s"
                f"{' (' + pending + ')' if pending else ''}: check the queue (mp.cluster.queue) "
                "and its limits, or raise the timeout"
            ) from None
        self.start_seconds = time.perf_counter() - t0
        self.submitted |= set(self.job_ids_now())
        logger.info("Cluster: first job up after %.1f s", self.start_seconds)

    def _job_states(self) -> str:
        if self.method != "slurm":
            return ""
        code, text = _run(["squeue", "-h", "-n", JOB_NAME, "-o", "%i %T %r"], timeout=10)
        return text if code == 0 else ""

    # ----------------------------------------------------------------------

    def map(self, function, tasks, what, shared=None):
        """function(shared, task) for each task on the cluster; the results in order.

        `shared` is sent to each job once.  Any failure or interrupt cancels
        the jobs (closes the session) before it is passed on.
        """
        from distributed import KilledWorker

        try:
            t0 = time.perf_counter()
            # sent as bytes, unpickled by each task: a DIALS object that a job has
            # used may hold C++ state that cannot be pickled again (the spot
            # finder's threshold), so a job must never have to pass it on
            # (a task that returns the bytes, not scatter: if every job that
            # holds them dies, the scheduler runs it again on a new job)
            shared_data = pickle.dumps(shared) if shared is not None else None
            shared_future = self.client.submit(_identity, shared_data, pure=False) if shared is not None else None
            shared_bytes = len(shared_data) if shared is not None else 0
            if shared_future is not None:
                # on every job now: the scheduler gives a task only to a worker
                # that holds its data, so with one copy the tasks would all
                # queue on one job until work stealing moves some
                with contextlib.suppress(Exception):
                    from distributed import wait

                    wait([shared_future])
                    self.client.replicate([shared_future])
            sent = received = 0
            futures = []
            # the task data travel in the task graph (Dask warns above 10 MB)
            warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
            for i, task in enumerate(tasks):
                sent += len(pickle.dumps(task))
                futures.append(
                    self.client.submit(_call, function, shared_future, task, pure=False, key=f"{what}-{i}-{time.time_ns()}")
                )
            logger.info("Cluster: %s: %d task(s) submitted", what, len(futures))
            results, jobs, busy = [], set(), 0.0
            for future in futures:
                result, job, seconds = future.result()
                received += len(pickle.dumps(result))
                busy += seconds
                if job:
                    jobs.add(job)
                results.append(result)
            wall = time.perf_counter() - t0
            self.submitted |= jobs | set(self.job_ids_now())
            self.tasks += len(futures)
            self.job_ids |= jobs
            self.bytes_in += sent + shared_bytes
            self.bytes_out += received
            self.task_seconds.append(busy)
            n = max(1, len(futures))
            logger.info(
                "Cluster: %s in %d task(s) on %s job(s) %s (per task: %.1f kB in, %.1f kB out, %.2f s "
                "on the job; once per job: %.1f kB; %.2f s wall for all)",
                what, len(futures), self.method, ", ".join(sorted(jobs, key=_job_order)),
                sent / n / 1e3, received / n / 1e3, busy / n, shared_bytes / 1e3, wall,
            )
            logger.info("Cluster: jobs submitted so far: %s", ", ".join(sorted(self.submitted, key=_job_order)))
            return results
        except KilledWorker:
            n = self.cluster_retries() + 1
            self.close()
            raise ClusterError(
                f"{what}: {self.method} jobs died {n} time{'s' if n > 1 else ''} running the same task "
                f"(mp.cluster.retries={n - 1}): check why in the scheduler's accounting (out of memory: "
                "raise mp.cluster.memory; out of time: mp.cluster.walltime)"
            ) from None
        except GapfillError:
            self.close()
            raise
        except Exception as e:
            self.close()
            if _is_comm_error(e):
                raise ClusterError(f"{what}: lost the cluster ({type(e).__name__}: {e})") from None
            raise
        except BaseException:
            # Ctrl-C, SIGTERM: cancel the jobs first
            self.close()
            raise

    def job_ids_now(self) -> list[str]:
        ids = set(self.job_ids)
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            for job in list(getattr(cluster, "workers", {}).values()):
                if getattr(job, "job_id", None):
                    ids.add(str(job.job_id))
        return sorted(ids)

    def cancel_now(self) -> None:
        """Cancel the jobs with the scheduler's command, at once (from a signal handler)."""
        ids = self.job_ids_now()
        cancel = {"slurm": "scancel", "sge": "qdel", "pbs": "qdel", "lsf": "bkill"}[self.method]
        if ids:
            _run([cancel, *ids], timeout=15)
        if getattr(self, "directory", None):
            shutil.rmtree(self.directory, ignore_errors=True)

    def cluster_retries(self) -> int:
        import dask

        return int(dask.config.get("distributed.scheduler.allowed-failures"))

    def close(self) -> None:
        global _session
        if _session is self:
            _session = None
        _restore_signal_handlers(getattr(self, "_handlers", None))
        self._handlers = None
        client, cluster = getattr(self, "client", None), getattr(self, "cluster", None)
        self.client = self.cluster = None
        for thing in (client, cluster):
            if thing is None:
                continue
            with contextlib.suppress(BaseException):
                thing.close(timeout=20) if thing is client else thing.close()
        if getattr(self, "_config", None) is not None:
            with contextlib.suppress(Exception):
                self._config.__exit__(None, None, None)
            self._config = None
        if getattr(self, "directory", None):
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def job_options(params, directory) -> dict:
    """Keyword arguments of the dask-jobqueue cluster class for mp.method."""
    mp = params.mp
    c = mp.cluster
    walltime = c.walltime
    if mp.method == "lsf" and walltime:
        # LSF's -W is [hours:]minutes
        parts = [int(p) for p in str(walltime).split(":")] + [0, 0]
        h, m = (parts[0], parts[1]) if str(walltime).count(":") else (0, parts[0])
        walltime = f"{h}:{m:02d}"
    kwargs = dict(
        cores=c.cores,
        processes=1,  # one worker per job, one task at a time, using `cores` processes
        memory=str(c.memory),
        walltime=walltime,
        job_name=JOB_NAME,
        log_directory=directory,
        # exec: the worker is the job's own process, so the scheduler's signals
        # reach it (with proctrack/linuxproc a child of the batch shell that
        # outlives the shell escapes the job's kill)
        python="exec " + (c.python or sys.executable),
        nanny=False,  # the worker forks DIALS' processes itself
        death_timeout=60,
        worker_extra_args=["--nthreads", "1"],
        job_extra_directives=list(c.job_extra or []),
        job_script_prologue=[
            "export OMP_NUM_THREADS=1",
            f"export DIALS_GAPFILL_CLUSTER_CORES={c.cores}",
        ],
        scheduler_options={"dashboard": False},
    )
    if c.queue:
        kwargs["queue"] = c.queue
    if mp.method == "slurm":
        kwargs["job_cpu"] = c.cores
    return kwargs


def _wrap_signal_handlers(s):
    """SIGINT/SIGTERM cancel the jobs first, then do what they did before.

    (dials.process_gapped's own handler ends the process with os._exit, which
    runs no atexit hook and no ``finally``.)
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    saved = {}
    main_pid = os.getpid()
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        saved[signum] = previous

        def handler(sig, frame, previous=previous):
            if os.getpid() == main_pid:
                with contextlib.suppress(BaseException):
                    s.cancel_now()
            if callable(previous):
                previous(sig, frame)
            elif previous == signal.SIG_DFL and sig == signal.SIGINT:
                raise KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                os._exit(128 + sig)

        signal.signal(signum, handler)
    return saved


def _restore_signal_handlers(saved) -> None:
    import signal
    import threading

    if not saved or threading.current_thread() is not threading.main_thread():
        return
    for signum, previous in saved.items():
        with contextlib.suppress(Exception):
            signal.signal(signum, previous)


def _job_order(job: str):
    return (0, int(job), "") if job.isdigit() else (1, 0, job)


def _is_comm_error(e) -> bool:
    try:
        from distributed.comm.core import CommClosedError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, (CommClosedError, OSError))


_session: Session | None = None


def _key(params):
    c = params.mp.cluster
    return (params.mp.method, params.mp.njobs, c.cores, str(c.memory), c.walltime, c.queue,
            tuple(c.job_extra or []), c.python, c.log_directory)


def session(params) -> Session:
    """The run's cluster session (started on first use, closed at exit)."""
    global _session
    if _session is not None and _session.key != _key(params):
        _session.close()
    if _session is None:
        _session = Session(params)
    return _session


def close() -> None:
    """Cancel the jobs of the session, if there is one."""
    if _session is not None:
        _session.close()


def stats() -> dict | None:
    s = _session
    if s is None:
        return None
    return {"tasks": s.tasks, "jobs": sorted(s.job_ids), "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
            "task_seconds": list(s.task_seconds)}


atexit.register(close)


# --------------------------------------------------------------------------
# The job side
# --------------------------------------------------------------------------


def _job_id() -> str:
    for name in ("SLURM_JOB_ID", "JOB_ID", "PBS_JOBID", "LSB_JOBID"):
        if os.environ.get(name):
            return os.environ[name]
    return ""


def _cores() -> int:
    return int(os.environ.get("DIALS_GAPFILL_CLUSTER_CORES", "1"))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        try:
            self.records.append((record.name, record.levelno, record.getMessage()))
        except Exception:
            pass


def _identity(data):
    return data


def _call(function, shared, task):
    """Run one task on a job: (result, job id, seconds)."""
    import dials_gapfill  # noqa: F401  (libtbx environment of a venv, before DIALS)

    t0 = time.perf_counter()
    if shared is not None:
        shared = pickle.loads(shared)
    result = function(shared, task)
    return result, _job_id(), time.perf_counter() - t0


@contextlib.contextmanager
def _collect_logs():
    """DIALS' log records of a task, to be replayed by the main process."""
    handler = _Records()
    dials_logger = logging.getLogger("dials")
    old_level = dials_logger.level
    dials_logger.addHandler(handler)
    dials_logger.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        dials_logger.removeHandler(handler)
        dials_logger.setLevel(old_level)


def _replay(records) -> None:
    for name, level, message in records:
        logging.getLogger(name).log(level, message)


# ---- spot finding ----------------------------------------------------------


def _spot_chunks(func, chunks):
    """Job side: DIALS' own multiprocessing map over this task's image chunks."""
    from dials.util.mp import batch_multi_node_parallel_map

    indices = [i for chunk in chunks for i in chunk]
    chunksize = max(len(c) for c in chunks)
    nproc = min(_cores(), len(chunks))
    if nproc > 1:
        # the results of the image indices as DIALS' local route hands them
        # to its callback
        results = []
        batch_multi_node_parallel_map(
            func=func, iterable=indices, nproc=nproc, njobs=1, cluster_method="multiprocessing",
            chunksize=chunksize, callback=results.append,
        )
        return results
    return [func(i) for i in indices]


@contextlib.contextmanager
def spot_finding(params):
    """While active, DIALS' spot finder sends its image chunks to the cluster.

    DIALS' ExtractSpots hands chunks of image indices and its picklable task
    to ``batch_multi_node_parallel_map`` (dials.util.mp), the one place where
    it calls a cluster back-end; the spot finder module's reference to it is
    replaced for the duration of the call.
    """
    from dials.algorithms.spot_finding import finder

    s = session(params)
    original = finder.batch_multi_node_parallel_map

    def cluster_map(func=None, iterable=None, nproc=1, njobs=1, callback=None, cluster_method=None, chunksize=1):
        indices = list(iterable)
        chunks = [indices[i : i + chunksize] for i in range(0, len(indices), chunksize)]
        # a task: nproc consecutive chunks, run on one job with nproc processes
        tasks = [chunks[i : i + nproc] for i in range(0, len(chunks), nproc)]
        results = s.map(_spot_task, tasks, "spot finding", shared=func)
        for task_results in results:
            for result in task_results:
                callback(result)

    finder.batch_multi_node_parallel_map = cluster_map
    try:
        yield s
    finally:
        finder.batch_multi_node_parallel_map = original


def _spot_task(func, chunks):
    return _spot_chunks(func, chunks)


def spotfinder_mp(params) -> dict:
    """DIALS' spotfinder.mp for a cluster run: njobs jobs of `cores` processes."""
    return {"nproc": params.mp.cluster.cores, "njobs": params.mp.njobs, "method": "dask"}


# ---- integration -----------------------------------------------------------


def _integrate_task(ip, task):
    """Job side: DIALS' run_integration on one block."""
    import copy

    from dials.command_line.integrate import run_integration
    from dxtbx.model.experiment_list import ExperimentListFactory

    expt_dict, reference = task
    experiments = ExperimentListFactory.from_dict(expt_dict)
    ip = copy.deepcopy(ip)
    ip.integration.mp.nproc = _cores()
    ip.integration.mp.method = "multiprocessing"
    ip.integration.mp.njobs = 1
    with _collect_logs() as records:
        try:
            experiments, reflections, _ = run_integration(ip, experiments, reference)
        except (ValueError, RuntimeError) as e:
            return ("error", type(e).__name__, str(e), records)
    return ("ok", experiments.to_dict(), reflections, records)


def frame_range_jobs(n_blocks: int, njobs: int) -> int:
    """DIALS' integration ``njobs`` for a cluster run: 1 (one task per block)
    when there are at least as many blocks as jobs, else ceil(njobs / blocks)
    (each block cut into that many x cores frame ranges)."""
    if n_blocks <= 0 or n_blocks >= njobs:
        return 1
    return -(-njobs // n_blocks)


def integrate(ip, experiments, reference, params):
    """DIALS' run_integration over the blocks on the cluster jobs.

    One task per block when there are at least as many blocks as jobs, else
    frame ranges (:func:`_integrate_frame_ranges`).  Returns (experiments,
    reflections) as run_integration does on all blocks (profile models of the
    blocks set, rows in block order).
    """
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    from dials_gapfill.model.tables import join_blocks

    s = session(params)
    k = frame_range_jobs(len(experiments), params.mp.njobs)
    if k > 1:
        return _integrate_frame_ranges(ip, experiments, reference, s, k)
    tasks = []
    for i, exp in enumerate(experiments):
        ref = reference.select(reference["id"] == i)
        ids = ref.experiment_identifiers()
        for k in list(ids.keys()):
            del ids[k]
        ref["id"] = flex.int(len(ref), 0)
        ref.experiment_identifiers()[0] = exp.identifier
        tasks.append((ExperimentList([exp]).to_dict(), ref))
    results = s.map(_integrate_task, tasks, "integration", shared=ip)
    tables = []
    kept = []
    for exp, result in zip(experiments, results):
        _replay(result[-1])
        if result[0] == "error":
            _, kind, message, _ = result
            raise (ValueError if kind == "ValueError" else RuntimeError)(message)
        _, expt_dict, reflections, _ = result
        done = ExperimentListFactory.from_dict(expt_dict, check_format=False)
        exp.profile = done[0].profile
        # the block's imageset index in the run over all blocks (one imageset per block)
        reflections["imageset_id"] = flex.int(len(reflections), len(kept))
        tables.append(reflections)
        kept.append(exp)
    return ExperimentList(kept), join_blocks(tables, ExperimentList(kept))


# ---- integration in frame ranges -------------------------------------------

# DIALS' executor of each processing pass -> the name of the pass (as the
# progress output names it)
PASSES = {
    "ProfileModellerExecutor": "profile modelling",
    "ProfileValidatorExecutor": "profile validation",
    "IntegratorExecutor": "integrating",
}


def _integrate_frame_ranges(ip, experiments, reference, s, k):
    """DIALS' run_integration here, its per-frame-range tasks on the jobs.

    DIALS' cluster parameters njobs=k, nproc=cores: its processor cuts each
    block into k x cores frame ranges (Auto block size: nproc x njobs pieces)
    and groups its tasks by nproc for multi_node_parallel_map, which sends
    each group to a job here.  Everything DIALS does between the passes
    (splitting the reflections, accumulating and finalizing the profile
    modellers, joining the partial rows) runs in this process, as locally.
    """
    import copy

    from dials.command_line.integrate import run_integration

    ip = copy.deepcopy(ip)
    ip.integration.mp.method = "multiprocessing"
    ip.integration.mp.njobs = k
    ip.integration.mp.nproc = s.cores
    logger.info(
        "Cluster: %d block(s) for %d job(s): each block's integration in %d x %d frame ranges "
        "(DIALS' block rule with njobs=%d, nproc=%d), tasks of %d range(s) on the jobs; "
        "profiles modelled over all ranges of a block",
        len(experiments), s.njobs, k, s.cores, k, s.cores, s.cores,
    )
    with _frame_ranges_on_cluster(s):
        experiments, reflections, _ = run_integration(ip, experiments, reference)
    return experiments, reflections


@contextlib.contextmanager
def _frame_ranges_on_cluster(s):
    """While active, DIALS' integration processor sends its tasks to the jobs."""
    from dials.algorithms.integration import processor

    original = processor.multi_node_parallel_map

    def cluster_map(func=None, iterable=None, njobs=1, nproc=1, cluster_method=None,
                    asynchronous=True, callback=None, preserve_order=True):
        if func is not processor.execute_parallel_task:
            return original(func=func, iterable=iterable, njobs=njobs, nproc=nproc,
                            cluster_method=cluster_method, asynchronous=asynchronous,
                            callback=callback, preserve_order=preserve_order)
        tasks = list(iterable)
        shared, phase = _pack_shared(tasks)
        # DIALS' own grouping (dials.util.mp.multi_node_parallel_map): nproc
        # consecutive tasks per cluster job
        groups = [tasks[i : i + nproc] for i in range(0, len(tasks), nproc)]
        payloads = [[_pack_task(t) for t in group] for group in groups]
        results = s.map(_frame_range_task, payloads, f"integration ({phase})", shared=shared)
        out = []
        for result in results:
            if result[0] == "error":
                _, kind, message = result
                raise (ValueError if kind == "ValueError" else RuntimeError)(message)
            for item in result[1]:
                # DIALS' callback: its log records replayed, the result accumulated
                if callback is not None:
                    callback(item)
                out.append(item)
        return out

    processor.multi_node_parallel_map = cluster_map
    try:
        yield
    finally:
        processor.multi_node_parallel_map = original


def _pack_shared(tasks):
    """What all tasks of one pass share, pickled: (bytes, name of the pass).

    The executor as its class, constructor arguments and state (DIALS'
    executors derive from a Boost.Python class that refuses to pickle an
    instance with a __dict__; the modellers and experiments in it pickle),
    the experiments and processor parameters, and the background and
    centroid algorithms that DIALS' create_integrator set on the reflection
    table class in this process (a forked local worker inherits them).
    """
    from dials.array_family import flex

    first = next((t for t in tasks if hasattr(t, "executor")), None)
    executor = None
    phase = "integration"
    if first is not None:
        ex = first.executor
        executor = (type(ex), tuple(ex.__getinitargs__()), dict(ex.__dict__))
        phase = PASSES.get(type(ex).__name__, type(ex).__name__)
    shared = {
        "executor": executor,
        "experiments": first.experiments if first is not None else None,
        "params": first.params if first is not None else None,
        "algorithms": (flex.reflection_table.background_algorithm, flex.reflection_table.centroid_algorithm),
    }
    return pickle.dumps(shared, protocol=pickle.HIGHEST_PROTOCOL), phase


def _pack_task(task):
    from dials.algorithms.integration.processor import NullTask

    if isinstance(task, NullTask):
        return ("null", task.index, task.reflections)
    return ("task", task.index, tuple(task.job), task.reflections)


def _unpack_task(shared_bytes, packed):
    """A DIALS task as the processor made it, with an executor of its own."""
    from dials.algorithms.integration.processor import NullTask, Task

    if packed[0] == "null":
        return NullTask(index=packed[1], reflections=packed[2])
    shared = pickle.loads(shared_bytes)
    cls, initargs, state = shared["executor"]
    executor = cls(*initargs)
    executor.__dict__.update(state)
    _, index, job, reflections = packed
    return Task(index=index, job=job, experiments=shared["experiments"], reflections=reflections,
                params=shared["params"], executor=executor)


@contextlib.contextmanager
def _algorithms(shared_bytes):
    """DIALS' background and centroid algorithms of the run, on this job."""
    from dials.array_family import flex

    background, centroid = pickle.loads(shared_bytes)["algorithms"]
    table = flex.reflection_table
    saved = (table.background_algorithm, table.centroid_algorithm)
    table.background_algorithm, table.centroid_algorithm = background, centroid
    try:
        yield
    finally:
        table.background_algorithm, table.centroid_algorithm = saved


@contextlib.contextmanager
def _dials_logging_kept():
    """DIALS' execute_parallel_task configures the "dials" logger for its
    worker process; run in this (the job's) process, it is put back after."""
    dials_logger = logging.getLogger("dials")
    saved = (list(dials_logger.handlers), dials_logger.level, dials_logger.propagate)
    try:
        yield
    finally:
        dials_logger.handlers[:] = saved[0]
        dials_logger.setLevel(saved[1])
        dials_logger.propagate = saved[2]


@contextlib.contextmanager
def _fork():
    """Processes started by fork while active: DIALS' local route hands its
    tasks (which cannot be pickled) to its worker processes by fork."""
    import multiprocessing

    method = multiprocessing.get_start_method(allow_none=True)
    if method != "fork":
        multiprocessing.set_start_method("fork", force=True)
    try:
        yield
    finally:
        if method != "fork":
            multiprocessing.set_start_method(method, force=True)


def _frame_range_task(shared_bytes, packed_tasks):
    """Job side: DIALS' tasks of some frame ranges, run as DIALS runs them locally.

    Returns ("ok", [(result, log records), ...]) in task order, what DIALS'
    execute_parallel_task returns to its callback, or ("error", kind, message).
    """
    from dials.algorithms.integration.processor import execute_parallel_task
    from dials.util.mp import multi_node_parallel_map

    try:
        tasks = [_unpack_task(shared_bytes, p) for p in packed_tasks]
        nproc = min(_cores(), len(tasks))
        with _algorithms(shared_bytes):
            if nproc > 1:
                # DIALS' local route: one forked process per task
                with _fork():
                    results = multi_node_parallel_map(
                        func=execute_parallel_task, iterable=tasks, njobs=1, nproc=nproc,
                        cluster_method="multiprocessing", preserve_order=True,
                    )
            else:
                with _dials_logging_kept():
                    results = [execute_parallel_task(t) for t in tasks]
    except Exception as e:  # noqa: BLE001  (any DIALS failure: one line in this run, the jobs kept)
        return ("error", type(e).__name__, str(e))
    return ("ok", list(results))
