# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
The particles of :func:`~pyro_rws.importance_posterior` when they are separate runs
(``vectorize_particles=False``), whose structure may differ from particle to particle.

A sequential particle :math:`k` is the dict :math:`\{a: z^k_a\}` of the latent sites its run
met, with the values that run drew (no particle dim). Resampling draws particle indices
:math:`k_j \sim \mathrm{Categorical}(\bar w)`, :math:`j = 1..S`, and returns the particles
themselves, so each draw is a complete, consistent run (its control-flow variables and exactly
the sites they led to). With batch plates that are sequential (``for i in pyro.plate(...)``, the
PCFG's sentences), each batch element :math:`b` has its own weights :math:`\bar w_{\cdot b}`; a
draw then takes, for each element, the sites of that element from the particle drawn for it
(the sites of different elements are different sites, so the result is again a dict of sites).

Where every particle has the same sites with the same shapes, the values are also stacked
into :attr:`~pyro_rws.ImportancePosterior.latents` (``(K, *shape)``, in the layout of a
vectorized run: each value padded with singleton dims to ``max_plate_nesting`` batch dims), so
that :meth:`~pyro_rws.ImportancePosterior.sample` works as for vectorized particles.
"""

from __future__ import annotations

import torch

from ._structure import is_latent, is_sample


def run_particle(guide_trace) -> dict:
    """``{site: value}`` of the latent sites of one run (values detached)."""
    return {
        name: site["value"].detach() for name, site in guide_trace.nodes.items() if is_latent(site)
    }


def batch_cells(runs, frames: dict) -> list[dict]:
    """
    For sequential runs whose batch plates (``frames``, from ``_batch_plates``) are all
    sequential: per run, ``{latent site: flat index of its batch element}``, the element in the
    order of :func:`pyro_rws._weights.log_weights` (plate names sorted, counters sorted).
    """
    seq = sorted(frames)
    counters = [set() for _ in seq]
    keys = []
    for model_trace, guide_trace in runs:
        key_of = {}
        for trace in (model_trace, guide_trace):
            for name, site in trace.nodes.items():
                if not is_sample(site):
                    continue
                stack = {f.name: f.counter for f in site["cond_indep_stack"]}
                if any(n not in stack for n in seq):  # a deterministic site: no weight
                    continue
                key = tuple(stack[n] for n in seq)
                for i, c in enumerate(key):
                    counters[i].add(c)
                if trace is guide_trace and is_latent(site):
                    key_of[name] = key
        keys.append(key_of)
    index = [{c: j for j, c in enumerate(sorted(cs))} for cs in counters]
    sizes = [len(cs) for cs in counters]
    cells = []
    for key_of in keys:
        flat = {}
        for name, key in key_of.items():
            cell = 0
            for i, c in enumerate(key):
                cell = cell * sizes[i] + index[i][c]
            flat[name] = cell
        cells.append(flat)
    return cells


def padded(value: torch.Tensor, event_dim: int, plate_nesting: int) -> torch.Tensor:
    """A run's value with singleton dims on the left up to ``plate_nesting`` batch dims."""
    missing = plate_nesting - (value.dim() - event_dim)
    return value.reshape((1,) * missing + value.shape) if missing > 0 else value


def stack_particles(particles: list[dict], event_dims: dict, plate_nesting: int):
    """
    ``{site: (K, *shape)}`` if every particle has the same sites with the same shapes, else
    ``(None, why)``.
    """
    names = list(particles[0]) if particles else []
    for k, particle in enumerate(particles):
        if set(particle) != set(names):
            diff = sorted(set(particle).symmetric_difference(names))
            return None, f"particles 0 and {k} have different sites ({', '.join(diff[:5])})"
    out = {}
    for name in names:
        values = [padded(p[name], event_dims[name], plate_nesting) for p in particles]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            return None, f"site '{name}' has different shapes in different particles"
        out[name] = torch.stack(values)
    return out, None


def resample_particles(
    particles: list[dict], cells: list[dict] | None, index: torch.Tensor
) -> list[dict]:
    """
    Draws of whole particles: ``index`` is ``(S,)`` (joint weights) or ``(S, M)`` (per element
    of the sequential batch plates, whose cells ``cells`` gives per particle and site).
    """
    if index.dim() == 1:
        return [dict(particles[k]) for k in index.tolist()]
    draws = []
    for row in index.tolist():
        draw = {}
        for cell, k in enumerate(row):
            for name, value in particles[k].items():
                if cells[k][name] == cell:
                    draw[name] = value
        draws.append(draw)
    return draws
