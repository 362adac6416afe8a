# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
"Any Pyro program" works: plates of every kind, factors, masks, scales, deterministic sites,
autoguides, modules, stochastic control flow and subsampling, with values checked against hand
computations from the particles the guide actually drew (recorded by the guide itself).
"""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
import torch.nn as nn
from pyro.distributions import constraints
from pyro.infer import SVI
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.nn import PyroModule
from pyro.optim import Adam

from pyro_rws import RWS, SleepPhaseLoss, WakeSleepELBO
from pyro_rws._traces import PARTICLE_PLATE


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


LOSSES = {
    "rws-1": lambda v, **kw: RWS(num_particles=3, vectorize_particles=v, **kw),
    "rws-0.5": lambda v, **kw: RWS(num_particles=3, insomnia=0.5, vectorize_particles=v, **kw),
    "ws-sleep": lambda v, **kw: WakeSleepELBO(num_particles=2, vectorize_particles=v, **kw),
    "ws-wake": lambda v, **kw: WakeSleepELBO(3, phase_q="wake", vectorize_particles=v, **kw),
    "sleep": lambda v, **kw: SleepPhaseLoss(num_particles=2, vectorize_particles=v, **kw),
}
WEIGHTED = ("rws-1", "rws-0.5", "ws-wake")
ALL = [(name, v) for name in LOSSES for v in (True, False)]


def ids(case):
    name, vectorize = case
    return f"{name}-{'vec' if vectorize else 'seq'}"


def lme(log_w):
    """log mean exp over the particle dim 0."""
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def ess(log_w):
    return torch.softmax(log_w, 0).square().sum(0).reciprocal()


def train(loss, model, guide, *args, steps=3, **kwargs):
    svi = SVI(model, guide, Adam({"lr": 0.01}), loss=loss)
    values = [svi.step(*args, **kwargs) for _ in range(steps)]
    assert all(math.isfinite(v) for v in values), values
    return values


def wake_particles(record, vectorize, K):
    """The guide's wake samples as ``(K, ...)``, from a list filled by a recording guide."""
    out = record[0] if vectorize else torch.stack(record)
    assert len(record) == (1 if vectorize else K) and out.shape[0] == K
    return out


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


@pytest.mark.parametrize("case", ALL, ids=ids)
def test_discrete_and_continuous_latents(case):
    name, vectorize = case
    x = torch.tensor([-1.5, 0.2, 1.1, 2.0, -0.3])
    loss = LOSSES[name](vectorize)
    train(loss, mixture_model, mixture_guide, x)
    if name in WEIGHTED:
        assert loss.stats.ess.shape == (5,)
    params = dict(pyro.get_param_store().named_parameters())
    assert set(params) == {"weights", "locs", "a", "shift", "s"}
    for k in ("weights", "locs", "a", "shift", "s"):
        moved = params[k].grad is not None  # after SVI.step: zeroed, but allocated
        assert moved == (name != "sleep" or k in ("a", "shift", "s")), k


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
# Factors, masks, scales, deterministic sites: inside the weights, as part of the model
# --------------------------------------------------------------------------------------------
X4 = (0.5, -1.0, 2.0, 0.1)


def make_guide(record, scale=0.9):
    def guide(x, *args, **kwargs):
        a = pyro.param("a", torch.tensor(0.4))
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(a * x, scale))
        record.append(z.detach())

    return guide


def log_q_of(z, x, scale=0.9):
    return dist.Normal(0.4 * x, scale).log_prob(z)


def run_and_record(loss, model, x, *args, vectorize=True):
    """One loss evaluation; returns the value and the wake particles (K, N)."""
    record = []
    value = loss.loss(model, make_guide(record), x, *args)
    K = loss.num_particles
    return value, wake_particles(record[-(1 if vectorize else K) :], vectorize, K)


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


@pytest.mark.parametrize("case", ALL, ids=ids)
def test_deterministic_sites(case):
    name, vectorize = case
    x = torch.tensor(X4)
    loss = LOSSES[name](vectorize)
    train(loss, deterministic_model, make_guide([]), x)
    if name == "rws-1":
        pyro.clear_param_store()  # the guide's parameter back at a = 0.4
        value, z = run_and_record(loss, deterministic_model, x, vectorize=vectorize)
        log_w = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(x) - log_q_of(z, x)
        assert value == pytest.approx(-lme(log_w).sum().item(), rel=1e-10)


# --------------------------------------------------------------------------------------------
# Autoguides, parameters of every kind, programs without parameters
# --------------------------------------------------------------------------------------------
def param_model(x):
    loc = pyro.param("prior_loc", torch.tensor(0.5))
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


@pytest.mark.parametrize("auto", [AutoNormal, AutoDiagonalNormal])
@pytest.mark.parametrize("vectorize", [True, False])
def test_autoguides_with_wake_phi(auto, vectorize):
    x = torch.tensor(X4)
    guide = auto(param_model)
    loss = RWS(num_particles=4, insomnia=1.0, vectorize_particles=vectorize)
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
    for insomnia in (1.0, 0.5, 0.0):
        pyro.clear_param_store()
        for p in [*decoder.parameters(), *encoder.parameters()]:
            p.grad = None
        loss = RWS(num_particles=3, insomnia=insomnia)
        loss.loss_and_grads(model, guide, x)
        params = dict(pyro.get_param_store().named_parameters())
        assert {"prior_loc", "guide_shift", "encoder$$$weight", "linear.weight"} <= set(params)
        for name, p in params.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, (insomnia, name)
        for p in [*decoder.parameters(), *encoder.parameters()]:
            assert p.grad is not None and p.grad.abs().sum() > 0, insomnia


def bare_model(x):
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def bare_guide(x):
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Normal(0.5 * x, 0.8))


@pytest.mark.parametrize("case", ALL, ids=ids)
@pytest.mark.parametrize("guide_has_params", [True, False])
def test_programs_without_parameters(case, guide_has_params):
    name, vectorize = case
    x = torch.tensor(X4)
    loss = LOSSES[name](vectorize)
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


@pytest.mark.parametrize("case", ALL, ids=ids)
def test_sequential_plate_trains(case):
    name, vectorize = case
    x = torch.tensor(X4)
    loss = LOSSES[name](vectorize, fantasy_args=seq_fantasies)
    train(loss, seq_model, seq_guide, x)
    if name in WEIGHTED:
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


@pytest.mark.parametrize(
    "make",
    [
        lambda: SleepPhaseLoss(num_particles=8),
        lambda: RWS(num_particles=5),
        lambda: WakeSleepELBO(num_particles=3),
    ],
)
def test_stochastic_control_flow_vectorized_fails_loudly(make):
    image = torch.tensor([1.0, 2.5, 1.5])
    with pytest.raises(Exception):  # noqa: B017 - any exception, no silent wrong number
        make().loss(simulator, simulator_guide, image)


# --------------------------------------------------------------------------------------------
# Subsampling: N/B outside the log-sum-exp
# --------------------------------------------------------------------------------------------
N_FULL, B = 8, 3
X8 = (0.3, -1.2, 2.0, 0.7, -0.4, 1.5, -2.2, 0.9)


def log_evidence(x):
    """log p(x_n) of ``sub_model``: z ~ N(0, 1), x ~ N(z, 1) => x ~ N(0, sqrt 2)."""
    return dist.Normal(0.0, 2.0**0.5).log_prob(x)


def make_sub_model(record=None, subsample_size=B):
    def model(x, subsample=None):
        with pyro.plate("data", len(x), subsample_size=subsample_size, subsample=subsample) as i:
            if record is not None:
                record.append(i.clone())
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[i])

    return model


def make_sub_guide(record=None, subsample_size=B, exact=True):
    def guide(x, subsample=None):
        a = pyro.param("a", torch.tensor(0.5 if exact else 0.2))
        s = pyro.param("s", torch.tensor(0.5**0.5 if exact else 1.2))
        with pyro.plate("data", len(x), subsample_size=subsample_size, subsample=subsample) as i:
            if record is not None:
                record.append(i.clone())
            pyro.sample("z", dist.Normal(a * x[i], s))

    return guide


SUB_LOSSES = {
    "rws-1": lambda v: RWS(num_particles=3, vectorize_particles=v),
    "rws-0.5": lambda v: RWS(3, insomnia=0.5, vectorize_particles=v, fantasy_args={"x": 0}),
    "ws-sleep": lambda v: WakeSleepELBO(2, vectorize_particles=v, fantasy_args={"x": 0}),
    "ws-wake": lambda v: WakeSleepELBO(3, phase_q="wake", vectorize_particles=v),
}


@pytest.mark.parametrize("name", list(SUB_LOSSES))
@pytest.mark.parametrize("vectorize", [True, False])
def test_subsampled_bound_is_exact_with_the_exact_posterior(name, vectorize):
    x = torch.tensor(X8)
    record = []
    loss = SUB_LOSSES[name](vectorize)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        record.clear()
        value = loss.loss(make_sub_model(), make_sub_guide(record), x)
        idx = record[-1]
        assert idx.shape == (B,)
        expected = -(N_FULL / B) * log_evidence(x[idx]).sum()
        assert value == pytest.approx(expected.item(), rel=1e-10)
    # given indices
    idx = torch.tensor([1, 4, 7])
    value = loss.loss(make_sub_model(), make_sub_guide(), x, subsample=idx)
    expected = -(N_FULL / B) * log_evidence(x[idx]).sum()
    assert value == pytest.approx(expected.item(), rel=1e-10)
    idx = torch.tensor([2, 5])
    value = loss.loss(
        make_sub_model(subsample_size=None), make_sub_guide(subsample_size=None), x, subsample=idx
    )
    expected = -(N_FULL / 2) * log_evidence(x[idx]).sum()
    assert value == pytest.approx(expected.item(), rel=1e-10)
    if name in WEIGHTED:
        assert loss.stats.ess.shape == (2,)


@pytest.mark.parametrize("name", ["rws-1", "ws-wake"])
def test_minibatch_loss_is_unbiased_for_the_full_data_loss(name):
    """
    With an inexact guide each loss is random; the minibatch loss (N/B) sum_{n in batch} -IWAE_n
    has the expectation of the full-data loss sum_n -IWAE_n (over minibatches and particles).
    Over m seeds the difference of the two means is ~ N(0, se_1^2 + se_2^2) (CLT, independent
    runs), so |diff| < 4 sqrt(se_1^2 + se_2^2) fails with probability about 6e-5. (4 se is about
    0.64 nats here; the N/B scale inside the log-sum-exp would be about 1.7 nats too high.)
    """
    x = torch.tensor(X8)
    m = 400
    loss = SUB_LOSSES[name](True)
    runs = {}
    for size in (B, None):
        model = make_sub_model(subsample_size=size)
        guide = make_sub_guide(subsample_size=size, exact=False)
        values = []
        for seed in range(m):
            pyro.set_rng_seed(seed + (0 if size is None else 10_000))
            values.append(loss.loss(model, guide, x))
        runs[size] = torch.tensor(values)
    minibatch, full = runs[B], runs[None]
    se = (minibatch.var() / m + full.var() / m).sqrt()
    assert (minibatch.mean() - full.mean()).abs() < 4 * se
    assert full.std() < minibatch.std()  # minibatches add variance, no bias


@pytest.mark.parametrize(
    "make",
    [
        lambda: RWS(
            3, insomnia=0.5, num_sleep_particles=2, vectorize_particles=False, fantasy_args={"x": 0}
        ),
        lambda: RWS(
            3, insomnia=0.0, num_sleep_particles=3, vectorize_particles=False, fantasy_args={"x": 0}
        ),
        lambda: WakeSleepELBO(
            3, num_sleep_particles=2, vectorize_particles=False, fantasy_args={"x": 0}
        ),
        lambda: WakeSleepELBO(3, phase_q="wake", vectorize_particles=False),
        lambda: SleepPhaseLoss(3, vectorize_particles=False, fantasy_args={"x": 0}),
    ],
)
def test_sequential_particles_share_the_minibatch(make):
    x = torch.tensor(X8)
    model_idx, guide_idx = [], []
    loss = make()
    loss.max_plate_nesting = 1  # no guessing run
    batches = []
    for seed in range(3):
        pyro.set_rng_seed(seed)
        model_idx.clear()
        guide_idx.clear()
        loss.loss(make_sub_model(model_idx), make_sub_guide(guide_idx, exact=False), x)
        runs = model_idx + guide_idx
        assert len(runs) >= 6
        assert all(torch.equal(i, runs[0]) for i in runs), runs
        batches.append(runs[0])
    assert not all(torch.equal(b, batches[0]) for b in batches)  # but fresh each step
