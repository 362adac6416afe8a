# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""The interval bijections of the flow guides (pyro_rws/autoguides/support.py)."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import IndependentTransform

from pyro_rws.autoguides import AutoAmortizedFlow
from pyro_rws.autoguides.support import SoftEdgeTransform, interval_bijection

pytestmark = pytest.mark.usefixtures("float64")


def test_identity_inside_and_round_trip():
    t = SoftEdgeTransform(torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 10.0]), edge=0.05)
    # inner intervals: [-0.9, 0.9] and [0.5, 9.5]
    y = torch.tensor([[-0.9, 0.5], [0.3, 9.5], [0.95, 12.0], [-3.0, -2.0], [40.0, 0.4]])
    theta = t(y)
    assert torch.equal(theta[:2], y[:2])  # exactly the identity on the inner interval
    assert bool(((theta > t.low) & (theta < t.high)).all())
    assert torch.allclose(t.inv(theta)[:4], y[:4], atol=1e-6)  # far in a tail: cancellation
    assert torch.allclose(t.inv(theta)[4, 1], y[4, 1])


def test_log_abs_det_jacobian_matches_autograd():
    t = SoftEdgeTransform(-2.0, 3.0, edge=0.1)  # bands of 0.5: inner [-1.5, 2.5]
    y = torch.tensor([-4.0, -1.6, -1.5, 0.0, 2.5, 2.7, 6.0], requires_grad=True)
    theta = t(y)
    (grad,) = torch.autograd.grad(theta.sum(), y)
    assert torch.allclose(t.log_abs_det_jacobian(y, theta), grad.log(), atol=1e-12)
    # continuous with its derivative at the junctions
    h = 1e-7
    for junction in (-1.5, 2.5):
        left, right = t(torch.tensor(junction - h)), t(torch.tensor(junction + h))
        assert float((right - left) / (2 * h)) == pytest.approx(1.0, abs=1e-6)


def test_extreme_values_stay_strictly_inside():
    for dtype in (torch.float32, torch.float64):
        t = SoftEdgeTransform(torch.tensor(-1.0, dtype=dtype), torch.tensor(1.0, dtype=dtype))
        y = torch.tensor([-1e6, -50.0, 50.0, 1e6], dtype=dtype)
        theta = t(y)
        assert bool(((theta > -1) & (theta < 1)).all())
        assert bool(torch.isfinite(t.inv(theta)).all())
        assert bool(torch.isfinite(t.log_abs_det_jacobian(y, theta)).all())


def test_density_normalized_on_the_interval():
    t = SoftEdgeTransform(-1.0, 1.0, edge=0.05)
    q = dist.TransformedDistribution(dist.Normal(0.6, 0.5), [t])  # much mass beyond 0.9
    n, c = 200000, 0.99  # the mass of [-c, c] by the midpoint rule, against the base's
    grid = c * (-1 + 2 * (torch.arange(n) + 0.5) / n)
    mass = 2 * c * q.log_prob(grid).exp().mean()
    ends = t.inv(torch.tensor([-c, c]))
    expected = dist.Normal(0.6, 0.5).cdf(ends[1]) - dist.Normal(0.6, 0.5).cdf(ends[0])
    assert float(mass) == pytest.approx(float(expected), abs=1e-6)
    samples = q.sample((100000,))
    assert bool(((samples > -1) & (samples < 1)).all())
    # the mass the base puts beyond the inner bound lands in the band
    beyond = 1 - dist.Normal(0.6, 0.5).cdf(torch.tensor(0.9))
    frac = (samples > 0.9).double().mean()
    se = float(beyond * (1 - beyond)) ** 0.5 / 100000**0.5
    assert float(frac) == pytest.approx(float(beyond), abs=5 * se)


def test_interval_bijection_dispatch():
    box = dist.Uniform(torch.zeros(3), torch.ones(3)).to_event(1).support
    t = interval_bijection(box)
    assert isinstance(t, IndependentTransform)
    assert isinstance(t.base_transform, SoftEdgeTransform)
    assert isinstance(interval_bijection(constraints.interval(0.0, 2.0)), SoftEdgeTransform)
    half_open = constraints.half_open_interval(0.0, 2.0)
    assert isinstance(interval_bijection(half_open), SoftEdgeTransform)
    assert "SigmoidTransform" in repr(interval_bijection(box, "sigmoid"))  # Pyro's biject_to
    assert interval_bijection(constraints.positive) == biject_to(constraints.positive)
    with pytest.raises(ValueError, match="interval_bijection must be one of"):
        interval_bijection(box, "logit")
    with pytest.raises(ValueError, match="edge"):
        SoftEdgeTransform(0.0, 1.0, edge=0.5)


def _box_model(x=None):
    theta = pyro.sample("theta", dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1))
    return pyro.sample("x", dist.Normal(theta, 0.1).to_event(1), obs=x)


def test_autoguide_option():
    x = torch.zeros(5, 2)
    default = AutoAmortizedFlow(_box_model, num_transforms=1, hidden_dims=[8])
    default(observations={"x": x})
    assert isinstance(default._bijections["theta"].base_transform, SoftEdgeTransform)
    sigmoid = AutoAmortizedFlow(
        _box_model, num_transforms=1, hidden_dims=[8], interval_bijection="sigmoid"
    )
    sigmoid(observations={"x": x})
    assert "SigmoidTransform" in repr(sigmoid._bijections["theta"])
    with pytest.raises(ValueError, match="interval_bijection must be one of"):
        AutoAmortizedFlow(_box_model, interval_bijection="reject")


def test_log_prob_is_the_sleep_loss_fit_guide_trains_on(monkeypatch):
    import pyro_rws
    from pyro_rws._sleep import SleepState
    from pyro_rws.fitting import _direct, _sleep_loss

    sims = pyro_rws.simulate(_box_model, 300, observed=("x",), seed=0, progress=False)
    guide = AutoAmortizedFlow(_box_model, num_transforms=2, hidden_dims=[8])
    guide.standardize(sims)
    batch = sims[:50]
    slow = _sleep_loss(_box_model, guide, batch, (), {}, None, SleepState())
    fast = -guide.log_prob(batch.latents, batch.observations).mean()
    assert torch.allclose(fast, slow, rtol=1e-12)
    assert _direct(guide, sims, None) and not _direct(guide, sims, {"x": "x"})
    (g_fast,) = torch.autograd.grad(fast, [next(guide.parameters())])
    (g_slow,) = torch.autograd.grad(slow, [next(guide.parameters())])
    assert torch.allclose(g_fast, g_slow, rtol=1e-10, atol=1e-12)
    # fit_guide through log_prob and through the sleep phase's traces: the same training
    histories = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr("pyro_rws.fitting._direct", lambda *a: False)
        pyro.set_rng_seed(1)
        g = AutoAmortizedFlow(_box_model, num_transforms=2, hidden_dims=[8])
        g.standardize(sims)
        h = pyro_rws.fit_guide(_box_model, g, sims, max_epochs=3, seed=0, progress=False)
        histories.append(h.train_loss + h.validation_loss)
    assert histories[0] == pytest.approx(histories[1], rel=1e-9)


def test_log_prob_sums_the_datapoint_plates():
    import pyro.poutine as poutine

    def model(x):
        with pyro.plate("data", len(x)):
            theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(theta, 0.5).to_event(1), obs=x)

    x = torch.randn(3, 2)
    guide = AutoAmortizedFlow(model, num_transforms=2, hidden_dims=[8])
    trace = poutine.trace(guide).get_trace(x)
    trace.compute_log_prob()
    lp = guide.log_prob({"theta": trace.nodes["theta"]["value"]}, {"x": x})
    assert torch.allclose(lp, trace.nodes["theta"]["log_prob"].sum())
    with pytest.raises(ValueError, match="call the guide or standardize"):
        AutoAmortizedFlow(model).log_prob({"theta": x}, {"x": x})


def test_deterministic_data_site_named_as_observed():
    import pyro_rws

    def model():  # a simulator that returns its data (sbibm's bernoulli_glm, two_moons)
        theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        x = theta + 0.1 * torch.randn(theta.shape)
        return pyro.deterministic("data", x, event_dim=1)

    sims = pyro_rws.simulate(model, 100, observed=("data",), seed=0, progress=False)
    guide = AutoAmortizedFlow(model, num_transforms=1, hidden_dims=[8]).standardize(sims)
    history = pyro_rws.fit_guide(model, guide, sims, max_epochs=2, seed=0, progress=False)
    assert history.epochs == 2
    theta = guide(observations={"data": torch.zeros(7, 2)})["theta"]
    assert theta.shape == (7, 2)
