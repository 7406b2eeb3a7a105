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
"""

from __future__ import annotations

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
          "random bytes), e.g. 50:blank,60:zero"
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
output {
  directory = simulated
    .type = path
    .help = "Folder for the images and ground_truth.json"
}
"""


def _parse_ranges(values):
    from dials_gapfill.stages.importer import parse_exclusions

    out = []
    for first, last in parse_exclusions(values):
        out.extend(range(first, last + 1))
    return out


def _parse_bad(values):
    bad = {}
    for value in values or []:
        for token in str(value).split(","):
            if not token:
                continue
            image, _, mode = token.partition(":")
            bad[int(image)] = mode
    return bad


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
        intensity_scale=params.intensity_scale,
        wilson_b=params.wilson_b,
        prefix=params.prefix,
    )


def run(args=None):
    from dials_gapfill.errors import GapfillError, require_dials

    try:
        require_dials()
        import iotbx.phil

        from dials.util.options import ArgumentParser

        from dials_gapfill.simulation.simulate import simulate

        parser = ArgumentParser(
            usage=f"{PROGRAM} [options] [param.phil]",
            phil=iotbx.phil.parse(phil_str),
            epilog=__doc__,
        )
        params, options = parser.parse_args(args=args, show_diff_phil=False)
        try:
            config = config_from_params(params)
        except (ValueError, KeyError) as e:
            raise GapfillError(str(e)) from None
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
