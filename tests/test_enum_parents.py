# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
A latent sampled by the guide whose model distribution depends on an enumerated site (issue 18),
checked exactly with the machinery of tests/discrete.py.

Model (``make_model`` of tests/discrete.py, under ``config_enumerate``):
``g ~ Bernoulli(sigmoid(c))``, enumerated, either *global* (outside the data plate: it couples
the datapoints, and the weights are joint along the plate) or *local* (one per datapoint:
per-datapoint weights); per datapoint ``z ~ Bernoulli(sigmoid(u + v g))``, sampled by the guide
``q(z | x) = Bernoulli(sigmoid(f0 + f1 x))``, and ``x ~ Normal(w0 + w1 z + w2 g, 1)`` observed
(the program of the issue; Bernoulli for the sleep phase, whose fantasies are enumerated too).
With g summed out, each particle's model density is
``log p(x, z) = log sum_g p(g) prod_n p(z_n | g) p(x_n | z_n, g)`` (global) or
``log p(x_n, z_n) = log sum_g p(g) p(z_n | g) p(x_n | z_n, g)`` (local). The library's
expectations are computed by running it on every K-tuple of guide draws (and every fantasy of
the sleep phase); the targets are written independently below, from probability tables.
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from discrete import (
    FixFantasies,
    all_draws,
    assert_close,
    fixed_draws,
    init_parent_params,
    make_guide,
    make_model,
)
from torch.nn.functional import logsigmoid

from pyro_rws import RWS, VIMCO, SleepPhaseLoss, WakeSleepELBO
from pyro_rws.evaluation import log_evidence

THETA = ("c", "uv", "w")
PHI = ("f",)
X = torch.tensor([0.5, -1.2], dtype=torch.float64)  # data of the Normal emission
WHERE = pytest.mark.parametrize("where", ["global", "local"])
VECTORIZED = pytest.mark.parametrize("vectorized", [True, False], ids=["vec", "seq"])


@pytest.fixture(autouse=True)
def init_params():
    init_parent_params()


def params(names):
    return [pyro.param(n).unconstrained() for n in names]


guide = make_guide()


# ------------------------------------------------------------------------------------------
# exact tables, in plain torch
# ------------------------------------------------------------------------------------------
def _bernoulli(logits):
    """log Bernoulli(0 | logits), log Bernoulli(1 | logits), stacked in a last dim."""
    return torch.stack([logsigmoid(-logits), logsigmoid(logits)], -1)


def log_prior():
    """(log p(g), log p(z | g)): tables indexed [g] and [g, z]."""
    u, v = pyro.param("uv")
    return _bernoulli(pyro.param("c")), _bernoulli(u + v * torch.arange(2.0).double())


def log_lik(x, kind="normal"):
    """log p(x_n | z, g) as a table indexed [g, n, z]."""
    w = pyro.param("w")
    loc = w[0] + w[1] * torch.arange(2.0).double() + w[2] * torch.arange(2.0).double()[:, None]
    loc = loc[:, None, :]  # [g, 1, z]
    if kind == "normal":
        return -0.5 * (x[:, None] - loc) ** 2 - 0.5 * math.log(2 * math.pi)
    x = x[:, None]
    return x * logsigmoid(loc) + (1 - x) * logsigmoid(-loc)


def log_guide(x):
    """log q(z | x_n) as a table indexed [n, z]."""
    f = pyro.param("f")
    return _bernoulli(f[0] + f[1] * x)


def log_weights(x, z, where, detach_q=True):
    """
    (log p, log q) of the particles ``z`` (K, N), per element of the batch plates: shape (K, 1)
    for a global g (joint weights along the data plate), (K, N) for a local one.
    """
    log_g, log_z = log_prior()
    n = torch.arange(len(x))
    joint = torch.stack([log_z[g][z] + log_lik(x)[g][n, z] for g in range(2)])  # [g, K, N]
    log_q = log_guide(x)[n, z]
    if detach_q:
        log_q = log_q.detach()
    if where == "global":
        log_p = torch.logsumexp(log_g[:, None] + joint.sum(-1), 0)[:, None]
        return log_p, log_q.sum(-1, keepdim=True)
    return torch.logsumexp(log_g[:, None, None] + joint, 0), log_q


def draws(x, K):
    """All (K, N) guide draws of z with their probabilities (attached to the guide's graph)."""
    lq = log_guide(x)
    n = torch.arange(len(x))
    for z, _ in all_draws(K, len(x), 2, lambda z: lq[n, z].detach()):
        yield z, lq[n, z].sum().exp()


def iwae(log_p, log_q):
    """log (1/K) sum_k w_k per batch element."""
    return torch.logsumexp(log_p - log_q, 0) - math.log(log_p.shape[0])


def exact(x, K, where):
    """
    Expectations over the guide's draws: the RWS/VIMCO value -E[IWAE] (with graph to theta and,
    through the draws' probabilities, to phi), the wake-phi loss, the negative ELBO (with
    graph to theta), and E[IWAE] per batch element.
    """
    value = wake_phi = neg_elbo = 0.0
    per_element = 0.0
    for z, prob in draws(x, K):
        log_p, log_q = log_weights(x, z, where, detach_q=False)
        bound = iwae(log_p, log_q)
        value = value - prob * bound.sum()
        per_element = per_element + prob.detach() * bound.detach()
        weights = torch.softmax((log_p - log_q).detach(), 0)
        wake_phi = wake_phi - prob.detach() * (weights * log_q).sum()
        neg_elbo = neg_elbo - prob.detach() * (log_p - log_q.detach()).sum() / K
    return value, wake_phi, neg_elbo, per_element.squeeze(-1) if where == "global" else per_element


def expected(loss, model, x, K, vectorized):
    """Exact expectation over the guide's K x N draws of the library's differentiable loss."""
    total = 0.0
    for z, prob in draws(x, K):
        fixed = fixed_draws(guide, {"z": z.to(x.dtype)}, vectorized)
        total = total + prob.detach() * loss.differentiable_loss(model, fixed, x)
    return total


def grad(value, names, **kwargs):
    return torch.autograd.grad(value, params(names), **kwargs)


# ------------------------------------------------------------------------------------------
# the wake phase
# ------------------------------------------------------------------------------------------
@WHERE
@pytest.mark.parametrize("vectorized, K", [(True, 2), (False, 2), (True, 3)], ids=str)
def test_rws_value_wake_theta_and_wake_phi(where, vectorized, K):
    loss = RWS(K, max_plate_nesting=1, vectorize_particles=vectorized)
    total = expected(loss, make_model(where), X, K, vectorized)
    value, wake_phi, _, _ = exact(X, K, where)
    torch.testing.assert_close(total.detach(), value.detach(), rtol=1e-10, atol=1e-10)
    assert_close(grad(total, THETA, retain_graph=True), grad(value, THETA))
    assert_close(grad(total, PHI), grad(wake_phi, PHI))
    assert loss.stats.ess.shape == (() if where == "global" else X.shape)


@WHERE
@VECTORIZED
def test_vimco_value_and_gradients(where, vectorized):
    """VIMCO is unbiased for grad E[IWAE_K], model and guide, with g summed out."""
    K = 2
    loss = VIMCO(K, max_plate_nesting=1, vectorize_particles=vectorized)
    total = expected(loss, make_model(where), X, K, vectorized)
    value, _, _, _ = exact(X, K, where)
    torch.testing.assert_close(total.detach(), value.detach(), rtol=1e-10, atol=1e-10)
    assert_close(grad(total, THETA + PHI), grad(value, THETA + PHI))


@WHERE
@VECTORIZED
def test_wake_sleep_value_wake_theta_and_wake_phi(where, vectorized):
    """The negative ELBO and its model gradient; with phase_q="wake" the wake-phi gradient."""
    K = 2
    model = make_model(where)
    _, wake_phi, neg_elbo, _ = exact(X, K, where)
    wake_theta = grad(neg_elbo, THETA)
    loss = WakeSleepELBO(K, max_plate_nesting=1, vectorize_particles=vectorized)
    total = expected(loss, model, X, K, vectorized)  # the sleep term does not touch theta
    torch.testing.assert_close(total.detach(), neg_elbo.detach(), rtol=1e-10, atol=1e-10)
    assert_close(grad(total, THETA), wake_theta)
    loss = WakeSleepELBO(K, phase_q="wake", max_plate_nesting=1, vectorize_particles=vectorized)
    total = expected(loss, model, X, K, vectorized)
    torch.testing.assert_close(total.detach(), neg_elbo.detach(), rtol=1e-10, atol=1e-10)
    assert_close(grad(total, THETA, retain_graph=True), wake_theta)
    assert_close(grad(total, PHI), grad(wake_phi, PHI))


@WHERE
@pytest.mark.parametrize("chunk_size", [1, 2], ids=["chunks", "one-chunk"])
def test_log_evidence(where, chunk_size):
    """E[log_evidence] is E[IWAE_K] per batch element: per datapoint, or joint for global g."""
    K = 2
    model = make_model(where)
    total = 0.0
    for z, prob in draws(X, K):
        # one chunk of K particles, or one call of the guide per particle (a chunk of one)
        one_chunk = chunk_size == K
        values = z.to(X.dtype) if one_chunk else z.to(X.dtype)[:, None]
        fixed = fixed_draws(guide, {"z": values}, one_chunk)
        result = log_evidence(
            model, fixed, X, num_particles=K, chunk_size=chunk_size, max_plate_nesting=1
        )
        total = total + prob.detach() * result
    target = exact(X, K, where)[3]
    assert total.shape == target.shape == (() if where == "global" else X.shape)
    torch.testing.assert_close(total, target, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------
# the sleep phase: g is sampled like any other site, the guide scores z
# ------------------------------------------------------------------------------------------
@WHERE
@VECTORIZED
@pytest.mark.parametrize("loss_fn", ["sleep_phase", "rws_insomnia_0", "wake_sleep"])
def test_sleep_phi(where, vectorized, loss_fn):
    """
    Enumerating every fantasy (g, z_n, x_n) of both datapoints, the expected guide gradient is
    -N sum_{x, z} p(x, z) grad log q(z | x), p(x, z) = sum_g p(g) p(z | g) p(x | z, g), for a
    global g as for a local one.
    """
    kw = dict(max_plate_nesting=1, vectorize_particles=vectorized)
    loss = {
        "sleep_phase": lambda: SleepPhaseLoss(**kw),
        "rws_insomnia_0": lambda: RWS(2, insomnia=0.0, **kw),
        "wake_sleep": lambda: WakeSleepELBO(2, **kw),
    }[loss_fn]()
    model = make_model(where, "bernoulli")
    x_data = torch.tensor([0.0, 1.0], dtype=torch.float64)
    N = len(x_data)
    log_g, log_z = (t.detach() for t in log_prior())
    log_x = log_lik(torch.tensor([0.0, 1.0]).double(), "bernoulli").detach()  # [g, x, z]
    wake = fixed_draws(guide, {"z": torch.zeros(2, N, dtype=torch.float64)}, vectorized)
    n_g = 1 if where == "global" else N
    total = 0.0
    for flat in itertools.product(range(2), repeat=n_g + 2 * N):
        g = torch.tensor(flat[:n_g]).reshape((N,) if where == "local" else ())
        z, x = torch.tensor(flat[n_g::2]), torch.tensor(flat[n_g + 1 :: 2])
        gn = g.expand(N)
        prob = (log_g[g].sum() + log_z[gn, z].sum() + log_x[gn, x, z].sum()).exp()
        fantasies = {"g": g.double(), "z": z.double(), "x": x.double()}
        with FixFantasies(fantasies):
            total = total + prob * loss.differentiable_loss(model, wake, x_data)
    log_p = torch.logsumexp(log_g[:, None, None] + log_z[:, None, :] + log_x, 0)  # [x, z]
    target = -N * (log_p.exp() * log_guide(torch.tensor([0.0, 1.0]).double())).sum()
    assert_close(grad(total, PHI), grad(target, PHI))


# ------------------------------------------------------------------------------------------
# subsampling: the average minibatch estimate is the full-data one for a local g; a global g
# has no unbiased minibatch estimate, and the loss says so
# ------------------------------------------------------------------------------------------
X3 = torch.tensor([0.5, -1.2, 2.0], dtype=torch.float64)


@VECTORIZED
def test_subsampled_local_g_is_unbiased(vectorized):
    K, B = 2, 2
    loss = RWS(K, max_plate_nesting=1, vectorize_particles=vectorized)
    model, sub_guide = make_model("local", subsample_size=B), make_guide(B)
    minibatches = list(itertools.combinations(range(len(X3)), B))
    lq = log_guide(X3).detach()
    total = 0.0
    for idx in map(torch.tensor, minibatches):
        for z, prob in all_draws(K, B, 2, lambda z, idx=idx: lq[idx, z]):
            fixed = fixed_draws(sub_guide, {"z": z.to(X3.dtype)}, vectorized, data=idx)
            total = total + prob / len(minibatches) * loss.differentiable_loss(model, fixed, X3)
    value, wake_phi, _, _ = exact(X3, K, "local")
    torch.testing.assert_close(total.detach(), value.detach(), rtol=1e-10, atol=1e-10)
    assert_close(grad(total, THETA, retain_graph=True), grad(value, THETA))
    assert_close(grad(total, PHI), grad(wake_phi, PHI))


@pytest.mark.parametrize(
    "run, match",
    [
        (lambda m, g: RWS(2, max_plate_nesting=1).loss(m, g, X3), "plate 'data' is subsampled"),
        (lambda m, g: VIMCO(2, max_plate_nesting=1).loss(m, g, X3), "plate 'data' is subsampled"),
        (lambda m, g: WakeSleepELBO(2, max_plate_nesting=1).loss(m, g, X3), "different scales"),
        (lambda m, g: log_evidence(m, g, X3, num_particles=2), "plate 'data' is subsampled"),
    ],
    ids=["rws", "vimco", "wake-sleep", "log_evidence"],
)
def test_subsampled_global_g_raises(run, match):
    with pytest.raises(ValueError, match=match):
        run(make_model("global", subsample_size=2), make_guide(2))


def test_sleep_phase_checks_the_plates_of_a_site_the_model_marks_for_enumeration():
    """config_enumerate marks z in the model too; the guide samples it, and must match it."""

    def renamed_guide(x):
        with pyro.plate("batch", x.shape[-1]):
            pyro.sample("z", dist.Bernoulli(logits=pyro.param("f")[0] * x))

    with pytest.raises(ValueError, match=r"site 'z' lies in plate 'data' .* but in plate 'batch'"):
        SleepPhaseLoss(max_plate_nesting=1).loss(make_model("local"), renamed_guide, X)


@WHERE
@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: RWS(2, **kw),
        lambda **kw: RWS(2, vectorize_particles=False, **kw),
        lambda **kw: RWS(2, insomnia=0.5, **kw),
        lambda **kw: VIMCO(2, **kw),
        lambda **kw: WakeSleepELBO(2, **kw),
    ],
    ids=["rws", "rws-seq", "rws-insomnia", "vimco", "wake-sleep"],
)
def test_max_plate_nesting_guessed(where, make):
    """The program of the issue, max_plate_nesting guessed: the step of max_plate_nesting=1."""
    x = torch.tensor([0.5, -1.2, 2.0], dtype=torch.float64)
    values = []
    for kw in ({}, {"max_plate_nesting": 1}):
        pyro.set_rng_seed(3)
        values.append(make(**kw).differentiable_loss(make_model(where), guide, x))
    assert torch.isfinite(values[0])
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)
