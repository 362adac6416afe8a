# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
A conjugate model and guide shared by the contract tests, with helpers for parameter leaves.

Model: z_n ~ N(theta, 1), x_n ~ N(z_n, 1); guide q(z_n | x_n) = N(a x_n + b, s).
"""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints

DATA = (0.3, -1.2, 2.0, 0.7)


def data(dtype=None):
    return torch.tensor(DATA, dtype=dtype)


def model(x):
    theta = pyro.param("theta", torch.tensor(0.2, dtype=x.dtype))
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(theta, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x, *args, extra_site=None):
    """
    Broadcasts over leading dims of x (x.shape[-1]), as vectorized sleep particles need.
    Ignores further arguments of the model; samples ``extra_site`` too if given.
    """
    a = pyro.param("a", torch.tensor(0.3, dtype=x.dtype))
    b = pyro.param("b", torch.tensor(-0.1, dtype=x.dtype))
    s = pyro.param("s", torch.tensor(0.9, dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Normal(a * x + b, s))
        if extra_site is not None:
            pyro.sample(extra_site, dist.Normal(0.0, 1.0))


def recording_guide(record):
    """``guide``, appending ``(x, z)`` of each of its runs to ``record`` (z detached)."""

    def recording(x, *args):
        with poutine.trace() as tracer:
            guide(x)
        record.append((x, tracer.trace.nodes["z"]["value"].detach()))

    return recording


def exact_guide(x):
    """The exact posterior of ``model`` at theta = 0: N(x/2, 1/sqrt 2)."""
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))


def fixed_model(x):
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def log_evidence(x):
    """log p(x_n) of ``fixed_model``: x_n ~ N(0, sqrt 2)."""
    return dist.Normal(0.0, 2.0**0.5).log_prob(x)


def leaves():
    """Unconstrained parameter leaves, by name."""
    return dict(pyro.get_param_store().named_parameters())


def grads_of(params):
    return {k: None if p.grad is None else p.grad.clone() for k, p in params.items()}


def zero_grads(params):
    for p in params.values():
        p.grad = None
