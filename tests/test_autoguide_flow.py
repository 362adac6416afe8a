# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""AutoAmortizedFlow: support, density, sleep-phase training, RWS, log_evidence, errors."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI
from torch import nn
from torch.autograd.functional import jacobian

from pyro_rws import RWS, SleepPhaseLoss, log_evidence
from pyro_rws.autoguides import AutoAmortizedFlow

pytestmark = pytest.mark.usefixtures("float64")


def simulator(prior):
    def model(x=None):
        theta = pyro.sample("theta", prior)
        loc = theta.reshape(theta.shape[: theta.dim() - prior.event_dim] + (-1,))[..., :1]
        return pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    return model


PRIORS = {
    "uniform": lambda: dist.Uniform(-1.0, 2.0),
    "lognormal": lambda: dist.LogNormal(0.0, 1.0),
    "beta": lambda: dist.Beta(2.0, 3.0),
    "uniform-box": lambda: dist.Uniform(torch.zeros(3), torch.tensor([1.0, 2.0, 3.0])).to_event(1),
    # supports whose unconstrained space has another shape than the site (D - 1 coordinates
    # for a simplex of D, d(d-1)/2 for a d x d correlation Cholesky factor)
    "dirichlet": lambda: dist.Dirichlet(torch.tensor([1.0, 2.0, 3.0])),
    "lkj-cholesky": lambda: dist.LKJCholesky(3, 2.0),
}


@pytest.mark.parametrize("name", PRIORS)
def test_samples_inside_support(name):
    prior = PRIORS[name]()
    guide = AutoAmortizedFlow(simulator(prior), num_transforms=2, hidden_dims=[8])
    x = torch.randn(4000, 1) * 30  # far into the tails of the context
    guide(observations={"x": x[:2]})
    for flow in guide.nets["flows"]:  # push the standardization to extremes
        flow.scale.fill_(20.0)
    theta = guide(observations={"x": x})["theta"]
    assert theta.shape == (4000,) + prior.event_shape
    assert bool(prior.support.check(theta).all())


def test_simplex_density_normalized_and_trainable():
    # the flow of a simplex site runs in the D - 1 unconstrained coordinates, mapped onto the
    # simplex by stick-breaking: E_p[q(theta) / p(theta)] = 1 under the flat Dirichlet p
    model = simulator(dist.Dirichlet(torch.ones(3)))
    guide = AutoAmortizedFlow(model, num_transforms=2, hidden_dims=[8])
    xo = {"x": torch.tensor([0.3])}
    guide(observations=xo)
    assert guide.flow("theta").dim == 2
    with torch.no_grad():
        q = guide._site_distribution("theta", guide._context(xo, {}))
        theta = dist.Dirichlet(torch.ones(3)).sample((200000,))
        ratio = (q.log_prob(theta) - dist.Dirichlet(torch.ones(3)).log_prob(theta)).exp()
    se = float(ratio.std()) / math.sqrt(ratio.numel())
    assert float(ratio.mean()) == pytest.approx(1.0, abs=5 * se)
    loss = SleepPhaseLoss(num_particles=8).differentiable_loss(model, guide, xo["x"])
    loss.backward()
    grads = [p.grad for p in guide.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def _inverse(transforms, y):
    for t in reversed(transforms):
        y = t.inv(y)
    return y


def test_log_prob_is_change_of_variables_1d():
    guide = AutoAmortizedFlow(simulator(dist.LogNormal(0.0, 1.0)), hidden_dims=[8])
    xo = {"x": torch.tensor([0.7])}
    guide(observations=xo)
    with torch.no_grad():
        context = guide._context(xo, {})
        q = guide._site_distribution("theta", context)
        theta = torch.linspace(0.05, 6.0, 41)
        # numerically: log N(u) + log |du/dtheta| by central differences of the inverse map
        h = 1e-6
        u = _inverse(q.transforms, theta)
        du = (_inverse(q.transforms, theta + h) - _inverse(q.transforms, theta - h)) / (2 * h)
        expected = dist.Normal(0.0, 1.0).log_prob(u).reshape(-1) + du.abs().log().reshape(-1)
        assert torch.allclose(q.log_prob(theta), expected, atol=1e-6)
        # and the density integrates to one over the support
        grid = torch.linspace(1e-6, 200.0, 400001)
        mass = torch.trapezoid(q.log_prob(grid).exp(), grid)
        assert mass == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("masks", ["pyro", "made"])
@pytest.mark.parametrize("bijection", ["soft_edge", "sigmoid"])
def test_log_prob_normalized_2d_box(bijection, masks):
    prior = dist.Uniform(torch.zeros(2), torch.ones(2)).to_event(1)
    guide = AutoAmortizedFlow(
        simulator(prior),
        num_transforms=2,
        hidden_dims=[16],
        interval_bijection=bijection,
        masks=masks,
    )
    xo = {"x": torch.tensor([0.3])}
    guide(observations=xo)
    with torch.no_grad():
        for p in guide.parameters():  # a flow far from the identity
            p.add_(0.3 * torch.randn_like(p))
        q = guide._site_distribution("theta", guide._context(xo, {}))
        theta = q.sample((20000,))
        # the mass of the inner square [0.1, 0.9]^2 by the midpoint rule and by the samples
        n = 400
        g = 0.1 + 0.8 * (torch.arange(n) + 0.5) / n
        inner = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        mass = 0.64 * q.log_prob(inner).exp().mean()
        frac = ((theta > 0.1) & (theta < 0.9)).all(-1).double().mean()
        se = float(frac * (1 - frac) / len(theta)) ** 0.5
        assert float(mass) == pytest.approx(float(frac), abs=5 * se + 0.005)
        # the whole space in the flow's own coordinates, before the bijection onto the box
        # (a flow this far from the identity piles mass against the bounds, closer than float64
        # resolves there): the midpoint rule on [-40, 40]^2 plus the samples' fraction outside
        qz = dist.TransformedDistribution(q.base_dist, q.transforms[:-1])
        z = qz.sample((20000,))
        outside = (z.abs() > 40).any(-1).double().mean()
        n, half = 1600, 40.0
        g = half * (2 * (torch.arange(n) + 0.5) / n - 1)
        grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        lg = qz.log_prob(grid)
        cell = (2 * half / n) ** 2
        se = float(outside * (1 - outside) / len(z)) ** 0.5
        assert float(lg.exp().sum() * cell + outside) == pytest.approx(1.0, abs=5 * se + 0.002)
        # samples are scored as the same density: E_q[-log q; inside] by samples and by the grid
        lz = qz.log_prob(z) * ~(z.abs() > 40).any(-1)
        grid_entropy = -(lg.exp() * lg).sum() * cell
        se = lz.std() / math.sqrt(len(lz))
        assert float(-lz.mean()) == pytest.approx(float(grid_entropy), abs=5 * float(se) + 0.02)


def conjugate(x):
    with pyro.plate("data", len(x)):
        theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(theta, 0.5).to_event(1), obs=x)


def test_sleep_phase_learns_conjugate_posterior():
    x = torch.zeros(256, 2)
    guide = AutoAmortizedFlow(conjugate, num_transforms=2, hidden_dims=[32, 32])
    svi = SVI(conjugate, guide, pyro.optim.Adam({"lr": 1e-2}), loss=SleepPhaseLoss(2))
    for _ in range(150):
        svi.step(x)
    xo = torch.tensor([[1.0, -2.0], [0.0, 0.5]])
    with torch.no_grad():
        samples = guide(xo.expand(4000, 2, 2))["theta"]  # particle dim first
    # posterior: N(0.8 x, 0.2)
    assert samples.shape == (4000, 2, 2)
    assert torch.allclose(samples.mean(0), 0.8 * xo, atol=0.15)
    assert torch.allclose(samples.std(0), torch.full((2, 2), 0.2**0.5), rtol=0.2)
    # RWS fine-tunes on real observations, log_evidence scores them
    rws = SVI(conjugate, guide, pyro.optim.Adam({"lr": 1e-3}), loss=RWS(num_particles=4))
    assert math.isfinite(rws.step(xo))
    lz = log_evidence(conjugate, guide, xo, num_particles=500)
    exact = dist.Normal(0.0, 1.25**0.5).log_prob(xo).sum(-1)
    assert lz.shape == (2,)
    assert torch.allclose(lz, exact, atol=0.05)


def test_each_datapoint_reads_its_own_observation():
    guide = AutoAmortizedFlow(conjugate, num_transforms=2, hidden_dims=[8])
    x = torch.randn(3, 2)
    trace = poutine.trace(guide).get_trace(x)
    theta = trace.nodes["theta"]["value"]
    lp = trace.nodes["theta"]["fn"].log_prob(theta)
    x2 = x.clone()
    x2[1] += 5.0
    cond = poutine.condition(guide, data={"theta": theta})
    lp2 = poutine.trace(cond).get_trace(x2).nodes["theta"]["fn"].log_prob(theta)
    assert lp.shape == (3,)
    assert torch.allclose(lp[[0, 2]], lp2[[0, 2]]) and not torch.allclose(lp[1], lp2[1])


def test_standardize_and_observed_names():
    def model():  # a simulator called without data: "x" is named as the observation
        theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 3.0).to_event(1))
        pyro.sample("x", dist.Normal(theta + 10.0, 1.0).to_event(1))

    guide = AutoAmortizedFlow(model, observed=["x"], num_transforms=1, hidden_dims=[4])
    theta = torch.randn(500, 2) * 3.0
    sims = {"theta": theta, "x": theta + 10.0 + torch.randn(500, 2)}
    guide.standardize(sims)
    emb = guide.nets["embedding"].standardizers["x"]
    assert torch.allclose(emb.mean, sims["x"].mean(0))
    assert torch.allclose(guide.flow("theta").scale, theta.std(0))
    assert guide(observations={"x": sims["x"][:7]})["theta"].shape == (7, 2)
    with pytest.raises(ValueError, match="not observed in this call"):
        guide()


def test_several_latents_chain():
    def model(x):
        a = pyro.sample("a", dist.HalfNormal(1.0))
        b = pyro.sample("b", dist.Normal(torch.zeros(2), a.unsqueeze(-1)).to_event(1))
        pyro.sample("x", dist.Normal(b, 1.0).to_event(1), obs=x)

    guide = AutoAmortizedFlow(model, num_transforms=1, hidden_dims=[8])
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=SleepPhaseLoss(3))
    assert math.isfinite(svi.step(torch.zeros(2)))
    assert guide.flow("b").layers[0].nn.context_dim == guide.nets["embedding"].out_features + 1


def test_embedding_net_option():
    net = nn.Linear(2, 5)
    guide = AutoAmortizedFlow(conjugate, embedding_net=net, num_transforms=1, hidden_dims=[8])
    guide(torch.randn(4, 2))
    assert guide.nets["embedding"].out_features == 5
    assert any(p is net.weight for p in guide.parameters())


def test_errors():
    def discrete(x):
        k = pyro.sample("k", dist.Categorical(torch.ones(3) / 3))
        pyro.sample("x", dist.Normal(k.double(), 1.0), obs=x)

    with pytest.raises(ValueError, match="site 'k' is discrete.*enumerat.*by hand"):
        AutoAmortizedFlow(discrete)(torch.tensor(0.0))

    def two_plates(x):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            b = pyro.sample("b", dist.Normal(a, 1.0))
            pyro.sample("x", dist.Normal(b, 1.0), obs=x)

    with pytest.raises(ValueError, match="'a' and 'b' lie in different plates"):
        AutoAmortizedFlow(two_plates)(torch.zeros(3))

    def batch_latent(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    with pytest.raises(ValueError, match=r"'z' has batch shape \(3,\).*to_event"):
        AutoAmortizedFlow(batch_latent)(torch.zeros(3))
    with pytest.raises(ValueError, match="num_transforms"):
        AutoAmortizedFlow(conjugate, num_transforms=0)
    with pytest.raises(ValueError, match=r"\['y'\] are not sites"):
        AutoAmortizedFlow(conjugate, observed=["y"])(torch.zeros(2, 2))


def test_fit_guide_on_simulations_and_torch_module():
    import pyro_rws

    def model(x=None):
        theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        return pyro.sample("x", dist.Normal(theta, 0.5).to_event(1), obs=x)

    sims = pyro_rws.simulate(model, 300, observed=("x",), seed=0, progress=False)
    guide = AutoAmortizedFlow(model, num_transforms=2, hidden_dims=[16])
    guide.standardize(sims)
    assert torch.allclose(guide.flow("theta").loc, sims.latents["theta"].mean(0))
    history = pyro_rws.fit_guide(model, guide, sims, max_epochs=3, progress=False)
    assert history.epochs == 3 and all(math.isfinite(v) for v in history.train_loss)
    assert guide(observations={"x": torch.zeros(5, 2)})["theta"].shape == (5, 2)
    # the sleep phase as a plain torch module: the guide's parameters are module parameters
    loss_fn = SleepPhaseLoss(num_particles=8)(model, guide)
    optim = torch.optim.Adam(loss_fn.parameters(), lr=1e-3)
    assert any(p is q for p in loss_fn.parameters() for q in guide.parameters())
    loss = loss_fn(torch.zeros(2))
    loss.backward()
    optim.step()
    assert math.isfinite(float(loss.detach()))


def test_log_prob_is_one_network_pass_per_layer():
    guide = AutoAmortizedFlow(conjugate, num_transforms=3, hidden_dims=[8])
    x = torch.randn(4, 2)
    guide(x)
    calls = []
    for layer in guide.flow("theta").layers:
        layer.nn.register_forward_hook(lambda *_: calls.append(1))
    theta = torch.randn(4, 2)
    trace = poutine.trace(poutine.condition(guide, data={"theta": theta})).get_trace(x)
    calls.clear()
    trace.nodes["theta"]["fn"].log_prob(theta)
    assert len(calls) == 3  # scoring a given value: one pass per layer (MAF direction)
    calls.clear()
    guide(x)
    assert len(calls) == 3 * 2  # sampling: D = 2 passes per layer


def test_layer_orders_alternate():
    # consecutive MAF layers with the same autoregressive order compose into one, so the orders
    # alternate (natural, reversed) whatever the seed, rather than Pyro's random permutations
    def model():
        theta = pyro.sample("theta", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        return pyro.sample("x", dist.Normal(theta, 1.0).to_event(1))

    for seed in range(3):
        pyro.set_rng_seed(seed)
        guide = AutoAmortizedFlow(model, observed=["x"], num_transforms=4, hidden_dims=[8])
        guide(observations={"x": torch.randn(2, 3)})
        orders = [layer.nn.permutation.tolist() for layer in guide.flow("theta").layers]
        assert orders == [[0, 1, 2], [2, 1, 0], [0, 1, 2], [2, 1, 0]]


@pytest.mark.parametrize("masks", ["pyro", "made"])
def test_layer_conditioners_are_autoregressive(masks):
    # each MAF layer's shift and log-scale of the variable at position p of its order depend
    # on the variables before p only, and on the context (every one of them, the first too)
    def model():
        theta = pyro.sample("theta", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        return pyro.sample("x", dist.Normal(theta, 1.0).to_event(1))

    guide = AutoAmortizedFlow(
        model, observed=["x"], num_transforms=2, hidden_dims=[7, 5], masks=masks
    )
    guide(observations={"x": torch.randn(2, 3)})
    context = guide._context({"x": torch.randn(3)}, {})
    for layer in guide.flow("theta").layers:
        net, order = layer.nn, layer.nn.permutation
        theta = torch.randn(3)
        d_theta = jacobian(lambda t, net=net: torch.stack(net(t, context)), theta)
        d_context = jacobian(lambda c, net=net, t=theta: torch.stack(net(t, c)), context)
        position = torch.empty(3, dtype=torch.long)
        position[order] = torch.arange(3)
        reads = d_theta.ne(0).any(0)  # reads[i, j]: output of variable i depends on variable j
        assert torch.equal(reads, position[None, :] < position[:, None])
        assert bool(d_context.ne(0).any(-1).all())
    with pytest.raises(ValueError, match="masks must be one of"):
        AutoAmortizedFlow(model, masks="nflows")


def test_iid_repeats_without_plate_sbibm_style():
    def model():  # sbibm's slcp: a leading simulation dim of size 1, 4 iid draws as batch dims
        theta = pyro.sample("theta", dist.Normal(torch.zeros(1, 2), 1.0).to_event(1))
        loc = theta.unsqueeze(-2).expand(1, 4, 2)
        return pyro.sample("x", dist.Normal(loc, 1.0).to_event(1))

    guide = AutoAmortizedFlow(model, observed=["x"], num_transforms=1, hidden_dims=[8])
    x = torch.randn(7, 4, 2)
    trace = poutine.trace(guide).get_trace(observations={"x": x})
    assert trace.nodes["theta"]["value"].shape == (7, 2)
    assert guide.nets["embedding"].shapes["x"] == (8,)
    theta = torch.randn(7, 2)
    assert trace.nodes["theta"]["fn"].log_prob(theta).shape == (7,)
