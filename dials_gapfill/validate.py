"""Checks of the parameters before any image is read.

``validate(params, images)`` raises ``GapfillError`` with one line naming the
parameter, what is wrong and how to fix it, for every value that would
otherwise be accepted by PHIL and fail only at the end of the run (the MTZ
export, scaling, writing the files) or silently do something else than asked.
The command line and the Python API call it before any work.
"""

from __future__ import annotations

import os
import re
import string

from dials_gapfill.errors import GapfillError
from dials_gapfill.util import not_utf8, printable

# Bravais lattice symbols dials.refine_bravais_settings can name
BRAVAIS_LATTICES = ("aP", "mP", "mC", "oP", "oC", "oF", "oI", "tP", "tI", "hP", "hR", "cP", "cF", "cI")

# output.* file names, with the extensions the writer needs (None: any)
OUTPUT_FILES = {
    "experiments": (".expt", ".json"),
    "reflections": None,
    "mtz": (".mtz",),
    "block_mtz": (".mtz",),
    "sweep_mtz": (".mtz",),
    "scaled_mtz": (".mtz",),
    "merged_mtz": (".mtz",),
    "shelx_name": None,
    "log": None,
    "json": None,
    "html": None,
}


def _get(scope, dotted, default=None):
    for name in dotted.split("."):
        if scope is None or not hasattr(scope, name):
            return default
        scope = getattr(scope, name)
    return scope


def _is_set(value) -> bool:
    return value is not None and str(value).strip() not in ("", "None", "none")


def _number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def validate(params, images=()) -> None:
    """Raise GapfillError (one line: the parameter, the problem, the fix) on
    the first value that cannot work; `images`: the image arguments given
    apart from the parameters (the command line's positional ones)."""
    _check_paths(params, images)
    _check_text(params)
    _check_mtz(params)
    _check_scaling(params)
    _check_output(params)
    _check_input(params)
    _check_geometry(params)
    _check_gaps(params)
    _check_indexing(params)
    _check_refinement(params)
    _check_spotfinder(params)
    _check_mp(params)


def _check_paths(params, images) -> None:
    """Paths that are not valid UTF-8: the run would go to its end and fail
    there (the log, dxtbx and the MTZ writer cannot encode them).  Relative
    ones as the run will use them, in the working folder."""
    out = _get(params, "output")
    for key in ("directory", *OUTPUT_FILES):
        value = _get(out, key)
        if isinstance(value, str) and key == "directory":
            value = os.path.abspath(value)
        bad = not_utf8(value) if isinstance(value, str) else None
        if bad:
            raise GapfillError(
                f"output.{key}: the name '{bad}' is not valid UTF-8 (the log and the MTZ file cannot hold it): "
                f"choose another output.{key}"
            )
    given = [*(_get(params, "input.images") or []), *(_get(params, "input.template") or []),
             *(_get(params, "input.image") or []), *images]
    reference = _get(params, "input.reference_geometry")
    for path in given + ([reference] if isinstance(reference, str) else []):
        bad = not_utf8(os.path.abspath(os.path.expanduser(str(path))))
        if bad:
            raise GapfillError(unreadable_name(bad))


def _check_text(params) -> None:
    """Text values that are not valid UTF-8 (bytes of another encoding on the
    command line: mtz.crystal_name=caf\\xe9): the log could not hold them and
    the MTZ writer would fail at the end of the run."""
    for name, value in _leaves(params, "", levels=12):
        for text in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(text, str) and not_utf8(text):
                raise GapfillError(
                    f"{name[1:]}: '{printable(text)}' is not valid UTF-8 (the log and the MTZ file cannot hold it): "
                    "give it in UTF-8"
                )


def unreadable_name(bad: str) -> str:
    """The message for an input path that is not valid UTF-8 (`bad`, from
    util.not_utf8)."""
    return (f"the path '{bad}' is not valid UTF-8 (dxtbx cannot open it, nor the log hold it): rename it, "
            "or link to it from a name that is")


def _check_mtz(params) -> None:
    mtz = _get(params, "mtz")
    if mtz is None:
        return
    threshold = _get(mtz, "partiality_threshold")
    if threshold is None or not _number(threshold) or not 0 <= float(threshold) <= 1:
        raise GapfillError(
            f"mtz.partiality_threshold={threshold} is not a fraction: give a number from 0 to 1 "
            "(default 0.4; 0.99 keeps only nearly complete reflections)"
        )
    d_min = _get(mtz, "d_min")
    if d_min is not None and (not _number(d_min) or float(d_min) <= 0):
        raise GapfillError(f"mtz.d_min={d_min} is not a resolution: give a positive number in Å (or None)")
    intensity = _get(mtz, "intensity")
    if intensity is not None and not list(intensity):
        raise GapfillError("mtz.intensity is empty: choose profile, sum or both (mtz.intensity=profile+sum)")
    for name in ("crystal_name", "project_name"):
        value = _get(mtz, name, "x")
        if not _is_set(value):
            raise GapfillError(f"mtz.{name} is empty: give a name (the MTZ file needs one)")
        if len(str(value)) > 64:
            raise GapfillError(f"mtz.{name} is longer than 64 characters, the MTZ limit: give a shorter name")
    if _is_set(_get(mtz, "hklout")):
        raise GapfillError(
            "mtz.hklout is not used by dials.process_gapped: name the MTZ file with output.mtz= "
            "(and output.directory=)"
        )


def _check_scaling(params) -> None:
    scaling = _get(params, "scaling")
    if scaling is None:
        return
    d_min = _get(scaling, "d_min")
    if d_min is not None and (not _number(d_min) or float(d_min) <= 0):
        raise GapfillError(f"scaling.d_min={d_min} is not a resolution: give a positive number in Å (or None)")
    d_max = _get(scaling, "d_max")
    if d_max is not None and d_min is not None and _number(d_max) and float(d_max) <= float(d_min):
        raise GapfillError(
            f"scaling.d_max={d_max} is not lower in resolution than scaling.d_min={d_min}: "
            "d_max must be the larger number"
        )
    # thresholds (e.g. of the automatic resolution limit) are fractions
    for name, value in _leaves(scaling, "scaling"):
        leaf = name.rsplit(".", 1)[-1]
        if not isinstance(value, float):
            continue
        if ("cc_half" in leaf or "completeness" in leaf or leaf.endswith("fraction")) and not 0 <= value <= 1:
            raise GapfillError(f"{name}={value:g} is not a fraction: give a number from 0 to 1")


def _leaves(scope, prefix, levels=4):
    """(dotted name, value) of the parameters of a PHIL extract, nested scopes
    included down to `levels` below it."""
    from libtbx.phil import scope_extract

    for name, value in vars(scope).items():
        if name.startswith("_"):
            continue
        if isinstance(value, scope_extract):
            if levels > 0:
                yield from _leaves(value, f"{prefix}.{name}", levels - 1)
        else:
            yield f"{prefix}.{name}", value

# output.* names numbered per file: the number's field, the switch that
# writes them, an example
NUMBERED = {
    "block_mtz": ("block", "per_block_mtz", "integrated_{block}.mtz"),
    "sweep_mtz": ("sweep", "per_sweep_mtz", "integrated_sweep{sweep}.mtz"),
}


def _check_output(params) -> None:
    out = _get(params, "output")
    if out is None:
        return
    from libtbx import Auto

    directory = _get(out, "directory")
    if directory is not None and directory is not Auto and str(directory).strip() == "":
        raise GapfillError("output.directory is empty: give a folder (. for the current one)")
    if _get(out, "shelx") and not _get(params, "scaling.run"):
        raise GapfillError("output.shelx=True writes the scaled data: add scale=True (or leave out output.shelx)")
    names = {}
    for key, extensions in OUTPUT_FILES.items():
        value = _get(out, key)
        if not _is_set(value):
            continue
        value = str(value)
        if key in NUMBERED:
            field, switch, example = NUMBERED[key]
            if not (_get(out, switch) and _is_set(_get(out, "mtz"))):
                continue
            try:
                first = value.format(**{field: 1}, first=1, last=10)
                second = value.format(**{field: 2}, first=12, last=20)
            except (KeyError, IndexError, ValueError) as e:
                raise GapfillError(
                    f"output.{key}={value!r} cannot be filled in ({type(e).__name__}: {e}): "
                    f"use {{{field}}} for the {field} number ({{first}} and {{last}} for its images)"
                ) from None
            # {first}-{last} alone is not enough: blocks of different sweeps can
            # cover the same image numbers (four sweeps of images 1-15)
            fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
            if first == second or field not in fields:
                what = (f"gives every {field} the same file" if first == second else
                        f"can give two {field}s one file (the sweeps' images are numbered apart)")
                raise GapfillError(
                    f"output.{key}={value!r} {what}: put {{{field}}} in the name, e.g. output.{key}={example}"
                )
            candidates = [first]
        elif key == "shelx_name":
            if not _get(out, "shelx"):
                continue
            if value.lower().endswith((".hkl", ".ins")):
                raise GapfillError(
                    f"output.shelx_name={value!r} would give {value}.hkl and {value}.ins: give the name "
                    f"without the extension, output.shelx_name={value[:-4]}"
                )
            candidates = [f"{value}.hkl", f"{value}.ins"]  # the pair SHELX programs read
        else:
            candidates = [value]
        for name in candidates:
            if os.sep in name or (os.altsep and os.altsep in name) or name in (".", ".."):
                raise GapfillError(
                    f"output.{key}={value!r} is not a plain file name: give a name without a folder "
                    "and choose the folder with output.directory="
                )
            if extensions and not name.lower().endswith(extensions):
                why = ("DIALS writes the file by its extension" if key == "experiments" else
                       "it is an MTZ file, and a name without it could take an image's place")
                raise GapfillError(
                    f"output.{key}={value!r} needs the extension {' or '.join(extensions)} ({why}): "
                    f"e.g. output.{key}={os.path.splitext(value)[0]}{extensions[0]}"
                )
            if name in names:
                raise GapfillError(
                    f"output.{key} and output.{names[name]} are both {name!r}: one would overwrite the "
                    "other; give them different names"
                )
            names[name] = key
    # a plain name that a numbered one can also give (output.mtz=integrated_2.mtz
    # and block 2's MTZ): one file would overwrite the other
    for key, (field, switch, _) in NUMBERED.items():
        value = _get(out, key)
        if not (_is_set(value) and _get(out, switch) and _is_set(_get(out, "mtz"))):
            continue
        pattern = numbered_pattern(str(value))
        for name, other in names.items():
            if other != key and re.fullmatch(pattern, name):
                raise GapfillError(
                    f"output.{other}={name!r} is also a name output.{key}={str(value)!r} gives (a {field}'s "
                    "MTZ): one would overwrite the other; give them different names"
                )


def numbered_pattern(numbered: str) -> str:
    """The regular expression of the names a numbered name (a format with
    fields such as {block}, {sweep}, {first}, {last}) can give."""
    return "".join(
        re.escape(literal) + (r"-?\d+" if field is not None else "")
        for literal, field, _, _ in string.Formatter().parse(numbered)
    )


def _check_input(params) -> None:
    """The syntax of input.image ranges (whether their files exist is known
    only at import); that a reference_geometry file is there."""
    from dials_gapfill.stages.importer import xia2_image_spec

    for spec in _get(params, "input.image") or []:
        xia2_image_spec(os.path.expanduser(spec))
    reference = _get(params, "input.reference_geometry")
    if _is_set(reference) and not os.path.isfile(os.path.expanduser(str(reference))):
        raise GapfillError(
            f"input.reference_geometry={reference}: no such file: give the models.expt (or .json) "
            "whose geometry the images take"
        )


def _check_geometry(params) -> None:
    """Overrides dxtbx would stop on with an internal assertion (a negative
    oscillation width, a rotation axis of length 0, a distance or wavelength
    that is not positive): named, with what works."""
    geometry = _get(params, "geometry")
    if geometry is None:
        return
    oscillation = _get(geometry, "scan.oscillation")
    if oscillation is not None and len(oscillation) == 2 and oscillation[1] < 0:
        start, width = oscillation
        raise GapfillError(
            f"geometry.scan.oscillation={start:g},{width:g}: the width is negative: give it as positive "
            f"(geometry.scan.oscillation={start:g},{-width:g}) and turn the rotation the other way with "
            "geometry.goniometer.invert_rotation_axis=True"
        )
    for name in ("goniometer.axis", "goniometer.axes"):
        axes = _get(geometry, name)
        if axes is not None and len(axes) % 3 == 0:
            for k in range(0, len(axes), 3):
                if not any(axes[k:k + 3]):
                    raise GapfillError(
                        f"geometry.{name}={','.join(f'{v:g}' for v in axes)}: an axis of length 0 is not a "
                        "direction: give the rotation axis, e.g. geometry.goniometer.axis=1,0,0"
                    )
    for name, unit in (("detector.distance", "mm"), ("beam.wavelength", "Å")):
        value = _get(geometry, name)
        if value is not None and value <= 0:
            raise GapfillError(f"geometry.{name}={value:g} is not positive: give it in {unit}, or leave it to "
                               "the headers")


def _check_gaps(params) -> None:
    """The syntax of gaps.exclude_images and the value of
    gaps.exclude_images_multiple; which sweep a range names, and whether it
    lies inside the images, is known only at import."""
    from dials_gapfill.model.exclusions import exclusion_multiple, exclusion_ranges

    exclusion_multiple(_get(params, "gaps.exclude_images_multiple"))
    exclusion_ranges(_get(params, "gaps.exclude_images"))


def _check_indexing(params) -> None:
    known = _get(params, "indexing.known_symmetry")
    cell, group = _get(known, "unit_cell"), _get(known, "space_group")
    if cell is not None and group is not None:
        try:
            fits = group.group().is_compatible_unit_cell(cell, relative_length_tolerance=0.01,
                                                          absolute_angle_tolerance=1.0)
            system = group.group().crystal_system()
        except Exception:
            fits, system = True, ""
        if not fits:
            values = ",".join(f"{v:g}" for v in cell.parameters())
            raise GapfillError(
                f"unit_cell={values} does not fit space_group={group} "
                f"({'an' if system[:1].lower() in 'aeiou' else 'a'} {system.lower()} cell): "
                "fix the cell or the space group (indexing.known_symmetry)"
            )
    wanted = _get(params, "indexing.bravais_lattice")
    if _is_set(wanted) and str(wanted).strip().lower() != "auto" and str(wanted).strip() not in BRAVAIS_LATTICES:
        raise GapfillError(
            f"indexing.bravais_lattice={wanted} is not a Bravais lattice: give auto or one of "
            f"{', '.join(BRAVAIS_LATTICES)} (or None to stay in P1)"
        )


def _check_refinement(params) -> None:
    blocks = _get(params, "refinement.blocks")
    if blocks is None:
        return
    sigma = _get(blocks, "tie_sigma")
    # (the restraint of per_block's tie_cells, and of the continuous model's
    # continuous_sweep_cells=tied)
    tied = _get(blocks, "tie_cells") or _get(blocks, "continuous_sweep_cells") == "tied"
    if tied and sigma is not None and any(s <= 0 for s in sigma):
        raise GapfillError(
            "refinement.blocks.tie_sigma has a zero: the restraint needs six positive sigmas "
            "(or refinement.blocks.tie_cells=False and continuous_sweep_cells=shared for no restraint)"
        )


def _check_spotfinder(params) -> None:
    f = _get(params, "spotfinder.filter")
    d_min, d_max = _get(f, "d_min"), _get(f, "d_max")
    if d_min is not None and d_max is not None and _number(d_min) and _number(d_max) and float(d_max) <= float(d_min):
        raise GapfillError(
            f"spotfinder.filter.d_max={d_max} is not lower in resolution than spotfinder.filter.d_min={d_min}: "
            "d_max must be the larger number"
        )


def _check_mp(params) -> None:
    """mp.method: a cluster route that cannot work stops here (dials_gapfill/cluster.py)."""
    if _get(params, "mp.method") in (None, "multiprocessing"):
        njobs = _get(params, "mp.njobs")
        if njobs not in (None, 1):
            # (DIALS' spot finder refuses njobs > 1 without a cluster method, late)
            raise GapfillError(
                f"mp.njobs={njobs} is the number of cluster jobs: give a cluster method with it "
                "(mp.method=slurm, sge, pbs or lsf), or leave it out (mp.nproc sets the processes on this machine)"
            )
        return
    from dials_gapfill import cluster
    cluster.check(params)
