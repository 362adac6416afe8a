# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
What a site is, and whether model and guide agree: the one model/guide structure check.

Every loss runs ``check_model_guide_match`` on each pair of traces, in the wake phase (guide
run, model replayed on it) and in the sleep phase (model run unconditioned, guide replayed on
it). Importance weights, sleep-phase log-densities and subsample scales are only right when
model and guide agree on which sites are latent and on the plates around them, so a mismatch is
an error that names the site and the plate, never a silent wrong number.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import zip_longest

import pyro.poutine as poutine
import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from ._enum import enumerated_site_error

#: Name of the plate that vectorizes particles (the same name Pyro's own ELBOs use).
PARTICLE_PLATE = "num_particles_vectorized"


# --------------------------------------------------------------------------------------------
# Site classification
# --------------------------------------------------------------------------------------------
def is_sample(site: dict) -> bool:
    """A sample site that is not the index draw of a subsampled plate."""
    return site["type"] == "sample" and not site_is_subsample(site)


def is_latent(site: dict) -> bool:
    """A sample site without an observed value in this run."""
    return is_sample(site) and not site["is_observed"]


def is_model_latent(site: dict) -> bool:
    """A latent of the model itself: not an observation the sleep phase sampled instead."""
    return is_latent(site) and not site["infer"].get("was_observed")


def is_deterministic(site: dict) -> bool:
    return bool(site["infer"].get("_deterministic"))


def is_auxiliary(site: dict) -> bool:
    return bool(site["infer"].get("is_auxiliary"))


def plate_frames(site: dict) -> tuple:
    """The site's plate frames, without the particle plate."""
    return tuple(f for f in site["cond_indep_stack"] if f.name != PARTICLE_PLATE)


def _size(size):
    """A plate size as an int (``torch.jit.trace`` makes sizes read from shapes tensors)."""
    return int(size) if isinstance(size, torch.Tensor) else size


def _plates(site: dict) -> frozenset:
    """What must agree between model and guide about the plates around a site."""
    return frozenset(
        (f.name, f.dim, _size(f.size), _size(f.full_size), f.vectorized) for f in plate_frames(site)
    )


def _describe(plates: frozenset) -> str:
    if not plates:
        return "no plate"
    return ", ".join(
        f"plate '{name}' (size {size}"
        + (f" of {full}" if full not in (None, size) else "")
        + (f", dim {dim})" if vectorized else ", sequential)")
        for name, dim, size, full, vectorized in sorted(plates, key=str)
    )


# --------------------------------------------------------------------------------------------
# Guides that cannot serve as importance proposals or be scored on fantasies
# --------------------------------------------------------------------------------------------
def _autoguides(guide: Callable) -> list:
    from pyro.infer.autoguide import AutoGuideList

    if isinstance(guide, AutoGuideList):
        return [g for part in guide for g in _autoguides(part)]
    return [guide]


def check_guide(guide: Callable, sleep: bool) -> str | None:
    """
    Raise for guides that no wake-sleep estimator can use; return a warning message for guides
    that work but poorly (or None). ``sleep``: the guide will be scored on fantasies.
    """
    from pyro.infer.autoguide import AutoContinuous, AutoDelta, AutoDiscreteParallel, AutoGuide

    if isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):
        raise NotImplementedError(
            "pyro_rws does not support GuideMessenger guides (such as AutoGuideMessenger): "
            "they cannot be replayed on fantasies or detached. Use an ordinary guide "
            "function, a PyroModule guide, or an AutoGuide such as AutoNormal."
        )
    for part in _autoguides(guide):
        kind = type(part).__name__
        if isinstance(part, AutoDelta):
            raise ValueError(
                f"{kind} is a point mass: it is no importance proposal (every particle is the "
                "same value and log q has no gradient) and has no density at fantasies, so no "
                "wake-sleep estimator can train it. Use AutoNormal, or a guide that samples "
                "from a distribution with a density."
            )
        if isinstance(part, AutoDiscreteParallel):
            raise NotImplementedError(
                f"{kind} enumerates discrete latents in the guide, which pyro_rws does not "
                "support: importance weights need sampled guide values. To sum a discrete site "
                "out exactly, mark it in the model (infer={'enumerate': 'parallel'} or "
                "config_enumerate(model)) and leave it out of the guide; to sample it, write a "
                "guide that samples it (e.g. an amortized Categorical or Bernoulli)."
            )
        if sleep and isinstance(part, AutoGuide) and not getattr(part, "amortized", False):
            raise ValueError(
                f"{kind} cannot be trained by the sleep phase: an autoguide is not amortized "
                "(its parameters are per latent, not computed from the data), so it cannot "
                "read the fantasy observations the sleep phase scores it on, and its sites are "
                "point masses over auxiliary samples. Use the wake phase only (insomnia=1.0 for "
                "ReweightedWakeSleep, phase_q='wake' for WakeSleepELBO) with AutoNormal, or "
                "write an amortized guide q(z|x) for the sleep phase."
            )
        if isinstance(part, AutoContinuous):
            return (
                f"{kind} flattens every latent into one vector, so the importance weights are "
                "joint over the whole batch instead of per datapoint and the effective sample "
                "size collapses as the batch grows. AutoNormal keeps one site per latent (and "
                "per-datapoint weights); an amortized guide is better still."
            )
    return None


# --------------------------------------------------------------------------------------------
# Enumeration flags
# --------------------------------------------------------------------------------------------
def check_guide_enumeration(name: str, infer: dict) -> None:
    """Guide sites are sampled, never enumerated (the model's are handled by :mod:`._enum`)."""
    error = enumerated_site_error(name, infer, "guide")
    if error is not None:
        raise error


def is_enumerated_site(site: dict) -> bool:
    """A model site summed out in the wake phase (or marked to be, in the sleep phase)."""
    return site["infer"].get("_enumerate_dim") is not None or bool(site["infer"].get("enumerate"))


def check_replayed_plate(msg, role: str) -> None:
    """
    At a plate's index draw replayed from the other program (``msg`` after processing): raise
    if the plate's subsample size differs from the replayed minibatch's (Pyro's own error would
    not name the plate).
    """
    if site_is_subsample(msg) and msg["value"] is not None:
        wanted = msg["fn"].subsample_size
        if wanted is not None and wanted != len(msg["value"]):
            raise ValueError(
                f"plate '{msg['name']}' has subsample size {wanted} in the {role} but "
                f"{len(msg['value'])} in the other program, whose minibatch it replays. Give "
                "the plate the same size and subsample size in model and guide."
            )


# --------------------------------------------------------------------------------------------
# The model/guide match
# --------------------------------------------------------------------------------------------
_REMEDY = {
    "wake": "",
    "sleep": " (in the sleep phase, where the guide is called with fantasy observations)",
    "adversarial": "",
}
_MISSING = {
    "wake": "Importance weights need q(z|x) for every latent of the model",
    "sleep": "The sleep phase scores q(z|x) at every latent of the model's fantasies",
    "adversarial": (
        "The discriminator sees (x, z) with z from the guide in data pairs, so the guide must "
        "encode every latent it sees (to leave out generator noise, name the latents the "
        "discriminator sees with latent_sites=[...]; a data site whose obs= was None is also "
        "a latent)"
    ),
}


def check_model_guide_match(
    model_trace: Trace,
    guide_trace: Trace,
    phase: str,
    plate_nesting: int | None = None,
    model_latents: set | None = None,
) -> None:
    """
    Raise a :class:`ValueError` unless model and guide agree, in ``phase`` (``"wake"``,
    ``"sleep"`` or ``"adversarial"``, where ``model_latents`` names the latents the
    discriminator sees):

    - the guide samples every latent of the model (``model_latents``, by default every
      :func:`is_model_latent` site), and nothing else except auxiliary sites in the wake phase;
    - every plate of the same name has the same size, full size and dim in both;
    - every shared site lies in the same plates (names, sizes, dims), so that subsample
      indices are shared and log-densities line up datapoint by datapoint;
    - no vectorized plate sits left of ``-plate_nesting`` (where the particle plate goes);
    - in the sleep phase, the guide can score each fantasy (:func:`check_fantasy_shape`);
    - with validation on, model and guide agree on each shared site's event dim and shape.
    """
    where = _REMEDY.get(phase, "")
    key = None
    if model_latents is None:
        key = _structure_key(model_trace, guide_trace, phase, plate_nesting)
        checked = _CHECKED.get(key) if key is not None else None
        if checked is not None:  # this structure passed before: only the shapes remain
            if phase == "sleep":  # validation on or off
                for name in checked:
                    check_fantasy_shape(name, guide_trace.nodes[name])
            if is_validation_enabled():
                for name in checked:
                    _check_shapes(name, model_trace.nodes[name], guide_trace.nodes[name], where)
            return
        # enumerated model sites are summed out (wake) or sampled (sleep)
        model_latents = {
            n
            for n, s in model_trace.nodes.items()
            if is_model_latent(s) and not is_enumerated_site(s)
        }
    guide_latents = set()
    for name, site in guide_trace.nodes.items():
        if is_latent(site):
            guide_latents.add(name)
            if phase != "sleep":  # replayed guide sites hold the model's infer dict
                check_guide_enumeration(name, site["infer"])
    missing = model_latents - guide_latents
    if missing:
        raise ValueError(
            f"model latent site(s) {sorted(missing)} are not sampled by the guide{where}. "
            f"{_MISSING[phase]}: add them to the guide, or observe them in the model."
        )
    extra = {
        n
        for n in guide_latents - model_latents
        if not (n in model_trace.nodes and is_model_latent(model_trace.nodes[n]))
    }
    if phase != "sleep":
        extra = {n for n in extra if not is_auxiliary(guide_trace.nodes[n])}
    if extra:
        observed = sorted(
            n for n in extra if n in model_trace.nodes and not is_model_latent(model_trace.nodes[n])
        )
        if phase == "sleep":
            raise ValueError(
                f"guide site(s) {sorted(extra)} are not latent sites of the model (auxiliary "
                "variables, or sites the model observes). The sleep phase scores the model's "
                "latents under the guide, log q(z|x), which is intractable with guide-only "
                "variables: use the wake phase only (insomnia=1.0 or phase_q='wake')."
            )
        hint = f" ({observed} are observed in the model; a guide must not sample observed sites)"
        raise ValueError(
            f"guide samples site(s) {sorted(extra)} that the model does not sample"
            f"{hint if observed else ''}. Rename them to match the model's latent sites, or "
            "mark guide-only variables with infer={'is_auxiliary': True}."
        )

    shared = model_latents
    if phase == "sleep":
        # a model site marked for enumeration (config_enumerate marks every discrete site) that
        # the guide samples is sampled by the model and scored by the guide like any latent
        shared = model_latents | {
            n
            for n in guide_latents
            if n in model_trace.nodes and is_model_latent(model_trace.nodes[n])
        }
    _check_plates(model_trace, guide_trace, where)
    for name in shared:
        model_site, guide_site = model_trace.nodes[name], guide_trace.nodes[name]
        model_plates, guide_plates = _plates(model_site), _plates(guide_site)
        if model_plates != guide_plates:
            raise ValueError(
                f"site '{name}' lies in {_describe(model_plates)} in the model but in "
                f"{_describe(guide_plates)} in the guide{where}. Model and guide must put each "
                "latent in the same plates (same names, sizes and dims), so that they share "
                "subsample indices and their log-densities line up datapoint by datapoint."
            )
    if plate_nesting is not None:
        _check_nesting(model_trace, "model", plate_nesting)
        _check_nesting(guide_trace, "guide", plate_nesting)
    if phase == "sleep":  # validation on or off
        for name in shared:
            check_fantasy_shape(name, guide_trace.nodes[name])
    if is_validation_enabled():
        for name in shared:
            _check_shapes(name, model_trace.nodes[name], guide_trace.nodes[name], where)
    if key is not None:
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED[key] = tuple(shared)


#: Structures (:func:`_structure_key`) that passed :func:`check_model_guide_match`, with the
#: latents shared by model and guide (whose shapes are checked on every call): with sequential
#: particles most runs repeat a structure already checked.
_CHECKED: dict = {}
_CHECKED_MAX = 4096


def _site_key(name: str, site: dict) -> tuple:
    """Everything about a sample site that :func:`check_model_guide_match` reads but shapes."""
    stack = site["cond_indep_stack"]
    key = (
        name,
        site["is_observed"],
        tuple([(f.name, f.dim, f.size, f.full_size) for f in stack]) if stack else (),
    )
    infer = site["infer"]
    if infer:
        key += (
            infer.get("was_observed"),
            infer.get("_enumerate_dim") is not None,
            infer.get("enumerate"),
            infer.get("num_samples"),
            infer.get("_markov_scope") is not None,
            infer.get("is_auxiliary"),
            infer.get("_deterministic"),
        )
    if type(site["fn"]).__name__ == "_Subsample":  # site_is_subsample
        key += ("subsample", len(site["value"]), site["fn"].size)
    return key


def _structure_key(model_trace: Trace, guide_trace: Trace, phase: str, plate_nesting) -> tuple:
    """
    A key for the structure of a pair of traces: sites, observed or not, plates (name, dim, size,
    full size), minibatch sizes and the infer flags the check reads. None while a compiled loss
    records its step or under ``torch.jit.trace`` (plate sizes may be symbolic there).
    """
    if torch.jit.is_tracing() or get_proxy_mode() is not None:
        return None
    return (
        phase,
        plate_nesting,
        tuple(_site_key(n, s) for n, s in model_trace.nodes.items() if s["type"] == "sample"),
        tuple(_site_key(n, s) for n, s in guide_trace.nodes.items() if s["type"] == "sample"),
    )


def _subsample_frames(trace: Trace) -> dict:
    """``{plate name: (size, full size)}`` of the trace's plates (their index draws)."""
    return {
        name: (len(site["value"]), _size(site["fn"].size))
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and site_is_subsample(site) and name != PARTICLE_PLATE
    }


def _check_plates(model_trace: Trace, guide_trace: Trace, where: str) -> None:
    model_plates, guide_plates = _subsample_frames(model_trace), _subsample_frames(guide_trace)
    for name in model_plates.keys() & guide_plates.keys():
        (m_size, m_full), (g_size, g_full) = model_plates[name], guide_plates[name]
        if (m_size, m_full) != (g_size, g_full):
            raise ValueError(
                f"plate '{name}' has size {g_size} of {g_full} in the guide but {m_size} of "
                f"{m_full} in the model{where}. Give it the same size (and subsample size) in "
                "both: if the guide reads the plate size from its data (len(x)), the sleep "
                "phase calls it with fantasies in place of the data."
            )


def _check_nesting(trace: Trace, role: str, plate_nesting: int) -> None:
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        for f in plate_frames(site):
            if f.vectorized and f.dim is not None and f.dim < -plate_nesting:
                raise ValueError(
                    f"{role} site '{name}' lies in plate '{f.name}' at dim {f.dim}, but "
                    f"max_plate_nesting is {plate_nesting} (the particle plate takes dim "
                    f"{-plate_nesting - 1}). Pass max_plate_nesting={-f.dim} (or more) to the "
                    "loss."
                )


def _check_shapes(name: str, model_site: dict, guide_site: dict, where: str) -> None:
    m_fn, g_fn = model_site["fn"], guide_site["fn"]
    m_event, g_event = getattr(m_fn, "event_dim", None), getattr(g_fn, "event_dim", None)
    if m_event is not None and g_event is not None and m_event != g_event:
        raise ValueError(
            f"model and guide event dims disagree at site '{name}'{where}: {m_event} in the "
            f"model, {g_event} in the guide. Declare the same event dims (.to_event(n)) in both."
        )
    if not (hasattr(m_fn, "shape") and hasattr(g_fn, "shape")):
        return
    m_shape = m_fn.shape(*model_site["args"], **model_site["kwargs"])
    g_shape = g_fn.shape(*guide_site["args"], **guide_site["kwargs"])
    for m, g in zip_longest(reversed(m_shape), reversed(g_shape), fillvalue=1):
        if m != g and 1 not in (m, g):
            raise ValueError(
                f"model and guide shapes disagree at site '{name}'{where}: "
                f"{tuple(m_shape)} in the model, {tuple(g_shape)} in the guide."
            )


def check_fantasy_shape(name: str, site: dict) -> None:
    """
    At guide site ``name`` replayed on a sleep-phase fantasy: raise unless the value ends in the
    guide distribution's event shape and the rest broadcasts into its batch shape without
    enlarging it (but for leading 1s). Shapes only; torch's error while scoring (or a log q
    silently broadcast to a larger shape) would not name the site.
    """
    fn, value = site["fn"], site["value"]
    batch, event = getattr(fn, "batch_shape", None), getattr(fn, "event_shape", None)
    if batch is None or event is None or not torch.is_tensor(value):
        return
    shape, n = value.shape, len(event)
    if shape == batch + event:  # the usual case
        return
    if len(shape) >= n and shape[len(shape) - n :] == event:
        value_batch = shape[: len(shape) - n]
        extra = max(len(value_batch) - len(batch), 0)
        aligned = value_batch[extra:]  # against the rightmost dims of the batch shape
        if all(v == 1 for v in value_batch[:extra]) and all(
            v in (1, b) for v, b in zip(aligned, batch[len(batch) - len(aligned) :], strict=True)
        ):
            return
    raise ValueError(
        f"guide site '{name}' cannot score the model's fantasy in the sleep phase: the "
        f"fantasy has shape {tuple(shape)}, the guide's distribution batch shape "
        f"{tuple(batch)} and event shape {tuple(event)}. Give the site the same shape in model "
        "and guide: the same event dims (.to_event(n)) and the same plates, with no other "
        "batch dimensions."
    )
