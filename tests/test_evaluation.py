# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from discrete import guide, init_params, iwae, log_joint_table, model

from pyro_rws import log_evidence

X = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)


def exact_log_evidence(x):
    return torch.logsumexp(log_joint_table()[x.long()], -1)


def set_guide_to_posterior():
    with torch.no_grad():
        pyro.param("table").unconstrained().copy_(log_joint_table())


@pytest.mark.parametrize("K, chunk", [(1, 100), (7, 3), (50, 50)])
def test_exact_with_posterior_guide(K, chunk):
    """Every weight equals p(x) when q is the posterior: the estimate is exact for any K."""
    init_params()
    set_guide_to_posterior()
    result = log_evidence(model, guide, X, num_particles=K, chunk_size=chunk)
    assert result.shape == X.shape
    assert not result.requires_grad
    torch.testing.assert_close(result, exact_log_evidence(X), rtol=1e-12, atol=1e-12)


def test_increases_with_K_and_matches_exact_expectation():
    """The mean over many iid datapoints matches E[IWAE_K] (exact), which rises with K."""
    init_params()
    x = torch.tensor([1.0] * 4000, dtype=torch.float64)
    means = []
    for K in (1, 2, 3):
        est = log_evidence(model, guide, x, num_particles=K, chunk_size=2)
        mean, se = est.mean(), est.std() / math.sqrt(len(est))
        exact = iwae(1, K).item()
        assert abs(mean.item() - exact) < 4.5 * se.item(), (K, mean, exact, se)
        means.append(exact)
    assert means[0] < means[1] < means[2] < exact_log_evidence(torch.tensor([1.0])).item()


def test_subsampled_plate_gives_minibatch_estimates():
    init_params()
    set_guide_to_posterior()
    data = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)

    def model_sub(x):
        prior, emit = pyro.param("prior"), pyro.param("emit")
        with pyro.plate("data", len(x), subsample_size=2) as idx:
            z = pyro.sample("z", dist.Categorical(logits=prior))
            pyro.sample("x", dist.Bernoulli(logits=emit[z]), obs=x[idx])
        return idx

    def guide_sub(x):
        table = pyro.param("table")
        with pyro.plate("data", len(x), subsample_size=2) as idx:
            pyro.sample("z", dist.Categorical(logits=table[x[idx].long()]))

    pyro.set_rng_seed(1)
    result = log_evidence(model_sub, guide_sub, data, num_particles=10, chunk_size=4)
    assert result.shape == (2,)
    # every chunk used the same minibatch, so the estimate is exact for those two points
    values = {round(v, 10) for v in exact_log_evidence(data).tolist()}
    assert {round(v, 10) for v in result.tolist()} <= values


def test_bad_arguments():
    init_params()
    with pytest.raises(ValueError, match="num_particles"):
        log_evidence(model, guide, X, num_particles=0)
    with pytest.raises(ValueError, match="chunk_size"):
        log_evidence(model, guide, X, chunk_size=0)
