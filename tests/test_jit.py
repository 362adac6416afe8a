# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The compiled losses (pyro_rws.jit) against their eager classes: the same value, statistics and
gradients for the same random draws, in both ways of training (SVI with the param store, and a
torch module whose nn.Parameters are not in the store); the exact-enumeration targets of
test_rws.py, test_wake_sleep.py, test_sleep_phase.py and test_vimco.py; recompilation when
the structure changes; clear errors.
"""

from __future__ import annotations

import itertools

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from discrete import (
    PHI,
    THETA,
    X4,
    FixFantasies,
    X,
    assert_close,
    exact_sleep_phi_grad,
    exact_wake_phi_grad,
    exact_wake_theta_grad,
    fixed_trace,
    guide,
    guide_sub,
    init_params,
    init_parent_params,
    iwae,
    joint_draws,
    log_guide_table,
    log_joint_table,
    make_guide,
    make_model,
    model,
    model_sub,
    params,
)
from pyro.infer import config_enumerate
from torch import nn
from torch.distributions import constraints

from pyro_rws import (
    RWS,
    VIMCO,
    JitReweightedWakeSleep,
    JitRWS,
    JitSleepPhaseLoss,
    JitVIMCO,
    JitWakeSleepELBO,
    SleepPhaseLoss,
    WakeSleepELBO,
)

F64 = torch.float64

# (eager class, compiled class, constructor arguments)
LOSSES = {
    "rws": (RWS, JitRWS, dict(num_particles=3)),
    "rws-insomnia": (RWS, JitRWS, dict(num_particles=3, insomnia=0.4)),
    "ws-sleep": (WakeSleepELBO, JitWakeSleepELBO, dict(num_particles=2)),
    "ws-wake": (WakeSleepELBO, JitWakeSleepELBO, dict(num_particles=3, phase_q="wake")),
    "sleep": (SleepPhaseLoss, JitSleepPhaseLoss, dict(num_particles=2)),
    "vimco": (VIMCO, JitVIMCO, dict(num_particles=3)),
}


def test_names():
    assert JitRWS is JitReweightedWakeSleep
    loss = JitRWS(4, insomnia=0.5, ignore_jit_warnings=True, jit_options={"backend": None})
    assert loss.num_particles == 4 and loss.insomnia == 0.5 and loss.ignore_jit_warnings
    assert isinstance(loss, RWS)


# ------------------------------------------------------------------------------------------
# a small program with continuous and discrete latents, in two ways of holding parameters
# ------------------------------------------------------------------------------------------
def store_model(x, encoder=None):
    loc = pyro.param("loc", torch.zeros(2, dtype=F64))
    scale = pyro.param("scale", torch.ones(2, dtype=F64), constraint=constraints.positive)
    with pyro.plate("data", x.shape[-2]):
        z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
        c = pyro.sample("c", dist.Bernoulli(logits=z.sum(-1)))
        pyro.sample("x", dist.Normal(z + c.unsqueeze(-1), 1.0).to_event(1), obs=x)


def make_encoder():
    torch.manual_seed(0)
    return nn.Linear(2, 5).double()


def store_guide(x, encoder):
    pyro.module("encoder", encoder)
    out = encoder(x)
    with pyro.plate("data", x.shape[-2]):
        scale = nn.functional.softplus(out[..., 2:4])
        z = pyro.sample("z", dist.Normal(out[..., :2], scale).to_event(1))
        pyro.sample("c", dist.Bernoulli(logits=out[..., 4] + z.sum(-1)))


class Net(nn.Module):
    """The same program, with parameters that only the module holds (no pyro.param/module)."""

    def __init__(self):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(2, dtype=F64))
        self.log_scale = nn.Parameter(torch.zeros(2, dtype=F64))
        self.encoder = make_encoder()

    def model(self, x):
        with pyro.plate("data", x.shape[-2]):
            z = pyro.sample("z", dist.Normal(self.loc, self.log_scale.exp()).to_event(1))
            c = pyro.sample("c", dist.Bernoulli(logits=z.sum(-1)))
            pyro.sample("x", dist.Normal(z + c.unsqueeze(-1), 1.0).to_event(1), obs=x)

    def guide(self, x):
        out = self.encoder(x)
        with pyro.plate("data", x.shape[-2]):
            scale = nn.functional.softplus(out[..., 2:4])
            z = pyro.sample("z", dist.Normal(out[..., :2], scale).to_event(1))
            pyro.sample("c", dist.Bernoulli(logits=out[..., 4] + z.sum(-1)))


def data(n=5):
    return torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(1))


def store_step(loss, x, encoder, seed):
    """One loss_and_grads as SVI runs it; returns the value, stats and the store's gradients."""
    store = pyro.get_param_store()
    for _, p in store.named_parameters():
        p.grad = None
    pyro.set_rng_seed(seed)
    with poutine.trace(param_only=True) as capture:
        value = loss.loss_and_grads(store_model, store_guide, x, encoder)
    seen = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
    grads = {n: p.grad.clone() for n, p in store.named_parameters() if p.grad is not None}
    return value, loss.stats, grads, seen


def assert_same_stats(a, b):
    for name in ("loss", "wake_theta", "wake_phi", "sleep_phi", "bound", "ess"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    assert a.num_particles == b.num_particles


@pytest.mark.parametrize("name", list(LOSSES))
def test_same_as_eager_param_store(name):
    eager_cls, jit_cls, kw = LOSSES[name]
    x, encoder = data(), make_encoder()
    eager, compiled = eager_cls(**kw), jit_cls(**kw)
    compiled.loss(store_model, store_guide, x, encoder)  # records the graph (and the params)
    for seed in (3, 4):
        v0, s0, g0, _ = store_step(eager, x, encoder, seed)
        v1, s1, g1, seen = store_step(compiled, x, encoder, seed)
        assert v1 == pytest.approx(v0, rel=1e-6, abs=1e-6)
        assert_same_stats(s1, s0)
        assert set(g1) == set(g0)
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-6)
        # SVI finds the parameters through pyro.param, as in the eager loss
        assert seen == {p for _, p in pyro.get_param_store().named_parameters()}
    assert compiled.compile_count == 1


def test_svi_capture_sees_param_sites():
    """Under SVI's parameter capture alone, a replay adds the sites pyro.param would add."""
    pyro.clear_param_store()
    x, encoder = data(), make_encoder()
    loss = JitRWS(3)
    loss.loss(store_model, store_guide, x, encoder)  # records
    store = pyro.get_param_store()
    for outer in (False, True):  # alone, and inside another handler (through pyro.param)
        with poutine.trace(param_only=True) as capture:
            if outer:
                with poutine.block(hide_types=["sample"]):
                    loss.loss_and_grads(store_model, store_guide, x, encoder)
            else:
                loss.loss_and_grads(store_model, store_guide, x, encoder)
        nodes = capture.trace.nodes
        assert set(nodes) == set(store.keys())
        for name, site in nodes.items():
            assert site["type"] == "param" and site["name"] == name
            assert site["value"].unconstrained() is store._params[name]
            torch.testing.assert_close(site["value"], pyro.param(name), rtol=0, atol=0)
        assert bool((nodes["scale"]["value"] > 0).all())


@pytest.mark.parametrize("name", list(LOSSES))
def test_same_as_eager_torch_module(name):
    eager_cls, jit_cls, kw = LOSSES[name]
    net, x = Net(), data()
    eager, compiled = eager_cls(**kw)(net.model, net.guide), jit_cls(**kw)(net.model, net.guide)
    assert {id(p) for p in compiled.parameters()} == {id(p) for p in net.parameters()}
    assert len(pyro.get_param_store()) == 0
    compiled(x)  # records
    for seed in (3, 4):
        results = []
        for fn in (eager, compiled):
            net.zero_grad()
            pyro.set_rng_seed(seed)
            value = fn(x)
            value.backward()
            results.append((value.detach(), fn.elbo.stats, [p.grad for p in net.parameters()]))
        (v0, s0, g0), (v1, s1, g1) = results
        torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-6)
        assert_same_stats(s1, s0)
        for a, b in zip(g1, g0, strict=True):
            assert (a is None) == (b is None)  # e.g. the sleep phase gives the model none
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert len(pyro.get_param_store()) == 0
    assert compiled.elbo.compile_count == 1


def test_torch_optim_and_svi_train_the_same_way():
    """A few steps of torch.optim.SGD on the module, and of SVI with pyro.optim.SGD, match eager."""
    x = data(8)
    finals = []
    for cls in (RWS, JitRWS):
        net = Net()
        loss = cls(3)(net.model, net.guide)
        optim = torch.optim.SGD(net.parameters(), lr=0.01)
        loss(x)  # the compiled loss records here; the eager one takes the same step
        pyro.set_rng_seed(7)
        for _ in range(3):
            optim.zero_grad()
            loss(x).backward()
            optim.step()
        finals.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-6, atol=1e-6)

    finals = []
    for cls in (RWS, JitRWS):
        pyro.clear_param_store()
        encoder = make_encoder()
        loss = cls(3)
        svi = pyro.infer.SVI(store_model, store_guide, pyro.optim.SGD({"lr": 0.01}), loss)
        svi.evaluate_loss(x, encoder)
        pyro.set_rng_seed(7)
        for _ in range(3):
            svi.step(x, encoder)
        store = pyro.get_param_store()
        finals.append(torch.cat([store[n].detach().reshape(-1) for n in sorted(store.keys())]))
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# exact expectations by enumeration (targets from tests/discrete.py): the draws and fantasies are
# passed as tensor arguments, as a compiled loss needs, so one graph serves every term
# ------------------------------------------------------------------------------------------
def model_d(x, z, *fantasies):
    return model(x)


def guide_d(x, z, *fantasies):
    return poutine.replay(guide, trace=fixed_trace(z=z))(x)


def compiled_expected_grad(loss, x, K, names):
    total = 0.0
    for z, prob in joint_draws(x, K):
        total = total + prob * loss.differentiable_loss(model_d, guide_d, x, z)
    assert loss.compile_count == 1
    return torch.autograd.grad(total, params(names)), total.detach()


@pytest.fixture
def discrete_params():
    init_params()


def jit(cls, *args, **kwargs):
    return cls(*args, max_plate_nesting=1, **kwargs)


@pytest.mark.parametrize("K", [2, 3])
def test_exact_rws_wake_theta_and_value(discrete_params, K):
    grads, value = compiled_expected_grad(jit(JitRWS, K), X, K, THETA)
    target_grads, target_value = exact_wake_theta_grad(K)
    assert_close(grads, target_grads)
    torch.testing.assert_close(value, target_value, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [JitRWS, JitWakeSleepELBO])
def test_exact_wake_phi(discrete_params, cls):
    kw = {"phase_q": "wake"} if cls is JitWakeSleepELBO else {}
    grads, _ = compiled_expected_grad(jit(cls, 2, **kw), X, 2, PHI)
    assert_close(grads, exact_wake_phi_grad(2))


def test_exact_vimco(discrete_params):
    K = 2
    grads, value = compiled_expected_grad(jit(JitVIMCO, K), X, K, THETA + PHI)
    target = -sum(iwae(int(x), K) for x in X)
    assert_close(grads, torch.autograd.grad(target, params(THETA + PHI)))
    torch.testing.assert_close(value, target.detach(), rtol=1e-10, atol=1e-12)


def test_exact_wake_sleep_value_and_wake_theta(discrete_params):
    K = 2
    loss = jit(JitWakeSleepELBO, K)
    lp, lq = log_joint_table(), log_guide_table()
    elbo = (lq[X.long()].exp() * (lp[X.long()] - lq[X.long()])).sum()
    theta = torch.autograd.grad(-(lq[X.long()].exp().detach() * lp[X.long()]).sum(), params(THETA))
    grads, value = compiled_expected_grad(loss, X, K, THETA)
    assert abs(value + elbo.item()) < 1e-10
    assert_close(grads, theta)


@pytest.mark.parametrize("loss_fn", ["rws", "sleep_phase", "wake_sleep"])
def test_exact_sleep_phi(discrete_params, loss_fn):
    loss = {
        "rws": lambda: jit(JitRWS, 2, insomnia=0.0),
        "sleep_phase": lambda: jit(JitSleepPhaseLoss),
        "wake_sleep": lambda: jit(JitWakeSleepELBO, 2, phase_q="sleep"),
    }[loss_fn]()
    log_p = log_joint_table().detach()
    wake = torch.zeros(2, 2, dtype=torch.long)
    # one outermost handler; the fantasies it gives are arguments of the step, so the graph
    # reads them as inputs (a new handler object would record a new graph)
    fix = FixFantasies({})
    total = 0.0
    for flat in itertools.product(range(2), range(3), range(2), range(3)):
        x_f = torch.tensor(flat[0::2], dtype=X.dtype).reshape(1, 2)
        z_f = torch.tensor(flat[1::2]).reshape(1, 2)
        prob = log_p[x_f.long(), z_f].sum().exp()
        fix.values = {"x": x_f, "z": z_f}
        with fix:
            value = loss.differentiable_loss(model_d, guide_d, X, wake, x_f, z_f)
        total = total + prob * value
    assert loss.compile_count == 1
    assert_close(torch.autograd.grad(total, params(PHI)), exact_sleep_phi_grad(len(X)))


def test_exact_subsampled(discrete_params):
    """Minibatches of a subsampled plate: the average estimate is the full-data expectation."""
    K, B = 2, 2

    def guide_s(x, batch, idx, z):
        return poutine.replay(guide_sub, trace=fixed_trace(data=idx, z=z))(x, batch)

    def model_s(x, batch, idx, z):
        return model_sub(x, batch)

    loss = jit(JitRWS, K)
    minibatches = list(itertools.combinations(range(len(X4)), B))
    lq = log_guide_table().detach()
    total = 0.0
    for idx in minibatches:
        idx = torch.tensor(idx)
        for flat in itertools.product(range(3), repeat=K * B):
            z = torch.tensor(flat).reshape(K, B)
            prob = lq[X4[idx].long().expand(K, B), z].sum().exp() / len(minibatches)
            total = total + prob * loss.differentiable_loss(model_s, guide_s, X4, B, idx, z)
    assert loss.compile_count == 1
    grads = torch.autograd.grad(total, params(THETA + PHI))
    full_value = -sum(iwae(int(x), K) for x in X4)
    full_theta = torch.autograd.grad(
        -sum(iwae(int(x), K, detach_q=True) for x in X4), params(THETA)
    )
    torch.testing.assert_close(total.detach(), full_value.detach(), rtol=1e-10, atol=1e-10)
    assert_close(grads[: len(THETA)], full_theta)
    assert_close(grads[len(THETA) :], [2 * g for g in exact_wake_phi_grad(K)])


# ------------------------------------------------------------------------------------------
# recompilation, and what is refused
# ------------------------------------------------------------------------------------------
def sbn_like(x_dim=6, h_dim=3):
    from pyro_rws.examples.sbn import SBN

    torch.manual_seed(0)
    return SBN(x_dim, (h_dim,)).double()


def eager_value(eager, model, guide, seed, *args, **kwargs):
    pyro.set_rng_seed(seed)
    return eager.differentiable_loss(model, guide, *args, **kwargs)


def test_recompiles_on_batch_size_and_kwargs():
    sbn = sbn_like()
    compiled, eager = JitRWS(3), RWS(3)
    x5 = torch.bernoulli(torch.full((5, 6), 0.4, dtype=F64))
    x7 = torch.bernoulli(torch.full((7, 6), 0.4, dtype=F64))
    cases = [((x5,), {}), ((x7,), {}), ((x7,), {"num_data": 70}), ((x7,), {"num_data": 700})]
    for i, (args, kwargs) in enumerate(cases):
        compiled.differentiable_loss(sbn.model, sbn.guide, *args, **kwargs)
        assert compiled.compile_count == i + 1
        for seed in (1, 2):  # replays: no new graph, the eager values
            pyro.set_rng_seed(seed)
            value = compiled.differentiable_loss(sbn.model, sbn.guide, *args, **kwargs)
            expected = eager_value(eager, sbn.model, sbn.guide, seed, *args, **kwargs)
            torch.testing.assert_close(value, expected)
        assert compiled.compile_count == i + 1
    # back to an earlier structure: its graph is reused
    compiled.differentiable_loss(sbn.model, sbn.guide, x5)
    assert compiled.compile_count == len(cases)


def test_recompiles_for_another_model_handler_or_setting():
    sbn, other = sbn_like(), sbn_like()
    x = torch.bernoulli(torch.full((4, 6), 0.4, dtype=F64))
    compiled, eager = JitRWS(3), RWS(3)
    compiled.loss(sbn.model, sbn.guide, x)
    compiled.loss(sbn.model, sbn.guide, x)
    assert compiled.compile_count == 1
    compiled.loss(other.model, other.guide, x)
    assert compiled.compile_count == 2
    with poutine.scale(scale=3.0):
        compiled.loss(sbn.model, sbn.guide, x)
        assert compiled.compile_count == 3
        pyro.set_rng_seed(5)
        value = compiled.loss(sbn.model, sbn.guide, x)
        pyro.set_rng_seed(5)
        assert value == pytest.approx(eager.loss(sbn.model, sbn.guide, x), rel=1e-9)
    compiled.num_particles = 5
    pyro.set_rng_seed(5)
    compiled.loss(sbn.model, sbn.guide, x)
    assert compiled.compile_count == 4
    assert compiled.stats.num_particles == 5 and compiled.stats.ess.shape == (4,)


def test_new_param_store_recompiles():
    sbn = sbn_like()
    x = torch.bernoulli(torch.full((4, 6), 0.4, dtype=F64))
    compiled = JitRWS(2)
    compiled.loss(sbn.model, sbn.guide, x)
    pyro.clear_param_store()  # the SBN registers its modules again on the next eager run
    compiled.loss(sbn.model, sbn.guide, x)
    assert compiled.compile_count == 2


def test_rejects_sequential_particles():
    with pytest.raises(ValueError, match="vectorize_particles=True"):
        JitRWS(3, vectorize_particles=False)


def test_rejects_stochastic_control_flow():
    def model(x):
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.5, dtype=F64)))
        if z.sum() > 0:  # structure depends on a sample
            pyro.sample("y", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        with pyro.plate("data2", x.shape[-1]):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("z", dist.Bernoulli(torch.tensor(0.5, dtype=F64)))
        pyro.sample("y", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))

    x = torch.zeros(3, dtype=F64)
    with pytest.raises(NotImplementedError, match="static structure"):
        JitRWS(2, max_plate_nesting=1).loss(model, guide, x)


def test_nan_is_reported_with_the_eager_message():
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0, dtype=F64))
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))

    x = torch.zeros(3, dtype=F64)
    loss = JitRWS(2, max_plate_nesting=1)
    loss.loss(model, guide, x)
    with torch.no_grad():
        pyro.param("loc").unconstrained().fill_(float("nan"))
    with pyro.validation_enabled(False):
        with pytest.raises(ValueError, match="NaN"):
            loss.loss(model, guide, x)
        value = loss.differentiable_loss(model, guide, x)  # no synchronization: not checked
    assert torch.isnan(value)


def test_grad_mode_is_restored():
    """The recorded graph switches grad mode around the no_grad blocks of the steps."""
    net, x = Net(), data()
    loss = JitRWS(3, insomnia=0.5)(net.model, net.guide)
    loss(x)
    with torch.no_grad():
        value = loss(x)
        assert not torch.is_grad_enabled()
    assert not value.requires_grad
    assert torch.is_grad_enabled()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*script_method.*:DeprecationWarning")  # importing inductor
def test_inductor_backend_same_as_eager():
    """
    torch.compile of the recorded graph (tens of seconds): the same values and gradients for the
    same draws. Inductor may order random operations differently, so the draws are fixed here
    by passing them as arguments.
    """
    net, x = Net(), data()

    def model(x, z, c):
        return net.model(x)

    def guide(x, z, c):
        return poutine.replay(net.guide, trace=fixed_trace(z=z, c=c))(x)

    gen = torch.Generator().manual_seed(2)
    z = torch.randn(3, len(x), 2, dtype=F64, generator=gen)
    c = torch.bernoulli(torch.full((3, len(x)), 0.5, dtype=F64), generator=gen)
    eager = VIMCO(3)(model, guide)
    compiled = JitVIMCO(3, jit_options={"backend": "inductor"})(model, guide)
    results = []
    for fn in (eager, compiled):
        net.zero_grad()
        value = fn(x, z, c)
        value.backward()
        results.append((value.detach(), [p.grad for p in net.parameters()]))
    (v0, g0), (v1, g1) = results
    torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["rws", "rws-insomnia", "vimco"])
def test_first_call_draws_what_eager_draws(name):
    """Recording runs the step twice; the first call's value and gradients are still eager's."""

    def model(x):
        loc = pyro.param("m", torch.tensor(0.3))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        a = pyro.param("a", torch.tensor(0.2))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(a * x, 1.0))

    make = {
        "rws": lambda cls: cls(5),
        "rws-insomnia": lambda cls: cls(5, insomnia=0.5),
        "vimco": lambda cls: cls(5),
    }[name]
    eager_cls, jit_cls = (RWS, JitRWS) if name != "vimco" else (VIMCO, JitVIMCO)
    x = torch.tensor([0.3, -1.2, 0.8, 2.0])
    results = []
    for cls in (eager_cls, jit_cls):
        pyro.clear_param_store()
        pyro.set_rng_seed(7)
        value = make(cls).loss_and_grads(model, guide, x)
        grads = {n: p.grad.clone() for n, p in pyro.get_param_store().named_parameters()}
        results.append((value, grads))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    for n in results[0][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], rtol=1e-10, atol=1e-12)


@config_enumerate
def enum_child_model(x):
    w = pyro.param("w", torch.tensor([0.3, 0.7]))
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", len(x)):
        z1 = pyro.sample("z1", dist.Bernoulli(0.4))
        c = pyro.sample("c", dist.Categorical(logits=w + z1.unsqueeze(-1)))
        pyro.sample("x", dist.Normal(locs[c] + z1, 1.0), obs=x)


def enum_child_guide(x):
    a = pyro.param("a", torch.tensor(0.1))
    with pyro.plate("data", len(x)):
        pyro.sample("z1", dist.Bernoulli(logits=a * x))


# the enumerated site downstream of the guide's (issue 11), or its parent, global or per
# datapoint (issue 18): (model, guide, parameters to create)
ENUM_PROGRAMS = {
    "child": (enum_child_model, enum_child_guide, lambda: None),
    "global-parent": (make_model("global"), make_guide(), init_parent_params),
    "local-parent": (make_model("local"), make_guide(), init_parent_params),
}


@pytest.mark.parametrize("program", list(ENUM_PROGRAMS))
@pytest.mark.parametrize("pair", ["rws", "rws-insomnia", "vimco", "ws"])
def test_enumerated_model_same_as_eager(pair, program):
    """The compiled losses sum out enumerated sites (issues 11, 18) exactly as the eager ones."""
    model, guide, init = ENUM_PROGRAMS[program]
    eager_cls, jit_cls, kw = {
        "rws": (RWS, JitRWS, {}),
        "rws-insomnia": (RWS, JitRWS, {"insomnia": 0.5}),
        "vimco": (VIMCO, JitVIMCO, {}),
        "ws": (WakeSleepELBO, JitWakeSleepELBO, {}),
    }[pair]
    x = torch.tensor([0.3, -1.2, 0.8, 2.0, -0.1], dtype=F64 if program != "child" else None)
    results = []
    for cls in (eager_cls, jit_cls):
        pyro.clear_param_store()
        init()
        loss = cls(3, **kw)
        for seed in range(2):
            for p in pyro.get_param_store().values():
                p.unconstrained().grad = None
            pyro.set_rng_seed(seed)
            value = loss.loss_and_grads(model, guide, x)
        grads = {n: p.grad.clone() for n, p in pyro.get_param_store().named_parameters()}
        results.append((value, grads))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    for n in results[0][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("validation", [True, False], ids=["validation", "no-validation"])
@pytest.mark.parametrize(
    "make",
    [lambda: JitSleepPhaseLoss(2), lambda: JitRWS(2, insomnia=0.5), lambda: JitWakeSleepELBO(2)],
    ids=["sleep", "rws-insomnia", "ws"],
)
def test_sleep_phase_shape_mismatch_names_the_site(make, validation):
    """A guide site shaped differently from the model's on fantasies: the eager error (issue 18)."""
    x = torch.tensor([0.3, -1.2, 0.8])

    def model(x):
        loc = pyro.param("m", torch.tensor(0.3))
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(data):
        a = pyro.param("a", torch.tensor(0.2))
        with pyro.plate("data", data.shape[-1]):
            loc = a * data
            if data is x:  # the wake phase; on fantasies an extra event dim
                pyro.sample("z", dist.Normal(loc, 1.0))
            else:
                loc = loc.unsqueeze(-1).expand(loc.shape + (2,))
                pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    pyro.enable_validation(validation)
    with pytest.raises(ValueError, match=r"guide site 'z' cannot score the model's fantasy"):
        make().loss(model, guide, x)
