"""An electron-diffraction rotation sweep (3D ED / cRED) as TimePix_SU SMV files.

The files are what the RED software and instamatic write for a Timepix
camera: SMV (a 512-byte text header, unsigned 16-bit little-endian pixels)
with ``BEAMLINE=TimePix_SU``.  dxtbx reads them with
``FormatSMVTimePix_SU_512x512`` (512 x 512 pixels of 55 um: four chips of
256 x 256 whose edge pixels are three times as wide, so dxtbx makes four
panels of 254 x 254 pixels and leaves the wide "cross" pixels out) or, with
``detector="timepix516"``, ``FormatSMVTimePix_SU_516x516`` (the wide pixels
split in three: one panel of 516 x 516).  The format class, not the header,
fixes the rotation axis: (-0.755, -0.656, 0) for 512 x 512 and
(0.7826, -0.6226, 0) for 516 x 516, neither along a detector axis, as on the
microscope they describe; the simulation uses the axis dxtbx reads.  The beam
is unpolarised (dxtbx' format), so DIALS' polarisation factor is 1 to within
1e-4 at electron wavelengths.

As for X-rays, the geometry is read back with dxtbx from a template file
before anything is predicted (panel coordinates are mapped to raw-image
pixels with each panel's raw_image_offset), reflections are predicted with
DIALS' scan-varying predictor and rendered with the same rocking curves,
spot shapes, Wilson intensities, drift and noise model (``Simulation``).
The intensities are kinematic: dynamical scattering is not simulated.

Crystal tracking: every ``tracking_every``-th frame (20 by default; frames
20, 40, ... counted from the first) the microscope takes a defocused image of
the crystal to re-centre it while the rotation goes on.  ``tracking`` says
what the sweep has in those frames' place: ``missing`` (no file: the
rotation range of the frame is lost), ``defocused`` (a file with the
defocused direct beam, a bright disc with the crystal's shadow and no Bragg
spots), ``blank`` (background only, as when the camera reads out with the
beam blanked), ``zero`` (a zero-filled frame, as converters write for a frame
they drop) or ``none`` (no tracking: an ordinary frame).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np

from dials_gapfill.simulation.simulate import (
    BAD_MODES,
    Simulation,
    SimulationConfig,
    _write_atomic,
    angle_text,
)

# name -> (pixels fast, pixels slow, dxtbx format class)
TIMEPIX = {
    "timepix512": (512, 512, "FormatSMVTimePix_SU_512x512"),
    "timepix516": (516, 516, "FormatSMVTimePix_SU_516x516"),
}
TIMEPIX_PIXEL_MM = 0.055
ED_MODES = BAD_MODES + ("defocused",)
TRACKING = ("missing", "defocused", "blank", "zero", "none")
SMV_HEADER_BYTES = 512
SMV_MAX = 65535
EPOCH = 1767225600  # 2026-01-01T00:00:00Z


@dataclass
class EDSimulationConfig(SimulationConfig):
    """A 3D ED sweep: SimulationConfig with electron defaults and crystal tracking.

    ``distance`` is the effective camera length (mm): 530 mm puts 0.94 A at
    the middle of the detector's edges (0.66 A in its corners) at 0.0251 A
    (200 keV).  The default crystal is carbamazepine form III (P 1 21/n 1),
    a typical small-molecule 3D ED sample.
    """

    n_images: int = 240
    osc_start: float = -48.0
    osc_width: float = 0.4
    unit_cell: tuple = (7.53, 11.15, 13.91, 90.0, 92.9, 90.0)
    space_group: str = "P 1 21/n 1"
    detector: str = "timepix512"
    distance: float = 530.0
    wavelength: float = 0.0251
    mosaicity: float = 0.15
    spot_sigma_px: float = 1.1
    wilson_b: float = 3.0
    intensity_scale: float = 400.0
    background: float = 0.4
    background_peak: float = 12.0
    background_width_px: float = 45.0
    exposure_time: float = 0.5
    prefix: str = "ed"
    tracking_every: int = 20
    tracking: str = "missing"
    defocus_radius_px: float = 60.0
    defocus_counts: float = 150.0

    modes = ED_MODES

    def __post_init__(self):
        super().__post_init__()
        if self.tracking not in TRACKING:
            raise ValueError(f"tracking {self.tracking!r}: choose one of {', '.join(TRACKING)}")
        if self.tracking != "none" and self.tracking_every < 2:
            raise ValueError("tracking_every must be >= 2")
        frames = self.tracking_frames
        if self.tracking == "missing":
            self.omit = tuple(sorted(set(self.omit) | set(frames)))
        elif self.tracking != "none":
            for image in frames:
                self.bad_images.setdefault(image, self.tracking)

    def _check_detector(self) -> None:
        if self.detector not in TIMEPIX:
            raise ValueError(f"unknown detector {self.detector!r}: choose one of {', '.join(TIMEPIX)}")

    @property
    def tracking_frames(self) -> list[int]:
        if self.tracking == "none":
            return []
        return [i for k, i in enumerate(self.image_numbers, start=1) if k % self.tracking_every == 0]

    @property
    def image_size(self) -> tuple[int, int]:
        nx, ny, _ = TIMEPIX[self.detector]
        return nx, ny

    @property
    def beam_centre(self) -> tuple[float, float]:
        if self.beam_centre_px is not None:
            return tuple(float(v) for v in self.beam_centre_px)
        nx, ny = self.image_size
        # near the middle, off the chips' wide edge pixels
        return (round(nx / 2 - 8.6, 2), round(ny / 2 + 7.4, 2))

    def filename(self, image: int) -> str:
        return f"{self.prefix}_{image:0{max(5, self.digits)}d}.img"


class SMVTimePix:
    """Writes SMV files with the TimePix_SU header of RED / instamatic."""

    def __init__(self, detector: str = "timepix512"):
        self.detector = detector

    # ------------------------------------------------------------ Simulation hooks
    def gap_mask(self, config):
        nx, ny = config.image_size
        return np.zeros((ny, nx), dtype=bool)

    def pixel_area(self, config):
        """Relative area of the raw pixels: the chips' edge pixels of the 512 x 512
        layout are three times as wide (nine times at the crossing)."""
        nx, ny = config.image_size
        wide = np.ones(nx)
        if self.detector == "timepix512":
            wide[[0, 255, 256, 511]] = 3.0
        return wide[None, :] * wide[:ny, None]

    @staticmethod
    def panel_offsets(detector):
        return [tuple(float(v) for v in panel.get_raw_image_offset()) for panel in detector]

    @staticmethod
    def binary_span(payload: bytes) -> tuple[int, int]:
        return SMV_HEADER_BYTES, len(payload)

    def header_text(self, config, image: int) -> str:
        start = config.osc_start + (image - config.first_image) * config.osc_width
        nx, ny = config.image_size
        bx, by = config.beam_centre
        seconds = EPOCH + (image - config.first_image) * config.exposure_time
        date = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(int(seconds)))
        fields = [
            ("HEADER_BYTES", f"{SMV_HEADER_BYTES:5d}"),
            ("DIM", "2"),
            ("BYTE_ORDER", "little_endian"),
            ("TYPE", "unsigned_short"),
            ("SIZE1", str(nx)),
            ("SIZE2", str(ny)),
            ("PIXEL_SIZE", f"{TIMEPIX_PIXEL_MM:.3f}"),
            ("BIN", "1x1"),
            ("BIN_TYPE", "HW"),
            ("ADC", "fast"),
            ("CREV", "1"),
            ("BEAMLINE", "TimePix_SU"),
            ("DETECTOR_SN", "901"),
            ("DATE", date),
            ("TIME", f"{config.exposure_time:.4f}"),
            ("DISTANCE", f"{config.distance:.4f}"),
            ("TWOTHETA", "0.00"),
            ("PHI", angle_text(start)),
            ("OSC_START", angle_text(start)),
            ("OSC_RANGE", angle_text(config.osc_width)),
            ("WAVELENGTH", f"{config.wavelength:.6f}"),
            ("BEAM_CENTER_X", f"{bx:.4f}"),
            ("BEAM_CENTER_Y", f"{by:.4f}"),
            ("DENZO_X_BEAM", f"{by * TIMEPIX_PIXEL_MM:.4f}"),
            ("DENZO_Y_BEAM", f"{bx * TIMEPIX_PIXEL_MM:.4f}"),
        ]
        text = "{\n" + "".join(f"{k}={v};\n" for k, v in fields) + "}\n"
        if len(text) > SMV_HEADER_BYTES:
            raise ValueError("SMV header longer than HEADER_BYTES")
        return text + " " * (SMV_HEADER_BYTES - len(text))

    def encode(self, config, image: int, data, name: str) -> bytes:
        pixels = np.clip(np.asarray(data), 0, SMV_MAX).astype("<u2")
        return self.header_text(config, image).encode("ascii") + pixels.tobytes()


def ed_simulation(config: EDSimulationConfig) -> Simulation:
    if not isinstance(config, EDSimulationConfig):
        raise TypeError("an EDSimulationConfig is needed")
    return Simulation(config, fmt=SMVTimePix(config.detector))


def ed_ground_truth(sim: Simulation) -> dict:
    """The single-sweep ground truth plus what is particular to electrons."""
    c = sim.config
    truth = sim.ground_truth()
    truth["format"] = "dials-gapfill simulated electron-diffraction sweep, version 1"
    truth["radiation"] = "electrons"
    truth["comment"] = (
        "kinematic intensities (no dynamical scattering); unpolarised beam; rotation axis "
        "as dxtbx' format class fixes it"
    )
    truth["tracking"] = {
        "mode": c.tracking,
        "every": c.tracking_every,
        "frames": c.tracking_frames,
        "comment": "crystal-tracking frames: missing (no file), defocused (direct beam, no Bragg "
        "spots), blank (background only) or zero (all pixels 0)",
    }
    truth["beam_centre_raw_px"] = list(c.beam_centre)
    truth["panels"] = [
        {
            "name": p.get_name(),
            "origin": list(p.get_origin()),
            "fast_axis": list(p.get_fast_axis()),
            "slow_axis": list(p.get_slow_axis()),
            "image_size": list(p.get_image_size()),
            "pixel_size_mm": list(p.get_pixel_size()),
            "raw_image_offset": list(p.get_raw_image_offset()),
        }
        for p in sim.detector
    ]
    return truth


def simulate_ed(config: EDSimulationConfig, directory: str) -> dict:
    """Write the frames of an electron-diffraction sweep into `directory`
    (``<prefix>_00001.img``, ...) and ground_truth.json; return the truth."""
    os.makedirs(directory, exist_ok=True)
    sim = ed_simulation(config)
    truth = ed_ground_truth(sim)
    images = truth["images_written"]
    for image in images:
        _write_atomic(os.path.join(directory, config.filename(image)), sim.image_bytes(image))
    truth["files"] = [config.filename(i) for i in images]
    tmp = os.path.join(directory, f".ground_truth.json.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(truth, fh, separators=(",", ":"))
    os.replace(tmp, os.path.join(directory, "ground_truth.json"))
    return truth
