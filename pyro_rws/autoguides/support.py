# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
Bijections from the real line onto a prior's support for the flow guides.

Pyro's autoguides map onto a bounded interval :math:`(a, b)` by a scaled sigmoid, so the flow
models :math:`\operatorname{logit}` of the parameter. For neural posterior estimation on a
box prior (sbibm's two moons, slcp, gaussian_mixture, gaussian_linear_uniform) that is a poor
space to learn in: a posterior near a bound becomes a long, skewed tail after the logit, and the
simulations of the whole prior put many posteriors there. Measured on two moons with 10³
simulations (the same simulations, seed and training loop): best validation loss -1.06 nats and
C2ST 0.94 with the sigmoid, -2.40 nats and C2ST 0.69 with the flow left on the real line (then
samples outside the box rejected, as ``sbi`` does).

:class:`SoftEdgeTransform` keeps the flow in the parameter's own space and still maps onto the
support by a bijection (exact densities, no rejection, no sample outside the prior): the
identity on the inner interval :math:`[a + \epsilon, b - \epsilon]`, :math:`\epsilon =
\text{edge} \cdot (b - a)`, with the real line's tails folded into the two bands of width
:math:`\epsilon` by an exponential,

.. math::

    \theta = T(y) = \begin{cases}
        b - \epsilon\, e^{-(y - (b - \epsilon))/\epsilon} & y > b - \epsilon, \\
        y & a + \epsilon \le y \le b - \epsilon, \\
        a + \epsilon\, e^{(y - (a + \epsilon))/\epsilon} & y < a + \epsilon,
    \end{cases}
    \qquad \log |T'(y)| = -\frac{\lvert y - \operatorname{clamp}(y, a + \epsilon, b -
    \epsilon)\rvert}{\epsilon},

continuous with its first derivative (1 at the junctions). A prior draw in a band maps to an
exponential tail of scale :math:`\epsilon` beyond it.
"""

from __future__ import annotations

import torch
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import IndependentTransform, Transform

#: the interval maps of :class:`~pyro_rws.AutoAmortizedFlow`'s ``interval_bijection``
INTERVAL_BIJECTIONS = ("soft_edge", "sigmoid")


class SoftEdgeTransform(Transform):
    """
    A bijection from the real line onto the open interval ``(low, high)``: the identity except
    in two bands of width ``edge * (high - low)`` at the ends (see
    :mod:`pyro_rws.autoguides.support`).

    :param low: lower bound (tensor or float, broadcasting with the values).
    :param high: upper bound.
    :param float edge: band width as a fraction of the interval's width, in (0, 0.5).
    """

    domain = constraints.real
    bijective = True
    sign = +1

    def __init__(self, low, high, edge: float = 0.05, cache_size: int = 0):
        if not 0.0 < edge < 0.5:
            raise ValueError(f"edge must lie in (0, 0.5), got {edge}")
        super().__init__(cache_size=cache_size)
        self.low, self.high, self.edge = low, high, float(edge)

    @property
    def codomain(self):
        return constraints.interval(self.low, self.high)

    def with_cache(self, cache_size: int = 1):
        if self._cache_size == cache_size:
            return self
        return SoftEdgeTransform(self.low, self.high, self.edge, cache_size=cache_size)

    def __eq__(self, other):
        return (
            isinstance(other, SoftEdgeTransform)
            and other.edge == self.edge
            and bool(torch.equal(torch.as_tensor(other.low), torch.as_tensor(self.low)))
            and bool(torch.equal(torch.as_tensor(other.high), torch.as_tensor(self.high)))
        )

    def _bounds(self, like: torch.Tensor):
        low = torch.as_tensor(self.low, dtype=like.dtype, device=like.device)
        high = torch.as_tensor(self.high, dtype=like.dtype, device=like.device)
        eps = self.edge * (high - low)
        return low, high, eps

    def _call(self, y: torch.Tensor) -> torch.Tensor:
        low, high, eps = self._bounds(y)
        inner_low, inner_high = low + eps, high - eps
        # the smallest gap to a bound that float keeps: theta stays strictly inside
        tiny = torch.finfo(y.dtype).eps * torch.maximum(low.abs(), high.abs()).clamp(min=1.0)
        up = (eps * torch.exp(-(y - inner_high).clamp(min=0) / eps)).clamp(min=tiny)
        down = (eps * torch.exp((y - inner_low).clamp(max=0) / eps)).clamp(min=tiny)
        return torch.where(y > inner_high, high - up, torch.where(y < inner_low, low + down, y))

    def _inverse(self, theta: torch.Tensor) -> torch.Tensor:
        low, high, eps = self._bounds(theta)
        inner_low, inner_high = low + eps, high - eps
        up = inner_high + eps * torch.log(eps / (high - theta).clamp(max=eps))
        down = inner_low - eps * torch.log(eps / (theta - low).clamp(max=eps))
        return torch.where(theta > inner_high, up, torch.where(theta < inner_low, down, theta))

    def log_abs_det_jacobian(self, y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        low, high, eps = self._bounds(y)
        return -(y - y.clamp(low + eps, high - eps)).abs() / eps


def interval_bijection(
    support: constraints.Constraint, kind: str = "soft_edge", edge: float = 0.05
) -> Transform:
    """
    The map from unconstrained space onto ``support``: for an interval (or a box of
    intervals, ``constraints.independent``) a :class:`SoftEdgeTransform` when ``kind`` is
    ``"soft_edge"`` (bands of ``edge`` times the width); ``biject_to(support)`` (Pyro's, a
    sigmoid for intervals) otherwise and for every other support.
    """
    if kind not in INTERVAL_BIJECTIONS:
        raise ValueError(f"interval_bijection must be one of {INTERVAL_BIJECTIONS}, got {kind!r}")
    base, wrapped = support, 0
    while isinstance(base, constraints.independent):
        wrapped += base.reinterpreted_batch_ndims
        base = base.base_constraint
    intervals = (constraints._Interval, constraints._HalfOpenInterval)
    if kind == "sigmoid" or not isinstance(base, intervals):
        return biject_to(support)
    transform = SoftEdgeTransform(base.lower_bound, base.upper_bound, edge)
    return IndependentTransform(transform, wrapped) if wrapped else transform
