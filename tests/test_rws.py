# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The exact tests of :class:`pyro_rws.ReweightedWakeSleep` (pyro_rws/rws.py).
Expected gradients by enumeration, against the exact targets of tests/discrete.py (float64).
"""

from __future__ import annotations

import itertools

import pyro
import pyro.poutine as poutine
import pytest
import torch
from discrete import (
    PHI,
    THETA,
    X4,
    FixFantasies,
    X,
    assert_close,
    exact_joint_theta_grad,
    exact_sleep_phi_grad,
    exact_wake_phi_grad,
    exact_wake_theta_grad,
    expected_grad,
    fixed_trace,
    guide,
    guide_sub,
    init_params,
    iwae,
    joint_draws,
    log_guide_table,
    log_joint_table,
    model,
    model_sub,
    params,
    with_draws,
)

from pyro_rws import RWS


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
