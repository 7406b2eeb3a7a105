"""mp.method=slurm on a real one-node Slurm (scripts/slurm_one_node.sh).

The module brings Slurm up (as root; Debian's munge, slurmctld, slurmd,
slurm-client, installed with apt-get if missing) and takes it down again if
it started it.  A small gapped sweep (3 blocks of 10 images) is processed on
this machine and through Slurm; the jobs must show in Slurm's job record and
the results must be the local run's.  Then the failures: settings Slurm
refuses (checked on the job script dask-jobqueue would submit), a submission
refused all the same, a job killed under a task, Ctrl-C.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, Sweeps, assert_block_integrated_by_summation, process, run_cmd, tool

SCRIPT = os.path.join(ROOT, "scripts", "slurm_one_node.sh")
# 3 blocks (1-10, 12-21, 23-32) of 1 deg images on a Pilatus 300K
CONFIG = dict(n_images=32, osc_width=1.0, detector="pilatus300k", distance=150.0, seed=42)
OMIT = (11, 22)
# 2 jobs of 2 cores: on this 2-core node one runs while the other waits in
# the queue (DIALS' own multiprocessing inside a job, and a queued job taking over)
SLURM = ["mp.method=slurm", "mp.njobs=2", "mp.cluster.cores=2", "mp.cluster.memory=2GB"]


def _no_dask():
    try:
        import dask_jobqueue  # noqa: F401
        import distributed  # noqa: F401
    except ImportError:
        return True
    return False


pytestmark = pytest.mark.skipif(_no_dask(), reason="needs Dask: pip install -e '.[cluster]'")


def _our_jobs():
    r = run_cmd(["squeue", "-h", "-n", "dials-gapfill", "-o", "%i %T"])
    return [line.split() for line in r.stdout.splitlines() if line.strip()]


def _queue_drains(timeout=30):
    """No job of ours left (a job that was just cancelled shows as COMPLETING a moment)."""
    deadline = time.time() + timeout
    while _our_jobs() and time.time() < deadline:
        time.sleep(0.5)
    return not _our_jobs()


@pytest.fixture(scope="module")
def slurm():
    """A one-node Slurm: (path of the job record)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start munged, slurmctld and slurmd (scripts/slurm_one_node.sh)")
    if shutil.which("dpkg-query") is None or shutil.which("apt-get") is None:
        pytest.skip("needs Debian (apt-get) for the Slurm packages")
    if os.path.exists("/etc/dials-gapfill-root"):
        # the DIALS root (scripts/dials-root.sh) shares the machine's network: Slurm
        # daemons started in it would take the machine's Slurm ports (6817, 6818)
        pytest.skip("the one-node Slurm runs on the machine, not in the DIALS root (GAPFILL_DIALS=root)")
    status = run_cmd(["bash", SCRIPT, "status"])
    was_up = "slurmd: running" in status.stdout and "slurmctld: running" in status.stdout
    t0 = time.time()
    up = run_cmd(["bash", SCRIPT, "up"], timeout=900)
    if up.returncode != 0:
        pytest.skip(f"no one-node Slurm here: {up.stderr.strip()[-300:]}")
    print(f"Slurm up in {time.time() - t0:.1f} s")
    jobcomp = run_cmd(["bash", SCRIPT, "jobcomp"]).stdout.strip()
    yield jobcomp
    assert _queue_drains(), "jobs of dials-gapfill left in the queue"
    if not was_up:
        down = run_cmd(["bash", SCRIPT, "down"], timeout=120)
        assert down.returncode == 0, down.stderr


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    return Sweeps(CONFIG, tmp_path_factory)


@pytest.fixture(scope="module")
def sweep(sweeps):
    return sweeps.make(omit=OMIT, name="slurm_sweep")


@pytest.fixture(scope="module")
def one_block(sweeps):
    """The same 32 images without gaps: one block."""
    return sweeps.make(omit=(), name="slurm_one_block")


@pytest.fixture(scope="module")
def job_folder(tmp_path_factory):
    """mp.cluster.log_directory of the runs (must be empty after each)."""
    return str(tmp_path_factory.mktemp("cluster_jobs"))


def _records(jobcomp):
    """Slurm's job record (jobcomp/filetxt): job id -> fields."""
    out = {}
    if not os.path.exists(jobcomp):
        return out
    for line in open(jobcomp):
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" in fields:
            out[fields["JobId"]] = fields
    return out


def _cluster_lines(out):
    log = open(os.path.join(out, "dials.process_gapped.log")).read()
    return re.findall(r"Cluster: (spot finding|integration) in (\d+) task\(s\) on slurm job\(s\) ([\d, ]+)", log)


def _start(sweep, out, *phil):
    args = [tool("dials.process_gapped"), sweep, f"output.directory={out}", *SLURM, *phil]
    return args, subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, out, marker, timeout=600):
    pattern = os.path.join(out, ".dials.process_gapped.tmp-*.log")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        logs = glob.glob(pattern)
        if logs and marker in open(logs[0]).read():
            return True
        time.sleep(0.2)
    return False


# the integration tasks are on the jobs (the integration stage first does
# work in this process, e.g. the profile model from all blocks: a job
# killed then would be idle and kill no task)
INTEGRATION_SUBMITTED = "Cluster: integration"


def _running_jobs(timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        running = [j for j, state in _our_jobs() if state == "RUNNING"]
        if running:
            return running
        time.sleep(0.2)
    return []


@pytest.fixture(scope="module")
def runs(slurm, sweep, tmp_path_factory, job_folder):
    """The sweep processed locally (nproc=2) and through Slurm (jobs of 2
    cores), where one job is killed (SIGKILL, as the kernel's OOM killer or a
    node failure would) while integration tasks run: (local, on_slurm, killed job)."""
    local = str(tmp_path_factory.mktemp("local"))
    on_slurm = str(tmp_path_factory.mktemp("on_slurm"))
    t0 = time.time()
    r = process(sweep, local, "nproc=2")
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    t1 = time.time()
    args, proc = _start(sweep, on_slurm, f"mp.cluster.log_directory={job_folder}")
    assert _wait_for(proc, on_slurm, INTEGRATION_SUBMITTED), proc.communicate()
    deadline = time.time() + 120  # (the jobs start when Slurm schedules them)
    while not (running := _running_jobs()) and time.time() < deadline:
        time.sleep(0.5)
    assert running
    subprocess.run(["scancel", "--full", "--signal=KILL", running[0]], check=True)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr + stdout[-2000:]
    print(f"local {t1 - t0:.1f} s, slurm {time.time() - t1:.1f} s")
    return local, on_slurm, running[0]


def _tables(out):
    from dials.array_family import flex

    import dials_gapfill  # noqa: F401

    return flex.reflection_table.from_file(os.path.join(out, "integrated.refl"))


# bookkeeping columns of DIALS' integrator that number rows within one run of
# it (a block integrated alone starts them at 0)
RUN_COUNTERS = {"partial_id"}


def assert_same_reflections(a, b):
    from dials.array_family import flex

    assert len(a) == len(b)
    assert sorted(a.keys()) == sorted(b.keys())
    assert list(a["miller_index"]) == list(b["miller_index"])
    for key in a.keys():
        if key in RUN_COUNTERS:
            continue
        x, y = a[key], b[key]
        if hasattr(x, "parts"):
            pairs = list(zip(x.parts(), y.parts()))
        elif isinstance(x, (flex.double, flex.float)):
            pairs = [(x, y)]
        else:
            assert list(x) == list(y), key
            continue
        for p, q in pairs:
            p, q = p.as_double(), q.as_double()
            # floating-point tolerance: profile fitting sums in another order
            tol = 1e-9 * flex.max(flex.abs(p)) + 1e-12 if len(p) else 0
            assert flex.max(flex.abs(p - q)) <= tol, (key, flex.max(flex.abs(p - q)))


def assert_same_mtz(a, b):
    import gemmi
    import numpy

    ma, mb = gemmi.read_mtz_file(a), gemmi.read_mtz_file(b)
    assert [c.label for c in ma.columns] == [c.label for c in mb.columns]
    assert ma.nreflections == mb.nreflections
    assert [x.number for x in ma.batches] == [x.number for x in mb.batches]
    for x, y in zip(ma.batches, mb.batches):
        numpy.testing.assert_allclose(list(x.floats), list(y.floats), rtol=1e-6, atol=1e-6)
    da, db = numpy.array(ma, copy=False), numpy.array(mb, copy=False)
    assert da.shape == db.shape
    numpy.testing.assert_allclose(da, db, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.slow
def test_slurm_run_equals_local_run(runs, slurm, job_folder):
    local, on_slurm, _ = runs
    # the jobs ran through Slurm: the log names them, Slurm's record has them
    lines = _cluster_lines(on_slurm)
    stages = {stage for stage, _, _ in lines}
    assert stages == {"spot finding", "integration"}, lines
    jobs = {j.strip() for _, _, ids in lines for j in ids.split(",")}
    assert ("integration", "3", ) == next((s, n) for s, n, _ in lines if s == "integration")
    deadline = time.time() + 60  # the record is written when the job ends
    while not jobs <= set(records := _records(slurm)) and time.time() < deadline:
        time.sleep(0.5)
    for job in jobs:
        assert job in records, (job, sorted(records))
        assert records[job]["Name"] == "dials-gapfill"
        assert records[job]["Partition"] == "debug"
    # nothing left behind: no job, no job folder, no stray file in the output
    assert _queue_drains()
    assert os.listdir(job_folder) == []
    assert sorted(os.listdir(local)) == sorted(os.listdir(on_slurm))
    # same blocks, spots, integrated reflections and intensities, MTZ content
    sa = json.load(open(os.path.join(local, "dials.process_gapped.json")))
    sb = json.load(open(os.path.join(on_slurm, "dials.process_gapped.json")))
    assert [(b["first"], b["last"]) for b in sa["blocks"]] == [(b["first"], b["last"]) for b in sb["blocks"]]
    assert [(b["first"], b["last"]) for b in sa["blocks"]] == [(1, 10), (12, 21), (23, 32)]
    for key in ("spots", "indexed", "integrated", "gap_edge"):
        assert [b.get(key) for b in sa["blocks"]] == [b.get(key) for b in sb["blocks"]], key
    assert_same_reflections(_tables(local), _tables(on_slurm))
    for name in sorted(os.listdir(local)):
        if name.endswith(".mtz"):
            assert_same_mtz(os.path.join(local, name), os.path.join(on_slurm, name))


def _read(*path):
    with open(os.path.join(*path)) as fh:
        return fh.read()


def test_frame_range_jobs():
    """How many frame-range pieces (DIALS' integration njobs) per block."""
    from dials_gapfill.cluster import frame_range_jobs

    # at least as many blocks as jobs: one task per block
    assert [frame_range_jobs(b, 2) for b in (2, 3, 12)] == [1, 1, 1]
    assert frame_range_jobs(12, 4) == 1
    # fewer: each block cut so that there are at least njobs tasks
    assert frame_range_jobs(1, 2) == 2
    assert frame_range_jobs(1, 16) == 16
    assert frame_range_jobs(3, 4) == 2
    assert frame_range_jobs(5, 16) == 4


@pytest.mark.slow
def test_one_block_integrated_in_frame_ranges_on_several_jobs(slurm, one_block, tmp_path, job_folder):
    """A sweep that is one block, 2 jobs of 1 core: DIALS' integration cut
    into 2 frame ranges (its block rule with njobs=2, nproc=1), each pass
    (profile modelling, integrating) one task per range, spread over both
    jobs; the result is the local run's with nproc=2, which cuts the block
    into the same 2 ranges."""
    local, on_slurm = str(tmp_path / "local"), str(tmp_path / "on_slurm")
    t0 = time.time()
    r = process(one_block, local, "nproc=2")
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    t1 = time.time()
    r = run_cmd(
        [tool("dials.process_gapped"), one_block, f"output.directory={on_slurm}", "nproc=2",
         "mp.method=slurm", "mp.njobs=2", "mp.cluster.cores=1", "mp.cluster.memory=2GB",
         f"mp.cluster.log_directory={job_folder}"],
        timeout=900,
    )
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    print(f"local {t1 - t0:.1f} s, slurm {time.time() - t1:.1f} s")
    log = _read(on_slurm, "dials.process_gapped.log")
    assert "Cluster: 1 block(s) for 2 job(s): each block's integration in 2 x 1 frame ranges" in log
    passes = re.findall(r"Cluster: integration \(([a-z ]+)\) in (\d+) task\(s\) on slurm job\(s\) ([\d, ]+)", log)
    print(passes)
    assert [p for p, _, _ in passes][:1] == ["profile modelling"] and passes[-1][0] == "integrating", passes
    assert all(int(n) == 2 for _, n, _ in passes), passes
    jobs = {j.strip() for _, _, ids in passes for j in ids.split(",")}
    assert len(jobs) >= 2, passes
    # the same frame ranges as the local run
    ranges = re.compile(r"Processing reflections in the following blocks of images:.*?\n\n(.*?)\n\n", re.DOTALL)
    local_log = _read(local, "dials.process_gapped.log")
    assert ranges.findall(log) == ranges.findall(local_log)
    # nothing left behind, the same files, blocks, counts and results
    assert _queue_drains()
    assert os.listdir(job_folder) == []
    assert sorted(os.listdir(local)) == sorted(os.listdir(on_slurm))
    sa = json.loads(_read(local, "dials.process_gapped.json"))
    sb = json.loads(_read(on_slurm, "dials.process_gapped.json"))
    assert [(b["first"], b["last"]) for b in sa["blocks"]] == [(b["first"], b["last"]) for b in sb["blocks"]] == [(1, 32)]
    for key in ("spots", "indexed", "integrated"):
        assert [b.get(key) for b in sa["blocks"]] == [b.get(key) for b in sb["blocks"]], key
    a, b = _tables(local), _tables(on_slurm)
    assert_same_reflections(a, b)
    for name in sorted(os.listdir(local)):
        if name.endswith(".mtz"):
            assert_same_mtz(os.path.join(local, name), os.path.join(on_slurm, name))


# ---------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------


def _refused(sweep, tmp_path, *phil, env=None):
    out = str(tmp_path / "out")
    args = [tool("dials.process_gapped"), sweep, f"output.directory={out}", *phil]
    r = run_cmd(args, env=env, timeout=120)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert not os.path.exists(out), "refused before any work: nothing written"
    return lines[0]


@pytest.mark.parametrize(
    "phil, expected",
    [
        (["mp.cluster.queue=nosuchqueue"], "invalid partition"),
        (["mp.cluster.memory=100TB"], "mp.cluster"),
        (["mp.cluster.memory=lots"], "mp.cluster.memory=lots is not an amount of memory"),
        (["mp.cluster.walltime=soon"], "mp.cluster.walltime=soon is not a time"),
        (["mp.cluster.job_extra=--constraint=nosuchfeature"], "job_extra"),
    ],
)
def test_bad_scheduler_settings_refused_up_front(slurm, sweep, tmp_path, phil, expected):
    line = _refused(sweep, tmp_path, "mp.method=slurm", *phil)
    assert expected in line, line


def _memory_over_the_node():
    """(memory, the node's MB): an mp.cluster.memory that fits the node as a
    plain amount (MiB) but not as the --mem that dask-jobqueue writes (rounded
    up to whole GiB), e.g. 4GB on a node of 4000 MB (3814 MiB; --mem=4G is
    4096 MB); memory None if the node's memory leaves no such amount."""
    r = run_cmd(["sinfo", "-h", "-N", "-o", "%m"])
    node_mb = max(int(m) for m in r.stdout.split())
    gb = node_mb * 2**20 // 10**9
    for memory, nbytes in ((f"{gb}GB", gb * 10**9), (f"{node_mb}MiB", node_mb * 2**20)):
        if nbytes // 2**20 <= node_mb < -(-nbytes // 2**30) * 1024:
            return memory, node_mb
    return None, node_mb


def test_job_larger_than_the_node_refused_up_front(slurm, sweep, tmp_path, job_folder):
    """The job that dask-jobqueue would submit is the one checked: its --mem
    (whole GiB) is more than the node has, so Slurm would refuse every job."""
    memory, node_mb = _memory_over_the_node()
    if memory is None:
        pytest.skip(f"no amount fits {node_mb} MB in MiB but not in whole GiB")
    # (a run that let this job through would wait out the start timeout,
    # far past _refused's limit on the command)
    line = _refused(sweep, tmp_path, *SLURM[:3], f"mp.cluster.memory={memory}",
                    "mp.cluster.start_timeout=3600", f"mp.cluster.log_directory={job_folder}")
    assert f"mp.cluster.memory={memory} is more than any node" in line, line
    assert f"has {node_mb} MB" in line and f"give mp.cluster.memory={node_mb // 1024}GiB or less" in line, line
    assert not _our_jobs()
    assert os.listdir(job_folder) == []


def test_refused_submission_stops_the_run_at_once(slurm, sweep, tmp_path, job_folder):
    """A submission that Slurm refuses although --test-only accepted the job
    (here an sbatch that refuses every real submission): the run stops with
    one line, without tracebacks and without waiting mp.cluster.start_timeout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(
        "#!/bin/sh\n"
        f'case " $* " in *" --test-only "*) exec {shutil.which("sbatch")} "$@" ;; esac\n'
        'echo "sbatch: error: Memory specification can not be satisfied" >&2\n'
        'echo "sbatch: error: Batch job submission failed: Requested node configuration is not available" >&2\n'
        "exit 1\n"
    )
    sbatch.chmod(0o755)
    out = str(tmp_path / "out")
    # (a run that waited for the start timeout would outlast the command's limit)
    r = run_cmd(
        [tool("dials.process_gapped"), sweep, f"output.directory={out}", *SLURM,
         "mp.cluster.start_timeout=3600", f"mp.cluster.log_directory={job_folder}"],
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}"}, timeout=600,
    )
    assert r.returncode == 1, r.stderr + r.stdout[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert "mp.method=slurm: the scheduler refused the job (sbatch: Memory specification can not be satisfied; Batch job" in lines[0]
    assert "fix mp.cluster.memory" in lines[0], lines[0]
    assert _queue_drains()
    assert os.listdir(job_folder) == []


def test_dials_drmaa_route_refused_with_the_alternative(sweep, tmp_path):
    line = _refused(sweep, tmp_path, "mp.method=drmaa")
    assert "use mp.method=slurm" in line, line


def test_no_scheduler(sweep, tmp_path):
    # a PATH without the Slurm commands: no scheduler on this machine
    bare = tmp_path / "bin"
    bare.mkdir()
    env = {"PATH": str(bare)}
    line = _refused(sweep, tmp_path, "mp.method=slurm", env=env)
    assert "no SLURM scheduler here (sbatch, squeue, scancel not found)" in line, line
    line = _refused(sweep, tmp_path, "mp.method=sge", env=env)
    assert "no SGE scheduler here" in line, line


def test_slurm_that_does_not_answer(slurm, sweep, tmp_path):
    conf = tmp_path / "slurm.conf"
    text = open("/etc/slurm/slurm.conf").read().replace("SlurmctldPort=6817", "SlurmctldPort=6999")
    conf.write_text(text + "MessageTimeout=2\n")
    line = _refused(sweep, tmp_path, "mp.method=slurm", env={"SLURM_CONF": str(conf)})
    assert "Slurm does not answer" in line, line


@pytest.mark.slow
def test_killed_job_is_taken_over_and_the_result_unchanged(runs, slurm):
    """The run of test_slurm_run_equals_local_run lost a job during integration."""
    local, on_slurm, killed = runs
    records = _records(slurm)
    assert killed in records
    # its block was integrated on another job.  Whether a replacement job is
    # also submitted depends on timing (dask's adapt notices the dead worker
    # about a second later; the other job may finish every task before that:
    # CI saw jobs ['142', '143'] only), so that is not asserted.
    log = open(os.path.join(on_slurm, "dials.process_gapped.log")).read()
    submitted = re.findall(r"Cluster: jobs submitted so far: ([\d, ]+)", log)[-1].split(", ")
    assert killed in submitted and len(submitted) >= 2, submitted
    integration = [ids for stage, _, ids in _cluster_lines(on_slurm) if stage == "integration"]
    assert {j.strip() for j in integration[0].split(",")} - {killed}, integration
    assert_same_reflections(_tables(local), _tables(on_slurm))


@pytest.mark.slow
def test_job_that_keeps_dying_stops_the_run_with_one_line(sweep, slurm, tmp_path, job_folder):
    out = str(tmp_path / "out")
    args, proc = _start(sweep, out, "mp.njobs=1", "mp.cluster.retries=0", f"mp.cluster.log_directory={job_folder}")
    assert _wait_for(proc, out, INTEGRATION_SUBMITTED)
    time.sleep(1.0)
    killed = _running_jobs()
    assert killed
    subprocess.run(["scancel", "--full", "--signal=KILL", killed[0]], check=True)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr + stdout[-2000:]
    message = [line for line in stderr.splitlines() if "error:" in line]
    assert len(message) == 1 and "integration: slurm jobs died 1 time running the same task" in message[0], stderr
    assert "mp.cluster" in message[0]
    assert _queue_drains()
    assert os.listdir(job_folder) == []
    assert not os.path.exists(os.path.join(out, "integrated.refl"))


@pytest.mark.slow
def test_ctrl_c_cancels_the_jobs(sweep, slurm, tmp_path, job_folder):
    out = str(tmp_path / "out")
    args, proc = _start(sweep, out, f"mp.cluster.log_directory={job_folder}")
    # (after spot finding, which captures the terminal's output that an
    # interrupt there would take with it; the jobs are held for integration)
    assert _wait_for(proc, out, "=== Indexing ===")
    time.sleep(1.0)
    assert _running_jobs()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted by SIGINT" in stderr
    # the jobs are gone at once, and nothing is left behind
    assert _queue_drains(20)
    assert os.listdir(job_folder) == []
    left = sorted(os.listdir(out)) if os.path.exists(out) else []
    assert all(name == "dials.process_gapped.failed.log" for name in left), left


def test_job_scripts_of_every_scheduler(tmp_path):
    """The job each scheduler gets (dask-jobqueue's script; no scheduler needed)."""
    import dask_jobqueue

    from dials_gapfill import cluster
    from dials_gapfill.phil import working_params

    expected = {
        "slurm": ["#SBATCH -p q1", "--cpus-per-task=4", "--mem=8G", "#SBATCH -t 02:30:00", "#SBATCH -A proj"],
        "sge": ["#$ -q q1", "#$ -l h_rt=02:30:00", "#$ -A proj"],
        "pbs": ["#PBS -q q1", "ncpus=4", "#PBS -l walltime=02:30:00", "#PBS -A proj"],
        "lsf": ["#BSUB -q q1", "#BSUB -n 4", "#BSUB -W 2:30", "#BSUB -A proj"],
    }
    for method, lines in expected.items():
        params = working_params(
            f"mp.method={method}\nmp.cluster.queue=q1\nmp.cluster.cores=4\nmp.cluster.memory=8GB\n"
            "mp.cluster.walltime=02:30:00\nmp.cluster.job_extra=-A proj"
        )
        cls = getattr(dask_jobqueue, cluster.METHODS[method][0])
        c = cls(**cluster.job_options(params, str(tmp_path)))
        try:
            script = c.job_script()
        finally:
            c.close()
        for line in lines + ["DIALS_GAPFILL_CLUSTER_CORES=4", "--no-nanny", "dials-gapfill"]:
            assert line in script, (method, line, script)


def test_the_cluster_check_leaves_ctrl_c_as_it_was():
    """Importing dask_jobqueue sets SIGINT to sys.exit() (its runner module):
    a Ctrl-C would end the run with status 0. The check that imports it puts
    the handler back (a fresh process: the import happens once)."""
    code = (
        "import signal, dials_gapfill\n"
        "from dials_gapfill.phil import params_from\n"
        "from dials_gapfill.cluster.checks import check\n"
        "before = signal.getsignal(signal.SIGINT)\n"
        "try:\n    check(params_from(['mp.method=slurm']))\nexcept Exception:\n    pass\n"
        "import sys\n"
        "print('dask_jobqueue.runner' in sys.modules, signal.getsignal(signal.SIGINT) is before)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["True", "True"], result.stdout + result.stderr[-2000:]


@pytest.mark.parametrize("walltime, method, ok", [
    ("02:00:00", "slurm", True), ("90", "slurm", True), ("1-00:00:00", "slurm", True), ("2-12", "slurm", True),
    ("1-00:00:00", "pbs", False), ("soon", "slurm", False), ("1-", "slurm", False), ("1-2:3:4:5", "slurm", False),
])
def test_walltime_forms(walltime, method, ok):
    """Slurm's time forms, its days form (D-HH:MM:SS) included; the other
    schedulers' HH:MM:SS."""
    from dials_gapfill.cluster.checks import _walltime_ok

    assert _walltime_ok(walltime, method) is ok


def test_a_cluster_that_cannot_start_leaves_the_process_as_it_was(tmp_path, monkeypatch):
    """The scheduler's object failing to start (here made to fail, as a port
    already taken does): one ClusterError line, and the signal handlers,
    dask's settings, the log filters and the job folder as before."""
    import importlib
    import logging

    import dask

    from dials_gapfill.phil import params_from

    cluster_session = importlib.import_module("dials_gapfill.cluster.session")

    def refused(*args, **kwargs):
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(cluster_session, "cluster_object", refused)
    params = params_from(["mp.method=slurm", "mp.njobs=1", f"mp.cluster.log_directory={tmp_path}"])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    allowed = dask.config.get("distributed.scheduler.allowed-failures")
    filters = {name: list(logging.getLogger(name).filters) for name in cluster_session._LOOP_LOGGERS}
    with pytest.raises(cluster_session.ClusterError) as e:
        cluster_session.Session(params)
    assert str(e.value) == ("the slurm cluster could not start: [Errno 98] Address already in use: "
                            "check mp.cluster.*")
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert dask.config.get("distributed.scheduler.allowed-failures") == allowed
    assert {name: list(logging.getLogger(name).filters) for name in filters} == filters
    assert [p for p in glob.glob(os.path.join(str(tmp_path), "**", "cluster-*"), recursive=True)] == []


@pytest.mark.slow
def test_a_block_without_reference_spots_on_the_jobs_is_integrated_by_summation(slurm, sweep, job_folder, caplog):
    """As locally (test_hostile.py): a block none of whose reference spots is
    left fails on its job with DIALS' "no reference" error; it is integrated
    on its own by summation, with the other blocks' profile parameters, and
    kept in its place."""
    import logging

    from dials_gapfill import cluster, pipeline
    from dials_gapfill.phil import params_from
    from dials_gapfill.stages import integration

    state = pipeline.Pipeline(params_from(["nproc=1"]), [sweep]).run(stop_before="integration")
    assert [e.scan.get_image_range() for e in state.experiments] == [(1, 10), (12, 21), (23, 32)]
    reference = state.reflections
    second = reference["id"] == 1
    assert second.count(True) > 100
    reference.set_flags(second, reference.flags.bad_for_refinement)
    params = params_from(["nproc=1", *SLURM, f"mp.cluster.log_directory={job_folder}"])
    caplog.set_level(logging.INFO)
    try:
        experiments, reflections, record = integration.integrate(
            state.experiments, reference, params, state.sweeps, "per_block")
    finally:
        cluster.close()
    assert_block_integrated_by_summation(experiments, reflections, record, caplog.text,
                                         [(1, 10), (12, 21), (23, 32)], 1, 500)
    assert _queue_drains() and os.listdir(job_folder) == []
