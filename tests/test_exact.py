# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Exact expected gradients by enumeration (see tests/discrete.py).

For every K-tuple of guide draws (and every fantasy of the sleep phase) the library's
``differentiable_loss`` is evaluated with the draws fixed, and the probability-weighted sum of
its gradients -- the exact expectation of the estimator -- is compared with an independent
computation from probability tables. Agreement is to rounding error (float64), so a wrong
detach, a missing weight or a joint weight across the batch shows up at once.
"""

from __future__ import annotations

import itertools

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from discrete import (
    PHI,
    THETA,
    FixFantasies,
    expected_grad,
    fixed_trace,
    guide,
    init_params,
    iwae,
    joint_draws,
    log_guide_table,
    log_joint_table,
    model,
    params,
    tuples,
    with_draws,
)

from pyro_rws import RWS, SleepPhaseLoss, WakeSleepELBO

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


@pytest.fixture(autouse=True)
def discrete_params():
    init_params()


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("K", [2, 3])
def test_rws_wake_theta_and_value(K, vectorized):
    loss = RWS(K, max_plate_nesting=1, vectorize_particles=vectorized)
    grads, value = expected_grad(loss, X, K, THETA, vectorized)
    target_grads, target_value = exact_wake_theta_grad(K)
    assert_close(grads, target_grads)
    torch.testing.assert_close(value, target_value, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("K", [2, 3])
def test_rws_wake_phi(K, vectorized):
    loss = RWS(K, max_plate_nesting=1, vectorize_particles=vectorized)
    grads, _ = expected_grad(loss, X, K, PHI, vectorized)
    assert_close(grads, exact_wake_phi_grad(K))


def test_wake_phi_is_not_the_exact_kl_gradient_for_small_K():
    """Sanity of the reference: wake-phi is biased for finite K, so K=2 and K=3 differ."""
    g2, g3 = exact_wake_phi_grad(2)[0], exact_wake_phi_grad(3)[0]
    assert (g2 - g3).abs().max() > 1e-3


def test_per_datapoint_weights_not_joint():
    """The exact target distinguishes per-datapoint from whole-batch weights, and we match the
    per-datapoint one. Pyro's built-in ReweightedWakeSleep matches the joint one."""
    K = 2
    target, _ = exact_wake_theta_grad(K)
    joint = exact_joint_theta_grad(K)
    gap = max((t - j).abs().max().item() for t, j in zip(target, joint, strict=True))
    assert gap > 1e-3, "test model cannot tell joint from per-datapoint weights"
    ours, _ = expected_grad(RWS(K, max_plate_nesting=1), X, K, THETA)
    assert_close(ours, target)

    # Pyro's RWS returns a tuple and runs its own backward: accumulate its gradients by hand.
    pyro_rws_builtin = pyro.infer.ReweightedWakeSleep(num_particles=K, max_plate_nesting=1)
    expected = [torch.zeros_like(p) for p in params(THETA)]
    for z, prob in joint_draws(X, K):
        for p in params(THETA + PHI):
            p.grad = None
        with pyro.validation_enabled(False):  # its shape check rejects replayed draws
            pyro_rws_builtin.loss_and_grads(model, with_draws(guide, z), X)
        for acc, p in zip(expected, params(THETA), strict=True):
            acc += prob * p.grad
    assert_close(expected, joint)


@pytest.mark.parametrize("loss_fn", ["rws", "sleep_phase", "wake_sleep"])
@pytest.mark.parametrize("vectorized", [True, False])
def test_sleep_phi(loss_fn, vectorized):
    """Enumerate the fantasies (z_n, x_n) of both datapoints; data only fixes the batch size."""
    make = {
        "rws": lambda: RWS(2, insomnia=0.0, max_plate_nesting=1, vectorize_particles=vectorized),
        "sleep_phase": lambda: SleepPhaseLoss(max_plate_nesting=1, vectorize_particles=vectorized),
        "wake_sleep": lambda: WakeSleepELBO(
            2, phase_q="sleep", max_plate_nesting=1, vectorize_particles=vectorized
        ),
    }
    loss = make[loss_fn]()
    log_p = log_joint_table().detach()
    total = 0.0
    for flat in itertools.product(range(2), range(3), range(2), range(3)):
        x_f = torch.tensor(flat[0::2], dtype=X.dtype)
        z_f = torch.tensor(flat[1::2])
        prob = log_p[x_f.long(), z_f].sum().exp()
        shape = (1, len(X)) if vectorized else (len(X),)
        with FixFantasies({"x": x_f.reshape(shape), "z": z_f.reshape(shape)}):
            if loss_fn == "sleep_phase":
                total = total + prob * loss.differentiable_loss(model, guide, X)
            else:  # the wake phase's draws are fixed too (they do not matter for phi here)
                wake = fixed_trace(z=torch.zeros((2, 2) if vectorized else (2,), dtype=torch.long))
                fixed_guide = poutine.replay(guide, trace=wake)
                total = total + prob * loss.differentiable_loss(model, fixed_guide, X)
    # RWS(insomnia=0) and wake-sleep give phi the sleep-phi gradient only
    assert_close(torch.autograd.grad(total, params(PHI)), exact_sleep_phi_grad(len(X)))


def test_sleep_phase_gives_model_no_gradient():
    loss = SleepPhaseLoss(3, max_plate_nesting=1, vectorize_particles=False)
    value = loss.differentiable_loss(model, guide, X)
    value.backward()
    assert all(p.grad is None for p in params(THETA))
    assert all(p.grad is not None for p in params(PHI))


@pytest.mark.parametrize("K", [1, 2])
def test_wake_sleep_wake_theta(K):
    """Classic wake-theta: -(1/K) sum_k grad log p(x, z_k) has expectation -grad E_q log p."""
    loss = WakeSleepELBO(K, max_plate_nesting=1)
    lp, lq = log_joint_table(), log_guide_table().detach()
    target = -(lq[X.long()].exp() * lp[X.long()]).sum()
    expected = torch.autograd.grad(target, params(THETA))
    total = 0.0
    for z, prob in joint_draws(X, K):
        # phase_q="sleep" adds a sleep term that does not touch theta; fix its fantasies anyway
        total = total + prob * loss.differentiable_loss(model, with_draws(guide, z), X)
    assert_close(torch.autograd.grad(total, params(THETA)), expected)


def test_wake_sleep_value_is_negative_elbo():
    loss = WakeSleepELBO(2, max_plate_nesting=1)
    lp, lq = log_joint_table(), log_guide_table()
    elbo = (lq[X.long()].exp() * (lp[X.long()] - lq[X.long()])).sum()
    total = 0.0
    for z, prob in joint_draws(X, 2):
        total = total + prob * loss.loss(model, with_draws(guide, z), X)
    assert abs(total + elbo.item()) < 1e-10


@pytest.mark.parametrize("K", [2, 3])
def test_wake_sleep_wake_phi_equals_rws_wake_phi(K):
    grads, _ = expected_grad(WakeSleepELBO(K, phase_q="wake", max_plate_nesting=1), X, K, PHI)
    assert_close(grads, exact_wake_phi_grad(K))


@pytest.mark.slow  # 81 x 36 loss evaluations: 5 s on an idle core, 30 s on a busy one
def test_insomnia_mixes_wake_and_sleep_phi():
    """phi gradient of RWS(insomnia=a) = a * wake-phi + (1 - a) * sleep-phi, in expectation."""
    K, a = 2, 0.3
    loss = RWS(K, insomnia=a, max_plate_nesting=1)
    log_p = log_joint_table().detach()
    total = 0.0
    for z, prob_z in joint_draws(X, K):
        for flat in itertools.product(range(2), range(3), range(2), range(3)):
            x_f = torch.tensor(flat[0::2], dtype=X.dtype)
            z_f = torch.tensor(flat[1::2])
            prob = prob_z * log_p[x_f.long(), z_f].sum().exp()
            with FixFantasies({"x": x_f.reshape(1, 2), "z": z_f.reshape(1, 2)}):
                total = total + prob * loss.differentiable_loss(model, with_draws(guide, z), X)
    grads = torch.autograd.grad(total, params(PHI))
    wake, sleep = exact_wake_phi_grad(K), exact_sleep_phi_grad(len(X))
    assert_close(grads, [a * w + (1 - a) * s for w, s in zip(wake, sleep, strict=True)])


def test_insomnia_mixes_wake_and_sleep_phi_one_datapoint():
    """
    The same identity as ``test_insomnia_mixes_wake_and_sleep_phi`` (marked slow) on the first
    datapoint alone: 9 x 6 loss evaluations instead of 81 x 36, in the default run.
    """
    K, a = 2, 0.3
    x = X[:1]
    loss = RWS(K, insomnia=a, max_plate_nesting=1)
    log_p = log_joint_table().detach()
    total = 0.0
    for z, prob_z in joint_draws(x, K):
        for x_f, z_f in itertools.product(range(2), range(3)):
            prob = prob_z * log_p[x_f, z_f].exp()
            fantasy = {"x": torch.tensor([[float(x_f)]], dtype=X.dtype), "z": torch.tensor([[z_f]])}
            with FixFantasies(fantasy):
                total = total + prob * loss.differentiable_loss(model, with_draws(guide, z), x)
    grads = torch.autograd.grad(total, params(PHI))
    wake, sleep = exact_wake_phi_grad(K, x), exact_sleep_phi_grad(len(x))
    assert_close(grads, [a * w + (1 - a) * s for w, s in zip(wake, sleep, strict=True)])


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


@pytest.mark.parametrize("vectorized", [True, False])
def test_subsampled_value_and_gradients_are_unbiased(vectorized):
    K, B = 2, 2
    loss = RWS(K, max_plate_nesting=1, vectorize_particles=vectorized)
    minibatches = list(itertools.combinations(range(len(X4)), B))
    lq = log_guide_table().detach()
    total = 0.0
    for idx in minibatches:
        idx = torch.tensor(idx)
        for flat in itertools.product(range(3), repeat=K * B):
            z = torch.tensor(flat).reshape(K, B)
            prob = lq[X4[idx].long().expand(K, B), z].sum().exp() / len(minibatches)
            if vectorized:
                fixed = poutine.replay(guide_sub, trace=fixed_trace(data=idx, z=z))
            else:
                draws = iter(z)

                def fixed(x, batch, idx=idx, draws=draws):
                    trace = fixed_trace(data=idx, z=next(draws))
                    return poutine.replay(guide_sub, trace=trace)(x, batch)

            total = total + prob * loss.differentiable_loss(model_sub, fixed, X4, B)
    grads = torch.autograd.grad(total, params(THETA + PHI))

    # full data, exact: every datapoint of X4 with its own K-tuple
    full_value = -sum(iwae(int(x), K) for x in X4)
    full_theta = torch.autograd.grad(
        -sum(iwae(int(x), K, detach_q=True) for x in X4), params(THETA)
    )
    torch.testing.assert_close(total.detach(), full_value.detach(), rtol=1e-10, atol=1e-10)
    assert_close(grads[: len(THETA)], full_theta)
    # wake-phi: X4 holds each of x=0 and x=1 twice, so its gradient is twice that on X
    assert_close(grads[len(THETA) :], [2 * g for g in exact_wake_phi_grad(K)])


def test_float32_matches_float64():
    """The same exact check in float32, to float32 rounding."""
    pyro.clear_param_store()
    init_params(torch.float32)
    x = X.float()
    grads, _ = expected_grad(RWS(2, max_plate_nesting=1), x, 2, THETA)
    assert all(g.dtype == torch.float32 for g in grads)
    pyro.clear_param_store()
    init_params(torch.float64)
    target, _ = exact_wake_theta_grad(2)
    for g, t in zip(grads, target, strict=True):
        torch.testing.assert_close(g.double(), t, rtol=1e-5, atol=1e-6)
