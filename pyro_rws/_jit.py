# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
How a step is compiled: the eager run that finds the parameters, the recording of the step as
a graph of ATen operations, the graph keys and their cache, and the :class:`_JitMixin` that puts
them around a loss's ``_terms``. The compiled classes and what they promise are in
:mod:`pyro_rws.jit`.
"""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from dataclasses import fields

import pyro
import torch
from pyro.distributions import constraints
from pyro.infer.util import is_validation_enabled
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.util import warn_if_nan
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree

from ._codegen import same_operations, straight_line
from ._fx import _mutates, simplify
from .diagnostics import StepStats

#: loss settings that change the recorded graph (read with getattr; missing ones are None)
_SETTINGS = (
    "num_particles",
    "max_plate_nesting",
    "vectorize_particles",
    "insomnia",
    "model_has_params",
    "num_sleep_particles",
    "phase_q",
    "dreg",
)
_STATS_FIELDS = tuple(f.name for f in fields(StepStats) if f.name != "num_particles")
# what make_fx says when a program reads a tensor's value while it is being recorded
_DATA_DEPENDENT = ("get value out of a tracing tensor", "data-dependent", "data dependent")


class _Recorder(TorchFunctionMode):
    """Records, during one eager run, the tensors torch functions read and the ones they made."""

    def __init__(self):
        super().__init__()
        self.seen: dict[int, torch.Tensor] = {}
        self.made: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in _pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                self.seen.setdefault(id(t), t)
        out = func(*args, **kwargs)
        for t in _pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in self.seen:
                self.made.add(id(t))
        return out


def _flatten(args, kwargs):
    """Leaves and structure of the arguments (a fast path for tensors only, no keywords)."""
    if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
        return list(args), len(args)
    return _pytree.tree_flatten((args, kwargs))


def _unflatten(leaves, spec):
    if isinstance(spec, int):
        return tuple(leaves), {}
    return _pytree.tree_unflatten(leaves, spec)


def _identity(fn):
    """What identifies a model or guide: a bound method by its object and function."""
    owner = getattr(fn, "__self__", None)
    if owner is not None and hasattr(fn, "__func__"):
        return (id(owner), fn.__func__), owner
    return id(fn), fn


def _static(value, refs: list):
    """A non-tensor argument as part of a graph key (unhashable ones by identity)."""
    try:
        hash(value)
    except TypeError:
        refs.append(value)
        return ("id", id(value))
    return (type(value), value)


def _rng_state(devices):
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state, devices):
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1], strict=True):
        torch.cuda.set_rng_state(s, d)


class _Graph:
    """One recorded step: the compiled function and how to feed it and read its outputs."""

    def __init__(self, compiled, store_names, other_params, layout, refs):
        self.compiled = compiled
        self.store_names = store_names
        self.other_params = other_params
        self.layout = layout
        self.refs = refs  # keeps model, guide, handlers alive so that their ids stay unique
        self.captured = None
        self.no_grad = None  # what runs without gradients (loss())
        self.param_shapes = None
        self.last_params = None

    def params(self) -> list[torch.Tensor] | None:
        """The current parameters, or None if the param store no longer holds the same ones."""
        store = pyro.get_param_store()
        params = []
        if _PYRO_STACK and not all(_captures_params(h) for h in _PYRO_STACK):
            for name in self.store_names:
                if name not in store:
                    return None
                # through pyro.param, so that the handlers see the parameter
                params.append(pyro.param(name).unconstrained())
        elif _PYRO_STACK:
            # only SVI's parameter capture listens: the site pyro.param would add to its trace,
            # without the message passing (46 -> 27 us for the five parameters of an SBN)
            for name in self.store_names:
                if name not in store._params:
                    return None
                value = store[name]  # constrained, with .unconstrained
                site = _param_site(name, value, store)
                for handler in _PYRO_STACK:
                    handler.trace.add_node(name, **site)
                params.append(value.unconstrained())
        else:  # nobody to tell: read the store's unconstrained tensors directly
            unconstrained = store._params
            for name in self.store_names:
                p = unconstrained.get(name)
                if p is None:
                    return None
                params.append(p)
        params.extend(self.other_params)
        if self.last_params is not None and all(
            p is q for p, q in zip(params, self.last_params, strict=True)
        ):
            return params
        shapes = [(p.shape, p.dtype, p.device) for p in params]
        if self.param_shapes is None:
            self.param_shapes = shapes
        elif shapes != self.param_shapes:
            return None
        self.last_params = params
        return params

    def unpack(self, outputs):
        surrogate_is_tensor, surrogate, present, num_particles = self.layout
        outputs = list(outputs)
        value = outputs.pop(0)
        if surrogate_is_tensor:
            surrogate = outputs.pop(0)
        stats = StepStats(**dict(zip(present, outputs, strict=True)), num_particles=num_particles)
        return value, surrogate, stats


def _captures_params(handler) -> bool:
    """Whether ``handler`` is a ``poutine.trace(param_only=True)`` (SVI's parameter capture)."""
    return type(handler) is TraceMessenger and handler.param_only


def _param_site(name: str, value: torch.Tensor, store) -> dict:
    """The site of ``pyro.param(name)`` as a trace records it (``value``: the store's)."""
    kwargs = {"constraint": constraints.real, "event_dim": None}
    return dict(type="param", name=name, fn=store.get_param, is_observed=False, args=(name,),
                kwargs=kwargs, value=value, scale=1.0, mask=None, cond_indep_stack=(),
                done=True, stop=False, continuation=None, infer={})  # fmt: skip


def _is_cuda(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cuda"


class _JitMixin:
    """
    Compiles ``_terms`` of the loss it is mixed into (see :mod:`pyro_rws.jit`).

    :param bool ignore_jit_warnings: silence the warnings that model and guide raise while the
        step is recorded (as Pyro's ``ignore_jit_warnings``).
    :param dict jit_options: ``{"backend": None}`` (default) replays the recorded graph;
        ``{"backend": "inductor"}`` (or another :func:`torch.compile` backend) compiles it,
        the other keys being passed to :func:`torch.compile`.
    """

    #: graphs kept per loss instance (least recently used ones are dropped)
    max_graphs = 64

    def __init__(self, *args, ignore_jit_warnings: bool = False, jit_options=None, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.vectorize_particles:
            eager = next(b for b in type(self).__mro__ if not issubclass(b, _JitMixin))
            raise ValueError(
                f"{type(self).__name__} needs vectorize_particles=True: a compiled loss records "
                "one static program, while vectorize_particles=False exists for programs whose "
                f"structure differs between particles. Use the eager {eager.__name__} for those."
            )
        self.ignore_jit_warnings = bool(ignore_jit_warnings)
        self.jit_options = dict(jit_options or {})
        self._graphs: OrderedDict = OrderedDict()
        #: number of graphs recorded so far (a recompilation adds one)
        self.compile_count = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a signature for help() and Sphinx: the eager class's, plus the two jit arguments
        base = next(b for b in cls.__mro__[1:] if not issubclass(b, _JitMixin))
        params = list(inspect.signature(base.__init__).parameters.values())
        extra = [
            inspect.Parameter("ignore_jit_warnings", inspect.Parameter.KEYWORD_ONLY, default=False),
            inspect.Parameter("jit_options", inspect.Parameter.KEYWORD_ONLY, default=None),
        ]
        cls.__signature__ = inspect.Signature(params[1:] + extra)

    def _key(self, model, guide, spec, leaves):
        refs = []
        model_id, model_ref = _identity(model)
        guide_id, guide_ref = _identity(guide)
        refs += [model_ref, guide_ref]
        signature = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                signature.append((leaf.shape, leaf.dtype, leaf.device, leaf.requires_grad))
            else:
                signature.append(_static(leaf, refs))
        handlers = []
        for h in _PYRO_STACK:
            if isinstance(h, TraceMessenger) and h.param_only:
                continue  # SVI's parameter capture: it changes no value
            handlers.append(id(h))
            refs.append(h)
        settings = tuple(getattr(self, name, None) for name in _SETTINGS)
        fantasy_args = getattr(self, "fantasy_args", None)
        if fantasy_args is not None:
            settings += (_static(fantasy_args, refs),)
        key = (model_id, guide_id, spec, tuple(signature), tuple(handlers), settings)
        return key, refs

    def _terms(self, model, guide, args, kwargs):
        leaves, spec = _flatten(args, kwargs)
        key, refs = self._key(model, guide, spec, leaves)
        graph = self._graphs.get(key)
        params = None if graph is None else graph.params()
        if params is None:
            # recording runs the step twice: undo its draws, so the first call's replay draws
            # what the eager loss would for the same seed
            devices = sorted({t.device.index or 0 for t in leaves if _is_cuda(t)})
            state = _rng_state(devices)
            graph = self._record(model, guide, args, kwargs, leaves, spec, refs)
            _set_rng_state(state, devices)
            # the first run may have fixed settings (max_plate_nesting guessed): key again
            key, _ = self._key(model, guide, spec, leaves)
            self._graphs[key] = graph
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
            params = graph.params()
        self._graphs.move_to_end(key)
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        # the eager checks that name a site run with validation only: without it, loss() and
        # loss_and_grads() report a non-finite value from the float, as the eager loss does
        check = is_validation_enabled()
        if check:
            devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
            state = _rng_state(devices)
        grad_mode = torch.is_grad_enabled()
        run = graph.compiled if grad_mode else graph.no_grad
        try:
            value, surrogate, stats = graph.unpack(run(*params, *tensors))
        finally:
            torch._C._set_grad_enabled(grad_mode)  # the graph switches it around no_grad blocks
        if check and not bool(torch.isfinite(value)):
            # replay the same draws eagerly: its checks say which site went wrong
            _set_rng_state(state, devices)
            with torch.no_grad():
                super()._terms(model, guide, args, kwargs)
        if is_validation_enabled() and torch.is_tensor(surrogate):
            warn_if_nan(surrogate, f"{type(self).__name__} surrogate loss")
        return value, surrogate, stats

    def _compile(self, captured):
        """The captured graph itself (replayed op by op), or ``torch.compile`` of it."""
        options = dict(self.jit_options)
        backend = options.pop("backend", None)
        if backend is None:
            return captured
        if backend == "inductor":
            # random operations run as eager kernels (the draws can still come in another
            # order than in the eager loss)
            options["options"] = {"fallback_random": True, **options.get("options", {})}
        options.setdefault("dynamic", False)
        return torch.compile(captured, backend=backend, **options)

    def _record(self, model, guide, args, kwargs, leaves, spec, refs) -> _Graph:
        """Run the step once eagerly to find its parameters, then record it."""
        eager_terms = super()._terms
        arg_ids = {id(t) for t in leaves if isinstance(t, torch.Tensor)}
        # 1. an eager run (with the caller's validation) that creates parameters, guesses the
        # plate nesting and records which outside tensors requiring grad the step reads
        with torch.no_grad(), _Recorder() as recorder:
            eager_terms(model, guide, args, kwargs)
        store_ids = {id(u): name for name, u in pyro.get_param_store().named_parameters()}
        store_names, others = [], []
        for i, t in recorder.seen.items():
            if i in arg_ids or not t.requires_grad:
                continue
            if i in store_ids:
                store_names.append(store_ids[i])
            elif i not in recorder.made or isinstance(t, torch.nn.Parameter):
                others.append(t)
            # else computed in the step (e.g. a view of a parameter made under no_grad, which
            # is a leaf requiring grad): recorded, not an input
        store_names.sort()
        num_params = len(store_names) + len(others)
        tensor_positions = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
        layout = []

        def step(*inputs):
            flat = list(leaves)
            for pos, t in zip(tensor_positions, inputs[num_params:], strict=True):
                flat[pos] = t
            a, kw = _unflatten(flat, spec)
            value, surrogate, stats = eager_terms(model, guide, a, kw)
            present = [n for n in _STATS_FIELDS if torch.is_tensor(getattr(stats, n))]
            is_tensor = torch.is_tensor(surrogate)
            layout[:] = [is_tensor, None if is_tensor else surrogate, present, stats.num_particles]
            outputs = [value] + ([surrogate] if is_tensor else [])
            return tuple(outputs + [getattr(stats, n) for n in present])

        graph = _Graph(None, store_names, others, None, refs)
        params = graph.params()
        example = tuple(params) + tuple(leaves[i] for i in tensor_positions)
        try:
            with pyro.validation_enabled(False), warnings.catch_warnings():
                if self.ignore_jit_warnings:
                    warnings.simplefilter("ignore")
                with torch.enable_grad():
                    captured = make_fx(step, pre_dispatch=True)(*example)
        except RuntimeError as e:
            if not any(m in str(e) for m in _DATA_DEPENDENT):
                raise
            raise NotImplementedError(
                f"{type(self).__name__}: while recording the step, model or guide read the "
                "value of a tensor (bool(), .item(), int(), if/while on a tensor ...). A "
                "compiled step replays tensor operations only, so control flow that depends on "
                "a value cannot be recorded. Compiled losses need static structure: use the "
                f"eager class for programs with stochastic control flow. ({e})"
            ) from e
        for node in captured.graph.nodes:
            if node.op == "get_attr":
                constant = getattr(captured, node.target)
                if isinstance(constant, torch.Tensor) and constant.requires_grad:
                    raise ValueError(
                        f"{type(self).__name__}: model or guide reads a tensor that requires "
                        "grad but is neither an argument nor a parameter of the step "
                        "(pyro.param, pyro.module, or a leaf tensor such as an nn.Parameter), "
                        "e.g. a tensor computed from parameters outside the loss. The recorded "
                        "graph would treat it as a constant. Compute it inside model or guide, "
                        "or pass it as an argument."
                    )
        grad_inputs = [i for i, t in enumerate(example) if t.requires_grad]
        graph.captured = simplify(
            captured, differentiable_outputs=(1,) if layout[0] else (), grad_inputs=grad_inputs
        )
        compiled = self._compile(captured)
        if compiled is captured:
            # straight-line code (pyro_rws._codegen), checked against the graph on this step's
            # inputs: the public torch functions pick their overloads from the arguments (a
            # graph that mutates tensors is not run for a check: the overloads' own entries)
            mutates = _mutates(captured.graph)
            graph.compiled = straight_line(captured, public=not mutates)
            with torch.enable_grad():
                if not mutates and not same_operations(captured.forward, graph.compiled, example):
                    graph.compiled = straight_line(captured, public=False)
            graph.no_grad = graph.compiled
        else:
            # without gradients (loss()) the captured graph runs as is: no second compilation
            graph.compiled, graph.no_grad = compiled, captured.forward
        graph.layout = layout
        self.compile_count += 1
        return graph
