"""The cost of running tasks on a batch cluster through Dask (mp.method=slurm ...).

    .venv/bin/python benchmarks/cluster_cost.py                  # slurm, 1 job of 1 core
    .venv/bin/python benchmarks/cluster_cost.py --method slurm --njobs 2 --tasks 40

Uses dials_gapfill.cluster's own session (the jobs dials.process_gapped
starts) and measures:

- job start: from submitting the jobs to the first worker connected;
- per-task overhead: wall time per no-op task (submit, schedule, run, return),
  tasks run one after another on one job;
- data moved: wall time per task that takes and returns a payload of each
  size (pickled bytes, as the stages' tasks), giving the cost per MB.

The per-stage numbers of a real run (data in and out per task, seconds on
the job) are in its log: the lines starting ``Cluster:``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dials_gapfill  # noqa: F401
from dials_gapfill import cluster
from dials_gapfill.phil import working_params


def _noop(shared, task):
    return None


def _echo(shared, payload):
    return payload


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="slurm")
    ap.add_argument("--njobs", type=int, default=1)
    ap.add_argument("--cores", type=int, default=1)
    ap.add_argument("--tasks", type=int, default=30)
    ap.add_argument("--sizes-mb", default="0.1,1,10")
    args = ap.parse_args()
    params = working_params(
        f"mp.method={args.method}\nmp.njobs={args.njobs}\nmp.cluster.cores={args.cores}\nmp.cluster.memory=2GB"
    )
    cluster.check(params)
    t0 = time.perf_counter()
    s = cluster.session(params)
    print(f"job start (submit to first worker): {time.perf_counter() - t0:.2f} s")
    try:
        s.map(_noop, [None], "warm-up")
        t = time.perf_counter()
        for _ in range(args.tasks):
            s.map(_noop, [None], "no-op")
        serial = (time.perf_counter() - t) / args.tasks
        t = time.perf_counter()
        s.map(_noop, [None] * args.tasks, "no-op batch")
        batch = (time.perf_counter() - t) / args.tasks
        print(f"per-task overhead: {serial * 1e3:.1f} ms one at a time, {batch * 1e3:.1f} ms per task in a batch of {args.tasks}")
        for mb in (float(x) for x in args.sizes_mb.split(",")):
            payload = os.urandom(int(mb * 1e6))
            n = max(3, min(args.tasks, int(30 / max(mb, 0.1))))
            t = time.perf_counter()
            for _ in range(n):
                s.map(_echo, [payload], "echo")
            each = (time.perf_counter() - t) / n
            print(f"task with {mb:g} MB in and out: {each * 1e3:.1f} ms ({(each - serial) / (2 * mb) * 1e3:.1f} ms per MB moved)")
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
