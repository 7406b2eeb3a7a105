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
import glob
import hashlib
import logging
import os
import re

from dials.command_line.dials_import import MetaDataUpdater
from dials.util import Sorry, tabulate
from dxtbx.imageset import ImageSequence
from dxtbx.model.experiment_list import (
    BeamComparison,
    DetectorComparison,
    ExperimentList,
    ExperimentListFactory,
    GoniometerComparison,
)
from dxtbx.sequence_filenames import template_regex

from dials_gapfill.errors import GapfillError
from dials_gapfill.phil import dials_import_params
from dials_gapfill.model.sweep import BAD, EXCLUDED, NOT_GIVEN, Sweep
from dials_gapfill.model.tables import image_numbers
from dials_gapfill.util import captured, range_text

logger = logging.getLogger("dials.process_gapped.import")

_NOT_IMAGES = {
    ".json", ".txt", ".log", ".expt", ".refl", ".phil", ".param", ".params",
    ".mtz", ".html", ".py", ".md", ".pickle", ".png", ".jpg", ".pdf", ".sh",
}
_CONTAINER_SUFFIXES = (".h5", ".hdf5", ".nxs", ".nx5")
_GLOB_CHARS = re.compile(r"[*?\[]")


# --------------------------------------------------------------------------
# Exclusion lists
# --------------------------------------------------------------------------


def parse_exclusions(values) -> list[tuple[int, int]]:
    """``["41:45,81", "90"]`` -> ``[(41, 45), (81, 81), (90, 90)]``."""
    ranges = []
    for value in values or []:
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            for token in str(item).replace(" ", ",").split(","):
                if not token:
                    continue
                m = re.fullmatch(r"(\d+)(?:[:](\d+))?", token)
                if not m:
                    raise GapfillError(
                        f"gaps.exclude_images: cannot read {token!r}: give 1-based image "
                        "numbers and first:last ranges separated by commas, e.g. "
                        "exclude_images=41:45,81"
                    )
                first = int(m.group(1))
                last = int(m.group(2)) if m.group(2) else first
                if last < first or first < 1:
                    raise GapfillError(
                        f"gaps.exclude_images: range {token!r} is empty or starts below 1: "
                        "write ranges as first:last with first <= last, e.g. 41:45"
                    )
                ranges.append((first, last))
    return ranges


# --------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------


def _listdir_images(directory: str) -> list[str]:
    names = sorted(os.listdir(directory))
    return [
        os.path.join(directory, n)
        for n in names
        if not n.startswith(".")
        and os.path.isfile(os.path.join(directory, n))
        and os.path.splitext(n)[1].lower() not in _NOT_IMAGES
    ]


def _template_files(template: str, first=None, last=None) -> dict[int, str]:
    """Existing files of a ``name_####.cbf`` template, by image number."""
    if "#" not in template:
        raise GapfillError(
            f"input.template={template!r} has no # for the image number: "
            "write e.g. template=data_####.cbf"
        )
    directory, base = os.path.split(template)
    directory = directory or "."
    m = re.fullmatch(r"([^#]*)(#+)([^#]*)", base)
    if not m:
        raise GapfillError(
            f"input.template={template!r}: the # characters must be one run, e.g. data_####.cbf"
        )
    if not os.path.isdir(directory):
        raise GapfillError(f"input.template={template!r}: no such directory {directory!r}")
    pattern = re.compile(re.escape(m.group(1)) + r"(\d{%d})" % len(m.group(2)) + re.escape(m.group(3)) + "$")
    found = {}
    for name in os.listdir(directory):
        mm = pattern.match(name)
        if mm:
            number = int(mm.group(1))
            if (first is None or number >= first) and (last is None or number <= last):
                found[number] = os.path.join(directory, name)
    return found


def _xia2_image(spec: str) -> dict[int, str]:
    """``/path/name_0001.cbf:1:40`` -> the existing files of images 1..40."""

    m = re.fullmatch(r"(.+?):(\d+):(\d+)", spec)
    if not m:
        raise GapfillError(
            f"input.image={spec!r}: write /path/name_0001.cbf:first:last (xia2 style), "
            "e.g. image=/data/x_0001.cbf:1:90"
        )
    path, first, last = m.group(1), int(m.group(2)), int(m.group(3))
    if last < first:
        raise GapfillError(f"input.image={spec!r}: last image {last} is before first {first}")
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


def collect_files(params, positional=()) -> list[str]:
    """All image files named by images=, template=, image= and positional args."""
    files: list[str] = []
    entries = list(params.input.images or []) + list(positional or [])
    for entry in entries:
        entry = os.path.expanduser(str(entry))
        if os.path.isdir(entry):
            found = _listdir_images(entry)
            if not found:
                raise GapfillError(
                    f"no image files in directory {entry!r}: give the folder that holds the images"
                )
            files.extend(found)
        elif _GLOB_CHARS.search(entry) and not os.path.exists(entry):
            found = sorted(f for f in glob.glob(entry) if os.path.isfile(f))
            if not found:
                raise GapfillError(f"no files match {entry!r}: check the path and the pattern")
            files.extend(found)
        elif os.path.isfile(entry):
            files.append(entry)
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
    if not files:
        raise GapfillError(
            "no images given: name them, e.g. dials.process_gapped images=/data/x_*.cbf "
            "(or template=x_####.cbf, or a directory)"
        )
    return files


def _is_container(path: str) -> bool:
    return path.lower().endswith(_CONTAINER_SUFFIXES)


def number_files(files: list[str], report) -> tuple[str, dict[int, str]]:
    """(template, {image number: path}) for single-image files of one sweep."""

    by_number: dict[int, str] = {}
    templates: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for f in files:
        real = os.path.realpath(f)
        if real in seen:
            msg = f"{f} was given twice; it is used once"
            logger.warning(msg)
            report.warnings.append(msg)
            continue
        seen[real] = f
        template, number = template_regex(os.path.abspath(f))
        if template is None or "#" not in template:
            raise GapfillError(
                f"not an image of a numbered sweep: {f}: remove it from the list of images"
            )
        templates.setdefault(template, []).append(f)
        if number in by_number:
            raise GapfillError(
                f"image number {number} given twice ({by_number[number]} and {f}): "
                "give the images of one sweep only"
            )
        by_number[number] = os.path.abspath(f)
    if len(templates) > 1:
        names = sorted(templates, key=lambda t: -len(templates[t]))
        stray = templates[names[1]][0]
        raise GapfillError(
            f"the images belong to {len(templates)} different file name templates "
            f"({', '.join(os.path.basename(t) for t in names[:3])}); e.g. {stray} "
            "does not match the others: give the images of one sweep only"
        )
    return next(iter(templates)), by_number


# --------------------------------------------------------------------------
# Cheap integrity checks (no pixel data read)
# --------------------------------------------------------------------------


def truncated_reason(path: str) -> str | None:
    """Why an image file is damaged, or None.

    miniCBF: shorter than X-Binary-Size says, or a binary section that does not
    match its Content-MD5 (Dectris writes one; the check reads the file once,
    which leaves it in the page cache for spot finding).  SMV: shorter than
    HEADER_BYTES + SIZE1 * SIZE2 * bytes.  Compressed files are not checked.
    """
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

    dxtbx prints them from C++ while it tries (and fails, as it should) to
    join the scans of two blocks across a gap; they are not errors.
    """
    with captured(1) as out:
        yield
    for line in out.text.splitlines():
        if "DXTBX_ASSERT(image_range_" not in line:
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
        a, b = image_numbers(ref.imageset), image_numbers(exp.imageset)
        where = f"images {a[0]}-{a[-1]} and {b[0]}-{b[-1]}"
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


def _warn_inconsistent_phi(experiments, report) -> None:
    ref = experiments[0].scan
    width = ref.get_oscillation()[1]
    for exp in experiments[1:]:
        first = exp.scan.get_image_range()[0]
        expected = ref.get_angle_from_image_index(first)
        actual = exp.scan.get_oscillation()[0]
        if abs(expected - actual) > 0.5 * abs(width):
            msg = (
                f"block starting at image {first} starts at {actual:.2f} deg but its image "
                f"number implies {expected:.2f} deg: check the image headers (or set "
                "geometry.scan.oscillation=start,width)"
            )
            logger.warning(msg)
            report.warnings.append(msg)


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


def _check_exclusions(numbers, exclusions, where):
    lo, hi = numbers[0], numbers[-1]
    for first, last in exclusions:
        if first < lo or last > hi:
            raise GapfillError(
                f"gaps.exclude_images range {first}:{last} lies outside the images "
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


def import_images(params, positional, report) -> Sweep:
    """The import stage: the Sweep of the images given.

    Excluded files (gaps.exclude_images) and files that fail the header checks
    are never handed to dxtbx; each contiguous run of the others becomes one
    imported sequence of the sweep.
    """
    if params.geometry.scan.image_range:
        raise GapfillError(
            "geometry.scan.image_range is not supported here: leave images out with "
            "gaps.exclude_images=first:last instead"
        )
    files = collect_files(params, positional)
    exclusions = parse_exclusions(params.gaps.exclude_images)
    excluded: set[int] = set()
    for first, last in exclusions:
        excluded.update(range(first, last + 1))

    containers = [f for f in files if _is_container(f)]
    if containers:
        if len(files) > 1:
            raise GapfillError(
                "give one NeXus/HDF5 file per run (gaps in such a sweep come from "
                "gaps.exclude_images): got " + ", ".join(os.path.basename(f) for f in files[:4])
            )
        template, by_number = files[0], None
    else:
        template, by_number = number_files(files, report)

    statuses: dict[int, tuple[str, str, str]] = {}
    if by_number is not None:
        numbers = sorted(by_number)
        report.inputs["n_files"] = len(numbers)
        _check_exclusions(numbers, exclusions, "give image numbers as in the file names")
        for n in _not_given(template, numbers, by_number):
            statuses[n] = (NOT_GIVEN, "not given (the file exists)", "input")
        for n in sorted(excluded & set(numbers)):
            statuses[n] = (EXCLUDED, "gaps.exclude_images", "user")
        keep = [n for n in numbers if n not in excluded]
        if not keep:
            raise GapfillError("no images left after gaps.exclude_images: exclude fewer images")
        # cheap header checks: truncated files never reach dxtbx
        paths = []
        for n in keep:
            reason = truncated_reason(by_number[n])
            if reason:
                if not params.gaps.auto_exclude:
                    raise GapfillError(
                        f"image {n} ({by_number[n]}) is {reason.split(': ', 1)[1]}: "
                        f"leave it out with exclude_images={n} (or set gaps.auto_exclude=True)"
                    )
                logger.warning("Excluding image %d: %s", n, reason)
                statuses[n] = (BAD, reason, "auto")
            else:
                paths.append(by_number[n])
        if not paths:
            raise GapfillError("none of the images can be read: check the files")
        number_of = {p: n for n, p in by_number.items()}
        experiments, unhandled = _read_with_dxtbx(paths, params)
        for p in unhandled:
            n = number_of.get(p)
            if not params.gaps.auto_exclude:
                raise GapfillError(
                    f"image {n} ({p}) is not a readable image: leave it out with "
                    f"exclude_images={n} (or set gaps.auto_exclude=True)"
                )
            logger.warning("Excluding image %s: not a recognised image format", n)
            statuses[n] = (BAD, "unreadable: not a recognised image format", "auto")
        if not experiments:
            raise GapfillError(
                f"none of the {len(paths)} files is an image dxtbx can read "
                f"(e.g. {paths[0]}): check the files"
            )
    else:
        report.inputs["n_files"] = 1
        experiments, unhandled = _read_with_dxtbx([template], params)
        if unhandled or not experiments:
            raise GapfillError(f"{template} is not an image file dxtbx can read: check the file")
        numbers = image_numbers(experiments[0].imageset)
        _check_exclusions(numbers, exclusions, f"the images of {os.path.basename(template)}")
        for n in sorted(excluded & set(numbers)):
            statuses[n] = (EXCLUDED, "gaps.exclude_images", "user")
    lo, hi = numbers[0], numbers[-1]
    report.inputs.update({"template": template, "exclude_images": [list(r) for r in exclusions]})

    imagesets = list(experiments.imagesets())
    for imageset in imagesets:
        if not isinstance(imageset, ImageSequence) and params.geometry.scan.oscillation is None:
            raise GapfillError(
                "the images are stills, not a rotation sweep (no oscillation in the "
                "headers): if the headers are wrong set geometry.scan.oscillation=start,width"
            )
    sources = _apply_geometry(imagesets, params)
    _fix_oscillation(sources, params, lo)
    _check_shared(sources, params)
    _share_models(sources)
    _warn_inconsistent_phi(sources, report)

    sweep = Sweep(template, sources, (lo, hi), statuses)
    drop_short_blocks(sweep, params.gaps.min_block_images)
    if not sweep.used():
        raise GapfillError("no block is long enough to process: lower gaps.min_block_images")
    report.inputs["format"] = sources[0].imageset.get_format_class().__name__
    report.inputs["image_range"] = [lo, hi]
    return sweep


def _apply_geometry(imagesets, params):
    """dials.import's MetaDataUpdater on the imported sequences, in image order."""

    try:
        experiments = MetaDataUpdater(dials_import_params(params))(imagesets)
    except (Sorry, AssertionError, RuntimeError, ValueError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise GapfillError(f"applying the geometry failed: {msg}: check geometry.* and reference_geometry") from None
    for exp in experiments:
        if not isinstance(exp.imageset, ImageSequence) or exp.scan is None or exp.scan.is_still():
            raise GapfillError(
                "the images are stills, not a rotation sweep (oscillation width 0 in the "
                "headers): set geometry.scan.oscillation=start,width"
            )
    return ExperimentList(sorted(experiments, key=lambda e: e.scan.get_image_range()[0]))


def drop_short_blocks(sweep, min_images, why="") -> list[dict]:
    """Drop blocks shorter than `min_images`; returns what was dropped."""
    dropped = []
    for first, last in sweep.blocks():
        if last - first + 1 >= min_images:
            continue
        reason = f"block of {last - first + 1} images is shorter than gaps.min_block_images{why}"
        logger.warning("Dropping images %d-%d: %s", first, last, reason)
        sweep.drop(first, last, "block too short")
        dropped.append({"first": first, "last": last, "reason": reason})
    sweep.dropped_blocks.extend(dropped)
    return dropped


def adopt_experiments(experiments, params, report) -> Sweep:
    """The Sweep of an ExperimentList made elsewhere (e.g. by dials.import).

    The same checks and model sharing as import_images; the geometry is taken
    as it is (overrides belong to the import that made it).
    """
    sequences = [e for e in experiments if isinstance(e.imageset, ImageSequence) and e.scan and not e.scan.is_still()]
    if not sequences:
        raise GapfillError("the experiments hold no rotation sweep: import the images as sequences")
    sequences = ExperimentList(sorted(sequences, key=lambda e: e.scan.get_image_range()[0]))
    _check_shared(sequences, params)
    _share_models(sequences)
    for exp in sequences:
        exp.crystal = None
    template = sequences[0].imageset.get_template()
    first = sequences[0].scan.get_image_range()[0]
    last = sequences[-1].scan.get_image_range()[1]
    exclusions = parse_exclusions(params.gaps.exclude_images)
    _check_exclusions([first, last], exclusions, "give image numbers as in the file names")
    statuses = {}
    for a, b in exclusions:
        for n in range(a, b + 1):
            statuses[n] = (EXCLUDED, "gaps.exclude_images", "user")
    report.inputs.update({"template": template, "image_range": [first, last],
                          "n_files": sum(e.scan.get_num_images() for e in sequences),
                          "exclude_images": [list(r) for r in exclusions],
                          "format": sequences[0].imageset.get_format_class().__name__})
    sweep = Sweep(template, sequences, (first, last), statuses)
    drop_short_blocks(sweep, params.gaps.min_block_images)
    if not sweep.used():
        raise GapfillError("no block is long enough to process: lower gaps.min_block_images")
    return sweep


def log_block_table(report) -> None:

    rows = [
        [b.number, f"{b.first}-{b.last}", f"{b.phi_start:.2f} to {b.phi_end:.2f}", b.n_images]
        for b in report.blocks
    ]
    logger.info(
        "Imported %d block(s):\n%s",
        len(rows),
        tabulate(rows, ["block", "images", "phi (deg)", "n images"]),
    )
    if report.excluded:
        logger.info("Images not used: %s", range_text([e["image"] for e in report.excluded]))
