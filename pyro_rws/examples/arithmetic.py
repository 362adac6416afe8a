# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
A small program-induction model with a sharply peaked discrete posterior, in the spirit of the
string-concept experiments of memoised wake-sleep (Hewitt, Le & Tenenbaum, UAI 2020); used by
``benchmarks/memoised.py``.

Each datapoint is the output of a hidden program on the inputs :math:`i = 1, \dots, M`,
observed with noise. With ``depth=2`` (the default) the program is
:math:`f(i) = (a\ o_1\ i)\ o_2\ b` with :math:`a, b \in \{0, \dots, 9\}` and
:math:`o_1, o_2 \in \{+, -, \times\}` (900 programs); each further level applies one more
operator and digit, :math:`((a\ o_1\ i)\ o_2\ b)\ o_3\ c` for ``depth=3`` (27,000 programs).
:math:`x_i \sim \mathcal N(f(i), 0.5^2)`. The prior (one softmax per site, sites
``o1, a, o2, b, o3, c, ...``) is learned. A datapoint is explained by one program or a few
equivalent ones, and the programs are few enough for :math:`\log p_\theta(x)` to be computed
exactly.
"""

from __future__ import annotations

import functools
import string

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F

OPS = ("+", "-", "*")
NOISE = 0.5


def sites(depth: int = 2) -> tuple[str, ...]:
    """Site names, in sampling order: ``o1, a, o2, b, ...`` (an operator, then its digit)."""
    return tuple(n for k in range(depth) for n in (f"o{k + 1}", string.ascii_lowercase[k]))


def sizes(depth: int = 2) -> tuple[int, ...]:
    return (3, 10) * depth


#: the default (depth-2) model's sites and their sizes
SITES = sites()
SIZES = sizes()


def apply(op, left, right):
    return torch.where(op == 0, left + right, torch.where(op == 1, left - right, left * right))


def evaluate(z: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Outputs of programs ``z`` (shape ``(..., 2 depth)``, columns as :func:`sites`) on
    ``inputs``: shape ``z.shape[:-1] + inputs.shape``."""
    z = z[..., None]
    out = apply(z[..., 0, :], z[..., 1, :].to(inputs.dtype), inputs)
    for k in range(2, z.shape[-2], 2):
        out = apply(z[..., k, :], out, z[..., k + 1, :].to(inputs.dtype))
    return out


def describe(z) -> str:
    z = [int(v) for v in z]
    text = f"{z[1]} {OPS[z[0]]} i"
    for k in range(2, len(z), 2):
        text = f"({text}) {OPS[z[k]]} {z[k + 1]}"
    return text


@functools.lru_cache(maxsize=4)
def programs(depth: int = 2) -> torch.Tensor:
    """Every program, shape ``(900, 4)`` for depth 2, ``(27000, 6)`` for depth 3."""
    g = torch.meshgrid(*(torch.arange(n) for n in sizes(depth)), indexing="ij")
    return torch.stack([t.reshape(-1) for t in g], -1)


#: every program of the default model as (o1, a, o2, b), shape (900, 4)
PROGRAMS = programs()


def inputs(M: int, like: torch.Tensor | None = None) -> torch.Tensor:
    kw = {} if like is None else {"dtype": like.dtype, "device": like.device}
    return torch.arange(1, M + 1, **kw)


def prior_logits(like: torch.Tensor | None = None, depth: int = 2) -> dict:
    kw = {} if like is None else {"dtype": like.dtype, "device": like.device}
    return {
        s: pyro.param(f"{s}_logits", lambda n=n: torch.zeros(n, **kw))
        for s, n in zip(sites(depth), sizes(depth), strict=True)
    }


def model(
    x: torch.Tensor, idx: torch.Tensor | None = None, num_data: int | None = None, depth: int = 2
):
    """The model on a minibatch ``x`` (B, M), rows ``idx`` of a data set of ``num_data``."""
    logits = prior_logits(x, depth)
    with pyro.plate("data", x.shape[-2] if num_data is None else num_data, subsample=idx):
        z = [pyro.sample(s, dist.Categorical(logits=logits[s])) for s in sites(depth)]
        mean = evaluate(torch.stack(z, -1), inputs(x.shape[-1], x))
        pyro.sample("x", dist.Normal(mean, NOISE).to_event(1), obs=x)


class Guide(nn.Module):
    """``q(o1|x) q(a|x,o1) q(o2|x,o1,a) ...``: an MLP encoder, one softmax per site, each given
    the sites before it."""

    def __init__(self, M: int, hidden: int = 64, depth: int = 2):
        super().__init__()
        self.depth = depth
        self.sizes = sizes(depth)
        self.encoder = nn.Sequential(
            nn.Linear(M, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.heads = nn.ModuleList(
            nn.Linear(hidden + sum(self.sizes[:k]), n) for k, n in enumerate(self.sizes)
        )

    def forward(self, x, idx=None, num_data=None, depth=None):
        pyro.module("guide", self)
        h = self.encoder(x / 20.0)
        with pyro.plate("data", x.shape[-2] if num_data is None else num_data, subsample=idx):
            for k, (site, head) in enumerate(zip(sites(self.depth), self.heads, strict=True)):
                v = pyro.sample(site, dist.Categorical(logits=head(h)))
                h = torch.cat(
                    [h.expand(v.shape + h.shape[-1:]), F.one_hot(v, self.sizes[k]).to(h)], -1
                )

    def log_prob(self, x, z):
        """``log q(z | x)`` for ``z`` of shape ``(..., B, 2 depth)`` (columns as sites)."""
        h = self.encoder(x / 20.0)
        total = 0.0
        for k, head in enumerate(self.heads):
            v = z[..., k]
            h = h.expand(v.shape + h.shape[-1:])
            total = total + dist.Categorical(logits=head(h)).log_prob(v)
            h = torch.cat([h, F.one_hot(v, self.sizes[k]).to(h)], -1)
        return total

    def sample(self, x, shape=()):
        """Programs ``shape + (B, 2 depth)`` from the guide (no gradient)."""
        with torch.no_grad():
            h = self.encoder(x / 20.0).expand(tuple(shape) + (x.shape[0], -1))
            z = []
            for k, head in enumerate(self.heads):
                v = dist.Categorical(logits=head(h)).sample()
                z.append(v)
                h = torch.cat([h, F.one_hot(v, self.sizes[k]).to(h)], -1)
        return torch.stack(z, -1)


def log_joint(z, x, logits: dict) -> torch.Tensor:
    """``log p(z, x)`` for programs ``z`` of shape ``(..., 2 depth)`` in plain torch."""
    prior = sum(torch.log_softmax(logits[s], 0)[z[..., k]] for k, s in enumerate(logits))
    mean = evaluate(z, inputs(x.shape[-1], x))
    return prior + dist.Normal(mean, NOISE).log_prob(x).sum(-1)


@torch.no_grad()
def log_marginal(x: torch.Tensor, logits: dict, chunk: int = 4096) -> torch.Tensor:
    """Exact ``log p(x)`` per datapoint (rows of ``x``): a sum over every program, in chunks."""
    every = programs(len(logits) // 2).to(x.device)
    parts = [
        torch.logsumexp(log_joint(every[i : i + chunk, None, :], x, logits), 0)
        for i in range(0, len(every), chunk)
    ]
    return torch.logsumexp(torch.stack(parts), 0)


def true_logits(depth: int = 2) -> dict:
    """A peaked prior: mostly + and small digits, rarely two multiplications."""
    digits = torch.arange(10.0)
    logits = {
        "o1": torch.tensor([2.0, 0.0, 3.0]),
        "a": -0.6 * digits,
        "o2": torch.tensor([4.0, 2.0, -2.0]),
        "b": -0.4 * digits,
    }
    for k in range(2, depth):  # deeper levels: mostly + and -, digits a little flatter
        logits[f"o{k + 1}"] = torch.tensor([3.0, 2.0, -1.0])
        logits[string.ascii_lowercase[k]] = -0.3 * digits
    return logits


def simulate(num: int, M: int, logits: dict, seed: int = 0):
    """``(x, z)``: ``num`` datapoints of ``M`` outputs, and their programs."""
    g = torch.Generator().manual_seed(seed)
    z = torch.stack(
        [torch.multinomial(torch.softmax(logits[s], 0), num, True, generator=g) for s in logits],
        -1,
    )
    mean = evaluate(z, inputs(M))
    return mean + NOISE * torch.randn(mean.shape, generator=g), z
