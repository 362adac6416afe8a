# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Compiled versions of the wake-sleep losses, after Pyro's ``JitTrace_ELBO``.

``JitReweightedWakeSleep`` (``JitRWS``), ``JitWakeSleepELBO``, ``JitSleepPhaseLoss`` and
``JitVIMCO`` compute exactly what their eager classes compute, but run model, guide and the
estimator through Pyro's handlers only once per *graph key*: the first call records the whole
step (guide run, model replay, sleep phase, log-weights, value, surrogate and statistics) as a
graph of ATen operations (``make_fx`` with ``pre_dispatch=True``, which keeps the ``no_grad``
regions of the sleep phase), and later calls replay that graph, with fresh random draws from the
same generator (so the same draws as the eager loss for the same seed) and none of the Python
machinery of Pyro in between. Before its first replay the graph is rewritten once (no-op views
and multiplications dropped, negations moved after sums, autograd recording only where a
gradient is used; :mod:`pyro_rws._fx`), giving the same numbers bit for bit with a third fewer
operations, and replayed as straight-line Python code that calls each operation's C++ entry
(:mod:`pyro_rws._codegen`; checked on the first replay to dispatch what the graph does).
``jit_options={"backend": "inductor"}`` compiles the recorded
graph with :func:`torch.compile` instead: much faster steps, at a compilation of tens of seconds
per graph (see benchmarks/README.md for both).

Parameters reach the graph as inputs, never as constants: parameters of the param store
(``pyro.param``, ``pyro.module``) are looked up by name on every call (so that ``SVI`` sees and
updates them), and every other tensor that requires grad and that model or guide read from
outside (``nn.Parameter`` of a module whose methods are model and guide, without ``pyro.module``)
is found during a first, eager run and passed by reference. Both ways of training work::

    svi = SVI(model, guide, Adam({"lr": 1e-3}), loss=JitRWS(num_particles=10))

    loss_fn = JitRWS(num_particles=10)(sbn.model, sbn.guide)  # a torch module
    optim = torch.optim.Adam(loss_fn.parameters(), lr=1e-3)
    loss_fn(x).backward()

A new graph is recorded for each distinct (model, guide, tree structure of the arguments,
shape/dtype/device/requires_grad of every tensor argument, value of every non-tensor argument,
Pyro handlers active around the call other than SVI's parameter capture, loss settings such as
``num_particles``); a changed batch size or keyword therefore records a new graph and never
reuses a stale one. What the key cannot see is the programs' own Python state: models and
guides must have static structure (control flow that reads a tensor's value raises
:class:`NotImplementedError` while recording; Python-level randomness is frozen) and take every
tensor that changes between steps as an argument or parameter (other tensors are constants of
the graph).
"""

from __future__ import annotations

from ._jit import _JitMixin
from .rws import ReweightedWakeSleep
from .sleep_phase import SleepPhaseLoss
from .vimco import VIMCO
from .wake_sleep import WakeSleepELBO

__all__ = [
    "JitRWS",
    "JitReweightedWakeSleep",
    "JitSleepPhaseLoss",
    "JitVIMCO",
    "JitWakeSleepELBO",
]


class JitReweightedWakeSleep(_JitMixin, ReweightedWakeSleep):
    """
    Compiled :class:`~pyro_rws.ReweightedWakeSleep`: the same estimator, value and
    ``stats`` (with the default backend, the same numbers for the same random seed), with
    the step recorded once per
    graph key and replayed (see :mod:`pyro_rws.jit`).

    Takes the arguments of :class:`~pyro_rws.ReweightedWakeSleep`, plus

    :param bool ignore_jit_warnings: silence warnings raised while the step is recorded.
    :param dict jit_options: ``{"backend": None}`` (default): replay the recorded graph op by
        op; ``{"backend": "inductor"}``: :func:`torch.compile` it (tens of seconds per graph,
        then the fastest step; needs a C++ compiler on CPU); other keys go to
        :func:`torch.compile`.

    Limits (as Pyro's ``JitTrace_ELBO``): static model and guide structure (a tensor's value
    read by Python control flow raises :class:`NotImplementedError` while recording);
    tensors that change between steps must be arguments or parameters (anything else is a
    constant of the graph); ``vectorize_particles=True`` only. A different batch size,
    non-tensor argument, model, guide, outer Pyro handler or setting records a new graph (up
    to ``max_graphs`` are kept). The first call per graph runs the step eagerly once
    (which creates parameters and runs the eager checks), records it, and replays it. NaN and
    infinite values are reported with the eager message: with validation on, by every
    method (the same draws replayed eagerly name the site; the check needs a device
    synchronization); with validation off, by ``loss`` and ``loss_and_grads`` from the float
    they return, as the eager loss does, and not by ``differentiable_loss``.
    """


class JitWakeSleepELBO(_JitMixin, WakeSleepELBO):
    """
    Compiled :class:`~pyro_rws.WakeSleepELBO`; arguments and limits as
    :class:`JitReweightedWakeSleep`.
    """


class JitSleepPhaseLoss(_JitMixin, SleepPhaseLoss):
    """
    Compiled :class:`~pyro_rws.SleepPhaseLoss`; arguments and limits as
    :class:`JitReweightedWakeSleep`.
    """


class JitVIMCO(_JitMixin, VIMCO):
    """
    Compiled :class:`~pyro_rws.VIMCO`; arguments and limits as :class:`JitReweightedWakeSleep`.
    """


#: Short name for :class:`JitReweightedWakeSleep`.
JitRWS = JitReweightedWakeSleep
