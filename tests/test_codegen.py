# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
pyro_rws._codegen, the straight-line replay of a recorded step: the same values and gradients,
bit for bit, as the graph; a public function that would pick another overload is caught by
the check of the first replay and replaced by the overload's own entry.
"""

from __future__ import annotations

import copy
import math

import pyro
import pytest
import torch
from test_fx import _record, _run, duplicates, expand_chains, mutating, no_grad_views, noop_views

from pyro_rws import RWS, JitRWS
from pyro_rws._codegen import same_operations, straight_line
from pyro_rws._fx import _mutates, simplify
from pyro_rws.examples.sbn import SBN

aten = torch.ops.aten


def constants(p, x):
    """Non-finite numbers, a dtype and a keyword argument in the recorded calls."""
    y = torch.where(x > 0, p[:5], -math.inf)
    m = torch.logsumexp(y, -1, keepdim=True).to(torch.float64).clamp(max=math.inf)
    z = torch.nan_to_num(y, neginf=-1e4)
    return m.sum().detach(), (torch.softmax(z, -1) * p[:5]).sum(dtype=p.dtype)


@pytest.mark.parametrize(
    "fn", [noop_views, no_grad_views, expand_chains, duplicates, mutating, constants]
)
@pytest.mark.parametrize("public", [True, False])
def test_same_values_and_gradients_bit_for_bit(fn, public):
    torch.manual_seed(1)
    p = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 6, dtype=torch.float64)
    graph = simplify(_record(fn, p, x), differentiable_outputs=(1,))
    fast = straight_line(graph, public=public)
    assert not any(isinstance(v, torch._ops.OpOverload) for v in fast.__globals__.values())
    assert same_operations(graph.forward, fast, (p, x))
    for seed in range(2):
        expected, actual = _run(graph, p, x, seed), _run(fast, p, x, seed)
        for e, a in zip(expected, actual, strict=True):
            assert (e is None) == (a is None)
            if e is not None:
                assert torch.equal(e, a)


def test_another_overload_is_caught():
    torch.manual_seed(0)
    p, x = torch.randn(6, 6, requires_grad=True), torch.randn(5, 6)
    graph = simplify(_record(noop_views, p, x), differentiable_outputs=(1,))
    wrong = copy.deepcopy(graph)
    for node in wrong.graph.nodes:
        if node.target is aten.logsumexp.default:
            node.target = aten.amax.default  # same arguments, another operation
    wrong.recompile()
    assert not same_operations(graph.forward, straight_line(wrong), (p, x))
    # the random state is restored after the check
    state = torch.get_rng_state()
    same_operations(graph.forward, straight_line(graph), (p, x))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("check", [True, False])
def test_jit_replays_straight_line_code(check, monkeypatch):
    """The public functions where the first replay's check passes, else the overloads'."""
    if not check:
        monkeypatch.setattr("pyro_rws._jit.same_operations", lambda *args: False)
    pyro.clear_param_store()
    sbn = SBN(12, (4,))
    x = torch.bernoulli(torch.full((8, 12), 0.5))
    module = JitRWS(3, max_plate_nesting=1)(sbn.model, sbn.guide)
    pyro.set_rng_seed(0)
    value = module(x)
    (graph,) = module.elbo._graphs.values()
    assert graph.no_grad is graph.compiled
    called = {v for k, v in graph.compiled.__globals__.items() if k != "__builtins__"}
    overloads = {n.target._op for n in graph.captured.graph.nodes if hasattr(n.target, "_op")}
    assert (torch._C._VariableFunctions.sigmoid in called) == check
    assert (called & overloads) == (set() if check else overloads)
    pyro.set_rng_seed(0)  # the same draws as the eager loss's
    assert torch.equal(RWS(3, max_plate_nesting=1)(sbn.model, sbn.guide)(x), value)


def test_mutating_step_is_not_run_for_the_check(monkeypatch):
    """A step with an in-place operation: the overloads' own entries, no checking replay."""
    import pyro.distributions as dist

    def model(x):
        loc = pyro.param("loc", torch.zeros(2))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        shift = pyro.param("shift", torch.zeros(2))
        loc = x * 0.5
        loc.add_(shift)  # in place
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    monkeypatch.setattr("pyro_rws._jit.same_operations", lambda *args: pytest.fail("checked"))
    pyro.clear_param_store()
    x = torch.randn(4, 2)
    loss = JitRWS(3, max_plate_nesting=1)
    pyro.set_rng_seed(0)
    value = loss.loss(model, guide, x)
    (graph,) = loss._graphs.values()
    assert _mutates(graph.captured.graph)
    called = {v for k, v in graph.compiled.__globals__.items() if k != "__builtins__"}
    assert torch._C._VariableFunctions.add not in called
    pyro.set_rng_seed(0)
    assert value == RWS(3, max_plate_nesting=1).loss(model, guide, x)
