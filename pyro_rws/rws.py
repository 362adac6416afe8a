# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Reweighted wake-sleep (:class:`ReweightedWakeSleep`, alias :class:`RWS`); its exact test is
tests/test_rws.py, its DReG variant is tested in tests/test_dreg.py.
"""

from __future__ import annotations

import math

import torch
from pyro.infer.util import is_validation_enabled
from pyro.util import warn_if_nan

from ._args import check_fraction
from ._base import WakeSleepLoss, shared_docs
from ._dreg import DRegWarningOnce, check_dreg, reparameterized_sites
from ._fantasy import FantasyArgs
from ._weights import (
    check_finite_bound,
    effective_sample_size,
    log_mean_exp,
    log_weights,
    scaled,
)
from .diagnostics import StepStats


@shared_docs
class ReweightedWakeSleep(WakeSleepLoss):
    r"""
    Reweighted Wake-Sleep [1, 2], with per-datapoint importance weights and minibatching.

    For each datapoint :math:`x` the guide proposes :math:`z^1, \dots, z^K \sim q_\phi(z|x)`,
    with log-weights :math:`\log w_k = \log p_\theta(x, z^k) - \log q_\phi(z^k|x)` and
    self-normalized weights :math:`\bar w_k = w_k / \sum_j w_j`. Model parameters descend the
    wake-theta loss, guide parameters a mix of wake-phi and sleep-phi:

    .. math::

        \mathcal{L}_\theta &= -\log \frac{1}{K} \sum_{k=1}^K
            \frac{p_\theta(x, z^k)}{\mathrm{sg}\, q_\phi(z^k|x)}, \\
        \mathcal{L}_\phi^{\text{wake}} &= -\sum_{k=1}^K \mathrm{sg}(\bar w_k)
            \log q_\phi(\mathrm{sg}\, z^k | x), \qquad
        \mathcal{L}_\phi^{\text{sleep}} = -\log q_\phi(z | x),\ (x, z) \sim p_\theta, \\
        \mathcal{L}_\phi &= \text{insomnia} \cdot \mathcal{L}_\phi^{\text{wake}}
            + (1 - \text{insomnia}) \cdot \mathcal{L}_\phi^{\text{sleep}}

    (sg: stop-gradient). Guide samples are never differentiated through, even when
    reparameterizable; fantasies are detached; the model runs under ``no_grad`` in the sleep
    phase. The gradient of ``theta`` is exactly that of :math:`\mathcal{L}_\theta`, the gradient
    of ``phi`` that of :math:`\mathcal{L}_\phi`, from one backward pass.

    **Doubly reparameterized gradients** (``dreg=True``). For guide sites with ``rsample``,
    :math:`z^k = g(\epsilon^k, \phi)`, the wake-phi gradient is replaced by RWS-DReG [3], which
    has the same expectation (it is unbiased for the expected standard wake-phi gradient) and
    is exactly zero when :math:`q_\phi` is the posterior. With
    :math:`\log \tilde w_k = \log p_\theta(x, z^k) - \log q_{\mathrm{sg}(\phi)}(z^k | x)`, the
    guide's parameters stopped but :math:`z^k` still a function of :math:`\phi`, the ascent
    direction of the wake-phi objective :math:`\sum_k \bar w_k \log q_\phi(z^k|x)` is

    .. math::

        \sum_{k=1}^K \left(\bar w_k - \bar w_k^2\right)
            \frac{\partial \log \tilde w_k}{\partial z^k} \frac{\partial z^k}{\partial \phi},

    the sign and coefficients of Tucker et al. [3] and of their reference code; as a loss, the
    surrogate is :math:`\mathcal{L}_\phi^{\text{wake}} = -\sum_k \mathrm{sg}(\bar w_k -
    \bar w_k^2) \log \tilde w_k - \sum_k \mathrm{sg}(\bar w_k) \log q_\phi(z^k_{\text{score}} |
    \ldots)`, the second sum over the guide sites without ``rsample`` (unchanged score-function
    wake-phi; their distribution parameters keep their dependence on earlier reparameterized
    sites, which the identity behind DReG requires). The DReG term sends no gradient to
    :math:`\theta` (see :mod:`pyro_rws._dreg` for how the stop-gradients are realized without a
    second backward pass); wake-theta, the sleep-phi term, the particles drawn (for the same
    seed), the value and :attr:`stats` are those of ``dreg=False``. It costs one more guide and
    model run per step. It helps most near the posterior; far from it the variance reduction
    shrinks as K grows, and need not persist (see ``benchmarks/README.md``).
    A guide without reparameterized sites gets the standard estimator and a
    :class:`UserWarning` (once per loss object).

    **Per-datapoint weights.** The log-weights have one entry per particle and per element of
    every plate that encloses all sample sites of model and guide (usually the data plate); the
    log-sum-exp over particles runs separately for each. Plates nested inside are summed. A latent
    outside a plate (a global latent) makes the weights joint along that plate, which is correct
    but lowers the effective sample size as the batch grows; with such a plate subsampled there
    is no unbiased minibatch estimate, and a :class:`ValueError` says so.

    **Subsampling.** With ``pyro.plate("data", N, subsample_size=B)`` (or ``subsample=``) the
    factor :math:`N/B` multiplies the per-datapoint terms outside the log-sum-exp. Other scales
    (``poutine.scale``) and masks act inside the weights, as part of the model.

    **Value.** :meth:`loss` and :meth:`loss_and_grads` return the negative importance-weighted
    bound :math:`-\sum_n \frac{N}{B}\log \frac1K \sum_k w_{nk}` (a float; with ``insomnia < 1``
    and ``model_has_params=False`` no wake phase runs and the value is the sleep-phi loss).
    The terms, the bound and the per-datapoint effective sample size of the last step are in
    :attr:`stats` (:class:`~pyro_rws.diagnostics.StepStats`).

    **Enumeration.** Model sites marked ``infer={"enumerate": "parallel"}`` (e.g. by
    :func:`~pyro.infer.config_enumerate`) that the guide does not sample are summed out exactly
    per particle and per datapoint, :math:`p_\theta(x, z^k) = \sum_e p_\theta(x, z^k, e)`, and
    every term above uses this marginal (as do :class:`~pyro_rws.VIMCO`,
    :class:`~pyro_rws.WakeSleepELBO` and :func:`~pyro_rws.log_evidence`). The sleep phase samples
    them from the model; the guide scores only its own sites. See :mod:`pyro_rws._enum`.

    **Sleep phase.** The model runs unconditioned with the caller's arguments; the guide is
    called with each fantasy observation in place of the argument whose tensor the model
    observed (see ``fantasy_args``). A guide with an ``observations`` keyword (Pyro's
    convention) receives ``{site: fantasy}`` there.

    <<methods>>

    Example::

        rws = RWS(num_particles=10)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=rws)
        for step in range(num_steps):
            svi.step(x)             # the negative importance-weighted bound, a float
        print(rws.stats.bound, rws.stats.ess.min())

    .. note:: Cost per step: one vectorized guide run and one model replay for the wake phase
        (K particles); with ``insomnia < 1`` one more model run and guide run for the sleep phase.

    :param int num_particles: K, particles per datapoint. At least 2 when ``insomnia > 0``:
        with one particle the self-normalized wake-phi gradient has expectation zero.
    :param float insomnia: weight of wake-phi against sleep-phi, in [0, 1]. Default 1 (wake-phi
        only), which Le et al. [2] found better in most settings.
    :param bool model_has_params: if False and ``insomnia == 0``, skip the wake phase (pure
        sleep; see :class:`~pyro_rws.SleepPhaseLoss`). Kept for compatibility with Pyro.
    <<num_sleep_particles>>
    <<vectorize_particles>>
    <<max_plate_nesting>>
    <<fantasy_args>>
    :param bool strict_enumeration_warning: accepted for compatibility with Pyro; ignored.
    <<retain_graph>>
    :param bool dreg: use the doubly reparameterized wake-phi gradient (RWS-DReG [3]) for guide
        sites with ``rsample``. Default False.

    References

    [1] `Reweighted Wake-Sleep`, Jörg Bornschein, Yoshua Bengio (ICLR 2015), arXiv:1406.2751

    [2] `Revisiting Reweighted Wake-Sleep for Models with Stochastic Control Flow`,
        Tuan Anh Le, Adam R. Kosiorek, N. Siddharth, Yee Whye Teh, Frank Wood (UAI 2019),
        arXiv:1805.10469

    [3] `Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives`, George Tucker,
        Dieterich Lawson, Shixiang Gu, Chris J. Maddison (ICLR 2019), arXiv:1810.04152
    """

    def __init__(
        self,
        num_particles: int = 2,
        insomnia: float = 1.0,
        model_has_params: bool = True,
        num_sleep_particles: int | None = None,
        vectorize_particles: bool = True,
        max_plate_nesting: int | float = math.inf,
        strict_enumeration_warning: bool = True,
        *,
        fantasy_args: FantasyArgs = None,
        retain_graph: bool | None = None,
        dreg: bool = False,
    ):
        insomnia = check_fraction("insomnia", insomnia)
        self.dreg = check_dreg(dreg)
        self._dreg_warning = DRegWarningOnce()
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            retain_graph=retain_graph,
            fantasy_args=fantasy_args,
            num_sleep_particles=num_sleep_particles,
            min_particles=2 if insomnia > 0 else 1,
            why_min=(
                " when insomnia > 0 (with one particle the self-normalized wake-phi gradient "
                "is pure noise; use insomnia=0.0 for sleep-phi only)"
            ),
        )
        self.insomnia = insomnia
        self.model_has_params = bool(model_has_params)

    @property
    def uses_sleep_phase(self) -> bool:
        return self.insomnia < 1.0

    def _terms(self, model, guide, args, kwargs):
        plate_nesting = self._plate_nesting(model, guide, args, kwargs)
        if not self.model_has_params and self.insomnia == 0.0:
            sleep_phi = self._sleep(model, guide, args, kwargs, plate_nesting, None)
            return (
                sleep_phi.detach(),
                sleep_phi,
                StepStats(sleep_phi.detach(), sleep_phi=sleep_phi.detach()),
            )

        dreg = self.dreg and self.insomnia > 0.0
        runs, minibatch = self._wake(model, guide, args, kwargs, plate_nesting, detach=not dreg)
        path = None
        if dreg:
            any_reparameterized, _ = reparameterized_sites(runs)
            self._dreg_warning.check(any_reparameterized, type(self).__name__)
            if any_reparameterized and torch.is_grad_enabled():
                dw = self._dreg_weights(model, guide, args, kwargs, runs, plate_nesting)
                lw, path, log_q_score = dw.detached, dw.path, dw.log_q_score
            else:  # nothing to reparameterize, or no gradient wanted: the plain estimator
                for _, guide_trace in runs:
                    guide_trace.detach_()
        if path is None:
            lw = log_weights(runs, plate_nesting=plate_nesting, vectorized=self.vectorize_particles)
        log_w = lw.log_w.detach()
        bound_n = log_mean_exp(log_w)
        check_finite_bound(bound_n, log_w, runs)
        weights = torch.softmax(log_w, 0)
        bound = scaled(lw.scale, bound_n.sum())
        loss = -bound
        # Particles of weight zero (log p = -inf, outside the model's support) drop out: else
        # 0 * -inf makes the surrogate and every gradient NaN.
        log_p = torch.where(weights > 0, lw.log_p, 0.0)
        # grad of -sum_k sg(wbar_k) log p(x, z_k) == grad of -log mean_k p(x, z_k)/sg q(z_k|x)
        surrogate = scaled(-lw.scale, (weights * log_p).sum())
        stats = StepStats(loss, wake_theta=loss, bound=bound, num_particles=self.num_particles)
        stats.ess = effective_sample_size(log_w, weights)
        if self.insomnia > 0.0:
            wake_phi = scaled(-lw.scale, (weights * lw.log_q).sum())
            stats.wake_phi = wake_phi.detach()
            if path is not None:
                # RWS-DReG: (wbar - wbar^2) times the path derivative for rsample sites, the
                # score function for the others (with their parents attached)
                wake_phi = (
                    -lw.scale * ((weights - weights.square()) * path + weights * log_q_score).sum()
                )
            surrogate = surrogate + scaled(self.insomnia, wake_phi)
        if self.insomnia < 1.0:
            sleep_phi = self._sleep(model, guide, args, kwargs, plate_nesting, minibatch)
            surrogate = surrogate + (1.0 - self.insomnia) * sleep_phi
            stats.sleep_phi = sleep_phi.detach()
        if is_validation_enabled():
            warn_if_nan(surrogate, "wake-theta/wake-phi surrogate loss")
        return loss, surrogate, stats

    def _sleep(self, model, guide, args, kwargs, plate_nesting, minibatch):
        return self._sleep_phi(
            model, guide, args, kwargs, plate_nesting, minibatch, self.num_sleep_particles
        )


#: Short name for :class:`ReweightedWakeSleep`.
RWS = ReweightedWakeSleep
