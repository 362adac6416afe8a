# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The exact tests of :class:`pyro_rws.WakeSleepELBO` (pyro_rws/wake_sleep.py).
Expected gradients by enumeration, against the exact targets of tests/discrete.py (float64).
"""

from __future__ import annotations

import pytest
import torch
from discrete import (
    PHI,
    THETA,
    X,
    assert_close,
    exact_wake_phi_grad,
    expected_grad,
    guide,
    init_params,
    joint_draws,
    log_guide_table,
    log_joint_table,
    model,
    params,
    with_draws,
)

from pyro_rws import WakeSleepELBO


@pytest.fixture(autouse=True)
def discrete_params():
    init_params()


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
