# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0

from __future__ import annotations

import math

from ._base import WakeSleepLoss
from ._fantasy import FantasyArgs
from .diagnostics import StepStats


class SleepPhaseLoss(WakeSleepLoss):
    r"""
    The sleep phase alone: amortized inference for a fixed model or simulator [1, 2, 3].

    Fantasies :math:`(x_s, z_s) \sim p_\theta(x, z)` are drawn by running the model unconditioned
    with the caller's arguments (so each sleep particle makes one fantasy per datapoint of the
    batch), and the guide is fitted to them by

    .. math::

        \mathcal{L}_\phi = -\frac{1}{S} \sum_{s=1}^S \log q_\phi(z_s | x_s),

    a Monte Carlo estimate of :math:`\mathbb{E}_{p(x)}\,\mathrm{KL}(p(z|x) \| q_\phi(z|x))` up to
    a constant. Model parameters receive no gradient (the model runs under ``no_grad``). The
    data passed to :meth:`loss` only fixes shapes and plate sizes; the guide sees fantasies in
    its place (see ``fantasy_args`` in :class:`~pyro_rws.ReweightedWakeSleep`).

    **Value.** The sleep-phi loss above, summed over the fantasies of a particle and scaled for
    subsampling, averaged over particles.

    This is Pyro's ``CSIS`` objective, vectorized over particles and with no ``observations=``
    keyword required; with ``vectorize_particles=False`` each particle is a separate run, so the
    simulator may have stochastic control flow.

    :param int num_particles: S, fantasies per datapoint of the batch.
    :param bool vectorize_particles: see :class:`~pyro_rws._base.WakeSleepLoss`. With S > 1 and
        vectorization the guide receives fantasies with a leading particle dimension.
    :param int max_plate_nesting: see :class:`~pyro_rws._base.WakeSleepLoss`.
    :param fantasy_args: see :class:`~pyro_rws.ReweightedWakeSleep`.
    :param bool retain_graph: passed to ``backward``.

    References

    [1] `The "wake-sleep" algorithm for unsupervised neural networks`, Hinton, Dayan, Frey,
        Neal (Science, 1995)

    [2] `Inference Compilation and Universal Probabilistic Programming`, Tuan Anh Le,
        Atilim Gunes Baydin, Frank Wood (AISTATS 2017), arXiv:1610.09900

    [3] `Revisiting Reweighted Wake-Sleep for Models with Stochastic Control Flow`, Le et al.
        (UAI 2019), arXiv:1805.10469
    """

    def __init__(
        self,
        num_particles: int = 1,
        vectorize_particles: bool = True,
        max_plate_nesting: int | float = math.inf,
        *,
        fantasy_args: FantasyArgs = None,
        retain_graph: bool | None = None,
    ):
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            retain_graph=retain_graph,
            fantasy_args=fantasy_args,
        )

    uses_sleep_phase = True

    def _terms(self, model, guide, args, kwargs):
        plate_nesting = self._plate_nesting(model, guide, args, kwargs)
        sleep_phi = self._sleep_phi(
            model, guide, args, kwargs, plate_nesting, None, self.num_particles
        )
        value = sleep_phi.detach()
        return value, sleep_phi, StepStats(value, sleep_phi=value, num_particles=self.num_particles)
