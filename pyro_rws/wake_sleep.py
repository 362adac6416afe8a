# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The classic wake-sleep algorithm (:class:`WakeSleepELBO`); its exact test is
tests/test_wake_sleep.py.
"""

from __future__ import annotations

import math
import warnings

import torch
from pyro.infer.util import is_validation_enabled
from pyro.util import warn_if_nan

from ._base import WakeSleepLoss, shared_docs
from ._fantasy import FantasyArgs
from ._weights import check_finite_elbo, effective_sample_size, log_weights
from .diagnostics import StepStats

PHASES = ("sleep", "wake")


@shared_docs
class WakeSleepELBO(WakeSleepLoss):
    r"""
    The classic wake-sleep algorithm [1], as in Edward's ``WakeSleep`` [2].

    The wake phase fits the model to guide samples, with the unweighted estimator

    .. math::

        \mathcal{L}_\theta = -\frac{1}{K} \sum_{k=1}^K \log p_\theta(x, \mathrm{sg}\, z^k),
        \qquad z^k \sim q_\phi(z | x),

    which is the gradient of the ELBO with respect to :math:`\theta`. The guide is fitted
    either in the sleep phase (``phase_q="sleep"``, the original algorithm), on fantasies
    :math:`(x, z) \sim p_\theta`:

    .. math:: \mathcal{L}_\phi = -\frac{1}{S}\sum_{s=1}^S \log q_\phi(z_s | x_s),

    which minimizes :math:`\mathrm{KL}(p_\theta(z|x) \| q_\phi(z|x))` averaged over the model's
    own data; or in the wake phase (``phase_q="wake"``) on the same guide samples, reweighted:
    :math:`\mathcal{L}_\phi = -\sum_k \mathrm{sg}(\bar w_k) \log q_\phi(\mathrm{sg}\,z^k|x)`
    (the wake-phi update of reweighted wake-sleep). With ``num_particles=1`` the wake update of
    the guide, :math:`-\log q_\phi(\mathrm{sg}\,z|x)` with :math:`z \sim q_\phi`, has expectation
    zero: it is pure noise, and a warning says so.

    **Value.** :meth:`loss` returns the negative ELBO estimate
    :math:`-\frac1K\sum_k [\log p(x, z^k) - \log q(z^k|x)]`, summed over datapoints and scaled for
    subsampling. Terms are in :attr:`stats`.

    With ``phase_q="sleep"`` the loss is linear in the log-densities, so global latents and
    subsampling combine freely (scales act inside, as in Pyro's ``Trace_ELBO``). With
    ``phase_q="wake"`` the weights are per datapoint, as in :class:`~pyro_rws.ReweightedWakeSleep`.

    <<methods>>

    Example::

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=WakeSleepELBO())
        for step in range(num_steps):
            svi.step(x)             # the negative ELBO estimate, a float

    :param int num_particles: K, guide samples per datapoint for the wake phase.
    :param str phase_q: ``"sleep"`` (default) or ``"wake"``.
    <<num_sleep_particles>>
    <<vectorize_particles>>
    <<max_plate_nesting>>
    <<fantasy_args>>
    <<retain_graph>>

    References

    [1] `The "wake-sleep" algorithm for unsupervised neural networks`, Geoffrey E. Hinton,
        Peter Dayan, Brendan J. Frey, Radford M. Neal (Science, 1995)

    [2] `Edward: A library for probabilistic modeling, inference, and criticism`,
        Dustin Tran et al., arXiv:1610.09787 (``ed.WakeSleep``)
    """

    def __init__(
        self,
        num_particles: int = 1,
        phase_q: str = "sleep",
        num_sleep_particles: int | None = None,
        vectorize_particles: bool = True,
        max_plate_nesting: int | float = math.inf,
        *,
        fantasy_args: FantasyArgs = None,
        retain_graph: bool | None = None,
    ):
        if phase_q not in PHASES:
            raise ValueError(f"phase_q must be 'sleep' or 'wake', got {phase_q!r}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            retain_graph=retain_graph,
            fantasy_args=fantasy_args,
            num_sleep_particles=num_sleep_particles,
        )
        if phase_q == "wake" and self.num_particles == 1:
            warnings.warn(
                "WakeSleepELBO(phase_q='wake', num_particles=1): the wake update of the guide, "
                "-log q(sg z|x) with z ~ q, has expectation zero, so the guide learns nothing "
                "but noise. Use num_particles >= 2 (reweighted wake-phi) or phase_q='sleep'.",
                UserWarning,
                stacklevel=2,
            )
        self.phase_q = phase_q

    _non_finite = (
        "the ELBO is NaN: a log_prob returned NaN (check the distribution parameters computed "
        "there, e.g. a network output).",
        "the ELBO is infinite: a guide sample has probability zero under the model "
        "(log p(x, z) = -inf). Make the guide's support match the model's.",
        "the ELBO is infinite: a guide sample has infinite density under the model or zero "
        "under the guide (log w = +inf). Make the guide's support match the model's.",
    )

    @property
    def uses_sleep_phase(self) -> bool:
        return self.phase_q == "sleep"

    def _terms(self, model, guide, args, kwargs):
        plate_nesting = self._plate_nesting(model, guide, args, kwargs)
        runs, minibatch = self._wake(model, guide, args, kwargs, plate_nesting)
        wake_q = self.phase_q == "wake"
        lw = log_weights(
            runs,
            plate_nesting=plate_nesting,
            vectorized=self.vectorize_particles,
            per_datapoint=wake_q,
        )
        K = self.num_particles
        log_w = lw.log_w.detach()
        elbo = lw.scale * log_w.sum() / K
        check_finite_elbo(elbo, log_w, runs)
        wake_theta = -lw.scale * lw.log_p.sum() / K
        surrogate = wake_theta
        stats = StepStats(-elbo, wake_theta=wake_theta.detach(), bound=elbo, num_particles=K)
        if wake_q:
            weights = torch.softmax(log_w, 0)
            wake_phi = -lw.scale * (weights * lw.log_q).sum()
            surrogate = surrogate + wake_phi
            stats.wake_phi = wake_phi.detach()
            stats.ess = effective_sample_size(log_w)
        else:
            sleep_phi = self._sleep_phi(
                model, guide, args, kwargs, plate_nesting, minibatch, self.num_sleep_particles
            )
            surrogate = surrogate + sleep_phi
            stats.sleep_phi = sleep_phi.detach()
        if is_validation_enabled():
            warn_if_nan(surrogate, "wake-sleep surrogate loss")
        return -elbo, surrogate, stats
