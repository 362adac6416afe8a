# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
pyro_rws._fx.simplify, the rewrites of a recorded step: the same values and gradients, bit for
bit, as the graph as recorded; fewer operations; no autograd recording where no gradient is
used; graphs with mutations left alone.
"""

from __future__ import annotations

import copy
import operator

import pyro
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from pyro_rws import JitRWS
from pyro_rws._fx import simplify
from pyro_rws.examples.sbn import SBN

aten = torch.ops.aten


def noop_views(p, x):
    """Views to the shape a tensor has, sum(-x), a multiplication by 1, no-grad sampling."""
    K, B, D = 4, *x.shape
    logits = torch.nn.functional.linear(x, p)  # (B, D)
    (b,) = torch.broadcast_tensors(logits)
    e = b.expand(B, D).expand(K, B, D).reshape(K, B, D)
    with torch.no_grad():
        z = torch.bernoulli(torch.sigmoid(e))  # the sigmoid needs no gradient
    lp = -torch.nn.functional.binary_cross_entropy_with_logits(
        *torch.broadcast_tensors(e, z), reduction="none"
    )
    lp = lp.reshape(K, B, -1).sum(-1) * 1.0
    w = torch.softmax(lp.detach(), 0)
    value = torch.logsumexp(lp, 0).sum()  # an output whose gradient is not used
    surrogate = -(w * lp).sum()
    return value, surrogate


def no_grad_views(p, x):
    """A view made without grad, read with grad: detached from p's history (kept as is)."""
    with torch.no_grad():
        v = p.expand(p.shape)
        u = (p * 2).expand(p.shape)
    return (v * x[0]).sum() + u.sum(), ((v + p) * x[0]).sum()


def expand_chains(p, x):
    """A chain of expands (kept: merged, its gradient would be summed in another order)."""
    row = p[:1]  # (1, 6)
    e = row.expand(5, 6).expand(3, -1, 6)  # (3, 5, 6), not (3, 1, 6)
    return e.sum().detach(), (e * x[0]).sum()


def duplicates(p, x):
    """The same operation twice, with and without autograd recording."""
    a, b = torch.sigmoid(p), torch.sigmoid(p)  # recorded: kept apart
    with torch.no_grad():
        c, d = p.exp(), p.exp()  # not recorded: merged
    return (c + d).sum(), ((a * c + b * d) * x[0]).sum()


def mutating(p, x):
    y = p * 1.0
    y.add_(1.0)
    return y.sum(), (y * x[0]).sum()


def _record(fn, *inputs):
    with torch.enable_grad():
        return make_fx(fn, pre_dispatch=True)(*inputs)


def _run(graph, p, x, seed=0):
    p = p.detach().requires_grad_()
    torch.manual_seed(seed)
    value, surrogate = graph(p, x)
    (grad,) = torch.autograd.grad(surrogate, p, allow_unused=True)
    return value.detach(), surrogate.detach(), grad


def _calls(graph):
    return [n for n in graph.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("fn", [noop_views, no_grad_views, expand_chains, duplicates, mutating])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_values_and_gradients_bit_for_bit(fn, dtype):
    torch.manual_seed(1)
    p = torch.randn(6, 6, dtype=dtype, requires_grad=True)
    x = torch.randn(5, 6, dtype=dtype)
    recorded = _record(fn, p, x)
    simplified = simplify(copy.deepcopy(recorded), differentiable_outputs=(1,))
    for seed in range(3):
        expected, actual = _run(recorded, p, x, seed), _run(simplified, p, x, seed)
        for e, a in zip(expected, actual, strict=True):
            assert (e is None) == (a is None)
            if e is not None:
                assert torch.equal(e, a)


def test_noop_views_are_dropped():
    p, x = torch.randn(6, 6, requires_grad=True), torch.randn(5, 6)
    recorded = _record(noop_views, p, x)
    before = len(_calls(recorded))
    graph = simplify(recorded, differentiable_outputs=(1,))
    targets = [n.target for n in _calls(graph)]
    assert aten.broadcast_tensors.default not in targets or all(
        len(n.args[0]) > 1 for n in _calls(graph) if n.target is aten.broadcast_tensors.default
    )
    assert aten.reshape.default not in targets
    assert targets.count(aten.expand.default) == 1  # (B, D) -> (K, B, D), once
    assert not any(n.target is aten.mul.Tensor and n.args[1] == 1.0 for n in _calls(graph))
    # the negation runs on the reduced tensor: after the sum, not before
    (neg,) = [
        n for n in _calls(graph) if n.target is aten.neg.default and n.args[0].op != "placeholder"
    ][:1]
    assert neg.args[0].target is aten.sum.dim_IntList
    assert len(_calls(graph)) < before


def test_only_what_the_surrogate_needs_is_recorded_by_autograd():
    p, x = torch.randn(6, 6, requires_grad=True), torch.randn(5, 6)
    graph = simplify(_record(noop_views, p, x), differentiable_outputs=(1,))
    value, surrogate = graph(p, x)
    assert surrogate.requires_grad
    assert not value.requires_grad  # its gradient is not used: computed without autograd
    # and the graph toggles grad mode around the sigmoid the sampler draws from
    mode, modes = True, {}
    for n in _calls(graph):
        if n.target is torch._C._set_grad_enabled:
            mode = n.args[0]
        else:
            modes[n.target] = mode
    assert modes[aten.sigmoid.default] is False


def test_duplicates_merged_only_without_autograd():
    p, x = torch.randn(6, 6, requires_grad=True), torch.randn(5, 6)
    targets = [n.target for n in _calls(simplify(_record(duplicates, p, x)))]
    assert targets.count(aten.exp.default) == 1
    assert targets.count(aten.sigmoid.default) == 2


def test_mutating_graph_is_left_as_recorded():
    p, x = torch.randn(6, 6, requires_grad=True), torch.randn(5, 6)
    recorded = _record(mutating, p, x)
    before = [n.target for n in _calls(recorded)]
    after = [n.target for n in _calls(simplify(recorded))]
    assert after == before


def test_sbn_step_graph():
    """The recorded RWS step of an SBN: no no-op views, only parameters and data as inputs."""
    pyro.clear_param_store()
    sbn = SBN(12, (4,))
    x = torch.bernoulli(torch.full((8, 12), 0.5))
    module = JitRWS(3, max_plate_nesting=1)(sbn.model, sbn.guide)
    module(x)
    (graph,) = module.elbo._graphs.values()
    calls = _calls(graph.captured)
    placeholders = [n for n in graph.captured.graph.nodes if n.op == "placeholder"]
    # views of parameters made while recording are computed, not inputs
    assert graph.other_params == []
    assert len(placeholders) == len(list(sbn.parameters())) + 1
    for n in calls:
        if n.target in (aten.expand.default, aten.reshape.default):
            assert tuple(n.args[0].meta["val"].shape) != tuple(n.meta["val"].shape)
        if n.target is operator.getitem:
            source = n.args[0].args[0][n.args[1]]
            assert tuple(source.meta["val"].shape) != tuple(n.meta["val"].shape)
    ops = [n for n in calls if n.target is not torch._C._set_grad_enabled]
    assert len(ops) <= 40  # 70 as recorded, before these rewrites
