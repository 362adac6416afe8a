# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Tests of pyro_rws/posterior.py: :func:`importance_posterior` against :func:`log_evidence` on the
same particles (exact), against analytic conjugate Gaussian posteriors and evidences (Monte
Carlo tolerances from standard errors), per-datapoint resampling, guide-only sampling for a
model without likelihood, and sbibm-style simulators (``observations=``, slcp's batch shape).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conjugate import data, fixed_model, guide

from pyro_rws import importance_posterior, log_evidence
from pyro_rws.posterior import ImportancePosterior

pytestmark = pytest.mark.usefixtures("float64")


def global_model(x):
    """mu ~ N(0, 1), x_n ~ N(mu, 1): posterior N(sum x / (n + 1), 1 / sqrt(n + 1))."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def wide_guide(x):
    pyro.sample("mu", dist.Normal(0.2, 1.5))


def test_same_particles_as_log_evidence():
    x = data()
    pyro.set_rng_seed(3)
    expected = log_evidence(fixed_model, guide, x, num_particles=250, chunk_size=100)
    pyro.set_rng_seed(3)
    post = importance_posterior(fixed_model, guide, x, num_particles=250, chunk_size=100)
    assert torch.equal(post.log_evidence, expected)
    assert post.log_weights.shape == (250, 4) and post.latents["z"].shape == (250, 4)
    assert torch.allclose(post.log_weights.logsumexp(0), torch.zeros(4), atol=1e-12)
    lw = post.log_weights
    ess = torch.exp(2 * lw.logsumexp(0) - (2 * lw).logsumexp(0))
    assert torch.allclose(post.effective_sample_size, ess)
    assert post.reweighted and post.reason is None and post.num_particles == 250
    text = repr(post)
    assert text.startswith("ImportancePosterior(num_particles=250, batch_shape=(4,), sites=['z']")
    assert f"ess={float(ess.min()):.4g}..{float(ess.max()):.4g}" in text


def test_conjugate_global_posterior_and_evidence():
    K = 20_000
    X = data()
    post = importance_posterior(global_model, wide_guide, X, num_particles=K, chunk_size=5000)
    n = len(X)
    mean, sd = float(X.sum()) / (n + 1), (n + 1) ** -0.5
    ess = float(post.effective_sample_size)
    assert post.log_weights.shape == (K,) and 0.1 * K < ess < K
    # self-normalized estimate of the posterior mean: standard error about sd / sqrt(ESS)
    w = post.log_weights.exp()
    assert post.latents["mu"].shape == (K, 1)  # the global latent left of the data plate
    estimate = float((w * post.latents["mu"][:, 0]).sum())
    assert abs(estimate - mean) < 5 * sd / ess**0.5
    # log p(x): x ~ N(0, I + 11^T); relative variance of the estimate about 1 / ESS
    exact = dist.MultivariateNormal(torch.zeros(n), torch.eye(n) + torch.ones(n, n)).log_prob(X)
    assert abs(float(post.log_evidence) - float(exact)) < 5 / ess**0.5
    # resampled draws: mean and sd of the posterior
    draws = post.sample(4000, generator=torch.Generator().manual_seed(0))["mu"]
    assert draws.shape == (4000, 1)
    se = sd * (1 / ess + 1 / 4000) ** 0.5
    assert abs(float(draws.mean()) - mean) < 5 * se
    assert abs(float(draws.std()) - sd) < 0.1 * sd


def test_per_datapoint_resampling():
    """Local latents: one posterior N(x_n / 2, 1 / sqrt 2) per datapoint."""
    K = 4000
    x = data()
    post = importance_posterior(fixed_model, guide, x, num_particles=K)
    assert post.effective_sample_size.shape == (4,)
    draws = post.sample(3000)["z"]
    assert draws.shape == (3000, 4)
    sd = 0.5**0.5
    se = sd * (1 / post.effective_sample_size + 1 / 3000) ** 0.5
    assert ((draws.mean(0) - x / 2).abs() < 5 * se).all()
    # each datapoint's draws come from its own particles
    for n in range(4):
        assert set(draws[:, n].tolist()) <= set(post.latents["z"][:, n].tolist())


def test_simulator_without_likelihood_samples_the_guide():
    def simulator(x=None):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        noise = torch.randn(())
        pyro.deterministic("x", theta + 0.1 * noise)

    conditioned = pyro.condition(simulator, {"x": torch.tensor(0.5)})

    def guide_only():
        pyro.sample("theta", dist.Normal(0.5, 0.1))

    with pytest.warns(UserWarning, match="cannot reweight"):
        post = importance_posterior(conditioned, guide_only, num_particles=2000)
    assert not post.reweighted and "deterministic" in post.reason
    expected = "ImportancePosterior(num_particles=2000, sites=['theta'], reweighted=False)"
    assert repr(post) == expected
    assert torch.equal(post.log_weights, torch.full((2000,), -math.log(2000)))
    with pytest.raises(ValueError, match="has none"):
        _ = post.log_evidence
    with pytest.raises(ValueError, match="has none"):
        _ = post.effective_sample_size
    theta = post.sample(1000)["theta"]
    assert abs(float(theta.mean()) - 0.5) < 5 * 0.1 / 1000**0.5 * 2


def test_zero_weights_are_an_error():
    x = torch.tensor([0.0, math.inf])  # density 0 for every particle
    with pytest.raises(ValueError, match="zero importance weight"):
        importance_posterior(global_model, wide_guide, x, num_particles=10)


def test_keep_particles_false():
    post = importance_posterior(
        global_model, wide_guide, data(), num_particles=100, keep_particles=False
    )
    assert isinstance(post, ImportancePosterior) and post.latents is None
    assert post.log_weights.shape == (100,)
    with pytest.raises(ValueError, match="keep_particles"):
        post.sample(3)


# --------------------------------------------------------------------------------------------
# sbibm-style simulators (see tests/test_simulation.py for the stand-ins' origin)
# --------------------------------------------------------------------------------------------
def test_sbibm_gaussian_linear_with_observations_keyword():
    """sbibm's model has no obs= and no arguments: condition it with observations=."""
    dim = 3
    prior_dist = dist.MultivariateNormal(torch.zeros(dim), precision_matrix=torch.eye(dim) / 0.1)

    def model():
        theta = pyro.sample("parameters", prior_dist.expand_by([1]))
        assert theta.ndim == 2
        pyro.sample("data", dist.MultivariateNormal(theta, precision_matrix=torch.eye(dim) / 0.1))

    seen = []

    def amortized(observations=None):
        seen.append(observations["data"])
        loc = observations["data"] / 2
        pyro.sample("parameters", dist.Normal(loc, 0.3).to_event(1))

    x_o = torch.tensor([[0.2, -0.3, 0.1]])
    post = importance_posterior(model, amortized, observations={"data": x_o}, num_particles=5000)
    assert seen and seen[0] is x_o
    # exact posterior: N(x / 2, 0.05 I)
    ess = float(post.effective_sample_size)
    draws = post.sample(3000)["parameters"]
    assert draws.shape == (3000, 3)  # sbibm's batch dim of 1 is the particle dim
    se = 0.05**0.5 * (1 / ess + 1 / 3000) ** 0.5
    assert ((draws.mean(0) - x_o[0] / 2).abs() < 5 * se).all()
    exact = dist.MultivariateNormal(torch.zeros(dim), 0.2 * torch.eye(dim)).log_prob(x_o[0])
    assert abs(float(post.log_evidence) - float(exact)) < 5 / ess**0.5


def test_sbibm_slcp_batch_shape_is_one_joint_likelihood():
    """slcp's data site has batch shape (B, 4), event 2, and no plate."""

    def model():
        theta = pyro.sample("parameters", dist.Normal(torch.zeros(1, 2), 1.0).to_event(1))
        n = theta.shape[0]
        d = dist.MultivariateNormal(theta.unsqueeze(1), torch.eye(2)).expand((n, 4))
        pyro.sample("data", d)

    def prior_guide(observations=None):
        pyro.sample("parameters", dist.Normal(torch.zeros(1, 2), 1.0).to_event(1))

    x_o = torch.tensor([[[0.5, 0.0], [1.0, -0.5], [0.2, 0.1], [0.9, 0.3]]])
    post = importance_posterior(
        model, prior_guide, observations={"data": x_o}, num_particles=20_000, chunk_size=4000
    )
    assert post.log_weights.shape == (20_000,)
    # exact: 4 draws with identity covariance: posterior N(sum x / 5, I / 5) per coordinate
    ess = float(post.effective_sample_size)
    mean = x_o[0].sum(0) / 5
    w = post.log_weights.exp()
    estimate = (w[:, None] * post.latents["parameters"].reshape(-1, 2)).sum(0)
    assert ((estimate - mean).abs() < 5 * 0.2**0.5 / ess**0.5).all()
