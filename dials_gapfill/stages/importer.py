"""Import stage: image files -> one ImageSequence per contiguous block.

Gaps in the image numbers split the sweep into blocks, as dxtbx does when it
groups files.  ``gaps.exclude_images`` removes files *before* dxtbx sees
them, so an excluded file is never opened; for single-file (NeXus/HDF5)
sweeps the exclusion slices the sequence.  Geometry overrides and
``reference_geometry`` are applied by dials.import's own ``MetaDataUpdater``;
afterwards the start angle of each block is corrected (dials.import applies
``geometry.scan.oscillation`` to each block as if it started the sweep), and
one beam, detector and goniometer object is shared by all blocks.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import glob
import hashlib
import io
import logging
import os
import re
import zlib

from dials.command_line.dials_import import MetaDataUpdater
from dials.util import Sorry, tabulate
from dxtbx.format.Format import Format
from dxtbx.format.Registry import get_format_class_for_file
from dxtbx.imageset import ImageSequence, ImageSetFactory
from dxtbx.model import Experiment
from dxtbx.model.experiment_list import (
    BeamComparison,
    DetectorComparison,
    ExperimentList,
    ExperimentListFactory,
    GoniometerComparison,
)
from dxtbx.sequence_filenames import (
    template_regex,
    template_string_number_index,
    template_string_to_glob_expr,
)
from scitbx import matrix

from dials_gapfill.errors import GapfillError, one_line
from dials_gapfill.model.exclusions import (
    exclusion_multiple,
    exclusion_ranges,
    multiple_reason,
    multiples,
)
from dials_gapfill.model.state import Record
from dials_gapfill.model.sweep import (
    BAD,
    EXCLUDED,
    NOT_GIVEN,
    Sweep,
    Sweeps,
    setting_text,
)
from dials_gapfill.phil import dials_import_params
from dials_gapfill.util import captured, not_utf8, printable, range_text
from dials_gapfill.validate import unreadable_name

logger = logging.getLogger("dials.process_gapped.import")

_NOT_IMAGES = {
    ".json", ".txt", ".log", ".expt", ".refl", ".phil", ".param", ".params",
    ".mtz", ".html", ".py", ".md", ".pickle", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".pdf", ".sh",
    ".csv", ".xml", ".yaml", ".yml", ".ini", ".cfg", ".hkl", ".ins", ".cif", ".pdb", ".lp",
}
# endings of backup and temporary copies (an editor's, a half-done copy's):
# in a folder given as input they are not images, though their names hold
# an image number (sim_0006.cbf.bak would be a sweep of its own)
BACKUP_ENDINGS = (".bak", ".orig", ".part", ".tmp", ".swp", "~")
_CONTAINER_SUFFIXES = (".h5", ".hdf5", ".nxs", ".nx5")
_GLOB_CHARS = re.compile(r"[*?\[]")


# --------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------


def _is_file(path: str) -> bool:
    """A file, or a symbolic link to nothing (a broken link is an image that
    cannot be read, whichever way it was named: damaged_reason says so)."""
    return os.path.isfile(path) or (os.path.islink(path) and not os.path.exists(path))


def _listdir_images(directory: str, quiet: bool = False) -> list[str]:
    """The image files of a folder, as dials.import takes a folder: what is
    plainly not an image (other file types, backup and temporary copies,
    names without an image number, an Eiger master's data files, which dxtbx
    reads through the master) is left out, and said in the log."""
    files = [n for n in sorted(os.listdir(directory)) if not n.startswith(".") and _is_file(os.path.join(directory, n))]
    candidates = [n for n in files if os.path.splitext(n)[1].lower() not in _NOT_IMAGES
                  and not n.lower().endswith(BACKUP_ENDINGS)]
    masters = {n[: -len("_master.h5")] for n in candidates if n.endswith("_master.h5")}
    kept, skipped = [], [n for n in files if n not in candidates]
    for n in candidates:
        data = re.fullmatch(r"(.+)_data_\d+\.h5", n)
        if data and data.group(1) in masters:
            skipped.append(n)
        elif _is_container(n) or "#" in (template_regex(n)[0] or ""):
            kept.append(n)
        else:
            skipped.append(n)
    if skipped and kept and not quiet:
        logger.info("In %s, not taken as images: %s", directory, ", ".join(printable(n) for n in sorted(skipped)))
    return [os.path.join(directory, n) for n in (kept if kept else candidates)]


def _without_backups(found: list[str], pattern: str, quiet: bool = False) -> list[str]:
    """The files a glob matched, backup and temporary copies left out (and
    said in the log) as in a folder: data_* takes data_0006.cbf.bak too,
    which would be integrated as a sweep of its own.  A glob that matches
    nothing else (*.bak) keeps them: they are what was asked for."""
    kept = [f for f in found if not f.lower().endswith(BACKUP_ENDINGS)]
    if kept and len(kept) < len(found) and not quiet:
        logger.info("Matching %s, not taken as images: %s", printable(pattern),
                    ", ".join(printable(os.path.basename(f)) for f in found if f not in kept))
    return kept or found


def _template_files(template: str, first=None, last=None) -> dict[int, str]:
    """Existing files of a ``name_####.cbf`` template, by image number."""
    if "#" not in template:
        raise GapfillError(
            f"input.template={template!r} has no # for the image number: "
            "write e.g. template=data_####.cbf"
        )
    directory, base = os.path.split(template)
    directory = directory or "."
    if not re.fullmatch(r"[^#]*#+[^#]*", base):
        raise GapfillError(
            f"input.template={template!r}: the # characters must be one run, e.g. data_####.cbf"
        )
    if not os.path.isdir(directory):
        raise GapfillError(f"input.template={template!r}: no such directory {directory!r}")
    a, b = template_string_number_index(base)
    found = {}
    for path in glob.glob(os.path.join(glob.escape(directory), template_string_to_glob_expr(base))):
        number = int(os.path.basename(path)[a:b])
        if (first is None or number >= first) and (last is None or number <= last):
            found[number] = path
    return found


def xia2_image_spec(spec: str) -> tuple[str, int, int]:
    """``/path/name_0001.cbf:1:40`` -> (path, first, last); GapfillError on
    what no file can fix (checked before anything is written)."""
    m = re.fullmatch(r"(.+?):(\d+):(\d+)", spec)
    if not m:
        raise GapfillError(
            f"input.image={spec!r}: write /path/name_0001.cbf:first:last (xia2 style), "
            "e.g. image=/data/x_0001.cbf:1:90"
        )
    path, first, last = m.group(1), int(m.group(2)), int(m.group(3))
    if last < first:
        raise GapfillError(
            f"input.image={spec!r}: last image {last} is before first {first}: write first:last, "
            f"e.g. {path}:{last}:{first}"
        )
    return path, first, last


def _xia2_image(spec: str) -> dict[int, str]:
    """``/path/name_0001.cbf:1:40`` -> the existing files of images 1..40."""
    path, first, last = xia2_image_spec(spec)
    template, _ = template_regex(path)
    if not template or "#" not in template:
        raise GapfillError(f"input.image={spec!r}: no image number in the file name")
    files = _template_files(template, first, last)
    if not files:
        raise GapfillError(
            f"input.image={spec!r}: no files of template {template} between images "
            f"{first} and {last}: check the path"
        )
    return files


def collect_files(params, positional=(), quiet=False) -> list[str]:
    """All image files named by images=, template=, image= and positional
    args (`quiet`: without saying in the log what a folder or glob left out)."""
    files: list[str] = []
    entries = list(params.input.images or []) + list(positional or [])
    for entry in entries:
        entry = os.path.expanduser(str(entry))
        if os.path.isdir(entry):
            found = _listdir_images(entry, quiet)
            if not found:
                raise GapfillError(
                    f"no image files in directory {entry!r}: give the folder that holds the images"
                )
            files.extend(found)
        elif _GLOB_CHARS.search(entry) and not os.path.exists(entry):
            found = sorted(f for f in glob.glob(entry) if _is_file(f))
            if not found:
                raise GapfillError(f"no files match {entry!r}: check the path and the pattern")
            files.extend(_without_backups(found, entry, quiet))
        elif _is_file(entry):
            files.append(entry)
        elif "#" in os.path.basename(entry):
            # a template given where file names go, as to template=
            found = _template_files(entry)
            if not found:
                raise GapfillError(
                    f"no files match {entry!r}: check the path; # stands for one digit of the image number"
                )
            files.extend(found[n] for n in sorted(found))
        else:
            raise GapfillError(f"no such file or directory: {entry!r}: check the path")
    for template in params.input.template or []:
        found = _template_files(os.path.expanduser(template))
        if not found:
            raise GapfillError(f"input.template={template!r} matches no files: check the path")
        files.extend(found[n] for n in sorted(found))
    for spec in params.input.image or []:
        found = _xia2_image(os.path.expanduser(spec))
        files.extend(found[n] for n in sorted(found))
    for f in files:  # (a folder's or a glob's files: the names given were checked by validate)
        bad = not_utf8(os.path.abspath(f))
        if bad:
            raise GapfillError(unreadable_name(bad))
    if not files:
        raise GapfillError(
            "no images given: name them, e.g. dials.process_gapped images=/data/x_*.cbf "
            "(or template=x_####.cbf, or a directory)"
        )
    return files


def _is_container(path: str) -> bool:
    return path.lower().endswith(_CONTAINER_SUFFIXES)


def _warn_repeated(repeated: list[str], record) -> None:
    """One warning for the files given more than once (a sweep's glob given
    twice repeats every one of its files)."""
    if not repeated:
        return
    if len(repeated) == 1:
        line = f"{repeated[0]} was given twice; it is used once"
    else:
        listed = ", ".join(repeated) if len(repeated) <= 3 else f"{repeated[0]}, ..., {repeated[-1]}"
        line = f"{len(repeated)} files were given twice or more ({listed}); each is used once"
    record.warn(line)
    logger.warning(line)


def _sweep_order(templates) -> list[str]:
    """The order sweeps are numbered in, on every route (files, templates,
    an ExperimentList): numbered sweeps by their file-name template, the
    narrower number first where only its width differs (img_#.cbf, images
    1-9, before img_##.cbf, 10-99: unpadded numbers), then folder;
    NeXus/HDF5 files after them by file name, then folder (as dials.import
    sorts them)."""
    numbered = [t for t in templates if "#" in os.path.basename(t)]
    containers = [t for t in templates if "#" not in os.path.basename(t)]

    def key(t):
        base = os.path.basename(t)
        return re.sub("#+", "#", base), base.count("#"), t

    return sorted(numbered, key=key) + sorted(containers, key=lambda t: (os.path.basename(t), t))


def group_sweeps(files: list[str], record) -> list[tuple[str, dict[int, str] | None]]:
    """The sweeps of the files given: [(template, {image number: path})], one
    per file-name template (a sweep split over several folders with the same
    file names is one sweep, unless an image number is in two of them: then
    each folder's images are a sweep), sorted by template; a NeXus/HDF5 file
    is a sweep of its own: (path, None), after them (_sweep_order)."""
    files_of: dict[str, list[tuple[int, str]]] = {}  # file-name template -> (image number, path)
    sweeps: dict[str, dict[int, str]] = {}
    containers = []
    seen: dict[tuple[str, str], str] = {}
    repeated: list[str] = []
    for f in files:
        # the same file under the same name (overlapping globs, a linked
        # folder) is given twice; a link inside a sweep to another of its
        # images is an image of its own (a duplicated frame, found as such)
        real = (os.path.realpath(f), os.path.basename(f))
        if real in seen:
            if f not in repeated:
                repeated.append(f)
            continue
        seen[real] = f
        if _is_container(f):
            containers.append(os.path.abspath(f))
            continue
        path = os.path.abspath(f)
        if "#" in path:
            # dxtbx turns a sweep's file names into a template with # for the
            # image number's digits, and takes the number to run from the
            # first # of the whole path to the last: no image could be opened
            if "#" in os.path.dirname(path):
                raise GapfillError(
                    f"the folder {os.path.dirname(path)!r} has '#' in its path, which dxtbx reads as an "
                    "image-number digit: rename the folder, or give the images from a folder without '#' (a "
                    "symbolic link to this one works)"
                )
            raise GapfillError(
                f"the file name {os.path.basename(path)!r} has '#' in it, which dxtbx reads as an image-number "
                "digit: rename the files, or give them through symbolic links whose names have no '#'"
            )
        template, number = template_regex(os.path.basename(path))
        if template is None or "#" not in template:
            raise GapfillError(
                f"not an image of a numbered sweep: {f}: remove it from the list of images"
            )
        files_of.setdefault(template, []).append((number, path))
    _warn_repeated(repeated, record)
    for name, items in files_of.items():
        numbers = [n for n, _ in items]
        if len(set(numbers)) == len(numbers):
            sweeps[name] = dict(items)
            continue
        # an image number in two folders: each folder holds a sweep of its
        # own (/data/sweep1/x_0001.cbf, /data/sweep2/x_0001.cbf), as
        # dials.import takes them
        by_folder: dict[str, dict[int, str]] = {}
        for number, path in items:
            by_folder.setdefault(os.path.dirname(path), {})[number] = path
        logger.info("Image numbers of %s repeat in %d folders: each folder's images are a sweep of their own",
                    name, len(by_folder))
        for folder, by_number in by_folder.items():
            sweeps[os.path.join(folder, name)] = by_number
    numbered = []
    for name in _sweep_order(sweeps):
        by_number = sweeps[name]
        folders = sorted({os.path.dirname(p) for p in by_number.values()})
        # the template of the folder holding the first image
        first_folder = os.path.dirname(by_number[min(by_number)])
        numbered.append((os.path.join(first_folder, os.path.basename(name)), by_number))
        if len(folders) > 1:
            logger.info("Images of %s are in %d folders: %s", name, len(folders), ", ".join(folders))
    return numbered + [(c, None) for c in _sweep_order(containers)]


# --------------------------------------------------------------------------
# Cheap integrity checks (no pixel data read)
# --------------------------------------------------------------------------


def damaged_reason(path: str) -> str | None:
    """Why an image file is damaged, or None.

    miniCBF: shorter than X-Binary-Size says, or a binary section that does not
    match its Content-MD5 (Dectris writes one; the check reads the file once,
    which leaves it in the page cache for spot finding).  SMV: shorter than
    HEADER_BYTES + SIZE1 * SIZE2 * bytes.  Compressed files are not checked.
    A broken symbolic link is named as such.
    """
    if os.path.islink(path) and not os.path.exists(path):
        return f"unreadable: broken symbolic link to {os.readlink(path)}"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(65536)
    except OSError as e:
        return f"unreadable: {e.strerror}"
    if size == 0:
        return "unreadable: empty file"
    if head.startswith(b"###CBF"):
        marker = head.find(b"\x0c\x1a\x04\xd5")
        m = re.search(rb"X-Binary-Size:\s*(\d+)", head)
        if marker < 0 or not m:
            return "unreadable: CBF header without binary section (truncated or corrupt)"
        need = marker + 4 + int(m.group(1))
        if size < need:
            return f"unreadable: truncated file ({size} of {need} bytes)"
        md5 = re.search(rb"Content-MD5:\s*(\S+)", head)
        if md5:

            with open(path, "rb") as fh:
                fh.seek(marker + 4)
                body = fh.read(int(m.group(1)))
            if base64.b64encode(hashlib.md5(body).digest()) != md5.group(1):
                return "unreadable: corrupt image data (checksum does not match the header)"
    elif head.startswith(b"{\nHEADER_BYTES=") or head.startswith(b"{\r\nHEADER_BYTES="):
        text = head[:8192].decode("ascii", "ignore")
        try:
            hb = int(re.search(r"HEADER_BYTES=\s*(\d+)", text).group(1))
            s1 = int(re.search(r"SIZE1=\s*(\d+)", text).group(1))
            s2 = int(re.search(r"SIZE2=\s*(\d+)", text).group(1))
            t = re.search(r"TYPE=\s*(\w+)", text)
            nbytes = 4 if (t and "long" in t.group(1)) else 2
        except AttributeError:
            return None
        need = hb + s1 * s2 * nbytes
        if size < need:
            return f"unreadable: truncated file ({size} of {need} bytes)"
    return None


def unrecognised_reason(path: str) -> str:
    """Why dxtbx found no format for `path`.  A compressed image (.bz2, .gz:
    what dxtbx decompresses as it reads) cut short cannot give dxtbx its
    header, so it is decompressed once here to tell a damaged file from one
    of an unknown format (only files dxtbx has already refused pay for it)."""
    if path.endswith((".bz2", ".gz")):
        try:
            with Format.open_file(path) as fh:
                while fh.read(1 << 20):
                    pass
        except (EOFError, OSError, zlib.error) as e:  # (zlib: a gzip stream damaged inside)
            kind = "bz2" if path.endswith(".bz2") else "gzip"
            return f"unreadable: truncated or corrupt {kind} file ({e})"
    return _format_refusal(path) or "unreadable: not a recognised image format"


def _format_refusal(path: str) -> str | None:
    """Why a format class that takes `path` could not read it, where dxtbx
    says: a negative oscillation width in the header (a rotation recorded
    in the other sense), which dxtbx's scan model does not allow."""
    try:
        format_class = get_format_class_for_file(path)
        if format_class is not None:
            format_class(path)
    except Exception as e:  # (dxtbx raises RuntimeError from C++ asserts, and whatever a format class does)
        if "oscillation_[1] >= 0.0" in str(e):
            return ("unreadable: its header gives a negative oscillation width, which dxtbx cannot read: "
                    "rewrite the headers with a positive width and the rotation axis inverted")
    return None


# --------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------


def _format_kwargs(params):
    return {
        "dynamic_shadowing": params.format.dynamic_shadowing,
        "multi_panel": params.format.multi_panel,
    }


def _comparisons(params):

    t = params.input.tolerance
    return dict(
        compare_beam=BeamComparison(
            wavelength_tolerance=t.beam.wavelength,
            direction_tolerance=t.beam.direction,
            polarization_normal_tolerance=t.beam.polarization_normal,
            polarization_fraction_tolerance=t.beam.polarization_fraction,
        ),
        compare_detector=DetectorComparison(
            fast_axis_tolerance=t.detector.fast_axis,
            slow_axis_tolerance=t.detector.slow_axis,
            origin_tolerance=t.detector.origin,
        ),
        compare_goniometer=GoniometerComparison(
            rotation_axis_tolerance=t.goniometer.rotation_axis,
            fixed_rotation_tolerance=t.goniometer.fixed_rotation,
            setting_rotation_tolerance=t.goniometer.setting_rotation,
        ),
        scan_tolerance=t.scan.oscillation,
    )


@contextlib.contextmanager
def _quiet_scan_join_messages():
    """Hide dxtbx' 'Internal Error ... scan.h ... image_range_' lines.

    dxtbx prints them while it tries (and fails, as it should) to join the
    scans of two blocks across a gap, or a frame whose header angle is not
    its neighbours' (then a ``diff_2pi`` line); they are not errors.  C++
    writes them to file descriptor 1 and dxtbx' ExperimentListFactory
    ``print``s them to ``sys.stdout``, which need not be that descriptor (a
    notebook, pytest): both are caught.
    """
    printed = io.StringIO()
    with captured(1) as out, contextlib.redirect_stdout(printed):
        yield
    for line in (printed.getvalue() + out.text).splitlines():
        if "DXTBX_ASSERT(image_range_" not in line and "DXTBX_ASSERT(std::min(diff_2pi" not in line:
            print(line)


def _read_with_dxtbx(paths, params):
    """ExperimentList from files, and the files dxtbx could not read."""

    unhandled: list[str] = []
    try:
        with _quiet_scan_join_messages():
            experiments = ExperimentListFactory.from_filenames(
                paths, unhandled=unhandled, format_kwargs=_format_kwargs(params), **_comparisons(params)
            )
    except Exception:
        # find the culprits one by one, then read the rest
        good, unhandled = [], []
        with _quiet_scan_join_messages():
            for p in paths:
                try:
                    ok = ExperimentListFactory.from_filenames([p], format_kwargs=_format_kwargs(params))
                except Exception:
                    ok = None
                (good if ok else unhandled).append(p)
            experiments = (
                ExperimentListFactory.from_filenames(
                    good, format_kwargs=_format_kwargs(params), **_comparisons(params)
                )
                if good
                else []
            )
    return experiments, unhandled


def _describe_models(exp) -> str:
    d = exp.detector[0]
    return (
        f"wavelength {exp.beam.get_wavelength():.5f} A, detector {d.get_image_size()[0]}x"
        f"{d.get_image_size()[1]} px at {d.get_distance():.2f} mm, "
        f"axis {tuple(round(v, 4) for v in exp.goniometer.get_rotation_axis())}"
    )


def _check_shared(experiments, params) -> None:
    """Every block must have the same beam, detector and goniometer."""
    comp = _comparisons(params)
    ref = experiments[0]
    for exp in experiments[1:]:
        (a0, a1), (b0, b1) = ref.scan.get_image_range(), exp.scan.get_image_range()
        where = f"images {a0}-{a1} and {b0}-{b1}"
        if not comp["compare_beam"](ref.beam, exp.beam):
            raise GapfillError(
                f"mixed wavelengths or beams: {where} differ ({ref.beam.get_wavelength():.5f} "
                f"vs {exp.beam.get_wavelength():.5f} A): process each sweep separately "
                "(or override with geometry.beam.wavelength= if the headers are wrong)"
            )
        if not comp["compare_detector"](ref.detector, exp.detector):
            raise GapfillError(
                f"mixed detectors: {where} differ ({_describe_models(ref)} vs "
                f"{_describe_models(exp)}): process each sweep separately"
            )
        if not comp["compare_goniometer"](ref.goniometer, exp.goniometer):
            raise GapfillError(
                f"mixed goniometers: {where} differ: process each sweep separately"
            )
        w0, w1 = ref.scan.get_oscillation()[1], exp.scan.get_oscillation()[1]
        if abs(w0 - w1) > params.input.tolerance.scan.oscillation * abs(w0):
            raise GapfillError(
                f"mixed oscillation widths: {where} have {w0:g} and {w1:g} degrees per image: "
                "process each sweep separately (or set geometry.scan.oscillation=start,width)"
            )


def _fix_oscillation(experiments, params, reference_image: int) -> None:
    """Start angle of each block from its first image number.

    dials.import applies geometry.scan.oscillation=start,width to every block as
    if each started the sweep; the start belongs to the first image given.
    """
    osc = params.geometry.scan.oscillation
    if not osc:
        return
    start, width = osc
    for exp in experiments:
        first = exp.scan.get_image_range()[0]
        exp.scan.set_oscillation((start + (first - reference_image) * width, width))
        exp.imageset.set_scan(exp.scan)


def _unwrap_phi(experiments) -> None:
    """Blocks whose headers start a rotation that went past 360 deg again
    from 0 (a sweep from 350 deg: images at 0-9 deg where their numbers put
    them at 360-369): their start taken as the numbers put it, a whole turn
    on, so that the blocks lie on one rotation (the same crystal positions:
    a rotation by 362 deg is one by 2 deg)."""
    ref = experiments[0].scan
    width = ref.get_oscillation()[1]
    for exp in experiments[1:]:
        first = exp.scan.get_image_range()[0]
        expected = ref.get_angle_from_image_index(first)
        actual, w = exp.scan.get_oscillation()
        turns = round((expected - actual) / 360.0)
        if turns and abs(actual + 360.0 * turns - expected) <= 0.5 * abs(width):
            logger.info("Images %d-%d: their headers start at %.2f deg, taken as %.2f deg (%+d turn(s), on the "
                        "rotation of the sweep's first images)", *exp.scan.get_image_range(), actual,
                        actual + 360.0 * turns, turns)
            exp.scan.set_oscillation((actual + 360.0 * turns, w))
            exp.imageset.set_scan(exp.scan)


def _inconsistent_phi(experiments) -> list[str]:
    """Blocks whose start angle is not where their first image number puts it."""
    ref = experiments[0].scan
    width = ref.get_oscillation()[1]
    out = []
    for exp in experiments[1:]:
        first = exp.scan.get_image_range()[0]
        expected = ref.get_angle_from_image_index(first)
        actual = exp.scan.get_oscillation()[0]
        if abs(expected - actual) > 0.5 * abs(width):
            out.append(
                f"block starting at image {first} starts at {actual:.2f} deg but its image "
                f"number implies {expected:.2f} deg: wedges collected out of order (inverse beam, "
                "interleaved) look like this, and their blocks are refined each on its own; otherwise check the "
                "image headers (set geometry.scan.oscillation=start,width only if they are wrong)"
            )
    return out


def _share_models(experiments) -> None:
    beam, detector, goniometer = (
        experiments[0].beam,
        experiments[0].detector,
        experiments[0].goniometer,
    )
    for exp in experiments:
        exp.beam, exp.detector, exp.goniometer = beam, detector, goniometer
        exp.imageset.set_beam(beam)
        exp.imageset.set_detector(detector)
        exp.imageset.set_goniometer(goniometer)


_LOOKUPS = ("mask", "gain", "pedestal", "dx", "dy")  # an image set's external lookups


def _join_following(experiments) -> ExperimentList:
    """Sequences (in image order, models shared) of one template whose images
    and angles follow on, as one: dials.import of unpadded names sorts img_1
    before img_10 and leaves img_1 and img_2-9 apart, which the file route
    reads as one sequence; apart they would be two blocks without a gap."""
    out = []
    for exp in experiments:
        prev = out[-1] if out else None
        if prev is None or not _follows_on(prev, exp):
            out.append(exp)
            continue
        scan, after = copy.deepcopy(prev.scan), copy.deepcopy(exp.scan)
        after.set_batch_offset(scan.get_batch_offset())
        scan.append(after)
        first, last = scan.get_image_range()
        imageset = ImageSetFactory.make_sequence(
            prev.imageset.get_template(), range(first, last + 1), prev.imageset.get_format_class(),
            prev.beam, prev.detector, prev.goniometer, scan)
        for kind in _LOOKUPS:  # (a mask or gain the import set)
            mine, theirs = getattr(imageset.external_lookup, kind), getattr(prev.imageset.external_lookup, kind)
            mine.filename, mine.data = theirs.filename, theirs.data
        out[-1] = Experiment(imageset=imageset, beam=prev.beam, detector=prev.detector,
                             goniometer=prev.goniometer, scan=imageset.get_scan(), identifier=prev.identifier)
    return ExperimentList(out)


def _follows_on(a, b) -> bool:
    """Sequence `b` continues `a`: the same template, format, models and
    external lookups, the next image number and angle, the same width."""
    (_, last), (first, _) = a.scan.get_image_range(), b.scan.get_image_range()
    width = a.scan.get_oscillation()[1]
    lookups = (a.imageset.external_lookup, b.imageset.external_lookup)
    return (
        a.imageset.get_template() == b.imageset.get_template()
        and a.imageset.get_format_class() == b.imageset.get_format_class()
        and (a.beam, a.detector, a.goniometer) == (b.beam, b.detector, b.goniometer)
        and all(getattr(lookups[0], k).filename == getattr(lookups[1], k).filename for k in _LOOKUPS)
        and first == last + 1
        and abs(b.scan.get_oscillation()[1] - width) <= 1e-6 * max(abs(width), 1e-9)
        and abs(b.scan.get_oscillation()[0] - a.scan.get_oscillation_range()[1]) <= 0.01 * abs(width)
    )


def _check_exclusions(numbers, exclusions, where):
    lo, hi = numbers[0], numbers[-1]
    for first, last in exclusions:
        if first < lo or last > hi:
            # a range that reaches past the images is refused too: probably a typo
            how = "lies outside" if last < lo or first > hi else "reaches past"
            raise GapfillError(
                f"gaps.exclude_images range {first}:{last} {how} the images "
                f"({lo}-{hi}): {where}"
            )


def _not_given(template, numbers, given) -> set[int]:
    """Image numbers between the first and last given whose files exist but
    were not given (a file list that skips images, xia2-style ranges)."""
    if "#" not in template:
        return set()
    try:
        existing = _template_files(template, numbers[0], numbers[-1])
    except GapfillError:
        return set()
    return set(existing) - set(given)


def _exclusions_by_sweep(ranges, n_sweeps) -> list[list[tuple[int, int]]]:
    """gaps.exclude_images for each sweep: a range names its sweep when there
    are several (sweep:first:last)."""
    out = [[] for _ in range(n_sweeps)]
    for sweep, first, last in ranges:
        if sweep is None:
            if n_sweeps > 1:
                raise GapfillError(
                    f"gaps.exclude_images={first}:{last} does not say which of the {n_sweeps} sweeps: "
                    f"write sweep:first:last, e.g. exclude_images=2:{first}:{last} (sweeps as numbered "
                    "in the summary: by file name template)"
                )
            sweep = 1
        if sweep > n_sweeps:
            raise GapfillError(
                f"gaps.exclude_images names sweep {sweep}, but there {'is' if n_sweeps == 1 else 'are'} "
                f"{n_sweeps} sweep{'s' if n_sweeps > 1 else ''}: check the sweep number"
            )
        out[sweep - 1].append((first, last))
    return out


def input_files(params, images=(), experiments=None) -> list[str]:
    """The files a run reads: its images (those of `experiments` where
    given) and the reference geometry; what cannot be listed is left out
    (the import names it, with the log)."""
    if experiments is not None:
        files = [p for e in experiments if e.imageset is not None for p in e.imageset.paths()]
    else:
        try:
            files = collect_files(params, images, quiet=True)
        except GapfillError:
            files = []
    reference = params.input.reference_geometry
    return files + ([reference] if reference else [])


def import_images(params, positional):
    """The sweeps of the images given: (Sweeps, Record).

    Excluded files (gaps.exclude_images) and files that fail the header checks
    are never handed to dxtbx; each contiguous run of the others becomes one
    imported sequence of its sweep.  All sweeps share one beam and detector;
    each has its own goniometer (setting).
    """
    if params.geometry.scan.image_range:
        raise GapfillError(
            "geometry.scan.image_range is not supported here: leave images out with "
            "gaps.exclude_images=first:last instead"
        )
    record = Record()
    files = collect_files(params, positional)
    ranges = exclusion_ranges(params.gaps.exclude_images)
    every = exclusion_multiple(params.gaps.exclude_images_multiple)
    groups = group_sweeps(files, record)
    exclusions = _exclusions_by_sweep(ranges, len(groups))
    sweeps = []
    for number, ((template, by_number), mine) in enumerate(zip(groups, exclusions), start=1):
        where = "" if len(groups) == 1 else f" of sweep {number}"
        if by_number is None:
            sweeps.append(_import_container(template, mine, every, params, record, where))
        else:
            sweeps.append(_import_files(template, by_number, mine, every, params, record, where))
    sweeps = Sweeps(sweeps)
    _check_reference_keeps_sweeps_apart(sweeps, params)
    _check_angles_keep_sweeps_apart(sweeps, params)
    _share_between_sweeps(sweeps, params)
    sweeps.drop_short_blocks(params.gaps.min_block_images)
    if not sweeps.used():
        raise GapfillError("no block is long enough to process: lower gaps.min_block_images")
    record.inputs.update(_inputs(sweeps, ranges, every))
    return sweeps, record


def _check_reference_keeps_sweeps_apart(sweeps, params) -> None:
    """Refuse a reference_geometry that would erase what tells the sweeps apart.

    dials.import gives every image set the reference's one goniometer and
    detector.  Where the headers give the sweeps different goniometer
    settings, or put the detector at different positions, that would set
    them all to the reference's: refused, naming the switch that keeps each
    sweep's own (xia2 imports with use_gonio_reference=False for the same
    reason).
    """
    ref = params.input
    if not ref.reference_geometry or len(sweeps) < 2:
        return
    comp = _comparisons(params)
    first = sweeps[0]
    # (switch, header model, comparison, how they differ, what each sweep keeps)
    checks = [
        ("gonio", 0, comp["compare_goniometer"], lambda a, b: f"{setting_text(a)}; {setting_text(b)}",
         "setting (beam and detector still from the reference)"),
        ("detector", 1, comp["compare_detector"], _apart,
         "position (refined at each position), or process the sweeps at each position in a run of their own"),
    ]
    for sweep in sweeps.sweeps[1:]:
        for switch, k, same, differ, kept in checks:
            a, b = first.header_models[k], sweep.header_models[k]
            if getattr(ref, f"use_{switch}_reference") and not same(a, b):
                thing = "goniometer" if switch == "gonio" else switch
                raise GapfillError(
                    f"reference_geometry would give all {len(sweeps)} sweeps its one {thing}, but the headers "
                    f"differ for sweeps {first.number} and {sweep.number} ({differ(a, b)}): set "
                    f"input.use_{switch}_reference=False to keep each sweep's {kept}"
                )


def _check_axis_override(goniometer, params, which="") -> None:
    """Refuse geometry.goniometer.axis on a multi-axis goniometer, which
    dxtbx leaves as it is without a word (it sets the axis of a single-axis
    goniometer only): the run would go on with the headers' axis and the
    parameters would say otherwise."""
    axis = params.geometry.goniometer.axis
    if axis is None or goniometer is None or not hasattr(goniometer, "get_names"):
        return
    names = list(goniometer.get_names())
    raise GapfillError(
        f"geometry.goniometer.axis sets the axis of a single-axis goniometer, but the images{which} have a "
        f"multi-axis one ({', '.join(names)}): give geometry.goniometer.axes= (all {len(names)} axes, three "
        "numbers each), or geometry.goniometer.invert_rotation_axis=True to invert them"
    )


def _check_angles_keep_sweeps_apart(sweeps, params) -> None:
    """Refuse geometry.goniometer.angles where the headers give the sweeps
    different settings: dials.import gives every sweep the same angles, so
    the sweeps' settings, which tell their orientations apart, would be
    erased (and indexing would find the sweeps on different crystals)."""
    if params.geometry.goniometer.angles is None or len(sweeps) < 2:
        return
    first = sweeps[0]
    for sweep in sweeps.sweeps[1:]:
        a, b = first.header_models[0], sweep.header_models[0]
        if a is not None and b is not None and setting_text(a) != setting_text(b):
            raise GapfillError(
                f"geometry.goniometer.angles would give all {len(sweeps)} sweeps one goniometer setting, but the "
                f"headers differ for sweeps {first.number} and {sweep.number} ({setting_text(a)}; "
                f"{setting_text(b)}): leave the angles to the headers, or process each sweep with its own "
                "angles in a run of its own"
            )


def _apart(a, b) -> str:
    """How far two positions of one detector are apart (its first panel)."""
    p, q = a[0], b[0]
    shift = (matrix.col(p.get_origin()) - matrix.col(q.get_origin())).length()
    tilt = matrix.col(p.get_normal()).angle(matrix.col(q.get_normal()), deg=True)
    return f"origins {shift:.1f} mm apart, normals {tilt:.1f} deg apart"


def _multiples_of_sweep(every, image_range, have, record, where) -> list[int]:
    """The images of a sweep that gaps.exclude_images_multiple leaves out:
    the multiples of `every` among the image numbers whose files there are
    (`have`); a missing file stays 'missing file'.  A sweep none of whose
    image numbers is a multiple gets a warning (nothing left out)."""
    if not every:
        return []
    first, last = image_range
    if not multiples(every, range(first, last + 1)):
        line = (
            f"gaps.exclude_images_multiple={every} leaves out no image{where}: none of its image "
            f"numbers ({first}-{last}) is a multiple of {every}"
        )
        logger.warning(line)
        record.warn(line)
    return multiples(every, have)


def _inputs(sweeps, ranges, every=None) -> dict:
    """What the summary says of the input (the first sweep's template and
    image range; the sweeps' own in the report's sweep list)."""
    first = sweeps[0]
    inputs = {
        "n_files": sum(s.n_files for s in sweeps),
        "template": first.template,
        "exclude_images": [list(r[1:]) if r[0] is None else list(r) for r in ranges],
        "format": first.sources[0].imageset.get_format_class().__name__,
        "image_range": list(first.image_range),
    }
    if every:
        inputs["exclude_images_multiple"] = every
    if len(sweeps) > 1:
        inputs["template"] = [s.template for s in sweeps]
        inputs["image_range"] = [list(s.image_range) for s in sweeps]
    return inputs


def _nothing_left(template, every, where) -> GapfillError:
    """The error when the user's exclusions leave no image of a sweep.  A
    sweep is not left out of a run by excluding all of it: the other sweeps'
    numbers and batch offsets would then depend on what was excluded."""
    what = "gaps.exclude_images and gaps.exclude_images_multiple" if every else "gaps.exclude_images"
    if not where:
        return GapfillError(f"no images left after {what}: exclude fewer images")
    return GapfillError(
        f"{what} {'leave' if every else 'leaves'} no image{where} ({os.path.basename(template)}): to process the other sweeps "
        "without it, leave its files out of the input (one glob or template for each sweep kept)"
    )


def _import_files(template, by_number, exclusions, every, params, record, where) -> Sweep:
    """One sweep of single-image files."""
    numbers = sorted(by_number)
    excluded: set[int] = set()
    for first, last in exclusions:
        excluded.update(range(first, last + 1))
    _check_exclusions(numbers, exclusions, f"give image numbers as in the file names{where}")
    statuses: dict[int, tuple[str, str, str]] = {}
    for n in _not_given(template, numbers, by_number):
        statuses[n] = (NOT_GIVEN, "not given (the file exists)", "input")
    for n in _multiples_of_sweep(every, (numbers[0], numbers[-1]), numbers, record, where):
        statuses[n] = (EXCLUDED, multiple_reason(every), "user")
    # (a number both named by a range and a multiple is listed under the range)
    for n in sorted(excluded & set(numbers)):
        statuses[n] = (EXCLUDED, "gaps.exclude_images", "user")
    excluded.update(multiples(every, numbers))
    keep = [n for n in numbers if n not in excluded]
    if not keep:
        raise _nothing_left(template, every, where)
    # cheap header checks: damaged files never reach dxtbx
    paths = []
    for n in keep:
        reason = damaged_reason(by_number[n])
        if reason:
            if not params.gaps.auto_exclude:
                raise GapfillError(
                    f"image {n}{where} ({by_number[n]}) is {reason.split(': ', 1)[1]}: "
                    f"leave it out with exclude_images={n} (or set gaps.auto_exclude=True)"
                )
            logger.warning("Excluding image %d%s: %s", n, where, reason)
            statuses[n] = (BAD, reason, "auto")
        else:
            paths.append(by_number[n])
    if not paths:
        raise _none_readable(template, where)
    number_of = {p: n for n, p in by_number.items()}
    # folder by folder: dxtbx joins the files of one name template in two
    # folders into one sequence whose template is the first folder's (the
    # images of the second then read from the first); read apart, each
    # folder's images are their own sequence, and a block ends at the folder
    read, unhandled = [], []
    for folder in sorted({os.path.dirname(p) for p in paths}):
        some, bad = _read_with_dxtbx([p for p in paths if os.path.dirname(p) == folder], params)
        read += list(some)
        unhandled += bad
    experiments = ExperimentList(sorted(read, key=lambda e: e.scan.get_image_range()[0] if e.scan else 0))
    for p in unhandled:
        n = number_of.get(p)
        reason = unrecognised_reason(p)
        if not params.gaps.auto_exclude:
            raise GapfillError(
                f"image {n}{where} ({p}) is not a readable image ({reason.split(': ', 1)[1]}): leave it "
                f"out with exclude_images={n} (or set gaps.auto_exclude=True)"
            )
        logger.warning("Excluding image %s%s: %s", n, where, reason.split(": ", 1)[1])
        statuses[n] = (BAD, reason, "auto")
    if not experiments:
        reasons = {statuses[number_of[p]][1] for p in unhandled if number_of.get(p) in statuses}
        raise _none_readable(template, where, reasons.pop().split(": ", 1)[1] if len(reasons) == 1 else None)
    sweep = _make_sweep(template, experiments, params, (numbers[0], numbers[-1]), statuses, record, where)
    sweep.n_files = len(numbers)
    return sweep


def _none_readable(template, where, reason=None) -> GapfillError:
    """`reason`: what every image of the sweep was refused for, if one."""
    return GapfillError(
        f"none of the images{where} ({os.path.basename(template)}) can be read: {reason or 'check the files'}"
        + (" (to process the other sweeps, leave its files out)" if where else "")
    )


def _import_container(path, exclusions, every, params, record, where) -> Sweep:
    """One sweep in one NeXus/HDF5 file."""
    experiments, unhandled = _read_with_dxtbx([path], params)
    if unhandled or not experiments:
        raise GapfillError(f"{path} is not an image file dxtbx can read: check the file")
    # (all of the file's images: dxtbx gives a file of stills, a scan of
    # zero width included, as one experiment per image)
    ranges = [e.scan.get_image_range() for e in experiments if e.scan is not None]
    if not ranges:
        raise GapfillError(
            f"{os.path.basename(path)}{where}: its images have no scan (stills): dials.process_gapped processes "
            "rotation data; give geometry.scan.oscillation=start,width if the header is wrong"
        )
    first, last = min(f for f, _ in ranges), max(last for _, last in ranges)
    numbers = list(range(first, last + 1))
    _check_exclusions(numbers, exclusions, f"the images of {os.path.basename(path)}")
    statuses = {}
    for n in _multiples_of_sweep(every, (first, last), numbers, record, where):
        statuses[n] = (EXCLUDED, multiple_reason(every), "user")
    for a, b in exclusions:
        for n in range(a, b + 1):
            statuses[n] = (EXCLUDED, "gaps.exclude_images", "user")
    if len(statuses) == len(numbers):
        raise _nothing_left(path, every, where)
    sweep = _make_sweep(path, experiments, params, (first, last), statuses, record, where)
    sweep.n_files = 1
    return sweep


def _misplaced_frames(imagesets, params, statuses, where) -> list:
    """The imported sequences without the one-image sequences whose header
    angle is not where their image number puts it on the sweep's longest
    sequence: a frame saved twice (image 10 copied as image 11: its header
    repeats image 10's angle) or a stray frame.  dxtbx cannot join such a
    frame to its neighbours, so it stands alone; its pixels are another
    image's, so it is a bad image (auto_exclude) or the run is refused with
    the exclusion that leaves it out.  Judged on the headers' angles, before
    geometry.scan.oscillation rewrites them."""
    sequences = [i for i in imagesets if isinstance(i, ImageSequence) and i.get_scan() is not None]
    if len(sequences) < 2:
        return imagesets
    ref = max(sequences, key=lambda i: len(i)).get_scan()
    width = ref.get_oscillation()[1]
    if not width:
        return imagesets
    keep = []
    for imageset in imagesets:
        scan = imageset.get_scan() if isinstance(imageset, ImageSequence) else None
        if scan is None or scan.get_num_images() != 1 or scan is ref:
            keep.append(imageset)
            continue
        n = scan.get_image_range()[0]
        angle, implied = scan.get_oscillation()[0], ref.get_angle_from_image_index(n)
        if abs(angle - implied) <= 0.5 * abs(width):
            keep.append(imageset)
            continue
        # the image number whose angle the header gives
        m = int(round(ref.get_image_index_from_angle(angle)))
        if m != n and abs(ref.get_angle_from_image_index(m) - angle) <= 0.1 * abs(width):
            reason = f"duplicate frame (its header angle {angle:g} deg repeats image {m}'s)"
        else:
            reason = f"header angle {angle:g} deg is not where its image number puts it ({implied:g} deg)"
        if not params.gaps.auto_exclude:
            raise GapfillError(
                f"image {n}{where} is a {reason}: leave it out with exclude_images={n} "
                "(or set gaps.auto_exclude=True)"
            )
        logger.warning("Excluding image %d%s: %s", n, where, reason)
        statuses[n] = (BAD, reason, "auto")
    if not keep:
        raise GapfillError("no image's header angle fits its image number: check the image headers")
    return keep


def _make_sweep(template, experiments, params, image_range, statuses, record, where="") -> Sweep:
    """The imported sequences of one sweep, with the geometry overrides, each
    block's start angle from its image number and one beam, detector and
    goniometer."""
    # with several sweeps, the one whose images are stills is named
    which = f"{where} ({os.path.basename(template)})" if where else ""
    for imageset in experiments.imagesets():
        if not isinstance(imageset, ImageSequence) and params.geometry.scan.oscillation is None:
            raise GapfillError(
                f"the images{which} are stills, not a rotation sweep (no oscillation in the "
                "headers): if the headers are wrong set geometry.scan.oscillation=start,width"
            )
    sources = _misplaced_frames(list(experiments.imagesets()), params, statuses, where)
    headers = (copy.deepcopy(sources[0].get_goniometer()), copy.deepcopy(sources[0].get_detector()))
    header_wavelength = sources[0].get_beam().get_wavelength() if sources[0].get_beam() else None
    _check_axis_override(headers[0], params, which)
    sources = _apply_geometry(sources, params, which)
    line = _wavelength_changed(header_wavelength, sources[0].beam, params, which)
    if line:
        logger.warning("Warning: %s", line)
        record.warn(line)
    _fix_oscillation(sources, params, image_range[0])
    _unwrap_phi(sources)
    _check_shared(sources, params)
    _share_models(sources)
    for line in _inconsistent_phi(sources):
        logger.warning(line)
        record.warn(line)
    sweep = Sweep(template, sources, image_range, statuses)
    sweep.header_models = headers
    return sweep


# a wavelength override this many times the headers' (or its inverse) is
# more than a header error: X-ray against electron wavelengths differ ~40x
WAVELENGTH_OVERRIDE_FACTOR = 2.0


def _wavelength_changed(header, beam, params, which="") -> str | None:
    """A warning where geometry.beam.wavelength= is far from the headers'
    wavelength: an X-ray value for electron data (1.0 against 0.0251 A) runs
    to the end, and the cell comes out 40x too large with RMSDs that look
    normal (at such wavelengths the Ewald sphere is almost flat)."""
    if params.geometry.beam.wavelength is None or not header or beam is None:
        return None
    given = beam.get_wavelength()
    if max(given / header, header / given) < WAVELENGTH_OVERRIDE_FACTOR:
        return None
    return (f"geometry.beam.wavelength={given:g} is {given / header:.3g} times the headers' {header:.5g} Å{which}: "
            "the cell scales with it; check it is the radiation of these images (X-rays 0.5-2 Å, electrons of "
            "200-300 kV 0.020-0.025 Å)")


def _same_hardware(a, b) -> bool:
    """The same detector (panels, pixels, sizes), wherever it stands."""
    return len(a) == len(b) and all(
        p.get_image_size() == q.get_image_size()
        and all(abs(x - y) < 1e-6 for x, y in zip(p.get_pixel_size(), q.get_pixel_size()))
        for p, q in zip(a, b)
    )


def _share_between_sweeps(sweeps, params) -> None:
    """One beam for all sweeps, and one detector for the sweeps where it
    stands in the same place (a detector arm moved between sweeps gives each
    position its own model); each sweep keeps its goniometer setting."""
    if len(sweeps) < 2:
        return
    # each sweep its own goniometer object: its blocks are told from the
    # next sweep's by it (crystal_model.base.sweep_groups); dials.import with
    # reference_geometry= gives every sweep the reference's one object
    seen = set()
    for sweep in sweeps.sweeps:
        goniometer = sweep.sources[0].goniometer
        if goniometer is not None and id(goniometer) in seen:
            goniometer = copy.deepcopy(goniometer)
            for block in sweep.sources:
                block.goniometer = goniometer
                block.imageset.set_goniometer(goniometer)
        seen.add(id(goniometer))
    comp = _comparisons(params)
    ref = sweeps[0].sources[0]
    detectors = [ref.detector]
    for sweep in sweeps.sweeps[1:]:
        exp = sweep.sources[0]
        where = f"sweeps 1 ({os.path.basename(sweeps[0].template)}) and {sweep.number} ({os.path.basename(sweep.template)})"
        if not comp["compare_beam"](ref.beam, exp.beam):
            raise GapfillError(
                f"mixed wavelengths or beams: {where} differ ({ref.beam.get_wavelength():.5f} vs "
                f"{exp.beam.get_wavelength():.5f} A): process each sweep separately "
                "(or override with geometry.beam.wavelength= if the headers are wrong)"
            )
        if not _same_hardware(ref.detector, exp.detector):
            raise GapfillError(
                f"mixed detectors: {where} differ ({_describe_models(ref)} vs {_describe_models(exp)}): "
                "process each sweep separately"
            )
        shared = next((d for d in detectors if comp["compare_detector"](d, exp.detector)), None)
        if shared is None:
            detectors.append(exp.detector)
            logger.info("Sweep %d has its own detector position (%s)", sweep.number, _describe_models(exp))
        for block in sweep.sources:
            block.beam, block.detector = ref.beam, shared or exp.detector
            block.imageset.set_beam(block.beam)
            block.imageset.set_detector(block.detector)


def _apply_geometry(imagesets, params, which=""):
    """dials.import's MetaDataUpdater on the imported sequences, in image order."""
    try:
        experiments = MetaDataUpdater(dials_import_params(params))(imagesets)
    except (Sorry, AssertionError, RuntimeError, ValueError) as e:
        msg = one_line(e).rstrip(".")
        fix = "check geometry.* and reference_geometry"
        if "detector definitions" in msg:  # DIALS' reference geometry holds one detector
            fix = ("give a reference_geometry file with one detector (the experiments of one sweep, e.g. from "
                   "dials.split_experiments), or process the sweeps of each detector position apart")
        if "set_detector_distance" in msg and imagesets and len(imagesets[0].get_detector()) > 1:
            # dxtbx sets a distance on a detector of one panel only
            detector = imagesets[0].get_detector()
            origin = ",".join(f"{v:.3f}" for v in detector.hierarchy().get_origin())
            raise GapfillError(
                f"geometry.detector.distance needs a detector of one panel; this one has {len(detector)}: move "
                f"them together with geometry.detector.hierarchy.origin=x,y,z (now {origin}; for a detector "
                "facing the beam the distance is -z)") from None
        raise GapfillError(f"applying the geometry failed: {msg}: {fix}") from None
    for exp in experiments:
        if not isinstance(exp.imageset, ImageSequence) or exp.scan is None or exp.scan.is_still():
            raise GapfillError(
                f"the images{which} are stills, not a rotation sweep (oscillation width 0 in the "
                "headers): set geometry.scan.oscillation=start,width"
            )
    return ExperimentList(sorted(experiments, key=lambda e: e.scan.get_image_range()[0]))


EXPERIMENT_LIST = ".expt"


def read_experiment_lists(paths):
    """One ExperimentList of the experiment list files `paths` (as
    dials.import writes them), able to read their images."""
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    experiments = ExperimentList()
    for path in paths:
        if not os.path.isfile(path):
            raise GapfillError(f"no such experiment list: {path}: check the path")
        try:
            experiments.extend(ExperimentListFactory.from_json_file(path, check_format=True))
        except Exception as e:
            text = " ".join(str(e).split())[:200] or type(e).__name__
            raise GapfillError(
                f"cannot read the experiment list {path} ({text}): give an .expt file that dials.import wrote, "
                "with its images where it names them"
            ) from None
    return experiments


def check_readable(experiments) -> None:
    """Refuse experiments whose image sets cannot read their images: loaded
    with check_format=False, dxtbx gives them the Format base class, and
    every image would look unreadable (bad) to the stages."""
    for exp in experiments:
        imageset = exp.imageset
        if imageset is not None and imageset.get_format_class() is Format:
            raise GapfillError(
                "the experiments cannot read their images (loaded with check_format=False): load them with "
                "ExperimentListFactory.from_json_file(path), whose check_format is True"
            )


def adopt_experiments(experiments, params):
    """The Sweeps of an ExperimentList made elsewhere (e.g. by dials.import):
    (Sweeps, Record).  Sequences sharing an image template are one sweep.

    The same checks and model sharing as import_images; the geometry is taken
    as it is (overrides belong to the import that made it).  The run works on
    a copy: the caller's experiments keep their crystals and models (the
    refinement would otherwise move their beam and detector).  Sweeps are
    numbered as import_images numbers them (_sweep_order).
    """
    experiments = copy.deepcopy(experiments)  # (models shared within the list stay shared)
    sequences = [e for e in experiments if isinstance(e.imageset, ImageSequence) and e.scan and not e.scan.is_still()]
    if not sequences:
        raise GapfillError("the experiments hold no rotation sweep: import the images as sequences")
    by_template: dict[str, list] = {}
    for exp in sequences:
        exp.crystal = None
        # a numbered sweep by its file-name template (one sweep split over
        # folders is one, as from files); a NeXus file by its path
        template = exp.imageset.get_template()
        key = os.path.basename(template) if "#" in os.path.basename(template) else template
        by_template.setdefault(key, []).append(exp)
    ranges = exclusion_ranges(params.gaps.exclude_images)
    every = exclusion_multiple(params.gaps.exclude_images_multiple)
    templates = _sweep_order(by_template)
    exclusions = _exclusions_by_sweep(ranges, len(templates))
    sweeps = []
    record = Record()
    for number, (template, mine) in enumerate(zip(templates, exclusions), start=1):
        group = ExperimentList(sorted(by_template[template], key=lambda e: e.scan.get_image_range()[0]))
        template = group[0].imageset.get_template()  # (the folder of its first images)
        _check_shared(group, params)
        _share_models(group)
        _unwrap_phi(group)
        group = _join_following(group)
        for line in _inconsistent_phi(group):
            logger.warning(line)
            record.warn(line)
        first = group[0].scan.get_image_range()[0]
        last = group[-1].scan.get_image_range()[1]
        _check_exclusions([first, last], mine, "give image numbers as in the file names")
        have = {n for e in group for n in range(e.scan.get_image_range()[0], e.scan.get_image_range()[1] + 1)}
        statuses = {}
        where = "" if len(templates) == 1 else f" of sweep {number}"
        for n in _multiples_of_sweep(every, (first, last), have, record, where):
            statuses[n] = (EXCLUDED, multiple_reason(every), "user")
        for a, b in mine:
            for n in range(a, b + 1):
                statuses[n] = (EXCLUDED, "gaps.exclude_images", "user")
        sweep = Sweep(template, group, (first, last), statuses)
        sweep.n_files = sum(e.scan.get_num_images() for e in group)
        sweeps.append(sweep)
    sweeps = Sweeps(sweeps)
    _share_between_sweeps(sweeps, params)
    sweeps.drop_short_blocks(params.gaps.min_block_images)
    if not sweeps.used():
        raise GapfillError("no block is long enough to process: lower gaps.min_block_images")
    record.inputs.update(_inputs(sweeps, ranges, every))
    return sweeps, record


def block_table(experiments, sweeps) -> str:
    rows = []
    for k, exp in enumerate(experiments, start=1):
        (first, last), (phi0, phi1) = exp.scan.get_image_range(), exp.scan.get_oscillation_range()
        row = [k, f"{first}-{last}", f"{phi0:.2f} to {phi1:.2f}", last - first + 1]
        if len(sweeps) > 1:
            row.insert(0, sweeps.sweep_of(exp).number)
        rows.append(row)
    header = ["block", "images", "phi (deg)", "n images"]
    if len(sweeps) > 1:
        header.insert(0, "sweep")
    return tabulate(rows, header)


def run(state) -> Record:
    """The import stage: the sweeps (unless given) and their blocks."""
    record = Record()
    if state.sweeps is None:
        state.sweeps, record = import_images(state.params, state.images)
    state.experiments = state.sweeps.experiments()
    logger.info("Imported %d block(s):\n%s", len(state.experiments), block_table(state.experiments, state.sweeps))
    if len(state.sweeps) > 1:
        for sweep in state.sweeps:
            logger.info("Sweep %d: %s, images %d-%d, goniometer setting %s", sweep.number, sweep.template,
                        *sweep.image_range, sweep.setting_text())
    not_used = state.sweeps.not_used()
    if not_used:
        if len(state.sweeps) == 1:
            logger.info("Images not used: %s", range_text([e["image"] for e in not_used]))
        else:
            for sweep in state.sweeps:
                mine = [e["image"] for e in not_used if e["sweep"] == sweep.number]
                if mine:
                    logger.info("Images not used in sweep %d: %s", sweep.number, range_text(mine))
    return record

