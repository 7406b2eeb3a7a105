"""Every place where dials.process_gapped replaces or reaches into DIALS at run time.

A DIALS upgrade has this one file to audit.  Each entry says what it changes,
why, and what happens on a DIALS where the thing it needs is not there (the
code branches on what exists, never on version numbers): it falls back to
DIALS' own behaviour.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re

import dials.algorithms.merging.merge as dials_merge
import dials.algorithms.symmetry as dials_symmetry
import dials.command_line.integrate as dials_integrate
import dials.util.export_mtz as dials_export_mtz
from dials.algorithms.indexing.known_orientation import IndexerKnownOrientation
from dials.algorithms.integration import processor as integration_processor
from dials.algorithms.refinement import engine
from dials.algorithms.refinement.parameterisation import configure
from dials.algorithms.refinement.parameterisation.crystal_parameters import (
    CrystalOrientationParameterisation,
    CrystalUnitCellParameterisation,
)
from dials.algorithms.refinement.parameterisation.scan_varying_model_parameters import (
    ScanVaryingModelParameterisation,
)
from dials.algorithms.spot_finding import finder as spot_finder
from dials.array_family import flex
from dxtbx.model import Experiment
from dxtbx.model.experiment_list import ExperimentList

logger = logging.getLogger("dials.process_gapped.indexing")


@contextlib.contextmanager
def replaced(owner, name: str, replacement):
    """``owner.name`` is `replacement` while the block runs, then what it was.

    Yields False (nothing replaced) when `owner` has no attribute `name`: the
    caller then runs DIALS' own code.
    """
    original = getattr(owner, name, None)
    if original is None:
        yield False
        return
    setattr(owner, name, replacement)
    try:
        yield True
    finally:
        setattr(owner, name, original)


# --------------------------------------------------------------------------
# Refinement: DIALS' centroid outlier rejection, its jobs in parallel and reproducible
# --------------------------------------------------------------------------


class _SeededJobs:
    """Each job of DIALS' centroid outlier rejection (one experiment's phi
    block) draws its random numbers (the MCD's subsets) from a seed of its
    own, so that which process runs it and in which order does not matter."""

    seed = 0

    def _run_job(self, job, i):
        flex.set_random_seed(self.seed + i)
        return super()._run_job(job, i)


_SEEDED = {}


def seeded_outlier_jobs(detector, seed: int, nproc: int):
    """`detector` (a DIALS CentroidOutlier) running its jobs on `nproc`
    processes, job i seeded with seed + i.

    DIALS' own outlier.nproc > 1 forks workers that all start from the
    parent's random state, so the outliers would depend on scheduling; with
    one seed per job they are the same for every nproc.  The MCD is most of
    the cost of the continuous model's outlier rejection (about 0.9 s per
    job, ten jobs on the 3-block sweep).  Where the detector has no
    ``_run_job``/``nproc`` (another DIALS) it is returned as it is and runs
    as DIALS runs it.
    """
    base = type(detector)
    if not callable(getattr(base, "_run_job", None)) or not hasattr(detector, "nproc"):
        return detector
    cls = _SEEDED.get(base)
    if cls is None:
        # a module-level name, so that the pool's workers can unpickle it
        name = f"_Seeded{base.__name__}"
        cls = type(name, (_SeededJobs, base), {"__module__": __name__, "__qualname__": name})
        globals()[name] = cls
        _SEEDED[base] = cls
    detector.__class__ = cls
    detector.seed = int(seed)
    detector.nproc = max(1, int(nproc))
    return detector


# --------------------------------------------------------------------------
# Refinement: static crystals inside a scan-varying job
# --------------------------------------------------------------------------


@contextlib.contextmanager
def static_crystals_in_scan_varying_job(experiment_ids):
    """Parameterise the crystals of the experiments `experiment_ids` (their
    positions in the job's experiment list) statically inside a scan-varying
    refinement.

    DIALS chooses static or scan-varying for all crystals of a job; its
    scan-varying prediction parameterisation accepts a mix.  The choice is made
    per crystal by wrapping ``configure._parameterise_crystals`` for the
    duration of one job.  Crystals are named by their experiments, not as
    objects: DIALS' refiner parameterises copies of the experiments' models
    (``_copy_experiments_for_refining``).  Yields False where that function
    does not exist (another DIALS): all crystals are then scan-varying.
    """
    static_ids = set(experiment_ids)
    if not static_ids:
        yield True
        return
    original = getattr(configure, "_parameterise_crystals", None)

    def static_version(p, cls):
        if not hasattr(p, "num_sets") or not set(p.get_experiment_ids()) <= static_ids:
            return p
        static = cls(p.get_model(), experiment_ids=p.get_experiment_ids())
        static.model_identifier = p.model_identifier
        return static

    def parameterise(options, experiments, analysis):
        ori, uc = original(options, experiments, analysis)
        ori = [static_version(p, CrystalOrientationParameterisation) for p in ori]
        uc = [static_version(p, CrystalUnitCellParameterisation) for p in uc]
        return ori, uc

    with replaced(configure, "_parameterise_crystals", parameterise) as done:
        yield done


def fix_crystal_orientations(rp, experiment_ids, experiments) -> None:
    """Leave the orientations of the crystals of `experiment_ids` (positions
    in `experiments`) out of the job of `rp`: DIALS' crystal.orientation.fix_list
    with the names configure gives them, ``Crystal<k>Phi`` for the k-th of
    ``experiments.crystals()``; a crystal with every parameter fixed is not
    parameterised at all.  (auto_reduction.action=fix, DIALS' remedy, ends
    in an AssertionError in DIALS 3.12 where a job mixes static and
    scan-varying crystals.)"""
    crystals = ExperimentList(list(experiments)).crystals()
    names = set()
    for i in experiment_ids:
        k = next(k for k, c in enumerate(crystals) if c is experiments[i].crystal)
        names.add(f"Crystal{k + 1}Phi")
    orientation = rp.refinement.parameterisation.crystal.orientation
    orientation.fix_list = sorted(set(orientation.fix_list or []) | names)


def crystals_refused_for_too_few_reflections(message: str, experiments) -> set[int]:
    """The experiments (positions in `experiments`) whose crystal DIALS'
    auto-reduction refused to parameterise in a failed job: its message
    ("Too few reflections to parameterise Crystal4Phi1_sample0, ...") names
    the parameters, each prefixed with its crystal's model identifier,
    ``Crystal<k>`` for the k-th of ``experiments.crystals()``
    (configure._parameterise_crystals).  Empty where the message is another."""
    if "Too few reflections to parameterise" not in message:
        return set()
    crystals = ExperimentList(list(experiments)).crystals()
    ids = set()
    for k in {int(m) for m in re.findall(r"\bCrystal(\d+)", message)}:
        if 1 <= k <= len(crystals):
            ids.update(i for i, e in enumerate(experiments) if e.crystal is crystals[k - 1])
    return ids


_MODELS = {"Beam": "beam", "Detector": "detector", "Goniometer": "goniometer"}


def models_refused_for_too_few_reflections(message: str, experiments) -> dict[str, set[int]]:
    """The beam, detector and goniometer parameters DIALS' auto-reduction
    refused in a failed job, by name as its message gives them
    ("Too few reflections to parameterise Detector2Dist, Detector2Shift1,
    ..."; ``Detector<k>`` the k-th of ``experiments.detectors()``,
    configure._parameterise_detectors), each with the experiments (positions
    in `experiments`) that use that model.  Empty where the message is another."""
    if "Too few reflections to parameterise" not in message:
        return {}
    elist = ExperimentList(list(experiments))
    out = {}
    for kind, k, rest in re.findall(r"\b(Beam|Detector|Goniometer)(\d+)([A-Za-z]\w*)", message):
        models = getattr(elist, _MODELS[kind] + "s")()
        if not 1 <= int(k) <= len(models) or "_sample" in rest:
            continue
        model = models[int(k) - 1]
        out[f"{kind}{k}{rest}"] = {i for i, e in enumerate(experiments) if getattr(e, _MODELS[kind]) is model}
    return out


def fix_model_parameters(rp, names) -> None:
    """Leave the beam, detector and goniometer parameters `names` (as
    :func:`models_refused_for_too_few_reflections` gives them: model
    identifier and parameter, ``Detector2Dist``) out of the job of `rp`,
    through DIALS' fix_list of each model, which matches them by name with
    the model's identifier as prefix (refinement_helpers.string_sel)."""
    par = rp.refinement.parameterisation
    for kind, attr in _MODELS.items():
        mine = sorted(n for n in names if re.match(rf"{kind}\d", n))
        if mine:
            model = getattr(par, attr)
            model.fix_list = sorted(set(model.fix_list or []) | set(mine))


@contextlib.contextmanager
def crystal_smoother(factory):
    """Inside the block, the scan-varying crystal parameterisations that DIALS'
    refiner builds smooth with ``factory(array_range, num_intervals)`` (an
    object with the interface of DIALS' ``GaussianSmoother`` wrapper and its
    number of values) instead of DIALS' Gaussian smoother.

    DIALS builds the smoother inside each parameterisation's constructor;
    ``configure._parameterise_crystals`` is wrapped for the duration of one job
    and the parameterisations it returns get the other smoother before any
    parameter is used.  ``factory=None`` changes nothing.  Yields False where
    that function or the parameterisations' ``_smoother`` do not exist
    (another DIALS): the job then smooths as DIALS does.
    """
    original = getattr(configure, "_parameterise_crystals", None)
    if factory is None or original is None:
        yield False
        return

    def swap(p, experiments):
        old = getattr(p, "_smoother", None)
        if old is None or not hasattr(p, "num_sets"):
            return
        scan = experiments[p.get_experiment_ids()[0]].scan
        new = factory(scan.get_array_range(), old.num_samples())
        if new.num_values() == old.num_values():
            p._smoother = new

    def parameterise(options, experiments, analysis):
        ori, uc = original(options, experiments, analysis)
        for p in list(ori) + list(uc):
            swap(p, experiments)
        return ori, uc

    with replaced(configure, "_parameterise_crystals", parameterise) as done:
        yield done


def set_static_cell_covariance(refiner, crystal) -> bool:
    """Give `crystal` (refined with a static cell in a scan-varying job) the
    covariance of its B matrix from that job's parameter covariance.

    DIALS 3.12 sets it wrongly: ``PredictionParameterisation.
    calculate_model_state_uncertainties`` walks the parameterisations in
    order (detector, beam, crystal orientation, unit cell, goniometer) taking
    consecutive blocks of the covariance matrix, but skips the advance past a
    parameterisation whose ``calculate_state_uncertainties`` returns None, as
    the scan-varying orientation's does (it caches the block instead).  The
    static cell then receives the block of the orientation's first smoother
    parameters: on a 3-block sweep a, b, c esds of 0.042, 0.019, 0.028 A where
    the cell parameters' own block gives 0.00063, 0.00081, 0.0010 A.  This
    takes the cell's own block, in the same order, and lets the cell
    parameterisation turn it into the B covariance.  It reads the refiner's
    private ``_pred_param`` and ``_refinery``.  Returns True when it did;
    False (crystal untouched) where this DIALS keeps its parameterisations or
    covariance elsewhere, or the job had other than one static cell."""
    covs = _static_cell_covariances(refiner)
    if covs is None or len(covs) != 1:
        return False
    crystal.set_B_covariance(covs[0][1])
    return True


def set_static_cell_covariances(refiner, experiments) -> int:
    """Every static cell of a scan-varying job with several crystals (a
    crystal per block) gets the covariance of its own block of the job's
    parameter covariance (DIALS 3.12 gives each the block of an
    orientation's smoother parameters: :func:`set_static_cell_covariance`),
    on the crystals of `experiments` (the refiner's, as it returned them, in
    its order) it parameterises.  Returns how many cells were set (0 where
    this DIALS keeps its parameterisations or covariance elsewhere)."""
    covs = _static_cell_covariances(refiner) or []
    for model, cov in covs:
        for i in model.get_experiment_ids():
            experiments[i].crystal.set_B_covariance(cov)
    return len(covs)


def _static_cell_covariances(refiner):
    """[(static cell parameterisation, its B covariance from its own block
    of the job's parameter covariance)], or None where the refiner is not
    laid out as DIALS 3.12's."""
    pred = getattr(refiner, "_pred_param", None)
    refinery = getattr(refiner, "_refinery", None)
    var_cov = getattr(refinery, "parameter_var_cov", None)
    if pred is None or var_cov is None:
        return None
    try:
        groups = _parameterisation_groups(pred)
    except AttributeError:
        return None
    if sum(m.num_free() for g in groups for m in g) != var_cov.focus()[0]:
        return None  # not the layout this was written for
    out = []
    i = 0
    for k, group in enumerate(groups):
        for model in group:
            n = model.num_free()
            if k == 3 and not isinstance(model, ScanVaryingModelParameterisation) and not model.is_multi_state():
                covs = model.calculate_state_uncertainties(var_cov.matrix_copy_block(i, i, n, n))
                if not covs:
                    return None
                out.append((model, covs[0]))
            i += n
    return out


def _parameterisation_groups(pred):
    """The prediction parameterisation's model parameterisations in the
    order of its parameter vector (DIALS 3.12's attribute names)."""
    return [
        getattr(pred, "_" + name)
        for name in (
            "detector_parameterisations", "beam_parameterisations", "xl_orientation_parameterisations",
            "xl_unit_cell_parameterisations", "goniometer_parameterisations",
        )
    ]


def set_constrained_cell_covariance(refiner, crystals) -> bool:
    """Give each of `crystals` (refined with one cell through equal-shift
    constraints: unit_cell.constraints) the covariance of that one cell.

    DIALS computes no esds when constraints were used (Refinery.calculate_esds
    returns early).  This inverts the job's normal matrix in the constrained
    space (its Cholesky factor, kept by the dense engines), takes the block of
    the first crystal's cell parameters, each the column of its constraint,
    and lets DIALS' cell parameterisation turn it into the B covariance; the
    cells being one, every crystal gets it.  It reads the refiner's private
    ``_pred_param`` and ``_refinery`` (``cf``, ``_constr_manager``).  Returns
    False (crystals untouched) where any of that is not there."""
    pred = getattr(refiner, "_pred_param", None)
    refinery = getattr(refiner, "_refinery", None)
    cf = getattr(refinery, "cf", None)
    manager = getattr(refinery, "_constr_manager", None)
    if pred is None or cf is None or manager is None:
        return False
    try:
        groups = _parameterisation_groups(pred)
        constraints = manager._constraints
        unconstrained = list(manager._unconstrained_idx)
        chi2 = refinery.history["reduced_chi_squared"][-1]
    except (AttributeError, KeyError, IndexError):
        return False
    cells = groups[3]
    if not cells or any(isinstance(c, ScanVaryingModelParameterisation) for c in cells):
        return False
    offset = 0
    for group in groups[:3]:
        offset += sum(m.num_free() for m in group)
    first = cells[0]
    full = list(range(offset, offset + first.num_free()))
    columns = []
    for f in full:
        k = next((k for k, c in enumerate(constraints) if f in c.indices), None)
        columns.append(len(unconstrained) + k if k is not None else unconstrained.index(f))
    cf_inv = cf.matrix_packed_u_as_upper_triangle().matrix_inversion()
    nm_inv = cf_inv.matrix_multiply_transpose(cf_inv)
    n = len(columns)
    block = flex.double(flex.grid(n, n))
    for a, i in enumerate(columns):
        for b, j in enumerate(columns):
            block[a, b] = chi2 * nm_inv[i, j]
    covs = first.calculate_state_uncertainties(block)
    if not covs:
        return False
    for crystal in crystals:
        crystal.set_B_covariance(covs[0])
    return True


# --------------------------------------------------------------------------
# Refinement: Levenberg-Marquardt not stopped by its own damping
# --------------------------------------------------------------------------


def _steady_levmar(base):
    """`base` (DIALS' LevenbergMarquardtIterations) whose RMSD test stops
    only when the RMSDs changed by less than DIALS' tolerance over two steps
    in a row.  DIALS' test looks at one step, and the first steps are damped
    by mu = tau * the largest diagonal element of the normal matrix: a
    scan-varying job after a static one can move the RMSDs by less than the
    tolerance in its first step and stop there, the smoother's values barely
    moved (an electron sweep with tracking frames left out: RMSD phi
    0.09104 -> 0.09103 deg, stopped after one step, orientation error
    0.031 deg median; with two steady steps required, 18 steps and 0.0041
    deg)."""

    class SteadyLevenbergMarquardt(base):
        def test_rmsd_convergence(self):
            if not super().test_rmsd_convergence():
                return False
            rmsd = self.history["rmsd"]
            if len(rmsd) < 3:
                return False
            return all(abs((b - c) / b) < 0.0001 if b > 0 else True for b, c in zip(rmsd[-2], rmsd[-3]))

    SteadyLevenbergMarquardt.__name__ = base.__name__
    return SteadyLevenbergMarquardt


@contextlib.contextmanager
def steady_levmar():
    """Inside the block, refiners that DIALS builds with its LevMar engine
    use :func:`_steady_levmar`'s convergence test (the engine is imported
    from ``dials.algorithms.refinement.engine`` when each refiner is built).
    Yields False where that class or its test does not exist (another
    DIALS): the jobs then stop as DIALS stops them."""
    base = getattr(engine, "LevenbergMarquardtIterations", None)
    if base is None or not hasattr(base, "test_rmsd_convergence"):
        yield False
        return
    with replaced(engine, "LevenbergMarquardtIterations", _steady_levmar(base)) as done:
        yield done


# --------------------------------------------------------------------------
# Indexing: one known crystal for all image sets
# --------------------------------------------------------------------------


def joint_known_orientation(reflections, experiments, params, crystal):
    """DIALS' IndexerKnownOrientation, but with ONE crystal for all image sets.

    Its own ``find_lattices`` pairs one known crystal with one image set (it is
    made for several lattices); joint indexing instead shares one crystal
    between all image sets, which the subclass's ``find_lattices`` returns.
    Returns the indexer after ``index()``.
    """
    class JointKnownOrientation(IndexerKnownOrientation):
        def find_lattices(self):
            known = self.known_orientations[0]
            cb_op = known.get_space_group().info().change_of_basis_op_to_primitive_setting()
            known = known.change_basis(cb_op)
            return ExperimentList(
                [
                    Experiment(
                        imageset=e.imageset, beam=e.beam, detector=e.detector,
                        goniometer=e.goniometer, scan=e.scan, crystal=known,
                    )
                    for e in self.experiments
                ]
            )

    indexer = JointKnownOrientation(reflections, experiments, params, [crystal])
    indexer.index()
    return indexer


def _basis_vector_key(strategy, rlp):
    """Everything a basis-vector strategy's ``find_basis_vectors(rlp)`` reads:
    its class, cell limits, target cell, its own parameters and the vectors."""
    target = getattr(strategy, "_target_unit_cell", None)
    scope = getattr(strategy, "phil_scope", None)
    params = getattr(strategy, "_params", None)
    params = scope.format(python_object=params).as_str() if scope is not None and params is not None else None
    return (type(strategy), getattr(strategy, "_max_cell", None), getattr(strategy, "_min_cell", None),
            target.parameters() if target is not None else None, params,
            rlp.as_double().as_numpy_array().tobytes())


@contextlib.contextmanager
def basis_vectors_searched_once():
    """Inside the block, a basis-vector search that DIALS' indexer runs again
    on the same reciprocal-lattice vectors with the same strategy parameters
    returns the first search's vectors instead of computing them again.

    The lattice search (dials_gapfill.crystal_model.lattice) may run DIALS'
    indexer twice on the same spots, once with 5 candidate lattices and once
    with all of them; only ``basis_vector_combinations.max_refine`` differs,
    which the basis-vector strategy never reads.  Its FFT (fft3d: a 256^3
    grid) is the same both times: 3.3 s of each search on L-cysteine.  The
    search is deterministic, so its vectors and ``used_in_indexing`` are those
    DIALS would compute.  Wraps ``BasisVectorSearch.find_candidate_basis_vectors``
    (``dials.algorithms.indexing.lattice_search``), which calls its strategy's
    ``find_basis_vectors``; yields False (every search computed) where
    either is not there.
    """
    try:
        from dials.algorithms.indexing.lattice_search import BasisVectorSearch
    except ImportError:
        yield False
        return
    original = getattr(BasisVectorSearch, "find_candidate_basis_vectors", None)
    found = {}

    def find_candidate_basis_vectors(self):
        strategy = getattr(self, "_basis_vector_search_strategy", None)
        if strategy is None or not hasattr(strategy, "find_basis_vectors"):
            return original(self)
        search = strategy.find_basis_vectors

        def remembered(rlp):
            key = _basis_vector_key(strategy, rlp)
            if key not in found:
                found[key] = search(rlp)
            else:
                logger.debug("Basis vectors of the previous search on the same spots reused")
            vectors, used = found[key]
            return list(vectors), used.deep_copy()

        strategy.find_basis_vectors = remembered
        try:
            return original(self)
        finally:
            del strategy.find_basis_vectors

    with replaced(BasisVectorSearch, "find_candidate_basis_vectors", find_candidate_basis_vectors) as done:
        yield done


# --------------------------------------------------------------------------
# Integration: dials.integrate's profile models made by our function
# --------------------------------------------------------------------------


@contextlib.contextmanager
def profile_model_factory(create):
    """While open, ``run_integration`` (dials.command_line.integrate) makes its
    profile models with ``create(original, params, experiments, reflections)``
    instead of ``ProfileModelFactory.create(params, experiments, reflections)``
    (`original` is DIALS' factory, for the cases `create` leaves to it).

    Yields False where run_integration does not use a ProfileModelFactory of
    that name (another DIALS): its own code then runs.
    """
    original = getattr(dials_integrate, "ProfileModelFactory", None)
    if original is None:
        yield False
        return

    class Factory:
        @staticmethod
        def create(params, experiments, reflections=None):
            return create(original, params, experiments, reflections)

    with replaced(dials_integrate, "ProfileModelFactory", Factory) as done:
        yield done


# --------------------------------------------------------------------------
# Cluster runs (dials_gapfill.cluster): DIALS' parallel maps sent to the jobs
# --------------------------------------------------------------------------


@contextlib.contextmanager
def spot_finder_map(replacement):
    """While the block runs, DIALS' spot finder hands its image chunks to `replacement`.

    Replaces ``dials.algorithms.spot_finding.finder.batch_multi_node_parallel_map``,
    the one function through which ``ExtractSpots`` (``_find_spots``,
    ``_find_spots_2d_no_shoeboxes``) runs its picklable per-image task
    (``ExtractSpotsParallelTask``) over chunks of image indices.  DIALS' own
    cluster back-ends behind it do not work with DIALS 3.12; the cluster route
    (dials_gapfill.cluster.spotfinding) runs the chunks on dask-jobqueue jobs.

    ``replacement(func, chunks, nproc, callback)``: `chunks` are the lists of
    image indices as DIALS cuts them (its ``chunksize``), `nproc` its processes
    per job; it calls ``callback`` with ``func(index)`` for every index, in
    order, as DIALS' map does.  Yields False (DIALS' own map runs) when the
    finder module has no such function.
    """

    def dials_map(func=None, iterable=None, nproc=1, njobs=1, callback=None, cluster_method=None, chunksize=1):
        indices = list(iterable)
        chunks = [indices[i : i + chunksize] for i in range(0, len(indices), chunksize)]
        return replacement(func, chunks, nproc, callback)

    with replaced(spot_finder, "batch_multi_node_parallel_map", dials_map) as done:
        yield done


@contextlib.contextmanager
def integration_processor_map(replacement):
    """While the block runs, DIALS' integration processor hands its frame-range tasks to `replacement`.

    Replaces ``dials.algorithms.integration.processor.multi_node_parallel_map``,
    the one function through which the processor (``_Processor.process``) runs
    each pass (profile modelling, validation, integration) as
    ``execute_parallel_task`` over its ``Task`` objects, one per frame range.
    DIALS' own cluster back-ends behind it pickle the tasks, whose Boost.Python
    executors refuse to be pickled; the cluster route
    (dials_gapfill.cluster.integration) sends the tasks' parts to dask-jobqueue
    jobs and rebuilds them there.

    ``replacement(tasks, nproc, callback)``: the processor's tasks in order and
    its processes per job; it calls ``callback`` with
    ``execute_parallel_task(task)`` for every task, in task order (DIALS asks
    for preserve_order).  Any other use of the function goes to DIALS' own.
    Yields False (DIALS' own map runs) when the processor module has no such
    function.
    """
    original = getattr(integration_processor, "multi_node_parallel_map", None)
    per_task = getattr(integration_processor, "execute_parallel_task", None)

    def dials_map(func=None, iterable=None, njobs=1, nproc=1, callback=None, **kwargs):
        if per_task is None or func is not per_task:
            return original(func=func, iterable=iterable, njobs=njobs, nproc=nproc, callback=callback, **kwargs)
        return replacement(list(iterable), nproc, callback)

    with replaced(integration_processor, "multi_node_parallel_map", dials_map) as done:
        yield done


def integration_algorithms():
    """(background, centroid): the algorithms DIALS' integrator chose for this run.

    ``create_integrator`` (dials.algorithms.integration.integrator) sets them
    as class attributes of ``flex.reflection_table`` in the process that
    integrates; DIALS' local workers inherit them by fork, a cluster job is
    given them (integration_algorithms_set).
    """
    return flex.reflection_table.background_algorithm, flex.reflection_table.centroid_algorithm


@contextlib.contextmanager
def integration_algorithms_set(algorithms):
    """While the block runs, ``flex.reflection_table``'s background and centroid
    algorithms are `algorithms` (from integration_algorithms() of the process
    that integrates), then what they were: a cluster job runs DIALS' frame-range
    tasks with the run's algorithms, as a forked local worker does."""
    background, centroid = algorithms
    table = flex.reflection_table
    with replaced(table, "background_algorithm", background), replaced(table, "centroid_algorithm", centroid):
        yield


# --------------------------------------------------------------------------
# Export: MTZ batches of several sweeps
# --------------------------------------------------------------------------


def models_to_export(experiments):
    """The experiments for DIALS' MTZ export, each with its own copies of the
    models dials.util.export_mtz.convert_to_cambridge turns into its frame in
    place (it copies only the models experiments share): the run's models
    stay in the laboratory frame, and each file written gets them once.  The
    rest is shared (a scaling model cannot be deep-copied).  On a DIALS that
    leaves them alone, the copies cost a little memory."""
    from dxtbx.model.experiment_list import ExperimentList

    out = ExperimentList()
    for exp in experiments:
        new = copy.copy(exp)
        for name in ("crystal", "beam", "detector", "goniometer"):
            model = getattr(exp, name)
            if model is not None:
                setattr(new, name, copy.deepcopy(model))
        out.append(new)
    return out


@contextlib.contextmanager
def mtz_batch_offsets(offsets):
    """While open, dials.export's MTZ writer numbers the batches of its
    experiments with `offsets` (one per experiment, in order): BATCH = image
    number + offset.

    export_mtz keeps the scans' own batch offsets only when they all differ,
    and otherwise computes them with calculate_batch_offsets from the image
    ranges of the experiments; the blocks of one sweep share their sweep's
    offset (so that BATCH - offset is the image number), which it would call
    duplicates.  The scans' offsets are therefore set alike (0) and its
    calculate_batch_offsets replaced by `offsets`.  Yields False where
    dials.util.export_mtz has no such function (the batches are then DIALS').
    """
    with replaced(dials_export_mtz, "calculate_batch_offsets", lambda experiments: list(offsets)) as done:
        yield done


def in_mtz_batch_order(experiments, reflections, offsets):
    """(experiments, reflections, offsets) with the experiments in the order
    of their first batch (image number + offset), the reflections' ids
    following them.

    DIALS' MTZ writer (add_dials_batches, dials/util/export_mtz_helpers.h)
    numbers an experiment's batch headers on from the largest batch already
    written where that is larger than the experiment's own first batch, and
    leaves its reflections' BATCH as they are: a later sweep whose batches
    are lower than an earlier one's (sweeps of images 1-18, 1-18 and 95-104:
    batches 1-18, 201-218, 95-104) had reflections pointing at batches with
    no header.  Written in batch order, every header is the reflections'."""
    firsts = [offset + exp.scan.get_image_range()[0] for exp, offset in zip(experiments, offsets)]
    order = sorted(range(len(experiments)), key=lambda i: firsts[i])
    if order == list(range(len(experiments))):
        return experiments, reflections, offsets
    new_of_old = {old: new for new, old in enumerate(order)}
    reflections = copy.deepcopy(reflections)
    identifiers = reflections.experiment_identifiers()
    named = {i: identifiers[i] for i in identifiers.keys()}
    for i in named:
        del identifiers[i]
    reflections["id"] = flex.int([new_of_old.get(i, i) for i in reflections["id"]])
    for old, name in named.items():
        identifiers[new_of_old[old]] = name
    return ExperimentList([experiments[i] for i in order]), reflections, [offsets[i] for i in order]


class _CrystalsDiffer(logging.Filter):
    said = False

    def filter(self, record):
        if not str(record.msg).startswith("Experiment crystals differ"):
            return True
        if not _CrystalsDiffer.said:
            _CrystalsDiffer.said = True
            logging.getLogger("dials.process_gapped.export").info(
                "The MTZ file's cell is the blocks' median cell (dials.export: 'Experiment crystals "
                "differ'); each batch carries its own orientation and cell"
            )
        return False


@contextlib.contextmanager
def crystals_differ_explained():
    """dials.export warns "Experiment crystals differ. Using first experiment
    crystal for file-level data." whenever the experiments' crystals are not
    one, which the blocks' never are (each has its slice of the scan-varying
    crystal): the warning is replaced by one line in the log saying what it
    means here."""
    target = logging.getLogger(dials_export_mtz.__name__)
    quiet = _CrystalsDiffer()
    target.addFilter(quiet)
    try:
        yield
    finally:
        target.removeFilter(quiet)


@contextlib.contextmanager
def screw_axes_scored():
    """The screw axes dials.symmetry's absence check scores, as it scores
    them: yields a list that fills with (name, reflections of the class the
    axis would leave present, of the class it would extinguish).  Without
    the function it wraps the list stays empty (no warning follows)."""
    seen = []
    try:
        from dials.algorithms.symmetry.absences import run_absences_checks as checks
    except ImportError:
        yield seen
        return
    original = getattr(checks, "score_screw_axes", None)

    def scoring(*args, **kwargs):
        axes, scores = original(*args, **kwargs)
        for axis in axes:
            try:
                seen.append((str(axis.name), int(axis.n_refl_used[0]), int(axis.n_refl_used[1])))
            except (AttributeError, IndexError, TypeError, ValueError):
                pass
        return axes, scores

    with replaced(checks, "score_screw_axes", scoring):
        yield seen


class _NoTraceback(logging.Filter):
    def filter(self, record):
        if record.exc_info and record.levelno in (logging.WARNING, logging.ERROR):
            record.exc_info = None
            record.exc_text = None
        return True


@contextlib.contextmanager
def symmetry_and_merging_without_tracebacks():
    """On a few dozen reflections dials.symmetry cannot normalise the
    intensities ("There may be too few unique reflections. Resorting to using
    un-normalised intensities") and dials.merge cannot compute Wilson
    statistics ("Error encountered during Wilson statistics calculation"):
    both log it with a traceback and go on.  A traceback in the log reads as
    a crash, so these messages keep their text and lose the traceback."""
    # each module's own logger (dials.algorithms.merging.merge logs to "dials")
    targets = [getattr(m, "logger", None) or logging.getLogger(m.__name__) for m in (dials_symmetry, dials_merge)]
    quiet = _NoTraceback()
    for target in targets:
        target.addFilter(quiet)
    try:
        yield
    finally:
        for target in targets:
            target.removeFilter(quiet)
