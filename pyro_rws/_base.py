# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The two base classes of the losses.

:class:`Loss` turns one method, ``_terms``, into Pyro's three (``loss``, ``loss_and_grads``,
``differentiable_loss``) and into a :class:`torch.nn.Module` (``__call__``), so the three agree
for the same random seed. :class:`WakeSleepLoss` adds what the wake-sleep estimators share:
particles, plate nesting, the wake and sleep phases, the fantasy arguments and the watch on the
effective sample size.
"""

from __future__ import annotations

import math
import re
import textwrap
import warnings
from abc import abstractmethod
from collections.abc import Callable

import torch
from pyro.infer import ELBO
from pyro.infer.elbo import ELBOModule

from ._args import check_count
from ._dreg import dreg_log_weights
from ._fantasy import FantasyArgs, check_fantasy_args
from ._sleep import SleepState, sleep_phi
from ._structure import check_guide
from ._traces import guess_plate_nesting, wake_traces
from .diagnostics import ESSMonitor, StepStats

#: Parameters and behaviour the public losses share, written once and put into each class's
#: docstring by :func:`shared_docs` (so that ``help(RWS)`` and the API docs show them).
SHARED_DOCS = {
    "vectorize_particles": (
        ":param bool vectorize_particles: draw all particles in one run of guide and model "
        "inside a particle plate at dim ``-(max_plate_nesting + 1)`` (default True: fast, and "
        "needs static structure and a program that broadcasts over that dim). If False, one "
        "run per particle, which allows stochastic control flow and structure that differs "
        "between particles."
    ),
    "max_plate_nesting": (
        ":param int max_plate_nesting: the number of nested :func:`pyro.plate` dims in model "
        "and guide, not counting the particle plate. Guessed from one run of the model (with "
        "the caller's arguments, its random draws undone) if omitted; the guide is never run "
        "for the guess, and a guide with more nested plates than its model gets an error that "
        "asks for this argument."
    ),
    "fantasy_args": (
        ":param fantasy_args: where the sleep phase puts each fantasy observation in the "
        "guide's arguments, when the model's ``obs=`` tensor is not itself an argument (by "
        "default a fantasy replaces the argument whose tensor the model observed, and a guide "
        "with an ``observations`` keyword, Pyro's CSIS convention, receives ``{site: "
        "fantasy}``): a dict ``{observed site: argument position (int) | keyword (str) | "
        "None}``, where a minibatch ``x[idx]`` of a subsampled plate is scattered into a copy "
        "of the full argument at ``idx``, or a callable ``(fantasies, *args, **kwargs) -> "
        "(args, kwargs)``."
    ),
    "num_sleep_particles": (
        ":param int num_sleep_particles: S, fantasies per datapoint of the batch in the sleep "
        "phase. Default 1: each sleep particle already makes one fantasy for every datapoint "
        "(Pyro's ``ReweightedWakeSleep`` defaults to S = K; pass ``num_sleep_particles=K`` "
        "for the same). With S > 1 the fantasies carry a leading particle dim; a guide that "
        "cannot broadcast over it (it reads ``len(x)``) is found on the first step and run "
        "once per particle."
    ),
    "retain_graph": ":param bool retain_graph: passed to ``backward`` in ``loss_and_grads``.",
    "methods": (
        "Like every Pyro loss it has :meth:`loss` (a float, no gradients), "
        ":meth:`loss_and_grads` (a float, gradients accumulated by one backward pass, what "
        ":class:`~pyro.infer.SVI` calls) and :meth:`differentiable_loss` (a tensor whose "
        "``backward()`` gives the same gradients, for plain PyTorch optimizers); called as "
        "``loss(model, guide)`` it is a :class:`torch.nn.Module` whose ``parameters()`` are "
        "those of model and guide. All three draw the same particles for the same seed. "
        "After each call :attr:`stats` holds the step's terms, bound and per-datapoint "
        "effective sample size (:class:`~pyro_rws.diagnostics.StepStats`)."
    ),
}


def shared_docs(cls):
    """Replace each ``<<name>>`` line of ``cls.__doc__`` by ``SHARED_DOCS[name]``, indented."""

    def fill(match):
        indent, name = match.group(1), match.group(2)
        return textwrap.fill(
            SHARED_DOCS[name],
            width=96,
            initial_indent=indent,
            subsequent_indent=indent + ("    " if name != "methods" else ""),
            break_on_hyphens=False,
        )

    cls.__doc__ = re.sub(r"^( *)<<(\w+)>>$", fill, cls.__doc__, flags=re.M)
    return cls


_NON_FINITE = (
    "the loss is NaN: a log_prob returned NaN (check the distribution parameters computed there, "
    "e.g. a network output).",
    "the loss is inf: for some datapoint the particles have zero importance weight: the guide "
    "proposes values the model gives probability zero. Make the guide's support match the "
    "model's, or increase num_particles.",
    "the loss is -inf: an importance weight is +inf: the guide gives probability zero (or the "
    "model infinite density) to a sampled value. Check the guide's support against the model's.",
)
_DETAILS = " Enable validation (pyro.enable_validation(True)) for an error that names the site."


class Loss(ELBO):
    """
    A loss computed by one method, ``_terms(model, guide, args, kwargs)``, which returns the
    detached *value*, a *surrogate* whose gradient is the estimator, and the step's statistics
    (kept in :attr:`stats`). Not used directly.
    """

    def __init__(self, *, retain_graph: bool | None = None, **elbo_kwargs):
        super().__init__(retain_graph=retain_graph, **elbo_kwargs)
        self.stats = None

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
            :attr:`stats` is updated (with no device synchronization).
        :rtype: torch.Tensor
        """
        value, surrogate, stats = self._terms(model, guide, args, kwargs)
        self.stats = stats
        if not torch.is_tensor(surrogate):
            return value
        return value + (surrogate - surrogate.detach())

    @abstractmethod
    def _terms(self, model, guide, args, kwargs) -> tuple[torch.Tensor, torch.Tensor, object]:
        """Returns ``(value, surrogate, stats)``: detached value, differentiable surrogate."""
        raise NotImplementedError

    def _finish(self, value: torch.Tensor, stats) -> float:
        """Store the stats and return the value as a float."""
        self.stats = stats
        return float(value)

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("pyro_rws losses build their traces in _terms")


class WakeSleepLoss(Loss):
    """
    What the wake-sleep losses share (not used directly). The parameters below are documented
    on each public class.

    :param int num_particles: particles K (for :class:`~pyro_rws.SleepPhaseLoss`, fantasies S).
    :param int max_plate_nesting: nested plates, not counting the particle plate; guessed from
        one run of the model if omitted.
    :param bool vectorize_particles: one vectorized run for all particles, or one per particle.
    :param fantasy_args: where the sleep phase puts fantasies in the guide's arguments.
    :param int num_sleep_particles: fantasies per datapoint in the sleep phase, if any.
    :param bool retain_graph: passed to ``backward`` in ``loss_and_grads``.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: int | float = math.inf,
        vectorize_particles: bool = True,
        retain_graph: bool | None = None,
        *,
        fantasy_args: FantasyArgs = None,
        num_sleep_particles: int | None = None,
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
        self.num_sleep_particles = check_count(
            "num_sleep_particles", 1 if num_sleep_particles is None else num_sleep_particles, 1
        )
        check_fantasy_args(fantasy_args)
        self.fantasy_args = fantasy_args
        self.stats: StepStats | None = None
        self._ess_monitor = ESSMonitor()
        self._sleep_state = SleepState()
        self._checked_guides: set = set()

    # ----------------------------------------------------------------------------------------
    #: whether the loss scores the guide on fantasies (set by each estimator)
    uses_sleep_phase: bool = False
    #: what a NaN, +inf or -inf value means (checked as the value is returned, validation off)
    _non_finite = _NON_FINITE

    def _plate_nesting(self, model, guide, args, kwargs) -> int:
        """``max_plate_nesting`` (guessed on the first call), after checking the guide once."""
        key = (id(getattr(guide, "__func__", guide)), id(getattr(guide, "__self__", None)))
        if key not in self._checked_guides:
            message = check_guide(guide, self.uses_sleep_phase)
            self._checked_guides.add(key)
            if message is not None:
                warnings.warn(message, UserWarning, stacklevel=4)
        if self.max_plate_nesting == math.inf:
            self.max_plate_nesting = guess_plate_nesting(model, args, kwargs)
        return self.max_plate_nesting

    def _wake(self, model, guide, args, kwargs, plate_nesting, detach=True):
        """K particles from the guide, the model replayed on them: ``(runs, minibatch)``."""
        return wake_traces(
            model,
            guide,
            args,
            kwargs,
            num_particles=self.num_particles,
            vectorize=self.vectorize_particles,
            plate_nesting=plate_nesting,
            detach=detach,
            need_minibatch=self.uses_sleep_phase,
        )

    def _dreg_weights(self, model, guide, args, kwargs, runs, plate_nesting):
        """Log-weights and DReG path terms of attached wake runs (see :mod:`pyro_rws._dreg`)."""
        return dreg_log_weights(
            model,
            guide,
            args,
            kwargs,
            runs,
            num_particles=self.num_particles,
            vectorize=self.vectorize_particles,
            plate_nesting=plate_nesting,
        )

    def _sleep_phi(self, model, guide, args, kwargs, plate_nesting, minibatch, num_particles):
        """The sleep-phi loss on ``num_particles`` fantasies per datapoint (with graph)."""
        return sleep_phi(
            model,
            guide,
            args,
            kwargs,
            num_particles=num_particles,
            vectorize=self.vectorize_particles,
            plate_nesting=plate_nesting,
            fantasy_args=self.fantasy_args,
            state=self._sleep_state,
            minibatch=minibatch,
        )

    def _finish(self, value: torch.Tensor, stats: StepStats) -> float:
        """
        Store the stats, watch the effective sample size, return the value as a float (the one
        device synchronization of a step; with validation off, the finiteness of the bound is
        checked here rather than on the tensor, which would need one more).
        """
        self.stats = stats
        if stats.ess is None or stats.num_particles is None or stats.num_particles < 2:
            loss = float(value)
        else:
            loss, ess_mean = torch.stack([value.to(stats.ess.dtype), stats.ess.mean()]).tolist()
            self._ess_monitor.update(ess_mean, stats.num_particles)
        if stats.bound is not None and not math.isfinite(loss):
            kind = 0 if math.isnan(loss) else 1 if loss > 0 else 2
            raise ValueError(self._non_finite[kind] + _DETAILS)
        return loss
