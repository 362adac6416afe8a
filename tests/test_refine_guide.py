# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""refine_guide: a copy of an amortized guide trained by RWS wake-phi on one observation."""

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from conjugate import data, fixed_model
from torch import nn

from pyro_rws import RWS, AutoAmortizedProposal, importance_posterior, refine_guide

pytestmark = pytest.mark.usefixtures("float64")


class Guide(nn.Module):
    """q(z_n | x_n) = N(a x_n + b, exp(log_s)), its parameters its own (no param store)."""

    def __init__(self, a=0.0, b=1.0, s=2.0):
        super().__init__()
        dtype = torch.get_default_dtype()
        self.a = nn.Parameter(torch.tensor(a, dtype=dtype))
        self.b = nn.Parameter(torch.tensor(b, dtype=dtype))
        self.log_s = nn.Parameter(torch.tensor(s, dtype=dtype).log())

    def forward(self, x=None, observations=None):
        x = observations["x"] if observations is not None else x
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("z", dist.Normal(self.a * x + self.b, self.log_s.exp()))


def test_one_step_is_one_adam_step_on_the_rws_wake_phi_loss():
    x, guide = data(), Guide()
    before = copy.deepcopy(guide.state_dict())
    pyro.set_rng_seed(0)
    refined = refine_guide(
        fixed_model, guide, x, num_steps=1, num_particles=8, learning_rate=0.1,
        clip_max_norm=None, max_plate_nesting=1,
    )  # fmt: skip
    expected = copy.deepcopy(guide)
    optimizer = torch.optim.Adam(expected.parameters(), lr=0.1)
    pyro.set_rng_seed(0)
    RWS(8, insomnia=1.0, max_plate_nesting=1).differentiable_loss(
        fixed_model, expected, x
    ).backward()
    optimizer.step()
    for name, value in expected.state_dict().items():
        assert torch.equal(refined.state_dict()[name], value), name
        assert not torch.equal(value, before[name])
    # the guide passed in is left as it was
    for name, value in guide.state_dict().items():
        assert torch.equal(value, before[name])
    assert refined is not guide


def test_moves_the_guide_to_the_posterior_of_the_observation():
    # fixed_model's posterior is N(x/2, sqrt(1/2)): a = 0.5, b = 0, s = 0.707
    x, guide = data(), Guide(a=0.0, b=1.0, s=2.0)
    pyro.set_rng_seed(1)
    ess = importance_posterior(fixed_model, guide, x, num_particles=2000).effective_sample_size
    refined = refine_guide(
        fixed_model, guide, x, num_steps=400, num_particles=50, learning_rate=0.02
    )
    with torch.no_grad():
        a, b, s = (float(t) for t in (refined.a, refined.b, refined.log_s.exp()))
    assert a == pytest.approx(0.5, abs=0.1)
    assert b == pytest.approx(0.0, abs=0.1)
    assert s == pytest.approx(0.5**0.5, abs=0.1)
    after = importance_posterior(fixed_model, refined, x, num_particles=2000)
    assert bool((after.effective_sample_size > 1.5 * ess).all())
    assert bool((after.effective_sample_size > 0.8 * 2000).all())


@pytest.mark.parametrize("vectorize_particles, expected", [(True, 1000), (False, 100)])
def test_default_num_particles(vectorize_particles, expected):
    # 1,000 proposals per step when vectorized, 100 when each is one program run
    def refined(**options):
        pyro.set_rng_seed(3)
        guide = refine_guide(
            fixed_model,
            Guide(),
            data(),
            num_steps=1,
            vectorize_particles=vectorize_particles,
            max_plate_nesting=1,
            **options,
        )
        return guide.state_dict()

    default, explicit = refined(), refined(num_particles=expected)
    assert all(torch.equal(default[name], explicit[name]) for name in default)
    other = refined(num_particles=expected // 2)
    assert not all(torch.equal(default[name], other[name]) for name in default)


def test_observations_keyword_and_errors():
    def model(x=None):
        with pyro.plate("data", 4):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    refined = refine_guide(model, Guide(), observations={"x": data()}, num_steps=3, num_particles=4)
    assert isinstance(refined, Guide)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        refine_guide(fixed_model, lambda x: None, data())
    with pytest.raises(ValueError, match="num_particles"):
        refine_guide(fixed_model, Guide(), data(), num_particles=1)


def test_automatic_proposal_and_sequential_particles():
    # AutoAmortizedProposal creates a head per address when it first meets it: a fresh guide
    # has no parameters yet, and heads created during refinement are trained with the rest
    def model(x=None):
        n = pyro.sample("n", dist.Categorical(torch.ones(3) / 3))
        total = torch.zeros(())
        for i in range(int(n) + 1):
            total = total + pyro.sample(f"z{i}", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(total, 0.5), obs=x)

    x, guide = torch.tensor(1.3), AutoAmortizedProposal(model)
    options = dict(num_particles=4, vectorize_particles=False, max_plate_nesting=0)
    pyro.set_rng_seed(0)
    one = refine_guide(model, guide, x, num_steps=1, **options)
    pyro.set_rng_seed(0)
    many = refine_guide(model, guide, x, num_steps=20, **options)
    assert guide.addresses == [] and not list(guide.parameters())  # left as it was
    assert set(many.addresses) == {"n", "z0", "z1", "z2"}
    first = dict(one.named_parameters())
    later = dict(many.named_parameters())
    assert first and set(first) <= set(later)
    # trained further: every parameter with a gradient (the last site's value embedding feeds
    # no later site and has none)
    trained = {n: p for n, p in first.items() if p.grad is not None}
    assert len(trained) >= len(first) - 2
    assert all(not torch.equal(later[n], p) for n, p in trained.items())


def test_model_parameters_get_no_gradient():
    # RWS's loss also carries the wake-theta gradient of a model with parameters: refine_guide
    # trains the guide only and leaves no gradient behind on the model's parameters
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.3))
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    pyro.clear_param_store()
    refine_guide(model, Guide(), data(), num_steps=3, num_particles=4, max_plate_nesting=1)
    assert pyro.param("loc").unconstrained().grad is None
