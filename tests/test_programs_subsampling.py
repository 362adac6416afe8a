# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Subsampled plates in the wake phase: the N/B scale acts outside the log-sum-exp, so the bound
with the exact posterior is exact, the minibatch loss is unbiased for the full-data loss, and
sequential particles share one minibatch.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from losses import BY_NAME, LOSSES

pytestmark = pytest.mark.usefixtures("float64")


# --------------------------------------------------------------------------------------------
# Subsampling: N/B outside the log-sum-exp
# --------------------------------------------------------------------------------------------
N_FULL, B = 8, 3
X8 = (0.3, -1.2, 2.0, 0.7, -0.4, 1.5, -2.2, 0.9)


def log_evidence(x):
    """log p(x_n) of ``sub_model``: z ~ N(0, 1), x ~ N(z, 1) => x ~ N(0, sqrt 2)."""
    return dist.Normal(0.0, 2.0**0.5).log_prob(x)


def make_sub_model(record=None, subsample_size=B):
    def model(x, subsample=None):
        with pyro.plate("data", len(x), subsample_size=subsample_size, subsample=subsample) as i:
            if record is not None:
                record.append(i.clone())
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[i])

    return model


def make_sub_guide(record=None, subsample_size=B, exact=True):
    def guide(x, subsample=None):
        a = pyro.param("a", torch.tensor(0.5 if exact else 0.2))
        s = pyro.param("s", torch.tensor(0.5**0.5 if exact else 1.2))
        with pyro.plate("data", len(x), subsample_size=subsample_size, subsample=subsample) as i:
            if record is not None:
                record.append(i.clone())
            pyro.sample("z", dist.Normal(a * x[i], s))

    return guide


@pytest.mark.parametrize("spec", [s for s in LOSSES if s.has_wake], ids=str)
@pytest.mark.parametrize("vectorize", [True, False])
def test_subsampled_bound_is_exact_with_the_exact_posterior(spec, vectorize):
    x = torch.tensor(X8)
    record = []
    loss = spec.make(vectorize, fantasy_args={"x": 0})
    for seed in range(3):
        pyro.set_rng_seed(seed)
        record.clear()
        value = loss.loss(make_sub_model(), make_sub_guide(record), x)
        idx = record[-1]
        assert idx.shape == (B,)
        expected = -(N_FULL / B) * log_evidence(x[idx]).sum()
        assert value == pytest.approx(expected.item(), rel=1e-10)
    # given indices
    idx = torch.tensor([1, 4, 7])
    value = loss.loss(make_sub_model(), make_sub_guide(), x, subsample=idx)
    expected = -(N_FULL / B) * log_evidence(x[idx]).sum()
    assert value == pytest.approx(expected.item(), rel=1e-10)
    idx = torch.tensor([2, 5])
    value = loss.loss(
        make_sub_model(subsample_size=None), make_sub_guide(subsample_size=None), x, subsample=idx
    )
    expected = -(N_FULL / 2) * log_evidence(x[idx]).sum()
    assert value == pytest.approx(expected.item(), rel=1e-10)
    if spec.returns_ess:
        assert loss.stats.ess.shape == (2,)


@pytest.mark.parametrize("name", ["rws-1", "ws-wake"])
def test_minibatch_loss_is_unbiased_for_the_full_data_loss(name):
    """
    With an inexact guide each loss is random; the minibatch loss (N/B) sum_{n in batch} -IWAE_n
    has the expectation of the full-data loss sum_n -IWAE_n (over minibatches and particles).
    Over m seeds the difference of the two means is ~ N(0, se_1^2 + se_2^2) (CLT, independent
    runs), so |diff| < 4 sqrt(se_1^2 + se_2^2) fails with probability about 6e-5. (4 se is about
    0.64 nats here; the N/B scale inside the log-sum-exp would be about 1.7 nats too high.)
    """
    x = torch.tensor(X8)
    m = 400
    loss = BY_NAME[name].make(True)
    runs = {}
    for size in (B, None):
        model = make_sub_model(subsample_size=size)
        guide = make_sub_guide(subsample_size=size, exact=False)
        values = []
        for seed in range(m):
            pyro.set_rng_seed(seed + (0 if size is None else 10_000))
            values.append(loss.loss(model, guide, x))
        runs[size] = torch.tensor(values)
    minibatch, full = runs[B], runs[None]
    se = (minibatch.var() / m + full.var() / m).sqrt()
    assert (minibatch.mean() - full.mean()).abs() < 4 * se
    assert full.std() < minibatch.std()  # minibatches add variance, no bias


@pytest.mark.parametrize("spec", LOSSES, ids=str)
def test_sequential_particles_share_the_minibatch(spec):
    x = torch.tensor(X8)
    model_idx, guide_idx = [], []
    loss = spec.make(False, num_sleep_particles=3, fantasy_args={"x": 0})
    loss.max_plate_nesting = 1  # no guessing run
    batches = []
    for seed in range(3):
        pyro.set_rng_seed(seed)
        model_idx.clear()
        guide_idx.clear()
        loss.loss(make_sub_model(model_idx), make_sub_guide(guide_idx, exact=False), x)
        runs = model_idx + guide_idx
        assert len(runs) >= 6
        assert all(torch.equal(i, runs[0]) for i in runs), runs
        batches.append(runs[0])
    assert not all(torch.equal(b, batches[0]) for b in batches)  # but fresh each step
