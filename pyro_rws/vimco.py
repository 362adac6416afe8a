# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
VIMCO: the importance-weighted bound with leave-one-out baselines (:class:`VIMCO`); its exact
test is tests/test_vimco.py.
"""

from __future__ import annotations

import math

import torch
from pyro.infer.util import is_validation_enabled
from pyro.util import warn_if_nan

from ._base import WakeSleepLoss, shared_docs
from ._dreg import DRegWarningOnce, check_dreg, reparameterized_sites
from ._weights import check_finite_bound, effective_sample_size, log_mean_exp, log_weights
from .diagnostics import StepStats


def leave_one_out_bounds(log_w: torch.Tensor) -> torch.Tensor:
    r"""
    VIMCO's baselines :math:`\hat L_{-k}`: the bound with :math:`\log w_k` replaced by the mean of
    the other log-weights, for each k. Shape ``(K,) + batch``, computed in log space
    (``K^2`` memory per datapoint), so a dominant particle does not cancel catastrophically.
    """
    K = log_w.shape[0]
    eye = torch.eye(K, dtype=torch.bool, device=log_w.device)
    eye = eye.reshape(K, K, *([1] * (log_w.dim() - 1)))
    rows = log_w.unsqueeze(0).expand(K, *log_w.shape)  # rows[k, j] = log w_j
    # the mean over j != k, summed without subtraction so that a -inf weight gives -inf, not NaN
    mean_others = rows.masked_fill(eye, 0.0).sum(1, keepdim=True) / (K - 1)
    replaced = torch.where(eye, mean_others, rows)  # row k: log w_k replaced by mean_others[k]
    return torch.logsumexp(replaced, 1) - math.log(K)


@shared_docs
class VIMCO(WakeSleepLoss):
    r"""
    Variational inference for Monte Carlo objectives [1]: the importance-weighted bound

    .. math:: \hat L = \log \frac{1}{K} \sum_{k=1}^K w_k, \qquad
        w_k = \frac{p_\theta(x, z^k)}{q_\phi(z^k | x)}, \quad z^k \sim q_\phi(\cdot | x),

    maximized in both :math:`\theta` and :math:`\phi` with the multi-sample score-function
    estimator and per-particle leave-one-out baselines:

    .. math::

        \nabla_\phi \hat L \approx \sum_{k=1}^K \mathrm{sg}(\hat L - \hat L_{-k})\,
            \nabla_\phi \log q_\phi(z^k | x) + \sum_{k=1}^K \mathrm{sg}(\bar w_k)\,
            \nabla_\phi \log w_k,

    where :math:`\hat L_{-k}` replaces :math:`\log w_k` by the mean of the other log-weights.
    The score-function term uses only the guide sites that cannot be reparameterized; sites with
    ``rsample`` contribute through the second, pathwise term (guide samples are *not* detached
    here). Model parameters get the gradient of :math:`\hat L`, the same as wake-theta of
    :class:`~pyro_rws.ReweightedWakeSleep`. The estimator is unbiased for the gradient of
    :math:`\mathbb{E}[\hat L]`.

    **Doubly reparameterized gradients** (``dreg=True``). For the sites with ``rsample`` the
    pathwise term is replaced by IWAE-DReG [4], unbiased for the same gradient and exactly zero
    when :math:`q_\phi` is the posterior: with :math:`\log \tilde w_k = \log p_\theta(x, z^k) -
    \log q_{\mathrm{sg}(\phi)}(z^k | x)` (the guide's parameters stopped, :math:`z^k` still a
    function of :math:`\phi`),

    .. math::

        \nabla_\phi \hat L \approx \sum_{k=1}^K \mathrm{sg}(\hat L - \hat L_{-k} - \bar w_k)\,
            \nabla_\phi \log q_\phi(z^k_{\text{score}} | \ldots) + \sum_{k=1}^K \bar w_k^2\,
            \frac{\partial \log \tilde w_k}{\partial z^k} \frac{\partial z^k}{\partial \phi},

    the sign and coefficients of Tucker et al. [4] (an ascent direction). The first sum is
    VIMCO's term for the sites without ``rsample``, less the :math:`-\bar w_k \nabla_\phi
    \log q` that the pathwise gradient of :math:`\hat L` gives them, so their gradient is that
    of ``dreg=False``. The DReG term sends no gradient to :math:`\theta`, which gets
    :math:`\nabla_\theta \hat L` as before (see :mod:`pyro_rws._dreg`); particles (for the
    same seed), value and :attr:`stats` are those of ``dreg=False``. One more guide and model
    run per step. With every guide site reparameterized, ``VIMCO(dreg=True)`` is IWAE with
    DReG, and ``num_particles=1`` is allowed: the "sticking the landing" estimator of the
    ELBO [5]. A guide without reparameterized sites gets the standard estimator and a
    :class:`UserWarning` (once per loss object).

    Weights are per datapoint, with the plate and subsampling semantics of
    :class:`~pyro_rws.ReweightedWakeSleep` (the same code builds them).

    **Without baselines** (``baseline=None``) the learning signal of every particle is the bound
    itself, :math:`\mathrm{sg}(\hat L)`: the plain multi-sample score-function (REINFORCE)
    estimator of the same gradient, the "REINFORCE" of Le et al. [3] (rrws's
    ``get_reinforce_loss``). It is unbiased too, with a higher variance; it exists as the
    baseline that papers compare against, and allows ``num_particles=1``.

    **Value.** The negative bound :math:`-\sum_n \frac{N}{B} \hat L_n`, as for RWS. Terms are in
    :attr:`stats`.

    .. note:: Unlike reweighted wake-sleep, the guide of an IWAE-type objective gets a weaker
        learning signal as K grows [2, 3]; compare both on your problem.

    <<methods>>

    Example::

        vimco = VIMCO(num_particles=10)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=vimco)
        for step in range(num_steps):
            svi.step(x)             # the negative importance-weighted bound, a float

    :param int num_particles: K >= 2 (the baselines need at least one other particle); K = 1 is
        allowed with ``dreg=True`` if every guide site is reparameterized.
    <<vectorize_particles>>
    <<max_plate_nesting>>
    <<retain_graph>>
    :param bool dreg: use the doubly reparameterized gradient (IWAE-DReG [4]) for guide sites with
        ``rsample``. Default False.
    :param baseline: the control variate of the score-function term: ``"leave-one-out"``
        (VIMCO's, the default) or ``None`` (REINFORCE, no control variate).
    :type baseline: str or None

    References

    [1] `Variational inference for Monte Carlo objectives`, Andriy Mnih, Danilo J. Rezende
        (ICML 2016), arXiv:1602.06725

    [2] `Tighter Variational Bounds are Not Necessarily Better`, Tom Rainforth et al.
        (ICML 2018), arXiv:1802.04537

    [3] `Revisiting Reweighted Wake-Sleep for Models with Stochastic Control Flow`, Le et al.
        (UAI 2019), arXiv:1805.10469

    [4] `Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives`, George Tucker,
        Dieterich Lawson, Shixiang Gu, Chris J. Maddison (ICLR 2019), arXiv:1810.04152

    [5] `Sticking the Landing`: Simple, Lower-Variance Gradient Estimators for Variational
        Inference, Geoffrey Roeder, Yuhuai Wu, David Duvenaud (NeurIPS 2017), arXiv:1703.09194
    """

    def __init__(
        self,
        num_particles: int = 2,
        vectorize_particles: bool = True,
        max_plate_nesting: int | float = math.inf,
        *,
        retain_graph: bool | None = None,
        dreg: bool = False,
        baseline: str | None = "leave-one-out",
    ):
        dreg = check_dreg(dreg)
        if baseline not in ("leave-one-out", None):
            raise ValueError(
                f"VIMCO: baseline must be 'leave-one-out' or None (no control variate), got "
                f"{baseline!r}"
            )
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            retain_graph=retain_graph,
            min_particles=1 if dreg or baseline is None else 2,
            why_min=" (VIMCO's leave-one-out baselines need another particle)",
        )
        self.dreg = dreg
        self.baseline = baseline
        self._dreg_warning = DRegWarningOnce()

    def _terms(self, model, guide, args, kwargs):
        plate_nesting = self._plate_nesting(model, guide, args, kwargs)
        runs, _ = self._wake(model, guide, args, kwargs, plate_nesting, detach=False)
        if self.dreg:
            any_reparameterized, all_reparameterized = reparameterized_sites(runs)
            if self._loo_baseline and self.num_particles == 1 and not all_reparameterized:
                raise ValueError(
                    "VIMCO(num_particles=1, dreg=True) needs every guide site to be "
                    "reparameterized (with one particle there is no leave-one-out baseline for "
                    "score-function sites such as discrete ones). Use num_particles >= 2."
                )
            self._dreg_warning.check(any_reparameterized, type(self).__name__)
            if any_reparameterized and torch.is_grad_enabled():
                return self._dreg_terms(model, guide, args, kwargs, runs, plate_nesting)
        lw = log_weights(
            runs,
            plate_nesting=plate_nesting,
            vectorized=self.vectorize_particles,
            score_parts=True,
        )
        log_w = lw.log_w  # with the graph of theta, and of phi through log q and rsample sites
        log_w_detached = log_w.detach()
        # particles of weight zero carry no gradient (their log-density may have none)
        log_w = torch.where(log_w_detached > -math.inf, log_w, log_w_detached)
        bound_n = log_mean_exp(log_w)
        bound_detached = bound_n.detach()
        check_finite_bound(bound_detached, log_w_detached, runs)
        if self._loo_baseline and self.num_particles == 1:
            # K = 1 only with dreg=True, every site reparameterized, and no gradient wanted
            surrogate = -lw.scale * bound_n.sum()
        else:
            learning_signal = self._learning_signal(bound_detached, log_w_detached)  # (K, *batch)
            surrogate = -lw.scale * ((learning_signal * lw.log_q_score).sum(0) + bound_n).sum()
        return self._finish_terms(lw.scale, bound_detached, log_w_detached, surrogate)

    def _dreg_terms(self, model, guide, args, kwargs, runs, plate_nesting):
        dw = self._dreg_weights(model, guide, args, kwargs, runs, plate_nesting)
        lw = dw.detached
        log_w_detached = lw.log_p.detach() - lw.log_q.detach()
        bound_detached = log_mean_exp(log_w_detached)
        check_finite_bound(bound_detached, log_w_detached, runs)
        weights = torch.softmax(log_w_detached, 0)
        # theta: grad of -sum_k sg(wbar_k) log p(x, sg z_k), the gradient of -bound in theta
        log_p = torch.where(weights > 0, lw.log_p, 0.0)
        terms = weights * log_p + weights.square() * dw.path  # IWAE-DReG for rsample sites
        if not (self._loo_baseline and self.num_particles == 1):
            # score-function sites: VIMCO's learning signal, less the wbar_k that the pathwise
            # gradient of the bound would have given them (their parents attached)
            learning_signal = self._learning_signal(bound_detached, log_w_detached)
            terms = terms + (learning_signal - weights) * dw.log_q_score
        surrogate = -lw.scale * terms.sum()
        return self._finish_terms(lw.scale, bound_detached, log_w_detached, surrogate)

    @property
    def _loo_baseline(self) -> bool:
        return self.baseline == "leave-one-out"

    def _learning_signal(self, bound_detached, log_w_detached):
        """Per-particle learning signal of the score-function term, ``(K, *batch)``."""
        if self._loo_baseline:
            return bound_detached.unsqueeze(0) - leave_one_out_bounds(log_w_detached)
        return bound_detached.unsqueeze(0).expand_as(log_w_detached)

    def _finish_terms(self, scale, bound_detached, log_w_detached, surrogate):
        bound = scale * bound_detached.sum()
        if is_validation_enabled():
            warn_if_nan(surrogate, "VIMCO surrogate loss")
        stats = StepStats(
            -bound,
            wake_theta=-bound,
            wake_phi=-bound,
            bound=bound,
            ess=effective_sample_size(log_w_detached),
            num_particles=self.num_particles,
        )
        return -bound, surrogate, stats
