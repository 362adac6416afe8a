# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
A small program-induction model with a sharply peaked discrete posterior, in the spirit of the
string-concept experiments of memoised wake-sleep (Hewitt, Le & Tenenbaum, UAI 2020); used by
``benchmarks/memoised.py``.

Each datapoint is the output of a hidden program :math:`f(i) = (a\ o_1\ i)\ o_2\ b` on the
inputs :math:`i = 1, \dots, M`, observed with noise: :math:`a, b \in \{0, \dots, 9\}`,
:math:`o_1, o_2 \in \{+, -, \times\}` (900 programs), and
:math:`x_i \sim \mathcal N(f(i), 0.5^2)`. The prior
:math:`p_\theta(o_1)\,p_\theta(a)\,p_\theta(o_2)\,p_\theta(b)` (four softmaxes) is learned. A
datapoint is explained by one program or a few equivalent ones, and 900 programs are few enough
for :math:`\log p_\theta(x)` to be computed exactly.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F

OPS = ("+", "-", "*")
SITES = ("o1", "a", "o2", "b")
SIZES = (3, 10, 3, 10)
NOISE = 0.5


def apply(op, left, right):
    return torch.where(op == 0, left + right, torch.where(op == 1, left - right, left * right))


def evaluate(o1, a, o2, b, inputs):
    """Outputs of the programs on ``inputs``: shape ``o1.shape + inputs.shape``."""
    i = inputs
    first = apply(o1[..., None], a[..., None].to(i.dtype), i)
    return apply(o2[..., None], first, b[..., None].to(i.dtype))


def describe(o1: int, a: int, o2: int, b: int) -> str:
    return f"({a} {OPS[o1]} i) {OPS[o2]} {b}"


def _grid():
    g = torch.meshgrid(*(torch.arange(n) for n in SIZES), indexing="ij")
    return torch.stack([t.reshape(-1) for t in g], -1)


#: every program as (o1, a, o2, b), shape (900, 4)
PROGRAMS = _grid()


def inputs(M: int, like: torch.Tensor | None = None) -> torch.Tensor:
    kw = {} if like is None else {"dtype": like.dtype, "device": like.device}
    return torch.arange(1, M + 1, **kw)


def prior_logits(like: torch.Tensor | None = None) -> dict:
    kw = {} if like is None else {"dtype": like.dtype, "device": like.device}
    return {
        s: pyro.param(f"{s}_logits", lambda n=n: torch.zeros(n, **kw))
        for s, n in zip(SITES, SIZES, strict=True)
    }


def model(x: torch.Tensor, idx: torch.Tensor | None = None, num_data: int | None = None):
    """The model on a minibatch ``x`` (B, M), rows ``idx`` of a data set of ``num_data``."""
    logits = prior_logits(x)
    with pyro.plate("data", x.shape[-2] if num_data is None else num_data, subsample=idx):
        z = [pyro.sample(s, dist.Categorical(logits=logits[s])) for s in SITES]
        mean = evaluate(*z, inputs(x.shape[-1], x))
        pyro.sample("x", dist.Normal(mean, NOISE).to_event(1), obs=x)


class Guide(nn.Module):
    """``q(o1|x) q(a|x,o1) q(o2|x,o1,a) q(b|x,o1,a,o2)``: an MLP encoder, one softmax per site."""

    def __init__(self, M: int, hidden: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(M, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.heads = nn.ModuleList(
            nn.Linear(hidden + sum(SIZES[:k]), n) for k, n in enumerate(SIZES)
        )

    def forward(self, x, idx=None, num_data=None):
        pyro.module("guide", self)
        h = self.encoder(x / 20.0)
        with pyro.plate("data", x.shape[-2] if num_data is None else num_data, subsample=idx):
            for k, (site, head) in enumerate(zip(SITES, self.heads, strict=True)):
                v = pyro.sample(site, dist.Categorical(logits=head(h)))
                h = torch.cat([h.expand(v.shape + h.shape[-1:]), F.one_hot(v, SIZES[k]).to(h)], -1)

    def log_prob(self, x, z):
        """``log q(z | x)`` for ``z`` of shape ``(..., B, 4)`` (columns o1, a, o2, b)."""
        h = self.encoder(x / 20.0)
        total = 0.0
        for k, head in enumerate(self.heads):
            v = z[..., k]
            h = h.expand(v.shape + h.shape[-1:])
            total = total + dist.Categorical(logits=head(h)).log_prob(v)
            h = torch.cat([h, F.one_hot(v, SIZES[k]).to(h)], -1)
        return total

    def sample(self, x, shape=()):
        """Programs ``shape + (B, 4)`` from the guide (no gradient)."""
        with torch.no_grad():
            h = self.encoder(x / 20.0).expand(tuple(shape) + (x.shape[0], -1))
            z = []
            for k, head in enumerate(self.heads):
                v = dist.Categorical(logits=head(h)).sample()
                z.append(v)
                h = torch.cat([h, F.one_hot(v, SIZES[k]).to(h)], -1)
        return torch.stack(z, -1)


def log_joint(z, x, logits: dict) -> torch.Tensor:
    """``log p(z, x)`` for programs ``z`` of shape ``(..., 4)`` in plain torch."""
    prior = sum(torch.log_softmax(logits[s], 0)[z[..., k]] for k, s in enumerate(SITES))
    mean = evaluate(*z.unbind(-1), inputs(x.shape[-1], x))
    return prior + dist.Normal(mean, NOISE).log_prob(x).sum(-1)


@torch.no_grad()
def log_marginal(x: torch.Tensor, logits: dict) -> torch.Tensor:
    """Exact ``log p(x)`` per datapoint (rows of ``x``): a sum over the 900 programs."""
    programs = PROGRAMS.to(x.device)
    return torch.logsumexp(log_joint(programs[:, None, :], x, logits), 0)


def true_logits() -> dict:
    """A peaked prior: mostly + and small digits, rarely two multiplications."""
    digits = torch.arange(10.0)
    return {
        "o1": torch.tensor([2.0, 0.0, 3.0]),
        "a": -0.6 * digits,
        "o2": torch.tensor([4.0, 2.0, -2.0]),
        "b": -0.4 * digits,
    }


def simulate(num: int, M: int, logits: dict, seed: int = 0):
    """``(x, z)``: ``num`` datapoints of ``M`` outputs, and their programs."""
    g = torch.Generator().manual_seed(seed)
    z = torch.stack(
        [torch.multinomial(torch.softmax(logits[s], 0), num, True, generator=g) for s in SITES], -1
    )
    mean = evaluate(*z.unbind(-1), inputs(M))
    return mean + NOISE * torch.randn(mean.shape, generator=g), z
