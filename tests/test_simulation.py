# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Tests of pyro_rws/simulation.py, :func:`simulate` (seeding independent of workers and chunks,
the three ways of running a model) and :class:`Simulations` (split, save/load, indexing), and of
:func:`fit_guide` in pyro_rws/fitting.py (the same estimator as :class:`SleepPhaseLoss` on the
same pairs, early stopping), with stand-ins that mimic sbibm's prior, simulator and
``Simulator`` wrapper.
"""

from __future__ import annotations

import io
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conjugate import data, fixed_model, guide
from discrete import FixFantasies

from pyro_rws import Simulations, SleepPhaseLoss, fit_guide, importance_posterior, simulate
from pyro_rws._simulate import _derived_seed
from pyro_rws.fitting import sleep_loss

pytestmark = pytest.mark.usefixtures("float64")
#: sbibm's slcp transposes a 1-d tensor when it simulates one run (torch deprecates x.T there)
SLCP_WARNING = "ignore:The use of `x.T`:UserWarning"


def assert_same(a: Simulations, b: Simulations):
    assert len(a) == len(b) and a.mode == b.mode
    for name in a.values:
        assert torch.equal(a.values[name], b.values[name]), name


# --------------------------------------------------------------------------------------------
# sbibm stand-ins: the code of sbibm 1.1.0's tasks, as it is written there
# --------------------------------------------------------------------------------------------
class SbibmSimulator:
    """sbibm.tasks.simulator.Simulator: asserts 2-d parameters, flattens the data."""

    def __init__(self, simulator, dim_parameters, dim_data):
        self.simulator, self.dim_parameters, self.dim_data = simulator, dim_parameters, dim_data

    def __call__(self, parameters):
        if parameters.ndim == 1:
            parameters = parameters.reshape(1, -1)
        assert parameters.ndim == 2
        assert parameters.shape[1] == self.dim_parameters
        return self.simulator(parameters).reshape(-1, self.dim_data)


def gaussian_linear(dim=3):
    """sbibm's gaussian_linear: prior and a "data" site, batch (B,), event (dim,)."""
    prior_dist = dist.MultivariateNormal(torch.zeros(dim), precision_matrix=torch.eye(dim) / 0.1)

    def prior(num_samples=1):
        return pyro.sample("parameters", prior_dist.expand_by([num_samples]))

    def simulator(parameters):
        precision = torch.eye(dim) / 0.1
        return pyro.sample("data", dist.MultivariateNormal(parameters, precision_matrix=precision))

    return prior, SbibmSimulator(simulator, dim, dim)


def slcp():
    """sbibm's slcp: a "data" site of batch shape (B, 4) and event shape 2."""
    prior_dist = dist.Uniform(-3 * torch.ones(5), 3 * torch.ones(5)).to_event(1)

    def prior(num_samples=1):
        return pyro.sample("parameters", prior_dist.expand_by([num_samples]))

    def simulator(parameters):
        num_samples = parameters.shape[0]
        m = torch.stack((parameters[:, [0]].squeeze(), parameters[:, [1]].squeeze())).T
        if m.dim() == 1:
            m.unsqueeze_(0)
        s1 = parameters[:, [2]].squeeze() ** 2
        s2 = parameters[:, [3]].squeeze() ** 2
        rho = torch.nn.Tanh()(parameters[:, [4]]).squeeze()
        S = torch.empty((num_samples, 2, 2))
        S[:, 0, 0] = s1**2
        S[:, 0, 1] = rho * s1 * s2
        S[:, 1, 0] = rho * s1 * s2
        S[:, 1, 1] = s2**2
        S[:, 0, 0] += 0.000001
        S[:, 1, 1] += 0.000001
        data_dist = dist.MultivariateNormal(m.unsqueeze(1).float(), S.unsqueeze(1).float())
        return pyro.sample("data", data_dist.expand((num_samples, 4)))

    return prior, SbibmSimulator(simulator, 5, 8)


def two_moons():
    """sbibm's two_moons: the data drawn with torch, returned (no "data" site)."""
    prior_dist = dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1)

    def prior(num_samples=1):
        return pyro.sample("parameters", prior_dist.expand_by([num_samples]))

    def simulator(parameters):
        n = parameters.shape[0]
        a = dist.Uniform(-math.pi / 2, math.pi / 2).expand_by((n, 1)).to_event(1).sample()
        r = dist.Normal(0.1, 0.01).expand_by((n, 1)).to_event(1).sample()
        p = torch.cat((torch.cos(a) * r + 0.25, torch.sin(a) * r), dim=1)
        c, s = math.cos(-math.pi / 4), math.sin(-math.pi / 4)
        z0 = (c * parameters[:, 0] - s * parameters[:, 1]).reshape(-1, 1)
        z1 = (s * parameters[:, 0] + c * parameters[:, 1]).reshape(-1, 1)
        return p + torch.cat((-torch.abs(z0), z1), dim=1)

    return prior, SbibmSimulator(simulator, 2, 2)


def sbibm_model(task):
    """sbibm's Task._get_pyro_model(posterior=True), unconditioned: simulator(prior())."""
    prior, simulator = task()

    def model_fn():
        return simulator(prior())

    return model_fn


# --------------------------------------------------------------------------------------------
# simulate
# --------------------------------------------------------------------------------------------
def test_conjugate_plate_mode_and_shapes():
    x = data()
    sims = simulate(fixed_model, 7, x, chunk_size=3, seed=1)
    assert sims.mode == "plate" and sims.plate_nesting == 1 and len(sims) == 7
    assert sims.shapes == {"z": (4,), "x": (4,)}
    assert set(sims.latents) == {"z"} and set(sims.observations) == {"x"}
    item = sims[2]
    assert torch.equal(item["x"], sims.values["x"][2])
    # the fantasies are fantasies of the model: x - z ~ N(0, 1)
    big = simulate(fixed_model, 2000, x, seed=2)
    noise = big.values["x"] - big.values["z"]
    assert abs(float(noise.mean())) < 5 * (1 / (8000**0.5))
    assert abs(float(noise.var()) - 1) < 5 * (2 / 8000) ** 0.5


@pytest.mark.parametrize("vectorize", [True, False])
def test_workers_do_not_change_the_simulations(vectorize):
    x = data()
    one = simulate(fixed_model, 9, x, chunk_size=2, seed=5, vectorize=vectorize)
    two = simulate(fixed_model, 9, x, chunk_size=2, seed=5, vectorize=vectorize, num_workers=2)
    assert_same(one, two)
    assert one.mode == ("plate" if vectorize else "runs")


def test_progress_bar_on_request_and_off_without_a_terminal(capsys):
    simulate(fixed_model, 5, data(), chunk_size=2, seed=0)  # stderr is no terminal here
    assert capsys.readouterr().err == ""
    simulate(fixed_model, 5, data(), chunk_size=2, seed=0, progress=True)
    assert "simulate" in capsys.readouterr().err


def test_one_run_per_simulation_does_not_depend_on_chunks():
    x = data()
    a = simulate(fixed_model, 7, x, chunk_size=2, seed=3, vectorize=False)
    b = simulate(fixed_model, 7, x, chunk_size=7, seed=3, vectorize=False)
    assert_same(a, b)


def test_seed_from_pyro_and_global_state_untouched():
    x = data()
    pyro.set_rng_seed(11)
    a = simulate(fixed_model, 5, x)
    after = torch.rand(())
    pyro.set_rng_seed(11)
    torch.rand(())  # simulate draws its base seed only, and restores the state it found
    pyro.set_rng_seed(11)
    b = simulate(fixed_model, 5, x)
    assert_same(a, b)
    assert torch.equal(torch.rand(()), after)


def stochastic_structure(x=None):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    if z > 0:  # Python control flow on a sampled value: not vectorizable
        pyro.sample("w", dist.Normal(z, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def test_random_structure_is_stored_run_by_run():
    with pytest.warns(UserWarning, match="once per simulation"):
        sims = simulate(stochastic_structure, 12, torch.tensor(0.0), seed=0)
    assert sims.values is None and sims.mode == "runs"
    has_w = ["w" in sims[i] for i in range(len(sims))]
    assert any(has_w) and not all(has_w)
    for i in range(len(sims)):
        assert ("w" in sims[i]) == bool(sims[i]["z"] > 0)
    buffer = io.BytesIO()
    sims.save(buffer)
    buffer.seek(0)
    loaded = Simulations.load(buffer)
    for i in range(len(sims)):
        assert sims[i].keys() == loaded[i].keys()
        assert all(torch.equal(sims[i][k], loaded[i][k]) for k in sims[i])
    train, val = sims.split(0.25, seed=0)
    assert len(train) == 9 and len(val) == 3


def test_structure_that_changes_after_the_first_chunk_is_an_error():
    def late_branch(x=None):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 2):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        if z.numel() > 1 and bool((z.abs() > 2.5).any()):  # rare: a later chunk takes it
            pyro.sample("extra", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="vectorize=False"):
        simulate(late_branch, 400, torch.zeros(2), chunk_size=20, seed=0)
    sims = simulate(late_branch, 30, torch.zeros(2), seed=0, vectorize=False)
    assert sims.mode == "runs"


def test_save_load_split_to(tmp_path):
    sims = simulate(fixed_model, 10, data(), seed=4)
    sims.save(tmp_path / "sims.pt")
    loaded = Simulations.load(tmp_path / "sims.pt")
    assert_same(sims, loaded)
    assert loaded.sites == sims.sites and loaded.plate_nesting == sims.plate_nesting
    train, val = sims.split(0.3, seed=1)
    assert (len(train), len(val)) == (7, 3)
    together = torch.cat([train.values["z"], val.values["z"]])
    assert torch.equal(together.sort(0).values, sims.values["z"].sort(0).values)
    again, _ = sims.split(0.3, seed=1)
    assert_same(train, again)
    moved = sims.to(torch.float32)
    assert moved.values["x"].dtype == torch.float32
    assert len(sims[2:5]) == 3 and len(sims[torch.tensor([0, 9])]) == 2


def test_cat_dataloader_and_default_arguments():
    x = data()
    a, b = simulate(fixed_model, 4, x, seed=1), simulate(fixed_model, 3, x, seed=2)
    both = Simulations.cat([a, b])
    assert len(both) == 7 and torch.equal(both.values["z"][4:], b.values["z"])
    loader = torch.utils.data.DataLoader(both, batch_size=5)
    first = next(iter(loader))
    assert first["x"].shape == (5, 4) and torch.equal(first["x"], both.values["x"][:5])
    # the model's arguments are kept: sleep_loss and fit_guide default to them
    assert both.args[0] is x
    assert torch.equal(
        sleep_loss(fixed_model, guide, both), sleep_loss(fixed_model, guide, both, x)
    )


def test_observed_sites_must_exist():
    with pytest.raises(ValueError, match="no observed site"):
        simulate(sbibm_model(gaussian_linear), 3)
    with pytest.raises(ValueError, match="not sample sites"):
        simulate(sbibm_model(gaussian_linear), 3, observed=("x",))

    def model(x=None):  # Pyro's convention, called without data: obs=None samples "x"
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(ValueError, match=r"keyword argument of the model left unset.*\('x',\)"):
        simulate(model, 3)
    assert simulate(model, 3, observed=("x",)).observations["x"].shape == (3,)


# --------------------------------------------------------------------------------------------
# sbibm's code as it is written
# --------------------------------------------------------------------------------------------
def test_sbibm_gaussian_linear_runs_in_the_particle_plate():
    sims = simulate(sbibm_model(gaussian_linear), 50, observed=("data",), chunk_size=20, seed=0)
    assert sims.mode == "plate" and sims.plate_nesting == 0
    assert sims.shapes == {"parameters": (3,), "data": (3,)}
    noise = sims.values["data"] - sims.values["parameters"]
    assert float(noise.std()) < 1.0  # the data are centred on their own parameters


@pytest.mark.filterwarnings(SLCP_WARNING)
def test_sbibm_slcp_runs_on_its_own_batch_dim():
    sims = simulate(sbibm_model(slcp), 30, observed="data", chunk_size=8, seed=0)
    assert sims.mode == "leading" and sims.plate_nesting == 0
    assert sims.shapes == {"parameters": (5,), "data": (4, 2)}
    theta = sims.values["parameters"]
    assert float(theta.abs().max()) <= 3
    # each simulation's 4 draws are centred on its own (theta_0, theta_1)
    centre = sims.values["data"].mean(1)
    assert float((centre - theta[:, :2]).abs().median()) < 3.0
    two = simulate(sbibm_model(slcp), 30, observed="data", chunk_size=8, seed=0, num_workers=2)
    assert_same(sims, two)


def test_sbibm_two_moons_returned_data_as_deterministic_site():
    prior, simulator = two_moons()

    def model():
        pyro.deterministic("data", simulator(prior()), event_dim=1)

    sims = simulate(model, 40, observed=("data",), seed=0)
    assert sims.mode == "plate" and sims.shapes == {"parameters": (2,), "data": (2,)}
    assert set(sims.observations) == {"data"} and set(sims.latents) == {"parameters"}
    # the guide reads the recorded data like any observation
    seen = []

    def guide(observations=None):
        seen.append(observations["data"])
        pyro.sample("parameters", dist.Normal(observations["data"], 1.0).to_event(1))

    sleep_loss(model, guide, sims)
    assert torch.equal(seen[-1], sims.values["data"])


def test_fit_guide_function_guide_with_pyro_module_and_no_validation():
    x = data()
    sims = simulate(fixed_model, 60, x, seed=0)
    net = torch.nn.Linear(1, 2)

    def module_guide(x):
        pyro.module("net", net)
        out = net(x.unsqueeze(-1))
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("z", dist.Normal(out[..., 0], out[..., 1].exp()))

    before = net.weight.detach().clone()
    history = fit_guide(
        fixed_model,
        module_guide,
        sims,
        validation_fraction=0.0,
        max_epochs=3,
        batch_size=20,
        progress=False,
    )
    assert history.epochs == 3 and history.num_steps == 9 and not history.validation_loss
    assert history.best_epoch == 2 and not torch.equal(net.weight.detach(), before)


# --------------------------------------------------------------------------------------------
# fit_guide: the sleep-phi loss of SleepPhaseLoss on stored pairs
# --------------------------------------------------------------------------------------------
def param_grads():
    return {k: v.grad.clone() for k, v in pyro.get_param_store().named_parameters()}


def zero_grads():
    for p in pyro.get_param_store().values():
        p.unconstrained().grad = None


def test_sleep_loss_equals_sleep_phase_loss_on_the_same_pairs():
    x = data()
    B = 6
    sims = simulate(fixed_model, B, x, chunk_size=B, seed=7)
    # SleepPhaseLoss draws its B fantasies in one run of the model in the particle plate,
    # as simulate draws chunk 0: the same seed gives it the same pairs
    torch.manual_seed(_derived_seed(sims.seed, 0, 0))
    expected = SleepPhaseLoss(num_particles=B, max_plate_nesting=1).differentiable_loss(
        fixed_model, guide, x
    )
    expected.backward()
    expected_grads = param_grads()
    zero_grads()
    actual = sleep_loss(fixed_model, guide, sims, x)
    actual.backward()
    assert torch.equal(actual.detach(), expected.detach())
    for name, grad in param_grads().items():
        assert torch.equal(grad, expected_grads[name]), name


def test_sleep_loss_per_simulation_for_a_guide_that_does_not_broadcast():
    x = data()
    B = 5
    sims = simulate(fixed_model, B, x, seed=8)

    def len_guide(x):  # reads len(x): scored once per simulation
        a = pyro.param("a", torch.tensor(0.3))
        s = pyro.param("s", torch.tensor(0.9), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(a * x, s))

    losses = []
    for i in range(B):  # SleepPhaseLoss on one fantasy, fixed to simulation i
        with FixFantasies(sims[i]):
            loss = SleepPhaseLoss(max_plate_nesting=1).differentiable_loss(
                fixed_model, len_guide, x
            )
        losses.append(loss)
    expected = sum(losses[1:], losses[0]) / B
    expected.backward()
    expected_grads = param_grads()
    zero_grads()
    actual = sleep_loss(fixed_model, len_guide, sims, x)
    actual.backward()
    assert torch.allclose(actual.detach(), expected.detach(), rtol=1e-12)
    for name, grad in param_grads().items():
        assert torch.allclose(grad, expected_grads[name], rtol=1e-12), name


def test_pyro_style_model_with_data_keyword():
    """def model(x=None): simulate names x observed; the guide receives it as its x."""

    def model(x=None):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 4):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x=None):
        a = pyro.param("a", torch.tensor(0.4))
        pyro.sample("z", dist.Normal(a * x.sum(-1, keepdim=True), 1.0))

    sims = simulate(model, 20, observed=("x",), seed=0)
    assert sims.sites[1].obs_slot == "x" and sims.shapes == {"z": (1,), "x": (4,)}
    z, x = sims.values["z"], sims.values["x"]
    expected = -dist.Normal(0.4 * x.sum(-1, keepdim=True), 1.0).log_prob(z).mean()
    assert torch.allclose(sleep_loss(model, guide, sims), expected)
    history = fit_guide(model, guide, sims, max_epochs=2, progress=False)
    assert history.epochs == 2


@pytest.mark.filterwarnings(SLCP_WARNING)
def test_sleep_loss_on_the_sbibm_model_with_an_observations_guide():
    """sbibm's data site has no obs=: the guide receives it by an `observations` keyword."""
    sims = simulate(sbibm_model(slcp), 16, observed=("data",), seed=0)

    def flow_like(observations=None):
        w = pyro.param("w", torch.zeros(8, 5))
        x = observations["data"].flatten(-2).to(w.dtype)
        pyro.sample("parameters", dist.Normal(x @ w, 1.0).to_event(1))

    loss = sleep_loss(sbibm_model(slcp), flow_like, sims)
    theta = sims.values["parameters"]
    expected = -dist.Normal(0.0, 1.0).log_prob(theta).sum() / len(sims)
    assert torch.allclose(loss, expected)


def test_fit_guide_learns_the_conjugate_posterior():
    x = data()
    sims = simulate(fixed_model, 1000, x, seed=0)
    history = fit_guide(
        fixed_model,
        guide,
        sims,
        x,
        learning_rate=0.05,
        batch_size=100,
        max_epochs=15,
        seed=0,
        progress=False,
    )
    assert history.epochs <= 15 and history.num_steps == history.epochs * 9
    a, b, s = (float(pyro.param(k).detach()) for k in "abs")
    # exact posterior: z | x ~ N(x / 2, 1 / sqrt 2); Monte Carlo error of 900 pairs, a few %
    assert abs(a - 0.5) < 0.05 and abs(b) < 0.05 and abs(s - 0.5**0.5) < 0.05


def test_fit_guide_stops_early_and_restores_the_best_parameters():
    x = data()
    sims = simulate(fixed_model, 100, x, seed=0)
    # with lr 0 the validation loss never improves on the first epoch's
    common = dict(num_lr_decays=0, seed=0, progress=False)  # sbi's schedule
    still = fit_guide(fixed_model, guide, sims, x, learning_rate=0.0, stop_after_epochs=3, **common)
    assert still.converged and still.epochs == 4 and still.best_epoch == 0
    # by default two decays (of a learning rate of 0) go on after the first two stalls
    pyro.clear_param_store()
    default = fit_guide(
        fixed_model, guide, sims, x, learning_rate=0.0, stop_after_epochs=3, seed=0, progress=False
    )
    assert default.decay_epochs == [3, 6] and default.epochs == 10 and default.best_epoch == 0
    # and none without a validation part (max_epochs then)
    pyro.clear_param_store()
    unvalidated = fit_guide(
        fixed_model, guide, sims, x, validation_fraction=0.0, max_epochs=5, seed=0, progress=False
    )
    assert unvalidated.decay_epochs == [] and unvalidated.epochs == 5
    # a learning rate that overshoots: the best epoch is restored, as a shorter run leaves it
    pyro.clear_param_store()
    long = fit_guide(
        fixed_model,
        guide,
        sims,
        x,
        learning_rate=3.0,
        stop_after_epochs=4,
        batch_size=10,
        seed=1,
        num_lr_decays=0,
        progress=False,
    )
    kept = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    assert long.converged and long.best_epoch < long.epochs - 1
    pyro.clear_param_store()
    short = fit_guide(
        fixed_model,
        guide,
        sims,
        x,
        learning_rate=3.0,
        batch_size=10,
        seed=1,
        max_epochs=long.best_epoch + 1,
        progress=False,
    )
    assert short.validation_loss == long.validation_loss[: long.best_epoch + 1]
    for k, v in pyro.get_param_store().items():
        assert torch.equal(v.detach(), kept[k]), k


def test_fit_guide_lr_decays_go_on_from_the_best_parameters():
    x = data()
    sims = simulate(fixed_model, 100, x, seed=0)
    common = dict(learning_rate=3.0, stop_after_epochs=3, batch_size=10, seed=1, progress=False)
    plain = fit_guide(fixed_model, guide, sims, x, num_lr_decays=0, **common)
    pyro.clear_param_store()
    decayed = fit_guide(fixed_model, guide, sims, x, num_lr_decays=2, lr_decay_factor=0.1, **common)
    # up to the first stall it is the run without decays; then stages at 0.3 and 0.03
    first, second = decayed.decay_epochs
    assert first == plain.epochs - 1 and plain.decay_epochs == []
    assert decayed.validation_loss[: first + 1] == plain.validation_loss
    stages = [3.0] * (first + 1) + [0.3] * (second - first)
    stages += [0.03] * (decayed.epochs - len(stages))
    assert decayed.learning_rate == pytest.approx(stages)
    assert decayed.converged and decayed.best_validation_loss <= plain.best_validation_loss
    assert decayed.validation_loss[decayed.best_epoch] == decayed.best_validation_loss
    assert decayed.best_validation_loss == min(decayed.validation_loss)
    # a stage starts from the best parameters so far, not the last ones: with a vanishing
    # learning rate after the decay, the next epoch's validation loss is the best one's
    pyro.clear_param_store()
    frozen = fit_guide(  # (it improves by ~1e-12 an epoch from there on: max_epochs)
        fixed_model,
        guide,
        sims,
        x,
        num_lr_decays=1,
        lr_decay_factor=1e-12,
        max_epochs=plain.epochs + 1,
        **common,
    )
    (first,) = frozen.decay_epochs
    best_so_far = min(frozen.validation_loss[: first + 1])
    assert frozen.validation_loss[first] > best_so_far
    assert frozen.validation_loss[first + 1] == pytest.approx(best_so_far, rel=1e-8)


def test_fit_guide_lr_decay_errors():
    x = data()
    sims = simulate(fixed_model, 20, x, seed=0)
    with pytest.raises(ValueError, match="num_lr_decays needs a validation part"):
        fit_guide(fixed_model, guide, sims, x, validation_fraction=0.0, num_lr_decays=1)
    with pytest.raises(ValueError, match="lr_decay_factor must lie in"):
        fit_guide(fixed_model, guide, sims, x, num_lr_decays=1, lr_decay_factor=1.0)
    with pytest.raises(ValueError, match="num_lr_decays must be at least 0"):
        fit_guide(fixed_model, guide, sims, x, num_lr_decays=-1)


@pytest.mark.parametrize("num_lr_decays", [0, None])
def test_fit_guide_never_finite_validation_loss_is_an_error(num_lr_decays):
    # a guide whose log_prob is nan from the start: no best parameters to keep or go on from
    x = data()
    sims = simulate(fixed_model, 20, x, seed=0)
    pyro.param("a", torch.tensor(math.nan, dtype=x.dtype))
    with pyro.validation_enabled(False):
        with pytest.raises(
            ValueError, match="validation loss was not finite in any of the first 2"
        ):
            fit_guide(
                fixed_model,
                guide,
                sims,
                x,
                stop_after_epochs=2,
                num_lr_decays=num_lr_decays,
                seed=0,
                progress=False,
            )


def test_fit_guide_module_guide_on_sbibm_gaussian_linear():
    model = sbibm_model(gaussian_linear)
    sims = simulate(model, 300, observed=("data",), seed=0)

    class Guide(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 3)
            self.log_scale = torch.nn.Parameter(torch.zeros(3))

        def forward(self, observations=None):
            loc = self.net(observations["data"])
            pyro.sample("parameters", dist.Normal(loc, self.log_scale.exp()).to_event(1))

    g = Guide()
    history = fit_guide(model, g, sims, learning_rate=0.05, max_epochs=20, seed=0, progress=False)
    assert history.validation_loss[history.best_epoch] < history.validation_loss[0]
    # exact posterior: precision 10 + 10 per dim, mean x / 2, sd 1 / sqrt 20 = 0.22
    assert torch.allclose(g.log_scale.exp(), torch.full((3,), 20**-0.5), atol=0.1)


# --------------------------------------------------------------------------------------------
# The real sbibm tasks (optional: /work/venv-sbi)
# --------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings(SLCP_WARNING)
@pytest.mark.parametrize("name", ["gaussian_linear", "slcp", "two_moons"])
def test_real_sbibm_tasks(name):
    sbibm = pytest.importorskip("sbibm")
    task = sbibm.get_task(name)
    prior, simulator = task.get_prior(), task.get_simulator()
    if name == "two_moons":

        def model():
            pyro.deterministic("data", simulator(prior()), event_dim=1)

    else:

        def model():
            return simulator(prior())

    with torch.random.fork_rng():
        sims = simulate(model, 64, observed=("data",), seed=0, progress=False)
    mode = {"gaussian_linear": "plate", "slcp": "leading", "two_moons": "plate"}[name]
    assert sims.mode == mode and len(sims) == 64
    x = sims.values["data"].reshape(64, -1)
    assert x.shape[1] == task.dim_data and sims.values["parameters"].shape[1:] == (
        task.dim_parameters,
    )
    # sleep-phi loss of a guide that proposes from the prior: -mean log prior(theta_i)
    prior_dist = task.get_prior_dist()

    def prior_guide(observations=None):
        pyro.sample("parameters", prior_dist)

    expected = -prior_dist.log_prob(sims.values["parameters"]).mean()
    assert torch.allclose(sleep_loss(model, prior_guide, sims), expected.to(torch.float64))
    # reweighting the prior's samples for observation 1 (none possible for two_moons' data)
    x_o = task.get_observation(1).reshape((1,) + sims.shapes["data"])
    if name == "two_moons":
        with pytest.warns(UserWarning, match="cannot reweight"):
            post = importance_posterior(
                model, prior_guide, observations={"data": x_o}, num_particles=500
            )
        assert not post.reweighted
    else:
        post = importance_posterior(
            model, prior_guide, observations={"data": x_o}, num_particles=2000
        )
        assert post.reweighted and torch.isfinite(post.log_evidence)
    assert post.sample(10)["parameters"].shape == (10, task.dim_parameters)
