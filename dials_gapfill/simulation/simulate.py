"""Deterministic simulation of a rotation sweep as Pilatus miniCBF images.

The geometry is the one dxtbx itself builds from the written headers: a
template header is read back with dxtbx before anything is predicted, so the
simulated spot positions are exactly where DIALS expects them.  Reflections
are predicted with DIALS' own scan-varying predictor
(``flex.reflection_table.from_predictions``) for a crystal whose orientation
drifts slowly through the scan, and each reflection is spread over the images
by a Gaussian rocking curve (mosaicity / |zeta|) and over the detector by a
pixel-integrated Gaussian.  Intensities are Wilson distributed (acentric and
centric) with a B-factor falloff, multiplied by DIALS' own Lorentz,
polarisation and detector-efficiency factors (``compute_corrections``), on a
smooth background, with Poisson noise.

Determinism: every image has its own random stream, seeded by
``(seed, image number)``, and the true intensities have theirs, so the same
seed gives bit-identical files and an image does not depend on which other
images are written.

Bad-image modes, for robustness tests: ``blank`` (background only, as when the
shutter failed), ``zero`` (all counts zero, a beam dump), ``overexposed``
(400x the flux: spots far brighter than the neighbours'), ``flare`` (every
count 40x: the whole frame strong, above DIALS' strong-pixel cap),
``saturated`` (every pixel at the overload value), ``truncated`` (a valid file cut in half), ``garbage`` (random bytes) and
``corrupt`` (a valid header over random bytes).
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
from cctbx import crystal as cctbx_crystal
from cctbx import miller, sgtbx, uctbx
from dials.algorithms.spot_prediction import ScanVaryingReflectionPredictor
from dials.array_family import flex
from dxtbx.ext import compress
from dxtbx.model import Crystal, Experiment, ScanFactory
from dxtbx.model.experiment_list import ExperimentListFactory
from scipy.spatial.transform import Rotation
from scipy.special import ndtr
from scitbx import matrix

# Pilatus detectors: (modules fast, modules slow); module 487 x 195 px,
# gaps 7 px (fast) and 17 px (slow), as in dxtbx' FormatPilatusHelpers.
PILATUS_MODULES = {
    "pilatus300k": (1, 3),
    "pilatus1m": (2, 5),
    "pilatus2m": (3, 8),
    "pilatus6m": (5, 12),
}
MODULE_FAST, MODULE_SLOW, GAP_FAST, GAP_SLOW = 487, 195, 7, 17
PIXEL_SIZE_MM = 0.172
COUNT_CUTOFF = 1048500
BAD_MODES = ("blank", "zero", "overexposed", "flare", "saturated", "truncated", "garbage", "corrupt")


def detector_size(name: str) -> tuple[int, int]:
    """(fast, slow) size in pixels of a named Pilatus detector."""
    try:
        nf, ns = PILATUS_MODULES[name]
    except KeyError:
        raise ValueError(
            f"unknown detector {name!r}: choose one of {', '.join(PILATUS_MODULES)}"
        ) from None
    return nf * MODULE_FAST + (nf - 1) * GAP_FAST, ns * MODULE_SLOW + (ns - 1) * GAP_SLOW


@dataclass
class SimulationConfig:
    """Everything that defines a simulated sweep (and nothing else)."""

    n_images: int = 120
    first_image: int = 1
    osc_start: float = 0.0
    osc_width: float = 0.5
    omit: tuple = ()
    bad_images: dict = field(default_factory=dict)  # image number -> mode
    seed: int = 42
    noise_seed: int = 0  # 0: noise from `seed`; else another noise draw of the same sweep
    unit_cell: tuple = (54.0, 62.0, 71.0, 90.0, 90.0, 90.0)
    space_group: str = "P 21 21 21"
    detector: str = "pilatus1m"
    distance: float = 190.0  # mm
    wavelength: float = 0.9795  # Angstrom
    beam_centre_px: tuple | None = None  # (fast, slow); None: near the centre
    mosaicity: float = 0.12  # degrees, sigma of the rocking curve
    spot_sigma_px: float = 0.9
    wilson_b: float = 18.0
    intensity_scale: float = 1000.0  # mean photons of a low-resolution reflection
    background: float = 2.0  # counts per pixel, flat part
    background_peak: float = 6.0  # extra counts per pixel at the beam centre
    background_width_px: float = 350.0
    drift: float = 0.01  # degrees of crystal rotation per degree of scan
    # accelerating drift (a slipping crystal): the crystal is rotated about
    # drift_axis by drift * phi + drift_acceleration * phi**2 degrees, phi in
    # degrees from the scan start; 0 leaves the default files unchanged
    drift_acceleration: float = 0.0
    drift_axis: tuple = (0.0, 0.6, 0.8)
    exposure_time: float = 0.1
    prefix: str = "sim"
    # reflections whose rocking curves are centred before the first image or
    # after the last (up to the reach of the widest curve) record their
    # tails on the end images, as on a real detector; off by default, which
    # keeps the files of a given seed as they are
    scan_end_tails: bool = False

    # bad-image modes this kind of sweep can have (a class attribute, not a field)
    modes = BAD_MODES

    def __post_init__(self):
        self.omit = tuple(sorted({int(i) for i in self.omit}))
        self.bad_images = {int(k): str(v) for k, v in dict(self.bad_images).items()}
        for image, mode in self.bad_images.items():
            if mode not in self.modes:
                raise ValueError(
                    f"bad image mode {mode!r} for image {image}: choose one of {', '.join(self.modes)}"
                )
        self.unit_cell = tuple(float(v) for v in self.unit_cell)
        self._check_detector()
        if self.n_images < 1 or self.osc_width <= 0:
            raise ValueError("n_images must be >= 1 and osc_width > 0")
        first, last = self.first_image, self.first_image + self.n_images - 1
        for what, images in (("omit", self.omit), ("bad_images", sorted(self.bad_images))):
            outside = [i for i in images if not first <= i <= last]
            if outside:
                raise ValueError(f"{what}: image {outside[0]} is not in the sweep (images {first}-{last}): "
                                 "give image numbers of the sweep")
        if len(self.omit) >= self.n_images:
            raise ValueError(f"omit leaves no image of {first}-{last} to write: omit fewer images")
        if self.seed < 0 or self.noise_seed < 0:
            raise ValueError("seed must be >= 0")
        if not self.prefix or os.sep in self.prefix or "/" in self.prefix:
            raise ValueError(f"prefix {self.prefix!r}: give a file name prefix without a folder "
                             "(the folder is output.directory)")
        self._check_symmetry()

    def _check_symmetry(self) -> None:
        from cctbx import sgtbx, uctbx

        try:
            group = sgtbx.space_group_info(self.space_group).group()
        except RuntimeError:
            raise ValueError(f"space_group {self.space_group!r}: not a space group symbol "
                             "(e.g. P 21 21 21 or P212121)") from None
        try:
            cell = uctbx.unit_cell(self.unit_cell)
        except RuntimeError:
            raise ValueError(f"unit_cell {self.unit_cell}: not a unit cell (a, b, c in A, then "
                             "alpha, beta, gamma in degrees)") from None
        if not group.is_compatible_unit_cell(cell):
            raise ValueError(f"unit_cell {self.unit_cell} does not have the symmetry of space_group "
                             f"{self.space_group}: give a cell with its lattice's lengths and angles")

    def _check_detector(self) -> None:
        detector_size(self.detector)

    @property
    def image_numbers(self) -> list[int]:
        return list(range(self.first_image, self.first_image + self.n_images))

    @property
    def image_size(self) -> tuple[int, int]:
        return detector_size(self.detector)

    @property
    def beam_centre(self) -> tuple[float, float]:
        if self.beam_centre_px is not None:
            return tuple(float(v) for v in self.beam_centre_px)
        nx, ny = self.image_size
        # off-centre by a few pixels, and away from module gaps
        return (round(nx / 2 - 7.3, 2), round(ny / 2 + 11.6, 2))

    @property
    def digits(self) -> int:
        """Width of the image numbers in file names: one width for the whole
        sweep (dxtbx reads sim_9999 and sim_10000 as two templates)."""
        return max(4, len(str(self.first_image + self.n_images - 1)))

    def filename(self, image: int) -> str:
        return f"{self.prefix}_{image:0{self.digits}d}.cbf"

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["bad_images"] = {str(k): v for k, v in self.bad_images.items()}
        if not d["scan_end_tails"]:
            del d["scan_end_tails"]  # (the ground truth of a seed as it was without the option)
        return d


# --------------------------------------------------------------------------
# miniCBF writing (byte_offset compression by dxtbx)
# --------------------------------------------------------------------------


def angle_text(degrees: float) -> str:
    """An angle for an image header: four decimals, as detectors write them,
    or as many as the value needs (0.00125 written 0.0013 would be another
    scan, and dxtbx would split the sweep where the rounded starts jump)."""
    short = f"{degrees:.4f}"
    return short if abs(float(short) - degrees) < 1e-9 else f"{degrees:.10f}".rstrip("0")


def _timestamp(config: SimulationConfig, image: int) -> str:
    # a fixed epoch plus the exposure clock: deterministic
    seconds = (image - config.first_image) * config.exposure_time
    whole = int(seconds)
    millis = int(round((seconds - whole) * 1000))
    h, rem = divmod(whole, 3600)
    m, s = divmod(rem, 60)
    return f"2026-01-01T{h:02d}:{m:02d}:{s:02d}.{millis:03d}"


def cbf_header_text(config: SimulationConfig, image: int) -> str:
    nx, ny = config.image_size
    bx, by = config.beam_centre
    start = config.osc_start + (image - config.first_image) * config.osc_width
    energy = 12398.4193 / config.wavelength
    label = config.detector.upper().replace("PILATUS", "PILATUS ")
    return (
        f"# Detector: {label}, S/N 60-0000\r\n"
        f"# {_timestamp(config, image)}\r\n"
        "# Pixel_size 172e-6 m x 172e-6 m\r\n"
        "# Silicon sensor, thickness 0.000450 m\r\n"
        f"# Exposure_time {config.exposure_time:.7f} s\r\n"
        f"# Exposure_period {config.exposure_time:.7f} s\r\n"
        "# Tau = 0 s\r\n"
        f"# Count_cutoff {COUNT_CUTOFF} counts\r\n"
        f"# Threshold_setting: {energy / 2:.0f} eV\r\n"
        "# Gain_setting: autog (vrf = 1.000)\r\n"
        "# N_excluded_pixels = 0\r\n"
        "# Excluded_pixels: badpix_mask.tif\r\n"
        "# Flat_field: (nil)\r\n"
        "# Trim_file: (nil)\r\n"
        "# Image_path: /simulated/\r\n"
        f"# Wavelength {config.wavelength:.5f} A\r\n"
        f"# Detector_distance {config.distance / 1000.0:.5f} m\r\n"
        f"# Beam_xy ({bx:.2f}, {by:.2f}) pixels\r\n"
        "# Flux 0.000000\r\n"
        "# Filter_transmission 1.0000\r\n"
        f"# Start_angle {angle_text(start)} deg.\r\n"
        f"# Angle_increment {angle_text(config.osc_width)} deg.\r\n"
        "# Detector_2theta 0.0000 deg.\r\n"
        "# Polarization 0.990\r\n"
        "# Alpha 0.0000 deg.\r\n"
        "# Kappa 0.0000 deg.\r\n"
        f"# Phi {angle_text(start)} deg.\r\n"
        "# Chi 0.0000 deg.\r\n"
        "# Oscillation_axis X, CW\r\n"
        "# N_oscillations 1\r\n"
    )


def cbf_binary_section(data: np.ndarray) -> bytes:
    """The CBF binary section of `data` (byte_offset compressed with
    dxtbx.ext.compress), from its MIME header to the closing text field."""
    ny, nx = data.shape
    packed = compress(flex.int(np.ascontiguousarray(data, dtype=np.int32)))

    md5 = base64.b64encode(hashlib.md5(packed).digest()).decode()
    text = (
        "--CIF-BINARY-FORMAT-SECTION--\r\n"
        "Content-Type: application/octet-stream;\r\n"
        '     conversions="x-CBF_BYTE_OFFSET"\r\n'
        "Content-Transfer-Encoding: BINARY\r\n"
        f"X-Binary-Size: {len(packed)}\r\n"
        "X-Binary-ID: 1\r\n"
        'X-Binary-Element-Type: "signed 32-bit integer"\r\n'
        "X-Binary-Element-Byte-Order: LITTLE_ENDIAN\r\n"
        f"Content-MD5: {md5}\r\n"
        f"X-Binary-Number-of-Elements: {nx * ny}\r\n"
        f"X-Binary-Size-Fastest-Dimension: {nx}\r\n"
        f"X-Binary-Size-Second-Dimension: {ny}\r\n"
        "X-Binary-Size-Padding: 4095\r\n\r\n"
    )
    tail = b"\x00" * 4095 + b"\r\n--CIF-BINARY-FORMAT-SECTION----\r\n;\r\n\r\n"
    return text.encode("ascii") + b"\x0c\x1a\x04\xd5" + packed + tail


def encode_minicbf(header: str, data: np.ndarray, name: str) -> bytes:
    """A Pilatus miniCBF file (byte_offset compressed with dxtbx.ext.compress)."""
    text = (
        "###CBF: VERSION 1.5, CBFlib v0.7.8 - PILATUS detectors\r\n\r\n"
        f"data_{name}\r\n\r\n"
        '_array_data.header_convention "PILATUS_1.2"\r\n'
        "_array_data.header_contents\r\n;\r\n"
        f"{header};\r\n\r\n"
        "_array_data.data\r\n;\r\n"
    )
    return text.encode("ascii") + cbf_binary_section(data)


def pilatus_gap_mask(nx: int, ny: int) -> np.ndarray:
    """(ny, nx) boolean: the module gaps of a Pilatus image of nx x ny pixels."""
    gap = np.zeros((ny, nx), dtype=bool)
    for i in range(1, nx // MODULE_FAST + 1):
        start = i * MODULE_FAST + (i - 1) * GAP_FAST
        gap[:, start : start + GAP_FAST] = True
    for i in range(1, ny // MODULE_SLOW + 1):
        start = i * MODULE_SLOW + (i - 1) * GAP_SLOW
        gap[start : start + GAP_SLOW, :] = True
    return gap


def _write_atomic(path: str, payload: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(payload)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# The physical model
# --------------------------------------------------------------------------


def rotation(axis, angle_deg: float) -> np.ndarray:
    """The rotation by angle_deg degrees about axis, as a numpy 3x3 (scitbx's)."""
    return np.array(matrix.col(axis).normalize().axis_and_angle_as_r3_rotation_matrix(angle_deg, deg=True)).reshape(3, 3)


def drift_angle(config: "SimulationConfig", phi: float) -> float:
    """Crystal rotation (degrees) about drift_axis after phi degrees of scan."""
    angle = config.drift * phi
    if config.drift_acceleration:
        angle += config.drift_acceleration * phi * phi
    return angle


def defocused_beam(config) -> np.ndarray:
    """Expected counts of a defocused direct beam (a crystal-tracking frame in
    electron diffraction): a bright disc around the beam centre with soft
    edges, the crystal's shadow a dimmer ellipse inside it.  Its size and
    brightness come from ``config.defocus_radius_px`` and ``defocus_counts``
    (defaults 60 px and 150 counts per pixel when the config has no such fields)."""
    nx, ny = config.image_size
    bx, by = config.beam_centre
    radius = float(getattr(config, "defocus_radius_px", 60.0))
    counts = float(getattr(config, "defocus_counts", 150.0))
    yy, xx = np.mgrid[0:ny, 0:nx]
    dx, dy = xx + 0.5 - bx, yy + 0.5 - by
    r = np.hypot(dx, dy)
    disc = ndtr((radius - r) / 3.0)
    # the crystal's shadow: an ellipse of a third of the disc, off centre
    u = (dx * 0.8 + dy * 0.6 - 0.15 * radius) / (0.35 * radius)
    v = (-dx * 0.6 + dy * 0.8 + 0.1 * radius) / (0.2 * radius)
    shadow = 0.7 * ndtr((1.0 - np.hypot(u, v)) * 4.0)
    return counts * disc * (1.0 - shadow)


def _initial_orientation(seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 11])
    return Rotation.random(random_state=rng).as_matrix()


def _models(config: SimulationConfig, fmt=None):
    """Beam, detector and goniometer exactly as dxtbx reads them from the headers
    (of a Pilatus miniCBF file, or of the file format `fmt` writes)."""
    nx, ny = config.image_size
    with tempfile.TemporaryDirectory(prefix="gapfill_sim_") as tmp:
        path = os.path.join(tmp, config.filename(config.first_image))
        data = np.zeros((ny, nx), dtype=np.int32)
        if fmt is None:
            payload = encode_minicbf(cbf_header_text(config, config.first_image), data, "template")
        else:
            payload = fmt.encode(config, config.first_image, data, "template")
        _write_atomic(path, payload)
        experiments = ExperimentListFactory.from_filenames([path])
        imageset = experiments[0].imageset
        return (
            imageset.get_beam(),
            imageset.get_detector(),
            imageset.get_goniometer(),
            imageset.get_format_class().__name__,
        )


class Simulation:
    """Predicts once, then renders any image on demand.

    `fmt`: the file format (None: Pilatus miniCBF), an object with
    ``encode(config, image, data, name) -> bytes``, ``gap_mask(config)`` (raw
    pixels written as -1), ``panel_offsets(detector)`` (raw-image (fast, slow)
    offset of each panel), ``binary_span(payload)`` (the pixel bytes, for the
    corrupt mode) and optionally ``pixel_area(config)`` (relative area of each raw
    pixel, scaling the background).  `sweep`: one sweep of several of the same crystal, an object
    with ``index`` (1, 2, ...: its own noise streams) and ``drift_start``
    (degrees of scan before it, through which the crystal has drifted).
    """

    def __init__(self, config: SimulationConfig, fmt=None, sweep=None):
        self.config = config
        self.fmt = fmt
        self.sweep = sweep
        self.beam, self.detector, self.goniometer, self.format_class = _models(config, fmt)
        first, n = config.first_image, config.n_images
        self.scan = ScanFactory.make_scan(
            image_range=(first, first + n - 1),
            exposure_times=config.exposure_time,
            oscillation=(config.osc_start, config.osc_width),
            epochs={first + i: i * config.exposure_time for i in range(n)},
            deg=True,
        )

        # crystal: U drifts about drift_axis by drift_angle(phi) degrees
        uc = uctbx.unit_cell(config.unit_cell)
        sg = sgtbx.space_group_info(config.space_group).group()
        self.symmetry = cctbx_crystal.symmetry(unit_cell=uc, space_group=sg)
        B = np.array(uc.fractionalization_matrix()).reshape(3, 3).T
        U0 = _initial_orientation(config.seed)
        ortho = np.array(uc.orthogonalization_matrix()).reshape(3, 3)
        real = U0 @ ortho  # columns are a, b, c
        self.crystal = Crystal(
            tuple(real[:, 0]), tuple(real[:, 1]), tuple(real[:, 2]), space_group=sg
        )
        self.U_at_scan_points = []
        A_list = []
        for i in range(n + 1):
            phi = i * config.osc_width
            if sweep is not None:
                phi = sweep.drift_start + phi
            R = rotation(config.drift_axis, drift_angle(config, phi))
            U = R @ U0
            self.U_at_scan_points.append(U)
            A_list.append(tuple((U @ B).ravel()))
        self.crystal.set_A_at_scan_points(A_list)

        self.experiment = Experiment(
            beam=self.beam,
            detector=self.detector,
            goniometer=self.goniometer,
            scan=self.scan,
            crystal=self.crystal,
        )
        s0 = self.beam.get_s0()
        self.d_min = self.detector.get_max_resolution(s0)

        # true intensities: Wilson statistics over the asymmetric unit
        asu = miller.build_set(self.symmetry, anomalous_flag=False, d_min=self.d_min)
        asu = asu.sort(by_value="packed_indices")
        rng = np.random.default_rng([config.seed, 7])
        d = np.array(asu.d_spacings().data())
        eps = np.array(asu.epsilons().data(), dtype=float)
        centric = np.array(asu.centric_flags().data())
        mean = config.intensity_scale * eps * np.exp(-config.wilson_b / (2 * d**2))
        z = rng.standard_normal(len(d))
        expo = rng.exponential(1.0, len(d))
        self.true_I = np.where(centric, mean * z**2, mean * expo)
        self.asu_indices = [tuple(h) for h in asu.indices()]
        lookup = {h: i for i, h in enumerate(self.asu_indices)}

        # predictions with DIALS' own scan-varying predictor
        # (called directly: flex.reflection_table.from_predictions needs an
        # ImageSequence and would silently use the stills predictor here)

        experiment, pad = self.experiment, 0
        if config.scan_end_tails:
            experiment, A_list, pad = self._padded(B, U0, sweep)
        predictor = ScanVaryingReflectionPredictor(experiment, dmin=self.d_min)
        refl = predictor.for_ub(flex.mat3_double(A_list))
        refl["id"] = flex.int(len(refl), 0)
        refl.compute_zeta(self.experiment)
        refl.compute_corrections([self.experiment])
        pred_set = miller.set(self.symmetry, refl["miller_index"], anomalous_flag=False)
        pred_asu = [tuple(h) for h in pred_set.map_to_asu().indices()]
        keep = np.array([h in lookup for h in pred_asu])
        x, y, z_px = (np.array(c) for c in refl["xyzcal.px"].parts())
        # the predictor's z is in array coordinates (image n covers [n-1, n)),
        # which start at first_image - 1, not at 0
        z_px = z_px - experiment.scan.get_array_range()[0] - pad
        if fmt is not None:
            # panel pixels -> pixels of the raw image the file holds
            offsets = np.array(fmt.panel_offsets(self.detector), dtype=float).reshape(-1, 2)
            panel = np.array(refl["panel"], dtype=int)
            x, y = x + offsets[panel, 0], y + offsets[panel, 1]
        zeta = np.abs(np.array(refl["zeta"]))
        lp = np.array(refl["lp"])
        qe = np.array(refl["qe"]) if "qe" in refl else np.ones(len(refl))
        keep &= zeta > 0.02
        idx = np.array([lookup.get(h, -1) for h in pred_asu])
        self.ref_hkl = np.array(list(refl["miller_index"]), dtype=int)[keep]
        self.ref_asu = idx[keep]
        self.ref_x, self.ref_y = x[keep], y[keep]
        # phi of the reflection centre, in degrees from the scan start
        self.ref_phi = (z_px[keep]) * config.osc_width + config.osc_start
        self.ref_sigma_phi = np.minimum(config.mosaicity / zeta[keep], 20 * config.mosaicity)
        # counts the detector records over the whole rocking curve
        self.ref_counts = self.true_I[self.ref_asu] * qe[keep] / lp[keep]
        order = np.argsort(self.ref_phi, kind="stable")
        for name in ("ref_hkl", "ref_asu", "ref_x", "ref_y", "ref_phi", "ref_sigma_phi", "ref_counts"):
            setattr(self, name, getattr(self, name)[order])
        self.max_reach = float(np.max(5 * self.ref_sigma_phi)) if len(order) else 0.0

        # smooth background and the Pilatus module-gap mask
        nx, ny = config.image_size
        bx, by = config.beam_centre
        yy, xx = np.mgrid[0:ny, 0:nx]
        r2 = (xx + 0.5 - bx) ** 2 + (yy + 0.5 - by) ** 2
        self.background = config.background + config.background_peak * np.exp(
            -r2 / (2 * config.background_width_px**2)
        )
        if fmt is None:
            self.gap_mask = pilatus_gap_mask(nx, ny)
        else:
            self.gap_mask = np.asarray(fmt.gap_mask(config), dtype=bool)
            if hasattr(fmt, "pixel_area"):
                # larger pixels (a Timepix' chip edges) collect more background
                self.background = self.background * fmt.pixel_area(config)

    def _padded(self, B, U0, sweep):
        """(experiment, A at its scan points, images added at each end): the
        scan extended by the reach of the widest rocking curve kept (5
        sigma, sigma at most 20 x the mosaicity), the crystal drifting on
        through it, for predicting the reflections whose tails reach the
        end images (scan_end_tails)."""
        c = self.config
        pad = int(math.ceil(5 * 20 * c.mosaicity / c.osc_width))
        n = c.n_images + 2 * pad
        scan = ScanFactory.make_scan(
            image_range=(c.first_image, c.first_image + n - 1), exposure_times=c.exposure_time,
            oscillation=(c.osc_start - pad * c.osc_width, c.osc_width),
            epochs={c.first_image + i: i * c.exposure_time for i in range(n)}, deg=True)
        A_list = []
        for i in range(n + 1):
            phi = (i - pad) * c.osc_width + (sweep.drift_start if sweep is not None else 0.0)
            A_list.append(tuple((rotation(c.drift_axis, drift_angle(c, phi)) @ U0 @ B).ravel()))
        crystal = copy.deepcopy(self.crystal)
        crystal.set_A_at_scan_points(A_list)
        experiment = Experiment(beam=self.beam, detector=self.detector, goniometer=self.goniometer,
                                scan=scan, crystal=crystal)
        return experiment, A_list, pad

    # ---------------------------------------------------------------- images
    def image_phi_range(self, image: int) -> tuple[float, float]:
        c = self.config
        a = c.osc_start + (image - c.first_image) * c.osc_width
        return a, a + c.osc_width

    def expected_signal(self, image: int) -> np.ndarray:
        """Noise-free diffracted photons on one image (no background)."""
        c = self.config
        nx, ny = c.image_size
        a, b = self.image_phi_range(image)
        lo = np.searchsorted(self.ref_phi, a - self.max_reach)
        hi = np.searchsorted(self.ref_phi, b + self.max_reach)
        phi, sig = self.ref_phi[lo:hi], self.ref_sigma_phi[lo:hi]
        frac = ndtr((b - phi) / sig) - ndtr((a - phi) / sig)
        counts = self.ref_counts[lo:hi] * frac
        use = counts > 0.05
        counts, x, y = counts[use], self.ref_x[lo:hi][use], self.ref_y[lo:hi][use]
        image_data = np.zeros((ny, nx), dtype=float)
        if len(counts) == 0:
            return image_data
        s = c.spot_sigma_px
        half = int(math.ceil(4 * s))
        offsets = np.arange(-half, half + 1)
        x0 = np.floor(x).astype(int)
        y0 = np.floor(y).astype(int)
        px = x0[:, None] + offsets[None, :]  # pixel columns
        py = y0[:, None] + offsets[None, :]
        wx = ndtr((px + 1 - x[:, None]) / s) - ndtr((px - x[:, None]) / s)
        wy = ndtr((py + 1 - y[:, None]) / s) - ndtr((py - y[:, None]) / s)
        w = counts[:, None, None] * wy[:, :, None] * wx[:, None, :]
        PX = np.broadcast_to(px[:, None, :], w.shape)
        PY = np.broadcast_to(py[:, :, None], w.shape)
        inside = (PX >= 0) & (PX < nx) & (PY >= 0) & (PY < ny)
        np.add.at(image_data, (PY[inside], PX[inside]), w[inside])
        return image_data

    def render(self, image: int, mode: str | None = None) -> np.ndarray:
        """Counts of one image; its own random stream, so independent of others."""
        key = [self.config.seed, 1000, image]
        if self.sweep is not None:  # several sweeps: image numbers repeat, streams must not
            key += [self.config.noise_seed, 5000 + self.sweep.index]
        elif self.config.noise_seed:  # other noise, same crystal and intensities
            key.append(self.config.noise_seed)
        rng = np.random.default_rng(key)
        if mode == "zero":
            data = np.zeros(self.background.shape, dtype=np.int64)
        else:
            expected = self.background.copy()
            if mode == "defocused":
                # a crystal-tracking frame: the defocused direct beam, no Bragg spots
                expected += defocused_beam(self.config)
            elif mode != "blank":
                expected += self.expected_signal(image)
            if mode == "overexposed":
                expected *= 400.0
            data = rng.poisson(expected)
            if mode == "flare":
                data = data * 40  # every count 40x: noise far above Poisson, every pixel "strong"
        if mode == "saturated":
            data = np.full(self.background.shape, COUNT_CUTOFF, dtype=np.int64)
        data = np.minimum(data, COUNT_CUTOFF + 76)
        data[self.gap_mask] = -1
        return data.astype(np.int32)

    def image_bytes(self, image: int) -> bytes:
        c = self.config
        mode = c.bad_images.get(image)
        extra = [] if self.sweep is None else [5000 + self.sweep.index]
        if mode == "garbage":
            rng = np.random.default_rng([c.seed, 2000, image, *extra])
            return rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
        name = os.path.splitext(c.filename(image))[0]
        if self.fmt is None:
            payload = encode_minicbf(cbf_header_text(c, image), self.render(image, mode), name)
        else:
            payload = self.fmt.encode(c, image, self.render(image, mode), name)
        if mode == "truncated":
            payload = payload[: len(payload) // 2]
        elif mode == "corrupt":
            # a valid header over a binary section of random bytes
            if self.fmt is None:
                start = payload.find(b"\x0c\x1a\x04\xd5") + 4
                end = payload.rfind(b"\r\n--CIF-BINARY-FORMAT-SECTION----")
            else:
                start, end = self.fmt.binary_span(payload)
            rng = np.random.default_rng([c.seed, 3000, image, *extra])
            noise = rng.integers(0, 256, end - start, dtype=np.uint8).tobytes()
            payload = payload[:start] + noise + payload[end:]
        return payload

    # ---------------------------------------------------------------- truth
    def ground_truth(self) -> dict:
        c = self.config
        s0 = self.beam.get_s0()
        panel = self.detector[0]
        written = [i for i in c.image_numbers if i not in c.omit]
        return {
            "format": "dials-gapfill simulated sweep, version 1",
            "config": c.as_dict(),
            "format_class": self.format_class,
            "unit_cell": list(c.unit_cell),
            "space_group": c.space_group,
            "wavelength": self.beam.get_wavelength(),
            "s0": list(s0),
            "distance_mm": panel.get_distance(),
            "beam_centre_px": list(panel.get_beam_centre_px(s0)),
            "beam_centre_mm": list(panel.get_beam_centre(s0)),
            "pixel_size_mm": list(panel.get_pixel_size()),
            "image_size": list(panel.get_image_size()),
            "rotation_axis": list(self.goniometer.get_rotation_axis()),
            "oscillation": [c.osc_start, c.osc_width],
            "image_range": [c.first_image, c.first_image + c.n_images - 1],
            "images_written": written,
            "omitted": list(c.omit),
            "bad_images": {str(k): v for k, v in sorted(c.bad_images.items())},
            "d_min": self.d_min,
            "mosaicity_deg": c.mosaicity,
            "drift": {
                "comment": "U(phi) = R(axis, drift * phi + acceleration * phi**2) U(0), phi in "
                "degrees from the scan start, angles in degrees",
                "axis": list(c.drift_axis),
                "rate": c.drift,
                "acceleration": c.drift_acceleration,
            },
            "n_predicted": int(len(self.ref_phi)),
            "orientation": {
                "comment": "U at the scan points: the start of each image and the end of the last, "
                "i.e. phi = osc_start + k * osc_width for k = 0..n_images",
                "phi": [c.osc_start + k * c.osc_width for k in range(c.n_images + 1)],
                "U": [list(np.round(U.ravel(), 12)) for U in self.U_at_scan_points],
                "B": list(np.round(np.array(self.crystal.get_B()), 12)),
            },
            "intensities": {
                "comment": "true I of the asymmetric unit, on the scale of DIALS' LP- and "
                "QE-corrected intensities",
                "miller_index": [list(h) for h in self.asu_indices],
                "I": [round(float(v), 4) for v in self.true_I],
            },
        }


def simulate(config: SimulationConfig, directory: str) -> dict:
    """Write the images of `config` into `directory` and return the ground truth.

    Files are written to temporary names and renamed, so an interrupted run
    never leaves a half-written image under a final name.
    """
    os.makedirs(directory, exist_ok=True)
    sim = Simulation(config)
    truth = sim.ground_truth()
    images = truth["images_written"]
    for image in images:
        _write_atomic(os.path.join(directory, config.filename(image)), sim.image_bytes(image))
    truth["files"] = [config.filename(i) for i in images]
    tmp = os.path.join(directory, f".ground_truth.json.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(truth, fh, separators=(",", ":"))
    os.replace(tmp, os.path.join(directory, "ground_truth.json"))
    return truth


def load_ground_truth(directory: str) -> dict:
    with open(os.path.join(directory, "ground_truth.json")) as fh:
        return json.load(fh)
