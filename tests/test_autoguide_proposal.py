# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Tests of :class:`pyro_rws.autoguides.proposal.AutoAmortizedProposal`: the guide's trace is the
model's latents with the model's control flow, the proposal families respect the supports, new
addresses reach the optimizer (pyro.optim and torch.optim), q sums to one over every trace of a
discrete model with stochastic control flow (exact, by enumeration), sleep training moves q
towards the exact posterior, and the guide works with RWS (sequential and vectorized) and
log_evidence.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from coins import EMIT, coin_traces, coins
from pyro.infer import SVI
from torch.distributions import constraints

from pyro_rws import RWS, SleepPhaseLoss, importance_posterior, log_evidence
from pyro_rws.autoguides.proposal import AutoAmortizedProposal

pytestmark = pytest.mark.usefixtures("float64")


def log_q(guide, values, x):
    """log q(values | x), the guide replayed on one configuration."""
    trace = Trace_of(guide, values, x)
    assert {n for n, s in trace.nodes.items() if s["type"] == "sample"} == set(values)
    return sum(s["fn"].log_prob(s["value"]) for s in trace.nodes.values() if s["type"] == "sample")


def Trace_of(guide, values, *args):
    fixed = poutine.condition(guide, data=values)
    trace = poutine.trace(fixed).get_trace(*args)
    trace.compute_log_prob()
    return trace


def exact_posterior(x):
    configs = coin_traces()
    joint = torch.tensor([p * EMIT[h][int(x)] for _, p, h in configs])
    return joint / joint.sum()


def mean_tv(guide):
    """Mean over x ~ p(x) of TV(q(. | x), p(. | x)) over the 7 latent configurations."""
    configs = coin_traces()
    total = 0.0
    for x in range(3):
        x_t = torch.tensor(float(x))
        p_x = sum(p * EMIT[h][x] for _, p, h in configs)
        with torch.no_grad():
            q = torch.stack([log_q(guide, v, x_t) for v, _, _ in configs]).exp()
        total += p_x * 0.5 * float((q - exact_posterior(x)).abs().sum())
    return total


def test_trace_is_the_models_latents_with_its_control_flow():
    guide = AutoAmortizedProposal(coins, num_standardize=0)
    x = torch.tensor(1.0)
    seen = set()
    for _ in range(30):
        trace = poutine.trace(guide).get_trace(x)
        sites = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
        k = int(trace.nodes["k"]["value"])
        assert sites == ["k"] + [f"c_{i}" for i in range(k)]  # in the model's order, no "x"
        seen.add(k)
    assert seen == {0, 1, 2}
    assert guide.addresses == ["k", "c_0", "c_1"]
    assert isinstance(trace.nodes["k"]["fn"], dist.Categorical)


def test_q_sums_to_one_over_every_trace():
    """Exact: the proposals, chained with the model's control flow, are one distribution."""
    guide = AutoAmortizedProposal(coins, num_standardize=0)
    guide.prepare(torch.tensor(0.0), num_simulations=30)
    for x in range(3):
        x_t = torch.tensor(float(x))
        with torch.no_grad():
            total = sum(log_q(guide, v, x_t).exp() for v, _, _ in coin_traces())
        assert abs(float(total) - 1.0) < 1e-12


def test_observations_keyword_and_hidden_run_agree():
    guide = AutoAmortizedProposal(coins)
    x = torch.tensor(2.0)
    values = {"k": torch.tensor(2), "c_0": torch.tensor(1.0), "c_1": torch.tensor(0.0)}
    with torch.no_grad():
        a = log_q(guide, values, x)
        fixed = poutine.condition(guide, data=values)
        trace = poutine.trace(fixed).get_trace(torch.tensor(0.0), observations={"x": x})
        b = sum(s["fn"].log_prob(s["value"]) for s in trace.nodes.values() if s["type"] == "sample")
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


def supports_model():
    s = pyro.sample("s", dist.Dirichlet(torch.ones(3)))
    p = pyro.sample("p", dist.Beta(2.0, 3.0))
    r = pyro.sample("r", dist.HalfNormal(2.0))
    u = pyro.sample("u", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    b = pyro.sample("b", dist.Bernoulli(p.unsqueeze(-1).expand(p.shape + (2,))).to_event(1))
    c = pyro.sample("c", dist.Categorical(logits=torch.zeros(4)))
    loc = s[..., 0] + p + r + u.sum(-1) + b.sum(-1) + c
    pyro.sample("x", dist.Normal(loc, 1.0), obs=torch.tensor(0.5))


@pytest.mark.parametrize("continuous", ["normal", "flow"])
def test_families_and_supports(continuous):
    guide = AutoAmortizedProposal(supports_model, num_components=2, continuous=continuous)
    with pyro.plate("samples", 500, dim=-1):  # vectorized runs, as Predictive(parallel=True)
        trace = poutine.trace(guide).get_trace()
    model_trace = poutine.trace(supports_model).get_trace()
    for name in ("s", "p", "r", "u", "b", "c"):
        site = trace.nodes[name]
        support = model_trace.nodes[name]["fn"].support
        assert site["value"].shape[0] == 500
        assert site["value"].shape[1:] == model_trace.nodes[name]["value"].shape
        assert support.check(site["value"]).all(), name
        assert torch.isfinite(site["fn"].log_prob(site["value"])).all(), name
    assert guide.heads["site_b"].kind == "bernoulli"
    assert guide.heads["site_c"].kind == "categorical"
    assert guide.heads["site_u"].relative and not guide.heads["site_r"].relative
    assert hasattr(guide.heads["site_u"], "flow") == (continuous == "flow")
    assert "x" not in trace.nodes
    assert len(trace.nodes["s"]["value"].unique(dim=0)) > 1  # particles are independent


def test_unknown_family_falls_back_to_the_prior_with_a_warning():
    def model():
        n = pyro.sample("n", dist.Poisson(3.0))
        pyro.sample("x", dist.Normal(n, 1.0), obs=torch.tensor(2.0))

    guide = AutoAmortizedProposal(model)
    with pytest.warns(UserWarning, match="proposes from the prior"):
        trace = poutine.trace(guide).get_trace()
    assert isinstance(trace.nodes["n"]["fn"], dist.Poisson)
    assert constraints.nonnegative_integer.check(trace.nodes["n"]["value"])


def branching(x, extra):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    if extra:
        z = z + pyro.sample("w", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def test_new_address_reaches_pyro_optim():
    guide = AutoAmortizedProposal(branching, num_standardize=10)
    x = torch.tensor(0.7)
    svi = SVI(branching, guide, pyro.optim.Adam({"lr": 0.05}), loss=RWS(num_particles=4))
    svi.step(x, False)
    assert guide.addresses == ["z"]
    svi.step(x, True)  # creates the head of "w" during the step
    names = set(pyro.get_param_store().keys())
    assert any("site_w" in n for n in names)
    before = [p.detach().clone() for p in guide.head_parameters("w")]
    svi.step(x, True)
    after = guide.head_parameters("w")
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_new_address_with_torch_optim():
    guide = AutoAmortizedProposal(branching, num_standardize=10)
    x = torch.tensor(0.7)
    guide.prepare(x, True, num_simulations=3)  # creates "z" and "w" before the optimizer
    assert guide.addresses == ["z", "w"]
    optim = torch.optim.Adam(guide.parameters(), lr=0.05)
    loss_fn = RWS(num_particles=4)
    before = [p.detach().clone() for p in guide.head_parameters("w")]
    optim.zero_grad()
    loss_fn.differentiable_loss(branching, guide, x, True).backward()
    optim.step()
    assert any(
        not torch.equal(a, b) for a, b in zip(guide.head_parameters("w"), before, strict=True)
    )

    def deeper(x):
        branching(x, True)
        pyro.sample("v", dist.Normal(0.0, 1.0))

    guide._model = (deeper,)  # an address first met after prepare()
    with pytest.warns(UserWarning, match="after prepare"):
        guide(x)
    added = []
    guide.on_new_address = lambda name, params: added.append(name)

    def deepest(x):
        deeper(x)
        pyro.sample("t", dist.Normal(0.0, 1.0))

    guide._model = (deepest,)
    guide(x)
    assert added == ["t"]


def sleep_train(steps, lr, particles):
    pyro.set_rng_seed(1)
    guide = AutoAmortizedProposal(coins, hidden_dim=16, address_dim=4, value_dim=4)
    x = torch.tensor(0.0)
    loss = SleepPhaseLoss(num_particles=particles, vectorize_particles=False)
    svi = SVI(coins, guide, pyro.optim.Adam({"lr": lr}), loss=loss)
    svi.step(x)
    untrained = mean_tv(guide)
    for _ in range(steps):
        svi.step(x)
    return untrained, mean_tv(guide)


def test_sleep_training_approaches_the_exact_posterior():
    untrained, trained = sleep_train(25, 0.02, 32)
    assert trained < 0.5 * untrained


@pytest.mark.slow
def test_sleep_training_converges_to_the_exact_posterior():
    untrained, trained = sleep_train(200, 0.01, 64)
    assert trained < 0.05 < untrained


def test_rws_sequential_and_vectorized_and_log_evidence():
    def gauss(x1, x2):
        z = pyro.sample("z", dist.Normal(1.0, math.sqrt(5.0)))
        pyro.sample("x1", dist.Normal(z, math.sqrt(2.0)), obs=x1)
        pyro.sample("x2", dist.Normal(z, math.sqrt(2.0)), obs=x2)

    x1, x2 = torch.tensor(3.0), torch.tensor(4.0)
    guide = AutoAmortizedProposal(gauss)
    for vectorize in (False, True):
        loss = RWS(num_particles=5, insomnia=0.5, vectorize_particles=vectorize)
        svi = SVI(gauss, guide, pyro.optim.Adam({"lr": 0.01}), loss=loss)
        for _ in range(3):
            assert math.isfinite(svi.step(x1, x2))
    # exact log p(x1, x2): a bivariate normal with covariance 5 + 2 I
    cov = torch.full((2, 2), 5.0) + 2.0 * torch.eye(2)
    exact = dist.MultivariateNormal(torch.ones(2), cov).log_prob(torch.stack([x1, x2]))
    estimate = log_evidence(gauss, guide, x1, x2, num_particles=4000, chunk_size=1000)
    assert estimate.shape == ()
    assert abs(float(estimate - exact)) < 0.05


def test_plates_broadcast_over_the_model_plates():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    x = torch.randn(5)
    guide = AutoAmortizedProposal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=RWS(num_particles=3, insomnia=0.5))
    for _ in range(2):
        assert math.isfinite(svi.step(x))
    trace = poutine.trace(guide).get_trace(x)
    assert trace.nodes["z"]["value"].shape == (5,)
    assert trace.nodes["z"]["fn"].batch_shape == (5,)


def test_local_latents_learn_each_elements_posterior():
    """
    A latent inside a model plate, with an observation in the same plate: each element's
    proposal reads its own x_i (``local_observations``, the default), and the sleep phase
    fits each element's posterior N(x_i / 1.09, 0.287^2); a shared proposal cannot.
    """

    def plated(x):
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.3), obs=x)

    x = torch.tensor([-1.5, 0.2, 2.0])
    ess = {}
    for local in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoAmortizedProposal(plated, hidden_dim=8, local_observations=local)
        svi = SVI(plated, guide, pyro.optim.Adam({"lr": 0.01}), loss=SleepPhaseLoss(32))
        for _ in range(120):
            svi.step(x)
        post = importance_posterior(plated, guide, x, num_particles=1000)
        ess[local] = post.effective_sample_size / 1000
    assert bool((ess[True] > 0.8).all()), ess
    assert bool((ess[False] < 0.6).any()), ess


def _variable_length_model(x=None):
    n = pyro.sample("n", dist.Categorical(torch.tensor([0.5, 0.5])))
    length = 2 + int(n)
    mean = torch.zeros(length) + n
    pyro.sample("x", dist.Normal(mean, 1.0).to_event(1), obs=x)


@pytest.mark.parametrize("num_standardize", [0, 20])
def test_observation_of_varying_shape_is_a_clear_error(num_standardize):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoAmortizedProposal(_variable_length_model, num_standardize=num_standardize)
    with pytest.raises(ValueError, match="cannot be embedded by its shape"):
        for length in (2, 3, 2, 3):  # the embedding is built for the first shape it meets
            guide(torch.zeros(length))
