# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from discrete import PHI, THETA, expected_grad, init_params, iwae, params

from pyro_rws import RWS, VIMCO
from pyro_rws.vimco import leave_one_out_bounds

X = torch.tensor([0.0, 1.0], dtype=torch.float64)


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize(
    "K, baseline", [(2, "leave-one-out"), (3, "leave-one-out"), (1, None), (2, None), (3, None)]
)
def test_expected_gradient_is_exact_gradient_of_expected_bound(K, baseline, vectorized):
    """VIMCO, and REINFORCE (``baseline=None``), are unbiased for grad E[IWAE_K], in theta and
    in phi (enumerating K-tuples)."""
    init_params()
    loss = VIMCO(K, max_plate_nesting=1, vectorize_particles=vectorized, baseline=baseline)
    grads, value = expected_grad(loss, X, K, THETA + PHI, vectorized)
    target = -sum(iwae(int(x), K) for x in X)
    for g, t in zip(grads, torch.autograd.grad(target, params(THETA + PHI)), strict=True):
        torch.testing.assert_close(g, t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(value, target.detach(), rtol=1e-10, atol=1e-12)


def test_leave_one_out_baselines():
    log_w = torch.randn(5, 3, dtype=torch.float64)
    baselines = leave_one_out_bounds(log_w)
    for k in range(5):
        replaced = log_w.clone()
        replaced[k] = (log_w.sum(0) - log_w[k]) / 4
        torch.testing.assert_close(baselines[k], torch.logsumexp(replaced, 0) - math.log(5))
    # a dominant particle does not make its baseline collapse numerically
    log_w = torch.tensor([[800.0], [0.0], [1.0]], dtype=torch.float64)
    log3 = math.log(3)
    first = torch.logsumexp(torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64), 0) - log3
    expected = torch.tensor([[first], [800.0 - log3], [800.0 - log3]], dtype=torch.float64)
    torch.testing.assert_close(leave_one_out_bounds(log_w), expected, rtol=1e-12, atol=1e-12)


def test_needs_two_particles():
    with pytest.raises(ValueError, match="at least 2"):
        VIMCO(1)


def test_baseline_argument():
    with pytest.raises(ValueError, match="baseline must be 'leave-one-out' or None"):
        VIMCO(2, baseline="mean")


def test_reinforce_differs_from_vimco_only_in_the_guide_gradient():
    """Same draws: the same value and model gradient; the guide gradient's learning signal
    is the bound itself, not the bound less the leave-one-out baseline."""
    init_params()
    grads = []
    for baseline in ("leave-one-out", None):
        pyro.set_rng_seed(3)
        loss = VIMCO(3, max_plate_nesting=1, baseline=baseline)
        value = loss.differentiable_loss(_discrete_model, _discrete_guide, X)
        grads.append((value, torch.autograd.grad(value, params(THETA + PHI))))
    (v0, g0), (v1, g1) = grads
    torch.testing.assert_close(v0, v1)
    for a, b in zip(g0[: len(THETA)], g1[: len(THETA)], strict=True):
        torch.testing.assert_close(a, b)
    assert any(
        not torch.allclose(a, b) for a, b in zip(g0[len(THETA) :], g1[len(THETA) :], strict=True)
    )


def test_theta_gradient_equals_rws_wake_theta():
    """For the same draws VIMCO's model gradient is the RWS wake-theta gradient."""
    init_params()
    grads = []
    for loss in (VIMCO(3, max_plate_nesting=1), RWS(3, max_plate_nesting=1)):
        pyro.set_rng_seed(3)
        value = loss.differentiable_loss(_discrete_model, _discrete_guide, X)
        grads.append(torch.autograd.grad(value, params(THETA)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def _discrete_model(x):
    from discrete import model

    model(x)


def _discrete_guide(x):
    from discrete import guide

    guide(x)


# ------------------------------------------------------------------------------------------
# a guide mixing a discrete site (score function) and a reparameterized one (pathwise)
# ------------------------------------------------------------------------------------------
def mixed_model(x):
    a = pyro.param("a", torch.tensor(0.3, dtype=x.dtype))
    m = pyro.param("m", torch.tensor([-1.0, 2.0], dtype=x.dtype))
    with pyro.plate("data", len(x)):
        d = pyro.sample("d", dist.Bernoulli(logits=a))
        z = pyro.sample("z", dist.Normal(m[d.long()], 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def mixed_guide(x):
    u = pyro.param("u", torch.tensor([0.2, -0.5], dtype=x.dtype))
    v = pyro.param("v", torch.tensor([0.1, 0.4, 1.5], dtype=x.dtype))
    s = pyro.param("s", torch.tensor(-0.3, dtype=x.dtype))
    with pyro.plate("data", len(x)):
        d = pyro.sample("d", dist.Bernoulli(logits=u[0] + u[1] * x))
        pyro.sample("z", dist.Normal(v[0] + v[1] * x + v[2] * d, s.exp()))


MIXED_PHI = ("u", "v", "s")


def reference_gradient(x0: float, K: int, num_eps: int, groups: int):
    """
    grad_phi E[IWAE_K(x0)]: the discrete draws d_1..d_K enumerated exactly (their probability
    is differentiated analytically), the Normal draws reparameterized with many common random
    numbers. Returns the mean and standard error over ``groups`` independent groups.
    """
    x = torch.tensor([x0], dtype=torch.float64)
    mixed_model(x), mixed_guide(x)  # create params
    a, m = pyro.param("a"), pyro.param("m")
    u, v, s = pyro.param("u"), pyro.param("v"), pyro.param("s")
    estimates = []
    for _ in range(groups):
        eps = torch.randn(num_eps // groups, K, dtype=torch.float64)
        total = 0.0
        for bits in range(2**K):
            d = torch.tensor([(bits >> k) & 1 for k in range(K)], dtype=torch.float64)
            log_qd = dist.Bernoulli(logits=u[0] + u[1] * x0).log_prob(d).sum()
            loc = v[0] + v[1] * x0 + v[2] * d
            z = loc + s.exp() * eps  # (M, K)
            log_p = (
                dist.Bernoulli(logits=a).log_prob(d)
                + dist.Normal(m[d.long()], 1.0).log_prob(z)
                + dist.Normal(z, 1.0).log_prob(torch.tensor(x0, dtype=torch.float64))
            )
            log_q = dist.Bernoulli(logits=u[0] + u[1] * x0).log_prob(d) + dist.Normal(
                loc, s.exp()
            ).log_prob(z)
            bound = (torch.logsumexp(log_p - log_q, -1) - math.log(K)).mean()
            total = total + log_qd.exp() * bound
        grads = torch.autograd.grad(-total, params(MIXED_PHI))
        estimates.append(torch.cat([g.reshape(-1) for g in grads]))
    est = torch.stack(estimates)
    return est.mean(0), est.std(0) / math.sqrt(groups)


def test_mixed_guide_against_high_sample_reference():
    K, x0 = 3, 1.3
    ref, ref_se = reference_gradient(x0, K, num_eps=200_000, groups=10)
    loss = VIMCO(K, max_plate_nesting=1)
    copies, repeats = 4000, 10
    x = torch.full((copies,), x0, dtype=torch.float64)
    estimates = []
    for _ in range(repeats):
        value = loss.differentiable_loss(mixed_model, mixed_guide, x)
        grads = torch.autograd.grad(value, params(MIXED_PHI))
        estimates.append(torch.cat([g.reshape(-1) for g in grads]) / copies)
    est = torch.stack(estimates)
    mean, se = est.mean(0), est.std(0) / math.sqrt(repeats)
    # Both are averages of independent estimates: their difference has standard error
    # sqrt(se^2 + ref_se^2); 4.5 of those leaves a false-alarm rate below 1e-4 per component.
    tolerance = 4.5 * (se.square() + ref_se.square()).sqrt()
    assert ((mean - ref).abs() < tolerance).all(), (mean, ref, tolerance)
    # and the test has power: the tolerance is small next to the gradient itself
    assert (tolerance < 0.25 * ref.abs().clamp(min=0.05)).all(), (ref, tolerance)
