# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The exact tests of the sleep phase: :class:`pyro_rws.SleepPhaseLoss` (pyro_rws/sleep_phase.py)
and the sleep-phi term of RWS and wake-sleep (pyro_rws/_sleep.py).
Expected gradients by enumeration, against the exact targets of tests/discrete.py (float64).
"""

from __future__ import annotations

import itertools

import pyro.poutine as poutine
import pytest
import torch
from discrete import (
    PHI,
    THETA,
    FixFantasies,
    X,
    assert_close,
    exact_sleep_phi_grad,
    fixed_trace,
    guide,
    init_params,
    log_joint_table,
    model,
    params,
)

from pyro_rws import RWS, SleepPhaseLoss, WakeSleepELBO


@pytest.fixture(autouse=True)
def discrete_params():
    init_params()


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
