# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The wake phase's traces: guide runs and model replays, vectorized or one run per particle.

Also the particle plate and the guess of ``max_plate_nesting``. The sleep phase's runs are in
:mod:`pyro_rws._sleep`, the model/guide structure check in :mod:`pyro_rws._structure`.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from ._enum import enumerate_model
from ._structure import (
    PARTICLE_PLATE,
    check_guide_enumeration,
    check_model_guide_match,
    check_replayed_plate,
    plate_frames,
)


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


def replay_model(model: Callable, guide_trace: Trace, plate_nesting: int, vectorize: bool):
    """
    ``model`` replayed on the guide's sample values, its other sites marked for parallel
    enumeration enumerated left of the plates and of the particle plate (see
    :mod:`pyro_rws._enum`), as :func:`wake_traces` runs it (there the replay is folded into
    :class:`SampleTrace`); the DReG replay uses this one.
    """
    enumerated = enumerate_model(model, guide_trace, plate_nesting, vectorize)
    return poutine.replay(enumerated, trace=guide_trace)


Runs = list[tuple[Trace, Trace]]

#: Added to errors raised by a program run with a particle dimension.
VECTORIZED_NOTE = (
    "pyro_rws: model and guide ran with vectorize_particles=True, with a particle dimension "
    "left of their plates. If the program has stochastic control flow (a Python `if` or loop on "
    "a sampled value) or reads plate sizes with len(x), pass vectorize_particles=False to the "
    "loss, log_evidence or importance_posterior (one run per particle), or make it broadcast "
    "over that dimension."
)


class SampleTrace(TraceMessenger):
    """
    ``poutine.trace`` for the runs of a step: sample sites only (the losses read no param
    sites; SVI captures parameters with its own trace), the trace itself rather than a copy, and
    with ``detach`` each latent sample detached as it is drawn, before the trace records it and
    before the program sees it, so that later sites of the same program (a hierarchical guide)
    do not differentiate through earlier reparameterized samples. With ``replayed`` (the role of
    a program replaying the other's minibatch) its plates are checked against the replayed
    indices (:func:`~pyro_rws._structure.check_replayed_plate`).

    The handlers every run needs around the program are folded into this one messenger, so that
    each message of a run passes one handler (a run per particle, with sequential particles):
    with ``uncondition`` it is :class:`~pyro_rws._sleep.Uncondition` (observed sites sampled,
    except ``pyro.deterministic`` and subsample sites), then with ``replay`` it is
    ``poutine.replay(trace=replay)``, in that order, as if those handlers were nested inside the
    trace; with ``check_guide`` guide sites marked for enumeration raise first (before a replay
    replaces their ``infer`` dict by the model's).
    """

    def __init__(
        self,
        detach: bool = False,
        replayed: str | None = None,
        *,
        replay: Trace | None = None,
        uncondition: bool = False,
        check_guide: bool = False,
    ):
        super().__init__()
        self.detach = detach
        self.replayed = replayed
        self.replay_nodes = None if replay is None else replay.nodes
        self.uncondition = uncondition
        self.check_guide = check_guide

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        if self.check_guide and not msg["is_observed"] and not site_is_subsample(msg):
            check_guide_enumeration(msg["name"], msg["infer"] or {})
        if (
            self.uncondition
            and msg["is_observed"]
            and not (msg["infer"] or {}).get("_deterministic")
            and not site_is_subsample(msg)
        ):  # poutine.uncondition
            msg["is_observed"] = False
            msg["infer"]["was_observed"] = True
            msg["infer"]["obs"] = msg["value"]
            msg["value"] = None
            msg["done"] = False
        if self.replay_nodes is not None and not msg["is_observed"]:  # poutine.replay
            site = self.replay_nodes.get(msg["name"])
            if site is not None:
                if site["type"] != "sample" or site["is_observed"]:
                    raise RuntimeError(f"site {msg['name']} must be sampled in trace")
                msg["done"] = True
                msg["value"] = site["value"]
                msg["infer"] = site["infer"]

    def _postprocess_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        if self.detach and not msg["is_observed"] and torch.is_tensor(msg["value"]):
            msg["value"] = msg["value"].detach()
        if self.replayed is not None:
            check_replayed_plate(msg, self.replayed)
        self._pyro_post_sample(msg)

    def get_trace(self) -> Trace:
        return self.trace


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
    need_minibatch: bool = True,
) -> tuple[Runs, Trace | None]:
    """
    Draw ``num_particles`` particles from the guide and replay the model on them.

    Vectorized: one ``(model_trace, guide_trace)`` pair whose sites carry a particle dimension at
    ``-(plate_nesting + 1)``. Sequential: one pair per particle, all on the same minibatch (the
    first particle's subsample indices, or ``minibatch`` if given, are replayed into the others).
    With ``detach`` the guide's sample values are detached as they are drawn, so no gradient
    flows through them, not even into later guide sites (RWS, wake-sleep); VIMCO keeps them
    attached for its pathwise term. Model sites marked for parallel enumeration that the guide
    does not sample are enumerated, in dimensions left of the plates and of the particle plate
    (see :mod:`pyro_rws._enum`). Each pair passes
    :func:`~pyro_rws._structure.check_model_guide_match`.

    :returns: the runs, and the minibatch (subsample sites) they share, for the sleep phase
        (None where there is none, or where ``need_minibatch`` is False and the particles ran
        in one vectorized run).
    """
    if vectorize:
        guide = in_particle_plate(guide, num_particles, plate_nesting)
        model = in_particle_plate(model, num_particles, plate_nesting)
    runs = []
    for _ in range(1 if vectorize else num_particles):
        try:
            guide_trace = SampleTrace(detach, replay=minibatch)(guide).get_trace(*args, **kwargs)
            enumerated = enumerate_model(model, guide_trace, plate_nesting, vectorize)
            model_trace = SampleTrace(replayed="model", replay=guide_trace)(enumerated).get_trace(
                *args, **kwargs
            )
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            if vectorize and num_particles > 1:
                e.add_note(VECTORIZED_NOTE)
            raise
        check_model_guide_match(model_trace, guide_trace, "wake", plate_nesting)
        if minibatch is None and (need_minibatch or not vectorize):
            minibatch = subsample_sites(guide_trace)
        runs.append((model_trace, guide_trace))
    return runs, minibatch


def _cuda_devices() -> list[int]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


def guess_plate_nesting(model: Callable, args: tuple, kwargs: dict) -> int:
    """
    Count the nested vectorized plates of the model by running it once.

    Like Pyro's ``ELBO._guess_max_plate_nesting``, this assumes static structure. Only the model
    runs, with the caller's arguments (the guide is never called on inputs it was not meant to
    see, such as the placeholders of a CSIS-style ``observations=`` argument); a guide with more
    nested plates than its model is caught by the structure check of the first step, which asks
    for ``max_plate_nesting``. The run is blocked from outer handlers and its random draws are
    undone (the RNG state is restored), so that guessing does not change the results of the
    step that triggered it.
    """
    with torch.random.fork_rng(devices=_cuda_devices()), poutine.block(), torch.no_grad():
        model_trace = poutine.trace(model).get_trace(*args, **kwargs)
    dims = [
        frame.dim
        for site in model_trace.nodes.values()
        if site["type"] == "sample"
        for frame in plate_frames(site)
        if frame.vectorized
    ]
    return -min(dims) if dims else 0
