# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
A recorded step (see :mod:`pyro_rws.jit`, simplified by :mod:`pyro_rws._fx`) as one Python
function of straight-line code, which is how the default backend replays it.

A ``GraphModule``'s code calls each operation as ``torch.ops.aten.X.overload(...)``, whose
Python ``__call__`` costs a few microseconds before the C++ kernel is reached; on a small
program that is a tenth of a step. Here every operation is called through its C++ entry: the
public torch function (or tensor method) of its name, which parses its arguments and picks the
overload in C++, or, where there is none, the overload's own entry (``OpOverload._op``). The
public function picks its overload from the arguments, so the first replay is checked against
the graph (``same_operations``: the same operations reach the kernels, on the same shapes,
with the same outputs bit for bit, from the same random state); where it differs the overloads'
own entries are used, as they are, without a check, for a graph that mutates tensors (a
checking run would mutate them twice more). Intermediate tensors are released after their last
use, as in ``GraphModule``'s code, so the peak memory is the graph's.
"""

from __future__ import annotations

import math
import operator

import torch
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


def _public(target):
    """
    The public torch function (or tensor method) of an ATen operation, which parses its
    arguments in C++; None where there is none, or the operation mutates.
    """
    if target.namespace != "aten" or target._schema.is_mutable:
        return None
    name = target._schema.name.split("::", 1)[1]
    for namespace in _NAMESPACES:
        fn = getattr(namespace, name, None)
        if fn is not None:
            return fn
    return None


#: where the public functions of ATen operations live, by their ATen names
_NAMESPACES = (
    torch._C._VariableFunctions,
    torch._C._nn,
    torch._C._special,
    torch._C._linalg,
    torch._C._fft,
    torch._C.TensorBase,
)


def straight_line(captured: GraphModule, public: bool = True):
    """
    The graph of ``captured`` as one Python function of straight-line code that calls each
    operation's C++ entry directly (``public``: the torch function of its name, which picks the
    overload from the arguments; else the overload's own entry, ``OpOverload._op``), without
    ``torch.ops``' Python layer. Intermediate tensors are released after their last use, as in
    ``GraphModule``'s code. ``same_operations`` checks that a ``public`` version dispatches
    what the graph does.
    """
    graph = captured.graph
    env: dict = {}
    names: dict = {}

    def constant(value):
        key = f"c{len(env)}"
        env[key] = value
        return key

    def ref(a):
        if isinstance(a, Node):
            return names[a]
        if isinstance(a, list):
            return "[" + ", ".join(ref(b) for b in a) + "]"
        if isinstance(a, tuple):
            return "(" + "".join(ref(b) + ", " for b in a) + ")"
        if a is None or type(a) in (bool, int, str) or (type(a) is float and math.isfinite(a)):
            return repr(a)
        return constant(a)  # inf, nan, dtypes, devices, layouts, memory formats ...

    last_use: dict = {}
    for node in graph.nodes:
        for i in node.all_input_nodes:
            last_use[i] = node
    args, lines = [], []
    for i, node in enumerate(graph.nodes):
        names[node] = name = f"v{i}"
        if node.op == "placeholder":
            args.append(name)
            continue
        if node.op == "get_attr":
            names[node] = constant(getattr(captured, node.target))
            continue
        if node.op == "output":
            lines.append(f"return {ref(node.args[0])}")
            break
        target = node.target
        if target is operator.getitem and not node.kwargs:
            call = f"{ref(node.args[0])}[{ref(node.args[1])}]"
        else:
            if isinstance(target, torch._ops.OpOverload):
                target = (public and _public(target)) or target._op
            inputs = [ref(a) for a in node.args]
            inputs += [f"{k}={ref(v)}" for k, v in node.kwargs.items()]
            call = f"{constant(target)}({', '.join(inputs)})"
        lines.append(f"{name} = {call}" if node.users else call)
        dead = [
            names[n] for n in node.all_input_nodes if last_use[n] is node and n.op != "get_attr"
        ]
        if dead:
            lines.append(" = ".join(dict.fromkeys(dead)) + " = None")
    source = f"def forward({', '.join(args)}):\n" + "".join(f"    {line}\n" for line in lines)
    exec(compile(source, "<pyro_rws straight-line step>", "exec"), env)
    forward = env["forward"]
    forward.source = source
    return forward


class _Dispatched(TorchDispatchMode):
    """The operations that reach the dispatcher's kernels, with their outputs' shapes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(t.shape) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.calls.append((func, shapes))
        return out


def same_operations(first, second, inputs) -> bool:
    """
    Whether ``first(*inputs)`` and ``second(*inputs)`` dispatch the same operations on tensors of
    the same shapes and return the same outputs, bit for bit, from the same random state (which
    is restored afterwards). The grad mode is restored after each run.
    """
    results = []
    with torch.random.fork_rng(devices=_cuda_devices(inputs)):
        state = torch.random.get_rng_state()
        for fn in (first, second):
            torch.random.set_rng_state(state)
            grad_mode = torch.is_grad_enabled()
            try:
                with _Dispatched() as seen:
                    out = fn(*inputs)
            finally:
                torch._C._set_grad_enabled(grad_mode)
            results.append((seen.calls, pytree.tree_leaves(out)))
    (calls_a, out_a), (calls_b, out_b) = results
    return (
        calls_a == calls_b
        and len(out_a) == len(out_b)
        and all(
            type(a) is type(b)
            and (not isinstance(a, torch.Tensor) or _bitwise_equal(a, b))
            and (isinstance(a, torch.Tensor) or a == b)
            for a, b in zip(out_a, out_b, strict=True)
        )
    )


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and a.device == b.device
        and bool(((a == b) | (a.isnan() & b.isnan())).all())
    )


def _cuda_devices(inputs) -> list[int]:
    return sorted(
        {t.device.index or 0 for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda}
    )
