# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
A model with stochastic control flow for the automatic-proposal tests: k coins
(k ~ Categorical), x a noisy count of heads; and its latent configurations, enumerated.
"""

import math

import pyro
import pyro.distributions as dist
import torch

PRIOR_K = (0.5, 0.3, 0.2)
EMIT = ((0.8, 0.15, 0.05), (0.15, 0.7, 0.15), (0.05, 0.15, 0.8))  # p(x | heads)


def coins(x):
    k = pyro.sample("k", dist.Categorical(torch.tensor(PRIOR_K)))
    heads = 0
    for i in range(int(k)):
        heads = heads + int(pyro.sample(f"c_{i}", dist.Bernoulli(torch.tensor(0.6))))
    pyro.sample("x", dist.Categorical(torch.tensor(EMIT[heads])), obs=x)


def coin_traces():
    """Every latent configuration ``{site: value}`` of ``coins``, its prior probability and
    its number of heads."""
    out = []
    for k in range(3):
        for flips in range(2**k):
            bits = [(flips >> i) & 1 for i in range(k)]
            values = {"k": torch.tensor(k)} | {
                f"c_{i}": torch.tensor(float(b)) for i, b in enumerate(bits)
            }
            prior = PRIOR_K[k] * math.prod(0.6 if b else 0.4 for b in bits)
            out.append((values, prior, sum(bits)))
    return out
