"""The B-spline smoother of the continuous model against DIALS' Gaussian smoother."""

from __future__ import annotations

import numpy as np
import pytest

import dials_gapfill  # noqa: F401  (before dials)


def _design(smoother, xs, gaussian=False):
    """Rows: the normalised weight of each checkpoint at each x."""
    from scitbx.array_family import flex

    n = smoother.num_values()
    design = np.zeros((len(xs), n))
    for r, x in enumerate(xs):
        for j in range(n):
            values = flex.double(n, 0.0)
            values[j] = 1.0
            if gaussian:
                from dials_refinement_helpers_ext import GaussianSmoother as Core

                design[r, j] = Core.value_weight(smoother, x, values).get_value()
            else:
                class Param:
                    value = list(values)

                design[r, j] = smoother.value_weight(x, Param)[0]
    return design


def _fit_error(design, f):
    coefficients, *_ = np.linalg.lstsq(design, f, rcond=None)
    return float(np.abs(design @ coefficients - f).max())


@pytest.mark.parametrize("n_intervals", [1, 2, 3, 4, 5, 8])
def test_same_checkpoints_as_dials(n_intervals):
    from dials.algorithms.refinement.parameterisation.scan_varying_model_parameters import GaussianSmoother

    from dials_gapfill.crystal_model.smoother import BSplineSmoother

    ours, dials = BSplineSmoother((3.0, 93.0), n_intervals), GaussianSmoother((3.0, 93.0), n_intervals)
    assert ours.num_values() == dials.num_values()
    assert ours.num_samples() == dials.num_samples()
    assert ours.positions() == pytest.approx(dials.positions())
    assert ours.spacing() == pytest.approx(dials.spacing())


@pytest.mark.parametrize("n_intervals", [1, 2, 3, 5, 8])
def test_a_steady_and_an_accelerating_turn_followed_to_the_ends(n_intervals):
    """Least-squares fits over a 90-image scan: the B-spline follows a straight
    line (any number of intervals) and a parabola (two or more) to rounding;
    DIALS' Gaussian-weighted mean leaves an error of a percent or more of the
    turn."""
    from dials.algorithms.refinement.parameterisation.scan_varying_model_parameters import GaussianSmoother

    from dials_gapfill.crystal_model.smoother import BSplineSmoother

    xs = np.linspace(0.0, 90.0, 361)
    ours = _design(BSplineSmoother((0.0, 90.0), n_intervals), xs)
    dials = _design(GaussianSmoother((0.0, 90.0), n_intervals), xs, gaussian=True)
    assert np.allclose(ours.sum(axis=1), 1.0)  # the weights sum to one inside the scan
    line, parabola = xs / 90.0, (xs / 90.0) ** 2
    assert _fit_error(ours, line) < 1e-9
    assert _fit_error(dials, line) > 0.004
    if n_intervals >= 2:
        assert _fit_error(ours, parabola) < 1e-9
        assert _fit_error(dials, parabola) > 0.004


def test_weights_are_local_and_sparse():
    """At most three checkpoints act at any point, as in DIALS' smoother, and
    the sparse weights are those of the value."""
    from dials_gapfill.crystal_model.smoother import BSplineSmoother

    smoother = BSplineSmoother((0.0, 60.0), 5)

    class Param:
        value = [0.3, -1.0, 2.0, 0.5, 4.0, -2.0, 1.0]

    for x in np.linspace(0.0, 60.0, 121):
        value, weights, sumweight = smoother.value_weight(x, Param)
        pairs = list(weights)
        assert 1 <= len(pairs) <= 3
        assert sumweight == pytest.approx(1.0)
        assert value == pytest.approx(sum(w * Param.value[i] for i, w in pairs))
