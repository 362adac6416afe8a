# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
"Any Pyro program" works, by kind of plate: nested and two-dimensional batch plates, sequential
plates (Pyro issue #2220) alone, inside and around vectorized ones; weights are per element of
the plates that enclose every site, checked against hand computations from the particles the
guide drew.
"""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from programs import X4, ess, lme, train, wake_particles

from pyro_rws import RWS
from pyro_rws._traces import PARTICLE_PLATE

pytestmark = pytest.mark.usefixtures("float64")


# --------------------------------------------------------------------------------------------
# Batch plates: nested, two-dimensional
# --------------------------------------------------------------------------------------------
def nested_model(x):  # x: (N, D)
    with pyro.plate("data", x.shape[-2], dim=-2):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("features", x.shape[-1], dim=-1):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def make_nested_guide(record):
    def nested_guide(x):
        a = pyro.param("a", torch.tensor(0.5))
        with pyro.plate("data", x.shape[-2], dim=-2):
            z = pyro.sample("z", dist.Normal(a * x.mean(-1, keepdim=True), 0.8))
        record.append(z.detach())

    return nested_guide


@pytest.mark.parametrize("vectorize", [True, False])
def test_nested_plates_weights_per_datapoint(vectorize):
    pyro.set_rng_seed(5)
    x = torch.randn(3, 4)
    K = 4
    record = []
    loss = RWS(num_particles=K, vectorize_particles=vectorize, max_plate_nesting=2)
    value = loss.loss(nested_model, make_nested_guide(record), x)
    z = wake_particles(record, vectorize, K)  # (K, N, 1)
    assert z.shape == (K, 3, 1)
    log_p = dist.Normal(0.0, 1.0).log_prob(z)[..., 0] + dist.Normal(z, 1.0).log_prob(x).sum(-1)
    log_q = dist.Normal(0.5 * x.mean(-1, keepdim=True), 0.8).log_prob(z)[..., 0]
    log_w = log_p - log_q  # (K, N)
    assert loss.stats.ess.shape == (3,)
    assert torch.allclose(loss.stats.ess, ess(log_w))
    assert value == pytest.approx(-lme(log_w).sum().item(), rel=1e-10)


def grid_model(x):  # x: (N, M), one latent per cell
    with pyro.plate("rows", x.shape[-2], dim=-2), pyro.plate("cols", x.shape[-1], dim=-1):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def make_grid_guide(record):
    def grid_guide(x):
        with pyro.plate("rows", x.shape[-2], dim=-2), pyro.plate("cols", x.shape[-1], dim=-1):
            z = pyro.sample("z", dist.Normal(0.3 * x, 1.0))
        record.append(z.detach())

    return grid_guide


@pytest.mark.parametrize("vectorize", [True, False])
def test_two_batch_plates(vectorize):
    pyro.set_rng_seed(6)
    x = torch.randn(2, 3)
    K = 3
    record = []
    loss = RWS(num_particles=K, vectorize_particles=vectorize)
    value = loss.loss(grid_model, make_grid_guide(record), x)
    z = wake_particles(record[-(1 if vectorize else K) :], vectorize, K)
    log_w = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(z, 1.0).log_prob(x)
        - dist.Normal(0.3 * x, 1.0).log_prob(z)
    )
    assert loss.stats.ess.shape == (2, 3)
    assert torch.allclose(loss.stats.ess, ess(log_w))
    assert value == pytest.approx(-lme(log_w).sum().item(), rel=1e-10)
    train(
        RWS(num_particles=K, insomnia=0.5, vectorize_particles=vectorize),
        grid_model,
        make_grid_guide([]),
        x,
    )


# --------------------------------------------------------------------------------------------
# Sequential plates (Pyro issue #2220): weights per element
# --------------------------------------------------------------------------------------------
def seq_model(x):
    for i in pyro.plate("data", len(x)):
        z = pyro.sample(f"z_{i}", dist.Normal(0.0, 1.0))
        pyro.sample(f"x_{i}", dist.Normal(z, 1.0), obs=x[i])


def seq_guide(x):
    a = pyro.param("a", torch.tensor(0.4))
    for i in pyro.plate("data", x.shape[-1]):  # broadcasts over sleep particles
        pyro.sample(f"z_{i}", dist.Normal(a * x[..., i], 0.9))


def vec_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def vec_guide(x):
    a = pyro.param("a", torch.tensor(0.4))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(a * x, 0.9))


def test_sequential_plate_equals_vectorized_plate_on_the_same_particles():
    x = torch.tensor(X4)
    K, N = 5, len(X4)
    with pyro.plate(PARTICLE_PLATE, K, dim=-1):
        seq_trace = poutine.trace(seq_guide).get_trace(x)
    with pyro.plate(PARTICLE_PLATE, K, dim=-2):
        vec_trace = poutine.trace(vec_guide).get_trace(x)
    z = torch.stack([seq_trace.nodes[f"z_{i}"]["value"] for i in range(N)], -1)  # (K, N)
    vec_trace.nodes["z"]["value"] = z
    seq_loss, vec_loss = RWS(num_particles=K), RWS(num_particles=K)
    seq_value = seq_loss.loss(seq_model, poutine.replay(seq_guide, trace=seq_trace), x)
    vec_value = vec_loss.loss(vec_model, poutine.replay(vec_guide, trace=vec_trace), x)
    log_w = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(z, 1.0).log_prob(x)
        - dist.Normal(0.4 * x, 0.9).log_prob(z)
    )
    assert seq_value == pytest.approx(vec_value, rel=1e-12)
    assert seq_value == pytest.approx(-lme(log_w).sum().item(), rel=1e-12)
    assert seq_loss.stats.ess.shape == vec_loss.stats.ess.shape == (N,)
    assert torch.allclose(seq_loss.stats.ess, vec_loss.stats.ess)
    assert torch.allclose(seq_loss.stats.ess, ess(log_w))


def make_seq_recording_guide(record):
    def guide(x):
        zs = []
        for i in pyro.plate("data", len(x)):
            zs.append(pyro.sample(f"z_{i}", dist.Normal(0.4 * x[i], 0.9)))
        record.append(torch.stack(zs, -1).detach())

    return guide


@pytest.mark.parametrize("vectorize", [True, False])
def test_sequential_plate_weights_per_element(vectorize):
    x = torch.tensor(X4)
    K = 4
    record = []
    loss = RWS(num_particles=K, vectorize_particles=vectorize, max_plate_nesting=0)
    value = loss.loss(seq_model, make_seq_recording_guide(record), x)
    z = wake_particles(record, vectorize, K)
    log_w = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(z, 1.0).log_prob(x)
        - dist.Normal(0.4 * x, 0.9).log_prob(z)
    )
    assert loss.stats.ess.shape == (4,)
    assert torch.allclose(loss.stats.ess, ess(log_w))
    assert value == pytest.approx(-lme(log_w).sum().item(), rel=1e-10)


def seq_fantasies(fantasies, x):
    return (torch.stack([fantasies[f"x_{i}"] for i in range(len(x))], -1),), {}


def test_sequential_plate_trains(case):
    x = torch.tensor(X4)
    loss = case.make(num_sleep_particles=2, fantasy_args=seq_fantasies)
    train(loss, seq_model, seq_guide, x)
    if case.returns_ess:
        assert loss.stats.ess.shape == (4,)


def nested_seq_model(x):  # sequential feature plate inside the vectorized data plate
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        for j in pyro.plate("features", x.shape[1]):
            pyro.sample(f"x_{j}", dist.Normal(z, 1.0), obs=x[:, j])


def nested_vec_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        loc = z.unsqueeze(-1).expand(*z.shape, x.shape[-1])
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


def nested_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.3 * x.sum(-1), 0.8))


@pytest.mark.parametrize("vectorize", [True, False])
def test_sequential_plate_inside_vectorized_plate(vectorize):
    pyro.set_rng_seed(7)
    x = torch.randn(3, 2)
    losses, values = [], []
    for model in (nested_seq_model, nested_vec_model):
        loss = RWS(num_particles=4, vectorize_particles=vectorize)
        pyro.set_rng_seed(8)
        values.append(loss.loss(model, nested_guide, x))
        losses.append(loss)
    assert values[0] == pytest.approx(values[1], rel=1e-12)  # same seed, same particles
    assert losses[0].stats.ess.shape == losses[1].stats.ess.shape == (3,)
    assert torch.allclose(losses[0].stats.ess, losses[1].stats.ess)


def groups_model(x):  # x: (G, N); sequential groups, a vectorized plate in each
    for g in pyro.plate("groups", x.shape[0]):
        with pyro.plate(f"data_{g}", x.shape[1]):
            z = pyro.sample(f"z_{g}", dist.Normal(0.0, 1.0))
            pyro.sample(f"x_{g}", dist.Normal(z, 1.0), obs=x[g])


def make_groups_guide(record):
    def guide(x):
        zs = []
        for g in pyro.plate("groups", x.shape[0]):
            with pyro.plate(f"data_{g}", x.shape[1]):
                zs.append(pyro.sample(f"z_{g}", dist.Normal(0.5 * x[g], 0.8)))
        record.append(torch.stack(zs, -2).detach())

    return guide


@pytest.mark.parametrize("vectorize", [True, False])
def test_vectorized_plate_inside_sequential_plate(vectorize):
    pyro.set_rng_seed(9)
    x = torch.randn(2, 3)
    K = 4
    record = []
    loss = RWS(num_particles=K, vectorize_particles=vectorize, max_plate_nesting=1)
    value = loss.loss(groups_model, make_groups_guide(record), x)
    z = wake_particles(record, vectorize, K)  # (K, G, N)
    # the data plates differ per group, so only "groups" encloses every site: one joint
    # weight per group
    log_w = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(z, 1.0).log_prob(x)
        - dist.Normal(0.5 * x, 0.8).log_prob(z)
    ).sum(-1)
    assert loss.stats.ess.shape == (2,)
    assert torch.allclose(loss.stats.ess, ess(log_w))
    assert value == pytest.approx(-lme(log_w).sum().item(), rel=1e-10)
