# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Rewrites of a recorded step (a graph of ATen operations, see :mod:`pyro_rws.jit`) that make
it cheaper to replay and give the same numbers, bit for bit.

A graph is recorded for one set of shapes, dtypes and devices (they are part of its key), so
what is static there can be decided once: a broadcast or reshape to the shape a tensor already
has is dropped (a chain of ``expand`` is kept: one ``expand`` would sum its gradient in another
order); a multiplication by 1 is dropped; identical pure operations that autograd does not
record are merged; ``sum(-x)`` becomes ``-sum(x)`` (negation commutes exactly with rounding, so
the value is the same, and the negation runs on the reduced tensor: torch's
``Bernoulli.log_prob`` negates the whole ``(K, B, D)`` tensor before ``to_event`` sums it);
operations whose gradient nothing needs run without autograd recording (the probabilities a
sampler draws from, the weights, the statistics), operations on tensors none of which requires
grad run under whichever grad mode is current (one switch per change of mode), and a ``detach``
of such a tensor is dropped. Each operation left costs a Python call and an autograd node per
step, which on small programs is most of a step.

Random and mutating operations are never moved or merged; a graph with mutations is left as
recorded.
"""

from __future__ import annotations

import operator

import torch
from torch._library.utils import is_impure
from torch.fx import Graph, GraphModule, Node

aten = torch.ops.aten
_SET_GRAD = torch._C._set_grad_enabled
# views that return their input's layout when the shape does not change
_VIEWS = (aten.expand.default, aten.reshape.default, aten.view.default, aten._unsafe_view.default)
_SUMS = (aten.sum.dim_IntList, aten.sum.default)


def simplify(captured: GraphModule, differentiable_outputs=(1,), grad_inputs=None) -> GraphModule:
    """
    Simplify ``captured`` in place (see the module's docstring) and return it.

    :param differentiable_outputs: positions of the outputs whose gradients are used (the
        surrogate); every other output is treated as a value or a statistic.
    :param grad_inputs: positions of the inputs that require grad (None: all of them).
    """
    graph = captured.graph
    graph.eliminate_dead_code()
    _drop_unused_constants(graph)
    if not _mutates(graph):
        modes = _grad_modes(graph)
        _drop_noop_views(graph, modes)
        _sum_before_neg(graph, modes)
        _skip_unneeded_grad(graph, modes, differentiable_outputs, grad_inputs)
        _merge_duplicates(graph, modes)
        _emit_grad_switches(graph, modes)
    graph.eliminate_dead_code()
    captured.recompile()
    return captured


def _calls(graph: Graph):
    return [n for n in graph.nodes if n.op == "call_function"]


def _drop_unused_constants(graph: Graph) -> None:
    """Tensor constants nothing reads: lift_fresh_copy + detach_ (in place, so kept by DCE)."""
    for node in _calls(graph):
        if node.target is aten.detach_.default and not node.users:
            source = node.args[0]
            if source.target is aten.lift_fresh_copy.default and len(source.users) == 1:
                graph.erase_node(node)
                graph.erase_node(source)
    graph.eliminate_dead_code()


def _mutates(graph: Graph) -> bool:
    return any(
        isinstance(n.target, torch._ops.OpOverload)
        and n.target._schema.is_mutable
        and n.target is not aten.detach_.default
        for n in _calls(graph)
    )


def _grad_modes(graph: Graph) -> dict[Node, bool]:
    """The grad mode each operation was recorded under (the graph starts with grad enabled)."""
    modes, mode = {}, True
    for node in _calls(graph):
        if node.target is _SET_GRAD:
            mode = bool(node.args[0])
        else:
            modes[node] = mode
    return modes


def _meta(node) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _same_layout(a, b) -> bool:
    va, vb = _meta(a), _meta(b)
    return (
        va is not None
        and vb is not None
        and va.shape == vb.shape
        and va.dtype == vb.dtype
        and va.device == vb.device
        and va.stride() == vb.stride()
    )


def _droppable(node: Node, modes) -> bool:
    """
    A view made with grad enabled can be replaced by its input; one made without grad is
    detached from its input's autograd history, so only when nothing reads it with grad
    enabled (the graph's outputs count as read with grad enabled).
    """
    return modes[node] or all(
        u.op == "call_function" and not modes.get(u, True) for u in node.users
    )


def _drop_noop_views(graph: Graph, modes) -> None:
    for node in _calls(graph):
        if node.target is _SET_GRAD or not _droppable(node, modes):
            continue
        target, args = node.target, node.args
        if target in _VIEWS and _same_layout(args[0], node):
            node.replace_all_uses_with(args[0])
        elif target is aten.broadcast_tensors.default:
            for user in list(node.users):
                if user.target is operator.getitem:
                    source = args[0][user.args[1]]
                    if _same_layout(source, user) and _droppable(user, modes):
                        user.replace_all_uses_with(source)
        elif (
            target in (aten.mul.Tensor, aten.div.Tensor)
            and type(args[1]) in (int, float)
            and args[1] == 1
            and _same_layout(args[0], node)
        ):
            node.replace_all_uses_with(args[0])
        elif target is aten.detach.default and getattr(args[0], "target", None) is target:
            node.replace_all_uses_with(args[0])
    graph.eliminate_dead_code()


def _frozen(value):
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return value


def _merge_duplicates(graph: Graph, modes) -> None:
    """
    Identical pure operations that autograd does not record become one (merging recorded ones
    would add their gradients before the backward instead of after it: another rounding).
    """
    seen = {}
    for node in _calls(graph):
        if (
            node.target is _SET_GRAD
            or modes.get(node) is True
            or is_impure(node.target, args=node.args, kwargs=node.kwargs)
        ):
            continue
        key = (node.target, _frozen(node.args), _frozen(node.kwargs), modes[node])
        try:
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node


def _sum_before_neg(graph: Graph, modes) -> None:
    """``sum(neg(x))`` -> ``neg(sum(x))`` where the negation has no other reader."""
    for node in _calls(graph):
        source = node.args[0] if node.args else None
        if (
            node.target not in _SUMS
            or node.kwargs.get("dtype") is not None
            or not isinstance(source, Node)
            or source.target is not aten.neg.default
            or len(source.users) != 1
            or modes[source] != modes[node]
        ):
            continue
        with graph.inserting_after(node):
            negated = graph.call_function(aten.neg.default, (node,))
        negated.meta = dict(node.meta)
        modes[negated] = modes[node]
        node.replace_all_uses_with(negated, delete_user_cb=lambda u, n=negated: u is not n)
        node.args = (source.args[0], *node.args[1:])
        graph.erase_node(source)


def _is_view(node: Node) -> bool:
    """An operation whose output aliases an input (a view: made without grad, it still
    requires grad when its input does)."""
    target = node.target
    if target is operator.getitem:
        return True
    schema = getattr(target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _skip_unneeded_grad(graph: Graph, modes, differentiable_outputs, grad_inputs) -> None:
    """
    Operations run without grad unless a differentiable output depends on them through
    autograd and one of their inputs requires grad (``grad_inputs``: positions of the inputs
    that do, None for all); ``detach`` of a tensor that does not require grad is dropped.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if grad_inputs is not None:
        placeholders = [placeholders[i] for i in grad_inputs]
    tracks = set(placeholders)
    for node in _calls(graph):
        if node.target is _SET_GRAD or node.target is aten.detach.default:
            continue
        if (modes[node] or _is_view(node)) and any(i in tracks for i in node.all_input_nodes):
            tracks.add(node)
    outputs = graph.output_node().args[0]
    needed = {outputs[i] for i in differentiable_outputs if isinstance(outputs[i], Node)}
    for node in reversed(_calls(graph)):
        if node in needed and modes.get(node) and node.target is not aten.detach.default:
            needed.update(node.all_input_nodes)
    for node in list(modes):
        if node.target is aten.detach.default and node.args[0] not in tracks:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            del modes[node]
        elif node.target is aten.detach.default or not any(
            i in tracks for i in node.all_input_nodes
        ):
            modes[node] = None  # no input requires grad: the same under either mode
        elif node not in needed or node not in tracks:
            modes[node] = False


def _emit_grad_switches(graph: Graph, modes) -> None:
    """
    Replace the recorded grad-mode switches by one before each change of mode (operations
    whose mode is None run under whichever is current).
    """
    current = True
    for node in _calls(graph):
        if node.target is _SET_GRAD:
            if not node.users:
                graph.erase_node(node)
            continue
        mode = modes[node]
        if mode is not None and mode != current:
            with graph.inserting_before(node):
                graph.call_function(_SET_GRAD, (mode,))
            current = mode
