# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
A small Gaussian-process kernel-structure model: the kind of model memoised wake-sleep is for (a
smaller cousin of the time-series model of Le et al., ICLR 2022), used by
``benchmarks/memoised.py`` and tutorial 9.

Each datapoint is a time series :math:`x \in \mathbb{R}^T` on :math:`t \in [0, 1]`. Its discrete
latent :math:`d` is one of :data:`NUM_STRUCTURES` kernel expressions
:math:`((k_1\ o_1\ k_2)\ o_2\ k_3)` of one to three base kernels (squared exponential,
periodic, linear, constant) joined by :math:`+` or :math:`\times`; its continuous latent
:math:`c \in \mathbb{R}^3` holds one raw hyperparameter per slot (lengthscale, period, slope or
level). The model:

.. math::

    d \sim \mathrm{Categorical}(\mathrm{softmax}(\alpha)), \quad
    c_i \sim \mathcal{N}(\mu_{\tau_i(d)}, \sigma_{\tau_i(d)}^2), \quad
    x \sim \mathcal{N}(0, K_{d,c}(t, t) + s^2 I),

with :math:`\tau_i(d)` the base kernel type in slot :math:`i` (type 4: an empty slot) and
:math:`\theta = (\alpha, \mu, \log\sigma)` learned. With a small noise :math:`s` the posterior
over :math:`d` is sharply peaked: a few of the 292 expressions explain a series.
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F

BASE = ("SE", "Per", "Lin", "Const")
NONE = len(BASE)  # the type of an empty slot
OPS = ("+", "*")


def _structures():
    out = [(k, NONE, NONE, 2, 2) for k in range(NONE)]
    for k1, o1, k2 in itertools.product(range(NONE), range(2), range(NONE)):
        out.append((k1, k2, NONE, o1, 2))
    for k1, o1, k2, o2, k3 in itertools.product(
        range(NONE), range(2), range(NONE), range(2), range(NONE)
    ):
        out.append((k1, k2, k3, o1, o2))
    return torch.tensor(out)


#: per structure: the base kernel type of the three slots and the two operators (2: none)
STRUCTURES = _structures()
NUM_STRUCTURES = len(STRUCTURES)
NOISE = 0.1


def describe(d: int) -> str:
    """The kernel expression of structure ``d``, e.g. ``"(SE + Per) * Lin"``."""
    k1, k2, k3, o1, o2 = STRUCTURES[d].tolist()
    text = BASE[k1]
    if k2 != NONE:
        text = f"{text} {OPS[o1]} {BASE[k2]}"
    if k3 != NONE:
        text = f"({text}) {OPS[o2]} {BASE[k3]}"
    return text


def times(T: int, like: torch.Tensor | None = None) -> torch.Tensor:
    kw = {} if like is None else {"dtype": like.dtype, "device": like.device}
    return torch.linspace(0.0, 1.0, T, **kw)


def covariance(d: torch.Tensor, c: torch.Tensor, T: int) -> torch.Tensor:
    """The covariance ``K_{d,c}(t, t) + NOISE^2 I`` of shape ``d.shape + (T, T)``."""
    shape = torch.broadcast_shapes(d.shape, c.shape[:-1])
    d, c = d.expand(shape), c.expand(shape + c.shape[-1:])
    t = times(T, c)
    diff = t[:, None] - t[None, :]
    prod = (t[:, None] - 0.5) * (t[None, :] - 0.5)
    table = STRUCTURES.to(d.device)[d]  # d.shape + (5,)
    kernel = None
    for slot in range(3):
        raw = c[..., slot, None, None]
        base = torch.stack(
            [
                torch.exp(-0.5 * diff.square() / (0.05 + 0.5 * torch.sigmoid(raw)).square()),
                torch.exp(
                    -2.0
                    * torch.sin(math.pi * diff.abs() / (0.1 + 0.4 * torch.sigmoid(raw))).square()
                    / 0.25
                ),
                4.0 * F.softplus(raw) * prod,
                F.softplus(raw) * torch.ones_like(diff),
                torch.zeros_like(diff).expand(raw.shape[:-2] + diff.shape),
            ],
            -3,
        )  # d.shape + (5, T, T)
        index = table[..., slot, None, None, None].expand(d.shape + (1, T, T))
        k = base.gather(-3, index).squeeze(-3)
        if kernel is None:
            kernel = k
        else:
            op = table[..., 3 + slot - 1, None, None]
            kernel = torch.where(op == 0, kernel + k, torch.where(op == 1, kernel * k, kernel))
    eye = torch.eye(T, dtype=c.dtype, device=c.device)
    return kernel + (NOISE**2 + 1e-5) * eye


def prior_params(like: torch.Tensor | None = None) -> dict:
    """The model's parameters, made on first use: uniform prior, broad hyperparameter priors."""
    kw = {} if like is None else {"dtype": like.dtype, "device": like.device}
    return {
        "alpha": pyro.param("alpha", lambda: torch.zeros(NUM_STRUCTURES, **kw)),
        "mu": pyro.param("mu", lambda: torch.zeros(NONE + 1, **kw)),
        "log_sigma": pyro.param("log_sigma", lambda: torch.zeros(NONE + 1, **kw)),
    }


def continuous_prior(d: torch.Tensor, p: dict) -> dist.Distribution:
    types = STRUCTURES.to(d.device)[d][..., :3]
    return dist.Normal(p["mu"][types], p["log_sigma"][types].exp()).to_event(1)


def log_joint(d, c, x, p: dict) -> torch.Tensor:
    """``log p(d, c, x)`` in plain torch (for code outside Pyro, e.g. the hmws losses)."""
    return (
        dist.Categorical(logits=p["alpha"]).log_prob(d)
        + continuous_prior(d, p).log_prob(c)
        + dist.MultivariateNormal(torch.zeros_like(x), covariance(d, c, x.shape[-1])).log_prob(x)
    )


def model(x: torch.Tensor, idx: torch.Tensor | None = None, num_data: int | None = None):
    """The model on a minibatch ``x`` (B, T), rows ``idx`` of a data set of ``num_data``."""
    p = prior_params(x)
    with pyro.plate("data", x.shape[-2] if num_data is None else num_data, subsample=idx):
        d = pyro.sample("d", dist.Categorical(logits=p["alpha"]))
        c = pyro.sample("c", continuous_prior(d, p))
        cov = covariance(d, c, x.shape[-1])
        pyro.sample("x", dist.MultivariateNormal(torch.zeros_like(cov[..., 0]), cov), obs=x)


class Guide(nn.Module):
    """``q(d | x) q(c | d, x)``: an MLP encoder, a softmax over structures, a Normal for c."""

    def __init__(self, T: int, hidden: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(T, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.structure = nn.Linear(hidden, NUM_STRUCTURES)
        self.embed = nn.Embedding(NUM_STRUCTURES, 16)
        self.continuous = nn.Sequential(
            nn.Linear(hidden + 16, hidden), nn.Tanh(), nn.Linear(hidden, 6)
        )

    def discrete_dist(self, x):
        return dist.Categorical(logits=self.structure(torch.tanh(self.encoder(x))))

    def continuous_dist(self, x, d):
        h = torch.tanh(self.encoder(x))
        h = h.expand(d.shape + h.shape[-1:])
        out = self.continuous(torch.cat([h, self.embed(d)], -1))
        return dist.Normal(out[..., :3], F.softplus(out[..., 3:]) + 1e-3).to_event(1)

    def forward(self, x, idx=None, num_data=None):
        pyro.module("guide", self)
        with pyro.plate("data", x.shape[-2] if num_data is None else num_data, subsample=idx):
            d = pyro.sample("d", self.discrete_dist(x))
            pyro.sample("c", self.continuous_dist(x, d))


def true_params(seed: int = 0, like: torch.Tensor | None = None) -> dict:
    """A peaked structure prior and tight hyperparameter priors, to simulate data from."""
    g = torch.Generator().manual_seed(seed)
    alpha = torch.full((NUM_STRUCTURES,), -4.0)
    favoured = torch.randperm(NUM_STRUCTURES, generator=g)[:8]
    alpha[favoured] = 2.0 * torch.rand(8, generator=g)
    out = {
        "alpha": alpha,
        "mu": torch.tensor([-1.0, 0.5, 0.0, -0.5, 0.0]),
        "log_sigma": torch.full((NONE + 1,), math.log(0.3)),
    }
    kw = {} if like is None else {"dtype": like.dtype, "device": like.device}
    return {k: v.to(**kw) for k, v in out.items()}


def simulate(num: int, T: int, p: dict, seed: int = 0):
    """``(x, d)``: ``num`` series of length ``T`` from the model with parameters ``p``."""
    g = torch.Generator().manual_seed(seed)
    d = torch.multinomial(torch.softmax(p["alpha"], 0), num, replacement=True, generator=g)
    prior = continuous_prior(d, p).base_dist
    c = prior.loc + prior.scale * torch.randn(prior.loc.shape, generator=g, dtype=prior.loc.dtype)
    chol = torch.linalg.cholesky(covariance(d, c, T))
    z = torch.randn(num, T, 1, generator=g, dtype=chol.dtype)
    return (chol @ z).squeeze(-1), d


@torch.no_grad()
def log_marginal(x: torch.Tensor, p: dict, num_samples: int = 64, chunk: int = 16) -> torch.Tensor:
    """
    ``log p(x)`` per series (rows of ``x``): the sum over every structure exactly, the
    hyperparameters by importance sampling from their prior (``num_samples`` draws; guide-free,
    so it scores models trained by different methods alike; a slight underestimate for finite
    draws). Each (draw, structure) covariance is factorized once for all series.
    """
    T = x.shape[-1]
    d = torch.arange(NUM_STRUCTURES, device=x.device)
    c = continuous_prior(d, p).sample((num_samples,))  # (J, S, 3)
    chol = torch.linalg.cholesky(covariance(d.expand(num_samples, -1), c, T))  # (J, S, T, T)
    eye = torch.eye(T, dtype=x.dtype, device=x.device)
    inverse = torch.linalg.solve_triangular(chol, eye, upper=False)  # L^{-1}
    half_log_det = chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (J, S)
    log_pd = torch.log_softmax(p["alpha"], 0)
    out = []
    for x_chunk in x.split(chunk):
        z = torch.einsum("jsab,nb->njsa", inverse, x_chunk)
        log_lik = -0.5 * z.square().sum(-1) - half_log_det - 0.5 * T * math.log(2 * math.pi)
        log_pdx = torch.logsumexp(log_lik, 1) - math.log(num_samples) + log_pd  # (n, S)
        out.append(torch.logsumexp(log_pdx, -1))
    return torch.cat(out)
