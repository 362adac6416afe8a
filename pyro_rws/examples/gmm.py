# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The Gaussian mixture of Le, Kosiorek, Siddharth, Teh & Wood, "Revisiting Reweighted Wake-Sleep"
(UAI 2019), section 5.1.

Twenty clusters with means ``10 c`` (c = 0..19) and standard deviation 5; prior over clusters
``softmax(0.5 theta)``, learned; true mixture weights proportional to ``c + 5``. The guide is an
MLP 1-16-16-20 with tanh. Every step draws a fresh batch from the true model. Model quality is
``||softmax(0.5 theta) - pi_true||_2``; inference quality the mean over fixed test points of
``||q(.|x) - p_true(.|x)||_2``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

NUM_CLUSTERS = 20
STD = 5.0


def true_weights(dtype=torch.float32, device=None) -> torch.Tensor:
    c = torch.arange(NUM_CLUSTERS, dtype=dtype, device=device)
    return (c + 5) / (c + 5).sum()


def cluster_means(like: torch.Tensor) -> torch.Tensor:
    return 10.0 * torch.arange(NUM_CLUSTERS, dtype=like.dtype, device=like.device)


def sample_data(num: int, generator: torch.Generator | None = None, dtype=torch.float32):
    """``num`` points from the true mixture."""
    pi = true_weights(dtype)
    c = torch.multinomial(pi, num, replacement=True, generator=generator)
    noise = torch.randn(num, generator=generator, dtype=dtype)
    return 10.0 * c.to(dtype) + STD * noise


def _log_joint(x: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """``log pi_c + log Normal(x | 10 c, 5)`` for each point and cluster, shape ``(len(x), 20)``."""
    z = (x.unsqueeze(-1) - cluster_means(x)) / STD
    return log_weights - 0.5 * z**2 - math.log(STD * math.sqrt(2 * math.pi))


@torch.no_grad()
def log_likelihood(x: torch.Tensor, log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """
    Exact ``log p(x)`` of each point under the mixture with log-weights ``log_weights`` (the
    true ones by default; ``torch.log_softmax(0.5 * gmm.theta, -1)`` for a learned model).
    """
    if log_weights is None:
        log_weights = true_weights(x.dtype, x.device).log()
    return torch.logsumexp(_log_joint(x, log_weights.to(x)), -1)


def true_posterior(x: torch.Tensor) -> torch.Tensor:
    """``p_true(c | x)`` for each point, shape ``(len(x), 20)``."""
    return torch.softmax(_log_joint(x, true_weights(x.dtype, x.device).log()), -1)


class GMM(nn.Module):
    """
    Model and guide as one module: ``prior`` holds theta (model parameters), ``encoder`` the
    guide network. ``init="paper"`` starts theta at [38, 36, ..., 0] as the paper's code does
    (nearly all prior mass on cluster 0); ``init="uniform"`` at theta = 1.
    """

    def __init__(self, init: str = "paper"):
        super().__init__()
        if init == "paper":
            theta = torch.arange(NUM_CLUSTERS - 1, -1, -1, dtype=torch.float32) * 2.0
        elif init == "uniform":
            theta = torch.ones(NUM_CLUSTERS)
        else:
            raise ValueError(f"init must be 'paper' or 'uniform', got {init!r}")
        self.prior = nn.ParameterDict({"theta": nn.Parameter(theta)})
        self.encoder = nn.Sequential(
            nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, NUM_CLUSTERS)
        )

    @property
    def theta(self) -> torch.Tensor:
        return self.prior["theta"]

    def model(self, x: torch.Tensor) -> None:
        pyro.module("gmm_prior", self.prior)
        with pyro.plate("data", x.shape[-1]):
            c = pyro.sample("c", dist.Categorical(logits=0.5 * self.theta))
            pyro.sample("x", dist.Normal(10.0 * c.to(x.dtype), STD), obs=x)

    def guide_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.unsqueeze(-1))

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("gmm_encoder", self.encoder)
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("c", dist.Categorical(logits=self.guide_logits(x)))

    @torch.no_grad()
    def model_error(self) -> float:
        pi = torch.softmax(0.5 * self.theta, -1)
        return float((pi - true_weights(pi.dtype, pi.device)).norm())

    @torch.no_grad()
    def inference_error(self, x_test: torch.Tensor) -> float:
        q = torch.softmax(self.guide_logits(x_test), -1)
        return float((q - true_posterior(x_test)).norm(dim=-1).mean())
