# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Helpers of the program tests: hand computations of weights, bounds and effective sample sizes
from the particles a recording guide drew, and a few SVI steps.
"""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI
from pyro.optim import Adam

X4 = (0.5, -1.0, 2.0, 0.1)


def lme(log_w):
    """log mean exp over the particle dim 0."""
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def ess(log_w):
    return torch.softmax(log_w, 0).square().sum(0).reciprocal()


def train(loss, model, guide, *args, steps=3, **kwargs):
    svi = SVI(model, guide, Adam({"lr": 0.01}), loss=loss)
    values = [svi.step(*args, **kwargs) for _ in range(steps)]
    assert all(math.isfinite(v) for v in values), values
    return values


def wake_particles(record, vectorize, K):
    """The guide's wake samples as ``(K, ...)``, from a list filled by a recording guide."""
    out = record[0] if vectorize else torch.stack(record)
    assert len(record) == (1 if vectorize else K) and out.shape[0] == K
    return out


def make_guide(record, scale=0.9):
    def guide(x, *args, **kwargs):
        a = pyro.param("a", torch.tensor(0.4))
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(a * x, scale))
        record.append(z.detach())

    return guide


def log_q_of(z, x, scale=0.9):
    return dist.Normal(0.4 * x, scale).log_prob(z)


def run_and_record(loss, model, x, *args, vectorize=True):
    """One loss evaluation; returns the value and the wake particles (K, N)."""
    record = []
    value = loss.loss(model, make_guide(record), x, *args)
    K = loss.num_particles
    return value, wake_particles(record[-(1 if vectorize else K) :], vectorize, K)
