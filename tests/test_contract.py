# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The contract every loss of pyro_rws keeps, tested once for all of them.

``SPECS`` lists every loss (each class and mode, vectorized and sequential particles); the
``spec`` fixture runs each contract test for each of them, so that a new loss gets the
contract tests by adding one line to ``NAMES`` and ``Spec.make``.
"""

import math
import re
import warnings
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn
from pyro.distributions import constraints
from pyro.infer import SVI, config_enumerate
from pyro.nn import PyroModule, PyroParam
from pyro.optim import Adam

from pyro_rws import (
    RWS,
    EffectiveSampleSizeWarning,
    ReweightedWakeSleep,
    SleepPhaseLoss,
    WakeSleepELBO,
)
from pyro_rws.diagnostics import ESSMonitor


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# --------------------------------------------------------------------------------------------
# Every loss, FlowTorch-style
# --------------------------------------------------------------------------------------------
NAMES = ["rws-1", "rws-0.5", "rws-0", "ws-sleep", "ws-wake", "sleep"]


@dataclass(frozen=True)
class Spec:
    name: str
    vectorize: bool

    @property
    def has_wake(self) -> bool:
        return self.name != "sleep"

    @property
    def has_sleep(self) -> bool:
        return self.name in ("rws-0.5", "rws-0", "ws-sleep", "sleep")

    @property
    def weighted(self) -> bool:
        """Self-normalized weights per datapoint (``stats.ess`` is set)."""
        return self.name in ("rws-1", "rws-0.5", "rws-0", "ws-wake")

    @property
    def trains_model(self) -> bool:
        return self.name != "sleep"

    def make(self, num_particles=3, num_sleep_particles=1, **kwargs):
        """The loss; ``num_sleep_particles`` is ``num_particles`` of SleepPhaseLoss."""
        common = dict(vectorize_particles=self.vectorize, **kwargs)
        if self.name.startswith("rws-"):
            return ReweightedWakeSleep(
                num_particles=num_particles,
                insomnia=float(self.name[4:]),
                num_sleep_particles=num_sleep_particles,
                **common,
            )
        if self.name.startswith("ws-"):
            return WakeSleepELBO(
                num_particles=num_particles,
                phase_q=self.name[3:],
                num_sleep_particles=num_sleep_particles,
                **common,
            )
        return SleepPhaseLoss(num_particles=num_sleep_particles, **common)

    def __str__(self):
        return f"{self.name}-{'vec' if self.vectorize else 'seq'}"


SPECS = [Spec(n, v) for n in NAMES for v in (True, False)]


@pytest.fixture(params=SPECS, ids=str)
def spec(request):
    return request.param


# --------------------------------------------------------------------------------------------
# A conjugate model: z_n ~ N(theta, 1), x_n ~ N(z_n, 1); guide q(z_n|x_n) = N(a x_n + b, s)
# --------------------------------------------------------------------------------------------
DATA = (0.3, -1.2, 2.0, 0.7)


def data(dtype=None):
    return torch.tensor(DATA, dtype=dtype)


def model(x):
    theta = pyro.param("theta", torch.tensor(0.2, dtype=x.dtype))
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(theta, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x, *args, extra_site=None):
    """
    Broadcasts over leading dims of x (x.shape[-1]), as vectorized sleep particles need.
    Ignores further arguments of the model; samples ``extra_site`` too if given.
    """
    a = pyro.param("a", torch.tensor(0.3, dtype=x.dtype))
    b = pyro.param("b", torch.tensor(-0.1, dtype=x.dtype))
    s = pyro.param("s", torch.tensor(0.9, dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Normal(a * x + b, s))
        if extra_site is not None:
            pyro.sample(extra_site, dist.Normal(0.0, 1.0))


def exact_guide(x):
    """The exact posterior of ``model`` at theta = 0: N(x/2, 1/sqrt 2)."""
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))


def fixed_model(x):
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def log_evidence(x):
    """log p(x_n) of ``fixed_model``: x_n ~ N(0, sqrt 2)."""
    return dist.Normal(0.0, 2.0**0.5).log_prob(x)


def leaves():
    """Unconstrained parameter leaves, by name."""
    return dict(pyro.get_param_store().named_parameters())


def grads_of(params):
    return {k: None if p.grad is None else p.grad.clone() for k, p in params.items()}


def zero_grads(params):
    for p in params.values():
        p.grad = None


# --------------------------------------------------------------------------------------------
# loss, loss_and_grads, differentiable_loss, SVI
# --------------------------------------------------------------------------------------------
def test_methods_agree(spec):
    x = data()
    loss = spec.make()
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
    assert (grads["theta"] is not None) == spec.trains_model
    for name in "abs":
        assert grads[name] is not None and grads[name].abs() > 0


def test_loss_returns_float_and_keeps_no_graph(spec):
    x = data()
    loss = spec.make()
    value = loss.loss(model, guide, x)
    assert type(value) is float and math.isfinite(value)
    for field in ("loss", "wake_theta", "wake_phi", "sleep_phi", "bound", "ess"):
        t = getattr(loss.stats, field)
        if t is not None:
            assert not t.requires_grad and t.grad_fn is None, field
    assert all(p.grad is None for p in leaves().values())


def test_svi_step_returns_float(spec):
    x = data()
    loss = spec.make()
    svi = SVI(model, guide, Adam({"lr": 0.01}), loss=loss)
    values = [svi.step(x) for _ in range(3)]
    assert all(type(v) is float and math.isfinite(v) for v in values)
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


def test_elbo_module_matches_differentiable_loss(spec):
    x = data()
    model_m, guide_m = ModelModule(), GuideModule()
    loss = spec.make()
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
    assert (grads[0] is not None) == spec.trains_model


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
@pytest.mark.parametrize("name", NAMES)
def test_vectorized_matches_sequential_in_expectation(name):
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
        spec = Spec(name, vectorize)
        loss = spec.make(num_particles=3, num_sleep_particles=2)
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
                + ([params["theta"].grad.item()] if spec.trains_model else [])
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
def test_args_and_kwargs_not_mutated(spec, call, num_sleep_particles):
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
    loss = spec.make(num_particles=3, num_sleep_particles=num_sleep_particles)
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


# --------------------------------------------------------------------------------------------
# Bad inputs: clear exceptions
# --------------------------------------------------------------------------------------------
BAD_CONSTRUCTIONS = [
    (lambda: RWS(num_particles=0), ValueError, "num_particles must be at least 2"),
    (lambda: RWS(num_particles=0, insomnia=0.0), ValueError, "num_particles must be at least 1"),
    (lambda: RWS(num_particles=1), ValueError, "insomnia > 0"),
    (lambda: RWS(num_particles=1, insomnia=0.3), ValueError, "insomnia > 0"),
    (lambda: RWS(num_particles=2.5), TypeError, "num_particles must be an integer"),
    (lambda: RWS(num_particles=2.0), TypeError, "num_particles must be an integer"),
    (lambda: RWS(num_particles=True), TypeError, "num_particles must be an integer"),
    (lambda: RWS(num_particles="3"), TypeError, "num_particles must be an integer"),
    (lambda: RWS(num_particles=torch.tensor(3)), TypeError, "num_particles must be an integer"),
    (lambda: RWS(insomnia=1.5), ValueError, "insomnia must be in [0, 1]"),
    (lambda: RWS(insomnia=-0.1), ValueError, "insomnia must be in [0, 1]"),
    (lambda: RWS(insomnia=math.nan), ValueError, "insomnia must be in [0, 1]"),
    (lambda: RWS(insomnia="0.5"), TypeError, "insomnia must be a number"),
    (lambda: RWS(insomnia=0.5, num_sleep_particles=0), ValueError, "num_sleep_particles"),
    (lambda: RWS(insomnia=0.5, num_sleep_particles=1.5), TypeError, "num_sleep_particles"),
    (lambda: RWS(max_plate_nesting=-1), ValueError, "max_plate_nesting"),
    (lambda: WakeSleepELBO(num_particles=0), ValueError, "num_particles must be at least 1"),
    (lambda: WakeSleepELBO(num_particles=1.5), TypeError, "num_particles must be an integer"),
    (lambda: WakeSleepELBO(phase_q="dream"), ValueError, "phase_q must be 'sleep' or 'wake'"),
    (lambda: WakeSleepELBO(phase_q=None), ValueError, "phase_q"),
    (lambda: WakeSleepELBO(num_sleep_particles=0), ValueError, "num_sleep_particles"),
    (lambda: SleepPhaseLoss(num_particles=0), ValueError, "num_particles must be at least 1"),
    (lambda: SleepPhaseLoss(num_particles=None), TypeError, "num_particles must be an integer"),
    (lambda: RWS(fantasy_args=[0]), TypeError, "fantasy_args must be None, a dict"),
    (lambda: RWS(fantasy_args="x"), TypeError, "fantasy_args must be None, a dict"),
    (lambda: RWS(fantasy_args={"x": 1.5}), TypeError, "fantasy_args['x']"),
    (lambda: RWS(fantasy_args={"x": True}), TypeError, "fantasy_args['x']"),
    (lambda: WakeSleepELBO(fantasy_args={"x": [0]}), TypeError, "fantasy_args['x']"),
    (lambda: SleepPhaseLoss(fantasy_args=(0,)), TypeError, "fantasy_args must be None"),
]


@pytest.mark.parametrize("make, error, phrase", BAD_CONSTRUCTIONS)
def test_bad_construction_raises(make, error, phrase):
    with pytest.raises(error, match=re.escape(phrase)):
        make()


def test_good_edge_constructions():
    assert RWS(num_particles=1, insomnia=0.0).num_particles == 1
    assert RWS(num_particles=2, insomnia=1).insomnia == 1.0
    assert SleepPhaseLoss(num_particles=1).num_particles == 1
    assert WakeSleepELBO(num_particles=1, phase_q="sleep").num_particles == 1
    assert RWS(fantasy_args={"x": 0, "y": "data", "w": None}).fantasy_args is not None
    assert RWS(fantasy_args=lambda fantasies, *a, **k: (a, k)).fantasy_args is not None


def test_wake_phase_q_with_one_particle_warns():
    with pytest.warns(UserWarning, match="expectation zero"):
        WakeSleepELBO(num_particles=1, phase_q="wake")


def model_two_latents(x):
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z + w, 1.0), obs=x)


def guide_extra_site(x):
    guide(x, extra_site="u")


def guide_samples_observed(x):
    guide(x, extra_site="x")


def test_latent_missing_from_guide_raises(spec):
    with pytest.raises(ValueError, match=r"\['w'\] are not sampled by the guide"):
        spec.make().loss(model_two_latents, guide, data())


def test_guide_site_missing_from_model_raises(spec):
    with pytest.raises(ValueError, match=r"\['u'\].*(does not sample|not latent sites)"):
        spec.make().loss(model, guide_extra_site, data())


def test_guide_sampling_observed_site_raises(spec):
    with pytest.raises(ValueError, match=r"\['x'\].*(observed in the model|model observes)"):
        spec.make().loss(model, guide_samples_observed, data())


def model_factor(x, log_factor):
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        pyro.factor("constraint", log_factor(z))


def test_all_particles_minus_inf_weight_raises(spec):
    def log_factor(z):
        return torch.where(z > 100.0, 0.0, -math.inf)

    phrase = "probability zero" if spec.has_wake else "pyro.factor"
    with pytest.raises(ValueError, match=phrase):
        spec.make().loss(model_factor, guide, data(), log_factor)


def model_uniform(x):
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Uniform(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide_negative(x):
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Normal(-5.0, 0.1))


@pytest.mark.parametrize("validation", [True, False])
def test_guide_outside_model_support_raises(spec, validation):
    if not spec.has_wake:
        pytest.skip("the sleep phase scores the guide at model samples only")
    pyro.enable_validation(validation)
    loss = spec.make()
    if validation:  # torch's support check names the problem
        with pytest.raises(ValueError, match="support"):
            loss.loss(model_uniform, guide_negative, data())
    else:
        with pytest.raises(ValueError, match="probability zero"):
            loss.loss(model_uniform, guide_negative, data())


def model_truncated(x):
    theta = pyro.param("theta", torch.tensor(0.2))
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Uniform(theta - 1.0, theta + 3.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


@pytest.mark.parametrize("hard_constraint", ["factor", "support"])
def test_some_particles_minus_inf_weight_are_dropped(spec, hard_constraint):
    """
    Particles outside a hard constraint get weight zero and no gradient; the others carry the
    estimate. (Before the fix, 0 * -inf made the RWS surrogate, differentiable_loss and every
    gradient NaN.)
    """
    if not spec.name.startswith("rws"):
        pytest.skip("the ELBO of a particle with log w = -inf is -inf; sleep-only has no weights")
    if hard_constraint == "factor":
        if spec.has_sleep:
            pytest.skip("the sleep phase rejects factors")
        m, args = model_factor, (lambda z: torch.where(z > -0.5, 0.0, -math.inf),)
    else:
        pyro.enable_validation(False)  # else torch rejects values outside the support
        m, args = model_truncated, ()
    x = data()
    loss = spec.make(num_particles=20)
    pyro.set_rng_seed(4)
    dl = loss.differentiable_loss(m, guide, x, *args)
    assert torch.isfinite(dl)
    params = leaves()
    for name, g in zip(params, torch.autograd.grad(dl, list(params.values())), strict=True):
        assert torch.isfinite(g).all(), name
    assert (loss.stats.ess >= 1).all() and (loss.stats.ess < 20).all()
    assert torch.isfinite(loss.stats.bound)


def discrete_model(x):
    with pyro.plate("data", x.shape[-1]):
        c = pyro.sample("c", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(c, 1.0), obs=x)


def discrete_model_enum(x):
    with pyro.plate("data", x.shape[-1]):
        c = pyro.sample("c", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(c, 1.0), obs=x)


def discrete_guide(x):
    p = pyro.param("p", torch.tensor(0.5), constraint=constraints.unit_interval)
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("c", dist.Bernoulli(p))


def discrete_guide_enum(x):
    p = pyro.param("p", torch.tensor(0.5), constraint=constraints.unit_interval)
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("c", dist.Bernoulli(p), infer={"enumerate": "parallel"})


GUIDE_ENUMERATED = {
    "guide_config_enumerate": (discrete_model, config_enumerate(discrete_guide)),
    "guide_infer": (discrete_model, discrete_guide_enum),
}
MODEL_ENUMERATED = {
    "model_config_enumerate": config_enumerate(discrete_model),
    "model_infer": discrete_model_enum,
}


@pytest.mark.parametrize("where", list(GUIDE_ENUMERATED))
def test_guide_enumerated_sites_raise(spec, where):
    m, g = GUIDE_ENUMERATED[where]
    with pytest.raises(NotImplementedError, match=r"guide site 'c' is marked for enumeration"):
        spec.make().loss(m, g, data())
    # the same program without the flag runs
    assert math.isfinite(spec.make().loss(discrete_model, discrete_guide, data()))


@pytest.mark.parametrize("where", list(MODEL_ENUMERATED))
def test_model_enumerated_sites(spec, where):
    """A model site the guide samples is sampled (the flag is inert, as in TraceEnum_ELBO); one
    the guide does not sample is summed out (tests/test_enum.py checks the values exactly)."""
    m = MODEL_ENUMERATED[where]
    pyro.set_rng_seed(3)
    flagged = spec.make().loss(m, discrete_guide, data())
    pyro.set_rng_seed(3)
    assert flagged == spec.make().loss(discrete_model, discrete_guide, data())
    assert math.isfinite(spec.make().loss(m, lambda x: None, data()))


def model_global_subsampled(x, subsample_size):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x[idx])


def guide_global(x, subsample_size):
    loc = pyro.param("loc", torch.tensor(0.0))
    pyro.sample("mu", dist.Normal(loc, 0.5))


def test_subsampled_plate_with_global_latent(spec):
    x = torch.linspace(-1.0, 1.0, 10)
    loss = spec.make(fantasy_args={"x": None}) if spec.has_sleep else spec.make()
    if spec.weighted:
        with pytest.raises(ValueError, match="plate 'data' is subsampled .4 of 10."):
            loss.loss(model_global_subsampled, guide_global, x, 4)
    else:  # linear in the log-densities: scales act inside, fine
        svi = SVI(model_global_subsampled, guide_global, Adam({"lr": 0.01}), loss=loss)
        for _ in range(2):
            assert math.isfinite(svi.step(x, 4))
    # without subsampling, the weights are joint (one per particle) and all losses work
    loss = spec.make(fantasy_args={"x": None}) if spec.has_sleep else spec.make()
    svi = SVI(model_global_subsampled, guide_global, Adam({"lr": 0.01}), loss=loss)
    assert math.isfinite(svi.step(x, None))
    if spec.weighted:
        assert loss.stats.ess.shape == ()


def test_factor_with_sleep_phase_raises(spec):
    def log_factor(z):
        return -(z**2)

    loss = spec.make()
    if spec.has_sleep:
        with pytest.raises(ValueError, match="pyro.factor site 'constraint'"):
            loss.loss(model_factor, guide, data(), log_factor)
    else:  # the wake phase handles factors
        assert math.isfinite(loss.loss(model_factor, guide, data(), log_factor))


# --------------------------------------------------------------------------------------------
# NaN: errors in the weights, warnings (with validation) in linear terms
# --------------------------------------------------------------------------------------------
class NaNNormal(dist.Normal):
    """A Normal whose log_prob is NaN."""

    def log_prob(self, value):
        return super().log_prob(value) * math.nan


def model_nan(x):
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", NaNNormal(z, 1.0), obs=x)


def test_nan_in_model_log_prob_raises(spec):
    if not spec.has_wake:
        pytest.skip("the sleep phase does not score the model")
    with pytest.raises(ValueError, match="contain NaN"):
        spec.make().loss(model_nan, guide, data())


def make_guide_nan_on_fantasies(real_x):
    """A guide whose log-prob is NaN when it is called with anything but the real data."""

    def guide_nan(x):
        a = pyro.param("a", torch.tensor(0.3))
        with pyro.plate("data", x.shape[-1]):
            d = dist.Normal(a * x, 1.0) if x is real_x else NaNNormal(a * x, 1.0)
            pyro.sample("z", d)

    return guide_nan


def test_nan_in_sleep_phase_warns_with_validation(spec):
    if not spec.has_sleep:
        pytest.skip("no sleep phase")
    x = data()
    g = make_guide_nan_on_fantasies(x)
    loss = spec.make()
    with pytest.warns(UserWarning) as record:
        dl = loss.differentiable_loss(model, g, x)
    messages = {str(w.message) for w in record}
    expected = {"Encountered NaN: sleep-phi loss"}
    if spec.name.startswith("rws"):
        expected.add("Encountered NaN: wake-theta/wake-phi surrogate loss")
    elif spec.name == "ws-sleep":
        expected.add("Encountered NaN: wake-sleep surrogate loss")
    assert messages == expected
    assert torch.isnan(dl)
    # the same with validation off: no warning (filterwarnings = error would raise)
    pyro.enable_validation(False)
    assert torch.isnan(loss.differentiable_loss(model, g, x))


# --------------------------------------------------------------------------------------------
# stats
# --------------------------------------------------------------------------------------------
def test_stats_fields(spec):
    x = data()
    K = 4
    loss = spec.make(num_particles=K)
    assert loss.stats is None
    value = loss.loss_and_grads(model, guide, x)
    stats = loss.stats
    assert float(stats.loss) == pytest.approx(value, rel=1e-12)
    assert (stats.wake_theta is not None) == spec.has_wake
    assert (stats.bound is not None) == spec.has_wake
    assert (stats.sleep_phi is not None) == spec.has_sleep
    assert (stats.wake_phi is not None) == (spec.name in ("rws-1", "rws-0.5", "ws-wake"))
    assert (stats.ess is not None) == spec.weighted
    if spec.has_wake:
        assert float(stats.bound) == pytest.approx(-value, rel=1e-12)
        assert stats.num_particles == K
    if spec.name.startswith("rws"):
        assert float(stats.wake_theta) == pytest.approx(value, rel=1e-12)
    if spec.weighted:
        assert stats.ess.shape == (len(DATA),)
        assert ((stats.ess >= 1 - 1e-12) & (stats.ess <= K + 1e-12)).all()
        assert float(stats.ess_mean) == pytest.approx(float(stats.ess.mean()))
        assert float(stats.ess_min) == float(stats.ess.min())
    d = stats.as_dict()
    assert d and all(type(v) is float for v in d.values())
    assert d["loss"] == pytest.approx(value, rel=1e-12)
    assert set(d) == {
        n
        for n in ("loss", "wake_theta", "wake_phi", "sleep_phi", "bound", "ess_mean", "ess_min")
        if getattr(stats, n) is not None
    }


def test_stats_exact_posterior_gives_uniform_weights(spec):
    """With q(z|x) = p(z|x), log w_k = log p(x) for every particle: ess = K, bound = log p(x)."""
    if not spec.has_wake:
        pytest.skip("no weights")
    x = data()
    K = 5
    loss = spec.make(num_particles=K)
    value = loss.loss(fixed_model, exact_guide, x)
    expected = log_evidence(x).sum().item()
    assert value == pytest.approx(-expected, rel=1e-10)
    assert float(loss.stats.bound) == pytest.approx(expected, rel=1e-10)
    if spec.weighted:
        assert torch.allclose(loss.stats.ess, torch.full((len(DATA),), float(K)))


# --------------------------------------------------------------------------------------------
# The effective sample size warning
# --------------------------------------------------------------------------------------------
def threshold(K):
    """The ESS below which a step counts as low, as documented in ESSMonitor."""
    return 1.0 + min(0.1, 0.02 * (K - 1))


def test_ess_monitor_patience_and_rate_limit():
    monitor = ESSMonitor(patience=3, cooldown=5)
    K = 10
    low, high = 1.0, 5.0
    just_low = threshold(K) - 0.01
    warned = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ess = [low, low, high, low, low, just_low] + [low] * 9
        for step, value in enumerate(ess, 1):
            n = len(record)
            monitor.update(value, K)
            monitor.update(low, 1)  # one particle: ignored, not a step
            if len(record) > n:
                warned.append(step)
    # low runs: steps 1-2 (reset by `high` at step 3), then from step 4: warn at 6, again 5 later
    assert warned == [6, 11]
    assert all(issubclass(w.category, EffectiveSampleSizeWarning) for w in record)
    message = str(record[0].message)
    assert f"below {threshold(K):.2f}" in message and "3 consecutive steps" in message


@pytest.mark.parametrize("K", [2, 4, 10, 100])
def test_ess_monitor_threshold(K):
    monitor = ESSMonitor(patience=1, cooldown=1)
    with pytest.warns(EffectiveSampleSizeWarning, match=f"K={K} particles"):
        monitor.update(threshold(K) - 1e-3, K)
    monitor = ESSMonitor(patience=1, cooldown=1)
    monitor.update(threshold(K) + 1e-3, K)  # no warning (filterwarnings = error)


def wide_guide(x):
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Normal(0.0, 1e4))


@pytest.mark.parametrize("name", ["rws-1", "ws-wake"])
def test_ess_warning_end_to_end(name):
    """A guide far too wide: one particle in the posterior's bulk takes all the weight."""
    loss = Spec(name, True).make(num_particles=10)
    x = data()
    for _ in range(99):  # default patience is 100
        loss.loss(fixed_model, wide_guide, x)
    assert float(loss.stats.ess_mean) < 1.01
    with pytest.warns(EffectiveSampleSizeWarning, match="K=10"):
        loss.loss(fixed_model, wide_guide, x)
    for _ in range(20):  # rate-limited: no second warning for cooldown steps
        loss.loss(fixed_model, wide_guide, x)


# --------------------------------------------------------------------------------------------
# dtypes and devices
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_kept(spec, dtype):
    torch.set_default_dtype(dtype)  # restored by the float64 fixture
    x = data(dtype)
    seen = []

    def recording_guide(x):
        seen.append(x.dtype)
        guide(x)

    loss = spec.make()
    value = loss.loss_and_grads(model, recording_guide, x)
    assert type(value) is float and math.isfinite(value)
    for name, p in leaves().items():
        assert p.dtype == dtype, name
        if p.grad is not None:
            assert p.grad.dtype == dtype, name
    for field in ("loss", "wake_theta", "wake_phi", "sleep_phi", "bound", "ess"):
        t = getattr(loss.stats, field)
        if t is not None:
            assert t.dtype == dtype, field
    assert set(seen) == {dtype}  # the guide sees data and fantasies in the data's dtype
    assert loss.differentiable_loss(model, recording_guide, x).dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("insomnia", [1.0, 0.5])
def test_cuda_step(insomnia):
    x = data().cuda()
    loss = RWS(num_particles=3, insomnia=insomnia)
    value = loss.loss_and_grads(model, guide, x)
    assert math.isfinite(value)
    for name, p in leaves().items():
        assert p.is_cuda and p.grad is not None and p.grad.is_cuda, name
    assert loss.stats.ess.is_cuda
