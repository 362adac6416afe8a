# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
A small discrete model whose every expectation can be enumerated, and tools to do it.

Model: for each datapoint, ``z ~ Categorical(softmax(prior))`` over C = 3 values and
``x ~ Bernoulli(sigmoid(emit[z]))`` observed. Guide: an amortized table,
``q(z | x) = Categorical(softmax(table[x]))``. ``prior`` and ``emit`` are model parameters,
``table`` the guide's.

The library's estimator is run with the guide's draws *fixed* to each possible K-tuple (by
replaying a trace that holds them) and the fantasies of the sleep phase fixed to each possible
``(x, z)`` (by an outermost handler), so the expectation of the library's gradient is a finite
weighted sum, computed to rounding error. The exact targets are written independently below in
plain torch, from probability tables.
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import config_enumerate
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace

C = 3
THETA = ("prior", "emit")
PHI = ("table",)


def init_params(dtype=torch.float64):
    pyro.param("prior", torch.tensor([0.3, -0.4, 0.2], dtype=dtype))
    pyro.param("emit", torch.tensor([-1.2, 0.4, 1.6], dtype=dtype))
    pyro.param("table", torch.tensor([[0.5, -0.3, 0.1], [-0.6, 0.2, 0.7]], dtype=dtype))


def model(x):
    prior, emit = pyro.param("prior"), pyro.param("emit")
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(logits=prior))
        pyro.sample("x", dist.Bernoulli(logits=emit[z]), obs=x)


def guide(x):
    table = pyro.param("table")
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Categorical(logits=table[x.long()]))


def params(names):
    return [pyro.param(n).unconstrained() for n in names]


# ------------------------------------------------------------------------------------------
# exact tables, in plain torch
# ------------------------------------------------------------------------------------------
def log_joint_table():
    """``log p(x, z)`` as a (2, C) table indexed [x, z]."""
    prior, emit = pyro.param("prior"), pyro.param("emit")
    log_pz = torch.log_softmax(prior, -1)
    log_px1 = torch.nn.functional.logsigmoid(emit)
    log_px0 = torch.nn.functional.logsigmoid(-emit)
    return torch.stack([log_pz + log_px0, log_pz + log_px1])


def log_guide_table():
    """``log q(z | x)`` as a (2, C) table indexed [x, z]."""
    return torch.log_softmax(pyro.param("table"), -1)


def tuples(K):
    """All K-tuples of latent values, as a (C**K, K) long tensor."""
    return torch.tensor(list(itertools.product(range(C), repeat=K)))


def iwae(x: int, K: int, detach_q=False):
    """Exact E_q[log (1/K) sum_k p(x, z_k) / q(z_k | x)] for one datapoint, by enumeration."""
    lp, lq = log_joint_table()[x], log_guide_table()[x]
    if detach_q:
        lq = lq.detach()
    zs = tuples(K)
    log_w = lp[zs] - lq[zs]  # (C**K, K)
    prob = lq[zs].sum(-1).exp()
    return (prob * (torch.logsumexp(log_w, -1) - math.log(K))).sum()


# ------------------------------------------------------------------------------------------
# running the library on fixed draws
# ------------------------------------------------------------------------------------------
def fixed_trace(**values) -> Trace:
    trace = Trace()
    for name, value in values.items():
        trace.add_node(name, type="sample", is_observed=False, value=value, infer={})
    return trace


def fixed_draws(fn, draws: dict, vectorized=True, **shared):
    """
    ``fn`` with its sites fixed: ``draws`` maps site names to values with K particles along
    dim 0, given all at once (vectorized) or particle k at the k-th call, cycling (a sleep phase
    may call the guide again); ``shared`` maps site names to values every call gets (e.g. the
    indices of a subsampled plate).
    """
    if vectorized:
        return poutine.replay(fn, trace=fixed_trace(**draws, **shared))
    K = len(next(iter(draws.values())))
    calls = itertools.cycle(range(K))

    def one_at_a_time(*args, **kwargs):
        k = next(calls)
        trace = fixed_trace(**{name: value[k] for name, value in draws.items()}, **shared)
        return poutine.replay(fn, trace=trace)(*args, **kwargs)

    return one_at_a_time


def with_draws(guide_fn, draws: torch.Tensor, vectorized=True):
    """``guide_fn`` with its site "z" fixed: all K particles at once, or one per call."""
    return fixed_draws(guide_fn, {"z": draws}, vectorized)


def all_draws(K: int, N: int, num_values: int, log_q):
    """
    Every (K, N) draw of a site with values ``0 .. num_values - 1`` (K particles, N
    datapoints), with its probability under the guide; ``log_q(z)`` gives the (K, N) guide
    log-densities of a draw ``z``.
    """
    for flat in itertools.product(range(num_values), repeat=K * N):
        z = torch.tensor(flat).reshape(K, N)
        yield z, log_q(z).sum().exp().detach()


class FixFantasies(Messenger):
    """Outermost handler: gives sample sites that nothing else decided the values in ``values``."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg):
        if msg["name"] in self.values and not msg["done"] and not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]
            msg["done"] = True


def joint_draws(x: torch.Tensor, K: int):
    """All (K, N) draws of z for the batch ``x``, with their probabilities under the guide."""
    lq = log_guide_table()
    yield from all_draws(K, len(x), C, lambda z: lq[x.long().expand(z.shape), z])


def expected_grad(loss, x, K, names, vectorized=True):
    """Exact expectation over the guide's draws of the library's gradient wrt ``names``."""
    total = 0.0
    for z, prob in joint_draws(x, K):
        value = loss.differentiable_loss(model, with_draws(guide, z, vectorized), x)
        total = total + prob * value
    return torch.autograd.grad(total, params(names)), total.detach()


# ------------------------------------------------------------------------------------------
# exact targets shared by the estimators' exact tests (test_rws, test_wake_sleep, ...)
# ------------------------------------------------------------------------------------------
X = torch.tensor([0.0, 1.0], dtype=torch.float64)


def assert_close(actual, expected, tol=1e-10):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


def exact_wake_theta_grad(K):
    """-grad_theta sum_n E[IWAE_K(x_n)], with q held fixed: the expected wake-theta gradient."""
    target = -sum(iwae(int(x), K, detach_q=True) for x in X)
    return torch.autograd.grad(target, params(THETA)), target.detach()


def exact_wake_phi_grad(K, data=X):
    """E over K-tuples, per datapoint, of -sum_k sg(wbar_k) grad_phi log q(z_k | x)."""
    lp, lq = log_joint_table().detach(), log_guide_table()
    total = 0.0
    for x in data.long():
        zs = tuples(K)
        log_q = lq[x][zs]  # (C**K, K), with graph to phi
        log_w = lp[x][zs] - log_q.detach()
        prob = log_q.detach().sum(-1).exp()
        wbar = torch.softmax(log_w, -1)
        total = total + (prob * -(wbar * log_q).sum(-1)).sum()
    return torch.autograd.grad(total, params(PHI))


def exact_sleep_phi_grad(num_data):
    """-num_data * sum_{x,z} p(x, z) grad_phi log q(z | x): each datapoint makes one fantasy."""
    log_p = log_joint_table().detach()
    total = -num_data * (log_p.exp() * log_guide_table()).sum()
    return torch.autograd.grad(total, params(PHI))


def exact_joint_theta_grad(K):
    """What an estimator with ONE weight per batch (log w_k = sum_n log w_kn) has in expectation."""
    lp, lq = log_joint_table(), log_guide_table().detach()
    total = 0.0
    for z, prob in joint_draws(X, K):
        log_w = (lp[X.long(), z] - lq[X.long(), z]).sum(-1)  # (K,)
        total = total - prob * (torch.logsumexp(log_w, 0) - torch.log(torch.tensor(float(K))))
    return torch.autograd.grad(total, params(THETA))


# ------------------------------------------------------------------------------------------
# subsampling: the average minibatch estimate equals the full-data expectation
# ------------------------------------------------------------------------------------------
X4 = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)


def model_sub(x, batch):
    prior, emit = pyro.param("prior"), pyro.param("emit")
    with pyro.plate("data", len(x), subsample_size=batch) as idx:
        z = pyro.sample("z", dist.Categorical(logits=prior))
        pyro.sample("x", dist.Bernoulli(logits=emit[z]), obs=x[idx])


def guide_sub(x, batch):
    table = pyro.param("table")
    with pyro.plate("data", len(x), subsample_size=batch) as idx:
        pyro.sample("z", dist.Categorical(logits=table[x[idx].long()]))


# ------------------------------------------------------------------------------------------
# a latent sampled by the guide whose model distribution depends on an enumerated site
# (issue 18; its exact tests are in test_enum_parents.py)
# ------------------------------------------------------------------------------------------
def init_parent_params(dtype=torch.float64):
    pyro.param("c", torch.tensor(0.3, dtype=dtype))
    pyro.param("uv", torch.tensor([-0.2, 1.1], dtype=dtype))
    pyro.param("w", torch.tensor([0.1, 1.5, -0.8], dtype=dtype))
    pyro.param("f", torch.tensor([0.2, 0.7], dtype=dtype))


def make_model(where: str, kind: str = "normal", subsample_size=None):
    """
    ``g ~ Bernoulli(sigmoid(c))`` enumerated, ``where`` = "global" (outside the data plate) or
    "local" (inside it); per datapoint ``z ~ Bernoulli(sigmoid(u + v g))`` and ``x ~ Normal(w0 +
    w1 z + w2 g, 1)`` observed (``kind="bernoulli"``: ``x ~ Bernoulli(sigmoid(...))``).
    """

    @config_enumerate
    def model(x):
        c, (u, v), w = pyro.param("c"), pyro.param("uv"), pyro.param("w")
        if where == "global":
            g = pyro.sample("g", dist.Bernoulli(logits=c))
        with pyro.plate("data", x.shape[-1], subsample_size=subsample_size) as idx:
            if where == "local":
                g = pyro.sample("g", dist.Bernoulli(logits=c))
            z = pyro.sample("z", dist.Bernoulli(logits=u + v * g))
            loc = w[0] + w[1] * z + w[2] * g
            obs = x if subsample_size is None else x[..., idx]
            emission = dist.Normal(loc, 1.0) if kind == "normal" else dist.Bernoulli(logits=loc)
            pyro.sample("x", emission, obs=obs)

    return model


def make_guide(subsample_size=None):
    """``q(z | x) = Bernoulli(sigmoid(f0 + f1 x))`` per datapoint."""

    def guide(x):
        f = pyro.param("f")
        with pyro.plate("data", x.shape[-1], subsample_size=subsample_size) as idx:
            x = x if subsample_size is None else x[..., idx]
            pyro.sample("z", dist.Bernoulli(logits=f[0] + f[1] * x))

    return guide
