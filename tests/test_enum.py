# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Enumerated model sites inside the importance weights, checked exactly (see tests/discrete.py).

Model: per datapoint, ``z1 ~ Bernoulli(sigmoid(prior1))`` (sampled by an amortized guide
``q(z1 | x) = Bernoulli(sigmoid(table[x]))``), ``z2 | z1 ~ Categorical(softmax(prior2[z1]))``
marked for parallel enumeration, and ``x | z1, z2 ~ Bernoulli(sigmoid(emit[z1, z2]))``
observed. With z2 summed out, each particle's model density is
``log p(x, z1) = logsumexp_{z2} log p(x, z1, z2)``; every estimator must then have exactly the
expectation it has for the two-site model with that marginal. The library's expectation is
computed by running it on every K-tuple of guide draws (and every fantasy of the sleep phase);
the targets are written independently from probability tables.
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from discrete import FixFantasies, all_draws, fixed_draws
from pyro.infer import config_enumerate

from pyro_rws import RWS, VIMCO, SleepPhaseLoss, WakeSleepELBO
from pyro_rws.evaluation import log_evidence

C = 3  # values of z2
THETA = ("prior1", "prior2", "emit")
PHI = ("table",)
X = torch.tensor([0.0, 1.0], dtype=torch.float64)
ENUM = {"enumerate": "parallel"}


@pytest.fixture(autouse=True)
def init_params():
    f64 = dict(dtype=torch.float64)
    pyro.param("prior1", torch.tensor(0.4, **f64))
    pyro.param("prior2", torch.tensor([[0.3, -0.4, 0.2], [-0.5, 0.6, 0.1]], **f64))
    pyro.param("emit", torch.tensor([[-1.2, 0.4, 1.6], [0.8, -0.9, 0.3]], **f64))
    pyro.param("table", torch.tensor([0.7, -0.5], **f64))


def params(names):
    return [pyro.param(n).unconstrained() for n in names]


def assert_close(actual, expected, tol=1e-10):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


def emission(z1, z2):
    return dist.Bernoulli(logits=pyro.param("emit")[z1.long(), z2])


def model(x):
    with pyro.plate("data", len(x)):
        z1 = pyro.sample("z1", dist.Bernoulli(logits=pyro.param("prior1")))
        z2 = pyro.sample("z2", dist.Categorical(logits=pyro.param("prior2")[z1.long()]), infer=ENUM)
        pyro.sample("x", emission(z1, z2), obs=x)


def guide(x):
    with pyro.plate("data", len(x)):
        pyro.sample("z1", dist.Bernoulli(logits=pyro.param("table")[x.long()]))


# ------------------------------------------------------------------------------------------
# exact tables, in plain torch
# ------------------------------------------------------------------------------------------
def log_joint3():
    """``log p(x, z1, z2)`` as a (2, 2, C) table indexed [x, z1, z2]."""
    prior1 = pyro.param("prior1")
    log_z1 = torch.stack(
        [-torch.nn.functional.softplus(prior1), -torch.nn.functional.softplus(-prior1)]
    )
    log_z2 = torch.log_softmax(pyro.param("prior2"), -1)  # [z1, z2]
    emit = pyro.param("emit")
    log_x = torch.stack(
        [torch.nn.functional.logsigmoid(-emit), torch.nn.functional.logsigmoid(emit)]
    )
    return log_z1[:, None] + log_z2 + log_x  # [x, z1, z2]


def log_joint():
    """The marginal ``log p(x, z1)``, z2 summed out: a (2, 2) table indexed [x, z1]."""
    return torch.logsumexp(log_joint3(), -1)


def log_guide():
    """``log q(z1 | x)`` as a (2, 2) table indexed [x, z1]."""
    table = pyro.param("table")
    return torch.stack(
        [torch.nn.functional.logsigmoid(-table), torch.nn.functional.logsigmoid(table)], -1
    )


def tuples(K):
    return torch.tensor(list(itertools.product(range(2), repeat=K)))


def iwae(x: int, K: int, detach_q=False):
    """Exact E_q[log (1/K) sum_k p(x, z1_k) / q(z1_k | x)] for one datapoint."""
    lp, lq = log_joint()[x], log_guide()[x]
    zs = tuples(K)
    log_w = lp[zs] - (lq.detach() if detach_q else lq)[zs]
    prob = lq[zs].sum(-1).exp()
    if detach_q:
        prob = prob.detach()
    return (prob * (torch.logsumexp(log_w, -1) - math.log(K))).sum()


def exact_wake_theta(x, K):
    target = -sum(iwae(int(xn), K, detach_q=True) for xn in x)
    return torch.autograd.grad(target, params(THETA)), target.detach()


def exact_wake_phi(x, K):
    lp, lq = log_joint().detach(), log_guide()
    total = 0.0
    for xn in x.long():
        zs = tuples(K)
        log_q = lq[xn][zs]
        wbar = torch.softmax(lp[xn][zs] - log_q.detach(), -1)
        total = total + (log_q.detach().sum(-1).exp() * -(wbar * log_q).sum(-1)).sum()
    return torch.autograd.grad(total, params(PHI))


# ------------------------------------------------------------------------------------------
# the library on fixed draws
# ------------------------------------------------------------------------------------------
def fixed_guide(draws, vectorized, fn=guide, **extra):
    return fixed_draws(fn, {"z1": draws}, vectorized, **extra)


def expected(loss, x, K, vectorized=True):
    """Exact expectation over the guide's K x N draws of the library's differentiable loss."""
    lq = log_guide()
    total = 0.0
    for z, prob in all_draws(K, len(x), 2, lambda z: lq[x.long().expand(z.shape), z]):
        draws = fixed_guide(z.to(x.dtype), vectorized)
        total = total + prob * loss.differentiable_loss(model, draws, x)
    return total


VECTORIZED = pytest.mark.parametrize("vectorized", [True, False], ids=["vec", "seq"])


@VECTORIZED
@pytest.mark.parametrize("K", [2, 3])
def test_rws_wake_theta_wake_phi_and_value(K, vectorized):
    loss = RWS(K, max_plate_nesting=1, vectorize_particles=vectorized)
    total = expected(loss, X, K, vectorized)
    theta, value = exact_wake_theta(X, K)
    torch.testing.assert_close(total.detach(), value, rtol=1e-10, atol=1e-10)
    assert_close(torch.autograd.grad(total, params(THETA), retain_graph=True), theta)
    assert_close(torch.autograd.grad(total, params(PHI)), exact_wake_phi(X, K))


@VECTORIZED
@pytest.mark.parametrize("K", [2, 3])
def test_vimco_guide_and_model_gradients(K, vectorized):
    """VIMCO is unbiased for grad E[IWAE_K] with the marginal log p(x, z1)."""
    loss = VIMCO(K, max_plate_nesting=1, vectorize_particles=vectorized)
    total = expected(loss, X, K, vectorized)
    target = -sum(iwae(int(x), K) for x in X)
    torch.testing.assert_close(total.detach(), target.detach(), rtol=1e-10, atol=1e-10)
    assert_close(
        torch.autograd.grad(total, params(THETA + PHI)),
        torch.autograd.grad(target, params(THETA + PHI)),
    )


@VECTORIZED
def test_wake_sleep_wake_theta(vectorized):
    """Classic wake-theta with the marginal: -grad E_q log p(x, z1), z2 summed out."""
    K = 2
    loss = WakeSleepELBO(K, max_plate_nesting=1, vectorize_particles=vectorized)
    lp, lq = log_joint(), log_guide().detach()
    target = -(lq[X.long()].exp() * lp[X.long()]).sum()
    total = expected(loss, X, K, vectorized)  # the sleep term does not touch theta
    assert_close(
        torch.autograd.grad(total, params(THETA)), torch.autograd.grad(target, params(THETA))
    )


@VECTORIZED
@pytest.mark.parametrize("loss_fn", ["sleep_phase", "rws_insomnia_0"])
def test_sleep_phi_samples_enumerated_sites(loss_fn, vectorized):
    """
    Sleep: the model runs unconditioned and z2 is sampled like any other site; the guide scores
    only z1. Enumerating all fantasies (x_n, z1_n, z2_n) of both datapoints, the expected guide
    gradient is -N sum_{x, z1} p(x, z1) grad log q(z1 | x), with p(x, z1) the marginal.
    """
    if loss_fn == "sleep_phase":
        loss = SleepPhaseLoss(max_plate_nesting=1, vectorize_particles=vectorized)
    else:
        loss = RWS(2, insomnia=0.0, max_plate_nesting=1, vectorize_particles=vectorized)
    log_p3 = log_joint3().detach()
    shape = (1, len(X)) if vectorized else (len(X),)
    wake = torch.zeros((2, 2) if vectorized else (2,), dtype=X.dtype)
    total = 0.0
    for flat in itertools.product(range(2), range(2), range(C), repeat=len(X)):
        x_f, z1_f, z2_f = (torch.tensor(flat[i::3]) for i in range(3))
        prob = log_p3[x_f, z1_f, z2_f].sum().exp()
        fantasies = {
            "x": x_f.to(X.dtype).reshape(shape),
            "z1": z1_f.to(X.dtype).reshape(shape),
            "z2": z2_f.reshape(shape),
        }
        with FixFantasies(fantasies):
            total = total + prob * loss.differentiable_loss(model, fixed_guide(wake, vectorized), X)
    target = -len(X) * (log_joint().detach().exp() * log_guide()).sum()
    assert_close(torch.autograd.grad(total, params(PHI)), torch.autograd.grad(target, params(PHI)))


# ------------------------------------------------------------------------------------------
# subsampling: the average minibatch estimate equals the full-data expectation
# ------------------------------------------------------------------------------------------
X4 = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)


def model_sub(x, batch):
    with pyro.plate("data", len(x), subsample_size=batch) as idx:
        z1 = pyro.sample("z1", dist.Bernoulli(logits=pyro.param("prior1")))
        z2 = pyro.sample("z2", dist.Categorical(logits=pyro.param("prior2")[z1.long()]), infer=ENUM)
        pyro.sample("x", emission(z1, z2), obs=x[idx])


def guide_sub(x, batch):
    with pyro.plate("data", len(x), subsample_size=batch) as idx:
        pyro.sample("z1", dist.Bernoulli(logits=pyro.param("table")[x[idx].long()]))


@VECTORIZED
def test_subsampled_rws_is_unbiased(vectorized):
    K, B = 2, 2
    loss = RWS(K, max_plate_nesting=1, vectorize_particles=vectorized)
    minibatches = list(itertools.combinations(range(len(X4)), B))
    lq = log_guide().detach()
    total = 0.0
    for idx in map(torch.tensor, minibatches):
        for flat in itertools.product(range(2), repeat=K * B):
            z = torch.tensor(flat, dtype=X4.dtype).reshape(K, B)
            prob = lq[X4[idx].long().expand(K, B), z.long()].sum().exp() / len(minibatches)
            fixed = fixed_guide(z, vectorized, guide_sub, data=idx)
            total = total + prob * loss.differentiable_loss(model_sub, fixed, X4, B)
    theta, value = exact_wake_theta(X4, K)
    torch.testing.assert_close(total.detach(), value, rtol=1e-10, atol=1e-10)
    assert_close(torch.autograd.grad(total, params(THETA), retain_graph=True), theta)
    assert_close(torch.autograd.grad(total, params(PHI)), exact_wake_phi(X4, K))


# ------------------------------------------------------------------------------------------
# a fully enumerated model: the bound is the exact log-likelihood, for any K
# ------------------------------------------------------------------------------------------
def empty_guide(*args):
    pass


full_model = config_enumerate(model)


def exact_log_likelihood(x):
    return torch.logsumexp(log_joint()[x.long()], -1)  # (N,)


@VECTORIZED
@pytest.mark.parametrize(
    "make",
    [
        lambda v: RWS(2, max_plate_nesting=1, vectorize_particles=v),
        lambda v: RWS(3, insomnia=0.5, max_plate_nesting=1, vectorize_particles=v),
        lambda v: VIMCO(2, max_plate_nesting=1, vectorize_particles=v),
        lambda v: WakeSleepELBO(1, max_plate_nesting=1, vectorize_particles=v),
    ],
    ids=["rws2", "rws3-insomnia", "vimco2", "ws1"],
)
def test_fully_enumerated_model_is_exact(make, vectorized):
    loss = make(vectorized)
    value = loss.differentiable_loss(full_model, empty_guide, X)
    target = -exact_log_likelihood(X).sum()
    torch.testing.assert_close(value.detach(), target.detach(), rtol=1e-12, atol=1e-12)
    assert_close(
        torch.autograd.grad(value, params(THETA)), torch.autograd.grad(target, params(THETA))
    )
    if loss.stats.ess is not None:
        assert loss.stats.ess.shape == X.shape
        torch.testing.assert_close(loss.stats.ess, torch.full_like(X, float(loss.num_particles)))


def test_fully_enumerated_log_evidence_is_exact_per_datapoint():
    x = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    result = log_evidence(full_model, empty_guide, x, num_particles=5, chunk_size=2)
    assert result.shape == x.shape
    torch.testing.assert_close(result, exact_log_likelihood(x).detach(), rtol=1e-12, atol=1e-12)


def test_log_evidence_with_guide_keeps_per_datapoint_shape():
    result = log_evidence(model, guide, X4, num_particles=7, chunk_size=3)
    assert result.shape == X4.shape
    assert torch.isfinite(result).all()


# ------------------------------------------------------------------------------------------
# scales, masks, global enumerated sites, sequential plates: as TraceEnum_ELBO
# ------------------------------------------------------------------------------------------
def traceenum_loss(model_fn, *args):
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
    return elbo.differentiable_loss(model_fn, empty_guide, *args)


def scaled_masked_model(x):
    mask = torch.tensor([True, False, True])
    with poutine.scale(scale=0.3), pyro.plate("data", len(x)):
        z1 = pyro.sample("z1", dist.Bernoulli(logits=pyro.param("prior1")), infer=ENUM)
        with poutine.mask(mask=~mask):  # TraceEnum_ELBO ignores masks on enumerated sites
            logits = pyro.param("prior2")[z1.long()]
            z2 = pyro.sample("z2", dist.Categorical(logits=logits), infer=ENUM)
        with poutine.mask(mask=mask):
            pyro.sample("x", emission(z1, z2), obs=x)


def global_model(x):
    z1 = pyro.sample("z1", dist.Bernoulli(logits=pyro.param("prior1")), infer=ENUM)
    with pyro.plate("data", len(x)):
        z2 = pyro.sample("z2", dist.Categorical(logits=pyro.param("prior2")[z1.long()]), infer=ENUM)
        pyro.sample("x", emission(z1, z2), obs=x)


def nested_plate_model(x):
    # z2 per datapoint, observed features in a plate nested inside the data plate: the
    # contraction sums log-densities over the inner plate before summing z2 out
    with pyro.plate("data", len(x), dim=-2):
        z2 = pyro.sample("z2", dist.Categorical(logits=pyro.param("prior2")[0]), infer=ENUM)
        with pyro.plate("features", 2, dim=-1):
            pyro.sample("x", dist.Bernoulli(logits=pyro.param("emit").T[z2.squeeze(-1)]), obs=x)


@VECTORIZED
@pytest.mark.parametrize(
    "program", [scaled_masked_model, global_model], ids=["scale-mask", "global"]
)
def test_agrees_with_traceenum_elbo(program, vectorized):
    """With every latent enumerated the bound is TraceEnum_ELBO's (exact) ELBO, gradient too."""
    x = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    loss = RWS(2, max_plate_nesting=1, vectorize_particles=vectorized)
    value = loss.differentiable_loss(program, empty_guide, x)
    target = traceenum_loss(program, x)
    torch.testing.assert_close(value.detach(), target.detach(), rtol=1e-12, atol=1e-12)
    assert_close(
        torch.autograd.grad(value, params(THETA)), torch.autograd.grad(target, params(THETA))
    )
    # a global enumerated site makes the weights joint along the data plate
    assert loss.stats.ess.shape == (() if program is global_model else x.shape)


@VECTORIZED
def test_nested_plate_agrees_with_traceenum_elbo(vectorized):
    x = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    loss = RWS(2, max_plate_nesting=2, vectorize_particles=vectorized)
    value = loss.differentiable_loss(nested_plate_model, empty_guide, x)
    target = pyro.infer.TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(
        nested_plate_model, empty_guide, x
    )
    torch.testing.assert_close(value.detach(), target.detach(), rtol=1e-12, atol=1e-12)
    assert_close(
        torch.autograd.grad(value, params(THETA[1:])),
        torch.autograd.grad(target, params(THETA[1:])),
    )
    assert loss.stats.ess.shape == (3,)  # the data plate (the features plate is summed)


def test_sequential_data_plate():
    def seq_model(x):
        for i in pyro.plate("data", len(x)):
            z1 = pyro.sample(f"z1_{i}", dist.Bernoulli(logits=pyro.param("prior1")), infer=ENUM)
            logits = pyro.param("prior2")[z1.long()]
            z2 = pyro.sample(f"z2_{i}", dist.Categorical(logits=logits), infer=ENUM)
            pyro.sample(f"x_{i}", emission(z1, z2), obs=x[i])

    loss = RWS(2, max_plate_nesting=0)
    value = loss.differentiable_loss(seq_model, empty_guide, X)
    torch.testing.assert_close(value.detach(), -exact_log_likelihood(X).sum().detach())
    assert loss.stats.ess.shape == X.shape


def global_model_sub(x, batch):
    z1 = pyro.sample("z1", dist.Bernoulli(logits=pyro.param("prior1")), infer=ENUM)
    with pyro.plate("data", len(x), subsample_size=batch) as idx:
        pyro.sample("x", dist.Bernoulli(logits=pyro.param("emit")[z1.long(), 0]), obs=x[idx])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: RWS(2, max_plate_nesting=1), "plate 'data' is subsampled"),
        (lambda: VIMCO(2, max_plate_nesting=1), "plate 'data' is subsampled"),
        (lambda: WakeSleepELBO(2, max_plate_nesting=1), "different scales"),
    ],
    ids=["rws", "vimco", "wake-sleep"],
)
def test_global_enumerated_site_with_subsampling_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make().loss(global_model_sub, empty_guide, X4, 2)


# ------------------------------------------------------------------------------------------
# what is not supported says so, naming the site
# ------------------------------------------------------------------------------------------
def unsupported_model(how):
    def program(x):
        with pyro.plate("data", len(x)):
            z1 = pyro.sample("z1", dist.Bernoulli(logits=pyro.param("prior1")))
            z2 = pyro.sample(
                "z2", dist.Categorical(logits=pyro.param("prior2")[z1.long()]), infer=how
            )
            pyro.sample("x", emission(z1, z2), obs=x)

    return program


def markov_model(x):
    z = torch.tensor(0)
    for t in pyro.markov(range(2)):
        z = pyro.sample(f"z_{t}", dist.Categorical(logits=pyro.param("prior2")[z]), infer=ENUM)
        pyro.sample(f"x_{t}", emission(torch.tensor(0.0), z), obs=x[t])


@pytest.mark.parametrize(
    "program, match",
    [
        (unsupported_model({"enumerate": "sequential"}), r"model site 'z2' .* 'sequential'"),
        (
            unsupported_model({"enumerate": "parallel", "num_samples": 4}),
            r"model site 'z2' .*Monte Carlo",
        ),
        (markov_model, r"model site 'z_0' is enumerated inside pyro.markov"),
    ],
    ids=["sequential", "num_samples", "markov"],
)
def test_unsupported_model_enumeration_raises(program, match):
    with pytest.raises(NotImplementedError, match=match):
        RWS(2, max_plate_nesting=1).loss(program, guide, X)


def test_guide_enumeration_raises():
    with pytest.raises(NotImplementedError, match=r"guide site 'z1' is marked for enumeration"):
        RWS(2, max_plate_nesting=1).loss(model, config_enumerate(guide), X)


def test_auto_discrete_parallel_raises():
    def discrete_model(x):
        with pyro.plate("data", len(x)):
            z1 = pyro.sample("z1", dist.Bernoulli(logits=pyro.param("prior1")))
            pyro.sample("x", dist.Bernoulli(logits=pyro.param("emit")[z1.long(), 0]), obs=x)

    auto = pyro.infer.autoguide.AutoDiscreteParallel(discrete_model)
    with pytest.raises(NotImplementedError, match="AutoDiscreteParallel"):
        RWS(2, max_plate_nesting=1).loss(discrete_model, auto, X)


def test_float32_gradient_where_prior_and_likelihood_disagree():
    """
    The Gaussian mixture of tutorial 1 at its initialization (prior mass on cluster 0, data up
    to 190): the contraction's gradient matches the hand-written log-sum-exp in float32, where
    Pyro's own log-space einsum loses about 20 % of it (see pyro_rws._enum.einsum).
    """
    from pyro_rws.examples.gmm import GMM, STD, cluster_means, sample_data

    gmm = GMM()
    x = sample_data(100, generator=torch.Generator().manual_seed(1))
    value = RWS(2, max_plate_nesting=1).differentiable_loss(
        config_enumerate(gmm.model), empty_guide, x
    )
    log_lik = dist.Normal(cluster_means(x), STD).log_prob(x.unsqueeze(-1))
    hand = -torch.logsumexp(torch.log_softmax(0.5 * gmm.theta, -1) + log_lik, -1).sum()
    torch.testing.assert_close(value, hand)
    (grad,), (target,) = (torch.autograd.grad(v, [gmm.theta]) for v in (value, hand))
    torch.testing.assert_close(grad, target, rtol=1e-5, atol=1e-4)


def test_log_einsum():
    """The contraction's log-space einsum: exact value and gradient, and a zero (not NaN)
    gradient where every term is -inf (a particle of probability zero)."""
    from pyro_rws._enum import einsum

    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    expected = torch.logsumexp(a[:, :, None] + b[None], 1)
    torch.testing.assert_close(einsum("ab,bc->ac", a, b), expected)
    assert torch.autograd.gradcheck(lambda a, b: einsum("ab,bc->ac", a, b), (a, b))
    c = torch.tensor([[0.0, -math.inf], [-math.inf, -math.inf]], requires_grad=True)
    result = einsum("ab->a", c)
    assert result.tolist() == [0.0, -math.inf]
    torch.where(torch.isfinite(result), result, 0.0).sum().backward()
    assert c.grad.tolist() == [[1.0, 0.0], [0.0, 0.0]]
