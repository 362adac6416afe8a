# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
The sleep phase: fantasies from the model, the guide scored on them.

The model runs unconditioned with the caller's arguments, so each sleep particle makes one
fantasy :math:`(x_s, z_s) \sim p_\theta(x, z)` per datapoint of the batch; the guide is called
with the fantasy observations in place of the data (:mod:`pyro_rws._fantasy`) and replayed on
the fantasy latents. The sleep-phi loss

.. math:: \mathcal{L}_\phi^{\text{sleep}} = -\frac{1}{S} \sum_{s=1}^S \log q_\phi(z_s | x_s)

is linear in the log-densities, so every scale (subsampling included) acts inside it.

Several sleep particles run in one vectorized model run; the guide then receives fantasies
with a leading particle dimension. A guide that cannot broadcast over it (it reads plate sizes
from its data, ``len(x)``) is detected on the first step and run once per particle instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro.poutine as poutine
import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_factor, site_is_subsample
from pyro.util import get_rng_state, set_rng_state, warn_if_nan

from ._fantasy import FantasyArgs, accepts_observations, guide_inputs
from ._structure import check_model_guide_match, is_latent
from ._traces import SampleTrace, in_particle_plate, subsample_sites
from ._weights import recording, site_log_prob


class Uncondition(poutine.uncondition_messenger.UnconditionMessenger):
    """
    ``poutine.uncondition`` except at ``pyro.deterministic`` sites, which keep their value (a
    Delta resampled inside plates would take the plate shape on top of its event shape), and at
    the index draws of plates given ``subsample=`` indices, which select data rather than
    being part of the model (resampled, a permutation would become another permutation).
    """

    def _pyro_sample(self, msg) -> None:
        if not (msg["infer"] or {}).get("_deterministic") and not site_is_subsample(msg):
            super()._pyro_sample(msg)


def reject_factors(model_trace: Trace, who: str, remedy: str) -> None:
    """Ancestral sampling ignores ``pyro.factor``: raise if an unconditioned run met one."""
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and site_is_factor(site):
            raise ValueError(
                f"the model contains pyro.factor site '{name}'. {who} draws samples from the "
                f"model by ancestral sampling, which ignores factors. {remedy}"
            )


def _check_sleep_model(model_trace: Trace) -> None:
    reject_factors(
        model_trace,
        "The sleep phase",
        "It would train the guide on the wrong distribution: use the wake phase only "
        "(insomnia=1.0 for ReweightedWakeSleep, phase_q='wake' for WakeSleepELBO), or write the "
        "factor as an observed sample site.",
    )


@dataclass
class SleepState:
    """What the sleep phase learns about a guide on its first step, kept by the loss."""

    takes_observations: dict = field(default_factory=dict)
    per_particle_guides: set = field(default_factory=set)
    probed: bool = False


def _guide_key(guide: Callable) -> tuple:
    # bound methods are new objects at each attribute access: key on function and owner
    return id(getattr(guide, "__func__", guide)), id(getattr(guide, "__self__", None))


class _NotBroadcasting(Exception):
    """The guide failed on fantasies with a leading particle dimension."""


def _run(model, guide, args, kwargs, *, num_particles, vectorize, plate_nesting, route, minibatch):
    if vectorize:
        model = in_particle_plate(model, num_particles, plate_nesting)
        guide = in_particle_plate(guide, num_particles, plate_nesting)
    squeeze = not vectorize or num_particles == 1
    runs = []
    for _ in range(1 if vectorize else num_particles):
        # one handler per run: poutine.uncondition and the minibatch's replay folded into the
        # trace (for the guide: the replay of the fantasies, and its enumeration flags checked)
        with torch.no_grad():
            model_trace = SampleTrace(uncondition=True, replay=minibatch)(model).get_trace(
                *args, **kwargs
            )
        _check_sleep_model(model_trace)
        try:
            guide_args, guide_kwargs = route(model_trace, args, kwargs, squeeze)
            guide_run = SampleTrace(replayed="guide", replay=model_trace, check_guide=True)
            guide_trace = guide_run(guide).get_trace(*guide_args, **guide_kwargs)
            check_model_guide_match(model_trace, guide_trace, "sleep", plate_nesting)
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            if vectorize and num_particles > 1:
                raise _NotBroadcasting() from e
            raise
        if minibatch is None:
            minibatch = subsample_sites(model_trace)
        runs.append((model_trace, guide_trace))
    return runs


def sleep_traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    num_particles: int,
    vectorize: bool,
    plate_nesting: int,
    fantasy_args: FantasyArgs,
    state: SleepState,
    minibatch: Trace | None = None,
    probe: Callable | None = None,
) -> list[tuple[Trace, Trace]]:
    """
    Draw fantasies ``(x, z) ~ p(x, z)`` and replay the guide on them, with the fantasy
    observations as its inputs. The model runs under ``torch.no_grad()``: fantasies are data
    for the guide and model parameters receive no sleep gradient. ``minibatch`` (subsample
    sites of the wake phase) is replayed so both phases see the same minibatch. ``probe`` may
    rewrite the guide's inputs.
    """
    key = _guide_key(guide)
    if key not in state.takes_observations:
        state.takes_observations[key] = accepts_observations(guide)
    takes_observations = state.takes_observations[key]

    def route(model_trace, a, kw, squeeze):
        inputs = guide_inputs(takes_observations, fantasy_args, model_trace, a, kw, squeeze)
        return inputs if probe is None else probe(inputs, a, kw)

    run = dict(plate_nesting=plate_nesting, route=route, minibatch=minibatch)
    if not vectorize or num_particles == 1 or key in state.per_particle_guides:
        return _run(model, guide, args, kwargs, num_particles=num_particles, vectorize=False, **run)
    rng = get_rng_state()
    try:
        return _run(model, guide, args, kwargs, num_particles=num_particles, vectorize=True, **run)
    except _NotBroadcasting:
        # The guide does not broadcast over a leading particle dimension of its inputs (e.g.
        # it reads plate sizes as len(x)): run it once per particle from now on, on the same
        # random draws, so that loss and loss_and_grads agree for the same seed whichever
        # call found this out.
        set_rng_state(rng)
        state.per_particle_guides.add(key)
        return _run(model, guide, args, kwargs, num_particles=num_particles, vectorize=False, **run)


def sleep_log_q(runs: list[tuple[Trace, Trace]], num_particles: int) -> torch.Tensor:
    """
    ``(1/S) sum_s sum_sites log q(z_s | x_s)`` over sleep runs, all scales (including the
    subsample scale) applied: the sleep-phi objective is linear, so no weights are needed.
    """
    terms = [
        site_log_prob(site).sum()
        for _, guide_trace in runs
        for site in guide_trace.nodes.values()
        if is_latent(site)
    ]
    if not terms:  # a model without latent variables: nothing for the guide to learn
        return torch.zeros((), dtype=torch.get_default_dtype(), device=_device(runs))
    return sum(terms[1:], terms[0]) / num_particles


def _device(runs) -> torch.device:
    for model_trace, _ in runs:
        for site in model_trace.nodes.values():
            if torch.is_tensor(site.get("value")):
                return site["value"].device
    return torch.device("cpu")


def sleep_phi(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, **options
) -> torch.Tensor:
    """
    The sleep-phi loss ``-(1/S) sum_s log q(z_s | x_s)`` on fantasies (with graph); ``options``
    are those of :func:`sleep_traces`. On the first step with gradients, the fantasies handed to
    the guide are watched: a guide that reads at most their shapes is not amortized, cannot
    learn from the sleep phase, and gets a warning.
    """
    state, num_particles = options["state"], options["num_particles"]
    watch = not state.probed and torch.is_grad_enabled() and not recording()
    probe = _Probe() if watch else None
    runs = sleep_traces(model, guide, args, kwargs, probe=probe, **options)
    loss = -sleep_log_q(runs, num_particles)
    if probe is not None:
        state.probed = True
        if probe.watched and not _Watched.read and loss.requires_grad:
            warnings.warn(
                "the guide does not read the values of the fantasy observations it is called "
                "with in the sleep phase (at most their shapes), so the sleep phase fits it to "
                "the prior p(z), not to the posterior of your data. A non-amortized guide "
                "(parameters per datapoint, not computed from x) cannot be trained by the "
                "sleep phase: use the wake phase (ReweightedWakeSleep with insomnia=1.0, or "
                "WakeSleepELBO(phase_q='wake')), or compute the guide's parameters from x.",
                UserWarning,
                stacklevel=5,
            )
        _Watched.read = False
    if is_validation_enabled():
        warn_if_nan(loss, "sleep-phi loss")
    return loss


_METADATA = {"__len__", "size", "dim", "ndimension", "numel", "nelement", "is_floating_point"}
_METADATA_PROPERTIES = {"shape", "ndim", "device", "dtype", "is_cuda", "layout", "requires_grad"}


class _Watched(torch.Tensor):
    """A fantasy that records whether anything but its metadata (shape, dtype) was read."""

    read = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        prop = getattr(getattr(func, "__self__", None), "__name__", None)
        if name not in _METADATA and not (name == "__get__" and prop in _METADATA_PROPERTIES):
            _Watched.read = True
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class _Probe:
    """Hands the guide its fantasy inputs as :class:`_Watched` tensors (first step only)."""

    def __init__(self):
        self.watched = False
        _Watched.read = False

    def _watch(self, value, originals):
        if torch.is_tensor(value) and all(value is not o for o in originals):
            self.watched = True
            return value.as_subclass(_Watched)
        return value

    def __call__(self, inputs, caller_args, caller_kwargs):
        guide_args, guide_kwargs = inputs
        originals = list(caller_args) + list(caller_kwargs.values())
        guide_args = tuple(self._watch(a, originals) for a in guide_args)
        guide_kwargs = {k: self._watch(v, originals) for k, v in guide_kwargs.items()}
        observations = guide_kwargs.get("observations")
        if isinstance(observations, dict):
            guide_kwargs["observations"] = {k: self._watch(v, ()) for k, v in observations.items()}
        return guide_args, guide_kwargs
