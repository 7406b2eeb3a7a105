"""
Write a simulated rotation sweep (Pilatus miniCBF images) and its ground truth.

The test data of dials-gapfill: reflections predicted with DIALS' own
predictor for a crystal whose orientation drifts slowly, Gaussian spots,
Gaussian rocking curves split over images, Wilson intensities with a B factor,
Lorentz/polarisation/detector-efficiency factors, a smooth background and
Poisson noise.  ground_truth.json holds the geometry, the orientation at
every image boundary and the true intensities.  The same seed gives
bit-identical files; an image is the same whichever other images are written.

Examples::

  dials.simulate_sweep output.directory=sim omit=41:45,81:83

  dials.simulate_sweep n_images=90 osc_width=1 seed=7 space_group=P4 unit_cell=57,57,150,90,90,90

  dials.simulate_sweep n_images=90 detector=pilatus1m space_group=P41212 unit_cell=57,57,150,90,90,90 drift_acceleration=0.002 omit=10,20,30,40,50,60,70,80,90

  dials.simulate_sweep bad_images=50:blank,60:zero,70:overexposed,80:truncated,90:garbage

Several sweeps of one crystal (full imgCIF CBF files with a goniometer axis
table, read by dxtbx as a MultiAxisGoniometer with each sweep's own setting;
one template per sweep, sim_01_####.cbf, sim_02_####.cbf, ...; one
ground_truth.json with the crystal and, under "sweeps", each sweep's scan,
setting and fixed rotation and orientations)::

  dials.simulate_sweep sweeps=3 n_images=60 detector=pilatus300k

  dials.simulate_sweep goniometer=fixed_chi sweeps=4

  dials.simulate_sweep goniometer=kappa "sweep { angles=kappa:0,phi:0 }" \
      "sweep { angles=kappa:40,phi:120; omit=11:15 }" \
      "sweep { scan_axis=phi; angles=kappa:-40,omega:30; n_images=40 }"

(on one line, the assignments inside a scope are separated by ";")

or the sweep scopes in a file (dials.simulate_sweep sweeps.phil), one
"sweep { ... }" per sweep.

An electron-diffraction (3D ED / cRED) sweep: SMV files with the TimePix_SU
header of RED / instamatic (dxtbx: FormatSMVTimePix_SU_512x512), 512 x 512
Timepix of 55 um pixels, 0.0251 A, camera length 530 mm, 240 frames of
0.4 deg from -48 deg, a small-molecule cell (carbamazepine III), every 20th
frame a crystal-tracking frame, left out or defocused (kinematic
intensities; the rotation axis is the one dxtbx' format class fixes)::

  dials.simulate_sweep electron=True

  dials.simulate_sweep electron=True ed.tracking=defocused ed.tracking_every=15 n_images=300
"""

from __future__ import annotations

import contextlib
import os
import sys

PROGRAM = "dials.simulate_sweep"

phil_str = """
n_images = 120
  .type = int(value_min=1)
  .help = "Number of images in the sweep (before omissions)."
first_image = 1
  .type = int(value_min=0)
  .help = "Number of the first image."
osc_start = 0.0
  .type = float
  .help = "Rotation angle at the start of the first image (degrees)."
osc_width = 0.5
  .type = float(value_min=0.001)
  .help = "Oscillation width per image (degrees)."
omit = None
  .type = strings
  .help = "Images not written (gaps): ranges first:last and single numbers, e.g. 41:45,81:83"
bad_images = None
  .type = strings
  .help = "Bad images to plant, image:mode with mode blank, zero, overexposed,"
          "flare (every count x40: above DIALS' strong-pixel cap), saturated (every"
          "pixel at the overload value), truncated, garbage or corrupt (header over"
          "random bytes), e.g. 50:blank,60:zero; with electron=True also defocused (a"
          "crystal-tracking frame)"
seed = 42
  .type = int
  .help = "Random seed: the same seed gives bit-identical files."
unit_cell = 54 62 71 90 90 90
  .type = floats(size=6)
  .help = "Unit cell (A, degrees)."
space_group = "P 21 21 21"
  .type = str
  .help = "Space group symbol."
detector = *pilatus1m pilatus300k pilatus2m pilatus6m
  .type = choice
  .help = "Detector size (Pilatus modules and gaps)."
distance = 190.0
  .type = float(value_min=10)
  .help = "Crystal to detector distance (mm)."
wavelength = 0.9795
  .type = float(value_min=0.1)
  .help = "Wavelength (A)."
mosaicity = 0.12
  .type = float(value_min=0.001)
  .help = "Sigma of the rocking curve (degrees)."
drift = 0.01
  .type = float
  .help = "Crystal rotation (degrees) per degree of scan, so scan-varying refinement matters."
drift_acceleration = 0.0
  .type = float
  .help = "Accelerating drift, as a slipping crystal: the crystal turns by"
          "drift * phi + drift_acceleration * phi^2 degrees after phi degrees of scan."
scan_end_tails = False
  .type = bool
  .help = "Record on the end images the tails of reflections whose rocking curves"
          "are centred beyond the scan's ends, as a real detector does (off: the"
          "files of a seed stay as they were)."
intensity_scale = 1000.0
  .type = float(value_min=0)
  .help = "Mean photons of a low-resolution reflection."
wilson_b = 18.0
  .type = float(value_min=0)
  .help = "Wilson B factor (A^2)."
prefix = sim
  .type = str
  .help = "File name prefix: <prefix>_0001.cbf, or <prefix>_master.h5 with format=nexus"
format = *cbf nexus
  .type = choice
  .help = "cbf: one Pilatus miniCBF file per image. nexus: the whole sweep as one"
          "NeXus NXmx HDF5 file, <prefix>_master.h5 (same geometry and pixels; no"
          "omit, first_image 1, bad images only blank, zero, overexposed, flare or"
          "saturated)."
sweeps = 1
  .type = int(value_min=1)
  .help = "Number of sweeps of the one crystal (same cell, orientation at the goniometer"
          "datum, intensities and drift). 1: one sweep of Pilatus miniCBF images on one"
          "axis. More: full imgCIF CBF images on the multi-axis goniometer, one template"
          "per sweep (<prefix>_01_####.cbf, ...), omega scans at the goniometer's"
          "default settings of the other axes (kappa: kappa 0, 40, -40, ... and phi 0,"
          "120, 240, ...; three_circle: chi 0, 45, -45, ...; fixed_chi: phi 0, 120, 240,"
          "...). Each sweep scope makes one sweep instead."
goniometer = *kappa three_circle fixed_chi
  .type = choice
  .help = "The multi-axis goniometer of several sweeps: kappa (omega, kappa on a 50 degree"
          "arm, phi), three_circle (omega, chi about the beam, phi) or fixed_chi (omega,"
          "phi inclined 54.7 degrees, as Diamond I19's)."
sweep
  .multiple = True
  .help = "One sweep of several, in order (implies full CBF files). Values left out are"
          "the top-level ones (n_images, first_image, osc_start, osc_width)."
{
  scan_axis = omega
    .type = str
    .help = "The axis scanned: omega, kappa, phi or chi (as the goniometer has them)."
  angles = None
    .type = strings
    .help = "Fixed angles of the other axes, axis:degrees, e.g. kappa:40,phi:120 (axes"
            "not given at 0)."
  n_images = None
    .type = int(value_min=1)
  first_image = None
    .type = int(value_min=0)
  osc_start = None
    .type = float
    .help = "Start angle of the scan axis (degrees)."
  osc_width = None
    .type = float(value_min=0.001)
  omit = None
    .type = strings
    .help = "Images of this sweep not written, as the top-level omit."
  bad_images = None
    .type = strings
    .help = "Bad images of this sweep, as the top-level bad_images."
  prefix = None
    .type = str
    .help = "File name prefix of this sweep (default <prefix>_<sweep number, 2 digits>)."
}
electron = False
  .type = bool
  .help = "An electron-diffraction sweep (SMV, TimePix_SU header) instead of X-ray"
          "Pilatus images. Parameters left at their default value take the electron"
          "defaults: n_images 240, osc_start -48, osc_width 0.4, distance (camera"
          "length) 530 mm, wavelength 0.0251 A, unit_cell 7.53,11.15,13.91,90,92.9,90,"
          "space_group P121/n1, mosaicity 0.15, wilson_b 3, intensity_scale 400,"
          "prefix ed (files ed_00001.img, ...). The detector is ed.detector's; bad"
          "images as for X-rays (garbage breaks the SMV file; after truncated and corrupt"
          "it still reads, with panels of zeros or random counts)."
ed {
  tracking = *missing defocused none
    .type = choice
    .help = "Crystal-tracking frames (electron=True): missing (no file), defocused (the"
            "defocused direct beam, no Bragg spots) or none (no tracking)."
  tracking_every = 20
    .type = int(value_min=2)
    .help = "Every n-th frame (n, 2n, ... counted from the first) is a tracking frame."
  detector = *timepix512 timepix516
    .type = choice
    .help = "timepix512: 512 x 512 raw (four chips with wide edge pixels; dxtbx"
            "FormatSMVTimePix_SU_512x512, four panels). timepix516: the wide pixels"
            "split, 516 x 516 (FormatSMVTimePix_SU_516x516, one panel)."
}
output {
  directory = simulated
    .type = path
    .help = "Folder for the images and ground_truth.json"
}
"""


def _parse_ranges(values):
    """``["41:45,81"]`` -> [41, 42, 43, 44, 45, 81]: image numbers of first:last
    ranges and single numbers (the simulator's own reading, so that it does not
    depend on the pipeline's)."""
    import re

    out = []
    for value in values or []:
        for token in str(value).replace(" ", ",").split(","):
            if not token:
                continue
            m = re.fullmatch(r"(\d+)(?::(\d+))?", token)
            if not m:
                raise ValueError(
                    f"omit: cannot read {token!r}: give image numbers and first:last ranges "
                    "separated by commas, e.g. omit=41:45,81"
                )
            first = int(m.group(1))
            last = int(m.group(2)) if m.group(2) else first
            if last < first:
                raise ValueError(f"omit: range {token!r} is empty: write first:last with first <= last")
            out.extend(range(first, last + 1))
    return out


def _parse_bad(values):
    bad = {}
    for value in values or []:
        for token in str(value).split(","):
            if not token:
                continue
            image, _, mode = token.partition(":")
            try:
                bad[int(image)] = mode
            except ValueError:
                raise ValueError(f"bad_images: cannot read {token!r}: give image:mode pairs separated "
                                 "by commas, e.g. bad_images=50:blank,60:zero") from None
    return bad


def _parse_angles(values):
    angles = {}
    for value in values or []:
        for token in str(value).split(","):
            if not token:
                continue
            axis, sep, angle = token.partition(":")
            if not sep:
                raise ValueError(f"sweep angles: {token!r} is not axis:degrees")
            try:
                angles[axis.strip().lower()] = float(angle)
            except ValueError:
                raise ValueError(f"sweep angles: cannot read {token!r}: give axis:degrees pairs, "
                                 "e.g. angles=kappa:40,phi:120") from None
    return angles


def multisweep_config_from_params(params):
    """The MultiSweepConfig of sweeps=N or the sweep scopes (None for one plain sweep)."""
    from dials_gapfill.simulation.multisweep import MultiSweepConfig, SweepConfig

    if params.sweeps == 1 and not params.sweep:
        return None
    base = config_from_params(params)
    if params.omit or params.bad_images:
        raise ValueError(
            "several sweeps: give omit= and bad_images= inside each sweep scope "
            "(sweep { omit=... }), not at the top"
        )
    sweeps = ()
    if params.sweep:
        if params.sweeps not in (1, len(params.sweep)):
            raise ValueError(f"sweeps={params.sweeps} but {len(params.sweep)} sweep scopes")
        sweeps = tuple(
            SweepConfig(
                scan_axis=s.scan_axis,
                angles=_parse_angles(s.angles),
                n_images=s.n_images,
                first_image=s.first_image,
                osc_start=s.osc_start,
                osc_width=s.osc_width,
                omit=_parse_ranges(s.omit),
                bad_images=_parse_bad(s.bad_images),
                prefix=s.prefix,
            )
            for s in params.sweep
        )
    return MultiSweepConfig(base=base, goniometer=params.goniometer, sweeps=sweeps, n_sweeps=params.sweeps)


# parameters whose X-ray default gives way to the electron default
ED_DEFAULTED = ("n_images", "osc_start", "osc_width", "unit_cell", "space_group", "distance",
                "wavelength", "mosaicity", "intensity_scale", "wilson_b", "prefix")


def ed_config_from_params(params, given_names=None):
    """The EDSimulationConfig of electron=True: parameters not given (the
    names in given_names; without it, those at their X-ray default) take
    the electron defaults."""
    import iotbx.phil

    from dials_gapfill.simulation.electron import EDSimulationConfig

    defaults = iotbx.phil.parse(phil_str).extract()
    given = {}
    for name in ED_DEFAULTED:
        value = getattr(params, name)
        if (name in given_names) if given_names is not None else value != getattr(defaults, name):
            given[name] = tuple(value) if name == "unit_cell" else value
    return EDSimulationConfig(
        first_image=params.first_image,
        omit=_parse_ranges(params.omit),
        bad_images=_parse_bad(params.bad_images),
        seed=params.seed,
        drift=params.drift,
        drift_acceleration=params.drift_acceleration,
        detector=params.ed.detector,
        tracking=params.ed.tracking or "none",  # (PHIL reads the choice "none" as None)
        tracking_every=params.ed.tracking_every,
        **given,
    )


def config_from_params(params):
    from dials_gapfill.simulation.simulate import SimulationConfig

    return SimulationConfig(
        n_images=params.n_images,
        first_image=params.first_image,
        osc_start=params.osc_start,
        osc_width=params.osc_width,
        omit=_parse_ranges(params.omit),
        bad_images=_parse_bad(params.bad_images),
        seed=params.seed,
        unit_cell=tuple(params.unit_cell),
        space_group=params.space_group,
        detector=params.detector,
        distance=params.distance,
        wavelength=params.wavelength,
        mosaicity=params.mosaicity,
        drift=params.drift,
        drift_acceleration=params.drift_acceleration,
        scan_end_tails=params.scan_end_tails,
        intensity_scale=params.intensity_scale,
        wilson_b=params.wilson_b,
        prefix=params.prefix,
    )


def _run_electron(params, given_names=None):
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.simulation.electron import simulate_ed

    if params.sweeps != 1 or params.sweep:
        raise GapfillError("electron=True writes one sweep: leave out sweeps= and sweep scopes")
    if params.format == "nexus":
        raise GapfillError("electron=True writes SMV files (TimePix_SU): leave out format=nexus")
    if given_names is not None and "detector" in given_names:
        raise GapfillError(f"electron=True takes its detector from ed.detector (timepix512 or timepix516): "
                           f"leave out detector={params.detector}")
    try:
        config = ed_config_from_params(params, given_names)
    except (ValueError, KeyError) as e:
        raise GapfillError(str(e)) from None
    _check_empty(params.output.directory)
    truth = simulate_ed(config, params.output.directory)
    tracking = truth["tracking"]
    print(
        f"Wrote {len(truth['images_written'])} frames ({truth['format_class']}, "
        f"{config.wavelength:g} A, camera length {config.distance:g} mm, d_min {truth['d_min']:.2f} A, "
        f"{truth['n_predicted']} reflections; {len(tracking['frames'])} tracking frames "
        f"{tracking['mode']}) and ground_truth.json to {params.output.directory}"
    )
    return 0


IMAGE_EXTENSIONS = (".cbf", ".img", ".h5", ".nxs")


def _check_empty(directory):
    """Refuse a folder that holds a simulated sweep or images: files of an
    earlier run would join the new sweep (an image omitted now, written
    before, would fill the gap in the truth's place)."""
    import os

    from dials_gapfill.errors import GapfillError

    if not os.path.isdir(directory):
        return
    names = os.listdir(directory)
    images = sorted(n for n in names if n.endswith(IMAGE_EXTENSIONS))
    held = (["ground_truth.json"] if "ground_truth.json" in names else []) + (
        [f"{len(images)} image files ({images[0]}, ...)" if len(images) > 1 else images[0]] if images else [])
    if held:
        raise GapfillError(
            f"output.directory {directory} already holds {' and '.join(held)}: give a new "
            "output.directory, or delete that folder first"
        )


def _sweep_scopes(args):
    """(other arguments, parsed "sweep { ... }" arguments)."""
    import re

    import iotbx.phil

    rest, scopes = [], []
    for arg in args:
        if re.match(r"\s*sweep\s*\{", arg):
            scopes.append(iotbx.phil.parse(arg))
        else:
            rest.append(arg)
    return rest, scopes


def run(args=None):
    from dials_gapfill.errors import GapfillError, require_dials

    try:
        require_dials()
        import iotbx.phil

        from dials.util.options import ArgumentParser

        from dials_gapfill.simulation.simulate import simulate

        phil = iotbx.phil.parse(phil_str)
        parser = ArgumentParser(
            usage=f"{PROGRAM} [options] [param.phil]",
            phil=phil,
            epilog=__doc__,
        )
        args, scopes = _sweep_scopes(sys.argv[1:] if args is None else list(args))
        if "--version" in args:
            from dials.util.version import dials_version

            from dials_gapfill import __version__

            print(dials_version())
            print(f"dials-gapfill {__version__}")
            return 0
        try:
            params, options = parser.parse_args(args=args, show_diff_phil=False)
            if scopes:
                # "sweep { ... }" arguments, read as a phil file would be: on the command
                # line each assignment of a multiple scope would make a sweep of its own
                params = phil.fetch(sources=[parser.phil, *scopes]).extract()
        except (RuntimeError, ValueError) as e:  # (PHIL's type and range checks)
            raise GapfillError(f"{' '.join(str(e).split())}: check the value") from None
        if params.electron:
            # the names the user gave, on the command line or in a phil file (a
            # value equal to the X-ray default included)
            interpreter = phil.command_line_argument_interpreter()
            given = set()
            for arg in args:
                with contextlib.suppress(Exception):  # (not a parameter: DIALS said so above)
                    if os.path.isfile(arg):
                        given |= {d.path for d in iotbx.phil.parse(file_name=arg).all_definitions()}
                    else:
                        given |= {d.path for d in interpreter.process_arg(arg=arg).all_definitions()}
            return _run_electron(params, given)
        try:
            config = config_from_params(params)
            multi = multisweep_config_from_params(params)
        except (ValueError, KeyError) as e:
            raise GapfillError(str(e)) from None
        _check_empty(params.output.directory)
        if multi is not None:
            from dials_gapfill.simulation.multisweep import simulate_sweeps

            if params.format == "nexus":
                raise GapfillError(
                    "several sweeps are written as CBF files only: leave out format=nexus (or simulate "
                    "each sweep as its own NeXus file, one run per sweep with its own osc_start and prefix)"
                )
            truth = simulate_sweeps(multi, params.output.directory)
            print(
                f"Wrote {len(truth['sweeps'])} sweeps, {len(truth['files'])} images "
                f"({truth['format_class']}, {multi.goniometer} goniometer, d_min "
                f"{truth['d_min']:.2f} A, {truth['n_predicted']} reflections) and "
                f"ground_truth.json to {params.output.directory}"
            )
            for s in truth["sweeps"]:
                others = ", ".join(f"{a} {v:g}" for a, v in s["angles"].items() if a != s["scan_axis"])
                print(
                    f"  {s['template']}: {s['scan_axis']} scan from {s['oscillation'][0]:g} deg, "
                    f"images {s['image_range'][0]}-{s['image_range'][1]} "
                    f"({len(s['images_written'])} written){'; ' + others if others else ''}"
                )
            return 0
        if params.format == "nexus":
            from dials_gapfill.simulation.nexus_writer import FILE_MODES, simulate_nexus

            if config.omit:
                raise GapfillError(
                    "format=nexus: a NeXus sweep cannot have holes, so omit= is not "
                    "possible: leave omit out and make the gaps with "
                    "gaps.exclude_images= when processing"
                )
            if config.first_image != 1:
                raise GapfillError(
                    "format=nexus: dxtbx numbers the images of a NeXus file from 1: "
                    "leave first_image=1"
                )
            bad = sorted(i for i, m in config.bad_images.items() if m not in FILE_MODES)
            if bad:
                raise GapfillError(
                    f"format=nexus: bad image mode {config.bad_images[bad[0]]} (image "
                    f"{bad[0]}) breaks a file, which one NeXus file cannot do per image: "
                    f"use {', '.join(FILE_MODES)} (or format=cbf)"
                )
            truth = simulate_nexus(config, params.output.directory)
        else:
            truth = simulate(config, params.output.directory)
        print(
            f"Wrote {len(truth['images_written'])} images ({truth['format_class']}, "
            f"d_min {truth['d_min']:.2f} A, {truth['n_predicted']} reflections) and "
            f"ground_truth.json to {params.output.directory}"
        )
        return 0
    except GapfillError as e:
        print(f"{PROGRAM}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        from dials.util import Sorry

        if isinstance(e, Sorry):
            print(f"{PROGRAM}: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(run())
