"""Progress output of the long stages (dials_gapfill/progress.py), from real runs.

- not a terminal (a pipe): plain progress lines on stdout and in the log, with
  counts of images that grow and end at the stage's number of images, and no
  silent indexing (a heartbeat while DIALS searches for the lattice);
- every frame range DIALS prints is in image numbers (the files' numbers);
- a terminal (a pseudo-terminal): a tqdm bar there, none of its carriage
  returns in the log; Ctrl-C clears the bar and the run ends at once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import signal
import struct
import subprocess
import termios
import threading
import time

import pytest

from conftest import WORKERS, tool

GAP = (15, 16, 17)  # tiny sweep (images 1-40): blocks 1-14 and 18-40
BLOCKS = [(1, 14), (18, 40)]
N_IMAGES = 37
INTERVAL = 1.0  # output.progress_interval of these runs (the default is 10 s)


def _command(sweep, out, *phil):
    return [tool("dials.process_gapped"), sweep, f"output.directory={out}", f"nproc={WORKERS}",
            f"output.progress_interval={INTERVAL}", *phil]


@pytest.fixture(scope="module")
def piped(tiny_sweeps, tmp_path_factory):
    """A run whose stdout is a pipe: (return code, [(seconds, line)], log text)."""
    sweep = tiny_sweeps.make(omit=GAP, name="progress_gapped")
    out = tmp_path_factory.mktemp("progress_piped")
    start = time.monotonic()
    p = subprocess.Popen(_command(sweep, str(out)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for raw in iter(p.stdout.readline, b""):
        lines.append((time.monotonic() - start, raw.decode(errors="replace").rstrip("\n")))
    rc = p.wait(timeout=60)
    with open(out / "dials.process_gapped.log", encoding="utf-8") as fh:
        log = fh.read()
    return rc, lines, log


def _progress(text_lines, stage):
    """[(done, total, line)] of the plain progress lines of a stage that count images."""
    found = []
    for line in text_lines:
        m = re.match(rf"{re.escape(stage)}(?: \(([^)]*)\))?: (\d+)/(\d+) images \((\d+) %\), (.*)$", line)
        if m:
            found.append((m.group(1), int(m.group(2)), int(m.group(3)), line))
    return found


@pytest.mark.slow
def test_lines_count_the_images(piped):
    rc, lines, log = piped
    assert rc == 0, "\n".join(l for _, l in lines[-30:])
    console = [l for _, l in lines]
    seconds = {m.group(1): float(m.group(2)) for m in
               (re.match(r"([A-Z][a-z -]+) done in ([\d.]+) s$", l) for l in console) if m}
    for where in (console, log.splitlines()):
        # spot finding: one count over all blocks, ending at every image used
        # (lines come only when the stage lasts longer than the interval)
        spots = _progress(where, "spot finding")
        # integration: a count per part (profile modelling, then integrating)
        integrating = [p for p in _progress(where, "integration") if p[0] == "integrating"]
        for counts in ([spots] if seconds["Spot finding"] > INTERVAL + 0.5 else []) + [integrating]:
            assert counts, "no progress line with a count"
            assert all(total == N_IMAGES for _, _, total, _ in counts)
            done = [d for _, d, _, _ in counts]
            assert done == sorted(done), done
            assert done[-1] == N_IMAGES and "stage done in" in counts[-1][3], counts[-1]
        # every plain line says how long the stage has run; a time left only with a count
        for line in where:
            m = re.match(r"(spot finding|bad images|indexing|refinement|integration|export)\b.*: (.*)$", line)
            if m and ("elapsed" in line or "stage done" in line):
                assert re.search(r"\d+ s elapsed|stage done in \d+ s", line), line
                if "left" in line:
                    assert re.search(r"\d+/\d+ images .* about \d+ s left$", line), line
    # the indexing lines say what DIALS is doing, from its own messages
    assert any(re.match(r"indexing \((lattice search|candidate lattices|refinement macro-cycle \d)", l)
               for l in console), "no indexing activity"
    # refinement: the steps of DIALS' refinement engine
    assert any(re.match(r"refinement \((static|scan-varying) refinement, step \d+\)", l) for l in console)
    # integration: images count as DIALS' worker processes finish them, before
    # a worker hands back its job's messages (" Frames: ...") at the job's end
    start = next(i for i, l in enumerate(console) if l.startswith("integration (integrating)"))
    after = console[start:]
    first_job = next(i for i, l in enumerate(after) if l.startswith(" Frames: images"))
    assert any(d > 0 for _, d, _, _ in _progress(after[:first_job], "integration")), after[:first_job]


@pytest.mark.slow
def test_lines_in_every_long_stage_and_a_heartbeat_in_indexing(piped):
    rc, lines, _ = piped
    assert rc == 0
    console = [l for _, l in lines]
    # every stage that ran longer than the interval printed progress
    for line in console:
        m = re.match(r"([A-Z][a-z -]+) done in ([\d.]+) s$", line)
        if m and float(m.group(2)) > INTERVAL + 0.5:
            stage = m.group(1).lower()
            assert any(l.startswith(stage + " (") or l.startswith(stage + ":") for l in console), stage
    # the heartbeat: indexing, which DIALS runs without a line of its own for
    # many seconds (the lattice search), says it is alive, each line later in
    # the stage than the one before.  (How long a silence can last depends on
    # the machine's load: a thread waits for the GIL while DIALS' C++ code
    # keeps it, so no bound on it is asserted.)
    first = next(i for i, l in enumerate(console) if l == "=== Indexing ===")
    last = next(i for i, l in enumerate(console) if l.startswith("Indexing done in"))
    elapsed = [int(m.group(1)) for l in console[first:last] if (m := re.search(r"(\d+) s elapsed", l))]
    assert elapsed and elapsed == sorted(elapsed), console[first:last]


@pytest.mark.slow
def test_frame_ranges_are_image_numbers(piped):
    rc, _, log = piped
    assert rc == 0
    # DIALS 3.12 prints integration jobs 0-based (" Frames: 0 -> 9"), profile
    # modelling jobs 1-based: all are rewritten to the files' image numbers
    assert not re.search(r"Frames: \d", log)
    ranges = re.findall(r"^ Frames: images (\d+)-(\d+)$", log, flags=re.M)
    assert len(ranges) >= 4
    ranges = [(int(a), int(b)) for a, b in ranges]
    for a, b in ranges:
        assert any(f <= a <= b <= l for f, l in BLOCKS), (a, b)
    # the integration jobs are the modelling jobs, and start at the first image
    half = len(ranges) // 2
    assert ranges[:half] == ranges[half:]
    assert min(a for a, _ in ranges) == 1 and max(b for _, b in ranges) == 40
    assert {a for a, _ in ranges} >= {f for f, _ in BLOCKS}
    # spot finding's ranges and DIALS' job table are image numbers too
    spots = [(int(a), int(b)) for a, b in re.findall(r"Finding spots in image (\d+) to (\d+)", log)]
    assert spots == BLOCKS
    # no message of this program or DIALS names an image 0 or one in the gap
    for n in re.findall(r"\b[Ii]mages? (\d+)\b(?!\.\d)", log):
        assert 1 <= int(n) <= 40 and int(n) not in GAP, n


def _pty_run(args, interrupt_when=None, timeout=300):
    """Run on a pseudo-terminal (120 columns): (return code, bytes shown,
    seconds from the interrupt to the end or None)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    shown = bytearray()
    stopped = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
        if interrupt_when is not None and stopped is None and interrupt_when(bytes(shown)):
            p.send_signal(signal.SIGINT)
            stopped = time.monotonic()
    rc = p.wait(timeout=60)
    os.close(master)
    return rc, bytes(shown), (time.monotonic() - stopped) if stopped else None


@pytest.fixture(scope="module")
def short_sweep(tiny_sweeps):
    """Images 1-12 of the tiny sweep: one short block."""
    return tiny_sweeps.make(omit=range(13, 41), name="progress_short")


@pytest.mark.slow
def test_bar_on_a_terminal_plain_lines_in_the_log(short_sweep, tmp_path):
    out = tmp_path / "out"
    rc, shown, _ = _pty_run(_command(short_sweep, str(out)))
    text = shown.decode(errors="replace")
    assert rc == 0, text[-3000:]
    # tqdm's bar, with the count and the time left, redrawn with carriage returns
    assert "\r" in text
    assert re.search(r"integration \(integrating\): +\d+%\|[^|]*\| *\d+/12 images \[\d\d:\d\d<", text), \
        text[-3000:]
    assert re.search(r"indexing( \([^)]*\))?: \d\d:\d\d elapsed", text)
    # the terminal shows the bar, not the plain lines
    assert not re.search(r"\d+ s elapsed", text)
    # a message never continues a bar's line: the bar is cleared before it
    for m in re.finditer(r"Integration done in", text):
        assert text[m.start() - 1] in "\r\n", repr(text[m.start() - 80:m.end()])
    with open(out / "dials.process_gapped.log", encoding="utf-8") as fh:
        log = fh.read()
    assert "\r" not in log and "%|" not in log
    counts = [p for p in _progress(log.splitlines(), "integration") if p[0] == "integrating"]
    assert counts and counts[-1][1] == counts[-1][2] == 12 and "stage done" in counts[-1][3]
    assert re.search(r"^indexing( \([^)]*\))?: \d+ s elapsed$", log, flags=re.M)


@pytest.mark.slow
def test_ctrl_c_clears_the_bar(short_sweep, tmp_path):
    out = tmp_path / "out"
    rc, shown, seconds = _pty_run(
        _command(short_sweep, str(out)),
        interrupt_when=lambda shown: re.search(rb"indexing( \([^)]*\))?: 00:0[1-9] elapsed", shown),
        timeout=180,
    )
    text = shown.decode(errors="replace")
    assert seconds is not None, text[-2000:]
    # stopped inside the stage it was interrupted in (a lattice search that
    # waited for its end would have said so), not after a time
    assert rc == 128 + signal.SIGINT, (rc, seconds)
    assert "Indexing done" not in text and "=== Refinement ===" not in text, text[-2000:]
    # the error line starts at the beginning of a line, and no bar follows it
    m = re.search(r"(^|[\r\n])dials\.process_gapped: error: interrupted by SIGINT", text)
    assert m, repr(text[-500:])
    assert "elapsed" not in text[m.end():]


def test_stage_ends_its_thread_on_error(tmp_path):
    """An error inside a stage: the timer thread stops, no line comes after."""
    from dials_gapfill.handlers.progress import Progress

    r, w = os.pipe()
    os.set_blocking(r, False)
    progress = Progress("lines", interval=0.1, fd=w)
    os.close(w)
    text = b""

    def read():
        nonlocal text
        try:
            while chunk := os.read(r, 65536):
                text += chunk
        except BlockingIOError:
            pass

    try:
        with pytest.raises(RuntimeError):
            with progress.stage("indexing"):
                deadline = time.monotonic() + 30
                while text.count(b"\n") < 2 and time.monotonic() < deadline:  # (two lines, however slow)
                    time.sleep(0.05)
                    read()
                raise RuntimeError("stop")
        assert not [t for t in threading.enumerate() if t.name.startswith("progress of")]
        read()
        during = text.count(b"\n")
        time.sleep(0.3)  # three intervals: a thread left running would write
        read()
    finally:
        progress.close()
        os.close(r)
    lines = text.decode().splitlines()
    assert len(lines) == during >= 2, lines
    assert all(re.fullmatch(r"indexing: \d+ s elapsed", l) for l in lines), lines


def test_the_modes_from_the_parameters():
    """output.progress: auto is lines on a pipe; none (which PHIL makes None) is off."""
    from dials_gapfill.phil import params_from
    from dials_gapfill.handlers.progress import Progress

    r, w = os.pipe()
    try:
        for value, mode in (("auto", "lines"), ("lines", "lines"), ("none", "none"), ("None", "none")):
            p = params_from([f"output.progress={value}"])
            progress = Progress(p.output.progress, p.output.progress_interval, fd=w)
            try:
                assert progress.mode == mode, (value, progress.mode)
            finally:
                progress.close()
        assert params_from([]).output.progress_interval == 10
    finally:
        os.close(r)
        os.close(w)


def test_the_same_image_number_in_several_sweeps_counts_once_in_each():
    """DIALS says "Found N strong pixels on image n" without the sweep: four
    sweeps of images 1-15 are 60 images, not 15; an image said more often
    than blocks hold it (a frame of two integration jobs) counts once per
    block."""
    from dials_gapfill.handlers.progress import _Marks

    marks = _Marks([(1, 15), (1, 5), (8, 15), (1, 15), (1, 15)])
    finder = logging.getLogger("dials.algorithms.spot_finding.finder")
    level = finder.level
    finder.setLevel(logging.DEBUG)  # (as the stage sets it while it runs)
    try:
        with marks.attached():
            for _ in range(4):
                for n in range(1, 16):
                    finder.debug("Found %d strong pixels on image %d", 3, n)
    finally:
        finder.setLevel(level)
    # images 6-7 are held by three blocks, the others by four
    assert marks.count("Found") == 4 * 15 - 2
    assert marks.count("Integrated") == 0


def test_the_closing_line_counts_every_image_of_a_stage_that_ended():
    """DIALS' integrator says "Integrated ... on image n" only for frames on
    which some reflection ends: on a sparse pattern (L-cysteine, 1-5 spots a
    frame) most frames are never named.  Lines during the stage count what
    was named; the closing line of a stage that ended counts all its images."""
    from dials_gapfill.handlers.progress import INTEGRATOR, _Count, _Marks

    marks = _Marks([(1, 15), (1, 15)])
    count = _Count("integration", total=30, marks=marks)
    integrator = logging.getLogger(INTEGRATOR)
    level = integrator.level
    integrator.setLevel(logging.DEBUG)  # (as the stage sets it while it runs)
    try:
        with marks.attached():
            count.read(logging.LogRecord(INTEGRATOR, logging.INFO, __file__, 0, " Integrating reflections", None, None))
            for n in (3, 9, 14):
                integrator.debug("Integrated %d (sum) %d (prf) on image %d", 2, 2, n)
    finally:
        integrator.setLevel(level)
    assert count.snapshot()[0] == "integration (integrating)"
    assert re.match(r"integration \(integrating\): 3/30 images \(10 %\), \d+ s elapsed", count.line())
    assert re.match(r"integration \(integrating\): 30/30 images \(100 %\), stage done in \d+ s",
                    count.line(final=True))


def test_records_a_worker_hands_back_are_not_counted_again():
    """DIALS' workers give their log records back to the parent at the end of
    a job, where they are handled again (dials.util.log.
    rehandle_cached_records): counted once, in the (forked) worker that made
    them; those of a process without the filter (a cluster job) where they
    come back."""
    import pickle

    from dials.util.log import rehandle_cached_records

    from dials_gapfill.handlers.progress import _Marks

    marks = _Marks([(1, 15)] * 4)
    finder = logging.getLogger("dials.algorithms.spot_finding.finder")
    level = finder.level
    finder.setLevel(logging.DEBUG)
    try:
        with marks.attached():
            made = [finder.makeRecord(finder.name, logging.DEBUG, __file__, 0, "Found %d strong pixels on image %d",
                                      (3, n), None) for n in range(1, 16)]
            for record in made:
                finder.handle(record)  # (made in this process)
            assert marks.count("Found") == 15
            # back from the worker (pickled, as multiprocessing hands them back)
            rehandle_cached_records([pickle.loads(pickle.dumps(r)) for r in made])
            assert marks.count("Found") == 15
            # a cluster job's records: made where no filter counted them
            rehandle_cached_records([finder.makeRecord(finder.name, logging.DEBUG, __file__, 0,
                                                       "Found %d strong pixels on image %d", (3, n), None)
                                     for n in range(1, 16)])
    finally:
        finder.setLevel(level)
    assert marks.count("Found") == 30
