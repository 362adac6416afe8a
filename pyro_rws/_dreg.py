# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
The pieces of doubly reparameterized gradient (DReG) estimators [1], shared by
:class:`~pyro_rws.ReweightedWakeSleep` and :class:`~pyro_rws.VIMCO` (``dreg=True``).

For reparameterized guide sites :math:`z_k = g(\epsilon_k, \phi)` the estimators need the
*path* derivative of the log-weight,

.. math:: \frac{\partial \log w_k}{\partial z_k} \frac{\partial z_k}{\partial \phi}, \qquad
    \log w_k = \log p_\theta(x, z_k) - \log q_{\mathrm{sg}(\phi)}(z_k | x),

with the guide's parameters stopped but :math:`z_k` still a function of :math:`\phi`, and no
gradient into the model's parameters :math:`\theta`. Stopping :math:`\phi` must not stop the
dependence of a guide site's distribution on *earlier* reparameterized sites (a hierarchical
guide), and :math:`\theta` may live anywhere (``pyro.param``, modules), so neither can be done by
detaching distribution parameters. Instead, from the ordinary (attached) wake run and a replay of
guide and model on its detached values, this module forms the zero-valued tensor

.. math::

    \Delta_k = \big[\log p_\theta(x, z_k) - \log p_\theta(x, \mathrm{sg}\, z_k)\big]
        - \big[\log q_\phi(z_k | x) - \log q_\phi(\mathrm{sg}\, z_k | x)\big],

whose gradient is exactly the path derivative above: the direct dependence on :math:`\phi`
(score) and on :math:`\theta` cancels between the attached and the detached evaluations, which
hold the same numbers. The replay costs one more guide run and one more model run per step.
It assumes that model and guide are deterministic given their sample sites (no dropout or other
randomness outside ``pyro.sample`` in training mode); with validation enabled, a replay that does
not reproduce the log-densities raises a :class:`UserWarning`.

References

[1] `Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives`, George Tucker,
    Dieterich Lawson, Shixiang Gu, Chris J. Maddison (ICLR 2019), arXiv:1810.04152
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass

import pyro.poutine as poutine
import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace

from ._structure import is_latent
from ._traces import in_particle_plate, replay_model
from ._weights import LogWeights, log_weights


def check_dreg(value) -> bool:
    """``dreg`` must be a bool: 0, 1, None or strings are rejected with a :class:`TypeError`."""
    if not isinstance(value, bool):
        raise TypeError(f"dreg must be True or False, got {value!r}")
    return value


def reparameterized_sites(runs: list[tuple[Trace, Trace]]) -> tuple[bool, bool]:
    """``(any, all)``: whether any / every latent guide site has ``rsample``."""
    flags = [
        bool(site["fn"].has_rsample)
        for _, guide_trace in runs
        for site in guide_trace.nodes.values()
        if is_latent(site)
    ]
    return any(flags), all(flags)


class DRegWarningOnce:
    """
    The warning that ``dreg=True`` changes nothing: once per loss object, on its first call.
    Issued with a fresh registry, so that Python's once-per-location filter does not hide it
    for a second loss object called from the same line.
    """

    def __init__(self):
        self.checked = False

    def check(self, any_reparameterized: bool, loss_name: str) -> None:
        if self.checked:
            return
        self.checked = True
        if any_reparameterized:
            return
        # the caller of loss / loss_and_grads / differentiable_loss (check <- _terms <- method)
        frame = sys._getframe(3)
        warnings.warn_explicit(
            f"{loss_name}(dreg=True): no guide site is reparameterized (none has rsample), so "
            "dreg has no effect and the standard estimator is used. DReG applies to continuous "
            "guide sites such as Normal; pass dreg=False to silence this.",
            UserWarning,
            frame.f_code.co_filename,
            frame.f_lineno,
            module=frame.f_globals.get("__name__"),
            registry=None,
            module_globals=frame.f_globals,
        )


def _detached_copy(trace: Trace) -> Trace:
    fixed = Trace()
    for name, site in trace.nodes.items():
        site = dict(site)
        if site["type"] == "sample" and torch.is_tensor(site["value"]):
            site["value"] = site["value"].detach()
        fixed.add_node(name, **site)
    return fixed


def _replay_detached(model, guide, args, kwargs, runs, *, num_particles, vectorize, plate_nesting):
    """Each run's guide replayed on its detached sample values, the model replayed on those."""
    if vectorize:
        guide = in_particle_plate(guide, num_particles, plate_nesting)
        model = in_particle_plate(model, num_particles, plate_nesting)
    replays = []
    for _, guide_trace in runs:
        fixed = _detached_copy(guide_trace)
        guide_replay = poutine.trace(poutine.replay(guide, trace=fixed)).get_trace(*args, **kwargs)
        model_replay = poutine.trace(
            replay_model(model, guide_replay, plate_nesting, vectorize)
        ).get_trace(*args, **kwargs)
        replays.append((model_replay, guide_replay))
    return replays


@dataclass
class DRegWeights:
    """
    :ivar LogWeights detached: log-weights of the replay on detached values: ``log_p`` is
        :math:`\\log p_\\theta(x, \\mathrm{sg}\\,z)` (graph of theta only), ``log_q`` is
        :math:`\\log q_\\phi(\\mathrm{sg}\\,z|x)` (graph of phi only).
    :ivar torch.Tensor path: :math:`\\Delta_k`, zero-valued, whose gradient is the path
        derivative of the log-weight (see the module docstring); zero for particles of weight 0.
    :ivar torch.Tensor log_q_score: log q of the guide sites *without* ``rsample`` from the
        attached run (their parents attached), shape ``(K,) + batch``.
    """

    detached: LogWeights
    path: torch.Tensor
    log_q_score: torch.Tensor


def dreg_log_weights(
    model, guide, args, kwargs, runs, *, num_particles, vectorize, plate_nesting
) -> DRegWeights:
    """
    :param runs: wake runs whose guide sample values are *attached* (``wake_traces(...,
        detach=False)``).
    """
    attached = log_weights(
        runs, plate_nesting=plate_nesting, vectorized=vectorize, score_parts=True
    )
    replays = _replay_detached(
        model,
        guide,
        args,
        kwargs,
        runs,
        num_particles=num_particles,
        vectorize=vectorize,
        plate_nesting=plate_nesting,
    )
    detached = log_weights(replays, plate_nesting=plate_nesting, vectorized=vectorize)
    if is_validation_enabled():
        _check_replay(attached, detached)
    path = (attached.log_p - detached.log_p) - (attached.log_q - detached.log_q)
    # A particle outside the model's support has log p = -inf in both runs: -inf - -inf is NaN.
    finite = (detached.log_p.detach() - detached.log_q.detach()) > -math.inf
    path = torch.where(finite, path, torch.zeros_like(path))
    return DRegWeights(detached, path, attached.log_q_score)


def _check_replay(attached: LogWeights, detached: LogWeights) -> None:
    for what, a, b in (
        ("model", attached.log_p, detached.log_p),
        ("guide", attached.log_q, detached.log_q),
    ):
        a, b = a.detach(), b.detach()
        finite = torch.isfinite(a) & torch.isfinite(b)
        if not bool(torch.isclose(a[finite], b[finite], rtol=1e-4, atol=1e-4).all()):
            warnings.warn(
                f"dreg=True: replaying the {what} on the drawn samples did not reproduce its "
                "log-density, so the doubly reparameterized gradient is wrong. The model and the "
                "guide must be deterministic given their sample sites: switch off dropout and "
                "other randomness outside pyro.sample (e.g. module.eval()), or use dreg=False.",
                UserWarning,
                stacklevel=5,
            )
