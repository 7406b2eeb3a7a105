"""Checks of mp.* before any work (called by validate()).

A setting that cannot work stops the run here, with one line naming the
problem and the fix: DIALS' drmaa route, Dask missing, settings that are not
amounts or times, no scheduler commands, and (Slurm) a job that Slurm would
refuse: the job script the session will submit, built by dask-jobqueue from
the same options, is given to ``sbatch --test-only``.
"""

from __future__ import annotations

import re
import shutil
import signal
import tempfile
import threading

from dials_gapfill.cluster.session import (
    METHODS,
    job_script,
    run_command,
    scheduler_reason,
    settings_named,
)
from dials_gapfill.errors import GapfillError

# Slurm's unit suffixes of --mem, in MB (no suffix: MB)
_SLURM_MB = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}


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
    # dask_jobqueue's import (its runner module) sets SIGINT to sys.exit():
    # Ctrl-C would then end the run with status 0 and no cleanup message
    interrupt = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        import dask_jobqueue  # noqa: F401
        import distributed  # noqa: F401
        from dask.utils import parse_bytes
    except ImportError:
        raise GapfillError(
            f"mp.method={method} needs Dask and dask-jobqueue: pip install 'dials-gapfill[cluster]' "
            "(or pip install distributed dask-jobqueue) into this Python, or use mp.method=multiprocessing"
        ) from None
    finally:
        if interrupt is not None and signal.getsignal(signal.SIGINT) is not interrupt:
            signal.signal(signal.SIGINT, interrupt)
    c = mp.cluster
    try:
        parse_bytes(str(c.memory))
    except Exception:
        raise GapfillError(
            f"mp.cluster.memory={c.memory} is not an amount of memory: give e.g. 4GB or 16GiB"
        ) from None
    if c.walltime is not None and not _walltime_ok(str(c.walltime), method):
        days = " or D-HH:MM:SS" if method == "slurm" else ""
        raise GapfillError(
            f"mp.cluster.walltime={c.walltime} is not a time: give HH:MM:SS{days} (e.g. 02:00:00)"
        )
    commands = METHODS[method][1]
    missing = [cmd for cmd in commands if shutil.which(cmd) is None]
    if missing:
        raise GapfillError(
            f"mp.method={method}: no {method.upper()} scheduler here ({', '.join(missing)} not found): "
            "run on a machine that can submit jobs, or use mp.method=multiprocessing"
        )
    if method == "slurm":
        _check_slurm(params)


def _walltime_ok(text: str, method: str = "") -> bool:
    """[[HH:]MM:]SS, and for Slurm also its days form D-HH[:MM[:SS]]."""
    if method == "slurm":
        days, dash, rest = text.partition("-")
        if dash:
            return days.isdigit() and 1 <= len(rest.split(":")) <= 3 and all(p.isdigit() for p in rest.split(":"))
    parts = text.split(":")
    return 1 <= len(parts) <= 3 and all(p.isdigit() for p in parts)


def _check_slurm(params) -> None:
    code, text = run_command(["sinfo", "-h", "-o", "%P"])
    if code != 0:
        raise GapfillError(
            f"mp.method=slurm: Slurm does not answer (sinfo: {text[:160]}): check that slurmctld "
            "runs, or use mp.method=multiprocessing"
        )
    try:
        script = job_script(params)
    except OSError as e:
        raise GapfillError(
            f"mp.cluster.log_directory: cannot make the folder of the job files ({e}): give a folder "
            "that this user can write and the jobs can read"
        ) from None
    # the job as it will be submitted, checked by Slurm itself without submitting it
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as fh:
        fh.write(script)
        fh.flush()
        code, text = run_command(["sbatch", "--test-only", fh.name])
    if code != 0:
        raise GapfillError(_slurm_refusal(params, script, scheduler_reason(text)))


def _slurm_refusal(params, script: str, reason: str) -> str:
    """Why Slurm refuses the job, and the setting to change.

    Slurm's own reason for a job larger than every node is the same for
    memory and CPUs ("Requested node configuration is not available"): the
    job's --mem and --cpus-per-task are compared with the partition's nodes.
    """
    c = params.mp.cluster
    where = f"partition {c.queue}" if c.queue else "the default partition"
    nodes = _slurm_nodes(c.queue)
    mems = re.findall(r"^#SBATCH\s+--mem=(\d+)([KMGT]?)\s*$", script, re.MULTILINE)
    if nodes and mems:
        number, unit = mems[-1]
        mb = int(number) * _SLURM_MB[unit]
        largest = max(memory for _, memory in nodes)
        extra = [x for x in c.job_extra or [] if re.search(r"--mem\b", x)]
        if mb > largest and extra:
            return (
                f"mp.cluster.job_extra={extra[-1]} is more memory than any node of {where} has (the largest "
                f"has {largest} MB; {reason[:120]}): give at most --mem={largest}M, or mp.cluster.memory instead"
            )
        if mb > largest:
            rounded = "; dask-jobqueue rounds up to whole GiB" if unit == "G" else ""
            return (
                f"mp.cluster.memory={c.memory} is more than any node of {where} has: the job asks Slurm for "
                f"--mem={number}{unit} ({mb:.0f} MB{rounded}), the largest node "
                f"has {largest} MB ({reason[:120]}): give mp.cluster.memory={_fitting_memory(largest)} or less"
            )
    cpus = re.findall(r"^#SBATCH\s+--cpus-per-task=(\d+)\s*$", script, re.MULTILINE)
    if nodes and cpus:
        most = max(n for n, _ in nodes)
        if int(cpus[-1]) > most:
            return (
                f"mp.cluster.cores={c.cores} is more than any node of {where} has ({most} CPUs; "
                f"{reason[:120]}): give mp.cluster.cores={most} or less"
            )
    return f"mp.cluster settings refused by Slurm ({reason[:200]}): fix {settings_named(reason)}"


def _slurm_nodes(queue) -> list[tuple[int, int]]:
    """(CPUs, memory in MB) of each node of the partition (None: the default one)."""
    code, text = run_command(["sinfo", "-h", "-N", "-o", "%P|%c|%m"])
    if code != 0:
        return []
    nodes = []
    for entry in text.split("; "):  # one "partition|cpus|memory" per node
        m = re.fullmatch(r"(\S+)\|(\d+)\|(\d+)\+?", entry)
        if m and ((m[1].rstrip("*") == queue) if queue else m[1].endswith("*")):
            nodes.append((int(m[2]), int(m[3])))
    return nodes


def _fitting_memory(largest_mb: int) -> str:
    """The largest mp.cluster.memory whose --mem (as dask-jobqueue rounds it up:
    whole GiB from 1 GiB on, else whole MiB) is at most `largest_mb`."""
    return f"{largest_mb // 1024}GiB" if largest_mb >= 1024 else f"{largest_mb}MiB"
