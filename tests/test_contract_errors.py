# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The contract every loss keeps on bad input: bad constructor arguments, models and guides that do
not match, weights of probability zero, enumerated sites, subsampling it cannot handle, factors in
the sleep phase and NaN, each with an error (or warning) that says what is wrong.

Each test runs on every loss of tests/losses.py (the ``case`` fixture of conftest.py); what a loss
cannot do is one of its capabilities there.
"""

import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from conjugate import DATA, data, guide, leaves, model, recording_guide
from losses import LOSSES
from pyro.distributions import constraints
from pyro.infer import SVI, config_enumerate
from pyro.optim import Adam

from pyro_rws import RWS, VIMCO, SleepPhaseLoss, WakeSleepELBO

pytestmark = pytest.mark.usefixtures("float64")


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
    (lambda: VIMCO(num_particles=1), ValueError, "num_particles must be at least 2 (VIMCO's"),
    (lambda: VIMCO(num_particles=2.5), TypeError, "num_particles must be an integer"),
    (lambda: VIMCO(max_plate_nesting=-1), ValueError, "max_plate_nesting"),
]


@pytest.mark.parametrize("make, error, phrase", BAD_CONSTRUCTIONS)
def test_bad_construction_raises(make, error, phrase):
    with pytest.raises(error, match=re.escape(phrase)):
        make()


@pytest.mark.parametrize("spec", [s for s in LOSSES if s.has_wake], ids=str)
def test_fewest_particles(spec):
    K = spec.min_particles
    with pytest.raises(ValueError, match=re.escape(f"num_particles must be at least {K}")):
        spec.make(num_particles=K - 1)
    assert spec.make(num_particles=K + 1).num_particles == K + 1


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


def test_latent_missing_from_guide_raises(case):
    with pytest.raises(ValueError, match=r"\['w'\] are not sampled by the guide"):
        case.make().loss(model_two_latents, guide, data())


def test_guide_site_missing_from_model_raises(case):
    with pytest.raises(ValueError, match=r"\['u'\].*(does not sample|not latent sites)"):
        case.make().loss(model, guide_extra_site, data())


def test_guide_sampling_observed_site_raises(case):
    with pytest.raises(ValueError, match=r"\['x'\].*(observed in the model|model observes)"):
        case.make().loss(model, guide_samples_observed, data())


def model_factor(x, log_factor):
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        pyro.factor("constraint", log_factor(z))


def test_all_particles_minus_inf_weight_raises(case):
    def log_factor(z):
        return torch.where(z > 100.0, 0.0, -math.inf)

    phrase = "probability zero" if case.has_wake else "pyro.factor"
    with pytest.raises(ValueError, match=phrase):
        case.make().loss(model_factor, guide, data(), log_factor)


def model_uniform(x):
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Uniform(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide_negative(x):
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Normal(-5.0, 0.1))


@pytest.mark.parametrize("validation", [True, False])
def test_guide_outside_model_support_raises(case, validation):
    if not case.has_wake:
        pytest.skip("the sleep phase scores the guide at model samples only")
    pyro.enable_validation(validation)
    loss = case.make()
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
def test_some_particles_minus_inf_weight_are_dropped(case, hard_constraint):
    """
    Particles outside a hard constraint get weight zero and no gradient; the others carry the
    estimate: value, bound and ESS are those of the recorded particles, -inf weights included.
    (Before the fix, 0 * -inf made the RWS surrogate, differentiable_loss and every gradient NaN.)
    A loss that cannot drop them (an ELBO is -inf with one such particle) says so; a sleep phase
    rejects the factor.
    """
    if not case.has_wake:
        pytest.skip("the sleep-only loss never scores the model at the guide's particles")
    if hard_constraint == "factor":
        m, args = model_factor, (lambda z: torch.where(z > -0.5, 0.0, -math.inf),)

        def log_p(z, x):
            return (
                dist.Normal(0.0, 1.0).log_prob(z)
                + dist.Normal(z, 1.0).log_prob(x)
                + torch.where(z > -0.5, 0.0, -math.inf)
            )
    else:
        pyro.enable_validation(False)  # else torch rejects values outside the support
        m, args = model_truncated, ()

        def log_p(z, x):  # theta = 0.2, its initial value
            prior = dist.Uniform(-0.8, 3.2, validate_args=False).log_prob(z)
            return prior + dist.Normal(z, 1.0).log_prob(x)

    if not case.drops_zero_weight_particles:  # the ELBO of such a particle is -inf
        with pytest.raises(ValueError, match="the ELBO is infinite: a guide sample has probabi"):
            case.make(num_particles=20).loss(m, guide, data(), *args)
        return
    if hard_constraint == "factor" and case.has_sleep:
        with pytest.raises(ValueError, match="pyro.factor site 'constraint'"):
            case.make(num_particles=20).loss(m, guide, data(), *args)
        return
    x = data()
    K = 20
    loss = case.make(num_particles=K)
    pyro.set_rng_seed(4)
    record = []
    dl = loss.differentiable_loss(m, recording_guide(record), x, *args)
    params = leaves()
    for name, g in zip(params, torch.autograd.grad(dl, list(params.values())), strict=True):
        assert torch.isfinite(g).all(), name
    wake = [z for seen, z in record if seen is x]  # the sleep phase's guide sees fantasies
    z = wake[-1] if case.vectorize else torch.stack(wake[-K:])
    assert z.shape == (K, len(DATA))
    log_w = log_p(z, x) - dist.Normal(0.3 * x - 0.1, 0.9).log_prob(z)
    assert (log_w == -math.inf).any() and (log_w > -math.inf).any(0).all()  # not vacuous
    bound = (torch.logsumexp(log_w, 0) - math.log(K)).sum()
    assert dl.item() == pytest.approx(-bound.item(), rel=1e-10)
    assert float(loss.stats.bound) == pytest.approx(bound.item(), rel=1e-10)
    torch.testing.assert_close(loss.stats.ess, torch.softmax(log_w, 0).square().sum(0).reciprocal())
    assert (loss.stats.ess >= 1).all() and (loss.stats.ess < K).all()


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
def test_guide_enumerated_sites_raise(case, where):
    m, g = GUIDE_ENUMERATED[where]
    with pytest.raises(NotImplementedError, match=r"guide site 'c' is marked for enumeration"):
        case.make().loss(m, g, data())
    # the same program without the flag runs
    assert math.isfinite(case.make().loss(discrete_model, discrete_guide, data()))


@pytest.mark.parametrize("where", list(MODEL_ENUMERATED))
def test_model_enumerated_sites(case, where):
    """A model site the guide samples is sampled (the flag is inert, as in TraceEnum_ELBO); one
    the guide does not sample is summed out (tests/test_enum.py checks the values exactly)."""
    m = MODEL_ENUMERATED[where]
    pyro.set_rng_seed(3)
    flagged = case.make().loss(m, discrete_guide, data())
    pyro.set_rng_seed(3)
    assert flagged == case.make().loss(discrete_model, discrete_guide, data())
    assert math.isfinite(case.make().loss(m, lambda x: None, data()))


def model_global_subsampled(x, subsample_size):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x[idx])


def guide_global(x, subsample_size):
    loc = pyro.param("loc", torch.tensor(0.0))
    pyro.sample("mu", dist.Normal(loc, 0.5))


def test_subsampled_plate_with_global_latent(case):
    x = torch.linspace(-1.0, 1.0, 10)
    loss = case.make(fantasy_args={"x": None}) if case.has_sleep else case.make()
    if not case.supports_subsampled_globals:
        with pytest.raises(ValueError, match="plate 'data' is subsampled .4 of 10."):
            loss.loss(model_global_subsampled, guide_global, x, 4)
    else:  # linear in the log-densities: scales act inside, fine
        svi = SVI(model_global_subsampled, guide_global, Adam({"lr": 0.01}), loss=loss)
        for _ in range(2):
            assert math.isfinite(svi.step(x, 4))
    # without subsampling, the weights are joint (one per particle) and all losses work
    loss = case.make(fantasy_args={"x": None}) if case.has_sleep else case.make()
    svi = SVI(model_global_subsampled, guide_global, Adam({"lr": 0.01}), loss=loss)
    assert math.isfinite(svi.step(x, None))
    if case.returns_ess:
        assert loss.stats.ess.shape == ()


def test_factor_with_sleep_phase_raises(case):
    def log_factor(z):
        return -(z**2)

    loss = case.make()
    if case.has_sleep:
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


def test_nan_in_model_log_prob_raises(case):
    if not case.has_wake:
        pytest.skip("the sleep phase does not score the model")
    with pytest.raises(ValueError, match="contain NaN"):
        case.make().loss(model_nan, guide, data())


def make_guide_nan_on_fantasies(real_x):
    """A guide whose log-prob is NaN when it is called with anything but the real data."""

    def guide_nan(x):
        a = pyro.param("a", torch.tensor(0.3))
        with pyro.plate("data", x.shape[-1]):
            d = dist.Normal(a * x, 1.0) if x is real_x else NaNNormal(a * x, 1.0)
            pyro.sample("z", d)

    return guide_nan


def test_nan_in_sleep_phase_warns_with_validation(case):
    if not case.has_sleep:
        pytest.skip("no sleep phase")
    x = data()
    g = make_guide_nan_on_fantasies(x)
    loss = case.make()
    with pytest.warns(UserWarning) as record:
        dl = loss.differentiable_loss(model, g, x)
    messages = {str(w.message) for w in record}
    expected = {"Encountered NaN: sleep-phi loss"}
    if case.surrogate_nan_name is not None:
        expected.add(f"Encountered NaN: {case.surrogate_nan_name}")
    assert messages == expected
    assert torch.isnan(dl)
    # the same with validation off: no warning (filterwarnings = error would raise)
    pyro.enable_validation(False)
    assert torch.isnan(loss.differentiable_loss(model, g, x))


def make_guide_misshaped_on_fantasies(real_x):
    """
    A guide whose site z has an extra event dim (shape (N, 2) where the model's is (N,)) when
    it is called with anything but the real data: only the sleep phase meets it (issue 18).
    """

    def guide_misshaped(x):
        a = pyro.param("a", torch.tensor(0.3))
        with pyro.plate("data", x.shape[-1]):
            loc = a * x
            if x is real_x:
                pyro.sample("z", dist.Normal(loc, 1.0))
            else:
                pyro.sample(
                    "z", dist.Normal(loc.unsqueeze(-1).expand(loc.shape + (2,)), 1.0).to_event(1)
                )

    return guide_misshaped


@pytest.mark.parametrize("validation", [True, False], ids=["validation", "no-validation"])
@pytest.mark.parametrize("num_sleep_particles", [1, 3])
def test_sleep_phase_guide_shape_mismatch_names_the_site(case, validation, num_sleep_particles):
    """Validation on or off: a ValueError naming the site and the shapes, not torch's error."""
    if not case.has_sleep:
        pytest.skip("no sleep phase")
    x = data()
    loss = case.make(num_sleep_particles=num_sleep_particles)
    pyro.enable_validation(validation)
    # (several vectorized sleep particles fail, and the guide is then run once per particle)
    expected = (
        r"guide site 'z' cannot score the model's fantasy in the sleep phase: the fantasy has "
        r"shape \(4,\), the guide's distribution batch shape \(4,\) and event shape \(2,\)"
    )
    with pytest.raises(ValueError, match=expected):
        loss.loss(model, make_guide_misshaped_on_fantasies(x), x)


@pytest.mark.parametrize(
    "value_shape, batch_shape, event_shape, ok",
    [
        ((4,), (4,), (), True),
        ((1, 4), (4,), (), True),  # a leading dim of size 1
        ((4,), (3, 4), (), True),  # broadcast into the batch shape
        ((4, 2), (4,), (2,), True),
        ((4,), (4,), (2,), False),  # issue 18: an event dim the fantasy lacks
        ((2, 4), (4,), (), False),  # would broadcast log q to a larger shape, silently
        ((4, 3), (4,), (2,), False),
    ],
)
def test_fantasy_shape_check(value_shape, batch_shape, event_shape, ok):
    from pyro_rws._structure import check_fantasy_shape

    fn = dist.Normal(torch.zeros(batch_shape + event_shape), 1.0).to_event(len(event_shape))
    site = {"fn": fn, "value": torch.zeros(value_shape)}
    if ok:
        check_fantasy_shape("z", site)
    else:
        with pytest.raises(ValueError, match=r"guide site 'z' .* fantasy has shape"):
            check_fantasy_shape("z", site)
