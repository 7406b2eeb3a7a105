"""A smoother for scan-varying crystal models that follows a crystal turning
at a steady or steadily changing rate to the ends of the scan.

DIALS' ``GaussianSmoother`` (the Aimless smoother) takes a Gaussian-weighted
mean of the three nearest checkpoint values.  A weighted mean of that kind
cannot represent a straight line: fitted to a crystal that turns at a
constant rate it leaves a ripple between checkpoints and a larger error at
the scan's ends (``benchmarks/smoother_ramp.py``).  The quadratic B-spline
below keeps DIALS' checkpoints (same number, same positions, three of them
active at any point) and replaces the Gaussian weights by the quadratic
B-spline basis, whose weights sum to one inside the scan and which
represents any linear or quadratic function of the rotation exactly.
"""

from __future__ import annotations

import math

from scitbx import sparse
from scitbx.array_family import flex


def _quadratic_bspline(t: float) -> float:
    """The uniform quadratic B-spline centred on 0 (support -1.5 to 1.5)."""
    t = abs(t)
    if t <= 0.5:
        return 0.75 - t * t
    if t < 1.5:
        return 0.5 * (1.5 - t) ** 2
    return 0.0


class BSplineSmoother:
    """Drop-in for DIALS' ``GaussianSmoother`` wrapper (the interface its
    scan-varying parameterisations call: ``value_weight``, ``num_values``,
    ``num_samples``, ``positions``, ``spacing``).

    Checkpoints as DIALS places them: for one interval two values at the
    scan's ends (linear between them), for two intervals three at the ends
    and the middle (quadratic Bernstein basis), for n >= 3 intervals n + 2
    values one interval apart, from half an interval before the scan's start
    to half an interval after its end (quadratic B-spline).  Values are normalised by the sum of the weights, as DIALS'
    are, which inside the scan is exactly one.
    """

    def __init__(self, x_range, num_intervals: int):
        assert num_intervals > 0
        self._x0 = float(x_range[0])
        self._nsample = int(num_intervals)
        self._nvalues = {1: 2, 2: 3}.get(self._nsample, self._nsample + 2)
        self._spacing = (float(x_range[1]) - self._x0) / self._nsample
        assert self._spacing > 0
        if self._nvalues < 4:
            self._positions = [float(i) for i in range(self._nvalues)]
        else:
            self._positions = [i - 0.5 for i in range(self._nvalues)]

    # the GaussianSmoother interface
    def num_values(self) -> int:
        return self._nvalues

    def num_samples(self) -> int:
        return self._nsample

    def num_average(self) -> int:
        return 3

    def sigma(self) -> float:
        return math.nan

    def spacing(self) -> float:
        return self._spacing

    def positions(self):
        return list(self._positions)

    def weights(self, x: float):
        """{index: weight} of the checkpoints at x (raw coordinate)."""
        z = (x - self._x0) / self._spacing
        if self._nvalues == 2:
            u = min(max(z, 0.0), 1.0)
            return {0: 1.0 - u, 1: u}
        if self._nvalues == 3:
            u = min(max(z / 2.0, 0.0), 1.0)
            return {0: (1.0 - u) ** 2, 1: 2.0 * u * (1.0 - u), 2: u * u}
        first = int(math.floor(z))  # checkpoints first .. first + 2 lie within 1.5 intervals of z
        out = {}
        for i in (first, first + 1, first + 2):
            if 0 <= i < self._nvalues:
                w = _quadratic_bspline(z - self._positions[i])
                if w > 0.0:
                    out[i] = w
        if not out:  # far outside the scan: the nearest end's value
            out[0 if z < 0 else self._nvalues - 1] = 1.0
        return out

    def value_weight(self, x, param):
        values = param.value
        weights = self.weights(x)
        vector = sparse.vector(self._nvalues)
        sumweight = 0.0
        sumwv = 0.0
        for i, w in weights.items():
            vector[i] = w
            sumweight += w
            sumwv += w * values[i]
        return sumwv / sumweight, vector, sumweight

    def multi_value_weight(self, x, param):
        x = list(x)
        matrix = sparse.matrix(len(x), self._nvalues)
        value = flex.double(len(x))
        sumweight = flex.double(len(x))
        for row, xi in enumerate(x):
            v, w, s = self.value_weight(xi, param)
            value[row], sumweight[row] = v, s
            for i, wi in w:
                matrix[row, i] = wi
        return value, matrix, sumweight
