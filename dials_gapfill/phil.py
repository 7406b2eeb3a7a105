"""The master PHIL scope of dials.process_gapped.

Sub-scopes are named after the step they feed.  DIALS' own scopes are
included, not copied, so every DIALS option of each step stays available:

- ``geometry``, ``format``, ``input.tolerance`` and ``lookup``: dials.import's
- ``spotfinder``: dials.find_spots'
- ``indexing``: dials.index's (``indexing.*``)
- ``refinement``: dials.refine's (``refinement.*``), plus ``refinement.blocks``
- ``integration``, ``profile`` and ``prediction``: dials.integrate's, plus
  ``integration.small_blocks`` and ``integration.gap_partials``
- ``mtz``: dials.export's ``mtz`` scope plus ``mtz.intensity``

Helpers at the bottom turn an extract of this scope into the parameter objects
DIALS' own functions expect (``dials_params_for_*``), starting from the DIALS
command's working PHIL so that its defaults are DIALS' defaults.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import shlex

import iotbx.phil
import libtbx
import libtbx.phil
from dials.algorithms.integration.integrator import phil_scope as integrator_phil
from dials.algorithms.profile_model.factory import phil_scope as profile_phil
from dials.algorithms.spot_finding.factory import phil_scope as spotfinder_phil
from dials.algorithms.spot_prediction.reflection_predictor import (
    phil_scope as prediction_phil,
)
from dials.command_line import (
    dials_import,
    export,
    find_spots,
    index,
    integrate,
    refine,
)
from dials.util.mp import available_cores
from dials.util.options import (
    format_phil_scope,
    geometry_phil_scope,
    tolerance_phil_scope,
)
from libtbx import Auto

from dials_gapfill.errors import GapfillError
from dials_gapfill.util import is_assignment


def _merged(name, scopes, help_text=None):
    """One scope called `name` holding the definitions of several scopes."""
    text = f'{name}\n  .help = "{help_text}"\n{{}}' if help_text else f"{name} {{}}"
    merged = iotbx.phil.parse(text)
    target = merged.objects[0]
    for scope in scopes:
        for obj in scope.objects:
            target.adopt(copy.deepcopy(obj))
    return merged


def _scope(phil, name):
    """The top-level objects called `name` of a parsed phil scope."""
    return [o for o in phil.objects if o.name == name]


_own_phil = """
input
  .help = "Where the images are. Images may also be given as plain command-line"
          "arguments (files, globs or directories)."
{
  images = None
    .type = str
    .multiple = True
    .help = "Image files, glob patterns (quoted or not) or directories. Gaps in"
            "the image numbers split the sweep into blocks."
  template = None
    .type = str
    .multiple = True
    .help = "A file name template with # for the image number digits, e.g."
            "data_####.cbf. Uses the files that exist: missing images are gaps."
  image = None
    .type = str
    .multiple = True
    .help = "xia2-style image range: /path/name_0001.cbf:start:end (repeatable)."
            "Uses the images start..end of that template that exist."
  reference_geometry = None
    .type = path
    .help = "Experimental geometry from this models.expt overrides the geometry"
            "from the image headers (as in dials.import)."
  check_reference_geometry = True
    .type = bool
    .expert_level = 2
    .help = "If True, assert the reference geometry is similar to the image geometry"
  use_beam_reference = True
    .type = bool
    .expert_level = 2
    .help = "If True, the beam from reference_geometry overrides the image headers."
  use_gonio_reference = True
    .type = bool
    .expert_level = 2
    .help = "If True, the goniometer from reference_geometry overrides the headers"
            "(refused where it would erase different settings of several sweeps)."
  use_detector_reference = True
    .type = bool
    .expert_level = 2
    .help = "If True, the detector from reference_geometry overrides the headers"
            "(refused where it would erase different positions of several sweeps)."
}

gaps
  .help = "Missing and bad images: what becomes a gap between blocks."
{
  exclude_images = None
    .type = strings
    .multiple = True
    .help = "Image numbers (1-based, as in the file names) to leave out, as"
            "ranges first:last and single numbers separated by commas, e.g."
            "exclude_images=41:45,81. Excluded files are never opened: each"
            "range becomes a gap between blocks. With several sweeps each"
            "range names its sweep, sweep:first:last, the sweeps numbered from"
            "1 as in the summary (by file-name template), e.g."
            "exclude_images=2:41:45 for sweep 2; DIALS' own exp:first:last"
            "counts experiments from 0."
  exclude_images_multiple = None
    .type = str
    .help = "Leave out every image whose number is a multiple of N (N >= 2), in"
            "every sweep, as DIALS' exclude_images_multiple (DIALS 3.17): e.g."
            "exclude_images_multiple=20 for cRED / 3D ED data whose every 20th"
            "frame is a crystal-tracking image. Combinable with exclude_images;"
            "the files are never opened."
  auto_exclude = True
    .type = bool
    .help = "Find bad images and make them gaps before indexing: files that"
            "cannot be read (truncated, corrupt), blank images (shutter or beam"
            "failure), all-zero images (beam dump), over-exposed images and"
            "images that are not part of the rotation (crystal-tracking frames"
            "of cRED / 3D ED data). Each is logged with its reason and listed"
            "in the summary."
  blank_fraction = 0.1
    .type = float(value_min=0, value_max=1)
    .expert_level = 1
    .help = "An image is blank when its strong-spot count is at most this fraction"
            "of the median count of its neighbours (and significantly low:"
            "gaps.significance)."
  overexposed_factor = 5.0
    .type = float(value_min=1)
    .expert_level = 1
    .help = "An image is over-exposed when the median intensity of its strong"
            "spots exceeds this factor times the median of its neighbours' spots"
            "(and significantly: gaps.significance)."
  isolated_fraction = 0.25
    .type = float(value_min=0, value_max=1)
    .expert_level = 1
    .help = "An image is not part of the rotation (a crystal-tracking frame of"
            "cRED / 3D ED data, a defocused or displaced frame) when the share"
            "of its strong spots that continue into the image before or after"
            "it is at most this fraction of its neighbours' share (and"
            "significantly: gaps.significance)."
  neighbours = 10
    .type = int(value_min=2)
    .expert_level = 1
    .help = "Number of images each side (in the same sweep) used as neighbours"
            "for the tests above."
  significance = 0.001
    .type = float(value_min=0, value_max=1)
    .expert_level = 1
    .help = "Probability, per sweep, of calling a good image blank or"
            "over-exposed by chance: an image must be that unlikely under its"
            "neighbours' statistics (Poisson spot counts; a rank test of spot"
            "intensities), divided by the number of images in the sweep. On"
            "sparse patterns (a few spots per image) a frame is then never"
            "excluded for the chance spread of its spots."
  min_block_images = 1
    .type = int(value_min=1)
    .expert_level = 1
    .help = "Blocks with fewer images than this are dropped (with a warning)."
}

scaling
  .help = "Optional scaling and merging of all blocks as one crystal, in process."
{
  run = False
    .type = bool
    .help = "Scale all blocks together with DIALS (as dials.scale) and write"
            "scaled.mtz (unmerged), merged.mtz and merging statistics."
  anomalous = False
    .type = bool
    .help = "Keep Friedel pairs separate in scaling and merging statistics."
  model = *auto physical KB
    .type = choice
    .help = "DIALS' scaling model (dials.scale model=): auto takes DIALS' choice"
            "(physical for rotation data: scale and decay, absorption on wide"
            "sweeps), and with two or more blocks scales again with KB where that"
            "model diverged (scale factors below 0.001: sparse wedges,"
            "docs/scaling.md); physical or KB as given (KB needs two or more"
            "blocks: one scale and one B per block)."
  d_min = None
    .type = float(value_min=0)
    .help = "High resolution limit for scaling and merging (overrides"
            "scaling.resolution)."
  resolution
    .help = "Automatic high resolution limit (as xia2 and dials.estimate_resolution)"
            "when scaling.d_min is not given."
  {
    cc_half = 0.3
      .type = float(value_min=0, value_max=1)
      .help = "Cut the data where a fit of CC1/2 against resolution (tanh, as"
              "dials.estimate_resolution) falls to this value; the blocks are then"
              "scaled again with that limit. None: no CC1/2 criterion (with"
              "completeness=None and completeness_falloff=None too, all data to"
              "the detector edge). Ignored when scaling.d_min is set."
    misigma = 1.0
      .type = float(value_min=0)
      .help = "Where CC1/2 stays above cc_half as far as it can be measured and"
              "beyond that too few reflections are repeated (sparse or"
              "low-multiplicity data), keep the data as far as a fit of merged"
              "<I/sigma(I)> against resolution (as dials.estimate_resolution"
              "misigma=) stays above this value. None: cut where CC1/2 can last"
              "be measured."
    completeness = None
      .type = float(value_min=0, value_max=1)
      .help = "Also cut where a fit of completeness against resolution (as"
              "dials.estimate_resolution completeness=) falls to this absolute"
              "fraction; the lowest resolution of the limits is used. None:"
              "absolute completeness is not a criterion."
    completeness_falloff = 0.5
      .type = float(value_min=0, value_max=1)
      .help = "Leave out the detector corners: the limit is at most the highest"
              "resolution at which the outer shell of the merging table is at"
              "least this fraction as complete as the median of its other shells"
              "(the shells of dials.scale's table). The lowest resolution of the"
              "limits is used. None: completeness falloff is not a criterion."
  }
}

sanity
  .help = "Data sanity checks: warnings about data that are not what the"
          "headers say (stills posing as rotation data, wrapped overloads, ...)."
{
  run = True
    .type = bool
    .help = "Run the checks and report their warnings (summary, log, JSON)."
  sample_images = 5
    .type = int(value_min=1)
    .expert_level = 1
    .help = "Images read for the detector checks (evenly spaced over the blocks)."
}

output
  .help = "Where results go. Every file is written to a temporary name and"
          "renamed, so no half-written file ever carries a final name."
{
  directory = .
    .type = path
    .help = "Folder for all outputs (created if needed)."
  experiments = integrated.expt
    .type = str
    .help = "Integrated experiments (what dials.scale and xia2.multiplex read)."
  reflections = integrated.refl
    .type = str
    .help = "Integrated reflections."
  mtz = integrated.mtz
    .type = str
    .help = "One unmerged MTZ with all blocks; BATCH equals the image number plus the sweep's batch"
            "offset: 0 for one sweep (1 where its files start at image 0), 0, 100, 200, ... for"
            "several (DIALS' rule); the summary lists them."
  per_block_mtz = True
    .type = bool
    .help = "Also write one MTZ per block, named from output.block_mtz."
  block_mtz = "integrated_{block}.mtz"
    .type = str
    .help = "Name of the per-block MTZ files; {block} is the block number (1, 2, ...)."
  per_sweep_mtz = True
    .type = bool
    .help = "With several sweeps, also write one MTZ per sweep (all its blocks), named from"
            "output.sweep_mtz."
  sweep_mtz = "integrated_sweep{sweep}.mtz"
    .type = str
    .help = "Name of the per-sweep MTZ files; {sweep} is the sweep number (1, 2, ...)."
  scaled_mtz = scaled.mtz
    .type = str
    .help = "Unmerged scaled MTZ (with scaling.run=True)."
  merged_mtz = merged.mtz
    .type = str
    .help = "Merged MTZ (with scaling.run=True)."
  shelx = False
    .type = bool
    .help = "With scaling.run=True, also write the scaled data for SHELX (small-molecule"
            "and electron-diffraction structure solution), as dials.export format=shelx:"
            "<shelx_name>.hkl (unmerged, HKLF 4) and <shelx_name>.ins (wavelength, cell"
            "with esds, space group)."
  shelx_name = scaled
    .type = str
    .help = "The name of the SHELX files without extension: SHELX programs read"
            "name.ins and name.hkl (shelxt name)."
  log = dials.process_gapped.log
    .type = str
    .help = "The log file."
  json = dials.process_gapped.json
    .type = str
    .help = "Machine-readable summary (layout in docs/outputs.md). None: do not write."
  html = dials.process_gapped.html
    .type = str
    .help = "Self-contained HTML report with plots. None: do not write."
  # --- progress (dials_gapfill/progress.py) ---
  progress = *auto bar lines none
    .type = choice
    .help = "Progress of each stage on the terminal (stdout): auto is a bar with"
            "the count of images, the percentage and the time left when stdout is"
            "a terminal, else a plain line every progress_interval seconds; bar,"
            "lines or none force one. The log file gets the plain lines (never the bar)."
  progress_interval = 10
    .type = float(value_min=0.1)
    .expert_level = 1
    .help = "Seconds between the plain progress lines (and so the longest silence"
            "during a stage)."
  # --- end progress ---
}

mp
  .help = "Parallel processing, passed to DIALS' spot finding and integration."
{
  nproc = Auto
    .type = int(value_min=1)
    .help = "Number of processes. Auto: the number of available cores."
  method = *multiprocessing slurm sge pbs lsf drmaa
    .type = choice
    .help = "multiprocessing on this machine, or a batch cluster for spot finding"
            "and integration through Dask (slurm, sge, pbs, lsf: dask-jobqueue,"
            "pip install 'dials-gapfill[cluster]'; README: Running on a cluster)."
            "drmaa (DIALS' own route) does not work with DIALS 3.12 and is refused."
  njobs = 1
    .type = int(value_min=1)
    .help = "Number of cluster jobs (with a cluster method only; on this machine"
            "mp.nproc sets the processes)."
  # --- cluster (dials_gapfill/cluster.py) ---
  cluster
    .help = "The jobs of mp.method=slurm|sge|pbs|lsf (dask-jobqueue)."
  {
    queue = None
      .type = str
      .help = "Queue (Slurm partition). None: the scheduler's default."
    cores = 1
      .type = int(value_min=1)
      .help = "Cores per job; each task runs DIALS with this many processes."
    memory = 4GB
      .type = str
      .help = "Memory per job, e.g. 4GB."
    walltime = 01:00:00
      .type = str
      .help = "Time limit per job (HH:MM:SS). A job that reaches it is replaced."
    job_extra = None
      .type = str
      .multiple = True
      .help = "Extra scheduler lines, e.g. --account=mx1234 (one per line, repeatable)."
    retries = 2
      .type = int(value_min=0)
      .help = "How often a task whose job died (killed, out of time or memory) is"
              "run again on another job before the run stops."
    start_timeout = 600
      .type = float(value_min=1)
      .help = "Seconds to wait for the first job to start."
    python = None
      .type = path
      .help = "Python of the jobs. None: this one (the cluster shares the filesystem)."
    log_directory = None
      .type = path
      .help = "Shared folder for job scripts and logs (a folder of the run inside it is"
              "removed at the end). None: ~/.cache/dials-gapfill."
  }
  # --- end cluster ---
}
"""

_refinement_extra = """
blocks
  .help = "The crystal model of a sweep with gaps (dials.process_gapped)."
{
  model = *continuous per_block
    .type = choice
    .help = "continuous: ONE crystal for the whole rotation, gaps included (as"
            "XDS): indexed and refined on one scan over all images, orientation"
            "scan-varying and smooth across the gaps, cell static; each block"
            "takes its slice of it for integration. Spots cut by a gap are kept"
            "out of the lattice search and give x, y but not phi to refinement."
            "per_block: a copy of the crystal per block, refined scan-varying in"
            "one job with shared beam, detector and goniometer, cells tied (the"
            "documented DIALS recipe for missing images). tie_cells, tie_sigma"
            "and min_*_scan_varying below are per_block's; scan_varying is both's."
  continuous_reindex_cycles = None
    .type = int(value_min=0)
    .expert_level = 1
    .help = "continuous: after the scan-varying refinement, index all spots"
            "again against it and refine again, this many times. None (auto):"
            "while that indexes at least 1 % more of all spots or of one block's"
            "spots, and once more after the first cycle that indexes less (its"
            "job's outliers were judged against a model that had just moved); at"
            "most 6 times (a crystal that turns faster than the lattice search"
            "can follow)."
  continuous_sweep_cells = *shared tied
    .type = choice
    .expert_level = 1
    .help = "continuous, several sweeps: shared, one cell (DIALS' equal-shift"
            "constraints); tied, a cell per sweep restrained to their mean"
            "(unit_cell.restraints.tie_to_group, sigmas tie_sigma). On the four"
            "L-cysteine sweeps tied cells fit their spots a little closer and"
            "land further from the reference cell (docs/sweeps.md)."
  continuous_second_job = True
    .type = bool
    .expert_level = 1
    .help = "continuous: follow the first scan-varying job with one more,"
            "its outliers judged against the first (sweep by sweep) rather than"
            "against the static crystal, even where re-indexing gains nothing:"
            "the static crystal mispredicts a drifting one at the sweep's ends"
            "and its outliers there are good spots (3 blocks: 0.0014 against"
            "0.0032 deg median error; docs/crystal-model.md)."
  continuous_smoother = gaussian *bspline
    .type = choice
    .expert_level = 1
    .help = "continuous: how the scan-varying orientation is interpolated"
            "between its checkpoints. gaussian: DIALS' smoother (a Gaussian-"
            "weighted mean of the nearest three checkpoints). bspline: the same"
            "checkpoints with quadratic B-spline weights, which follow a crystal"
            "turning at a steady or steadily changing rate exactly, to the ends"
            "of the scan."
  continuous_scan_ends = *xy xyz
    .type = choice
    .expert_level = 1
    .help = "continuous: what refinement takes from spots whose rocking curve"
            "a sweep's own first or last image cuts (their phi centroid is"
            "pulled into the scan, as a gap-edge spot's is). xy: treated as the"
            "spots a gap cuts: x and y in the static jobs, and in the"
            "scan-varying jobs the phi as continuous_gap_edges says (modelled:"
            "compared with the rocking curve cut by the scan's end), except in"
            "a sweep whose spots they are half of or more (a short sweep),"
            "which keeps their phi as observed in the static jobs (and, with"
            "continuous_gap_edges=xy, in all). xyz: x, y and phi as observed,"
            "as DIALS does (docs/crystal-model.md)."
  continuous_gap_edges = xy *modelled
    .type = choice
    .expert_level = 1
    .help = "continuous: what the scan-varying refinement takes from spots whose"
            "rocking curve a gap cuts (their phi centroid is pulled into the"
            "block). modelled: x, y and phi, the phi compared with the centroid"
            "of the frames that recorded a Gaussian rocking curve (sigma_m from"
            "the uncut spots) cut by the gap, each spot weighted by what that"
            "centroid tells; x and y only where sigma_m cannot be estimated."
            "xy: x and y only (docs/crystal-model.md)."
  continuous_scan_varying_cell = False
    .type = bool
    .expert_level = 1
    .help = "continuous: let the cell vary through the scan too."
  tie_cells = True
    .type = bool
    .help = "Restrain the unit cells of all blocks to their common mean (DIALS'"
            "unit_cell.restraints.tie_to_group): one crystal, one cell."
  tie_sigma = 0.01 0.01 0.01 0.01 0.01 0.01
    .type = floats(size=6, value_min=0.)
    .expert_level = 1
    .help = "Sigmas of the cell-tie restraint (a, b, c in Angstrom, angles in degrees)."
  min_images_scan_varying = 3
    .type = int(value_min=1)
    .help = "per_block: blocks with fewer images than this keep a static crystal"
            "inside the joint scan-varying job. 3: every block scan-varying, as"
            "dials.refine refines every scan, but blocks of one or two images,"
            "every spot of which a gap cuts (their phi centroids are pulled"
            "into the block); 1: those too."
  min_reflections_scan_varying = 100
    .type = int(value_min=1)
    .help = "per_block: blocks with fewer indexed reflections than this keep a"
            "static crystal (below 100 a block keeps the joint static result)."
  scan_varying = True
    .type = bool
    .help = "Run scan-varying refinement after static refinement."
}
"""

_indexing_extra = """
bravais_lattice = None
  .type = str
  .help = "After indexing in P1, choose a Bravais lattice as dials.refine_bravais_settings"
          "and dials.reindex would: auto (the highest-symmetry setting DIALS recommends)"
          "or a lattice symbol such as oP, tP, mC, hR, cI. None: stay in P1 (unless"
          "indexing.known_symmetry is given)."
blocks
  .help = "How the blocks are indexed (dials.process_gapped)."
{
  lattice_search = *largest joint
    .type = choice
    .help = "largest: search for the lattice in the block with most spots, then"
            "index all blocks with its crystal (the cost does not grow with the"
            "number of blocks); joint: search in all blocks at once, as dials.index."
            "If one fails, the other is tried. With several sweeps the joint search"
            "comes first (another sweep's goniometer setting, as the headers give"
            "it, is rarely exact enough for the crystal of one block)."
  min_indexed_fraction = 0.2
    .type = float(value_min=0, value_max=1)
    .help = "A block whose strong spots index below this fraction (e.g. a wrong"
            "start angle, or no diffraction) is dropped with a warning. With the"
            "continuous model, of the spots its lattice search judged: a spot cut"
            "by a gap that was left out of the search and not matched to the"
            "unrefined crystal's predictions does not count."
  quick_search = True
    .type = bool
    .help = "With indexing.basis_vector_combinations.max_refine=Auto: let DIALS"
            "refine only its first 5 candidate lattices (its number for stills)"
            "and keep the best when it indexes at least quick_search_fraction of"
            "the searched spots; else search all 50 candidates as dials.index does."
            "False: always all 50."
  quick_search_fraction = 0.9
    .type = float(value_min=0, value_max=1)
    .expert_level = 1
    .help = "Fraction of the searched spots the quick search must index to be kept."
}
"""

_integration_extra = """
profile_model = *auto per_block all_blocks
  .type = choice
  .help = "The gaussian_rs profile model (sigma_b, sigma_m). per_block: each"
          "block its own from its own strong spots, as dials.integrate (blocks"
          "with too few spots: integration.small_blocks); all_blocks: one model"
          "from the strong spots of all blocks together (dials/dials#1992),"
          "spots whose rocking curves are cut by a gap left out; auto:"
          "all_blocks with refinement.blocks.model=continuous (one crystal),"
          "per_block with refinement.blocks.model=per_block."
small_blocks
  .help = "Blocks with too few strong spots for their own profile model."
{
  profile = *pooled summation
    .type = choice
    .help = "pooled: take the profile model (sigma_b, sigma_m) from all blocks"
            "together; summation: integrate such blocks by summation only."
}
gap_partials = *combine separate
  .type = choice
  .help = "A reflection whose rocking curve spans a short gap is recorded in"
          "part at the end of one block and in part at the start of the next."
          "combine: measure it once (the two parts' summation counts and"
          "variances added, their partialities added; profile-fitted"
          "intensities averaged with inverse-variance weights), one row in"
          "integrated.refl and the MTZ files; separate: two partial"
          "observations, as DIALS gives them."
"""

_mtz_extra = """
intensity = *profile *sum
  .type = choice(multi=True)
  .help = "Intensities written to integrated.mtz: profile and/or sum (as dials.export)."
"""


# Parallelism is set once, in the top-level ``mp`` scope, and passed to every
# step; these per-step duplicates are removed so that ``nproc=4`` means one thing.
_REMOVED = (
    "spotfinder.mp.nproc",
    "spotfinder.mp.method",
    "spotfinder.mp.njobs",
    "indexing.nproc",
    "refinement.mp.nproc",
    "refinement.reflections.outlier.nproc",
    "integration.mp.nproc",
    "integration.mp.method",
    "integration.mp.njobs",
)

# Short forms accepted on the command line (as dials.index, dials.find_spots
# and xia2 users type them), rewritten to their full path before parsing.
ALIASES = {
    "nproc": "mp.nproc",
    "space_group": "indexing.known_symmetry.space_group",
    "unit_cell": "indexing.known_symmetry.unit_cell",
    "exclude_images": "gaps.exclude_images",
    "exclude_images_multiple": "gaps.exclude_images_multiple",
    "scale": "scaling.run",
    "anomalous": "scaling.anomalous",
    "shelx": "output.shelx",
}


def _remove(master, path):
    parent_path, name = path.rsplit(".", 1)
    for parent in master.get_without_substitution(parent_path):
        parent.objects = [o for o in parent.objects if o.name != name]


def _build_master():

    master = iotbx.phil.parse(_own_phil)
    # input.tolerance: the tolerances dials.import uses to decide shared models
    master.get_without_substitution("input")[0].adopt(
        copy.deepcopy(tolerance_phil_scope.objects[0])
    )
    for scope in (geometry_phil_scope, format_phil_scope):
        master.adopt_scope(copy.deepcopy(scope))
    for obj in _scope(dials_import.phil_scope, "lookup"):
        master.adopt(copy.deepcopy(obj))

    master.adopt_scope(copy.deepcopy(spotfinder_phil))
    indexing = _merged("indexing", _scope(index.phil_scope, "indexing"))
    for obj in iotbx.phil.parse(_indexing_extra).objects:
        indexing.objects[0].adopt(obj)
    master.adopt_scope(indexing)

    # dials.refine's refinement scope, with its program defaults
    refinement = _merged("refinement", _scope(refine.working_phil, "refinement"))
    refinement.objects[0].adopt(iotbx.phil.parse(_refinement_extra).objects[0])
    master.adopt_scope(refinement)

    integration = _merged("integration", _scope(integrator_phil, "integration"))
    for definition in iotbx.phil.parse(_integration_extra).objects:
        integration.objects[0].adopt(definition)
    master.adopt_scope(integration)
    # dials.integrate's profile and prediction scopes, at the top as there
    for scope in (profile_phil, prediction_phil):
        master.adopt_scope(copy.deepcopy(scope))

    mtz = _merged(
        "mtz",
        _scope(export.phil_scope, "mtz"),
        help_text="Options of the MTZ export (dials.export's mtz scope).",
    )
    for obj in iotbx.phil.parse(_mtz_extra).objects:
        mtz.objects[0].adopt(obj)
    master.adopt_scope(mtz)
    for path in _REMOVED:
        _remove(master, path)
    return master


# Defaults where dials.process_gapped differs from the DIALS scopes above, each
# for a reason given in the README.
_overrides = """
mtz.hklout = None
"""


_master = None


def master_phil():
    """The master scope (built once: including DIALS' scopes takes ~0.3 s)."""
    global _master
    if _master is None:
        master = _build_master()
        _master = master.fetch(source=iotbx.phil.parse(_overrides))
    return _master


def rewrite_aliases(args):
    """Command-line words as PHIL reads them: ``nproc=4`` -> ``mp.nproc=4``
    etc. (see ALIASES), and a value with braces (output.block_mtz=x_{block}.mtz,
    PHIL scope syntax unless quoted) quoted as the user meant it."""
    out = []
    for arg in args:
        if "=" in arg and not arg.startswith("-") and not os.path.exists(arg):
            name, value = arg.split("=", 1)
            if re.fullmatch(r"\s*[A-Za-z_][A-Za-z0-9_.]*\s*", name):
                if name.strip() in ALIASES:
                    name = ALIASES[name.strip()]
                if re.search(r"[{}]", value) and not value.strip().startswith(('"', "'")):
                    value = f'"{value}"'
                arg = f"{name}={value}"
        out.append(arg)
    return out


def params_from(params=None):
    """A working extract from None, PHIL text, a list of key=value strings, a
    dict {name: value} or an extract; a GapfillError names what cannot be used."""

    if params is None:
        return working_params("")
    if isinstance(params, str):
        return _from_text(params)
    if isinstance(params, dict):
        # a list value: the parameter given once per item (input.images, exclude_images)
        return _from_args([f"{k}={item}" for k, v in params.items()
                           for item in (v if isinstance(v, (list, tuple)) else [v])])
    if isinstance(params, (list, tuple)):
        return _from_args([str(p) for p in params])
    if not isinstance(params, libtbx.phil.scope_extract):
        raise GapfillError(
            f"params of type {type(params).__name__}: give PHIL text, a list of key=value strings, a dict "
            "or an extract of dials_gapfill.phil.master_phil()"
        )
    return auto_as_word(params)


def assignments(args, master):
    """(arg, PHIL source) of the key=value arguments that are not files and
    that PHIL can read (what it cannot read at all is named elsewhere)."""
    interpreter = master.command_line_argument_interpreter()
    for arg in args:
        if not is_assignment(arg) or os.path.exists(arg):
            continue
        try:
            yield arg, interpreter.process_arg(arg=arg)
        except Exception:
            continue


def conversion_text(e) -> str:
    """cctbx's message for a value it cannot convert, on one line, without
    its prefix and PHIL's location (the caller names the argument or line)."""
    text = " ".join(str(e).split())
    return re.sub(r"^cctbx Error: ", "", re.sub(r" \(command line argument, line \d+\)$", "", text))


def value_error(args, master):
    """The first key=value argument whose value PHIL cannot convert (a
    number, a cell, a space group), as a GapfillError naming it; else None."""
    for arg, source in assignments(args, master):
        try:
            master.fetch(sources=[source]).extract()
        except Exception as e:
            return GapfillError(f"cannot use {arg!r}: {conversion_text(e)}: check the value")
    return None


def definition_error(parsed, fetched, where):
    """The parameter of parsed PHIL (a parameter file, the API's text: `where`
    says which) whose value cannot be converted (a space group cctbx does
    not know): a GapfillError naming it and its line, or None."""
    given = {d.path: d.object for d in parsed.all_definitions()}  # (the last of a name wins, as in PHIL)
    for loc in fetched.all_definitions():
        if loc.path not in given:
            continue
        try:
            loc.object.extract()
        except Exception as e:
            words = " ".join(str(w.value) for w in given[loc.path].words)
            line = re.search(r"line (\d+)", given[loc.path].where_str or "")
            at = f" line {line.group(1)}" if line else ""
            return GapfillError(f"{where}{at}: cannot use {loc.path} = {words}: {conversion_text(e)}: check the value")
    return None


def _from_text(text):
    """PHIL text (e.g. a .phil file's content), or on one line command-line
    words (short forms and all: "nproc=4 exclude_images=41:45"; a # is then
    part of a word, as in template=x_####.cbf, not a PHIL comment)."""
    if "\n" not in text.strip():
        try:
            words = _words(text)
        except GapfillError:
            words = None
        # (one line of PHIL with scopes, "a { b = 1 }", has words that are not assignments)
        if words and all("=" in w and not w.startswith(("{", "}")) for w in words):
            return _from_args(words)
    try:
        parsed = iotbx.phil.parse(text)
    except Exception as e:
        raise GapfillError(f"cannot read the PHIL text: {' '.join(str(e).split())}") from None
    check_cell_words(parsed)
    try:
        fetched, unused = master_phil().fetch(source=parsed, track_unused_definitions=True)
    except Exception as e:
        raise GapfillError(f"bad parameter value: {' '.join(str(e).split())}") from None
    if unused:
        first = unused[0]
        line = re.search(r"line (\d+)", getattr(first.object, "where_str", "") or "")
        where = f"line {line.group(1)}: " if line else ""
        raise GapfillError(f"in the PHIL text, {where}{unknown_parameter(first.path, 'PHIL text')}")
    try:
        return auto_as_word(fetched.extract())
    except Exception as e:
        raise definition_error(parsed, fetched, "in the PHIL text") or GapfillError(
            f"bad parameter value: {' '.join(str(e).split())}") from None


def _words(line):
    """Command-line words of one line of text ("nproc = 4" as "nproc=4")."""
    try:
        return shlex.split(re.sub(r"\s*=\s*", "=", line))
    except ValueError as e:
        raise GapfillError(f"cannot read the parameters {line!r}: {e}") from None


def unknown_parameter(arg, where="a parameter file", master=None):
    """The message for an unknown parameter (arg: name or name=value): the
    closest parameter names, or for a short form (which reaches PHIL
    unchanged only from outside the command line) its full name."""
    name = arg.split("=", 1)[0].strip()
    paths = [d.path for d in (master or master_phil()).all_definitions()]
    leaves = {}
    for p in paths:
        leaves.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    close = difflib.get_close_matches(name, paths, n=3, cutoff=0.6)
    for leaf in difflib.get_close_matches(name.rsplit(".", 1)[-1], list(leaves), n=3, cutoff=0.7):
        close.extend(p for p in leaves[leaf] if p not in close)
    hint = f"; did you mean {', '.join(close[:4])}?" if close else ""
    if name in ALIASES:
        hint = f"; in {where} write its full name, {ALIASES[name]} (the short form is for the command line)"
    return f"unknown parameter {arg!r}{hint}"


# this project's choices whose first word is auto: PHIL extracts a typed
# `auto` as libtbx's Auto but the default as the word, and the code compares
# words (DIALS' own choices are left as DIALS reads them)
AUTO_CHOICES = ("scaling.model", "output.progress", "integration.profile_model")


def auto_as_word(params):
    """params, with AUTO_CHOICES given as Auto set to the word "auto"."""
    for path in AUTO_CHOICES:
        *names, leaf = path.split(".")
        scope = params
        for name in names:
            scope = getattr(scope, name, None)
        if scope is not None and getattr(scope, leaf, None) is libtbx.Auto:
            setattr(scope, leaf, "auto")
    return params


def six_numbers(value: str) -> bool:
    """Whether a unit_cell value has six words (a,b,c,alpha,beta,gamma)."""
    return len([v for v in re.split(r"[,\s]+", value.strip()) if v]) == 6


def check_cell_words(parsed, where: str = "") -> None:
    """Raise GapfillError where a parsed PHIL scope sets a unit_cell to other
    than six numbers: cctbx would fill in the rest (unit_cell=5,5 reads as
    5, 5, 1, 90, 90, 90) and indexing would search for a cell nobody gave."""
    for d in parsed.all_definitions():
        if d.object.name != "unit_cell":
            continue
        words = " ".join(str(w.value) for w in d.object.words)
        if words.strip().lower() in ("", "none"):
            continue
        if not six_numbers(words):
            raise GapfillError(
                f"{d.path}={words}{where}: give the six cell parameters a,b,c,alpha,beta,gamma "
                "(e.g. unit_cell=5.42,8.13,12.02,90,90,90)"
            )


def text_changed_error(arg, source, master):
    """A GapfillError where the key=value argument `arg` (`source`: PHIL's
    reading of it) sets a path or text parameter to other text than given
    (';' ends a value, '#' starts a comment, runs of blanks in a file name
    become one space: the run would read or write somewhere else), with the
    quoting that keeps it; else None."""
    given = arg.partition("=")[2].strip()
    for d in source.all_definitions():
        words = d.object.words
        if any(w.quote_token for w in words):
            continue
        definition = master.get(d.path).objects
        kind = definition[0].type.phil_type if definition else None
        read = " ".join(str(w.value) for w in words)
        # blanks matter in a file name (the paths, the images'), not in a
        # list of words or ranges
        names_a_file = kind == "path" or d.path.startswith("input.")
        if kind in ("path", "str", "strings") and (
                read != given if names_a_file else read.split() != given.split()):
            return GapfillError(
                f"{d.path}: PHIL reads {given!r} as {read!r} (';' ends a value, '#' starts a comment, blanks run "
                f"together): quote it for PHIL, {d.path}=\"{given}\" (in single quotes on the command line)"
            )
    return None


def quoting_error(arg, master):
    """A GapfillError with the quoting that keeps the value where PHIL
    cannot read the key=value argument `arg` as it is (``output.directory=
    run;2``: ';' ends the value and leaves '2' as a parameter of its own) but
    reads it quoted; else None."""
    key, _, value = arg.partition("=")
    if not value or '"' in value or not any(c in value for c in ";#"):
        return None
    try:
        source = master.command_line_argument_interpreter().process_arg(arg=f'{key}="{value.strip()}"')
    except Exception:
        return None
    paths = [d.path for d in source.all_definitions()]
    if len(paths) != 1:
        return None
    definition = master.get(paths[0]).objects
    if not definition or definition[0].type.phil_type not in ("path", "str", "strings"):
        return None  # (a number or a choice quoted is no better)
    return GapfillError(
        f"{paths[0]}: PHIL cannot read {value.strip()!r} unquoted (';' ends a value, '#' starts a comment): "
        f"quote it for PHIL, {paths[0]}=\"{value.strip()}\" (in single quotes on the command line)"
    )


def _from_args(args):

    interpreter = master_phil().command_line_argument_interpreter()
    sources = []
    for arg in rewrite_aliases(args):
        try:
            sources.append(interpreter.process_arg(arg=arg))
        except Exception as e:
            if "Unknown command line parameter definition" in str(e):
                raise GapfillError(unknown_parameter(arg, "the parameters")) from None
            raise quoting_error(arg, master_phil()) or GapfillError(
                f"cannot use {arg!r}: {' '.join(str(e).split())}") from None
        err = text_changed_error(arg, sources[-1], master_phil())
        if err is not None:
            raise err
        check_cell_words(sources[-1])
    try:
        return auto_as_word(master_phil().fetch(sources=sources).extract())
    except Exception as e:
        raise value_error(rewrite_aliases(args), master_phil()) or GapfillError(
            f"bad parameter value: {' '.join(str(e).split())}") from None


def working_params(text: str = ""):
    """Extract of the master scope with `text` (PHIL) applied."""
    return auto_as_word(master_phil().fetch(source=iotbx.phil.parse(text)).extract())


# --------------------------------------------------------------------------
# DIALS parameter objects for each step
# --------------------------------------------------------------------------


def defaults(scope):
    """Extract of a DIALS phil scope with its defaults.

    (scope.extract() on a scope that was never fetched leaves .multiple
    definitions as [None], which DIALS code does not expect.)
    """
    return scope.fetch(source=iotbx.phil.parse("")).extract()


def resolve_nproc(nproc):
    if nproc is Auto or nproc is None:

        return available_cores()
    return int(nproc)


def dials_import_params(params):
    """Parameters in the shape dials.import's MetaDataUpdater expects."""

    p = defaults(dials_import.phil_scope)
    p.geometry = params.geometry
    p.format = params.format
    p.lookup = params.lookup
    for name in (
        "reference_geometry",
        "check_reference_geometry",
        "use_beam_reference",
        "use_gonio_reference",
        "use_detector_reference",
    ):
        setattr(p.input, name, getattr(params.input, name))
    p.input.__inject__("tolerance", params.input.tolerance)
    p.identifier_type = None
    return p


def _set(extract, name, value):
    """Set an attribute of a PHIL extract, creating it if the master lacks it."""
    if name in extract.__dict__:
        setattr(extract, name, value)
    else:
        extract.__inject__(name, value)


def _set_mp(scope, params, none_word):
    _set(scope, "nproc", resolve_nproc(params.mp.nproc))
    method = params.mp.method
    _set(scope, "method", none_word if method == "multiprocessing" else method)
    _set(scope, "njobs", params.mp.njobs)
    if method in ("slurm", "sge", "pbs", "lsf"):
        # cluster runs (dials_gapfill/cluster.py): DIALS cuts njobs x cores pieces
        _set(scope, "nproc", params.mp.cluster.cores)


def dials_spotfinder_params(params):

    p = defaults(find_spots.working_phil)
    p.spotfinder = copy.deepcopy(params.spotfinder)
    _set_mp(p.spotfinder.mp, params, "none")
    p.output.shoeboxes = True
    return p


# Dense matrices (refinement.parameterisation.sparse=False) when sparse is Auto
# and the job has at most this many scan-varying blocks.  DIALS' Auto picks
# sparse for any job with more than one experiment or scan-varying models; for
# the few dozen parameters of shared models plus a crystal per block the dense
# solver solves the same normal equations 2-3x faster (dials.refine on a
# 3-block sweep: 64 s sparse, 24 s dense, identical RMSDs).  Static jobs with
# one crystal (indexing, static refinement) are always small.
DENSE_MAX_BLOCKS = 20


def _refinement(params, n_blocks=1):
    """Our refinement scope as DIALS' (n_blocks: blocks with their own crystal)."""
    refinement = copy.deepcopy(params.refinement)
    # dials.refine's Auto, which DIALS' Refiner does not take: each step of
    # the pipeline sets static or scan-varying itself
    if refinement.parameterisation.scan_varying is Auto:
        refinement.parameterisation.scan_varying = False
    _set(refinement.mp, "nproc", 1)
    # one process: DIALS' outlier rejection with nproc > 1 hands its jobs to
    # forked workers that all start from the parent's random state, so which
    # worker takes which job (scheduling) changes the MCD subsets, the
    # outliers and the refined cell (measured: 1266 vs 1267 reflections, cell
    # 5e-6 apart, in two runs of the same command); in one process the jobs
    # draw from one random stream in order, and the result is reproducible
    _set(refinement.reflections.outlier, "nproc", 1)
    if refinement.parameterisation.sparse is Auto and n_blocks <= DENSE_MAX_BLOCKS:
        refinement.parameterisation.sparse = False
    return refinement


def dials_index_params(params, n_blocks=1):

    p = defaults(index.working_phil)
    p.indexing = copy.deepcopy(params.indexing)
    _set(p.indexing, "nproc", resolve_nproc(params.mp.nproc))
    refinement = _refinement(params, n_blocks)
    # dials.index's own defaults where they differ from dials.refine's: static,
    # on a sample of 100 reflections per degree
    if refinement.reflections.reflections_per_degree is Auto:
        refinement.reflections.reflections_per_degree = 100
    p.refinement = refinement
    return p


def dials_refine_params(params, n_blocks=1):

    p = defaults(refine.working_phil)
    p.refinement = _refinement(params, n_blocks)
    return p


def dials_integrate_params(params):

    p = defaults(integrate.working_phil)
    p.integration = copy.deepcopy(params.integration)
    p.profile = copy.deepcopy(params.profile)
    p.prediction = copy.deepcopy(params.prediction)
    _set_mp(p.integration.mp, params, "multiprocessing")
    return p


def with_images(params, images=()):
    """A copy of `params` whose input.images also holds the image arguments
    given apart from it (the command line's plain words, the API's images=),
    so that the working parameters reproduce the run."""
    images = [i for i in images or [] if i not in (params.input.images or [])]
    if not images:
        return params
    params = copy.deepcopy(params)
    params.input.images = list(params.input.images or []) + list(images)
    return params


def working_text(params, images=()) -> str:
    """Every parameter of the run as PHIL text (the image arguments included)."""
    return master_phil().format(python_object=with_images(params, images)).as_str()


def modified_text(params, images=()) -> str:
    """The parameters that differ from the defaults, as PHIL text (the image
    arguments included): what the log and the reports call modified."""
    master = master_phil()
    return master.fetch_diff(source=master.format(python_object=with_images(params, images))).as_str()
