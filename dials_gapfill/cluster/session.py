"""The Dask session of a run: the jobs, the map of tasks onto them, retries, cancel.

One session per run: dask-jobqueue's cluster object for mp.method (its
scheduler runs in this process), a client, and a folder for the job scripts
and logs.  It is started by the first stage that needs the jobs, reused by
the later ones and closed (the jobs cancelled, the folder removed) when the
run ends, fails or is interrupted.  A job submission that the scheduler
refuses stops the run at once with one line (the jobs it waits for could
never start).  The job side (what a task does around the stage's function)
is at the end of this module.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings

from dials_gapfill.errors import GapfillError
from dials_gapfill.errors import one_line as error_line

logger = logging.getLogger("dials.process_gapped.cluster")

# mp.method -> (dask_jobqueue class, scheduler commands it needs: submit, query, cancel)
METHODS = {
    "slurm": ("SLURMCluster", ("sbatch", "squeue", "scancel")),
    "sge": ("SGECluster", ("qsub", "qstat", "qdel")),
    "pbs": ("PBSCluster", ("qsub", "qstat", "qdel")),
    "lsf": ("LSFCluster", ("bsub", "bjobs", "bkill")),
}

JOB_NAME = "dials-gapfill"

# the settings a scheduler's reason for refusing a job points at (words of
# Slurm's, SGE's, PBS's and LSF's messages)
_SETTING_WORDS = (
    ("mp.cluster.memory", ("memory", "mem=", "mem ")),
    ("mp.cluster.queue", ("partition", "queue")),
    ("mp.cluster.walltime", ("time limit", "walltime", "run limit")),
    ("mp.cluster.cores", ("cpu", "core", "processor", "slot")),
)
ALL_SETTINGS = "mp.cluster.queue, cores, memory, walltime or job_extra"


class ClusterError(GapfillError):
    """The cluster could not run a task (no scheduler, jobs that keep dying)."""


def is_cluster(params) -> bool:
    return getattr(getattr(params, "mp", None), "method", None) in METHODS


def one_line(text: str) -> str:
    """Lines of a command's output joined by "; "."""
    return "; ".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def run_command(args, timeout=30):
    """(exit code, its output on one line): stderr, or stdout when stderr is empty."""
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, f"{args[0]} did not answer within {timeout} s"
    return r.returncode, one_line(r.stderr or r.stdout)


def scheduler_reason(text: str) -> str:
    """A scheduler's message on one line, without the command's "error:" prefixes."""
    return one_line(re.sub(r"\b\w+: error: ", "", text))


def settings_named(reason: str) -> str:
    """The mp.cluster settings a scheduler's reason for refusing a job points at."""
    low = reason.lower()
    named = [name for name, words in _SETTING_WORDS if any(w in low for w in words)]
    return " or ".join(named) + " (or job_extra)" if named else ALL_SETTINGS


# --------------------------------------------------------------------------
# The jobs
# --------------------------------------------------------------------------


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


def log_base(params) -> str:
    """The folder in which a run makes its folder of job scripts and job logs."""
    c = params.mp.cluster
    return c.log_directory or os.path.join(os.path.expanduser("~"), ".cache", "dials-gapfill")


def cluster_object(params, directory, job_cls=None):
    """dask-jobqueue's cluster object of mp.method with the run's options (its
    scheduler starts in this process; no job is submitted until it is scaled)."""
    import dask_jobqueue

    kwargs = job_options(params, directory)
    if job_cls is not None:
        kwargs["job_cls"] = job_cls
    return getattr(dask_jobqueue, METHODS[params.mp.method][0])(**kwargs)


def job_script(params) -> str:
    """The job script that the session submits for each job.

    dask-jobqueue's own ``job_script()`` of a cluster object built as the
    session builds it (only the name of the run's job folder differs), so a
    check of it checks what the scheduler will be given: e.g. the memory as
    dask-jobqueue writes it (Slurm: ``--mem`` rounded up to whole GiB).
    """
    base = log_base(params)
    os.makedirs(base, exist_ok=True)
    directory = tempfile.mkdtemp(prefix=f"check-{os.getpid()}-", dir=base)
    try:
        cluster = cluster_object(params, directory)
        try:
            return cluster.job_script()
        finally:
            cluster.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _recording_job_class(job_cls, rejected: list):
    """dask-jobqueue's job class, recording each submission the scheduler refuses.

    dask-jobqueue submits from a callback of its event loop: a refusal is
    only logged there (a traceback) while the jobs are waited for until
    mp.cluster.start_timeout.  Recorded, it stops the run at once.
    """

    class Job(job_cls):
        async def start(self):
            try:
                await super().start()
            except Exception as e:
                rejected.append(e)
                raise

    return Job


class _RefusalsReported(logging.Filter):
    """Drops the traceback logged for a refused submission that the session
    reports itself (as one line)."""

    def __init__(self, rejected: list):
        super().__init__()
        self.rejected = rejected

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        return error is None or not any(error is e for e in self.rejected)


# loggers through which an exception of dask's event loop reaches the terminal
_LOOP_LOGGERS = ("tornado.application", "asyncio", "distributed.deploy.adaptive")


def _refused_message(method: str, error: BaseException) -> str:
    # dask-jobqueue's message is the command, its exit code, stdout and
    # stderr; the scheduler's reason is in stderr
    text = str(error)
    reason = scheduler_reason(text.split("stderr:", 1)[1] if "stderr:" in text else text)
    submit = METHODS[method][1][0]
    return (
        f"mp.method={method}: the scheduler refused the job ({submit}: {reason[:200]}): "
        f"fix {settings_named(reason)}"
    )


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
        base = log_base(params)
        os.makedirs(base, exist_ok=True)
        # job scripts and job logs: a folder of this run, outside the output folder, removed at the end
        self.directory = tempfile.mkdtemp(prefix=f"cluster-{os.getpid()}-", dir=base)
        self.job_ids: set[str] = set()
        self.submitted: set[str] = set()
        self.tasks = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.task_seconds = []
        # submissions the scheduler refused (exceptions of dask-jobqueue's job class)
        self.rejected: list[BaseException] = []
        self._filter = _RefusalsReported(self.rejected)
        for name in _LOOP_LOGGERS:
            logging.getLogger(name).addFilter(self._filter)
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
        job_cls = getattr(dask_jobqueue, METHODS[mp.method][0]).job_cls
        try:
            self.cluster = cluster_object(params, self.directory, _recording_job_class(job_cls, self.rejected))
            self.client = Client(self.cluster)
            # dead jobs are replaced: the number of jobs is held at njobs
            self.cluster.adapt(minimum_jobs=mp.njobs, maximum_jobs=mp.njobs)
        except BaseException as e:  # (the settings, handlers and folder above undone)
            self.close()
            if not isinstance(e, Exception):
                raise
            raise ClusterError(
                f"the {mp.method} cluster could not start: {error_line(e, 200)}: check mp.cluster.*"
            ) from None
        logger.info(
            "Cluster: %d %s job(s) of %d core(s), %s, walltime %s%s (job files in %s)",
            mp.njobs, mp.method, c.cores, c.memory, c.walltime,
            f", queue {c.queue}" if c.queue else "", self.directory,
        )
        logger.debug("Job script:\n%s", self.cluster.job_script())
        try:
            self._wait_for_first_job(c.start_timeout)
        except ClusterError:
            self.close()
            raise
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

    def _wait_for_first_job(self, timeout: float) -> None:
        """Until a worker has connected; TimeoutError after `timeout` s, ClusterError
        as soon as the scheduler refuses a submission."""
        deadline = time.monotonic() + timeout
        while True:
            self._stop_if_refused()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no worker within {timeout} s")
            try:
                self.client.wait_for_workers(1, timeout=min(1.0, remaining))
                return
            except (TimeoutError, asyncio.TimeoutError):  # (distinct before Python 3.11)
                continue

    def _stop_if_refused(self) -> None:
        if self.rejected:
            raise ClusterError(_refused_message(self.method, self.rejected[0]))

    def _result(self, future):
        """The future's result; ClusterError as soon as the scheduler refuses a
        submission (a job that replaces a dead one)."""
        while True:
            self._stop_if_refused()
            try:
                return future.result(timeout=1.0)
            except (TimeoutError, asyncio.TimeoutError):  # (distinct before Python 3.11)
                continue

    def _job_states(self) -> str:
        if self.method != "slurm":
            return ""
        code, text = run_command(["squeue", "-h", "-n", JOB_NAME, "-o", "%i %T %r"], timeout=10)
        return text if code == 0 else ""

    # ----------------------------------------------------------------------

    def map(self, function, tasks, what, shared=None):
        """function(shared, task) for each task on the cluster; the results in order.

        `shared` is sent to each job once.  Any failure or interrupt cancels
        the jobs (closes the session) before it is passed on.
        """
        from distributed import KilledWorker, wait

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
                result, job, seconds = self._result(future)
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
        if ids:
            run_command([METHODS[self.method][1][2], *ids], timeout=15)
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
        if getattr(self, "_filter", None) is not None:
            for name in _LOOP_LOGGERS:
                logging.getLogger(name).removeFilter(self._filter)
            self._filter = None
        if getattr(self, "directory", None):
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def _wrap_signal_handlers(s):
    """SIGINT/SIGTERM cancel the jobs first, then do what they did before.

    (dials.process_gapped's own handler ends the process with os._exit, which
    runs no atexit hook and no ``finally``.)
    """
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


def job_id() -> str:
    """The scheduler's id of the job this process runs in ("" outside a job)."""
    for name in ("SLURM_JOB_ID", "JOB_ID", "PBS_JOBID", "LSB_JOBID"):
        if os.environ.get(name):
            return os.environ[name]
    return ""


def job_cores() -> int:
    """Processes a task may use on this job (mp.cluster.cores)."""
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
    t0 = time.perf_counter()
    if shared is not None:
        shared = pickle.loads(shared)
    result = function(shared, task)
    return result, job_id(), time.perf_counter() - t0


@contextlib.contextmanager
def collect_logs():
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


def replay(records) -> None:
    """Log records collected on a job (collect_logs), logged in this process."""
    for name, level, message in records:
        logging.getLogger(name).log(level, message)
