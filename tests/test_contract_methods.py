# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The contract every loss keeps in how it is called: ``loss``, ``loss_and_grads``,
``differentiable_loss``, ``SVI`` and the loss as a torch module agree; vectorized and sequential
particles are the same estimator; the caller's arguments are never modified.

Each test runs on every loss of tests/losses.py (the ``case`` fixture of conftest.py).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn
from conjugate import data, grads_of, guide, leaves, model, zero_grads
from losses import LOSSES
from pyro.infer import SVI
from pyro.nn import PyroModule, PyroParam
from pyro.optim import Adam

from pyro_rws import RWS

pytestmark = pytest.mark.usefixtures("float64")


# --------------------------------------------------------------------------------------------
# loss, loss_and_grads, differentiable_loss, SVI
# --------------------------------------------------------------------------------------------
def test_methods_agree(case):
    x = data()
    loss = case.make()
    pyro.set_rng_seed(1)
    value = loss.loss(model, guide, x)
    params = leaves()
    assert set(params) == {"theta", "a", "b", "s"}

    pyro.set_rng_seed(1)
    value_lg = loss.loss_and_grads(model, guide, x)
    grads = grads_of(params)
    zero_grads(params)

    pyro.set_rng_seed(1)
    dl = loss.differentiable_loss(model, guide, x)
    assert dl.shape == () and dl.requires_grad
    autograds = torch.autograd.grad(dl, list(params.values()), allow_unused=True)

    assert isinstance(value, float) and isinstance(value_lg, float)
    assert value == pytest.approx(value_lg, rel=1e-12)
    assert dl.item() == pytest.approx(value, rel=1e-12)
    for (name, g), ag in zip(grads.items(), autograds, strict=True):
        if g is None:
            assert ag is None, name
        else:
            assert torch.allclose(g, ag, rtol=1e-10, atol=1e-12), name
    # which parameters get a gradient at all
    assert (grads["theta"] is not None) == case.has_wake_theta
    for name in "abs":
        assert grads[name] is not None and grads[name].abs() > 0


def test_loss_returns_float_and_keeps_no_graph(case):
    x = data()
    loss = case.make()
    value = loss.loss(model, guide, x)
    assert type(value) is float and math.isfinite(value)
    for field in ("loss", "wake_theta", "wake_phi", "sleep_phi", "bound", "ess"):
        t = getattr(loss.stats, field)
        if t is not None:
            assert not t.requires_grad and t.grad_fn is None, field
    assert all(p.grad is None for p in leaves().values())


def test_svi_step_returns_float(case):
    x = data()
    loss = case.make()
    pyro.set_rng_seed(5)
    first = loss.loss(model, guide, x)  # at the initial parameters
    svi = SVI(model, guide, Adam({"lr": 0.01}), loss=loss)
    pyro.set_rng_seed(5)
    values = [svi.step(x) for _ in range(3)]
    assert all(type(v) is float and math.isfinite(v) for v in values)
    assert values[0] == pytest.approx(first, rel=1e-12)  # the value before the update
    assert type(svi.evaluate_loss(x)) is float
    # differentiable stats are detached after loss_and_grads too
    assert not loss.stats.loss.requires_grad


# --------------------------------------------------------------------------------------------
# ELBO.__call__: the loss as a torch module
# --------------------------------------------------------------------------------------------
class ModelModule(PyroModule):
    def __init__(self):
        super().__init__()
        self.loc = PyroParam(torch.tensor(0.0))

    def forward(self, x):
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(self.loc, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)


class GuideModule(PyroModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(1, 2)

    def forward(self, x):
        loc, log_scale = self.net(x.unsqueeze(-1)).unbind(-1)
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()))


class PlainModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.loc = nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        pyro.module("model", self)
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(self.loc, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)


class PlainGuide(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(1, 2)

    def forward(self, x):
        pyro.module("guide", self)
        loc, log_scale = self.net(x.unsqueeze(-1)).unbind(-1)
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()))


def test_elbo_module_matches_differentiable_loss(case):
    x = data()
    model_m, guide_m = ModelModule(), GuideModule()
    loss = case.make()
    module = loss(model_m, guide_m)
    assert isinstance(module, nn.Module)
    params = list(module.parameters())
    assert len(params) == 3  # loc, net.weight, net.bias
    pyro.set_rng_seed(2)
    out = module(x)
    grads = torch.autograd.grad(out, params, allow_unused=True)
    pyro.set_rng_seed(2)
    expected = loss.differentiable_loss(model_m, guide_m, x)
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    assert out.item() == pytest.approx(expected.item(), rel=1e-12)
    for g, e in zip(grads, expected_grads, strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            assert torch.allclose(g, e)
    assert (grads[0] is not None) == case.has_wake_theta


@pytest.mark.parametrize("kind", ["pyro_module", "plain_module"])
@pytest.mark.parametrize("vectorize", [True, False])
def test_elbo_module_torch_optim_decreases_loss(kind, vectorize):
    pyro.set_rng_seed(3)
    x = 3.0 + 2.0**0.5 * torch.randn(16)
    if kind == "pyro_module":
        model_m, guide_m = ModelModule(), GuideModule()
    else:
        model_m, guide_m = PlainModel(), PlainGuide()
    module = RWS(num_particles=5, vectorize_particles=vectorize)(model_m, guide_m)
    optim = torch.optim.Adam(module.parameters(), lr=0.05)
    values = []
    for _ in range(120):
        optim.zero_grad()
        out = module(x)
        out.backward()
        optim.step()
        values.append(out.item())
    # -log p(x) per point is ~3.5 nats at loc = 0 and ~1.9 at the optimum loc = mean(x)
    assert sum(values[-10:]) / 10 < sum(values[:10]) / 10 - 10.0
    assert abs(model_m.loc.item() - x.mean().item()) < 1.0


# --------------------------------------------------------------------------------------------
# Vectorized and sequential particles: the same estimator
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", LOSSES, ids=str)
def test_vectorized_matches_sequential_in_expectation(spec):
    """
    Both modes draw independent samples of the same estimator, so over n seeds each mean m_i has
    standard error se_i = std_i / sqrt(n), and m_1 - m_2 ~ N(0, se_1^2 + se_2^2) by the CLT.
    |m_1 - m_2| < 4 sqrt(se_1^2 + se_2^2) then fails with probability about 6e-5 per comparison
    (the seeds are fixed, so the test is deterministic).
    """
    x = data()
    n = 150
    samples = {}
    for vectorize in (True, False):
        loss = spec.make(vectorize, num_particles=3, num_sleep_particles=2)
        pyro.clear_param_store()
        rows = []
        for seed in range(n):
            pyro.set_rng_seed(1000 * vectorize + seed)
            params = leaves()
            zero_grads(params)
            value = loss.loss_and_grads(model, guide, x)
            params = leaves()
            rows.append(
                [value, params["a"].grad.item(), params["s"].grad.item()]
                + ([params["theta"].grad.item()] if spec.has_wake_theta else [])
            )
        samples[vectorize] = torch.tensor(rows)
    m1, m2 = samples[True].mean(0), samples[False].mean(0)
    se = (samples[True].var(0) / n + samples[False].var(0) / n).sqrt()
    assert (se > 0).all()
    assert ((m1 - m2).abs() < 4 * se).all(), (m1, m2, se)


# --------------------------------------------------------------------------------------------
# The caller's arguments are never modified
# --------------------------------------------------------------------------------------------
def model_args(x, extras, cfg, observations=None):
    obs = x if observations is None else observations["x"]
    theta = pyro.param("theta", torch.tensor(0.2))
    with pyro.plate("data", obs.shape[-1]):
        z = pyro.sample("z", dist.Normal(theta + cfg["shift"], extras[0]))
        pyro.sample("x", dist.Normal(z, 1.0), obs=obs)


def guide_args(x, extras, cfg, observations=None):
    obs = x if observations is None else observations["x"]
    a = pyro.param("a", torch.tensor(0.3))
    with pyro.plate("data", obs.shape[-1]):
        pyro.sample("z", dist.Normal(a * obs + cfg["shift"], extras[1]))


def guide_args_no_observations(x, extras, cfg):
    return guide_args(x, extras, cfg)


@pytest.mark.parametrize("num_sleep_particles", [1, 2])
@pytest.mark.parametrize("call", ["positional", "observations_kwarg", "no_observations_kwarg"])
def test_args_and_kwargs_not_mutated(case, call, num_sleep_particles):
    x = data()
    x_copy = x.clone()
    shift = torch.tensor(0.1)
    e0, e1 = torch.tensor(1.0), torch.tensor(0.8)
    extras = [e0, e1]
    cfg = {"shift": shift}
    observations = {"x": x}
    if call == "positional":
        g, args, kwargs = guide_args, (x, extras, cfg), {}
    elif call == "observations_kwarg":
        g, args, kwargs = guide_args, (x, extras), {"cfg": cfg, "observations": observations}
    else:
        g, args, kwargs = guide_args_no_observations, (x, extras), {"cfg": cfg}
    kwargs_before = dict(kwargs)
    loss = case.make(num_particles=3, num_sleep_particles=num_sleep_particles)
    svi = SVI(model_args, g, Adam({"lr": 0.01}), loss=loss)
    for _ in range(2):
        assert math.isfinite(svi.step(*args, **kwargs))
    assert math.isfinite(loss.loss(model_args, g, *args, **kwargs))

    assert kwargs == kwargs_before and all(kwargs[k] is kwargs_before[k] for k in kwargs)
    assert torch.equal(x, x_copy) and not x.requires_grad
    assert len(extras) == 2 and extras[0] is e0 and extras[1] is e1
    assert e0.item() == 1.0 and e1.item() == 0.8
    assert list(cfg) == ["shift"] and cfg["shift"] is shift and shift.item() == 0.1
    assert list(observations) == ["x"] and observations["x"] is x
