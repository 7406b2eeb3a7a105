"""Where a stage's wall clock goes: the pipeline's stages in one process, every
DIALS log line with its time since the stage began.

    .venv/bin/python benchmarks/stage_timeline.py --stage integration \\
        /tmp/perf/images/sim_00{01..40}.cbf ... nproc=2 refinement.blocks.model=per_block

The stages before `--stage` run first (not timed here); then the stage runs
with a time stamp on each line that DIALS and dials.process_gapped log.  By
default only the lines that come after a pause of at least `--gap` seconds
are printed (with the pause), which shows the serial parts and each of
DIALS' integration jobs as it returns ("Frames: ..."); `--all` prints every
line.  Nothing is written to disk.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="integration", help="the stage to time (integration)")
    p.add_argument("--gap", type=float, default=0.4, help="print lines after a pause of this many seconds (0.4)")
    p.add_argument("--all", action="store_true", help="print every line")
    p.add_argument("args", nargs="+", help="images and PHIL assignments, as for dials.process_gapped")
    args = p.parse_args(argv)

    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from

    names = [stage.name for stage in pipeline.STAGES]
    if args.stage not in names:
        p.error(f"--stage must be one of: {', '.join(names)}")
    images = [a for a in args.args if "=" not in a]
    params = params_from([a for a in args.args if "=" in a])
    before = names[names.index(args.stage) + 1] if args.stage != names[-1] else None

    run = pipeline.Pipeline(params, images)
    # the stages before: untimed
    state = run.run(stop_before=args.stage)
    clock = {"t0": None, "last": 0.0}

    class Stamp(logging.Handler):
        def emit(self, record):
            if clock["t0"] is None:
                return
            lines = record.getMessage().strip().splitlines()
            if not lines:
                return
            t = time.perf_counter() - clock["t0"]
            pause = t - clock["last"]
            clock["last"] = t
            if args.all or pause >= args.gap:
                print(f"{t:8.2f} s  (+{pause:6.2f})  {lines[0][:110]}", flush=True)

    top = logging.getLogger("dials")
    top.setLevel(logging.INFO)
    top.addHandler(Stamp())
    stage = {stage.name: stage.run for stage in pipeline.STAGES}[args.stage]
    clock["t0"] = time.perf_counter()
    stage(state)
    total = time.perf_counter() - clock["t0"]
    print(f"{total:8.2f} s  {args.stage} done (the stages after it{' (' + before + ', ...)' if before else ''} not run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
