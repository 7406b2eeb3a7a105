"""Integration on the cluster jobs: one task per block, or DIALS' frame ranges.

At least as many blocks as jobs: one task per block (the block's experiment,
its reference reflections and DIALS' integration parameters); the job runs
DIALS' ``run_integration`` on it with ``mp.nproc`` processes.  DIALS models
profiles and integrates each experiment on its own, so a block integrated
alone is integrated as in the run over all blocks.

Fewer blocks than jobs: DIALS' ``run_integration`` runs in this process with
``njobs`` = ceil(mp.njobs / blocks), ``nproc`` = cores; its processor cuts
each block into frame ranges and hands its per-range tasks to one parallel
map (``dials_compat.integration_processor_map``), which here sends them to
the jobs, ``nproc`` per task.  DIALS' executors (Boost.Python) cannot be
pickled, their content can: a task travels as its parts and is rebuilt on
the job, together with the background and centroid algorithms of the run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import multiprocessing
import pickle

from dials.algorithms.integration.processor import NullTask, Task, execute_parallel_task
from dials.array_family import flex
from dials.command_line.integrate import run_integration
from dials.util.mp import multi_node_parallel_map
from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

from dials_gapfill import dials_compat
from dials_gapfill.cluster.session import collect_logs, job_cores, replay, session
from dials_gapfill.model.tables import join_blocks

logger = logging.getLogger("dials.process_gapped.cluster")

# DIALS' executor of each processing pass -> the name of the pass (as the
# progress output names it)
PASSES = {
    "ProfileModellerExecutor": "profile modelling",
    "ProfileValidatorExecutor": "profile validation",
    "IntegratorExecutor": "integrating",
}


# DIALS' run_integration on one block whose reference spots are none, or match
# no prediction; on several blocks it leaves such a block out instead
NO_REFERENCE = ("No indexed spots found", "Zero reference spots were matched")


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
    s = session(params)
    k = frame_range_jobs(len(experiments), params.mp.njobs)
    if k > 1:
        return _integrate_frame_ranges(ip, experiments, reference, s, k)
    tasks, sent = [], []
    left_out = []
    for i, exp in enumerate(experiments):
        ref = reference.select(reference["id"] == i)
        if not _usable_reference(ref).count(True):
            # DIALS' run over all blocks leaves such a block out ("Zero
            # reference spots were matched"); on its own, DIALS stops at an
            # assertion (an empty table): it is left out here, as there
            left_out.append(f"{NO_REFERENCE[1]} for the block of images {exp.scan.get_image_range()}")
            continue
        ids = ref.experiment_identifiers()
        for key in list(ids.keys()):
            del ids[key]
        ref["id"] = flex.int(len(ref), 0)
        ref.experiment_identifiers()[0] = exp.identifier
        tasks.append((ExperimentList([exp]).to_dict(), ref))
        sent.append(exp)
    results = s.map(_integrate_task, tasks, "integration", shared=ip) if tasks else []
    tables = []
    kept = []
    for exp, result in zip(sent, results):
        replay(result[-1])
        if result[0] == "error":
            _, kind, message, _ = result
            if kind == "ValueError" and any(m in message for m in NO_REFERENCE) and len(experiments) > 1:
                # what DIALS' run over all blocks does with such a block: left
                # out (the caller integrates it by summation, as locally)
                left_out.append(message)
                continue
            raise (ValueError if kind == "ValueError" else RuntimeError)(message)
        _, expt_dict, reflections, _ = result
        done = ExperimentListFactory.from_dict(expt_dict, check_format=False)
        exp.profile = done[0].profile
        # the block's imageset index in the run over all blocks (one imageset per block)
        reflections["imageset_id"] = flex.int(len(reflections), len(kept))
        tables.append(reflections)
        kept.append(exp)
    if not kept and left_out:  # (none has a reference spot: as DIALS' run over all blocks)
        raise ValueError(left_out[0])
    return ExperimentList(kept), join_blocks(tables, ExperimentList(kept))


def _usable_reference(reference):
    """The rows DIALS' integrator keeps as reference spots
    (dials.command_line.integrate.process_reference): indexed, not bad for
    refinement, hkl not 0,0,0."""
    return (reference.get_flags(reference.flags.indexed)
            & ~reference.get_flags(reference.flags.bad_for_refinement, all=False)
            & (reference["miller_index"] != (0, 0, 0)))


def _integrate_task(ip, task):
    """Job side: DIALS' run_integration on one block."""
    expt_dict, reference = task
    experiments = ExperimentListFactory.from_dict(expt_dict)
    ip = copy.deepcopy(ip)
    ip.integration.mp.nproc = job_cores()
    ip.integration.mp.method = "multiprocessing"
    ip.integration.mp.njobs = 1
    with collect_logs() as records:
        try:
            experiments, reflections, _ = run_integration(ip, experiments, reference)
        except Exception as e:  # (any: the run names it in one line, as for the frame-range tasks)
            return ("error", type(e).__name__, str(e) or type(e).__name__, records)
    return ("ok", experiments.to_dict(), reflections, records)


# ---- integration in frame ranges -------------------------------------------


def _integrate_frame_ranges(ip, experiments, reference, s, k):
    """DIALS' run_integration here, its per-frame-range tasks on the jobs.

    DIALS' cluster parameters njobs=k, nproc=cores: its processor cuts each
    block into k x cores frame ranges (Auto block size: nproc x njobs pieces)
    and groups its tasks by nproc, each group sent to a job here.  Everything
    DIALS does between the passes (splitting the reflections, accumulating
    and finalizing the profile modellers, joining the partial rows) runs in
    this process, as locally.
    """
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

    def on_the_jobs(tasks, nproc, callback):
        return _run_on_jobs(s, tasks, nproc, callback)

    with dials_compat.integration_processor_map(on_the_jobs) as replaced:
        if not replaced:
            logger.warning("Cluster: this DIALS' integration processor has no parallel map to replace: "
                           "frame ranges integrated in this process")
        experiments, reflections, _ = run_integration(ip, experiments, reference)
    return experiments, reflections


def _run_on_jobs(s, tasks, nproc, callback):
    """One pass of DIALS' processor: its tasks in groups of nproc on the jobs,
    each result handed to DIALS' callback in task order."""
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


def _pack_shared(tasks):
    """What all tasks of one pass share, pickled: (bytes, name of the pass).

    The executor as its class, constructor arguments and state (DIALS'
    executors derive from a Boost.Python class that refuses to pickle an
    instance with a __dict__; the modellers and experiments in it pickle),
    the experiments and processor parameters, and the background and
    centroid algorithms that DIALS' create_integrator chose in this process
    (a forked local worker inherits them).
    """
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
        "algorithms": dials_compat.integration_algorithms(),
    }
    return pickle.dumps(shared, protocol=pickle.HIGHEST_PROTOCOL), phase


def _pack_task(task):
    if isinstance(task, NullTask):
        return ("null", task.index, task.reflections)
    return ("task", task.index, tuple(task.job), task.reflections)


def _unpack_task(shared_bytes, packed):
    """A DIALS task as the processor made it, with an executor of its own."""
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
    try:
        tasks = [_unpack_task(shared_bytes, p) for p in packed_tasks]
        nproc = min(job_cores(), len(tasks))
        with dials_compat.integration_algorithms_set(pickle.loads(shared_bytes)["algorithms"]):
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
