"""Several sweeps of one crystal on a multi-axis goniometer, as full imgCIF CBF files.

Real small-molecule and many macromolecular data sets are several sweeps of
one crystal at different goniometer settings (kappa/chi/phi, or phi on a
fixed-chi goniometer), each sweep a scan about one axis with the others
fixed.  This module writes such data sets: one template per sweep
(``<prefix>_01_####.cbf``, ``<prefix>_02_####.cbf``, ...) in one folder, and
one ``ground_truth.json`` for all of them.

Format: full imgCIF CBF with an axis table, as the Pilatus files of Diamond's
I19 (a PILATUS miniCBF header followed by the imgCIF categories ``axis``,
``diffrn_scan_axis``, ``diffrn_scan_frame_axis``, ...).  dxtbx reads them
with ``FormatCBFFullPilatus``, which builds a ``MultiAxisGoniometer`` from the
axis table (its ``imgCIF_H``: the axis with a non-zero angle increment is the
scan axis, the others give the fixed and setting rotations), so each sweep
has its own setting exactly as in real data.  NeXus was not chosen: an NXmx
file cannot leave single images out, and dxtbx' miniCBF readers know one axis
only.

Geometry and truth follow the single-sweep simulator: every sweep's beam,
detector and goniometer are read back with dxtbx from a template file before
anything is predicted, and reflections are predicted with DIALS' own
scan-varying predictor, which applies the setting rotation S and the fixed
rotation F: a reflection of the crystal whose setting matrix at the goniometer
datum (all axes at zero) is A = U B is at S R(axis, phi) F A h in the
laboratory frame.

One crystal: U0 (at the goniometer datum), the cell, the true intensities
(one list: the same Miller index has the same intensity in every sweep) and
the drift are those of ``SimulationConfig.seed`` etc., as in a single sweep.
The drift goes on through the sweeps in the order they are listed: in sweep
k, U(phi) = R(drift_axis, drift_angle(t)) U0 with t the degrees of scan
since the start of the first sweep (the scan degrees of the sweeps before k
plus phi - osc_start of sweep k), in the goniometer-datum frame.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import numpy as np

from dials_gapfill.simulation.compare import sweep_truth  # noqa: F401  (one sweep of the truth)
from dials_gapfill.simulation.simulate import (
    BAD_MODES,
    COUNT_CUTOFF,
    PILATUS_MODULES,
    Simulation,
    SimulationConfig,
    _write_atomic,
    angle_text,
    cbf_binary_section,
    pilatus_gap_mask,
)

# Goniometers as axis tables, from the base to the crystal (the imgCIF
# depends_on chain: each axis is carried by the one before it), vectors in
# the imgCIF laboratory frame at the datum.
GONIOMETERS = {
    # omega / kappa / phi, kappa arm at 50 degrees (as dxtbx' kappa goniometer, direction -y)
    "kappa": (
        ("omega", (1.0, 0.0, 0.0)),
        ("kappa", (0.64278761, -0.76604444, 0.0)),
        ("phi", (1.0, 0.0, 0.0)),
    ),
    # Eulerian cradle: chi about the beam at omega = 0
    "three_circle": (
        ("omega", (1.0, 0.0, 0.0)),
        ("chi", (0.0, 0.0, 1.0)),
        ("phi", (1.0, 0.0, 0.0)),
    ),
    # fixed chi (54.7 degrees), as Diamond I19's: phi inclined to omega
    "fixed_chi": (
        ("omega", (1.0, 0.0, 0.0)),
        ("phi", (0.5774, -0.8165, 0.0)),
    ),
}

# Settings of the default sweeps (all omega scans): sweep k takes the k-th
# value of each axis, cycling; the omega start is the config's osc_start.
DEFAULT_SETTINGS = {
    "kappa": {"kappa": (0.0, 40.0, -40.0, 60.0, -60.0, 20.0), "phi": (0.0, 120.0, 240.0, 60.0, 180.0, 300.0)},
    "three_circle": {"chi": (0.0, 45.0, -45.0, 90.0, 20.0, -20.0), "phi": (0.0, 120.0, 240.0, 60.0, 180.0, 300.0)},
    "fixed_chi": {"phi": (0.0, 120.0, 240.0, 60.0, 180.0, 300.0)},
}


def goniometer_axes(goniometer) -> tuple:
    """((name, (x, y, z)), ...) base to crystal, of a preset name or an axis table."""
    if isinstance(goniometer, str):
        try:
            return GONIOMETERS[goniometer]
        except KeyError:
            raise ValueError(
                f"unknown goniometer {goniometer!r}: choose one of {', '.join(GONIOMETERS)} "
                "or give the axes"
            ) from None
    axes = tuple((str(name).lower(), tuple(float(v) for v in vector)) for name, vector in goniometer)
    if not axes or len({name for name, _ in axes}) != len(axes):
        raise ValueError("goniometer: give at least one axis, each name once")
    for name, vector in axes:
        if len(vector) != 3 or np.linalg.norm(vector) < 1e-6:
            raise ValueError(f"goniometer axis {name}: a vector of 3 numbers, not zero")
    return axes


@dataclass
class SweepConfig:
    """One sweep: the scan axis, the fixed angles of the other axes, the scan
    and its images.  None takes the value of the crystal's SimulationConfig."""

    scan_axis: str = "omega"
    angles: dict = field(default_factory=dict)  # axis name -> degrees; missing axes at 0
    osc_start: float | None = None
    osc_width: float | None = None
    n_images: int | None = None
    first_image: int | None = None
    prefix: str | None = None  # None: <base prefix>_<sweep number, 2 digits>
    omit: tuple = ()
    bad_images: dict = field(default_factory=dict)  # image number -> mode

    def __post_init__(self):
        self.scan_axis = str(self.scan_axis).lower()
        self.angles = {str(k).lower(): float(v) for k, v in dict(self.angles).items()}
        self.omit = tuple(sorted({int(i) for i in self.omit}))
        self.bad_images = {int(k): str(v) for k, v in dict(self.bad_images).items()}


@dataclass
class MultiSweepConfig:
    """Several sweeps of the crystal of `base` on a multi-axis goniometer.

    `base`: crystal, beam, detector, noise and the scan defaults of every
    sweep (its n_images, osc_start, osc_width, first_image; omit and
    bad_images must be empty: each sweep has its own).  `sweeps`: SweepConfig
    (or dicts of its fields), or () for `n_sweeps` default settings
    (``DEFAULT_SETTINGS``).  `goniometer`: a name of ``GONIOMETERS`` or an
    axis table ((name, (x, y, z)), ...) from the base to the crystal.
    """

    base: SimulationConfig = field(default_factory=SimulationConfig)
    goniometer: object = "kappa"
    sweeps: tuple = ()
    n_sweeps: int = 3

    def __post_init__(self):
        if isinstance(self.base, dict):
            self.base = SimulationConfig(**self.base)
        if self.base.detector not in PILATUS_MODULES:
            raise ValueError("several sweeps are written as Pilatus full CBF: choose a Pilatus detector")
        if self.base.omit or self.base.bad_images:
            raise ValueError("several sweeps: give omit and bad_images per sweep (SweepConfig), not in base")
        self.axes = goniometer_axes(self.goniometer)
        if not isinstance(self.goniometer, str):
            self.goniometer = tuple((name, tuple(vector)) for name, vector in self.axes)
        sweeps = tuple(s if isinstance(s, SweepConfig) else SweepConfig(**s) for s in self.sweeps)
        if not sweeps:
            if self.n_sweeps < 1:
                raise ValueError("n_sweeps must be >= 1")
            sweeps = default_sweeps(self.n_sweeps, self.goniometer)
        self.sweeps = sweeps
        self.n_sweeps = len(sweeps)
        names = [name for name, _ in self.axes]
        prefixes = set()
        for k, sweep in enumerate(self.sweeps, start=1):
            if sweep.scan_axis not in names:
                raise ValueError(f"sweep {k}: scan axis {sweep.scan_axis!r} is not one of {', '.join(names)}")
            unknown = sorted(set(sweep.angles) - set(names))
            if unknown:
                raise ValueError(f"sweep {k}: axis {unknown[0]!r} is not one of {', '.join(names)}")
            for image, mode in sweep.bad_images.items():
                if mode not in BAD_MODES:
                    raise ValueError(
                        f"sweep {k}: bad image mode {mode!r} for image {image}: choose one of {', '.join(BAD_MODES)}"
                    )
            prefix = self.sweep_config(k).prefix
            if prefix in prefixes:
                raise ValueError(f"sweep {k}: prefix {prefix!r} is used by another sweep")
            prefixes.add(prefix)

    def sweep_config(self, k: int) -> SimulationConfig:
        """The SimulationConfig of sweep k (1-based): the base with this sweep's scan."""
        sweep = self.sweeps[k - 1]
        b = self.base

        def pick(value, default):
            return default if value is None else value

        return dataclasses.replace(
            b,
            n_images=pick(sweep.n_images, b.n_images),
            first_image=pick(sweep.first_image, b.first_image),
            osc_start=pick(sweep.osc_start, b.osc_start),
            osc_width=pick(sweep.osc_width, b.osc_width),
            prefix=pick(sweep.prefix, f"{b.prefix}_{k:02d}"),
            omit=sweep.omit,
            bad_images=dict(sweep.bad_images),
        )

    def as_dict(self) -> dict:
        return {
            "base": self.base.as_dict(),
            "goniometer": self.goniometer if isinstance(self.goniometer, str) else [[n, list(v)] for n, v in self.axes],
            "axes": [[n, list(v)] for n, v in self.axes],
            "sweeps": [
                {**dataclasses.asdict(s), "bad_images": {str(i): m for i, m in s.bad_images.items()}}
                for s in self.sweeps
            ],
        }


def default_sweeps(n: int, goniometer="kappa") -> tuple:
    """n omega scans at different settings of the other axes (DEFAULT_SETTINGS
    for a preset; for an explicit axis table, phi-like steps of 360/n degrees
    on the innermost axis)."""
    if isinstance(goniometer, str) and goniometer in DEFAULT_SETTINGS:
        settings = DEFAULT_SETTINGS[goniometer]
        scan = "omega"
    else:
        axes = goniometer_axes(goniometer)
        scan = axes[0][0]
        settings = {axes[-1][0]: tuple(k * 360.0 / n for k in range(n))} if len(axes) > 1 else {}
    return tuple(
        SweepConfig(scan_axis=scan, angles={axis: values[k % len(values)] for axis, values in settings.items()})
        for k in range(n)
    )


# --------------------------------------------------------------------------
# Full imgCIF CBF (Pilatus)
# --------------------------------------------------------------------------


def _cbf_id(name: str) -> str:
    return f"GON_{name.upper()}"


def _epoch_text(seconds: float) -> str:
    whole = int(seconds)
    millis = int(round((seconds - whole) * 1000))
    if millis == 1000:
        whole, millis = whole + 1, 0
    h, rem = divmod(whole, 3600)
    m, s = divmod(rem, 60)
    return f"2026-01-01T{h:02d}:{m:02d}:{s:02d}.{millis:03d}"


@dataclass
class _SweepContext:
    index: int  # 1-based
    drift_start: float  # degrees of scan before this sweep
    time_start: float  # seconds from the first image of the first sweep


class FullCBFPilatus:
    """Writes one sweep's images as full imgCIF CBF files (PILATUS convention,
    read by dxtbx' FormatCBFFullPilatus) with the goniometer axis table."""

    def __init__(self, axes, scan_axis: str, angles: dict, time_start: float = 0.0):
        self.axes = tuple(axes)
        self.scan_axis = scan_axis
        self.angles = {name: float(angles.get(name, 0.0)) for name, _ in self.axes}
        self.time_start = time_start

    # ------------------------------------------------------------ Simulation hooks
    def gap_mask(self, config):
        nx, ny = config.image_size
        return pilatus_gap_mask(nx, ny)

    @staticmethod
    def panel_offsets(detector):
        return [(0.0, 0.0)] * len(detector)

    @staticmethod
    def binary_span(payload: bytes) -> tuple[int, int]:
        start = payload.find(b"\x0c\x1a\x04\xd5") + 4
        end = payload.rfind(b"\r\n--CIF-BINARY-FORMAT-SECTION----")
        return start, end

    def encode(self, config, image: int, data, name: str) -> bytes:
        text = (
            "###CBF: VERSION 1.5, CBFlib v0.7.8 - PILATUS detectors\r\n\r\n"
            f"data_{name}\r\n\r\n"
            '_array_data.header_convention "PILATUS_1.2"\r\n'
            "_array_data.header_contents\r\n;\r\n"
            f"{self.mini_header(config, image)};\r\n\r\n"
            f"{self.imgcif_text(config, image)}"
            "_array_data.data\r\n;\r\n"
        )
        return text.encode("ascii") + cbf_binary_section(data)

    # ------------------------------------------------------------ the header
    def angle(self, config, image: int, axis: str) -> float:
        """Angle of `axis` at the start of `image`."""
        if axis == self.scan_axis:
            return config.osc_start + (image - config.first_image) * config.osc_width
        return self.angles[axis]

    def _time(self, config, image: int) -> float:
        return self.time_start + (image - config.first_image) * config.exposure_time

    def mini_header(self, config, image: int) -> str:
        bx, by = config.beam_centre
        energy = 12398.4193 / config.wavelength
        label = config.detector.upper().replace("PILATUS", "PILATUS ")
        lines = [
            f"# Detector: {label}, S/N 60-0000",
            f"# {_epoch_text(self._time(config, image))}",
            "# Pixel_size 172e-6 m x 172e-6 m",
            "# Silicon sensor, thickness 0.000450 m",
            f"# Exposure_time {config.exposure_time:.7f} s",
            f"# Exposure_period {config.exposure_time:.7f} s",
            "# Tau = 0 s",
            f"# Count_cutoff {COUNT_CUTOFF} counts",
            f"# Threshold_setting: {energy / 2:.0f} eV",
            "# Gain_setting: autog (vrf = 1.000)",
            "# N_excluded_pixels = 0",
            "# Excluded_pixels: badpix_mask.tif",
            "# Flat_field: (nil)",
            "# Trim_file: (nil)",
            "# Image_path: /simulated/",
            f"# Wavelength {config.wavelength:.5f} A",
            f"# Detector_distance {config.distance / 1000.0:.5f} m",
            f"# Beam_xy ({bx:.2f}, {by:.2f}) pixels",
            "# Flux 0.000000",
            "# Filter_transmission 1.0000",
            f"# Start_angle {angle_text(self.angle(config, image, self.scan_axis))} deg.",
            f"# Angle_increment {angle_text(config.osc_width)} deg.",
            "# Detector_2theta 0.0000 deg.",
            "# Polarization 0.990",
            "# Alpha 0.0000 deg.",
        ]
        for name, _ in self.axes:
            increment = config.osc_width if name == self.scan_axis else 0.0
            label = name.capitalize()
            lines.append(f"# {label} {angle_text(self.angle(config, image, name))} deg.")
            lines.append(f"# {label}_increment {angle_text(increment)} deg.")
        lines += [f"# Oscillation_axis {self.scan_axis.upper()}", "# N_oscillations 1"]
        return "".join(line + "\r\n" for line in lines)

    def imgcif_text(self, config, image: int) -> str:
        nx, ny = config.image_size
        bx, by = config.beam_centre
        pixel = 0.172
        distance = config.distance
        frame_start = {name: self.angle(config, image, name) for name, _ in self.axes}
        rows = []

        def loop(*items, values):
            rows.append("loop_")
            rows.extend(items)
            rows.extend(values)
            rows.append("")

        rows += ["_diffrn.id SIM", "_diffrn.crystal_id xtal001", ""]
        loop("_diffrn_source.diffrn_id", "_diffrn_source.source", "_diffrn_source.type",
             values=["SIM synchrotron 'dials-gapfill simulator'"])
        loop("_diffrn_radiation.diffrn_id", "_diffrn_radiation.wavelength_id",
             "_diffrn_radiation.monochromator", "_diffrn_radiation.polarizn_source_ratio",
             "_diffrn_radiation.polarizn_source_norm", "_diffrn_radiation.div_x_source",
             "_diffrn_radiation.div_y_source", "_diffrn_radiation.div_x_y_source",
             values=["SIM WAVELENGTH1 'Si 111' 0.99 0.0 0.0 0.0 0.00"])
        loop("_diffrn_radiation_wavelength.id", "_diffrn_radiation_wavelength.wavelength",
             "_diffrn_radiation_wavelength.wt", values=[f"WAVELENGTH1 {config.wavelength:.6f} 1"])
        loop("_diffrn_detector.diffrn_id", "_diffrn_detector.id", "_diffrn_detector.type",
             "_diffrn_detector.number_of_axes", values=["SIM DETECTOR 'Pilatus' 4"])
        loop("_diffrn_detector_axis.detector_id", "_diffrn_detector_axis.axis_id",
             values=[f"DETECTOR {a}" for a in ("DET_2THETA", "DET_X", "DET_Y", "DET_Z")])
        loop("_diffrn_detector_element.id", "_diffrn_detector_element.detector_id",
             values=["ELEMENT1 DETECTOR"])
        loop("_diffrn_data_frame.id", "_diffrn_data_frame.detector_element_id",
             "_diffrn_data_frame.array_id", "_diffrn_data_frame.binary_id",
             values=["FRAME1 ELEMENT1 ARRAY1 1"])
        loop("_diffrn_scan.id", "_diffrn_scan.frame_id_start", "_diffrn_scan.frame_id_end",
             "_diffrn_scan.frames", values=["SCAN1 FRAME1 FRAME1 1"])
        loop("_diffrn_measurement.diffrn_id", "_diffrn_measurement.id",
             "_diffrn_measurement.number_of_axes", "_diffrn_measurement.method",
             "_diffrn_measurement.sample_detector_distance",
             values=[f"SIM GONIOMETER {len(self.axes)} rotation {distance:.2f}"])
        loop("_diffrn_measurement_axis.measurement_id", "_diffrn_measurement_axis.axis_id",
             values=[f"GONIOMETER {_cbf_id(name)}" for name, _ in self.axes])
        scan_rows = []
        for name, _ in self.axes:
            width = config.osc_width if name == self.scan_axis else 0.0
            scan_rows.append(
                f"SCAN1 {_cbf_id(name)} {angle_text(frame_start[name])} {angle_text(width)} {angle_text(width)} "
                "0.0 0.0 0.0"
            )
        scan_rows += [
            "SCAN1 DET_2THETA 0.0000 0.0 0.0 0.0 0.0 0.0",
            f"SCAN1 DET_Z 0.0 0.0 0.0 {distance:.4f} 0.0 0.0",
            "SCAN1 DET_Y 0.0 0.0 0.0 0.0 0.0 0.0",
            "SCAN1 DET_X 0.0 0.0 0.0 0.0 0.0 0.0",
        ]
        loop("_diffrn_scan_axis.scan_id", "_diffrn_scan_axis.axis_id",
             "_diffrn_scan_axis.angle_start", "_diffrn_scan_axis.angle_range",
             "_diffrn_scan_axis.angle_increment", "_diffrn_scan_axis.displacement_start",
             "_diffrn_scan_axis.displacement_range", "_diffrn_scan_axis.displacement_increment",
             values=scan_rows)
        loop("_diffrn_scan_frame.frame_id", "_diffrn_scan_frame.frame_number",
             "_diffrn_scan_frame.integration_time", "_diffrn_scan_frame.exposure_time",
             "_diffrn_scan_frame.scan_id", "_diffrn_scan_frame.date",
             values=[(f"FRAME1 {image} {config.exposure_time:.6f} {config.exposure_time:.6f} SCAN1 "
                      f"{_epoch_text(self._time(config, image))}")])
        frame_rows = [f"FRAME1 {_cbf_id(name)} {angle_text(frame_start[name])} 0.0" for name, _ in self.axes]
        frame_rows += [
            "FRAME1 DET_2THETA 0.0000 0.0",
            f"FRAME1 DET_Z 0.0 {distance:.4f}",
            "FRAME1 DET_Y 0.0 0.0",
            "FRAME1 DET_X 0.0 0.0",
        ]
        loop("_diffrn_scan_frame_axis.frame_id", "_diffrn_scan_frame_axis.axis_id",
             "_diffrn_scan_frame_axis.angle", "_diffrn_scan_frame_axis.displacement",
             values=frame_rows)
        axis_rows = []
        parent = "."
        for name, vector in self.axes:
            v = " ".join(f"{c:.8g}" for c in vector)
            axis_rows.append(f"{_cbf_id(name)} rotation goniometer {parent} {v} . . .")
            parent = _cbf_id(name)
        # the element's origin: the corner of pixel (0, 0) (displacement 0 below: dxtbx takes
        # CBFlib's coordinates of pixel (0, 0) as the panel origin) at -(beam centre) along
        # fast (+x) and slow (-y), as dxtbx places a miniCBF's
        ox, oy = -bx * pixel, by * pixel
        axis_rows += [
            "SOURCE general source . 0 0 1 . . .",
            "GRAVITY general gravity . 0 -1 0 . . .",
            "DET_2THETA rotation detector . 1 0 0 . . .",
            "DET_Z translation detector DET_2THETA 0 0 -1 0 0 0",
            "DET_Y translation detector DET_Z 0 1 0 0 0 0",
            "DET_X translation detector DET_Y 1 0 0 0 0 0",
            f"ELEMENT_X translation detector DET_X 1 0 0 {ox:.6f} {oy:.6f} 0",
            "ELEMENT_Y translation detector ELEMENT_X 0 -1 0 0 0 0",
        ]
        loop("_axis.id", "_axis.type", "_axis.equipment", "_axis.depends_on",
             "_axis.vector[1] _axis.vector[2] _axis.vector[3]",
             "_axis.offset[1] _axis.offset[2] _axis.offset[3]", values=axis_rows)
        loop("_array_structure_list.array_id", "_array_structure_list.index",
             "_array_structure_list.dimension", "_array_structure_list.precedence",
             "_array_structure_list.direction", "_array_structure_list.axis_set_id",
             values=[f"ARRAY1 1 {nx} 1 increasing ELEMENT_X", f"ARRAY1 2 {ny} 2 increasing ELEMENT_Y"])
        loop("_array_structure_list_axis.axis_set_id", "_array_structure_list_axis.axis_id",
             "_array_structure_list_axis.displacement", "_array_structure_list_axis.displacement_increment",
             values=[f"ELEMENT_X ELEMENT_X 0.0 {pixel:.4f}", f"ELEMENT_Y ELEMENT_Y 0.0 {pixel:.4f}"])
        loop("_array_element_size.array_id", "_array_element_size.index", "_array_element_size.size",
             values=["ARRAY1 1 0.000172", "ARRAY1 2 0.000172"])
        loop("_array_intensities.array_id", "_array_intensities.binary_id",
             "_array_intensities.linearity", "_array_intensities.gain", "_array_intensities.gain_esd",
             "_array_intensities.overload", "_array_intensities.undefined_value",
             values=[f"ARRAY1 1 linear 1.0 . {COUNT_CUTOFF} -1"])
        loop("_array_structure.id", "_array_structure.encoding_type",
             "_array_structure.compression_type", "_array_structure.byte_order",
             values=['ARRAY1 "signed 32-bit integer" CBF_BYTE_OFFSET little_endian'])
        return "".join(row + "\r\n" for row in rows)


# --------------------------------------------------------------------------
# The simulation of several sweeps
# --------------------------------------------------------------------------


def _matrix(flat) -> list:
    return [round(float(v), 12) for v in flat]


class MultiSweepSimulation:
    """One Simulation per sweep, all of the same crystal."""

    def __init__(self, config: MultiSweepConfig):
        self.config = config
        self.sweeps = []
        drift_start = 0.0
        time_start = 0.0
        for k, sweep in enumerate(config.sweeps, start=1):
            c = config.sweep_config(k)
            fmt = FullCBFPilatus(config.axes, sweep.scan_axis, sweep.angles, time_start)
            context = _SweepContext(index=k, drift_start=drift_start, time_start=time_start)
            self.sweeps.append(Simulation(c, fmt=fmt, sweep=context))
            drift_start += c.n_images * c.osc_width
            time_start += c.n_images * c.exposure_time
        first = self.sweeps[0]
        for k, sim in enumerate(self.sweeps[1:], start=2):
            # the same crystal: the intensities depend on the seed and d_min only
            if sim.asu_indices != first.asu_indices or not np.array_equal(sim.true_I, first.true_I):
                raise RuntimeError(f"sweep {k} has other true intensities than sweep 1")

    def ground_truth(self) -> dict:
        """The truth of all sweeps: shared crystal and geometry at the top,
        each sweep's scan, goniometer setting and orientations under "sweeps"
        (``compare.sweep_truth`` gives one sweep in the single-sweep layout)."""
        c = self.config
        first = self.sweeps[0]
        truth = first.ground_truth()
        for key in ("config", "rotation_axis", "oscillation", "image_range", "images_written",
                    "omitted", "bad_images", "n_predicted", "orientation"):
            truth.pop(key, None)
        truth["format"] = "dials-gapfill simulated sweeps, version 1"
        truth["config"] = c.as_dict()
        truth["goniometer"] = {
            "comment": "axes from the base to the crystal (imgCIF depends_on order), vectors at "
            "the datum; dxtbx' MultiAxisGoniometer lists them the other way round",
            "names": [name for name, _ in c.axes],
            "axes": [list(v) for _, v in c.axes],
        }
        truth["drift"]["comment"] = (
            "U(t) = R(axis, drift * t + acceleration * t**2) U0 at the goniometer datum, t the "
            "degrees of scan since the start of the first sweep (sweeps in the order listed)"
        )
        truth["orientation"] = {
            "comment": "U0: the crystal at the goniometer datum (all axes at 0) before any drift; "
            "B as in A = U B",
            "U0": _matrix(first.U_at_scan_points[0].ravel()),
            "B": list(np.round(np.array(first.crystal.get_B()), 12)),
        }
        truth["sweeps"] = [self._sweep_truth(sim) for sim in self.sweeps]
        truth["n_predicted"] = sum(s["n_predicted"] for s in truth["sweeps"])
        return truth

    def _sweep_truth(self, sim) -> dict:
        c = sim.config
        g = sim.goniometer
        fmt = sim.fmt
        t = sim.ground_truth()
        names = [name for name, _ in self.config.axes]
        return {
            "sweep": sim.sweep.index,
            "prefix": c.prefix,
            "template": f"{c.prefix}_{'#' * c.digits}.cbf",
            "scan_axis": fmt.scan_axis,
            "angles": {name: fmt.angle(c, c.first_image, name) for name in names},
            "comment": "lab frame: S R(rotation_axis, phi) F U B, S setting_rotation, F fixed_rotation "
            "(as dxtbx reads them), U the crystal at the goniometer datum",
            "rotation_axis": list(g.get_rotation_axis_datum()),
            "setting_rotation": _matrix(g.get_setting_rotation()),
            "fixed_rotation": _matrix(g.get_fixed_rotation()),
            "oscillation": t["oscillation"],
            "image_range": t["image_range"],
            "images_written": t["images_written"],
            "omitted": t["omitted"],
            "bad_images": t["bad_images"],
            "n_predicted": t["n_predicted"],
            "drift_start_deg": sim.sweep.drift_start,
            "time_start_s": sim.sweep.time_start,
            "orientation": {
                "comment": "U (goniometer datum frame) at the scan points of this sweep: the start "
                "of each image and the end of the last, phi = osc_start + k * osc_width",
                "phi": t["orientation"]["phi"],
                "U": t["orientation"]["U"],
                "B": t["orientation"]["B"],
            },
        }


def simulate_sweeps(config: MultiSweepConfig, directory: str) -> dict:
    """Write the images of every sweep of `config` into `directory` and
    ground_truth.json for all of them; return the ground truth.

    Files are written to temporary names and renamed, as ``simulate``'s.
    """
    os.makedirs(directory, exist_ok=True)
    msim = MultiSweepSimulation(config)
    truth = msim.ground_truth()
    files = []
    for sim, s in zip(msim.sweeps, truth["sweeps"]):
        names = []
        for image in s["images_written"]:
            name = sim.config.filename(image)
            _write_atomic(os.path.join(directory, name), sim.image_bytes(image))
            names.append(name)
        s["files"] = names
        files += names
    truth["files"] = files
    tmp = os.path.join(directory, f".ground_truth.json.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(truth, fh, separators=(",", ":"))
    os.replace(tmp, os.path.join(directory, "ground_truth.json"))
    return truth


def lab_setting_matrix(sweep: dict, phi: float, U) -> np.ndarray:
    """S R(axis, phi) F U B of one sweep's truth (numpy 3x3), phi in degrees."""
    from dials_gapfill.simulation.simulate import rotation

    S = np.array(sweep["setting_rotation"]).reshape(3, 3)
    F = np.array(sweep["fixed_rotation"]).reshape(3, 3)
    B = np.array(sweep["orientation"]["B"]).reshape(3, 3)
    return S @ rotation(sweep["rotation_axis"], phi) @ F @ np.asarray(U).reshape(3, 3) @ B
