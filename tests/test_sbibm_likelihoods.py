# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The likelihoods that benchmarks/sbibm_c2st.py writes for sbibm tasks whose simulator does not
score its data (the reweighted contender uses them as ``importance_posterior``'s model): the
two-moons density and the Bernoulli GLM's likelihood of its summary statistics. They run without
sbibm, on stand-ins of its task objects.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import types

import pyro.distributions as dist
import pytest
import torch

pytestmark = pytest.mark.usefixtures("float64")
SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "sbibm_c2st.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("sbibm_c2st", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def glm_task(tmp_path, num_bins=20, dim=4):
    """sbibm's bernoulli_glm task as far as the script uses it: a design matrix file (a column of
    ones, then lagged stimulus) and the simulator's loop (spikes, then their sufficient stats)."""
    g = torch.Generator().manual_seed(0)
    stimulus = torch.randn(num_bins, generator=g, dtype=torch.float32)
    design = torch.ones(num_bins, dim, dtype=torch.float32)  # sbibm's file: float32
    for lag in range(1, dim):
        design[lag - 1 :, lag] = stimulus[: num_bins - lag + 1]
    (tmp_path / "files").mkdir()
    torch.save(design, tmp_path / "files" / "design_matrix.pt")

    def simulator(parameters):
        data = []
        for b in range(parameters.shape[0]):  # as sbibm writes it: one spike train per row
            z = 1 / (1 + torch.exp(-(design @ parameters[b, :])))
            y = (torch.rand(num_bins) < z).float()
            data.append(y @ design)
        return torch.stack(data)

    return types.SimpleNamespace(path=tmp_path, get_simulator=lambda: simulator), design, simulator


def test_bernoulli_glm_log_prob_is_the_spike_train_likelihood(script, tmp_path):
    """θ·T − Σ softplus(Xθ) equals log p(y | θ) for every spike train y with Xᵀy = T: the
    density of T is this times a count that does not depend on θ, so self-normalized weights
    are exact."""
    task, design, _ = glm_task(tmp_path)
    glm = script.bernoulli_glm_distribution(task)
    theta = torch.randn(7, 4)
    y = torch.bernoulli(torch.full((7, design.shape[0]), 0.3, dtype=torch.float64))
    expected = dist.Bernoulli(logits=theta @ design.double().T).log_prob(y).sum(-1)
    actual = glm(theta).log_prob(y @ design.double())
    assert actual.shape == (7,)
    assert torch.allclose(actual, expected, rtol=0, atol=1e-12)


def test_bernoulli_glm_sample_is_the_simulator(script, tmp_path):
    """``sample`` runs sbibm's simulator itself: the same random stream, the same data, and the
    batch shape of the parameters (a particle plate) kept."""
    task, _, simulator = glm_task(tmp_path)
    glm = script.bernoulli_glm_distribution(task)
    theta = torch.randn(3, 5, 4)
    torch.manual_seed(1)
    expected = simulator(theta.reshape(-1, 4).float()).reshape(3, 5, 4)
    torch.manual_seed(1)
    actual = glm(theta).sample()
    assert actual.dtype == theta.dtype and actual.shape == (3, 5, 4)
    assert torch.equal(actual, expected.double())
    assert glm(theta[0]).expand((2, 5)).sample().shape == (2, 5, 4)


def test_two_moons_density_integrates_to_one_and_scores_its_samples(script):
    """The two-moons density (a ring of radius N(0.1, 0.01) over a half circle, shifted by the
    parameters) integrates to 1 on a grid, and its own samples lie in its support."""
    moons = script.two_moons_distribution()(torch.tensor([0.3, -0.2]))
    shift = moons._shift()
    step = 5e-4
    u = torch.arange(-0.2, 0.2, step, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(u + 0.25, u, indexing="ij"), -1) + shift
    mass = moons.log_prob(grid).exp().sum() * step**2
    assert abs(float(mass) - 1) < 2e-3
    x = moons.sample((1000,))
    assert x.shape == (1000, 2) and torch.isfinite(moons.log_prob(x)).all()
    # the half-ring is the right half around (0.25, 0) + shift: no mass on the left
    assert math.isinf(float(moons.log_prob(shift + torch.tensor([0.15, 0.0]))))
