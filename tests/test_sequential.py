# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Sequential particles (``vectorize_particles=False``) on programs whose structure changes from
run to run: the structure check remembers structures that passed (by a key of sites, plates and
flags) and still catches a new structure that does not, and tutorial 3's simulator
(``pyro_rws.examples.objects``) trains with every sequential loss. The exact tests of each
estimator with sequential particles are in the per-estimator files (tests/discrete.py).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_rws import RWS, VIMCO, SleepPhaseLoss, WakeSleepELBO
from pyro_rws._structure import _CHECKED
from pyro_rws.examples.objects import (
    MAX_OBJECTS,
    NUM_PIXELS,
    Proposal,
    exact_posterior,
    simulate,
    simulator,
)

pytestmark = pytest.mark.usefixtures("float64")

LOSSES = {
    "sleep": lambda: SleepPhaseLoss(4, vectorize_particles=False),
    "rws": lambda: RWS(4, vectorize_particles=False),
    "rws-0.5": lambda: RWS(4, insomnia=0.5, vectorize_particles=False),
    "ws": lambda: WakeSleepELBO(4, vectorize_particles=False),
    "vimco": lambda: VIMCO(4, vectorize_particles=False),
}


def _model(x):
    n = pyro.sample("n", dist.Categorical(torch.tensor([0.5, 0.5])))
    for i in range(int(n) + 1):
        pyro.sample(f"z_{i}", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)


def _guide_missing_z1(x):
    """Samples ``n`` from its prior but never ``z_1``: wrong only in runs where n = 1."""
    n = pyro.sample("n", dist.Categorical(torch.tensor([0.5, 0.5])))
    pyro.sample("z_0", dist.Normal(0.0, 1.0))
    del n


@pytest.mark.parametrize("name", ["sleep", "rws"])
def test_a_structure_that_fails_is_caught_after_structures_that_passed(name):
    # n = 0 (passes, and is remembered) and n = 1 (z_1 missing) both occur among 20 runs
    loss = LOSSES[name]()
    x = torch.tensor(0.5)
    with pytest.raises(ValueError, match="z_1"):
        for _ in range(5):
            loss.differentiable_loss(_model, _guide_missing_z1, x)


def test_the_check_remembers_structures_and_the_steps_agree():
    # two steps from the same seed, the second with the structures already remembered: the
    # same loss and gradient as with an empty memory
    proposal = Proposal()
    placeholder = torch.zeros(NUM_PIXELS)
    grads = []
    for clear in (True, False):
        if clear:
            _CHECKED.clear()
        pyro.set_rng_seed(3)
        proposal.zero_grad()
        loss = SleepPhaseLoss(8, vectorize_particles=False)
        loss.differentiable_loss(simulator, proposal.guide, placeholder).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in proposal.parameters()]))
    assert _CHECKED
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_objects_simulator_trains_with_sequential_particles(name):
    proposal = Proposal(hidden=8)
    loss = LOSSES[name]()
    signal = simulate(1, seed=0)[0][0]
    optim = torch.optim.Adam(proposal.parameters(), lr=1e-2)
    for _ in range(3):
        optim.zero_grad()
        value = loss.differentiable_loss(simulator, proposal.guide, signal)
        value.backward()
        optim.step()
        assert math.isfinite(float(value.detach()))
    assert all(p.grad is not None for p in proposal.count.parameters())


def test_objects_exact_posterior_is_a_distribution():
    signal, n, locs = simulate(1, seed=1)[0]
    assert signal.dtype == torch.float64 and len(locs) == n
    p_n, density = exact_posterior(signal)
    assert p_n.shape == (MAX_OBJECTS + 1,) and density.shape == (NUM_PIXELS,)
    assert torch.allclose(p_n.sum(), torch.tensor(1.0, dtype=torch.float64))
    # the expected number of objects, two ways
    expected_n = (p_n * torch.arange(MAX_OBJECTS + 1, dtype=torch.float64)).sum()
    assert torch.allclose(density.sum(), expected_n)
