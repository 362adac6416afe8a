# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
Model sites summed out exactly inside the importance weights.

A model sample site marked ``infer={"enumerate": "parallel"}`` (e.g. by
:func:`pyro.infer.config_enumerate`) that the guide does not sample is *enumerated* in the wake
phase: ``EnumerateModel`` (Pyro's :class:`~pyro.poutine.enum_messenger.EnumMessenger` plus
checks) gives it every value of its support along a new dimension left of the plates and of the
particle plate, as :class:`~pyro.infer.TraceEnum_ELBO` allocates them. ``enumerated_log_p``
then sums those dimensions out, keeping the particle dimension and the batch plates, so that each
particle's model density is the marginal

.. math:: \log p(x, z^k) = \log \sum_e p(x, z^k, e)

per datapoint. A site the guide samples may depend on an enumerated site (its model
distribution's parameters do): its log-density then carries that site's dimension too, recorded
in ``infer["_dim_to_id"]`` as Pyro's enumeration records it for every downstream site, and it
is a factor of the same sum. An enumerated site outside a batch plate (a global one) thus sums
over the product of the factors along the plate: the weights are joint along it (see
``pyro_rws._weights``). Every estimator uses it unchanged. Where the factors of the enumerated
sites share one plate context (the usual per-datapoint discrete variable) the sum is one
log-sum-exp over their joint table; otherwise Pyro's tensor variable elimination
(:func:`pyro.ops.contract.contract_to_tensor`) contracts them, with a log-space einsum that is
stable in the gradient too (``einsum``). Scales and masks follow ``TraceEnum_ELBO``:
on the factors that touch an enumerated dimension the mask acts inside the sum and the (common)
scale outside; the subsample factor of the batch plates is taken out, as for every other site
(see ``pyro_rws._weights``).

The sleep phase does not enumerate: the model runs unconditioned and enumerated sites are
sampled like any other; the guide scores only its own sites. Its expectation is then that of the
marginal: :math:`\mathbb{E}_{p(x, z, e)} \log q(z | x) = \mathbb{E}_{p(x, z)} \log q(z | x)`.
"""

from __future__ import annotations

import functools
import math
import operator
from collections import OrderedDict
from collections.abc import Callable

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.einsum.util import Tensordot
from pyro.ops.rings import LogRing
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.runtime import _ENUM_ALLOCATOR
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from pyro.util import check_site_shape

from ._density import log_density

#: how to go without enumeration, for the NotImplementedErrors below
_INSTEAD = (
    "Mark it infer={'enumerate': 'parallel'} (without num_samples) to sum it out exactly, or "
    "remove the 'enumerate' flag and sample it from the guide."
)


def enumerated_site_error(name: str, infer: dict, role: str) -> NotImplementedError | None:
    """The error for an enumeration flag pyro_rws cannot honour, or None if it can."""
    how = infer.get("enumerate")
    if not how:
        return None
    if role == "guide":
        return NotImplementedError(
            f"guide site '{name}' is marked for enumeration (infer={{'enumerate': {how!r}}}). "
            "pyro_rws sums out enumerated sites in the model only: the guide must sample every "
            "site it has (AutoDiscreteParallel and config_enumerate(guide) are not supported). "
            "To sum the site out exactly, remove it from the guide and mark it in the model "
            "with infer={'enumerate': 'parallel'}; to sample it, remove the flag from the guide."
        )
    if how != "parallel":
        return NotImplementedError(
            f"model site '{name}' is marked for {how!r} enumeration; pyro_rws sums out only "
            f"parallel enumeration. {_INSTEAD}"
        )
    if infer.get("num_samples") is not None:
        return NotImplementedError(
            f"model site '{name}' is marked for Monte Carlo enumeration (num_samples="
            f"{infer['num_samples']}); pyro_rws supports exact parallel enumeration only. "
            + _INSTEAD
        )
    if infer.get("_markov_scope") is not None:
        return NotImplementedError(
            f"model site '{name}' is enumerated inside pyro.markov; pyro_rws does not "
            "recycle enumeration dimensions along Markov chains. Use a plain Python loop "
            "instead of pyro.markov (every step then gets its own dimension, which is exact but "
            "exponential in the chain length), or sample the chain from the guide."
        )
    return None


class EnumerateModel(EnumMessenger):
    """
    Parallel enumeration of the model's enumerated sites that the guide does not sample, placed
    inside ``poutine.replay`` (so it sees each site before the replay does). Sites replayed from
    the guide are not enumerated, but record the enumerated dims their distribution may depend
    on, as every other site does. Raises for enumeration it cannot sum out (sequential, Monte
    Carlo, inside ``pyro.markov``).

    :param int first_available_dim: the first dimension left of the plates and the particle
        plate.
    :param Trace guide_trace: the guide's trace; sites in it are replayed, never enumerated.
    """

    def __init__(self, first_available_dim: int, guide_trace: Trace):
        super().__init__(first_available_dim=first_available_dim)
        self.guide_trace = guide_trace
        self._active = False

    def __enter__(self):
        self._active = False
        return super().__enter__()

    # Until the first site to enumerate, there are no enumeration dims to track: the messages
    # pass untouched (EnumMessenger's bookkeeping per site, under ignore_jit_warnings, is a
    # tenth of a small model's step). From that site on, every site is tracked as usual.
    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        if not self._active:
            if not msg["infer"].get("enumerate") or msg["name"] in self.guide_trace.nodes:
                return
            self._active = True
        self._pyro_sample(msg)

    def _postprocess_message(self, msg) -> None:
        if self._active and msg["type"] == "sample":
            self._pyro_post_sample(msg)

    def _pyro_sample(self, msg) -> None:
        if msg["name"] in self.guide_trace.nodes:
            # replayed from the guide, never enumerated; but its distribution may depend on
            # enumerated sites upstream (a latent whose prior depends on an enumerated parent):
            # remember the enumerated dims in scope, which ``_pyro_post_sample`` records in
            # infer["_dim_to_id"] (of the guide's infer dict, which the replay hands the
            # model's site, as in TraceEnum_ELBO), so that the log-density's enumerated dims
            # are known and summed out with the others
            self._param_dims[msg["name"]] = _ENUM_ALLOCATOR.dim_to_id.copy()
            return
        if not msg["is_observed"] and not site_is_subsample(msg):
            error = enumerated_site_error(msg["name"], msg["infer"] or {}, "model")
            if error is not None:
                raise error
        super()._pyro_sample(msg)


# --------------------------------------------------------------------------------------------
# Log-space einsum with one shift for the whole product (an opt_einsum backend)
# --------------------------------------------------------------------------------------------
def einsum(equation: str, *operands: torch.Tensor) -> torch.Tensor:
    """
    ``log einsum(equation, *exp(operands))``, stable in value *and* gradient.

    Pyro's ``pyro.ops.einsum.torch_log`` shifts each operand by its own maximum, so the
    shifted product can underflow to below ``finfo.eps`` where the operands' maxima sit at
    different values of the summed variable (e.g. a prior far from the likelihood); its
    ``safe_log`` then clamps the gradient, which comes out too small (off by 20 % for the float32
    Gaussian mixture of tutorial 1, in ``TraceEnum_ELBO`` too). Here the operands are broadcast
    and added first and the sum is shifted by its joint maximum (``torch.logsumexp``).
    """
    inputs, output = equation.split("->")
    inputs = inputs.split(",")
    if len(inputs) == 1 and inputs[0] == output:
        return operands[0].clone()
    dims = output + "".join(sorted(set("".join(inputs)) - set(output)))
    total = None
    for spec, operand in zip(inputs, operands, strict=True):
        order = sorted(range(len(spec)), key=lambda i: dims.index(spec[i]))
        operand = operand.permute(*order)
        present = [spec[i] for i in order]
        operand = operand.reshape(
            [operand.shape[present.index(d)] if d in present else 1 for d in dims]
        )
        total = operand if total is None else total + operand
    summed = tuple(range(len(output), len(dims)))
    if not summed:
        return total
    return _logsumexp(total, summed)


def transpose(a: torch.Tensor, axes) -> torch.Tensor:
    return a.permute(axes)


tensordot = Tensordot(einsum)


class _LogRing(LogRing):
    """Pyro's log-space ring with the stable :func:`einsum` of this module as its backend."""

    _backend = __name__


def enumerate_model(model: Callable, guide_trace: Trace, plate_nesting: int, vectorized: bool):
    """``model`` under ``EnumerateModel``, allocating dims left of all plates."""
    first_dim = -(plate_nesting + (2 if vectorized else 1))
    return EnumerateModel(first_dim, guide_trace)(model)


def is_enumerated(trace: Trace) -> bool:
    """Whether the model trace holds an enumerated site."""
    return any(
        site["type"] == "sample" and site["infer"].get("_enumerate_dim") is not None
        for site in trace.nodes.values()
    )


def _common_scale(sites: list[dict], scale_divisor: float):
    for site in sites:
        if torch.is_tensor(site["scale"]) and site["scale"].dim():
            raise ValueError(
                f"site '{site['name']}' depends on an enumerated site and has a non-scalar "
                "poutine.scale; enumeration supports scalar scales only (as TraceEnum_ELBO)."
            )
    scales = {float(s["scale"]) for s in sites}
    if len(scales) != 1:
        names = sorted(s["name"] for s in sites)
        raise ValueError(
            f"sites {names} depend on the same enumerated site(s) but have different scales "
            f"{sorted(scales)}. The sum over an enumerated value is exact only if all its "
            "factors share one poutine.scale (as in TraceEnum_ELBO). A global enumerated site "
            "whose dependents sit in a subsampled plate has no unbiased minibatch estimate: "
            "train without subsampling, put the enumerated site inside the data plate, or "
            "sample it from the guide."
        )
    scale = sites[0]["scale"]
    return scale if scale_divisor == 1.0 else scale / scale_divisor


def enumerated_log_p(
    model_trace: Trace,
    sites: list[dict],
    *,
    plate_nesting: int,
    vectorized: bool,
    keep_plates: list[str],
    scale_divisor: float,
    key_of: Callable[[dict], tuple],
) -> tuple[list[tuple[tuple, torch.Tensor]], list[tuple[dict, torch.Tensor]]]:
    """
    The model's log-density of one enumerated trace, enumerated dimensions summed out.

    :param list sites: the model's sample sites (observed and latent).
    :param list keep_plates: names of the vectorized plates to keep (the particle plate and the
        vectorized batch plates).
    :param float scale_divisor: subsample factor taken out of every site's scale.
    :param key_of: maps a site to the counters of its sequential batch plates; sites are
        contracted separately for each key.
    :returns: ``(contracted, others)``: ``contracted`` holds ``(key, log_p)`` for the factors
        that touch an enumerated dimension, summed out, each of shape ``(K or 1,) + plate dims``
        (``plate_nesting`` dims after the particle dim) with every plate but ``keep_plates``
        summed; ``others`` holds ``(site, log_p)``, scaled and masked, for the remaining sites,
        to be reduced like those of a trace without enumeration.
    """
    P = plate_nesting + (1 if vectorized else 0)
    check_shapes = is_validation_enabled()
    keep = set(keep_plates)
    groups: dict[tuple, list] = {}  # key -> [(site, masked unscaled log_p, ordinal)]
    enum_dims, others = set(), []
    for site in sites:
        log_p = log_density(site)
        if check_shapes:
            site["log_prob"] = log_p
            check_site_shape(site, P)
        allowed = site["infer"].get("_dim_to_id", {})
        extra = [d for d in range(-log_p.dim(), -P) if log_p.shape[d] > 1]
        if any(d not in allowed for d in extra):
            raise ValueError(
                f"site '{site['name']}' has log_prob of shape {tuple(log_p.shape)}, with batch "
                "dimensions that are neither plates nor enumerated sites "
                f"(max_plate_nesting={plate_nesting}). Declare event dimensions with "
                ".to_event(), wrap batch dimensions in pyro.plate, or raise max_plate_nesting."
            )
        if not extra:
            scale = site["scale"] if scale_divisor == 1.0 else site["scale"] / scale_divisor
            others.append((site, scale_and_mask(log_p, scale, site["mask"])))
            continue
        enum_dims.update(extra)
        # as TraceEnum_ELBO: the mask of a factor inside the sum over enumerated values, the
        # common scale outside; an enumerated site's own density unmasked
        if site["infer"].get("_enumerate_dim") is None:
            log_p = scale_and_mask(log_p, mask=site["mask"])
        ordinal = frozenset(f.name for f in site["cond_indep_stack"] if f.vectorized)
        groups.setdefault(key_of(site), []).append((site, log_p, ordinal))

    contracted = []
    for key, group in groups.items():
        factor_sites = [site for site, _, _ in group]
        ordinals = {ordinal for _, _, ordinal in group}
        sizes = {f.name: f.size for s in factor_sites for f in s["cond_indep_stack"]}
        target = frozenset(name for name in keep if name in sizes)
        group_dims = {d for _, lp, _ in group for d in range(-lp.dim(), -P) if lp.shape[d] > 1}
        if ordinals == {target} and len(group_dims) <= 2:
            # one plate context, at most two enumerated dims: one log-sum-exp over their joint
            # table, no contraction planning
            total = functools.reduce(operator.add, [lp for _, lp, _ in group])
            term = _logsumexp(total, tuple(range(total.dim() - P)))
        else:
            term = _contract(model_trace, factor_sites, group, enum_dims, keep, P)
        scale = _common_scale(factor_sites, scale_divisor)
        term = term * scale if not (isinstance(scale, float) and scale == 1.0) else term
        term = term.reshape((1,) * (P - term.dim()) + term.shape)
        contracted.append((key, term if vectorized else term.unsqueeze(0)))
    return contracted, others


def _logsumexp(total: torch.Tensor, dims: tuple) -> torch.Tensor:
    """``torch.logsumexp``, with a zero (not NaN) gradient where every term is -inf."""
    lowest = torch.finfo(total.dtype).min
    result = torch.logsumexp(total.clamp(min=lowest), dims)
    return result.masked_fill(result < lowest / 2, -math.inf)


def _contract(model_trace, factor_sites, group, enum_dims, keep, P) -> torch.Tensor:
    """The general case: Pyro's tensor variable elimination (plates nested in the kept ones,
    or many enumerated sites), with the log-space :func:`einsum` of this module."""
    model_trace.symbolize_dims()
    plate_to_symbol = model_trace.plate_to_symbol
    target = frozenset(plate_to_symbol[name] for name in keep if name in plate_to_symbol)
    dim_to_size = {
        plate_to_symbol[f.name]: f.size
        for site in factor_sites
        for f in site["cond_indep_stack"]
        if f.vectorized
    }
    factors, sum_dims = OrderedDict(), set()
    for site, log_p, _ in group:
        dim_to_symbol = site["infer"]["_dim_to_symbol"]
        sum_dims.update(dim_to_symbol[d] for d in enum_dims if d in dim_to_symbol)
        ordinal = frozenset(
            plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
        )
        factors.setdefault(ordinal, []).append(packed.pack(log_p, dim_to_symbol))
    term = contract_to_tensor(
        factors, sum_dims, target_ordinal=target, ring=_LogRing(dim_to_size=dim_to_size)
    )
    return packed.unpack(term, model_trace.symbol_to_dim)
