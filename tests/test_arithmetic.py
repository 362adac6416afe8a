# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""The program-induction example of benchmarks/memoised.py: programs, exact marginal, and the
Pyro model against the plain-torch density."""

import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyro_rws import MemoisedWakeSleep
from pyro_rws.examples import arithmetic as A


@pytest.mark.parametrize("depth, count", [(2, 900), (3, 27000)])
def test_programs_and_their_outputs(depth, count):
    every = A.programs(depth)
    assert every.shape == (count, 2 * depth) and len(A.sites(depth)) == 2 * depth
    assert len(set(map(tuple, every.tolist()))) == count
    z = torch.tensor([2, 3, 1, 4] + [0, 5] * (depth - 2))  # (3 * i) - 4 (+ 5 ...)
    i = A.inputs(4, torch.zeros(1, dtype=torch.float64))
    expected = 3 * i - 4 + 5 * (depth - 2)
    assert torch.equal(A.evaluate(z, i), expected)
    assert "(3 * i) - 4" in A.describe(z)


@pytest.mark.parametrize("depth", [2, 3])
def test_log_marginal_is_the_sum_over_programs(depth):
    logits = A.true_logits(depth)
    logits = {k: v.double() for k, v in logits.items()}
    x, _ = A.simulate(3, 4, logits, seed=0)
    x = x.double()
    every = A.programs(depth)
    brute = torch.logsumexp(A.log_joint(every[:, None], x, logits), 0)
    torch.testing.assert_close(A.log_marginal(x, logits, chunk=1000), brute)


@pytest.mark.parametrize("depth", [2, 3])
def test_model_density_equals_log_joint(depth):
    pyro.clear_param_store()
    x, z = A.simulate(5, 4, A.true_logits(depth), seed=1)
    x = x.double()
    logits = A.prior_logits(x, depth)
    data = dict(zip(A.sites(depth), z.unbind(-1), strict=True))
    trace = poutine.trace(poutine.condition(A.model, data)).get_trace(x, depth=depth)
    trace.compute_log_prob()
    total = sum(site["log_prob"] for site in trace.nodes.values() if site["type"] == "sample")
    torch.testing.assert_close(total, A.log_joint(z, x, logits))


def test_depth3_trains_with_memoised_wake_sleep():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x, _ = A.simulate(6, 4, A.true_logits(3), seed=2)
    guide = A.Guide(4, hidden=8, depth=3)
    loss = MemoisedWakeSleep(memory_size=3, num_particles=3)
    value = loss.loss_and_grads(A.model, guide, x, torch.arange(6), 6, depth=3)
    assert torch.isfinite(torch.tensor(value))
    assert all(p.grad is not None for p in guide.parameters())
