# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The shared skeleton of every loss: argument checks, plate nesting, the three public methods.

A subclass implements one method, :meth:`WakeSleepLoss._terms`, returning the loss *value*, a
*surrogate* whose gradient is the estimator, and the :class:`~pyro_rws.diagnostics.StepStats`
of the step. ``loss``, ``loss_and_grads`` and ``differentiable_loss`` all go through it, so the
three agree for the same random seed.
"""

from __future__ import annotations

import math
import numbers
from abc import abstractmethod
from collections.abc import Callable

import torch
from pyro.infer import ELBO
from pyro.infer.elbo import ELBOModule
from pyro.infer.util import is_validation_enabled
from pyro.util import warn_if_nan

from ._sleep import guide_inputs, sleep_log_q
from ._traces import guess_plate_nesting, sleep_traces, wake_traces
from .diagnostics import ESSMonitor, StepStats


def check_count(name: str, value, minimum: int, why: str = "") -> int:
    """``value`` as an int, or a ValueError/TypeError that says what was expected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}{why}, got {value}")
    return int(value)


def check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


class WakeSleepLoss(ELBO):
    """
    Base class of the pyro_rws losses (not used directly).

    :param int num_particles: number of particles K drawn from the guide per datapoint.
    :param int max_plate_nesting: bound on nested :func:`pyro.plate` contexts in model and guide,
        *not* counting the particle plate. Guessed by running model and guide once if omitted
        (assumes static structure; the guess does not consume random numbers).
    :param bool vectorize_particles: draw all particles in one run inside a particle plate (fast;
        needs static structure). If False, one run per particle, which allows structure that
        differs between particles (stochastic control flow).
    :param bool retain_graph: passed to ``backward`` in :meth:`loss_and_grads`.

    After each call, :attr:`stats` holds the :class:`~pyro_rws.diagnostics.StepStats` of it.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: int | float = math.inf,
        vectorize_particles: bool = True,
        retain_graph: bool | None = None,
        *,
        min_particles: int = 1,
        why_min: str = "",
    ):
        num_particles = check_count("num_particles", num_particles, min_particles, why_min)
        if max_plate_nesting != math.inf:
            max_plate_nesting = check_count("max_plate_nesting", max_plate_nesting, 0)
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=bool(vectorize_particles),
            retain_graph=retain_graph,
        )
        # Pyro's ELBO adds one for the particle plate; here it counts the user's plates only.
        self.max_plate_nesting = max_plate_nesting
        self.stats: StepStats | None = None
        self._ess_monitor = ESSMonitor()

    # ----------------------------------------------------------------------------------------
    # public interface
    # ----------------------------------------------------------------------------------------
    def __call__(self, model: Callable, guide: Callable) -> ELBOModule:
        """
        A :class:`torch.nn.Module` whose ``forward(*args, **kwargs)`` is
        ``differentiable_loss(model, guide, *args, **kwargs)``, for plain PyTorch optimizers,
        PyTorch Lightning and DistributedDataParallel. Model and guide may be modules or
        methods of modules (e.g. ``sbn.model``); either way their module's parameters are
        registered, so ``module.parameters()`` holds them.
        """
        module = ELBOModule(model, guide, self)
        owners = []
        for fn in (model, guide):
            owner = getattr(fn, "__self__", None)
            if isinstance(owner, torch.nn.Module) and not isinstance(fn, torch.nn.Module):
                if all(owner is not o for o in owners):
                    owners.append(owner)
        if owners:
            module.owners = torch.nn.ModuleList(owners)
        return module

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """
        :returns: the loss value for one fresh draw of particles (no gradients, no graph kept).
        :rtype: float
        """
        with torch.no_grad():
            value, _, stats = self._terms(model, guide, args, kwargs)
        return self._finish(value, stats)

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """
        Computes the loss and accumulates the estimator's gradients into the ``.grad`` of model
        and guide parameters, with one backward pass.

        :returns: the loss value (the same number :meth:`loss` gives for the same seed).
        :rtype: float
        """
        value, surrogate, stats = self._terms(model, guide, args, kwargs)
        if torch.is_tensor(surrogate) and surrogate.requires_grad:
            surrogate.backward(retain_graph=self.retain_graph)
        return self._finish(value, stats)

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs):
        """
        :returns: a scalar tensor whose value is the loss and whose gradient, by one
            ``backward()``, is the estimator: for use with plain PyTorch optimizers, the module
            returned by ``loss(model, guide)``, PyTorch Lightning or DistributedDataParallel.
            :attr:`stats` is updated; the low effective-sample-size warning is checked only by
            :meth:`loss` and :meth:`loss_and_grads` (it needs a device synchronization).
        :rtype: torch.Tensor
        """
        value, surrogate, stats = self._terms(model, guide, args, kwargs)
        self.stats = stats
        if not torch.is_tensor(surrogate):
            return value
        return value + (surrogate - surrogate.detach())

    # ----------------------------------------------------------------------------------------
    # for subclasses
    # ----------------------------------------------------------------------------------------
    @abstractmethod
    def _terms(self, model, guide, args, kwargs) -> tuple[torch.Tensor, torch.Tensor, StepStats]:
        """Returns ``(value, surrogate, stats)``: detached value, differentiable surrogate."""
        raise NotImplementedError

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("pyro_rws losses build their traces in _terms")

    def _wake_traces(self, model, guide, args, kwargs, plate_nesting, detach=True):
        """K particles from the guide, the model replayed on them (see ``wake_traces``)."""
        return wake_traces(
            model,
            guide,
            args,
            kwargs,
            num_particles=self.num_particles,
            vectorize=self.vectorize_particles,
            plate_nesting=plate_nesting,
            detach=detach,
        )

    def _plate_nesting(self, model, guide, args, kwargs) -> int:
        if self.max_plate_nesting == math.inf:
            self.max_plate_nesting = guess_plate_nesting(model, guide, args, kwargs)
        return self.max_plate_nesting

    def _sleep_phi(self, model, guide, args, kwargs, *, num_particles, plate_nesting, minibatch):
        """The sleep-phi loss ``-(1/S) sum_s log q(z_s | x_s)`` on fantasies (with graph)."""
        fantasy_args = self.fantasy_args

        def inputs(model_trace, a, kw, squeeze):
            return guide_inputs(guide, fantasy_args, model_trace, a, kw, squeeze)

        try:
            runs = sleep_traces(
                model,
                guide,
                args,
                kwargs,
                num_particles=num_particles,
                vectorize=self.vectorize_particles,
                plate_nesting=plate_nesting,
                guide_inputs=inputs,
                minibatch=minibatch,
            )
        except (RuntimeError, ValueError, IndexError) as e:
            if self.vectorize_particles and num_particles > 1:
                e.add_note(
                    f"pyro_rws: with vectorize_particles=True and {num_particles} sleep "
                    "particles, the guide receives fantasy observations with an extra leading "
                    "particle dimension. If the guide reads plate sizes from its data (len(x)), "
                    "read them from the right (x.shape[-2]), or use one sleep particle, or "
                    "vectorize_particles=False."
                )
            raise
        loss = -sleep_log_q(runs, num_particles)
        if is_validation_enabled():
            warn_if_nan(loss, "sleep-phi loss")
        return loss

    def _finish(self, value: torch.Tensor, stats: StepStats) -> float:
        """Store the stats, watch the effective sample size, return the value as a float."""
        self.stats = stats
        if stats.ess is None or stats.num_particles is None or stats.num_particles < 2:
            return float(value)
        loss, ess_mean = torch.stack([value.to(stats.ess.dtype), stats.ess.mean()]).tolist()
        self._ess_monitor.update(ess_mean, stats.num_particles)
        return loss
