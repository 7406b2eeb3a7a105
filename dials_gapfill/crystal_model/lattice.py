"""The lattice search, cheap first: DIALS' indexer on its first few candidates.

DIALS' basis-vector search turns the FFT's basis vectors into candidate
lattices and refines each of the first ``indexing.basis_vector_combinations.
max_refine`` of them (Auto: 50 for rotation data, 5 for stills) before keeping
the best.  On a clean sweep the right lattice is among the first few (the
shortest vectors come first); refining 50 candidates cost two thirds of the
indexing stage (``benchmarks/profile.py``).  So when ``max_refine`` is Auto
and ``indexing.blocks.quick_search`` is on, dials.process_gapped first lets
DIALS refine only its first ``QUICK_CANDIDATES`` candidates (DIALS' own number
for stills), keeps that result when it indexes at least
``indexing.blocks.quick_search_fraction`` of the searched spots, and otherwise
(or when that search fails) runs DIALS' search over all 50 candidates, exactly
as dials.index would, and keeps its result unless it indexes clearly fewer
of the spots than the quick search's (by more than FEWER_INDEXED_SIGMAS
binomial standard deviations).  Both searches run on the same spots, so the
basis vectors of DIALS' FFT are computed once
(:func:`dials_gapfill.dials_compat.basis_vectors_searched_once`).
"""

from __future__ import annotations

import copy
import logging
import math

from dials.algorithms.indexing import DialsIndexError
from libtbx import Auto

from dials_gapfill import dials_compat
from dials_gapfill.errors import search_failure

logger = logging.getLogger("dials.process_gapped.indexing")

QUICK_CANDIDATES = 5  # DIALS' max_refine for stills
FEWER_INDEXED_SIGMAS = 3.0
# How DIALS' indexer fails when it finds no lattice: its own error, or on
# very few spots one of these (3.12: UnboundLocalError 'refined_reflections'
# in Indexer.index when no candidate survives, IndexError, ZeroDivisionError)
SEARCH_ERRORS = (DialsIndexError, ValueError, RuntimeError, AssertionError, NameError, IndexError,
                 ZeroDivisionError)


def indexed_fraction(reflections, n_spots):
    """Indexed rows of `reflections` (flag and id >= 0) over `n_spots`."""
    if not n_spots:
        return 0.0
    ok = reflections.get_flags(reflections.flags.indexed) & (reflections["id"] >= 0)
    return ok.count(True) / n_spots


def all_experiments_kept(run, n_experiments):
    """`run` whose result must hold `n_experiments` experiments.  Where a
    refinement macro-cycle fails with several experiments, DIALS' indexer
    deletes the last one and goes on (dials.algorithms.indexing.indexer,
    Indexer.index: meant for the last lattice of a multi-lattice search); with
    joint indexing that experiment is a sweep or block, whose spots are then
    left unindexed.  Such a result is a failed search."""

    def checked(p):
        found = run(p)
        if len(found[0]) < n_experiments:
            raise DialsIndexError(
                f"DIALS' indexer kept {len(found[0])} of the {n_experiments} experiments "
                "(a refinement macro-cycle failed)"
            )
        return found

    return checked


def staged_search(run, ip, n_spots, params, n_experiments=1):
    """`run(ip)` -> (experiments, indexed reflections): DIALS' indexer on
    `n_spots` spots of `n_experiments` experiments with the dials.index
    parameters `ip`.  First with QUICK_CANDIDATES candidates when DIALS would
    choose the number (Auto) and the quick search is on, then, if needed, as
    given.  A search that loses an experiment fails
    (:func:`all_experiments_kept`)."""
    run = all_experiments_kept(run, n_experiments)
    with dials_compat.basis_vectors_searched_once():
        return _staged(run, ip, n_spots, params)


def _staged(run, ip, n_spots, params):
    bvc = ip.indexing.basis_vector_combinations
    quick_on = params.indexing.blocks.quick_search
    if not quick_on or bvc.max_refine is not Auto or ip.indexing.method not in ("fft3d", "fft1d", "real_space_grid_search"):
        return run(ip)
    quick = copy.deepcopy(ip)
    quick.indexing.basis_vector_combinations.max_refine = QUICK_CANDIDATES
    wanted = params.indexing.blocks.quick_search_fraction
    try:
        found = run(quick)
    except SEARCH_ERRORS as e:
        logger.info(
            "Lattice search on the first %d candidate lattices failed (%s): all candidates evaluated",
            QUICK_CANDIDATES, search_failure(e, 120),
        )
        return run(ip)
    fraction = indexed_fraction(found[1], n_spots)
    if fraction >= wanted:
        logger.info(
            "Lattice search: the best of the first %d candidate lattices indexes %.1f%% of the "
            "searched spots (>= %.0f%%): kept", QUICK_CANDIDATES, 100 * fraction, 100 * wanted,
        )
        return found
    logger.info(
        "Lattice search: the best of the first %d candidate lattices indexes %.1f%% of the searched "
        "spots (< %.0f%%): all candidates evaluated, as dials.index does",
        QUICK_CANDIDATES, 100 * fraction, 100 * wanted,
    )
    full = run(ip)
    full_fraction = indexed_fraction(full[1], n_spots)
    # DIALS ranks candidates by volume, indexed count and RMSD together: on a
    # drifting crystal with every 6th image missing its pick among 50 (47.9,
    # 57.2, 57.2 A, 67.9 deg) indexed 50 % of the spots where the first 5
    # candidates' 57 x 57 x 150 A lattice indexed 89 %.  DIALS' pick stands
    # unless it indexes fewer by more than FEWER_INDEXED_SIGMAS binomial
    # standard deviations (L-cysteine, 160 spots: 80.6 % against 81.2 %, one
    # spot, is DIALS' pick)
    margin = FEWER_INDEXED_SIGMAS * math.sqrt(max(fraction * (1 - fraction), 0.0) / max(n_spots, 1))
    if full_fraction < fraction - margin:
        logger.info(
            "Lattice search: all candidates' best indexes %.1f%% of the searched spots, fewer than the "
            "first %d candidates' (%.1f%%): that one kept", 100 * full_fraction, QUICK_CANDIDATES, 100 * fraction,
        )
        return found
    return full
