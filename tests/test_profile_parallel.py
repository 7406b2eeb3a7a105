"""The blocks' profile models (sigma_b, sigma_m: DIALS' simplex fit per
block) are estimated in parallel processes (integration.py,
_blocks_profiled_in_parallel and _profile_models): the same DIALS calls on
the same spots, so the same numbers as DIALS' own serial code (the profile
estimate in one process, integration.py's _nproc set to 1; DIALS'
integration itself runs with nproc=2 in both, as its job split depends on
nproc).

Real DIALS runs of the integration stage on the tiny sweep with two gaps (3
blocks), refined once; for the per-block profile models (per_block crystal
model, as dials.integrate) and for the one model from all blocks
(integration.profile_model=all_blocks)."""

from __future__ import annotations

import copy
import logging
import os

import pytest

OMIT = (14, 15, 28)


@pytest.fixture(scope="module")
def refined(tiny_sweeps):
    from dials_gapfill import pipeline
    from dials_gapfill.phil import params_from

    folder = tiny_sweeps.make(omit=OMIT, name="two_gaps")
    images = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".cbf")]
    params = params_from(["nproc=2", "refinement.blocks.model=per_block"])
    state = pipeline.Pipeline(params, images).run(stop_before="integration")
    assert [e.scan.get_image_range() for e in state.experiments] == [(1, 13), (16, 27), (29, 40)]
    return state


def _integrate(state, parallel, profile_model, caplog, monkeypatch):
    from dials_gapfill.stages import integration
    from dials_gapfill.phil import params_from

    params = params_from(
        ["nproc=2", "refinement.blocks.model=per_block", f"integration.profile_model={profile_model}"]
    )
    if not parallel:  # the profile estimate in one process: DIALS' own ProfileModelFactory
        monkeypatch.setattr(integration, "_nproc", lambda ip, n_jobs: 1)
    else:
        monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dials"):
        experiments, reflections, _ = integration.integrate(
            copy.deepcopy(state.experiments), copy.deepcopy(state.reflections), params, state.sweeps,
            "all_blocks" if profile_model == "all_blocks" else "per_block",
        )
    # DIALS' lines of the sigma estimate (gaussian_rs calculator), in order
    lines = [
        r.getMessage() for r in caplog.records
        if r.getMessage().startswith((" sigma b:", " sigma m:")) or "for sigma calculation" in r.getMessage()
    ]
    return experiments, reflections, lines


@pytest.mark.slow
@pytest.mark.parametrize("profile_model", ["per_block", "all_blocks"])
def test_profile_models_in_parallel_equal_dials_serial(refined, profile_model, caplog, monkeypatch):
    serial_expts, serial_refl, serial_log = _integrate(refined, False, profile_model, caplog, monkeypatch)
    par_expts, par_refl, par_log = _integrate(refined, True, profile_model, caplog, monkeypatch)

    # three blocks, each with a model of its own (per_block) or the one pooled model
    sigmas = [(e.profile.sigma_b(deg=False), e.profile.sigma_m(deg=False)) for e in serial_expts]
    assert len(sigmas) == 3
    if profile_model == "per_block":
        assert len(set(sigmas)) == 3, sigmas
    else:
        assert len(set(sigmas)) == 1, sigmas
    # the simulator's mosaicity (0.12 deg, as test_gap_partials): a real estimate
    for _, sigma_m in sigmas:
        assert abs(sigma_m * 57.29577951308232 - 0.12) < 0.012
    # exactly DIALS' serial numbers, and so the same integrated intensities
    assert [(e.profile.sigma_b(deg=False), e.profile.sigma_m(deg=False)) for e in par_expts] == sigmas
    assert len(par_refl) == len(serial_refl)
    for column in ("intensity.sum.value", "intensity.prf.value", "intensity.prf.variance"):
        assert list(par_refl[column]) == list(serial_refl[column]), column
    # the workers' log lines (DIALS' "sigma b: ... degrees") are logged, in block order
    assert par_log == serial_log
    assert sum(line.startswith(" sigma m:") for line in par_log) == 3, par_log
