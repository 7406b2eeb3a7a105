"""Write a simulated sweep as one NeXus NXmx HDF5 file that dxtbx reads.

The file holds the same sweep as the miniCBF files of
:mod:`dials_gapfill.simulation.simulate`: the geometry is taken from the dxtbx models the
simulation itself uses (the ones dxtbx builds from the CBF headers), converted
from dxtbx' imgCIF frame to the McStas frame of NeXus, and the pixels are
``Simulation.render`` of each image, bit for bit.  dxtbx (``FormatNXmx``)
reads back the same beam, detector (origin, axes, pixel size, image size,
trusted range, sensor), goniometer and oscillation.

Layout (NXmx, https://manual.nexusformat.org/classes/applications/NXmx.html)::

  /entry                         NXentry, definition = "NXmx"
    data/data                    (n, slow, fast) int32, one chunk per image, gzip
    instrument/                  NXinstrument, name "dials-gapfill simulator"
      beam/incident_wavelength   angstrom
      detector/                  NXdetector (sensor, saturation, pixel_mask, ...)
        data                     hard link to /entry/data/data
        transformations/translation   distance along the detector normal
        module/                  NXdetector_module: data_origin, data_size,
                                 module_offset, fast/slow_pixel_direction
    sample/depends_on            -> sample/transformations/omega
    sample/transformations/omega start angle of each image (omega_end, _increment_set)

Only what NeXus can say is written: one contiguous run of images (a NeXus
sweep has no holes; gaps come from ``gaps.exclude_images`` at import), and
dxtbx numbers the images of the file 1..n whatever their numbers in the
simulation.  The output is deterministic (no HDF5 timestamps, fixed epoch)
and written to a temporary name that is renamed when complete.
"""

from __future__ import annotations

import json
import os

import numpy as np

# dxtbx' imgCIF frame -> NeXus' McStas frame (its own inverse), as in dxtbx.nexus
MCSTAS_FROM_IMGCIF = np.diag([-1.0, 1.0, -1.0])
DETECTOR_PATH = "/entry/instrument/detector"
FILE_MODES = ("blank", "zero", "overexposed", "flare", "saturated")  # bad-image modes a NeXus file can hold
INSTRUMENT_NAME = "dials-gapfill simulator"


def master_filename(config) -> str:
    return f"{config.prefix}_master.h5"


# --------------------------------------------------------------------------
# h5py helpers: no timestamps, so the same input gives the same bytes
# --------------------------------------------------------------------------


def _group(parent, name: str, nx_class: str):
    import h5py

    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    gcpl.set_obj_track_times(False)
    gid = h5py.h5g.create(parent.id, name.encode(), gcpl=gcpl)
    group = h5py.Group(gid)
    group.attrs["NX_class"] = nx_class
    return group


def _text(parent, name: str, value: str, **attrs):
    ds = parent.create_dataset(name, data=np.bytes_(value.encode()), track_times=False)
    for k, v in attrs.items():
        ds.attrs[k] = v
    return ds


def _number(parent, name: str, value, units: str | None = None, dtype="f8", **attrs):
    ds = parent.create_dataset(name, data=np.asarray(value, dtype=dtype), track_times=False)
    if units is not None:
        ds.attrs["units"] = units
    for k, v in attrs.items():
        ds.attrs[k] = v
    return ds


def _axis(parent, name, values, kind, vector, units, depends_on, offset=None):
    """An NXtransformations axis (a field with transformation attributes)."""
    ds = _number(parent, name, values, units)
    ds.attrs["transformation_type"] = kind
    ds.attrs["vector"] = np.asarray(vector, dtype="f8")
    if offset is not None:
        ds.attrs["offset"] = np.asarray(offset, dtype="f8")
        ds.attrs["offset_units"] = "mm"
    ds.attrs["depends_on"] = depends_on
    return ds


# --------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------


def _images_to_write(simulation, images) -> list[int]:
    config = simulation.config
    if images is None:
        images = [i for i in config.image_numbers if i not in config.omit]
    images = sorted({int(i) for i in images})
    if not images:
        raise ValueError("no images to write")
    known = set(config.image_numbers)
    outside = [i for i in images if i not in known]
    if outside:
        raise ValueError(
            f"images {outside[0]}... are not in the simulated sweep "
            f"({config.first_image}-{config.image_numbers[-1]})"
        )
    if images[-1] - images[0] + 1 != len(images):
        holes = sorted(set(range(images[0], images[-1] + 1)) - set(images))
        raise ValueError(
            f"a NeXus sweep cannot have holes: images {holes[0]}... are missing between "
            f"{images[0]} and {images[-1]}; write a contiguous range (gaps come from "
            "gaps.exclude_images when the file is processed)"
        )
    for i in images:
        mode = config.bad_images.get(i)
        if mode is not None and mode not in FILE_MODES:
            raise ValueError(
                f"bad image mode {mode!r} (image {i}) corrupts a file, which one NeXus "
                f"file cannot show per image: use {', '.join(FILE_MODES)} with NeXus"
            )
    return images


def _panel_geometry(panel):
    """(distance, normal, module offset, fast, slow) of a panel in McStas, mm."""
    fast = MCSTAS_FROM_IMGCIF @ np.array(panel.get_fast_axis())
    slow = MCSTAS_FROM_IMGCIF @ np.array(panel.get_slow_axis())
    origin = MCSTAS_FROM_IMGCIF @ np.array(panel.get_origin())
    normal = MCSTAS_FROM_IMGCIF @ np.array(panel.get_normal())
    distance = panel.get_distance()  # origin . normal
    if distance < 0:
        normal, distance = -normal, -distance
    offset = origin - distance * normal
    return distance, normal, offset, fast, slow


def _write(fh, simulation, images, compression) -> None:
    config = simulation.config
    beam, detector, goniometer, scan = (
        simulation.beam,
        simulation.detector,
        simulation.goniometer,
        simulation.scan,
    )
    if len(detector) != 1:
        raise ValueError("only single-panel detectors are written")
    panel = detector[0]
    nx, ny = panel.get_image_size()
    n = len(images)
    first = config.first_image

    fh.attrs["default"] = "entry"
    fh.attrs["creator"] = "dials_gapfill.simulation.nexus_writer"
    entry = _group(fh, "entry", "NXentry")
    entry.attrs["default"] = "data"
    _text(entry, "definition", "NXmx")
    _text(entry, "start_time", "2026-01-01T00:00:00Z")
    _text(entry, "end_time_estimated", "2026-01-01T00:00:00Z")

    # ---- data: (n, slow, fast) int32, one chunk per image
    data_group = _group(entry, "data", "NXdata")
    data_group.attrs["signal"] = "data"
    filters = {}
    if compression == "gzip":
        filters = dict(compression="gzip", compression_opts=1, shuffle=True)
    elif compression not in (None, "none"):
        raise ValueError(f"compression {compression!r}: use 'gzip' or None")
    data = data_group.create_dataset(
        "data",
        shape=(n, ny, nx),
        dtype="<i4",
        chunks=(1, ny, nx),
        track_times=False,
        **filters,
    )
    for k, image in enumerate(images):
        pixels = simulation.render(image, config.bad_images.get(image))
        if pixels.shape != (ny, nx):
            raise ValueError(f"image {image} has shape {pixels.shape}, expected {(ny, nx)}")
        data[k] = pixels
    data.attrs["image_nr_low"] = np.int32(1)
    data.attrs["image_nr_high"] = np.int32(n)

    # ---- sample and goniometer: one rotation axis, the scan axis
    sample = _group(entry, "sample", "NXsample")
    _text(sample, "name", "simulated crystal")
    axes = _group(sample, "transformations", "NXtransformations")
    omega_path = "/entry/sample/transformations/omega"
    axis = MCSTAS_FROM_IMGCIF @ np.array(goniometer.get_rotation_axis_datum())
    if not (
        np.allclose(goniometer.get_fixed_rotation(), np.identity(3).ravel())
        and np.allclose(goniometer.get_setting_rotation(), np.identity(3).ravel())
    ):
        raise ValueError("only a single-axis goniometer without fixed/setting rotation is written")
    start, width = scan.get_oscillation()  # degrees, image `first`
    starts = np.array([start + (i - first) * width for i in images])
    _axis(axes, "omega", starts, "rotation", axis, "deg", ".")
    _number(axes, "omega_end", starts + width, "deg")
    _number(axes, "omega_increment_set", width, "deg")
    _text(sample, "depends_on", omega_path)

    # ---- instrument, source, beam
    instrument = _group(entry, "instrument", "NXinstrument")
    _text(instrument, "name", INSTRUMENT_NAME, short_name="SIM")
    source = _group(instrument, "source", "NXsource")
    _text(source, "name", "simulated synchrotron", short_name="SIM")
    _text(source, "type", "Synchrotron X-ray Source")
    nxbeam = _group(instrument, "beam", "NXbeam")
    _number(nxbeam, "incident_wavelength", beam.get_wavelength(), "angstrom")
    # the beam must come along -z (dxtbx' NXmx reader assumes it)
    if not np.allclose(beam.get_sample_to_source_direction(), (0, 0, 1)):
        raise ValueError("only a beam along -z is written")

    # ---- detector
    det = _group(instrument, "detector", "NXdetector")
    distance, normal, offset, fast, slow = _panel_geometry(panel)
    low, high = panel.get_trusted_range()
    _text(det, "description", f"{config.detector.upper().replace('PILATUS', 'PILATUS ')} (simulated)")
    _text(det, "type", "Pixel")
    _text(det, "depends_on", f"{DETECTOR_PATH}/transformations/translation")
    _text(det, "sensor_material", panel.get_material() or "Si")
    _number(det, "sensor_thickness", panel.get_thickness(), "mm")
    # dxtbx: trusted_range = (underload_value - 1, saturation_value)
    _number(det, "underload_value", int(round(low)) + 1, dtype="i4")
    _number(det, "saturation_value", int(round(high)), dtype="i4")
    _number(det, "bit_depth_readout", 32, dtype="i4")
    _number(det, "count_time", config.exposure_time, "s")
    _number(det, "frame_time", config.exposure_time, "s")
    _number(det, "distance", distance, "mm")
    bx, by = panel.get_beam_centre_px(beam.get_s0())
    _number(det, "beam_center_x", bx, "pixel")
    _number(det, "beam_center_y", by, "pixel")
    # module gaps and untrusted rectangles: bit 0 (gap) of the NXmx pixel mask
    mask = np.zeros((ny, nx), dtype="<u4")
    for x0, y0, x1, y1 in (tuple(m) for m in panel.get_mask()):
        mask[y0:y1, x0:x1] = 1
    det.create_dataset(
        "pixel_mask", data=mask, chunks=(ny, nx), compression="gzip",
        compression_opts=1, track_times=False,
    )
    _number(det, "pixel_mask_applied", 0, dtype="i1")
    det["data"] = data  # hard link: the same dataset

    transformations = _group(det, "transformations", "NXtransformations")
    translation = f"{DETECTOR_PATH}/transformations/translation"
    _axis(transformations, "translation", [distance], "translation", normal, "mm", ".")

    module = _group(det, "module", "NXdetector_module")
    module_path = f"{DETECTOR_PATH}/module"
    _number(module, "data_origin", [0, 0], dtype="i4")
    _number(module, "data_size", [ny, nx], dtype="i4")
    _number(module, "data_stride", [1, 1], dtype="i4")
    _axis(module, "module_offset", [0.0], "translation", (1.0, 0.0, 0.0), "mm", translation, offset=offset)
    px, py = panel.get_pixel_size()
    _axis(module, "fast_pixel_direction", [px], "translation", fast, "mm", f"{module_path}/module_offset", offset=(0, 0, 0))
    _axis(module, "slow_pixel_direction", [py], "translation", slow, "mm", f"{module_path}/module_offset", offset=(0, 0, 0))


def write_nxmx(simulation, path: str, images=None, compression: str | None = "gzip") -> list[int]:
    """Write images of `simulation` as one NXmx file at `path`; return the image numbers.

    `images`: the simulation's image numbers to write, a contiguous run (default:
    all images not in ``config.omit``).  dxtbx numbers them 1..n in the file; the
    rotation angles are those of the simulation.  Images listed in
    ``config.bad_images`` with mode blank, zero or overexposed are rendered so;
    truncated and garbage cannot be (ValueError).  Written to a temporary name
    in the same folder and renamed when complete.
    """
    import h5py

    images = _images_to_write(simulation, images)
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as fh:
            _write(fh, simulation, images, compression)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return images


def format_class_of(path: str) -> str:
    """Name of the dxtbx format class that reads `path`."""
    from dxtbx.format.Registry import get_format_class_for_file

    cls = get_format_class_for_file(path)
    return cls.__name__ if cls is not None else "unknown"


def simulate_nexus(config, directory: str) -> dict:
    """As ``simulate.simulate``, but one ``<prefix>_master.h5`` NXmx file.

    Writes the file and ``ground_truth.json`` (the simulation's ground truth
    with ``files`` = [the master file], ``format_class`` = the dxtbx class that
    reads it and ``image_numbers_in_file`` = [1, n]) into `directory`.
    """
    from dials_gapfill.simulation.simulate import Simulation

    os.makedirs(directory, exist_ok=True)
    sim = Simulation(config)
    truth = sim.ground_truth()
    name = master_filename(config)
    path = os.path.join(directory, name)
    images = write_nxmx(sim, path, truth["images_written"])
    truth["images_written"] = images
    truth["files"] = [name]
    truth["format_class"] = format_class_of(path)
    truth["image_numbers_in_file"] = [1, len(images)]
    tmp = os.path.join(directory, f".ground_truth.json.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(truth, fh, separators=(",", ":"))
    os.replace(tmp, os.path.join(directory, "ground_truth.json"))
    return truth
