# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The tests of :class:`pyro_rws.MemoisedWakeSleep` (pyro_rws/memoised.py): exact tests by
enumeration on a small categorical model (float64), the unbiasedness of HMWS's marginal
estimates (tolerance from the standard error), the memory's indexing, state and errors.
The comparison with the authors' code is tests/test_memoised_hmws.py (slow, needs HMWS_PATH).
"""

from __future__ import annotations

import io
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from pyro.optim import Adam

from pyro_rws import MemoisedWakeSleep

pytestmark = pytest.mark.usefixtures("float64")

S = 6  # support of the categorical latent
X = (0.1, 2.1, 3.9, 1.4)
SIGMA = 0.7


def data():
    return torch.tensor(X)


def model(x, idx=None, N=None):
    """z ~ Categorical(softmax(theta)), x ~ Normal(z, SIGMA), one z per datapoint."""
    theta = pyro.param("theta", lambda: torch.linspace(-0.5, 0.5, S))
    N = len(X) if N is None else N
    with pyro.plate("data", N, subsample=idx) as i:
        z = pyro.sample("z", dist.Categorical(logits=theta))
        obs = x if idx is None else x[i]
        pyro.sample("x", dist.Normal(z.to(x.dtype), SIGMA), obs=obs)


def guide(x, idx=None, N=None):
    """q(z | x) = Categorical(softmax(phi + a * x * (0..S-1))): amortized, two parameters."""
    phi = pyro.param("phi", lambda: torch.linspace(0.3, -0.3, S))
    a = pyro.param("a", lambda: torch.tensor(0.2))
    N = len(X) if N is None else N
    with pyro.plate("data", N, subsample=idx) as i:
        xi = x if idx is None else x[i]
        logits = phi + a * xi[:, None] * torch.arange(S, dtype=x.dtype)
        pyro.sample("z", dist.Categorical(logits=logits))


def log_joint_table(x, theta):
    """log p(z, x) for every z: (len(x), S)."""
    z = torch.arange(S, dtype=x.dtype)
    return torch.log_softmax(theta, 0) + dist.Normal(z, SIGMA).log_prob(x[:, None])


def log_guide_table(x, phi, a):
    return torch.log_softmax(phi + a * x[:, None] * torch.arange(S, dtype=x.dtype), -1)


def params():
    store = pyro.get_param_store()
    return {n: store.get_param(n).unconstrained() for n in ("theta", "phi", "a")}


def grads(names=("theta", "phi", "a")):
    p = params()
    out = {n: p[n].grad.clone() for n in names}
    for t in p.values():
        t.grad = None
    return out


# --------------------------------------------------------------------------------------------
# exact tests
# --------------------------------------------------------------------------------------------
def test_memory_converges_to_top_modes():
    x = data()
    loss = MemoisedWakeSleep(memory_size=3, num_particles=2)
    with torch.no_grad():
        for _ in range(40):
            loss.loss(model, guide, x)
    values, valid, scores = loss.memory()
    table = log_joint_table(x, params()["theta"]).detach()
    top = table.topk(3, 1)
    assert valid.all()
    assert torch.equal(values["z"], top.indices)  # best first
    assert torch.allclose(scores, top.values, rtol=1e-12)


@pytest.mark.parametrize("subsample", [False, True])
def test_gradients_are_exact_given_the_memory(subsample):
    x = data()
    idx = torch.tensor([3, 1]) if subsample else None
    xs, scale = (x[idx], 2.0) if subsample else (x, 1.0)
    loss = MemoisedWakeSleep(memory_size=3, num_particles=2)
    loss.loss(model, guide, x, idx)  # a partly filled memory, the proposals of two steps
    value = loss.loss_and_grads(model, guide, x, idx)
    got = grads()
    values, valid, _ = loss.memory(idx)
    p = params()
    log_joint = log_joint_table(xs, p["theta"]).gather(1, values["z"])
    log_joint = log_joint.masked_fill(~valid, -math.inf)
    # theta: the exact gradient of -log sum_{z in memory} p(z, x)
    target = -scale * torch.logsumexp(log_joint, 1).sum()
    assert value == pytest.approx(target.item(), rel=1e-12)
    (g_theta,) = torch.autograd.grad(target, [p["theta"]])
    assert torch.allclose(got["theta"], g_theta, rtol=1e-10, atol=1e-12)
    # guide: -sum_m omega_m grad log q(z_m | x), omega the posterior restricted to the memory
    omega = torch.softmax(log_joint.detach(), 1)
    log_q = log_guide_table(xs, p["phi"], p["a"]).gather(1, values["z"])
    wake_phi = -scale * (omega * log_q.masked_fill(~valid, 0.0)).sum()
    g_phi, g_a = torch.autograd.grad(wake_phi, [p["phi"], p["a"]])
    assert torch.allclose(got["phi"], g_phi, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got["a"], g_a, rtol=1e-10, atol=1e-12)
    assert float(loss.stats.wake_phi) == pytest.approx(wake_phi.item(), rel=1e-12)


def test_methods_agree_and_svi_and_module():
    x = data()
    results = []
    for method in ("loss", "loss_and_grads", "differentiable_loss"):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        loss = MemoisedWakeSleep(memory_size=2, num_particles=3)
        value = getattr(loss, method)(model, guide, x)
        if method == "differentiable_loss":
            value.backward()
            value = value.item()
        results.append(value)
        if method != "loss":
            results.append(grads())
    assert results[0] == pytest.approx(results[1], rel=1e-12)
    assert results[1] == pytest.approx(results[3], rel=1e-12)
    for name in ("theta", "phi", "a"):
        assert torch.allclose(results[2][name], results[4][name], rtol=1e-12)
    # SVI and the loss as a torch module
    svi = SVI(model, guide, Adam({"lr": 0.05}), loss=MemoisedWakeSleep(2, 3, insomnia=0.5))
    assert all(math.isfinite(svi.step(x)) for _ in range(3))
    module = MemoisedWakeSleep(2, 3)(model, guide)
    out = module(x)
    out.backward()
    assert out.shape == () and math.isfinite(out.item())


# --------------------------------------------------------------------------------------------
# hybrid memoised wake-sleep
# --------------------------------------------------------------------------------------------
MU = (-1.0, 2.0)


def hybrid_model(x):
    mu = torch.tensor(MU)
    with pyro.plate("data", len(x)):
        d = pyro.sample("d", dist.Bernoulli(torch.tensor(0.3)))
        c = pyro.sample("c", dist.Normal(mu[d.long()], 1.0))
        pyro.sample("x", dist.Normal(c, 0.5), obs=x)


def hybrid_guide(x):
    s = pyro.param("s", lambda: torch.tensor(0.5))
    with pyro.plate("data", len(x)):
        d = pyro.sample("d", dist.Bernoulli(torch.tensor(0.5)))
        pyro.sample("c", dist.Normal(x + s * (d - 0.5), 1.0))


def test_hybrid_marginal_estimates_are_unbiased():
    N, J = 2000, 3
    x = torch.full((N,), 0.8)
    loss = MemoisedWakeSleep(memory_size=2, num_particles=8, num_continuous_particles=J)
    with torch.no_grad():  # the memory holds both values (the scores are the second step's)
        loss.loss(hybrid_model, hybrid_guide, x)
        loss.loss(hybrid_model, hybrid_guide, x)
    values, valid, scores = loss.memory()
    assert valid.all()
    prior = torch.tensor([0.7, 0.3])
    exact = prior * dist.Normal(torch.tensor(MU), math.sqrt(1.25)).log_prob(x[0]).exp()
    for d in (0, 1):
        estimates = scores.exp()[values["d"] == d]
        assert len(estimates) == N  # every datapoint holds both values
        se = estimates.std() / math.sqrt(N)
        assert abs(estimates.mean() - exact[d]) < 4 * se, (d, estimates.mean(), exact[d], se)


def test_hybrid_trains():
    x = torch.tensor([-1.2, 2.5, 0.3])
    loss = MemoisedWakeSleep(2, 3, num_continuous_particles=2, insomnia=0.7)
    svi = SVI(hybrid_model, hybrid_guide, Adam({"lr": 0.05}), loss=loss)
    assert all(math.isfinite(svi.step(x)) for _ in range(3))
    assert loss.stats.sleep_phi is not None and loss.stats.wake_phi is not None


# --------------------------------------------------------------------------------------------
# the memory: indexing, state, errors
# --------------------------------------------------------------------------------------------
def test_subsampled_plate_indexes_the_memory():
    x = data()
    loss = MemoisedWakeSleep(memory_size=2, num_particles=4)
    idx = torch.tensor([2, 0])
    with torch.no_grad():
        for _ in range(30):
            loss.loss(model, guide, x, idx)
    values, valid, _ = loss.memory()
    assert valid[[0, 2]].all() and not valid[[1, 3]].any()
    top = log_joint_table(x, params()["theta"]).detach().topk(2, 1).indices
    assert torch.equal(values["z"][[0, 2]], top[[0, 2]])


def test_random_subsample_size_is_shared_by_every_run():
    x = data()

    def model_b(x):
        theta = pyro.param("theta", lambda: torch.linspace(-0.5, 0.5, S))
        with pyro.plate("data", len(X), subsample_size=2) as i:
            z = pyro.sample("z", dist.Categorical(logits=theta))
            pyro.sample("x", dist.Normal(z.to(x.dtype), SIGMA), obs=x[i])

    def guide_b(x):
        with pyro.plate("data", len(X), subsample_size=2):
            pyro.sample("z", dist.Categorical(logits=torch.zeros(S)))

    loss = MemoisedWakeSleep(memory_size=2, num_particles=4)
    with torch.no_grad():
        for _ in range(60):
            loss.loss(model_b, guide_b, x)
    values, valid, scores = loss.memory()
    table = log_joint_table(x, pyro.param("theta")).detach()
    assert valid.all()
    assert torch.equal(values["z"], table.topk(2, 1).indices)
    assert torch.allclose(scores, table.topk(2, 1).values, rtol=1e-12)


def test_state_dict_round_trip():
    x = data()
    loss = MemoisedWakeSleep(memory_size=3, num_particles=2)
    for _ in range(3):
        loss.loss(model, guide, x)
    buffer = io.BytesIO()
    torch.save(loss.state_dict(), buffer)
    buffer.seek(0)
    restored = MemoisedWakeSleep(memory_size=3, num_particles=2)
    restored.load_state_dict(torch.load(buffer))
    for a, b in zip(loss.memory(), restored.memory(), strict=True):
        if isinstance(a, dict):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert torch.equal(a, b)
    pyro.set_rng_seed(5)
    v1 = loss.loss(model, guide, x)
    pyro.set_rng_seed(5)
    v2 = restored.loss(model, guide, x)
    assert v1 == v2
    with pytest.raises(ValueError, match="memory of size 3"):
        MemoisedWakeSleep(memory_size=2).load_state_dict(loss.state_dict())


def test_errors():
    x = data()

    def no_plate_guide(x):
        pyro.sample("z", dist.Categorical(logits=torch.zeros(len(X), S)).to_event(1))

    with pytest.raises(ValueError, match="no such plate"):
        MemoisedWakeSleep(2, 2, max_plate_nesting=1).loss(model, no_plate_guide, x)
    with pytest.raises(ValueError, match=r"memory_size=7 is more than the 6"):
        MemoisedWakeSleep(memory_size=7).loss(model, guide, x)
    with pytest.raises(ValueError, match="needs discrete latents"):
        MemoisedWakeSleep(2, 2).loss(_continuous_model, _continuous_guide, x)
    with pytest.raises(ValueError, match="outside the data plate"):
        MemoisedWakeSleep(2, 2).loss(_global_model, _global_guide, x)
    loss = MemoisedWakeSleep(2, 2)
    loss.loss(model, guide, x)
    with pytest.raises(ValueError, match="size 5"):
        loss.loss(model, guide, torch.cat([x, x[:1]]), None, 5)
    with pytest.raises(ValueError, match="memory_size"):
        MemoisedWakeSleep(memory_size=0)
    with pytest.raises(ValueError, match="memory is empty"):
        MemoisedWakeSleep().memory()


def _continuous_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _continuous_guide(x):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(0.0, 1.0))


def _global_model(x):
    g = pyro.sample("g", dist.Bernoulli(0.5))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(z + g, 1.0), obs=x)


def _global_guide(x):
    pyro.sample("g", dist.Bernoulli(0.5))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Bernoulli(0.5))
