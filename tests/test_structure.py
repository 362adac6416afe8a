# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Model and guide must agree, or the loss says so (issue 9): one test per case that used to give a
silently wrong number or an unhelpful failure. The property-based search over random programs
is in test_properties.py.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoDiscreteParallel,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.nn import PyroModule, PyroParam

from pyro_rws import RWS, VIMCO, SleepPhaseLoss, WakeSleepELBO, log_evidence

pytestmark = pytest.mark.usefixtures("float64")

SLEEPERS = {
    "sleep": lambda **kw: SleepPhaseLoss(num_particles=1, **kw),
    "rws-0": lambda **kw: RWS(num_particles=2, insomnia=0.0, **kw),
    "rws-0.5": lambda **kw: RWS(num_particles=2, insomnia=0.5, **kw),
    "ws-sleep": lambda **kw: WakeSleepELBO(num_particles=2, **kw),
}
ALL = {
    **SLEEPERS,
    "rws": lambda **kw: RWS(num_particles=2, **kw),
    "ws-wake": lambda **kw: WakeSleepELBO(num_particles=2, phase_q="wake", **kw),
    "vimco": lambda **kw: VIMCO(num_particles=2, **kw),
}
VECTORIZE = [True, False]


# --------------------------------------------------------------------------------------------
# 1. explicit subsample indices: permutations are aligned, repeats are an error
# --------------------------------------------------------------------------------------------
class Recorder:
    def __init__(self, indices):
        self.indices = indices
        self.fantasies, self.seen = [], []

    def model(self, x):
        with pyro.plate("data", len(x), subsample=self.indices) as i:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            xi = pyro.sample("x", dist.Normal(z, 1.0), obs=x[i])
        if not torch.equal(xi, x[i]):  # a fantasy: datapoint j of the minibatch is index i[j]
            self.fantasies.append((i.clone(), xi.detach().clone(), z.detach().clone()))

    def guide(self, x):
        with pyro.plate("data", len(x), subsample=self.indices) as i:
            xi = x[i]
            z = pyro.sample("z", dist.Normal(0.5 * xi, 1.0))
        self.seen.append((i.clone(), xi.detach().clone(), z.detach().clone()))


@pytest.mark.parametrize("vectorize", VECTORIZE)
@pytest.mark.parametrize("name", SLEEPERS)
@pytest.mark.parametrize("indices", [[3, 2, 1, 0], [4, 0, 2]], ids=["permutation", "subset"])
def test_explicit_subsample_indices_align_fantasies(name, vectorize, indices):
    x = torch.arange(5.0) if len(indices) == 3 else torch.arange(4.0)
    rec = Recorder(torch.tensor(indices))
    loss = SLEEPERS[name](fantasy_args={"x": 0}, vectorize_particles=vectorize)
    assert math.isfinite(loss.loss_and_grads(rec.model, rec.guide, x))
    assert rec.fantasies
    sleep_reads = [s for s in rec.seen if any(torch.equal(s[2], f[2]) for f in rec.fantasies)]
    assert len(sleep_reads) == len(rec.fantasies)
    for (i, fantasy, z), (gi, read, gz) in zip(rec.fantasies, sleep_reads, strict=True):
        assert torch.equal(i, gi) and torch.equal(z, gz)
        assert torch.equal(read, fantasy)  # datapoint by datapoint, not permuted


@pytest.mark.parametrize("vectorize", VECTORIZE)
@pytest.mark.parametrize("name", SLEEPERS)
def test_repeated_subsample_indices_raise_in_the_sleep_phase(name, vectorize):
    rec = Recorder(torch.tensor([1, 1, 3]))
    loss = SLEEPERS[name](fantasy_args={"x": 0}, vectorize_particles=vectorize)
    with pytest.raises(ValueError, match="plate 'data' was given subsample indices with repeats"):
        loss.loss(rec.model, rec.guide, torch.arange(5.0))


# --------------------------------------------------------------------------------------------
# 2, 3. plates that differ in name or dim
# --------------------------------------------------------------------------------------------
def plate_model(x, subsample_size=None):
    with pyro.plate("data", len(x), subsample_size=subsample_size) as i:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[i])


def renamed_guide(x, subsample_size=None):
    with pyro.plate("batch", len(x), subsample_size=subsample_size) as i:
        pyro.sample("z", dist.Normal(0.5 * x[i], 1.0))


def dim_model(x):  # x: (N, 1)
    with pyro.plate("data", len(x), dim=-2):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def dim_guide(x):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(0.5 * x.squeeze(-1), 1.0))


@pytest.mark.parametrize("vectorize", VECTORIZE)
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("subsample_size", [None, 2])
def test_plate_names_that_differ_raise(name, vectorize, subsample_size):
    x = torch.tensor([0.1, -0.4, 1.2, 0.8])
    extra = {"fantasy_args": {"x": 0}} if name in SLEEPERS else {}
    loss = ALL[name](vectorize_particles=vectorize, **extra)
    expected = r"site 'z' lies in plate 'data' .* in the model but in plate 'batch'"
    with pytest.raises(ValueError, match=expected):
        loss.loss(plate_model, renamed_guide, x, subsample_size)


@pytest.mark.parametrize("vectorize", VECTORIZE)
@pytest.mark.parametrize("name", ALL)
def test_plate_dims_that_differ_raise(name, vectorize):
    x = torch.tensor([[0.1], [-0.4], [1.2]])
    loss = ALL[name](vectorize_particles=vectorize)
    with pytest.raises(ValueError, match=r"site 'z' lies in plate 'data' \(size 3, dim -2\)"):
        loss.loss(dim_model, dim_guide, x)


def test_trace_elbo_agrees_that_plate_dims_must_match():
    with pytest.raises(ValueError, match="shapes disagree at site 'z'"):
        pyro.infer.Trace_ELBO().loss(dim_model, dim_guide, torch.tensor([[0.1], [-0.4], [1.2]]))


# --------------------------------------------------------------------------------------------
# 4. a model without latent variables
# --------------------------------------------------------------------------------------------
def no_latent_model(x):
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


@pytest.mark.parametrize("vectorize", VECTORIZE)
@pytest.mark.parametrize("name", ALL)
def test_model_without_latents(name, vectorize):
    x = torch.tensor([0.5, 1.5, 1.0])
    loss = ALL[name](vectorize_particles=vectorize)
    value = loss.loss_and_grads(no_latent_model, lambda x: None, x)
    assert math.isfinite(value)
    if loss.stats.sleep_phi is not None:
        assert loss.stats.sleep_phi.item() == 0.0
        assert loss.stats.sleep_phi.dtype == torch.float64
    if name not in ("sleep", "rws-0"):  # these never score the model
        exact = -dist.Normal(0.0, 1.0).log_prob(x).sum().item()
        assert value == pytest.approx(exact, rel=1e-12)
        assert pyro.param("loc").unconstrained().grad.item() == pytest.approx(-x.sum().item())


# --------------------------------------------------------------------------------------------
# 5. ordinary guides with several sleep particles (scalar observations)
# --------------------------------------------------------------------------------------------
def scalar_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def len_guide(x):
    w = pyro.param("w", torch.tensor(0.2))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(w * x, 1.0))


def test_sleep_phase_loss_with_many_particles_and_a_len_guide():
    x = torch.randn(500)
    pyro.set_rng_seed(0)
    vectorized = SleepPhaseLoss(num_particles=10).loss(scalar_model, len_guide, x)
    pyro.set_rng_seed(0)
    sequential = SleepPhaseLoss(num_particles=10, vectorize_particles=False).loss(
        scalar_model, len_guide, x
    )
    assert vectorized == pytest.approx(sequential, rel=1e-12)


# --------------------------------------------------------------------------------------------
# 6. autoguides
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_auto_delta_is_rejected(name):
    with pytest.raises(ValueError, match="AutoDelta is a point mass.*Use AutoNormal"):
        ALL[name]().loss(scalar_model, AutoDelta(scalar_model), torch.randn(3))


@pytest.mark.parametrize("auto", [AutoDiagonalNormal, AutoMultivariateNormal])
@pytest.mark.parametrize("name", ALL)
def test_flattening_autoguides_warn_or_raise(name, auto):
    x = torch.randn(3)
    loss = ALL[name]()
    if name in SLEEPERS:
        with pytest.raises(ValueError, match=f"{auto.__name__} cannot be trained by the sleep"):
            loss.loss(scalar_model, auto(scalar_model), x)
        return
    guide = auto(scalar_model)
    with pytest.warns(UserWarning, match=f"{auto.__name__} flattens every latent.*AutoNormal"):
        loss.loss(scalar_model, guide, x)
    loss.loss(scalar_model, guide, x)  # once per loss object and guide


@pytest.mark.parametrize("name", ALL)
def test_auto_discrete_parallel_is_named(name):
    def model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(0.3))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    with pytest.raises(NotImplementedError, match="AutoDiscreteParallel enumerates"):
        ALL[name]().loss(model, AutoDiscreteParallel(model), torch.randn(3))


@pytest.mark.parametrize("name", ALL)
def test_auto_normal_works_with_the_wake_phase_only(name):
    x = torch.randn(3)
    if name in SLEEPERS:
        with pytest.raises(ValueError, match="AutoNormal cannot be trained by the sleep phase"):
            ALL[name]().loss(scalar_model, AutoNormal(scalar_model), x)
    else:
        assert math.isfinite(ALL[name]().loss(scalar_model, AutoNormal(scalar_model), x))


# --------------------------------------------------------------------------------------------
# 7. a non-amortized guide in the sleep phase
# --------------------------------------------------------------------------------------------
def non_amortized_guide(x):
    loc = pyro.param("locs", torch.zeros(len(x)))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(loc, 1.0))


@pytest.mark.parametrize("vectorize", VECTORIZE)
@pytest.mark.parametrize("name", SLEEPERS)
def test_non_amortized_guide_warns_in_the_sleep_phase(name, vectorize):
    loss = SLEEPERS[name](vectorize_particles=vectorize)
    x = torch.randn(4)
    with pytest.warns(UserWarning, match="does not read the values of the fantasy observations"):
        loss.loss_and_grads(scalar_model, non_amortized_guide, x)
    loss.loss_and_grads(scalar_model, non_amortized_guide, x)  # once


@pytest.mark.parametrize("name", SLEEPERS)
def test_amortized_guides_do_not_warn(name):
    def lookup_guide(x):  # reads its data by indexing, not differentiably
        table = pyro.param("table", torch.zeros(2))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(table[(x > 0).long()], 1.0))

    for guide in (len_guide, lookup_guide):
        SLEEPERS[name]().loss_and_grads(scalar_model, guide, torch.randn(4))


# --------------------------------------------------------------------------------------------
# 8. log_evidence under a subsampled plate with a global latent
# --------------------------------------------------------------------------------------------
def test_log_evidence_subsampling_error_speaks_of_evaluation():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x), subsample_size=2) as i:
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x[i])

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="log_evidence estimates log p\\(x\\) per datapoint") as e:
        log_evidence(model, guide, torch.randn(5), num_particles=4)
    assert "linear in the log-weights" not in str(e.value)


# --------------------------------------------------------------------------------------------
# 9, 10. Pyro's CSIS conventions: a module guide with forward(observations=...), placeholders
# --------------------------------------------------------------------------------------------
def csis_model(observations={"x1": 0, "x2": 0}):  # noqa: B006 - Pyro's CSIS example
    z = pyro.sample("z", dist.Normal(1.0, 5**0.5))
    pyro.sample("x1", dist.Normal(z, 2**0.5), obs=observations["x1"])
    pyro.sample("x2", dist.Normal(z, 2**0.5), obs=observations["x2"])


class CSISGuide(PyroModule):
    def __init__(self):
        super().__init__()
        self.w = PyroParam(torch.tensor([0.1, 0.1]))
        self.first = True

    def forward(self, observations={"x1": 0, "x2": 0}):  # noqa: B006
        x1, x2 = observations["x1"], observations["x2"]
        # Pyro's test_csis.py guide: x.view(1) fails on the int placeholders
        loc = self.w[0] * x1.view(1) + self.w[1] * x2.view(1)
        pyro.sample("z", dist.Normal(loc.squeeze(), 1.0))


@pytest.mark.parametrize("vectorize", VECTORIZE)
@pytest.mark.parametrize("name", ["sleep", "rws-0"])
def test_csis_module_guide_runs_unchanged(name, vectorize):
    guide = CSISGuide()
    loss = SLEEPERS[name](vectorize_particles=vectorize)
    placeholders = {"x1": torch.tensor(0.0), "x2": torch.tensor(0.0)}
    for _ in range(3):
        assert math.isfinite(loss.loss_and_grads(csis_model, guide, observations=placeholders))
    (w,) = [p for name, p in pyro.get_param_store().named_parameters() if name.endswith("w")]
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_plate_nesting_is_guessed_without_calling_the_guide():
    calls = []

    def guide(observations={"x1": 0, "x2": 0}):  # noqa: B006
        calls.append(observations)
        loc = observations["x1"].view(1) + observations["x2"].view(1)
        pyro.sample("z", dist.Normal(loc.squeeze(), 1.0))

    loss = SleepPhaseLoss(num_particles=2)
    loss.loss(csis_model, guide, observations={"x1": 0, "x2": 0})
    assert loss.max_plate_nesting == 0
    assert all(torch.is_tensor(c["x1"]) for c in calls)  # only fantasies, no placeholder


def test_guide_with_deeper_plates_than_the_model_asks_for_max_plate_nesting():
    def guide(x):
        with pyro.plate("aux_outer", 2, dim=-2), pyro.plate("aux_inner", 3, dim=-1):
            pyro.sample("u", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(ValueError, match=r"max_plate_nesting is 0.*Pass max_plate_nesting=2"):
        RWS(num_particles=2, vectorize_particles=False).loss(model, guide, torch.tensor(0.3))


def test_vectorized_stochastic_control_flow_points_to_vectorize_particles():
    def simulator(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        scale = 1.0 if z > 0 else 2.0  # a Python branch on a sampled value
        pyro.sample("x", dist.Normal(z, scale), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(0.5 * x, 1.0))

    with pytest.raises(RuntimeError) as info:
        RWS(num_particles=5).loss(simulator, guide, torch.tensor(1.0))
    assert "vectorize_particles=False" in "".join(getattr(info.value, "__notes__", []))
    assert math.isfinite(
        RWS(num_particles=5, vectorize_particles=False).loss(simulator, guide, torch.tensor(1.0))
    )


def test_plate_sizes_read_from_shapes_under_torch_jit_trace():
    """Under torch.jit.trace sizes read from shapes are tensors: compared as numbers."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(()))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0))

    pyro.clear_param_store()
    loss = RWS(3, max_plate_nesting=1)
    x = torch.randn(4)
    loss.differentiable_loss(model, guide, x)  # creates the parameter
    loc = pyro.param("loc").unconstrained()

    def step(loc, x):
        return loss.differentiable_loss(model, guide, x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(step, (loc, x), check_trace=False)
    assert torch.isfinite(traced(loc, x))
