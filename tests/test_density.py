# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
pyro_rws._density.log_density against each distribution's own log_prob: the same numbers and
gradients, bit for bit, on the Bernoulli fast path and everywhere else.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_rws._density import log_density

F64 = torch.float64


@pytest.fixture(autouse=True)
def no_validation():
    """Distributions without argument validation, as in training (the fast paths need it)."""
    pyro.enable_validation(False)
    yield
    pyro.enable_validation(True)


class OwnBernoulli(dist.Bernoulli):
    """A subclass with its own log_prob: never takes the fast path."""

    def log_prob(self, value):
        return super().log_prob(value) + 1.0


def _site(fn, value):
    return {"fn": fn, "value": value, "args": (), "kwargs": {}}


def _cases(logits, value):
    K, B, D = logits.shape
    x = value[0]  # (B, D): broadcast against (K, B, D) logits, as observed data is
    return {
        "to_event(1)": (dist.Bernoulli(logits=logits).to_event(1), value),
        "broadcast value": (dist.Bernoulli(logits=logits).to_event(1), x),
        "to_event(2)": (dist.Bernoulli(logits=logits).to_event(2), value),
        "nested Independent": (dist.Bernoulli(logits=logits).to_event(1).to_event(1), value),
        "probs": (dist.Bernoulli(probs=torch.sigmoid(logits)).to_event(1), value),
        "expanded": (
            dist.Bernoulli(logits=logits[0, 0]).expand([K, B, D]).to_event(1),
            value,
        ),
        "torch Independent": (
            torch.distributions.Independent(torch.distributions.Bernoulli(logits=logits), 1),
            value,
        ),
        "no event dims": (dist.Bernoulli(logits=logits), value),
        "subclass": (OwnBernoulli(logits=logits).to_event(1), value),
        "Normal": (dist.Normal(logits, 1.0).to_event(1), value),
    }


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("case", list(_cases(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))))
def test_same_as_log_prob(case, dtype):
    pyro.set_rng_seed(0)
    logits = torch.randn(3, 5, 4, dtype=dtype, requires_grad=True)
    draws = torch.bernoulli(torch.sigmoid(logits.detach()))
    fn, value = _cases(logits, draws)[case]
    expected = fn.log_prob(value)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    fn, value = _cases(logits, draws)[case]  # a fresh distribution (no cached lazy properties)
    actual = log_density(_site(fn, value))
    (actual_grad,) = torch.autograd.grad(actual.sum(), logits)
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    assert torch.equal(actual, expected)
    assert torch.equal(actual_grad, expected_grad)


def _categorical_cases(logits, value):
    return {
        "logits": (dist.Categorical(logits=logits), value),
        "probs": (dist.Categorical(probs=torch.softmax(logits, -1)), value),
        "torch": (torch.distributions.Categorical(logits=logits), value),
        "broadcast value": (dist.Categorical(logits=logits), value[0]),
        "scalar": (dist.Categorical(logits=logits[0, 0]), value[0, 0]),
        "expanded": (dist.Categorical(logits=logits[0, 0]).expand([3, 5]), value),
        "to_event": (dist.Categorical(logits=logits).to_event(1), value),
    }


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("case", list(_categorical_cases(torch.zeros(3, 5, 4), torch.zeros(3, 5))))
def test_categorical_same_as_log_prob(case, dtype):
    pyro.set_rng_seed(0)
    logits = torch.randn(3, 5, 4, dtype=dtype, requires_grad=True)
    draws = torch.randint(4, (3, 5))
    fn, value = _categorical_cases(logits, draws)[case]
    expected = fn.log_prob(value)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    fn, value = _categorical_cases(logits, draws)[case]
    actual = log_density(_site(fn, value))
    (actual_grad,) = torch.autograd.grad(actual.sum(), logits)
    assert actual.shape == expected.shape
    assert torch.equal(actual, expected)
    assert torch.equal(actual_grad, expected_grad)


def test_categorical_validation_reports_values_outside_the_support():
    fn = dist.Categorical(logits=torch.zeros(4), validate_args=True)
    with pytest.raises(ValueError, match="support"):
        log_density(_site(fn, torch.tensor(7)))


def test_validation_reports_values_outside_the_support():
    """With argument validation the distribution's own log_prob runs (and its checks)."""
    fn = dist.Bernoulli(logits=torch.zeros(4), validate_args=True).to_event(1)
    with pytest.raises(ValueError, match="support"):
        log_density(_site(fn, torch.full((4,), 0.5)))
