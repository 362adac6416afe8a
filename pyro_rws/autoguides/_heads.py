# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The per-address proposal heads of :class:`~pyro_rws.AutoAmortizedProposal` (see
:mod:`pyro_rws.autoguides.proposal` for the math): the family chosen from the prior's support
(categorical or Bernoulli logits; a Normal, a mixture of Normals or the conditional flow of
:class:`~pyro_rws.AutoAmortizedFlow` on the unconstrained space, pushed through
``biject_to(support)``), and the support helpers they use.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import biject_to, constraints


def _key(name: str) -> str:
    """A module-dict key for a site name ('.' is not allowed in module names)."""
    return "site_" + name.replace(".", "\u2024")


def _unwrap(fn):
    """The distribution under plate expansion and masking."""
    while isinstance(fn, (dist.MaskedDistribution, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def head_prior(prior):
    """
    The distribution a head is built for: the prior under plate expansion and masking, or the
    prior itself where unwrapping would change its event shape (a ``to_event`` of an expanded
    distribution).
    """
    fn = _unwrap(prior)
    return prior if fn.event_shape != prior.event_shape else fn


def _base_support(support):
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support


def _num_categories(fn) -> int | None:
    """K for a support ``integer_interval(0, K-1)`` with a fixed K, else None."""
    support = _base_support(fn.support)
    if not isinstance(support, constraints.integer_interval) or support.lower_bound != 0:
        return None
    upper = support.upper_bound
    if torch.is_tensor(upper):
        if upper.numel() != 1 and not bool((upper == upper.reshape(-1)[0]).all()):
            return None
        upper = upper.reshape(-1)[0].item()
    return int(upper) + 1


def signature(fn) -> tuple:
    """
    What a head is built for: ``(family, event shape, categories or unconstrained shape)``, the
    family of a continuous site naming the class of its support (real, greater-than, interval,
    simplex, ...). Sites that share an address must agree on it.
    """
    support = fn.support
    if _base_support(support) is constraints.boolean:
        return ("bernoulli", tuple(fn.event_shape), None)
    k = _num_categories(fn)
    if k is not None:
        return ("categorical", tuple(fn.event_shape), k)
    if not support.is_discrete and _has_bijection(support):
        unconstrained = tuple(biject_to(support).inverse_shape(fn.event_shape))
        kind = type(_base_support(support)).__name__.strip("_").lower()  # real, greaterthan, ...
        return (f"continuous ({kind})", tuple(fn.event_shape), unconstrained)
    return ("prior", tuple(fn.event_shape), None)


class _Head(nn.Module):
    """The proposal of one address: its address embedding, value embedding and output layer."""

    def __init__(
        self, fn, in_dim: int, address_dim: int, value_dim: int, num_components: int, flow: bool
    ):
        super().__init__()
        self.local: tuple = ()  # (observed site, event dim, width) fed per plate element
        self.plates: frozenset = frozenset()  # the model plates of the sites it proposes
        self.signature = signature(fn)
        self.address = nn.Parameter(0.1 * torch.randn(address_dim))
        self.event_shape = tuple(fn.event_shape)
        self.event_numel = math.prod(self.event_shape)
        self.num_categories = _num_categories(fn)
        support = fn.support
        if _base_support(support) is constraints.boolean:
            self.kind, out = "bernoulli", self.event_numel
            self.value = nn.Linear(self.event_numel, value_dim)
        elif self.num_categories is not None:
            self.kind, out = "categorical", self.event_numel * self.num_categories
            self.value = nn.Embedding(self.num_categories, value_dim)
        elif not support.is_discrete and _has_bijection(support):
            self.kind = "continuous"
            self.unconstrained = tuple(biject_to(support).inverse_shape(fn.event_shape))
            self.dim = math.prod(self.unconstrained)
            self.num_components = num_components
            mix = num_components if num_components > 1 else 0
            out = 0 if flow else mix + 2 * num_components * self.dim
            self.value = nn.Linear(self.dim, value_dim)
            self.relative = _relative_to_prior(fn)
            if flow:  # the conditional flow of AutoAmortizedFlow (a spline for a scalar site)
                from .flow import _SiteFlow

                self.flow = _SiteFlow(self.dim, in_dim, 2, [in_dim, in_dim])
        else:
            self.kind, out = "prior", 0
            self.value = nn.Linear(self.event_numel, value_dim)
        self.out = nn.Linear(in_dim, out) if out else None
        if self.out is not None:  # start near the prior's scale, not at random sizes
            nn.init.normal_(self.out.weight, std=0.01)
            nn.init.zeros_(self.out.bias)

    def check(self, name: str, address: str, prior, plates: frozenset) -> None:
        """Sites of one address need the same proposal family, shapes and model plates."""
        fn = _unwrap(prior)
        found = signature(head_prior(prior))
        if found != self.signature or plates != self.plates:
            raise ValueError(
                f"site '{name}' is mapped to the address '{address}', whose proposal was built "
                f"for a prior with (family, event shape, categories or unconstrained shape) = "
                f"{self.signature} in plates {sorted(self.plates)}, but its prior "
                f"{type(fn).__name__} has {found} in plates {sorted(plates)}. Sites that share "
                "an address must have priors of the same support and size: map this site to "
                "another address (e.g. include the size in the address)."
            )

    def proposal(self, features: torch.Tensor, prior):
        """The proposal distribution, batch shape broadcast with the prior's."""
        batch = _broadcast(features.shape[:-1], prior.batch_shape)
        if self.kind == "prior":
            return prior
        if self.kind == "continuous" and self.out is None:
            return self._flow(features, prior).expand(batch)
        raw = self.out(features)
        lead = raw.shape[:-1]
        if self.kind == "bernoulli":
            q = dist.Bernoulli(logits=raw.reshape(lead + self.event_shape), validate_args=False)
        elif self.kind == "categorical":
            logits = raw.reshape(lead + self.event_shape + (self.num_categories,))
            q = dist.Categorical(logits=logits, validate_args=False)
        else:
            q = self._continuous(raw, prior)
        if self.kind != "continuous":
            q = q.to_event(len(self.event_shape))
        return q if q.batch_shape == batch else q.expand(batch)

    def _continuous(self, raw: torch.Tensor, prior):
        lead, k, d = raw.shape[:-1], self.num_components, self.dim
        mix = raw[..., : k if k > 1 else 0]
        loc, scale = raw[..., mix.shape[-1] :].reshape(lead + (k, 2, d)).unbind(-2)
        scale = nn.functional.softplus(scale + 0.5413) + 1e-4  # softplus(0.5413) = 1
        if self.relative:
            batch = prior.batch_shape
            mean = prior.mean.detach().reshape(batch + (1, d))
            std = prior.stddev.detach().reshape(batch + (1, d))
            loc, scale = mean + std * loc, std * scale
        scalar = self.unconstrained == ()
        if scalar:  # lead + (k,)
            loc, scale = loc.squeeze(-1), scale.squeeze(-1)
        if k == 1:
            loc, scale = loc.squeeze(-1 if scalar else -2), scale.squeeze(-1 if scalar else -2)
        base = dist.Normal(loc, scale, validate_args=False)
        base = base if scalar else base.to_event(1)
        if k > 1:
            base = dist.MixtureSameFamily(
                dist.Categorical(logits=mix, validate_args=False), base, validate_args=False
            )
        transforms = []
        if not scalar and self.unconstrained != (d,):
            transforms.append(dist.transforms.ReshapeTransform((d,), self.unconstrained))
        if not _is_real(prior.support):
            transforms.append(biject_to(prior.support))
        return dist.TransformedDistribution(base, transforms) if transforms else base

    def _flow(self, features: torch.Tensor, prior):
        d = self.dim
        base = dist.Normal(features.new_zeros(d), 1.0, validate_args=False)
        base = base.expand(features.shape[:-1] + (d,)).to_event(1)
        transforms = self.flow.transforms(features)
        if self.relative:
            batch = prior.batch_shape
            mean = prior.mean.detach().reshape(batch + (d,))
            std = prior.stddev.detach().reshape(batch + (d,))
            transforms.append(dist.transforms.AffineTransform(mean, std, event_dim=1))
        if self.unconstrained != (d,):
            transforms.append(dist.transforms.ReshapeTransform((d,), self.unconstrained))
        if not _is_real(prior.support):
            transforms.append(biject_to(prior.support))
        return dist.TransformedDistribution(base, transforms)

    def embed_value(self, value: torch.Tensor, prior, dtype) -> torch.Tensor:
        """``v_a(z)``: shape ``batch + (value_dim,)``."""
        batch = value.shape[: value.dim() - len(prior.event_shape)]
        if self.kind == "categorical":
            return self.value(value.long().reshape(batch + (-1,))).mean(-2)
        if self.kind == "continuous":
            value = biject_to(prior.support).inv(value)
        flat = value.to(dtype).reshape(batch + (-1,))
        return self.value(torch.nan_to_num(flat, posinf=1e4, neginf=-1e4))


def _broadcast(a: tuple, b: tuple) -> torch.Size:
    """``torch.broadcast_shapes`` of two shapes (without its cost on a per-site path)."""
    if a == b:
        return torch.Size(a)
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    return torch.Size(x if y == 1 else y for x, y in zip(a, b, strict=True))


def _is_real(support) -> bool:
    """The real line or real vectors: the proposal needs no bijection."""
    return support is constraints.real or (
        isinstance(support, constraints.independent) and support.base_constraint is constraints.real
    )


def _has_bijection(support) -> bool:
    try:
        biject_to(support)
    except NotImplementedError:
        return False
    return True


def _relative_to_prior(fn) -> bool:
    """A real-line prior with finite mean and standard deviation (checked once, at creation)."""
    if not _is_real(fn.support):
        return False
    try:
        mean, std = fn.mean, fn.stddev
    except NotImplementedError:
        return False
    return bool(torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all())
