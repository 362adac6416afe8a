# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
"Any Pyro program" works, by kind of site: discrete and continuous latents, factors, masks,
scales, deterministic sites and stochastic control flow, with values checked against hand
computations from the particles the guide actually drew (recorded by the guide itself).
"""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from losses import LOSSES
from programs import X4, ess, lme, log_q_of, make_guide, run_and_record, train
from pyro.distributions import constraints

from pyro_rws import RWS, SleepPhaseLoss, WakeSleepELBO

pytestmark = pytest.mark.usefixtures("float64")


# --------------------------------------------------------------------------------------------
# Discrete and continuous latents
# --------------------------------------------------------------------------------------------
def mixture_model(x):
    weights = pyro.param("weights", torch.tensor([0.4, 0.6]), constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", x.shape[-1]):
        c = pyro.sample("c", dist.Categorical(weights))
        z = pyro.sample("z", dist.Normal(locs[c], 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def mixture_guide(x):
    a = pyro.param("a", torch.tensor(0.5))
    shift = pyro.param("shift", torch.tensor([-0.5, 0.5]))
    s = pyro.param("s", torch.tensor(0.7), constraint=constraints.positive)
    with pyro.plate("data", x.shape[-1]):
        c = pyro.sample("c", dist.Categorical(logits=torch.stack([-a * x, a * x], -1)))
        pyro.sample("z", dist.Normal(0.5 * x + shift[c], s))


def test_discrete_and_continuous_latents(case):
    x = torch.tensor([-1.5, 0.2, 1.1, 2.0, -0.3])
    loss = case.make(num_sleep_particles=2)
    train(loss, mixture_model, mixture_guide, x)
    if case.returns_ess:
        assert loss.stats.ess.shape == (5,)
    params = dict(pyro.get_param_store().named_parameters())
    assert set(params) == {"weights", "locs", "a", "shift", "s"}
    for k in ("weights", "locs", "a", "shift", "s"):
        moved = params[k].grad is not None  # after SVI.step: zeroed, but allocated
        assert moved == (case.has_wake_theta or k in ("a", "shift", "s")), k


# --------------------------------------------------------------------------------------------
# Factors, masks, scales, deterministic sites: inside the weights, as part of the model
# --------------------------------------------------------------------------------------------
def factor_model(x):
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        pyro.factor("f", -0.5 * (z - 1.0) ** 2)


@pytest.mark.parametrize("vectorize", [True, False])
def test_factor_in_model_wake_phase(vectorize):
    x = torch.tensor(X4)
    loss = RWS(num_particles=4, vectorize_particles=vectorize)
    value, z = run_and_record(loss, factor_model, x, vectorize=vectorize)
    log_p = (
        dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(x) - 0.5 * (z - 1.0) ** 2
    )
    log_w = log_p - log_q_of(z, x)
    assert value == pytest.approx(-lme(log_w).sum().item(), rel=1e-10)
    assert torch.allclose(loss.stats.ess, ess(log_w))
    train(WakeSleepELBO(num_particles=3, phase_q="wake"), factor_model, make_guide([]), x)


MASK = (True, False, True, False)


def mask_model_handler(x):
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with poutine.mask(mask=torch.tensor(MASK)):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def mask_model_method(x):
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0).mask(torch.tensor(MASK)), obs=x)


@pytest.mark.parametrize("model", [mask_model_handler, mask_model_method])
@pytest.mark.parametrize("vectorize", [True, False])
def test_masked_datapoints_weigh_only_unmasked_sites(model, vectorize):
    x = torch.tensor(X4)
    loss = RWS(num_particles=5, vectorize_particles=vectorize)
    value, z = run_and_record(loss, model, x, vectorize=vectorize)
    mask = torch.tensor(MASK)
    log_lik = torch.where(mask, dist.Normal(z, 1.0).log_prob(x), 0.0)
    log_w = dist.Normal(0.0, 1.0).log_prob(z) + log_lik - log_q_of(z, x)
    assert value == pytest.approx(-lme(log_w).sum().item(), rel=1e-10)
    # the masked datapoints' weights come from prior and guide alone
    unmasked = dist.Normal(0.0, 1.0).log_prob(z) - log_q_of(z, x)
    assert torch.allclose(lme(log_w)[~mask], lme(unmasked)[~mask])
    train(
        RWS(num_particles=3, insomnia=0.5, vectorize_particles=vectorize), model, make_guide([]), x
    )


def scaled_model(x, s):
    with poutine.scale(scale=s), pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


@pytest.mark.parametrize("vectorize", [True, False])
def test_poutine_scale_acts_inside_the_weights(vectorize):
    x = torch.tensor(X4)
    s = 0.3
    loss = RWS(num_particles=6, vectorize_particles=vectorize)
    value, z = run_and_record(loss, scaled_model, x, s, vectorize=vectorize)
    log_p = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(x)
    log_w = s * log_p - log_q_of(z, x)
    # bound = sum_n log mean_k exp(s log p_k - log q_k), not s * (IWAE bound) nor with s outside
    assert value == pytest.approx(-lme(log_w).sum().item(), rel=1e-10)
    assert value != pytest.approx(-s * lme(log_p - log_q_of(z, x)).sum().item(), rel=1e-3)


def deterministic_model(x):
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        y = pyro.deterministic("y", 2.0 * z)
        pyro.sample("x", dist.Normal(y / 2.0, 1.0), obs=x)


def test_deterministic_sites(case):
    x = torch.tensor(X4)
    loss = case.make(num_sleep_particles=2)
    train(loss, deterministic_model, make_guide([]), x)
    if case.bound == "iwae" and not case.has_sleep:  # the last guide runs are the wake ones
        pyro.clear_param_store()  # the guide's parameter back at a = 0.4
        value, z = run_and_record(loss, deterministic_model, x, vectorize=case.vectorize)
        log_w = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(x) - log_q_of(z, x)
        assert value == pytest.approx(-lme(log_w).sum().item(), rel=1e-10)


# --------------------------------------------------------------------------------------------
# Stochastic control flow (user story 2)
# --------------------------------------------------------------------------------------------
def simulator(image):
    n = pyro.sample("n", dist.Poisson(2.0))
    locs = [pyro.sample(f"loc_{i}", dist.Normal(0.0, 5.0)) for i in range(int(n))]
    total = sum(locs, torch.tensor(0.0))
    pyro.sample("obs", dist.Normal(total, 1.0).expand(image.shape).to_event(1), obs=image)


def simulator_guide(image):
    rate = pyro.param("rate", torch.tensor(2.0), constraint=constraints.positive)
    a = pyro.param("a", torch.tensor(0.1))
    s = pyro.param("s", torch.tensor(3.0), constraint=constraints.positive)
    n = pyro.sample("n", dist.Poisson(rate * (1 + image.mean().abs())))
    for i in range(int(n)):
        pyro.sample(f"loc_{i}", dist.Normal(a * image.mean() / (i + 1), s))


def test_stochastic_control_flow_sequential_particles():
    image = torch.tensor([1.0, 2.5, 1.5])
    sleep = SleepPhaseLoss(num_particles=8, vectorize_particles=False)
    train(sleep, simulator, simulator_guide, image, steps=3)
    assert sleep.stats.sleep_phi is not None
    rws = RWS(num_particles=5, vectorize_particles=False)
    train(rws, simulator, simulator_guide, image, steps=3)
    assert rws.stats.ess.shape == ()
    assert 1 <= float(rws.stats.ess) <= 5
    train(
        RWS(num_particles=5, insomnia=0.5, vectorize_particles=False),
        simulator,
        simulator_guide,
        image,
        steps=2,
    )


@pytest.mark.parametrize("spec", LOSSES, ids=str)
def test_stochastic_control_flow_vectorized_fails_loudly(spec):
    """
    Vectorized particles (several of them) give ``int(n)`` a tensor of K draws: the program
    itself fails, with torch's error, instead of the loss returning a silently wrong number.
    """
    image = torch.tensor([1.0, 2.5, 1.5])
    loss = spec.make(num_particles=5, num_sleep_particles=8)
    with pytest.raises(ValueError, match="only one element tensors can be converted to Python"):
        loss.loss(simulator, simulator_guide, image)
