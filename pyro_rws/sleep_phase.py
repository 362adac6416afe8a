# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The sleep phase alone, for simulators and fixed models (:class:`SleepPhaseLoss`); its exact test
is tests/test_sleep_phase.py.
"""

from __future__ import annotations

import math

from ._base import WakeSleepLoss, shared_docs
from ._fantasy import FantasyArgs
from .diagnostics import StepStats


@shared_docs
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
    its place (see ``fantasy_args``).

    **Value.** The sleep-phi loss above, summed over the fantasies of a particle and scaled for
    subsampling, averaged over particles.

    This is Pyro's ``CSIS`` objective, vectorized over particles and with no ``observations=``
    keyword required; with ``vectorize_particles=False`` each particle is a separate run, so the
    simulator may have stochastic control flow.

    <<methods>>

    Example (a simulator whose guide is trained on its own fantasies; ``x`` only fixes the
    batch shape)::

        svi = SVI(simulator, guide, pyro.optim.Adam({"lr": 1e-3}),
                  loss=SleepPhaseLoss(num_particles=10))
        for step in range(num_steps):
            svi.step(x)

    :param int num_particles: S, fantasies per datapoint of the batch. With S > 1 the fantasies
        carry a leading particle dim; a guide that cannot broadcast over it (it reads
        ``len(x)``) is found on the first step and run once per particle.
    <<vectorize_particles>>
    <<max_plate_nesting>>
    <<fantasy_args>>
    <<retain_graph>>

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
