# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
"Any Pyro program" works, by kind of parameter: autoguides, ``pyro.param``, ``pyro.module`` and
PyroModule parameters, programs without parameters; and the detach rules that decide which
gradient each parameter gets.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn
from losses import LOSSES, cases
from programs import X4, lme, make_guide, train
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.nn import PyroModule

from pyro_rws import RWS, SleepPhaseLoss

pytestmark = pytest.mark.usefixtures("float64")


# --------------------------------------------------------------------------------------------
# Autoguides, parameters of every kind, programs without parameters
# --------------------------------------------------------------------------------------------
def param_model(x):
    loc = pyro.param("prior_loc", torch.tensor(0.5))
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


@pytest.mark.parametrize("auto", [AutoNormal, AutoDiagonalNormal])
@pytest.mark.parametrize("case", cases(lambda s: s.has_wake_phi), ids=str)
def test_autoguides_with_wake_phi(auto, case):
    x = torch.tensor(X4)
    guide = auto(param_model)
    loss = case.make(num_particles=4)
    if case.has_sleep:  # autoguides sample auxiliary sites, which log q(z|x) cannot score
        with pytest.raises(ValueError, match=f"{auto.__name__} cannot be trained by the sleep"):
            loss.loss(param_model, guide, x)
        return
    if auto is AutoDiagonalNormal:  # joint weights: a warning names the autoguide (issue 9)
        with pytest.warns(UserWarning, match="AutoDiagonalNormal flattens every latent"):
            loss.loss(param_model, guide, x)
    train(loss, param_model, guide, x)
    value = loss.loss_and_grads(param_model, guide, x)
    assert math.isfinite(value)
    # AutoNormal keeps the data plate (weights per datapoint); AutoDiagonalNormal's joint latent
    # lies outside it (one joint weight)
    assert loss.stats.ess.shape == ((4,) if auto is AutoNormal else ())
    params = dict(pyro.get_param_store().named_parameters())
    assert "prior_loc" in params and len(params) >= 3
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


class Decoder(PyroModule):
    def __init__(self):
        super().__init__()
        self.linear = PyroModule[nn.Linear](1, 1)

    def forward(self, z):
        return self.linear(z.unsqueeze(-1)).squeeze(-1)


def test_param_module_and_pyromodule_parameters_get_gradients():
    decoder = Decoder()
    encoder = nn.Linear(1, 2)

    def model(x):
        loc = pyro.param("prior_loc", torch.tensor(0.1))
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("x", dist.Normal(decoder(z), 1.0), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        shift = pyro.param("guide_shift", torch.tensor(0.0))
        loc, log_scale = encoder(x.unsqueeze(-1)).unbind(-1)
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("z", dist.Normal(loc + shift, log_scale.exp()))

    x = torch.tensor(X4)
    for spec in (s for s in LOSSES if s.has_wake_theta):
        pyro.clear_param_store()
        for p in [*decoder.parameters(), *encoder.parameters()]:
            p.grad = None
        loss = spec.make(num_particles=3)
        loss.loss_and_grads(model, guide, x)
        params = dict(pyro.get_param_store().named_parameters())
        assert {"prior_loc", "guide_shift", "encoder$$$weight", "linear.weight"} <= set(params)
        for name, p in params.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, (spec.name, name)
        for p in [*decoder.parameters(), *encoder.parameters()]:
            assert p.grad is not None and p.grad.abs().sum() > 0, spec.name


def bare_model(x):
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def bare_guide(x):
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Normal(0.5 * x, 0.8))


@pytest.mark.parametrize("guide_has_params", [True, False])
def test_programs_without_parameters(case, guide_has_params):
    x = torch.tensor(X4)
    loss = case.make(num_sleep_particles=2)
    guide = make_guide([]) if guide_has_params else bare_guide
    value = loss.loss_and_grads(bare_model, guide, x)
    assert type(value) is float and math.isfinite(value)
    dl = loss.differentiable_loss(bare_model, guide, x)
    assert dl.requires_grad == guide_has_params
    train(loss, bare_model, guide, x)


# --------------------------------------------------------------------------------------------
# Detach rules
# --------------------------------------------------------------------------------------------
def detach_model(x):
    theta = pyro.param("theta", torch.tensor(0.3))
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(theta, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def make_detach_guide(record):
    def guide(x):
        loc = pyro.param("loc", torch.tensor(-0.4))
        scale = pyro.param("scale", torch.tensor(1.3), constraint=constraints.positive)
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(0.5 * x + loc, scale))  # reparameterized
        record.append((x, z.detach()))

    return guide


@pytest.mark.parametrize("insomnia", [1.0, 0.5])
@pytest.mark.parametrize("vectorize", [True, False])
def test_rws_gradients_follow_the_detach_rules(insomnia, vectorize):
    """
    theta gets exactly the wake-theta gradient, phi exactly insomnia * wake-phi +
    (1 - insomnia) * sleep-phi, all evaluated at detached particles: no pathwise gradient.
    """
    x = torch.tensor(X4)
    K = 4
    record = []
    loss = RWS(num_particles=K, insomnia=insomnia, vectorize_particles=vectorize)
    loss.loss_and_grads(detach_model, make_detach_guide(record), x)
    store = pyro.get_param_store()
    theta, loc, scale = store["theta"], store["loc"], store["scale"]  # constrained values
    leaves = dict(store.named_parameters())
    got = {k: p.grad.clone() for k, p in leaves.items()}

    wake = [z for xx, z in record if xx is x][-(1 if vectorize else K) :]
    sleep = [(xx, z) for xx, z in record if xx is not x]
    z = wake[0] if vectorize else torch.stack(wake)  # (K, N), detached
    assert z.shape == (K, 4) and not z.requires_grad

    def log_q(z, x):
        return dist.Normal(0.5 * x + loc, scale).log_prob(z)

    log_p = dist.Normal(theta, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(x)
    log_w = (log_p - log_q(z, x)).detach()
    wbar = torch.softmax(log_w, 0)
    wake_theta = -lme(log_p - log_q(z, x).detach()).sum()
    wake_phi = -(wbar * log_q(z, x)).sum()
    objective_phi = insomnia * wake_phi
    if insomnia < 1:
        assert len(sleep) == 1
        xs, zs = sleep[0]
        objective_phi = objective_phi + (1 - insomnia) * -log_q(zs, xs).sum()
    (g_theta,) = torch.autograd.grad(wake_theta, [leaves["theta"]])
    g_loc, g_scale = torch.autograd.grad(objective_phi, [leaves["loc"], leaves["scale"]])
    assert torch.allclose(got["theta"], g_theta, rtol=1e-10)
    assert torch.allclose(got["loc"], g_loc, rtol=1e-10)
    assert torch.allclose(got["scale"], g_scale, rtol=1e-10)

    # the pathwise (reparameterized) IWAE gradient of loc would be different
    eps = ((z - 0.5 * x - loc) / scale).detach()
    z_path = 0.5 * x + leaves["loc"] + scale.detach() * eps
    log_w_path = (
        dist.Normal(theta.detach(), 1.0).log_prob(z_path)
        + dist.Normal(z_path, 1.0).log_prob(x)
        - dist.Normal(0.5 * x + leaves["loc"], scale.detach()).log_prob(z_path)
    )
    (g_path,) = torch.autograd.grad(-lme(log_w_path).sum(), [leaves["loc"]])
    assert (g_path - got["loc"]).abs() > 0.05


@pytest.mark.parametrize("vectorize", [True, False])
def test_sleep_phase_gives_model_parameters_no_gradient(vectorize):
    x = torch.tensor(X4)
    loss = SleepPhaseLoss(num_particles=3, vectorize_particles=vectorize)
    train(loss, detach_model, make_guide([]), x, steps=5)
    store = pyro.get_param_store()
    assert store["theta"].item() == 0.3
    assert dict(store.named_parameters())["theta"].grad is None
    assert dict(store.named_parameters())["a"].item() != 0.4
