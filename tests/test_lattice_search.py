"""The lattice search, cheap first (dials_gapfill.crystal_model.lattice): DIALS' indexer on
its first 5 candidate lattices, all 50 only when those index too few spots.

Real DIALS runs of the indexing stage of both crystal models on the tiny
sweep with a gap, compared with DIALS' full search (quick_search=False)."""

from __future__ import annotations

import logging
import os
import random

import pytest

GAP = (21, 22, 23)


def _files(folder):
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".cbf")]


@pytest.fixture(scope="module")
def blocks_and_spots(tiny_sweeps):
    from dials_gapfill.simulation import compare
    experiments = compare.import_blocks(_files(tiny_sweeps.make(omit=GAP, name="gap21")))
    return experiments, compare.strong_spots(experiments, nproc=2)


def _index(model, experiments, spots, *phil):
    import copy

    from dials_gapfill import crystal_model
    from dials_gapfill.phil import params_from

    params = params_from(["nproc=2", f"refinement.blocks.model={model}", *phil])
    blocks, indexed, _ = crystal_model.make(params).index(copy.deepcopy(experiments), copy.deepcopy(spots))
    return blocks, indexed


def _counts(blocks, indexed):
    ok = indexed.get_flags(indexed.flags.indexed) & (indexed["id"] >= 0)
    return [(ok & (indexed["id"] == i)).count(True) for i in range(len(blocks))]


def _same_lattice(a, b, tol=1e-3):
    """The two crystals' lattices coincide, up to the choice of basis (P1
    indexing may take (-a, -b, c) where the other took (a, b, c)): A_b^-1 A_a
    is an integer matrix of determinant +-1, to `tol`."""
    from scitbx import matrix

    m = matrix.sqr(b.get_A()).inverse() * matrix.sqr(a.get_A())
    rounded = [round(v) for v in m.elems]
    return max(abs(v - r) for v, r in zip(m.elems, rounded)) < tol and abs(abs(matrix.sqr(rounded).determinant()) - 1) < 1e-9


@pytest.mark.parametrize("model", ["continuous", "per_block"])
def test_quick_search_finds_the_lattice_of_the_full_search(blocks_and_spots, model, caplog):
    experiments, spots = blocks_and_spots
    with caplog.at_level(logging.INFO, logger="dials.process_gapped"):
        quick = _index(model, experiments, spots)
    assert "the best of the first 5 candidate lattices indexes" in caplog.text
    assert ": kept" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dials.process_gapped"):
        full = _index(model, experiments, spots, "indexing.blocks.quick_search=False")
    assert "candidate lattices" not in caplog.text
    # the same spots indexed in every block, the same cell and orientation
    assert _counts(*quick) == _counts(*full)
    assert min(_counts(*quick)) > 0.99 * min(_counts(*full))
    for q, f in zip(quick[0], full[0]):
        a, b = q.crystal.get_unit_cell().parameters(), f.crystal.get_unit_cell().parameters()
        assert all(abs(x - y) < 1e-3 * max(1.0, abs(y)) for x, y in zip(a, b)), (a, b)
        assert _same_lattice(q.crystal, f.crystal)


@pytest.mark.parametrize("model,search", [("continuous", ()), ("per_block", ()),
                                          ("per_block", ("indexing.blocks.lattice_search=joint",))])
def test_too_few_indexed_falls_back_to_all_candidates(blocks_and_spots, model, search, caplog):
    """A quarter of the spots moved off the lattice: the first 5 candidates
    index about 75 % of them, below quick_search_fraction (0.9), so DIALS'
    full search runs (from the input beam and detector, which DIALS' indexer
    refines in place, and on the basis vectors the quick search found), and
    its result is that of quick_search=False."""
    from dials.array_family import flex

    experiments, spots = blocks_and_spots
    junk = spots.select(flex.bool(len(spots), True))
    rng = random.Random(7)
    xyz = junk["xyzobs.px.value"]
    for i in range(len(junk)):
        if rng.random() < 0.25:
            x, y, z = xyz[i]
            xyz[i] = (x + rng.choice((-1, 1)) * rng.uniform(6, 12), y + rng.choice((-1, 1)) * rng.uniform(6, 12), z)
    junk["xyzobs.px.value"] = xyz
    with caplog.at_level(logging.DEBUG, logger="dials.process_gapped"):
        fallback = _index(model, experiments, junk, *search)
    assert "all candidates evaluated, as dials.index does" in caplog.text
    # the full search on the same spots takes the quick search's FFT basis vectors
    assert "Basis vectors of the previous search on the same spots reused" in caplog.text
    full = _index(model, experiments, junk, "indexing.blocks.quick_search=False", *search)
    assert _counts(*fallback) == _counts(*full)
    a = fallback[0][0].crystal.get_unit_cell().parameters()
    b = full[0][0].crystal.get_unit_cell().parameters()
    assert all(abs(x - y) < 1e-6 * max(1.0, abs(y)) for x, y in zip(a, b)), (a, b)
    assert _same_lattice(fallback[0][0].crystal, full[0][0].crystal, tol=1e-6)


def _indexed_table(n_indexed, n=100):
    """A stand-in for an indexing result: `n` spots, the first `n_indexed` indexed."""
    from dials.array_family import flex

    t = flex.reflection_table()
    t["id"] = flex.int([0] * n_indexed + [-1] * (n - n_indexed))
    t.set_flags(t["id"] >= 0, t.flags.indexed)
    return t


def test_full_search_that_indexes_fewer_spots_is_not_kept(caplog):
    """The decision alone (DIALS' search stood in for by its two results): on
    a drifting crystal with every 6th image missing, DIALS' pick among all
    candidates indexed 50 % of the spots where the first 5 candidates'
    lattice indexed 89 %; the quick search's lattice is kept when DIALS'
    indexes fewer by more than 3 binomial standard deviations."""
    from libtbx import Auto

    from dials_gapfill.crystal_model.lattice import staged_search
    from dials_gapfill.phil import dials_index_params, params_from

    params = params_from([])
    ip = dials_index_params(params)
    assert ip.indexing.basis_vector_combinations.max_refine is Auto
    calls = []

    def run(p):
        calls.append(p.indexing.basis_vector_combinations.max_refine)
        return ("quick", _indexed_table(89)) if len(calls) == 1 else ("full", _indexed_table(50))

    with caplog.at_level(logging.INFO, logger="dials.process_gapped"):
        found = staged_search(run, ip, 100, params)
    assert calls == [5, Auto] and found[0] == "quick"
    assert "fewer than the first 5 candidates' (89.0%): that one kept" in caplog.text
    for quick, full, n, kept in ((60, 95, 100, "full"),
                                 # L-cysteine: 130 of 160 against 129, within the noise: DIALS' pick
                                 (130, 129, 160, "full"), (130, 110, 160, "quick")):
        calls.clear()
        found = staged_search(
            lambda p, q=quick, f=full, n=n: calls.append(1) or (("quick", _indexed_table(q, n)) if len(calls) == 1 else ("full", _indexed_table(f, n))),
            ip, n, params)
        assert found[0] == kept, (quick, full, n)


def test_a_search_that_loses_an_experiment_has_failed(caplog):
    """Where a refinement macro-cycle fails with several experiments, DIALS'
    indexer deletes the last one and goes on (meant for the last lattice of
    a multi-lattice search; with joint indexing, a sweep).  The decision
    alone, DIALS' search stood in for by its results: the quick search that
    came back with 3 of 4 experiments is not kept, DIALS' full search is
    run; when that loses one too, the search fails with DIALS' error type.
    (The real case: L-cysteine without image 11 of sweep 2,
    test_l_cysteine.py::test_one_image_left_out_of_a_later_sweep.)"""
    from dials.algorithms.indexing import DialsIndexError

    from dials_gapfill.crystal_model.lattice import staged_search
    from dials_gapfill.phil import dials_index_params, params_from

    params = params_from([])
    ip = dials_index_params(params)
    calls = []

    def run(p, sizes=(3, 4)):
        calls.append(p.indexing.basis_vector_combinations.max_refine)
        return [object()] * sizes[len(calls) - 1], _indexed_table(95)

    with caplog.at_level(logging.INFO, logger="dials.process_gapped"):
        found = staged_search(run, ip, 100, params, 4)
    assert len(calls) == 2 and calls[0] == 5 and len(found[0]) == 4
    assert "kept 3 of the 4 experiments" in caplog.text
    calls.clear()
    with pytest.raises(DialsIndexError, match="kept 3 of the 4"):
        staged_search(lambda p: run(p, (3, 3)), ip, 100, params, 4)


def test_a_failed_search_is_said_in_one_line_cut_at_a_word():
    """DIALS 3.12's indexer fails with an UnboundLocalError when a refinement
    macro-cycle fails on its first lattice with several experiments: the
    message says what failed, without the exception's or the variable's name."""
    from dials_gapfill.errors import search_failure

    def unbound():
        try:
            if False:
                refined_reflections = 1
            return refined_reflections  # noqa: F821
        except NameError as e:
            return e

    said = search_failure(unbound(), 80)
    assert said.startswith("DIALS' indexer could not refine the candidate lattice") and len(said) <= 80
    assert "UnboundLocalError" not in search_failure(unbound()) and "refined_reflections" not in said
    long = ValueError("word " * 50)
    said = search_failure(long, 60)
    assert said.endswith("word ...") and len(said) <= 60 and "  " not in said
    assert search_failure(ValueError("no lattice\n found")) == "no lattice found"


def test_a_failed_search_on_the_joined_blocks_is_said_once(blocks_and_spots):
    """The per-block model tries the continuous model's search (the blocks
    of each sweep joined) as one of its searches; where that fails, the
    reason it logs is DIALS' own, not the continuous model's whole
    "indexing failed: ...: check the geometry" sentence nested in its own."""
    import copy

    from dials.array_family import flex
    from dials.algorithms.indexing import DialsIndexError

    from dials_gapfill.crystal_model.per_block import PerBlockModel
    from dials_gapfill.errors import GapfillError
    from dials_gapfill.phil import params_from

    experiments, spots = blocks_and_spots
    few = spots.select(flex.size_t(range(6)))
    model = PerBlockModel(params_from(["nproc=2"]))
    with pytest.raises(DialsIndexError) as caught:
        model._search_sweeps(copy.deepcopy(experiments), copy.deepcopy(few), None)
    said = str(caught.value)
    assert said and "indexing failed" not in said and "check the geometry" not in said, said
    # the run's own message, where no other search is left, is still whole
    from dials_gapfill.crystal_model.continuous import ContinuousModel

    with pytest.raises(GapfillError, match=r"^indexing failed: .*check the geometry") as whole:
        ContinuousModel(params_from(["nproc=2"])).index(copy.deepcopy(experiments), copy.deepcopy(few))
    assert said in str(whole.value)
