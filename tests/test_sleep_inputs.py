# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The guide's inputs in the sleep phase (see pyro_rws._sleep): fantasies replace the data by
identity of the ``obs=`` tensor, by ``fantasy_args`` or through Pyro's ``observations=``
keyword; the guide really receives them, and the caller's arguments are never touched.

Models and guides here record what they see: the model the value each observed site returns
(the fantasy in the sleep phase), the guide its data argument and the latent it scores.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from losses import LOSSES, cases

from pyro_rws import RWS, SleepPhaseLoss

pytestmark = pytest.mark.usefixtures("float64")

X = (0.5, -1.0, 2.0, 0.1, 1.3)

SLEEPERS = [spec for spec in LOSSES if spec.has_sleep]
CASES = cases(lambda spec: spec.has_sleep)


class Log:
    """What model and guide saw, in call order."""

    def __init__(self):
        self.model = []  # (fantasy or data, z)
        self.guide = []  # (data argument, z)

    def sleep_pairs(self, data):
        """(model fantasy, guide input, model z, guide z) of the sleep runs, in order."""
        model = [(xv, z) for xv, z in self.model if xv is not data]
        guide = [(xg, z) for xg, z in self.guide if xg is not data]
        assert len(model) == len(guide) >= 1
        return [(mx, gx, mz, gz) for (mx, mz), (gx, gz) in zip(model, guide, strict=True)]


def check_guide_saw_fantasies(log, data, squeezed=True):
    for fantasy, seen, model_z, guide_z in log.sleep_pairs(data):
        assert seen is not data
        if squeezed:
            assert seen.shape == data.shape
        assert torch.equal(seen.reshape(fantasy.shape), fantasy)
        assert torch.equal(guide_z, model_z)  # the guide scores the model's latents
        assert not torch.equal(seen.reshape(-1)[: data.numel()], data.reshape(-1))


# --------------------------------------------------------------------------------------------
# Identity substitution: positional and keyword arguments
# --------------------------------------------------------------------------------------------
def make_positional(log):
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            xv = pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        log.model.append((xv if xv is x else xv.detach().clone(), z.detach().clone()))

    def guide(x):
        a = pyro.param("a", torch.tensor(0.3))
        with pyro.plate("data", len(x)):  # the ordinary way: len(x)
            z = pyro.sample("z", dist.Normal(a * x, 1.0))
        log.guide.append((x, z.detach().clone()))

    return model, guide


def make_keyword(log):
    def model(*, data):
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            xv = pyro.sample("x", dist.Normal(z, 1.0), obs=data)
        log.model.append((xv if xv is data else xv.detach().clone(), z.detach().clone()))

    def guide(*, data):
        a = pyro.param("a", torch.tensor(0.3))
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Normal(a * data, 1.0))
        log.guide.append((data, z.detach().clone()))

    return model, guide


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("keyword", [False, True], ids=["positional", "keyword"])
def test_identity_substitution(case, keyword):
    x = torch.tensor(X)
    x_copy = x.clone()
    log = Log()
    model, guide = (make_keyword if keyword else make_positional)(log)
    args, kwargs = ((), {"data": x}) if keyword else ((x,), {})
    loss = case.make()
    for _ in range(3):
        assert math.isfinite(loss.loss_and_grads(model, guide, *args, **kwargs))
    check_guide_saw_fantasies(log, x)
    assert torch.equal(x, x_copy)
    assert kwargs.keys() == ({"data"} if keyword else set())


@pytest.mark.parametrize("vectorize", [True, False])
def test_several_sequential_or_broadcast_sleep_particles(vectorize):
    """Each sleep particle's guide run sees that particle's fantasy."""
    x = torch.tensor(X)
    log = Log()
    model, _ = make_positional(log)

    def guide(x):
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(0.3 * x, 1.0))
        log.guide.append((x, z.detach().clone()))

    loss = SleepPhaseLoss(num_particles=3, vectorize_particles=vectorize)
    loss.loss(model, guide, x)
    pairs = log.sleep_pairs(x)
    assert len(pairs) == (1 if vectorize else 3)
    check_guide_saw_fantasies(log, x, squeezed=not vectorize)
    if vectorize:
        assert pairs[0][1].shape == (3, 5)  # particle dim first
    else:
        assert not torch.equal(pairs[0][0], pairs[1][0])


# --------------------------------------------------------------------------------------------
# Pyro's observations= keyword convention
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=str)
def test_guide_with_data_and_observations_keyword(case):
    x = torch.tensor(X)
    log = Log()
    model, _ = make_positional(log)
    received = []

    def guide(x, observations=None):
        received.append((x, observations))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.3 * x, 1.0))
        log.guide.append((x, z.detach().clone()))

    case.make().loss(model, guide, x)
    check_guide_saw_fantasies(log, x)
    sleep = [(xg, obs) for xg, obs in received if xg is not x]
    wake = [(xg, obs) for xg, obs in received if xg is x]
    assert all(obs is None for _, obs in wake)
    for xg, obs in sleep:
        assert list(obs) == ["x"] and torch.equal(obs["x"], xg)


def make_observations_model(log):
    def model(observations):
        x = observations["x"]
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            xv = pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        log.model.append((xv if xv is x else xv.detach().clone(), z.detach().clone()))

    def guide(observations=None):
        x = observations["x"]
        a = pyro.param("a", torch.tensor(0.3))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(a * x, 1.0))
        log.guide.append((x, z.detach().clone()))

    return model, guide


@pytest.mark.parametrize("case", CASES, ids=str)
def test_pyro_observations_convention(case):
    x = torch.tensor(X)
    x_copy = x.clone()
    observations = {"x": x}
    log = Log()
    model, guide = make_observations_model(log)
    loss = case.make()
    for _ in range(2):
        assert math.isfinite(loss.loss_and_grads(model, guide, observations=observations))
    check_guide_saw_fantasies(log, x)
    assert list(observations) == ["x"] and observations["x"] is x and torch.equal(x, x_copy)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_observations_convention_with_several_sleep_particles(case):
    """The crash of Pyro's RWS (it writes observations into the caller's kwargs)."""
    x = torch.tensor(X)
    observations = {"x": x}

    def model(observations):
        with pyro.plate("data", observations["x"].shape[-1]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=observations["x"])

    def guide(observations=None):
        x = observations["x"]
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("z", dist.Normal(0.3 * x, 1.0))

    loss = case.make(num_sleep_particles=3)
    for _ in range(2):
        assert math.isfinite(loss.loss(model, guide, observations=observations))
    assert list(observations) == ["x"] and observations["x"] is x


# --------------------------------------------------------------------------------------------
# fantasy_args
# --------------------------------------------------------------------------------------------
def make_derived_obs(log):
    """The observed tensor is derived from the argument, so identity does not match."""

    def model(x, *, data=None):
        x = x if data is None else data
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            xv = pyro.sample("x", dist.Normal(z, 1.0), obs=x * 1.0)
        log.model.append((xv.detach().clone(), z.detach().clone()))

    def guide(x, *, data=None):
        x = x if data is None else data
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.3 * x, 1.0))
        log.guide.append((x, z.detach().clone()))

    return model, guide


def sleep_pairs_by_value(log, data):
    """Pairs (model fantasy, guide input) where the guide did not get the data itself."""
    guide_inputs = [(xg, gz) for xg, gz in log.guide if xg is not data]
    model_sleep = [(xv, z) for xv, z in log.model if not torch.equal(xv, data)]
    assert len(guide_inputs) == len(model_sleep) >= 1
    return list(zip(model_sleep, guide_inputs, strict=True))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("where", ["position", "keyword", "callable"])
def test_fantasy_args(case, where):
    x = torch.tensor(X)
    x_copy = x.clone()
    log = Log()
    model, guide = make_derived_obs(log)
    if where == "position":
        fantasy_args, args, kwargs = {"x": 0}, (x,), {}
    elif where == "keyword":
        fantasy_args, args, kwargs = {"x": "data"}, (None,), {"data": x}
    else:

        def fantasy_args(fantasies, x, *, data=None):
            return (fantasies["x"],), {}

        args, kwargs = (x,), {}
    # without fantasy_args the sleep phase cannot know where the fantasy goes
    with pytest.raises(ValueError, match=r"observed site\(s\) \['x'\].*fantasy_args="):
        case.make().loss(model, guide, *args, **kwargs)
    log.model.clear()
    log.guide.clear()
    loss = case.make(fantasy_args=fantasy_args)
    assert math.isfinite(loss.loss_and_grads(model, guide, *args, **kwargs))
    for (fantasy, model_z), (seen, guide_z) in sleep_pairs_by_value(log, x):
        assert seen.shape == x.shape and torch.equal(seen.reshape(fantasy.shape), fantasy)
        assert torch.equal(model_z, guide_z)
    assert torch.equal(x, x_copy)


def two_obs_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        pyro.sample("y", dist.Normal(z, 2.0), obs=torch.zeros(len(x)))


def two_obs_guide(x):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(0.3 * x, 1.0))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fantasy_args_none_for_an_observation_the_guide_does_not_read(case):
    x = torch.tensor(X)
    with pytest.raises(ValueError, match=r"\['y'\].*fantasy_args"):
        case.make().loss(two_obs_model, two_obs_guide, x)
    loss = case.make(fantasy_args={"y": None})
    assert math.isfinite(loss.loss_and_grads(two_obs_model, two_obs_guide, x))


def test_fantasy_args_errors():
    x = torch.tensor(X)
    model, guide = make_derived_obs(Log())
    with pytest.raises(ValueError, match=r"fantasy_args names \['w'\], which are not observed"):
        SleepPhaseLoss(fantasy_args={"x": 0, "w": 0}).loss(model, guide, x)
    with pytest.raises(ValueError, match="maps site 'x' to argument 3"):
        SleepPhaseLoss(fantasy_args={"x": 3}).loss(model, guide, x)
    with pytest.raises(ValueError, match="maps site 'x' to argument 'nope'"):
        SleepPhaseLoss(fantasy_args={"x": "nope"}).loss(model, guide, x)
    with pytest.raises(TypeError, match=r"must return a pair \(args, kwargs\)"):
        SleepPhaseLoss(fantasy_args=lambda f, x: (f["x"],)).loss(model, guide, x)

    def model_with_two_args(x, w):
        model(x)

    def guide_with_two_args(x, w):
        guide(x)

    with pytest.raises(ValueError, match="can neither replace it"):  # shapes differ
        SleepPhaseLoss(fantasy_args={"x": 1}).loss(
            model_with_two_args, guide_with_two_args, x, torch.zeros(2)
        )


# --------------------------------------------------------------------------------------------
# Subsampling: the minibatch fantasy is scattered into a copy of the full argument
# --------------------------------------------------------------------------------------------
N, B = 7, 3


def make_subsampled(log):
    def model(x):
        with pyro.plate("data", len(x), subsample_size=B) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            xv = pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])
        log.model.append((idx.clone(), xv.detach().clone(), z.detach().clone()))

    def guide(x):
        with pyro.plate("data", x.shape[-1], subsample_size=B) as idx:
            z = pyro.sample("z", dist.Normal(0.3 * x[..., idx], 1.0))
        log.guide.append((idx.clone(), x, z.detach().clone()))

    return model, guide


@pytest.mark.parametrize("case", CASES, ids=str)
def test_subsample_slice_is_scattered(case):
    x = torch.linspace(-1.0, 1.0, N)
    x_copy = x.clone()
    log = Log()
    model, guide = make_subsampled(log)
    with pytest.raises(ValueError, match="fantasy_args"):
        case.make().loss(model, guide, x)
    log.model.clear()
    log.guide.clear()
    loss = case.make(fantasy_args={"x": 0})
    assert math.isfinite(loss.loss_and_grads(model, guide, x))
    sleep_guide = [(i, xg, z) for i, xg, z in log.guide if xg is not x]
    sleep_model = log.model[-len(sleep_guide) :]
    assert len(sleep_guide) == 1
    (idx, seen, guide_z), (model_idx, fantasy, model_z) = sleep_guide[0], sleep_model[0]
    assert torch.equal(idx, model_idx)
    assert seen.shape == (N,)
    assert torch.equal(seen[idx], fantasy.reshape(B))  # the fantasy at the minibatch
    rest = torch.ones(N, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(seen[rest], x[rest])  # the data elsewhere
    assert torch.equal(guide_z, model_z)
    assert torch.equal(x, x_copy)


def test_subsample_slice_scattered_for_vectorized_sleep_particles():
    x = torch.linspace(-1.0, 1.0, N)
    log = Log()
    model, guide = make_subsampled(log)
    loss = SleepPhaseLoss(num_particles=2, fantasy_args={"x": 0})
    assert math.isfinite(loss.loss_and_grads(model, guide, x))
    (idx, seen, _), (_, fantasy, _) = log.guide[-1], log.model[-1]
    assert seen.shape == (2, N) and fantasy.shape == (2, B)
    assert torch.equal(seen[:, idx], fantasy)
    rest = torch.ones(N, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(seen[:, rest], x[rest].expand(2, -1))


# --------------------------------------------------------------------------------------------
# Several vectorized sleep particles: the guide must broadcast
# --------------------------------------------------------------------------------------------
def matrix_model(x):  # x: (N, D)
    with pyro.plate("data", x.shape[-2]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        loc = z.unsqueeze(-1).expand(*z.shape, x.shape[-1])
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


def broadcasting_guide(x):
    with pyro.plate("data", x.shape[-2]):
        pyro.sample("z", dist.Normal(0.3 * x.sum(-1), 1.0))


def len_guide(x):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(0.3 * x.sum(-1), 1.0))


@pytest.mark.parametrize("spec", SLEEPERS, ids=str)
def test_vectorized_sleep_particles_with_a_len_guide_run_per_particle(spec):
    """
    A guide written the ordinary way (len(x)) cannot broadcast over a leading sleep-particle
    dimension: the sleep phase detects it and runs the guide once per particle, on exactly the
    draws that vectorize_particles=False makes (issue 9, item 5). Before, it raised (and before
    that, the guide's plate of size len(x) = 3 replayed the model's 4 indices and silently
    scaled log q by 3/4).
    """
    x = torch.randn(4, 2)  # N = 4 datapoints, not 3 = S, so len(x) cannot pass by accident

    def value(guide, vectorize):
        loss = spec.make(vectorize, num_particles=2, num_sleep_particles=3)
        pyro.set_rng_seed(1)
        first = loss.loss(matrix_model, guide, x)
        pyro.set_rng_seed(1)
        second = loss.loss(matrix_model, guide, x)
        assert first == second  # the call that found out gives the same draws as later ones
        return first, loss.stats.sleep_phi

    assert math.isfinite(value(broadcasting_guide, True)[0])
    vectorized, sequential = value(len_guide, True), value(len_guide, False)
    assert vectorized[0] == pytest.approx(sequential[0], rel=1e-12)
    assert torch.allclose(vectorized[1], sequential[1], rtol=1e-12)


@pytest.mark.parametrize("vectorize", [True, False])
def test_len_guide_works_with_one_or_sequential_sleep_particles(vectorize):
    pyro.set_rng_seed(1)
    x = torch.randn(4, 2)
    num = 1 if vectorize else 3
    loss = SleepPhaseLoss(num_particles=num, vectorize_particles=vectorize)
    assert math.isfinite(loss.loss_and_grads(matrix_model, len_guide, x))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def latent_model(n):
    with pyro.plate("data", n):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_condition_ed_model_needs_fantasy_args_or_observations(case):
    x = torch.tensor(X)
    conditioned = pyro.condition(latent_model, data={"x": x})

    def guide(n):
        with pyro.plate("data", n):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"pyro\.condition-ed model.*fantasy_args"):
        case.make().loss(conditioned, guide, len(X))
    received = []

    def guide_observations(n, observations=None):
        received.append(observations)
        with pyro.plate("data", n):
            pyro.sample(
                "z", dist.Normal(0.3 * (x if observations is None else observations["x"]), 1.0)
            )

    loss = case.make()
    assert math.isfinite(loss.loss(conditioned, guide_observations, len(X)))
    fantasies = [obs["x"] for obs in received if obs is not None]
    assert fantasies and all(f.shape == x.shape and not torch.equal(f, x) for f in fantasies)


def aux_guide(x):
    with pyro.plate("data", len(x)):
        u = pyro.sample("u", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
        pyro.sample("z", dist.Normal(0.3 * x + 0.1 * u, 1.0))


def missing_guide(x):
    pass


@pytest.mark.parametrize("case", CASES, ids=str)
def test_guide_with_auxiliary_or_missing_latent_raises_in_sleep(case):
    x = torch.tensor(X)
    model, _ = make_positional(Log())
    with pytest.raises(ValueError, match=r"guide site\(s\) \['u'\] are not latent sites"):
        case.make().loss(model, aux_guide, x)
    with pytest.raises(ValueError, match=r"\['z'\] are not sampled by the guide"):
        case.make().loss(model, missing_guide, x)
    # the wake phase alone accepts auxiliary guide variables
    assert math.isfinite(
        RWS(num_particles=2, vectorize_particles=case.vectorize).loss(model, aux_guide, x)
    )
