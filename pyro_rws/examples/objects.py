# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
A simulator with stochastic control flow: a random number of objects, each at a random pixel
(tutorial 3, ``benchmarks/sequential_step.py``).

* the number of objects :math:`n \in \{0, 1, 2, 3\}` has prior probabilities
  :math:`(0.15, 0.35, 0.30, 0.20)`;
* object :math:`i < n` sits at a pixel :math:`\mathrm{loc}_i`, uniform on
  :math:`\{0, \dots, 15\}`;
* the signal is the sum of a Gaussian bump (width 1, height 1) per object plus Gaussian noise of
  standard deviation 0.3 on each of the 16 pixels:

.. math::

    p(n, \mathrm{loc}_{0:n}, x) = p(n)\, 16^{-n}
        \prod_{j} \mathcal N\big(x_j;\ \textstyle\sum_{i<n} e^{-(j - \mathrm{loc}_i)^2 / 2},
        0.3^2\big).

The number of ``loc_i`` sites changes from run to run, so particles are separate runs
(``vectorize_particles=False``). :class:`Proposal` is an amortized guide with the same control
flow; :func:`exact_posterior` enumerates the at most :math:`1 + 16 + 16^2 + 16^3` configurations.
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

NUM_PIXELS, MAX_OBJECTS, WIDTH, NOISE = 16, 3, 1.0, 0.3
PRIOR_N = (0.15, 0.35, 0.30, 0.20)
_PRIOR_N = torch.tensor(PRIOR_N, dtype=torch.float64)
_PIXELS = torch.arange(NUM_PIXELS, dtype=torch.float64)


def _like(t: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """``t`` in the dtype and device of ``like`` (the default dtype on the CPU if None)."""
    if like is None:
        return t.to(torch.get_default_dtype())
    return t.to(dtype=like.dtype, device=like.device)


def prior_n(like: torch.Tensor | None = None) -> torch.Tensor:
    """The prior probabilities of the number of objects, in the dtype and device of ``like``."""
    return _like(_PRIOR_N, like)


def render(locs: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """
    The noise-free signal ``[..., NUM_PIXELS]``: a Gaussian bump at each location of ``locs``
    (``[..., n]``, integer or float), summed; floating point like ``like`` (default dtype if None).
    """
    pixels = _like(_PIXELS, like)
    return torch.exp(-0.5 * ((pixels - locs.to(pixels).unsqueeze(-1)) / WIDTH) ** 2).sum(-2)


def simulator(signal: torch.Tensor | None = None) -> None:
    """The model: ``n``, then ``loc_0 .. loc_{n-1}``, then the observed ``signal``."""
    like = signal if torch.is_tensor(signal) else None
    prior = prior_n(like)
    n = pyro.sample("n", dist.Categorical(prior))
    uniform = prior.new_zeros(NUM_PIXELS)
    locs = [pyro.sample(f"loc_{i}", dist.Categorical(logits=uniform)) for i in range(int(n))]
    clean = render(torch.stack(locs), like) if locs else torch.zeros_like(uniform)
    pyro.sample("signal", dist.Normal(clean, NOISE).to_event(1), obs=signal)


def simulate(num: int, seed: int) -> list[tuple[torch.Tensor, int, list[int]]]:
    """``num`` triples ``(signal, n, locs)`` drawn by running :func:`simulator` forward."""
    pyro.set_rng_seed(seed)
    out = []
    for _ in range(num):
        trace = pyro.poutine.trace(simulator).get_trace(None)
        n = int(trace.nodes["n"]["value"])
        locs = [int(trace.nodes[f"loc_{i}"]["value"]) for i in range(n)]
        out.append((trace.nodes["signal"]["value"], n, locs))
    return out


class Proposal(nn.Module):
    """
    The amortized guide: an MLP reads the signal and proposes ``n``; a second MLP proposes each
    location in turn from the signal, the residual (the signal minus the bumps already placed),
    ``n`` and the step ``i`` (one-hot). Its sites have the simulator's names.

    :param int hidden: width of the hidden layers.
    :param bool register: the guide registers the module's parameters with Pyro
        (``pyro.module``), which :class:`~pyro.infer.SVI` needs to find them. A loss used as a
        torch module (``loss(simulator, proposal.guide)``, a torch optimizer) finds them
        without it, and a guide run once per particle saves the registration each run costs.
    """

    def __init__(self, hidden: int = 64, register: bool = True):
        super().__init__()
        self.register = register
        self.count = nn.Sequential(
            nn.Linear(NUM_PIXELS, hidden), nn.ReLU(), nn.Linear(hidden, MAX_OBJECTS + 1)
        )
        self.where = nn.Sequential(
            nn.Linear(2 * NUM_PIXELS + 2 * (MAX_OBJECTS + 1), hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, NUM_PIXELS),
        )

    def where_input(self, signal, residual, one_hot_n, i: int) -> torch.Tensor:
        """The input of the location network at step ``i``."""
        step = nn.functional.one_hot(torch.tensor(i), MAX_OBJECTS + 1).to(signal.dtype)
        return torch.cat([signal, residual, one_hot_n, step])

    def guide(self, signal: torch.Tensor) -> None:
        """The guide of :func:`simulator` (same argument, same sites)."""
        if self.register:
            pyro.module("proposal", self)
        n = pyro.sample("n", dist.Categorical(logits=self.count(signal)))
        one_hot_n = nn.functional.one_hot(n, MAX_OBJECTS + 1).to(signal.dtype)
        residual = signal
        for i in range(int(n)):
            logits = self.where(self.where_input(signal, residual, one_hot_n, i))
            loc = pyro.sample(f"loc_{i}", dist.Categorical(logits=logits))
            residual = residual - render(loc.reshape(1), signal)

    @torch.no_grad()
    def prob_n(self, signal: torch.Tensor) -> torch.Tensor:
        """The guide's ``q(n | signal)``."""
        return torch.softmax(self.count(signal), -1)


@torch.no_grad()
def exact_posterior(signal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    ``p(n | signal)`` (``[MAX_OBJECTS + 1]``) and the object density
    ``E[#{i : loc_i = g} | signal]`` at each pixel ``g`` (``[NUM_PIXELS]``), by enumeration.
    """
    log_joint, counts = [], []
    prior = prior_n(signal)
    for n in range(MAX_OBJECTS + 1):
        configs = list(itertools.product(range(NUM_PIXELS), repeat=n))
        locs = torch.tensor(configs, dtype=torch.long).reshape(NUM_PIXELS**n, n)
        clean = render(locs, signal) if n else signal.new_zeros(1, NUM_PIXELS)
        log_lik = dist.Normal(clean, NOISE).log_prob(signal).sum(-1)
        log_joint.append(prior[n].log() - n * math.log(NUM_PIXELS) + log_lik)
        counts.append(
            nn.functional.one_hot(locs, NUM_PIXELS).sum(-2).to(signal.dtype)
            if n
            else signal.new_zeros(1, NUM_PIXELS)
        )
    post = torch.softmax(torch.cat(log_joint), 0)
    sizes = [len(c) for c in counts]
    p_n = torch.stack([p.sum() for p in post.split(sizes)])
    return p_n, post @ torch.cat(counts)
