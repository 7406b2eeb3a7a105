"""Progress of the long stages, and image numbers in DIALS' frame ranges.

The stages call DIALS in this process, and DIALS says little while it works
(the lattice search of indexing says nothing for minutes on real data;
integration's worker processes hand their messages back only when a job
ends).  During each stage of the command line this module

- counts what DIALS logs as it goes, from DIALS' own log records.  Images:
  spot finding's "Found N strong pixels on image n" (INFO) and integration's
  "Modelled ... / Integrated ... reflections on image n" (DEBUG records of
  ``dials.algorithms.integration.integrator``, let through that logger during
  the stage; DIALS' handlers still drop them, so the log is unchanged), read
  by a filter on those loggers into one byte per image in shared memory: the
  filter runs in DIALS' (forked) worker processes too, so images count as
  they are done, not when a worker hands its messages back at the end of its
  job.  Refinement steps: "Step n" (DEBUG, ``...refinement.engine``).  What
  is going on: messages such as "Starting refinement (macro-cycle 2)" (a
  handler on the ``dials`` logger).  DIALS 3.12 has no progress output of its
  own in these steps.  What another DIALS does not say is not counted: the
  elapsed time is still shown;
- on a terminal (``output.progress=auto`` and stdout a terminal, or ``bar``)
  shows a tqdm bar with the count, the percentage and the time left, redrawn
  every half second below the program's messages;
- when stdout is not a terminal (a pipe, a file, a batch job) prints one plain
  line every ``output.progress_interval`` seconds (10), e.g.
  ``integration (integrating): 40/112 images (36 %), 25 s elapsed, about 45 s left``
  or ``indexing (refinement macro-cycle 2): 50 s elapsed``, and the last
  count when the stage ends;
- writes the same plain lines to the log file, whatever the terminal shows
  (never the bar).

The terminal output goes to a copy of the stdout file descriptor taken at
start-up, because the spot-finding stage redirects descriptors 1 and 2 to
catch what DIALS' workers print.  A timer thread (a daemon) draws the bar and
writes the lines; it stops at the end of the stage, on an error and on Ctrl-C
(:func:`abort`, from the command's signal handler).  Being a thread, it waits
while one of DIALS' C++ calls keeps Python's interpreter lock, so a line can
come that much late (seconds: the lattice search's FFT).

Image numbers: DIALS 3.12's integrator prints each job's frame range as
" Frames: a -> b", 1-based for profile modelling and 0-based for integration
(and profile validation).  :func:`image_numbers` rewrites these records to the
image numbers of the files (" Frames: images a-b") while a stage runs, with
or without progress output.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import re
import sys
import threading
import time
from multiprocessing.sharedctypes import RawArray

logger = logging.getLogger("dials.process_gapped.progress")

MODES = ("auto", "bar", "lines", "none")
INTERVAL = 10.0  # seconds between plain progress lines (output.progress_interval)
BAR_TICK = 0.5  # seconds between redraws of the bar

INTEGRATOR = "dials.algorithms.integration.integrator"
ENGINE = "dials.algorithms.refinement.engine"
# loggers whose DEBUG records carry the counts (only during these stages)
DEBUG_LOGGERS = {"integration": (INTEGRATOR,), "refinement": (ENGINE,)}

# What is going on, from a message's first line: (pattern, text; {0}, {1} are groups)
ACTIVITIES = [
    (re.compile(r"^(Initialising|Predicting reflections)$"), "{0}"),
    (re.compile(r"(?i)lattice search"), "lattice search"),
    (re.compile(r"^(Found|Using) max_cell"), "lattice search"),
    (re.compile(r"^(FFT gridding|Number of centroids used|Number of unique vectors)"),
     "candidate lattices"),
    (re.compile(r"^Candidate solutions"), "lattice chosen"),
    (re.compile(r"^Starting refinement \(macro-cycle (\d+)\)"), "refinement macro-cycle {0}"),
    (re.compile(r"(?i)^(?:continuous model: )?(static|scan-varying) refinement"
                r"(?:, \d+ reflections| of \d+ block)"), "{0} refinement"),
    (re.compile(r"(?i)^(static|scan-varying) refinement: \d+ steps"), "{0} refinement done"),
    (re.compile(r"(?i)spots indexed against"), "indexing against predictions"),
    (re.compile(r"^Bravais lattice chosen|^\s*Chiral space groups"), "Bravais lattice"),
]
# integration's parts (a new part starts a new count of images)
PHASES = {
    "Modelling reflection profiles": "profile modelling",
    "Timing information for reference profile formation": "profile validation",
    "Integrating reflections": "integrating",
}
_ESCAPES = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(record) -> str:
    try:
        text = record.getMessage()
    except Exception:
        return ""
    return _ESCAPES.sub("", text.strip().split("\n", 1)[0]).strip()


# --------------------------------------------------------------------------
# Image numbers in DIALS' integration job ranges
# --------------------------------------------------------------------------


class _FrameNumbers(logging.Filter):
    """On DIALS' integrator logger: " Frames: a -> b" to image numbers.

    DIALS 3.12 prints a job's frames as (first array index + 1, end) while
    modelling profiles and as (first array index, end) while integrating and
    validating; array index i is image i + 1, and the end (exclusive) is the
    last image's number.  The integrating jobs are those of the modelling
    pass, so a range seen while modelling tells which convention a later
    range uses (should DIALS change it); without one, 3.12's is assumed.
    """

    def __init__(self):
        super().__init__()
        self.phase = None
        self.modelled = set()

    def filter(self, record):
        msg = record.msg
        if not isinstance(msg, str):
            return True
        if msg.startswith(" Frames: %d -> %d") and isinstance(record.args, tuple) and len(record.args) == 2:
            a, b = record.args
            if self.phase == "profile modelling":
                first = a
                self.modelled.add((a, b))
            elif (a, b) in self.modelled and (a + 1, b) not in self.modelled:
                first = a  # already an image number
            else:
                first = a + 1
            if first <= b:
                record.msg = " Frames: images %d-%d"
                record.args = (first, b)
            return True
        for heading, phase in PHASES.items():
            if heading in msg:
                self.phase = phase
        return True


@contextlib.contextmanager
def image_numbers():
    """While it is open, DIALS' integration job ranges show image numbers."""
    target = logging.getLogger(INTEGRATOR)
    numbers = _FrameNumbers()
    target.addFilter(numbers)
    try:
        yield numbers
    finally:
        target.removeFilter(numbers)


# --------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------


class _Marks(logging.Filter):
    """Which images DIALS has said it finished, per kind of per-image message
    ("Found N strong pixels on image n", "Modelled/Integrated/Validated ...
    on image n"): per image number, how many times, in shared memory.

    DIALS' messages give the image number, not the sweep: with several
    sweeps image 1 is done once in each.  An image number counts as many
    times as it is said, up to the number of blocks that hold it (a frame
    of two of DIALS' integration jobs is said twice).

    A filter (it lets every record through) on the loggers that say it, so it
    runs where the record is made: in DIALS' worker processes too (forked,
    they keep the filter, the lock and the shared memory), as each image is
    done, not when the worker hands its records back at the end of its job.
    """

    KINDS = ("Found", "Modelled", "Integrated", "Validated")
    LOGGERS = ("dials.algorithms.spot_finding.finder", INTEGRATOR)

    def __init__(self, image_ranges):
        super().__init__()
        self.size = max(last for _, last in image_ranges) + 1
        self.blocks = [0] * self.size  # how many blocks hold each image number
        for first, last in image_ranges:
            for n in range(max(first, 0), last + 1):
                self.blocks[n] += 1
        self.lock = multiprocessing.Lock()
        self.arrays = {kind: RawArray("H", self.size) for kind in self.KINDS}

    def filter(self, record):
        msg = record.msg
        # a worker's records come back to the parent when its job ends and are
        # handled there again (dials.util.log.rehandle_cached_records): a record
        # counted in a forked worker (which has this filter) carries the mark
        # back; one from a cluster job's process is counted here
        if getattr(record, "gapfill_counted", False):
            return True
        if isinstance(msg, str) and "on image %d" in msg:
            record.gapfill_counted = True
            try:
                kind = msg.split(None, 1)[0]
                image = record.args[1] if kind == "Found" else record.args[-1]
                if kind in self.arrays and 0 <= image < self.size:
                    with self.lock:
                        array = self.arrays[kind]
                        array[image] = min(array[image] + 1, 65535)
            except Exception:
                pass
        return True

    def count(self, kind) -> int:
        array = self.arrays.get(kind)
        if array is None:
            return 0
        return sum(min(said, held) for said, held in zip(array, self.blocks))

    @contextlib.contextmanager
    def attached(self):
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        try:
            yield
        finally:
            for name in self.LOGGERS:
                logging.getLogger(name).removeFilter(self)


# the per-image messages each part of a stage counts
COUNTS = {None: "Found", "profile modelling": "Modelled", "integrating": "Integrated",
          "profile validation": "Validated"}


class _Count:
    """What one stage has done so far, from the log records (thread-safe)."""

    def __init__(self, name, total=None, marks=None):
        self.name = name
        self.total = total
        self.marks = marks
        self.lock = threading.Lock()
        self.start = self.phase_start = time.monotonic()
        self.phase = None
        self.activity = None
        self.steps = 0

    def read(self, record):
        """A record that reached the ``dials`` logger of this process."""
        msg = record.msg if isinstance(record.msg, str) else ""
        if record.name == ENGINE and msg == "Step %d":
            with self.lock:
                self.steps += 1
            return
        if record.levelno < logging.INFO:
            return
        text = _first_line(record)
        if not text:
            return
        if record.name == INTEGRATOR:
            for heading, phase in PHASES.items():
                if heading in text:
                    with self.lock:
                        self.phase, self.phase_start = phase, time.monotonic()
                    return
        for pattern, what in ACTIVITIES:
            m = pattern.search(text)
            if m:
                with self.lock:
                    self.activity = what.format(*(g.lower() if g and not g.isdigit() else g
                                                  for g in m.groups()))
                    self.steps = 0
                return

    def snapshot(self):
        """(label, done, total, elapsed of the stage, seconds left or None)."""
        now = time.monotonic()
        with self.lock:
            phase, activity, steps, phase_start = self.phase, self.activity, self.steps, self.phase_start
        what = phase or activity
        if what and steps:
            what = f"{what}, step {steps}"
        kind = COUNTS.get(phase)
        if self.name == "integration" and phase is None:
            kind = None  # (predicting reflections: nothing counted yet)
        done = self.marks.count(kind) if self.marks is not None and kind else 0
        total = self.total if self.total and (phase or done) else None
        left = None
        if total and 0 < done < total:
            left = (now - phase_start) / done * (total - done)
        label = f"{self.name} ({what})" if what else self.name
        return label, done, total, now - self.start, left

    def line(self, final=False) -> str:
        """The plain progress line (`final`: at the end of the stage)."""
        label, done, total, elapsed, left = self.snapshot()
        if final and total:
            # the stage went through all its images; DIALS' integrator names
            # only the frames on which some reflection ends (processor.h: a
            # frame without one is not processed), so on sparse patterns the
            # images it has named stay short of them
            done = total
        parts = []
        if total:
            parts.append(f"{done}/{total} images ({100 * done // total} %)")
        elif done:
            parts.append(f"{done} images")
        if final:
            parts.append(f"stage done in {elapsed:.0f} s")
        else:
            parts.append(f"{elapsed:.0f} s elapsed")
            if left is not None:
                parts.append(f"about {left:.0f} s left")
        return f"{label}: " + ", ".join(parts)


class _Watch(logging.Handler):
    """A handler on the ``dials`` logger that feeds the records to a _Count."""

    def __init__(self, count):
        super().__init__(logging.DEBUG)
        self.count = count
        self.pid = os.getpid()

    def emit(self, record):
        if os.getpid() != self.pid:  # a worker process forked during the stage
            return
        try:
            self.count.read(record)
        except Exception:  # never let progress stop the work
            pass


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _tqdm_class():
    try:
        import tqdm
    except ImportError:  # DIALS depends on tqdm; without it: lines
        return None

    class Bar(tqdm.tqdm):
        monitor_interval = 0  # no monitor thread: this module redraws the bar

    return Bar


class _BarSafeStream:
    """sys.stdout while bars may be shown: a write clears the bar first and
    draws it again after, so messages and the bar do not mix on a line.

    (tqdm's logging_redirect_tqdm would cover log records only; what DIALS'
    worker processes print reaches sys.stdout as plain writes.)"""

    def __init__(self, stream, progress):
        self._stream = stream
        self._progress = progress

    def write(self, text):
        progress = self._progress
        with progress.lock:
            shown = progress.hide_bar()
            n = self._stream.write(text)
            if shown:
                self._stream.flush()
                progress.show_bar()
        return n

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _log_file_handlers():
    return [h for h in logging.getLogger("dials").handlers if isinstance(h, logging.FileHandler)]


class Progress:
    """Progress output of one command-line run (see the module doc).

    mode: auto | bar | lines | none; interval: seconds between plain lines.
    Use :meth:`stage` around each stage and :meth:`close` at the end.
    """

    def __init__(self, mode="auto", interval=INTERVAL, fd=1):
        # PHIL turns output.progress=none (or None) into no choice at all: None
        mode = "none" if mode is None else str(mode).lower()  # (and =auto Auto)
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}")
        self.interval = float(interval or INTERVAL)
        self.lock = threading.RLock()
        self.term = None
        self.bar = None
        self._bar_key = None
        self._count = None
        self._stdout = None
        self._handlers = []
        if mode != "none":
            try:
                self.term = io.open(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
            except OSError:
                self.term = None
        self.Bar = None
        if mode == "auto":
            mode = "bar" if self.term is not None and self.term.isatty() else "lines"
        if mode == "bar":
            self.Bar = _tqdm_class()
            if self.Bar is None:
                mode = "lines"
        self.mode = mode
        if mode == "bar":
            self._install_bar_safe_stdout()
        global _active
        _active = self

    # -- the terminal ------------------------------------------------------

    def _install_bar_safe_stdout(self):
        original = sys.stdout
        safe = _BarSafeStream(original, self)
        self._stdout = (original, safe)
        sys.stdout = safe
        for name in ("dials", "dxtbx", "py.warnings"):
            for h in logging.getLogger(name).handlers:
                if type(h) is logging.StreamHandler and h.stream is original:
                    h.setStream(safe)
                    self._handlers.append(h)

    def _restore_stdout(self):
        if self._stdout is None:
            return
        original, safe = self._stdout
        for h in self._handlers:
            if h.stream is safe:
                h.setStream(original)
        self._handlers = []
        if sys.stdout is safe:
            sys.stdout = original
        self._stdout = None

    def hide_bar(self) -> bool:
        """Clear the bar from the terminal (caller holds self.lock)."""
        if self.bar is None:
            return False
        try:
            self.bar.clear(nolock=True)
        except Exception:
            return False
        return True

    def show_bar(self):
        if self.bar is None or self._count is None:
            return
        label, done, total, _, _ = self._count.snapshot()
        bar = self.bar
        key = (total, self._count.phase)  # a new count: the bar's clock restarts
        if key != self._bar_key:
            self._bar_key = key
            bar.reset(total=total)
            bar.bar_format = self._bar_format(total)
        if label != bar.desc:
            bar.set_description_str(label, refresh=False)
        bar.n = done
        try:
            bar.refresh(nolock=True)
        except Exception:
            pass

    @staticmethod
    def _bar_format(total):
        if total:
            return "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} images [{elapsed}<{remaining}]"
        return "{desc}: {elapsed} elapsed"

    def _write_line(self, text, terminal):
        record = logging.LogRecord(logger.name, logging.INFO, __file__, 0, text, None, None)
        for h in _log_file_handlers():
            try:
                h.handle(record)
            except Exception:
                pass
        if terminal and self.term is not None:
            with self.lock:
                shown = self.hide_bar()
                try:
                    self.term.write(text + "\n")
                    self.term.flush()
                except (OSError, ValueError):
                    pass
                if shown:
                    self.show_bar()

    # -- one stage ---------------------------------------------------------

    @contextlib.contextmanager
    def stage(self, name, total=None, image_ranges=None):
        """Progress of one stage; `total`: images it goes through, if known;
        `image_ranges`: (first, last) image numbers of each block (the images
        counted)."""
        if self.mode == "none":
            yield None
            return
        marks = _Marks(image_ranges) if image_ranges else None
        count = _Count(name, total, marks)
        watch = _Watch(count)
        dials_logger = logging.getLogger("dials")
        levels = {}
        for logger_name in DEBUG_LOGGERS.get(name, ()):
            target = logging.getLogger(logger_name)
            levels[logger_name] = target.level
            if target.getEffectiveLevel() > logging.DEBUG:
                target.setLevel(logging.DEBUG)
        dials_logger.addHandler(watch)
        stop = threading.Event()
        lines = []
        with self.lock:
            self._count = count
            self._bar_key = (None, None)
            if self.mode == "bar":
                # the total shows once something is counted
                self.bar = self.Bar(
                    total=None, file=self.term, leave=False, dynamic_ncols=True, smoothing=0,
                    mininterval=0, bar_format=self._bar_format(None), desc=name, unit="images",
                )
        thread = threading.Thread(target=self._tick, args=(count, stop, lines), daemon=True,
                                  name=f"progress of {name}")
        thread.start()
        ok = False
        try:
            with marks.attached() if marks is not None else contextlib.nullcontext():
                yield count
            ok = True
        finally:
            stop.set()
            thread.join(timeout=5)
            dials_logger.removeHandler(watch)
            for logger_name, level in levels.items():
                logging.getLogger(logger_name).setLevel(level)
            with self.lock:
                self._drop_bar()
            if ok and lines and count.snapshot()[1]:
                # the count the stage ended with, after lines during it
                self._write_line(count.line(final=True), self.mode == "lines")

    def _tick(self, count, stop, lines):
        start = time.monotonic()
        next_line = start + self.interval
        while True:
            wait = next_line - time.monotonic()
            if self.mode == "bar":
                wait = min(wait, BAR_TICK)
            if stop.wait(max(wait, 0.0)):
                return
            if self.mode == "bar":
                with self.lock:
                    if self._count is count:
                        self.show_bar()
            if time.monotonic() >= next_line:
                text = count.line()
                lines.append(text)
                self._write_line(text, self.mode == "lines")
                # after a wait for the interpreter lock, no catching up
                next_line = max(next_line + self.interval, time.monotonic() + self.interval / 2)

    def _drop_bar(self):
        """Close the bar (if any) and forget the stage's count; under the lock."""
        if self.bar is not None:
            try:
                self.bar.close()
            except Exception:
                pass
            self.bar = None
        self._count = None

    def close(self):
        """End the progress output (the bar cleared, stdout as it was)."""
        global _active
        if not self.lock.acquire(timeout=2):
            return
        try:
            self._drop_bar()
            self._restore_stdout()
            if self.term is not None:
                try:
                    self.term.close()
                except OSError:
                    pass
                self.term = None
        finally:
            self.lock.release()
        if _active is self:
            _active = None


_active: Progress | None = None


def abort():
    """Ctrl-C or SIGTERM: clear the bar and give stdout back (the process ends)."""
    if _active is not None:
        _active.close()


def stage_images(experiments):
    """(images of the blocks, each block's (first, last) image numbers), or (None, None)."""
    try:
        return (sum(e.scan.get_num_images() for e in experiments),
                [tuple(e.scan.get_image_range()) for e in experiments])
    except Exception:
        return None, None


# stages that go through every image of the blocks (the total is known at
# the start); bad images finds spots again in the blocks it cut (no total)
COUNTED = ("spot finding", "integration")
IMAGES = ("spot finding", "bad images", "integration")


@contextlib.contextmanager
def stage_progress(progress, name, state):
    """Around one pipeline stage: image numbers in DIALS' frame ranges
    (always), and the progress output when the command line asked for it."""
    with image_numbers():
        if progress is None:
            yield
            return
        total = ranges = None
        if name in IMAGES and state.experiments:
            total, ranges = stage_images(state.experiments)
        with progress.stage(name, total if name in COUNTED else None, ranges):
            yield
