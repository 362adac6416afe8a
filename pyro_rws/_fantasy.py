# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Where fantasies go in the guide's arguments in the sleep phase.

The sleep phase runs the model unconditioned, giving fantasy observations ``x`` and latents
``z``, and scores ``log q(z | x)``. The guide must therefore be called with the fantasy ``x``
where it would read the data. Rules, in order:

1. ``fantasy_args`` given as a callable ``(fantasies, *args, **kwargs) -> (args, kwargs)``:
   it builds the guide's arguments from ``{site name: fantasy}``.
2. ``fantasy_args`` given as a dict ``{site name: position or keyword or None}``: the fantasy
   replaces that argument (``None``: the guide does not read this observation). If the model
   observed a minibatch slice ``x[idx]`` of a subsampled plate (``subsample_size=`` or explicit
   ``subsample=`` indices, a permutation included), the fantasy is scattered into a copy of the
   full argument at ``idx``, so the guide's own ``x[idx]`` reads each datapoint's fantasy.
   Repeated indices are an error: two fantasies cannot share one slot of the argument.
3. Otherwise, an observed site whose ``obs=`` value *is* (``is``, identity) one of the arguments
   passed to the model has its fantasy put in that argument's place.
4. A guide with an ``observations`` keyword (Pyro's convention; for a module, in the signature
   of its ``forward``) also receives ``observations={site name: fantasy}``.

An observed site that none of these covers is an error that says how to fix it. The caller's
``args`` and ``kwargs`` are never modified: new containers are built.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_factor

from ._structure import is_deterministic, is_sample, plate_frames

FantasyArgs = Mapping[str, "int | str | None"] | Callable | None


def check_fantasy_args(fantasy_args: FantasyArgs) -> None:
    """Validate the ``fantasy_args`` argument of a loss when it is constructed."""
    if fantasy_args is None or callable(fantasy_args):
        return
    if not isinstance(fantasy_args, Mapping):
        raise TypeError(
            "fantasy_args must be None, a dict {observed site name: argument position (int), "
            "keyword (str) or None}, or a callable (fantasies, *args, **kwargs) -> (args, kwargs);"
            f" got {type(fantasy_args).__name__}"
        )
    for name, slot in fantasy_args.items():
        if isinstance(slot, bool) or (slot is not None and not isinstance(slot, (int, str))):
            raise TypeError(
                f"fantasy_args[{name!r}] must be an argument position (int), a keyword (str) or "
                f"None, got {slot!r}"
            )


def is_fantasy(site: dict) -> bool:
    """An observed site of the model that the sleep phase sampled instead."""
    return (
        is_sample(site)
        and bool(site["infer"].get("was_observed"))
        and not is_deterministic(site)
        and not site_is_factor(site)
    )


def accepts_observations(guide: Callable) -> bool:
    """Whether ``guide`` (or a module's ``forward``) takes an ``observations`` keyword."""
    fn = guide.forward if isinstance(guide, torch.nn.Module) else guide
    try:
        param = inspect.signature(fn).parameters.get("observations")
    except (TypeError, ValueError):
        return False
    return param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def _as_data(value: torch.Tensor, obs, squeeze: bool) -> torch.Tensor:
    """The fantasy shaped and typed like the observation it replaces."""
    if not torch.is_tensor(obs):
        return value
    value = value.to(obs.dtype)
    lead = value.dim() - obs.dim()
    if squeeze and lead >= 0 and value.shape[lead:] == obs.shape:
        return value.reshape(obs.shape)
    return value


def _minibatch_frame(current, obs, site: dict, model_trace: Trace):
    """
    The plate along which the observation ``obs`` was taken from the argument ``current`` at the
    plate's subsample indices (``obs=x[idx]``), or None if ``obs`` stands for ``current`` itself.
    A plate subsampled by size is recognised by its sizes; a plate given ``subsample=`` indices
    of the full size (a permutation, say) costs one comparison of ``current[idx]`` with ``obs``
    (a device synchronization), made only when ``obs`` is not the argument itself.
    """
    if not (torch.is_tensor(current) and torch.is_tensor(obs)) or current.dim() != obs.dim():
        return None
    event_dim = site["fn"].event_dim
    for f in plate_frames(site):
        dim = f.dim - event_dim if f.vectorized else None
        if dim is None or current.dim() < -dim:
            continue
        index = model_trace.nodes[f.name]["value"]
        if current.shape[dim] == f.full_size != f.size == obs.shape[dim]:
            return f
        if current.shape == obs.shape and current.shape[dim] == len(index) == f.size:
            picked = current.index_select(dim, index.to(current.device))
            if bool(torch.equal(picked, obs.to(picked.dtype))):
                return f
    return None


def _scatter(current, frame, site: dict, model_trace: Trace, value: torch.Tensor, name, slot):
    """Write a minibatch fantasy into a copy of the full-data argument, at the subsample indices."""
    obs = site["infer"]["obs"]
    dim = frame.dim - site["fn"].event_dim
    index_site = model_trace.nodes[frame.name]
    index = index_site["value"]
    # indices drawn by subsample_size are distinct; given ones are checked
    if index_site["fn"].subsample_size is None and len(index.unique()) < len(index):
        raise ValueError(
            f"plate '{frame.name}' was given subsample indices with repeats, so the fantasies of "
            f"observed site '{name}' cannot be placed into the full-data argument {slot!r} (two "
            "fantasies would share one datapoint's slot, and the guide would score both latents "
            "against one of them). Pass the minibatch itself to model and guide (obs=x_batch, "
            f"fantasy_args={{{name!r}: ...}} naming that argument), or use indices without "
            "repeats."
        )
    lead = value.shape[: value.dim() - obs.dim()]
    full = current.expand(*lead, *current.shape).to(current.dtype, copy=True)
    return full.index_copy_(dim, index.to(full.device), value.to(full.dtype))


def _cannot_place(current, obs, name, slot):
    return ValueError(
        f"fantasy_args maps observed site '{name}' (obs of shape "
        f"{tuple(getattr(obs, 'shape', ()))}) to argument {slot!r} of shape "
        f"{tuple(getattr(current, 'shape', ()))}, and the fantasy "
        "can neither replace it (shapes differ) nor be scattered into it along one subsampled "
        "plate. Pass fantasy_args as a callable (fantasies, *args, **kwargs) -> (args, kwargs) "
        "that builds the guide's arguments."
    )


def guide_inputs(
    takes_observations: bool,
    fantasy_args: FantasyArgs,
    model_trace: Trace,
    args: tuple,
    kwargs: dict,
    squeeze: bool,
) -> tuple[tuple, dict]:
    """
    The ``(args, kwargs)`` to call the guide with on the fantasies in ``model_trace``.
    ``takes_observations``: the guide has an ``observations`` keyword
    (:func:`accepts_observations`, computed once by the caller).
    """
    sites = {name: site for name, site in model_trace.nodes.items() if is_fantasy(site)}
    values = {
        name: _as_data(site["value"], site["infer"]["obs"], squeeze) for name, site in sites.items()
    }
    if callable(fantasy_args):
        out = fantasy_args(values, *args, **kwargs)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
            raise TypeError(
                "fantasy_args(fantasies, *args, **kwargs) must return a pair (args, kwargs), got "
                f"{type(out).__name__}"
            )
        return tuple(out[0]), dict(out[1])

    mapping = dict(fantasy_args or {})
    unknown = sorted(set(mapping) - set(sites))
    if unknown:
        raise ValueError(
            f"fantasy_args names {unknown}, which are not observed sites of the model "
            f"(observed sites: {sorted(sites)})"
        )
    new_args, new_kwargs = list(args), dict(kwargs)
    takes_observations = takes_observations or "observations" in kwargs
    unmatched = []
    for name, site in sites.items():
        obs = site["infer"]["obs"]
        if name in mapping:
            slots = [] if mapping[name] is None else [mapping[name]]
        else:
            slots = [i for i, a in enumerate(args) if a is obs]
            slots += [k for k, v in kwargs.items() if v is obs]
            if not slots and not takes_observations:
                unmatched.append(name)
        for slot in slots:
            container = new_args if isinstance(slot, int) else new_kwargs
            if (isinstance(slot, int) and not -len(args) <= slot < len(args)) or (
                isinstance(slot, str) and slot not in kwargs
            ):
                raise ValueError(
                    f"fantasy_args maps site '{name}' to argument {slot!r}, but the model was "
                    f"called with {len(args)} positional argument(s) and keywords {sorted(kwargs)}"
                )
            current = container[slot]
            frame = None if current is obs else _minibatch_frame(current, obs, site, model_trace)
            if frame is not None:
                container[slot] = _scatter(
                    current, frame, site, model_trace, values[name], name, slot
                )
            elif current is obs or (
                torch.is_tensor(current) and torch.is_tensor(obs) and current.shape == obs.shape
            ):
                container[slot] = values[name].to(current.dtype)
            else:
                raise _cannot_place(current, obs, name, slot)
    if unmatched:
        raise ValueError(
            "the sleep phase calls the guide with fantasy observations in place of the data, but "
            f"observed site(s) {unmatched} do not take their obs= value from an argument of the "
            "model (the obs tensor is not one of the arguments itself: e.g. a slice x[idx] under "
            "subsampling, a transformed copy, or a pyro.condition-ed model). Say where each "
            "fantasy goes: fantasy_args={'x': 0} (argument position) or {'x': 'data'} (keyword),"
            " None for an observation the guide does not read, or a callable "
            "fantasy_args=lambda fantasies, *args, **kwargs: (args, kwargs); or give the guide "
            "an `observations=None` keyword (Pyro's convention), which receives "
            "{site name: fantasy}."
        )
    if takes_observations:
        new_kwargs["observations"] = values
    return tuple(new_args), new_kwargs
