# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Running model and guide programs for the wake and sleep phases.

Everything that touches :mod:`pyro.poutine` lives here, written once: running the guide and
replaying the model against it (wake), running the model unconditioned (sleep), drawing
particles in one vectorized run or one run per particle, sharing a minibatch between particles
and phases, and checking that model and guide agree on their latent sites.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_factor, site_is_subsample

from ._enum import enumerate_model, enumerated_site_error

#: Name of the plate that vectorizes particles (the same name Pyro's own ELBOs use).
PARTICLE_PLATE = "num_particles_vectorized"


# --------------------------------------------------------------------------------------------
# Site classification
# --------------------------------------------------------------------------------------------
def is_sample(site: dict) -> bool:
    """A sample site that is not the index draw of a subsampled plate."""
    return site["type"] == "sample" and not site_is_subsample(site)


def is_latent(site: dict) -> bool:
    return is_sample(site) and not site["is_observed"]


def is_deterministic(site: dict) -> bool:
    return bool(site["infer"].get("_deterministic"))


def is_auxiliary(site: dict) -> bool:
    return bool(site["infer"].get("is_auxiliary"))


def plate_frames(site: dict) -> tuple:
    """The site's plate frames, without the particle plate."""
    return tuple(f for f in site["cond_indep_stack"] if f.name != PARTICLE_PLATE)


# --------------------------------------------------------------------------------------------
# Wrapping programs
# --------------------------------------------------------------------------------------------
def in_particle_plate(fn: Callable, size: int, plate_nesting: int) -> Callable:
    """Run ``fn`` inside an outermost plate of ``size`` particles at dim ``-(plate_nesting+1)``."""

    def wrapped(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, size, dim=-(plate_nesting + 1)):
            return fn(*args, **kwargs)

    return wrapped


def subsample_sites(trace: Trace) -> Trace | None:
    """A trace holding only the minibatch index sites of ``trace`` (not the particle plate's)."""
    result = Trace()
    for name, site in trace.nodes.items():
        if site_is_subsample(site) and name != PARTICLE_PLATE:
            result.add_node(name, **site)
    return result if result.nodes else None


def _replaying(fn: Callable, trace: Trace | None) -> Callable:
    return fn if trace is None else poutine.replay(fn, trace=trace)


def _check_guide(guide: Callable) -> None:
    if isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):
        raise NotImplementedError(
            "pyro_rws does not support GuideMessenger guides (such as AutoGuideMessenger): "
            "they cannot be replayed on fantasies or detached. Use an ordinary guide "
            "function, a PyroModule guide, or an AutoGuide such as AutoNormal."
        )


# --------------------------------------------------------------------------------------------
# Wake phase: guide samples, model replayed on them
# --------------------------------------------------------------------------------------------
def wake_traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    num_particles: int,
    vectorize: bool,
    plate_nesting: int,
    detach: bool = True,
    minibatch: Trace | None = None,
) -> list[tuple[Trace, Trace]]:
    """
    Draw ``num_particles`` particles from the guide and replay the model on them.

    Vectorized: one ``(model_trace, guide_trace)`` pair whose sites carry a particle dimension at
    ``-(plate_nesting + 1)``. Sequential: one pair per particle, all on the same minibatch (the
    first particle's subsample indices, or ``minibatch`` if given, are replayed into the others).
    With ``detach`` the guide's sample values are detached, so no gradient flows through them
    (RWS, wake-sleep); VIMCO keeps them attached for its pathwise term. Model sites marked for
    parallel enumeration that the guide does not sample are enumerated, in dimensions left of
    the plates and of the particle plate (see :mod:`pyro_rws._enum`).
    """
    _check_guide(guide)
    if vectorize:
        guide = in_particle_plate(guide, num_particles, plate_nesting)
        model = in_particle_plate(model, num_particles, plate_nesting)
    runs = []
    for _ in range(1 if vectorize else num_particles):
        guide_trace = poutine.trace(_replaying(guide, minibatch)).get_trace(*args, **kwargs)
        if detach:
            guide_trace.detach_()
        model_trace = poutine.trace(
            poutine.replay(
                enumerate_model(model, guide_trace, plate_nesting, vectorize), trace=guide_trace
            )
        ).get_trace(*args, **kwargs)
        check_wake_match(model_trace, guide_trace)
        if minibatch is None:
            minibatch = subsample_sites(guide_trace)
        runs.append((model_trace, guide_trace))
    return runs


def _check_guide_enumeration(trace: Trace) -> None:
    for name, site in trace.nodes.items():
        if is_latent(site):
            error = enumerated_site_error(name, site["infer"], "guide")
            if error is not None:
                raise error


class _RejectGuideEnumeration(poutine.messenger.Messenger):
    """
    Raise at guide sites marked for enumeration. Wraps the guide *inside* ``poutine.replay``,
    which replaces a replayed site's ``infer`` dict by the model's, so that a trace check
    afterwards would not see the flag.
    """

    def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"] and not site_is_subsample(msg):
            error = enumerated_site_error(msg["name"], msg["infer"] or {}, "guide")
            if error is not None:
                raise error


def is_enumerated_site(site: dict) -> bool:
    """A model site summed out in the wake phase (or marked to be, in the sleep phase)."""
    return site["infer"].get("_enumerate_dim") is not None or bool(site["infer"].get("enumerate"))


def check_wake_match(model_trace: Trace, guide_trace: Trace) -> None:
    """Raise unless the guide samples exactly the model's latent sites (plus auxiliary ones)."""
    _check_guide_enumeration(guide_trace)  # the model's are checked during its replayed run
    model_latents = {
        n
        for n, s in model_trace.nodes.items()
        if is_latent(s) and s["infer"].get("_enumerate_dim") is None
    }
    guide_latents = {n for n, s in guide_trace.nodes.items() if is_latent(s)}
    missing = model_latents - guide_latents
    if missing:
        raise ValueError(
            f"model latent site(s) {sorted(missing)} are not sampled by the guide. Importance "
            "weights need q(z|x) for every latent of the model: add them to the guide, or "
            "observe them in the model."
        )
    extra = {n for n in guide_latents - model_latents if not is_auxiliary(guide_trace.nodes[n])}
    if extra:
        observed = sorted(n for n in extra if n in model_trace.nodes)
        hint = (
            f" ({observed} are observed in the model; a guide must not sample observed sites)"
            if observed
            else ""
        )
        raise ValueError(
            f"guide samples site(s) {sorted(extra)} that the model does not sample{hint}. "
            "Rename them to match the model's latent sites, or mark guide-only variables with "
            "infer={'is_auxiliary': True}."
        )


# --------------------------------------------------------------------------------------------
# Sleep phase: fantasies from the model, guide replayed on them
# --------------------------------------------------------------------------------------------
def sleep_traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    num_particles: int,
    vectorize: bool,
    plate_nesting: int,
    guide_inputs: Callable,
    minibatch: Trace | None = None,
) -> list[tuple[Trace, Trace]]:
    """
    Draw fantasies ``(x, z) ~ p(x, z)`` by running the model unconditioned with the caller's
    arguments (so plate sizes stay right) and replay the guide on the fantasy latents, with the
    fantasy observations as its inputs.

    ``guide_inputs(model_trace, args, kwargs, squeeze)`` returns the guide's ``(args, kwargs)``
    (see :mod:`pyro_rws._sleep`); ``squeeze`` says whether fantasies should lose the particle
    dimension (one particle per run). The model runs under ``torch.no_grad()``: fantasies are
    data for the guide and model parameters receive no sleep gradient. ``minibatch`` (subsample
    sites of the wake phase) is replayed so both phases see the same minibatch.
    """
    _check_guide(guide)
    model = Uncondition()(model)
    if vectorize:
        model = in_particle_plate(model, num_particles, plate_nesting)
        guide = in_particle_plate(guide, num_particles, plate_nesting)
    squeeze = not vectorize or num_particles == 1
    runs = []
    for _ in range(1 if vectorize else num_particles):
        with torch.no_grad():
            model_trace = poutine.trace(_replaying(model, minibatch)).get_trace(*args, **kwargs)
        check_sleep_model(model_trace)
        guide_args, guide_kwargs = guide_inputs(model_trace, args, kwargs, squeeze)
        guide_trace = poutine.trace(
            poutine.replay(_RejectGuideEnumeration()(guide), trace=model_trace)
        ).get_trace(*guide_args, **guide_kwargs)
        check_sleep_match(model_trace, guide_trace)
        if minibatch is None:
            minibatch = subsample_sites(model_trace)
        runs.append((model_trace, guide_trace))
    return runs


class Uncondition(poutine.uncondition_messenger.UnconditionMessenger):
    """
    ``poutine.uncondition`` except at ``pyro.deterministic`` sites, which keep their value: a
    Delta resampled inside plates would take the plate shape on top of its event shape.
    """

    def _pyro_sample(self, msg) -> None:
        if not (msg["infer"] or {}).get("_deterministic"):
            super()._pyro_sample(msg)


def is_fantasy(site: dict) -> bool:
    """An observed site of the model that the sleep phase sampled instead."""
    return (
        is_sample(site)
        and bool(site["infer"].get("was_observed"))
        and not is_deterministic(site)
        and not site_is_factor(site)
    )


def reject_factors(model_trace: Trace, who: str, remedy: str) -> None:
    """Ancestral sampling ignores ``pyro.factor``: raise if an unconditioned run met one."""
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and site_is_factor(site):
            raise ValueError(
                f"the model contains pyro.factor site '{name}'. {who} draws samples from the "
                f"model by ancestral sampling, which ignores factors. {remedy}"
            )


def check_sleep_model(model_trace: Trace) -> None:
    reject_factors(
        model_trace,
        "The sleep phase",
        "It would train the guide on the wrong distribution: use the wake phase only "
        "(insomnia=1.0 for ReweightedWakeSleep, phase_q='wake' for WakeSleepELBO), or write the "
        "factor as an observed sample site.",
    )


def check_sleep_match(model_trace: Trace, guide_trace: Trace) -> None:
    """
    Raise unless the guide samples exactly the model's latents (no auxiliary sites), except
    the model's enumerated sites, which the sleep phase samples and the guide need not score.
    """
    # the guide's enumeration flags are checked during its replayed run (_RejectGuideEnumeration)
    model_latents = {
        n
        for n, s in model_trace.nodes.items()
        if is_latent(s) and not s["infer"].get("was_observed")
    }
    guide_latents = {n for n, s in guide_trace.nodes.items() if is_latent(s)}
    missing = {
        n for n in model_latents - guide_latents if not is_enumerated_site(model_trace.nodes[n])
    }
    if missing:
        raise ValueError(
            f"model latent site(s) {sorted(missing)} are not sampled by the guide, so the sleep "
            "phase cannot evaluate q(z|x) at the fantasy. Add them to the guide."
        )
    extra = guide_latents - model_latents
    if extra:
        raise ValueError(
            f"guide site(s) {sorted(extra)} are not latent sites of the model (auxiliary "
            "variables, or sites the model observes). The sleep phase scores the model's "
            "latents under the guide, log q(z|x), which is intractable with guide-only "
            "variables: use the wake phase only (insomnia=1.0 or phase_q='wake')."
        )
    # The guide's plates replay the model's subsample indices, so a plate of another size in the
    # guide (e.g. len(x) of a fantasy with a particle dim) would silently rescale log q.
    for name, site in guide_trace.nodes.items():
        model_site = model_trace.nodes.get(name)
        if site_is_subsample(site) and model_site is not None and site_is_subsample(model_site):
            if site["fn"].size != model_site["fn"].size:
                raise ValueError(
                    f"plate '{name}' has size {site['fn'].size} in the guide but "
                    f"{model_site['fn'].size} in the model, in the sleep phase (the guide was "
                    "called with fantasy observations in place of the data)."
                )


# --------------------------------------------------------------------------------------------
# Plate nesting
# --------------------------------------------------------------------------------------------
def _cuda_devices() -> list[int]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


def guess_plate_nesting(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """
    Count the nested vectorized plates of model and guide by running them once.

    Like Pyro's ``ELBO._guess_max_plate_nesting``, this assumes static structure. The run is
    blocked from outer handlers and its random draws are undone (the RNG state is restored), so
    that guessing does not change the results of the step that triggered it.
    """
    _check_guide(guide)
    with torch.random.fork_rng(devices=_cuda_devices()), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    dims = [
        frame.dim
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in plate_frames(site)
        if frame.vectorized
    ]
    return -min(dims) if dims else 0
