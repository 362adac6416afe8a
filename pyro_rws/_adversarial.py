# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
What the adversarial losses share: the discriminator's registration and the side being trained,
the two objectives from one backward pass, the model's unconditioned run and its checks. The
algorithms and their math are in :mod:`pyro_rws.adversarial`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from pyro.infer.elbo import ELBOModule
from pyro.infer.util import is_validation_enabled
from pyro.nn import PyroModule
from pyro.params.param_store import _MODULE_NAMESPACE_DIVIDER
from pyro.poutine.trace_struct import Trace
from pyro.util import warn_if_nan
from torch.func import functional_call

from ._base import Loss
from ._fantasy import is_fantasy
from ._sleep import Uncondition, reject_factors
from ._structure import is_model_latent

UPDATES = ("both", "generator", "discriminator")


@dataclass
class AdversarialStats:
    r"""
    The terms of one step of an adversarial loss, as detached 0-d tensors.

    :ivar loss: the value the loss returned (equal to ``discriminator``).
    :ivar discriminator: the discriminator's cross-entropy :math:`\mathcal{L}_D`.
    :ivar generator: the generator's (and encoder's) flipped-label cross-entropy.
    :ivar d_data: mean probability :math:`\sigma D` the discriminator gives data pairs.
    :ivar d_model: mean probability :math:`\sigma D` the discriminator gives model pairs.
    """

    loss: torch.Tensor
    discriminator: torch.Tensor
    generator: torch.Tensor
    d_data: torch.Tensor
    d_model: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        """Every term as a float (one device synchronization), for logging."""
        names = ("loss", "discriminator", "generator", "d_data", "d_model")
        values = torch.stack([getattr(self, n).detach().double().reshape(()) for n in names])
        return dict(zip(names, values.tolist(), strict=True))


def _blocking_params(block: bool):
    """Hide ``pyro.param`` sites from outer handlers (SVI's capture), so SVI does not step them."""
    return poutine.block(hide_types=["param"]) if block else contextlib.nullcontext()


def _detach(value):
    if isinstance(value, dict):
        return {name: v.detach() for name, v in value.items()}
    return value.detach()


def _pack(values: dict[str, torch.Tensor]):
    """One site: its tensor. Several: the dict ``{site name: value}`` in the order sampled."""
    return next(iter(values.values())) if len(values) == 1 else values


def _check_rsample(trace: Trace, names, role: str) -> None:
    for name in names:
        fn = trace.nodes[name]["fn"]
        if not getattr(fn, "has_rsample", False):
            raise ValueError(
                f"{role} site '{name}' is sampled from {type(fn).__name__}, which has no "
                "reparameterized sampler (has_rsample=False). Adversarial losses differentiate "
                "the discriminator's output through the samples: use a reparameterizable "
                "distribution (e.g. Normal, Delta of a network output, or "
                "RelaxedBernoulliStraightThrough / RelaxedOneHotCategoricalStraightThrough for "
                "discrete variables)."
            )


def _check_shapes(role: str, data: dict, model: dict, data_role: str) -> None:
    for name in data:
        if data[name].shape != model[name].shape:
            raise ValueError(
                f"{role} site '{name}' has shape {tuple(data[name].shape)} in the data pairs "
                f"({data_role}) but {tuple(model[name].shape)} in the model pairs. The "
                "discriminator compares them pair by pair: the guide must subsample the same "
                "plates as the model (the model replays the guide's minibatch)."
            )


class AdversarialLoss(Loss):
    """
    Shared machinery of :class:`~pyro_rws.BiGAN` and :class:`~pyro_rws.GAN` (not used directly).

    :param torch.nn.Module discriminator: returns one logit per pair (any shape; the objectives
        average over all of its elements).
    :param str update: ``"both"`` (default), ``"generator"`` or ``"discriminator"``.
    :param str discriminator_name: the name under which the discriminator is registered with
        :func:`pyro.module` at every call.
    :param bool retain_graph: passed to ``backward`` in ``loss_and_grads``.
    """

    #: whether the discriminator sees the latents, ``D(x, z)``, or the data alone, ``D(x)``.
    joint: bool = True

    def __init__(
        self,
        discriminator: torch.nn.Module,
        update: str = "both",
        *,
        discriminator_name: str = "discriminator",
        retain_graph: bool | None = None,
    ):
        super().__init__(retain_graph=retain_graph)
        kind = type(self).__name__
        if discriminator is None:
            raise TypeError(
                f"{kind} needs a discriminator: a torch.nn.Module returning one logit per pair, "
                f"e.g. {kind}(discriminator=MyDiscriminator())"
            )
        if not isinstance(discriminator, torch.nn.Module):
            raise TypeError(
                f"{kind}'s discriminator must be a torch.nn.Module (its parameters are "
                f"registered with pyro.module and trained), got {type(discriminator).__name__}. "
                "Wrap a function in a torch.nn.Module subclass."
            )
        if isinstance(discriminator, PyroModule):
            raise TypeError(
                f"{kind}'s discriminator must be a plain torch.nn.Module, not a PyroModule: the "
                "loss registers its parameters with pyro.module and evaluates it with "
                "torch.func.functional_call, which PyroModule's parameter handling does not "
                "support. Use torch.nn.Module as its base class."
            )
        if not isinstance(discriminator_name, str) or not discriminator_name:
            raise TypeError(
                f"discriminator_name must be a non-empty str, got {discriminator_name!r}"
            )
        if _MODULE_NAMESPACE_DIVIDER in discriminator_name:
            raise ValueError(
                f"discriminator_name must not contain {_MODULE_NAMESPACE_DIVIDER!r}, got "
                f"{discriminator_name!r}"
            )
        self.discriminator = discriminator
        self.discriminator_name = discriminator_name
        self.update = update

    @property
    def update(self) -> str:
        """
        Which side the next step trains: ``"both"``, ``"generator"`` (model and guide
        parameters) or ``"discriminator"``. May be changed between steps. The side left out gets
        no gradient and its parameters are not seen by :class:`~pyro.infer.SVI`, so SVI's
        optimizer leaves them (and their Adam moments) untouched.
        """
        return self._update

    @update.setter
    def update(self, value: str) -> None:
        if value not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {value!r}")
        self._update = value

    def __call__(self, model: Callable, guide: Callable | None = None) -> ELBOModule:
        """
        A :class:`torch.nn.Module` whose ``forward(*args, **kwargs)`` is
        :meth:`differentiable_loss`, with the discriminator as a submodule, so that its
        ``parameters()`` include the discriminator's as well as those of model and guide (see
        :class:`~pyro_rws._base.WakeSleepLoss`).
        """
        module = super().__call__(model, guide)
        module.discriminator = self.discriminator
        return module

    # ----------------------------------------------------------------------------------------
    def _terms(self, model, guide, args, kwargs):
        train_d = self.update != "generator"
        train_g = self.update != "discriminator"
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and train_g), _blocking_params(not train_g):
            data, fake = self._pairs(model, guide, args, kwargs)
        with _blocking_params(not train_d):
            disc = pyro.module(self.discriminator_name, self.discriminator)

        surrogate = 0.0
        logits = None
        if train_d or not grad:  # plain D on detached pairs: grads to D only
            logits = self._logits(disc, _detach_pair(data), _detach_pair(fake))
            surrogate = surrogate + _objectives(*logits, self.joint)[0]
        if train_g and grad:  # D with detached parameters on attached pairs: grads to G, E only
            frozen = {name: p.detach() for name, p in disc.named_parameters()}

            def frozen_disc(*inputs):
                return functional_call(disc, frozen, inputs)

            g_logits = self._logits(frozen_disc, data, fake)
            surrogate = surrogate + _objectives(*g_logits, self.joint)[1]
            logits = g_logits if logits is None else logits

        l_data, l_fake = (lg.detach() for lg in logits)
        d_loss, g_loss = _objectives(l_data, l_fake, self.joint)
        stats = AdversarialStats(
            loss=d_loss,
            discriminator=d_loss,
            generator=g_loss,
            d_data=torch.sigmoid(l_data).mean(),
            d_model=torch.sigmoid(l_fake).mean(),
        )
        if is_validation_enabled() and torch.is_tensor(surrogate):
            warn_if_nan(surrogate, f"{type(self).__name__} surrogate loss")
        return d_loss, surrogate, stats

    def _logits(self, disc, data: tuple, fake: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        out = disc(*data), disc(*fake)
        for o in out:
            if not (torch.is_tensor(o) and o.is_floating_point()):
                raise TypeError(
                    "the discriminator must return a floating-point tensor of logits (one per "
                    f"pair), got {type(o).__name__}"
                    + (f" of dtype {o.dtype}" if torch.is_tensor(o) else "")
                )
        return out

    def _model_trace(self, model, args, kwargs, minibatch: Trace | None):
        """Run the model once, unconditioned: z ~ p(z), x~ ~ p(x|z); the data stay in infer."""
        if minibatch is not None:
            model = poutine.replay(model, trace=minibatch)
        trace = poutine.trace(Uncondition()(model)).get_trace(*args, **kwargs)
        reject_factors(trace, type(self).__name__, "Write the model as a sampling program.")
        observed = [name for name, site in trace.nodes.items() if is_fantasy(site)]
        if not observed:
            raise ValueError(
                f"{type(self).__name__} found no observed site with data in the model: it "
                "compares the model's observed sites (pyro.sample(..., obs=data)) with their "
                "data, and none has an obs= value (was obs=None, or is the output recorded with "
                "pyro.deterministic, which is not data?). Observe the generator's output, e.g. "
                "pyro.sample('x', dist.Delta(net(z), event_dim=1), obs=data) for an implicit "
                "generator, or pyro.sample('x', dist.Normal(net(z), s).to_event(1), obs=data)."
            )
        latents = [name for name, site in trace.nodes.items() if is_model_latent(site)]
        _check_rsample(trace, observed + latents, "model")
        x_data = {name: trace.nodes[name]["infer"]["obs"] for name in observed}
        x_fake = {name: trace.nodes[name]["value"] for name in observed}
        _check_shapes("observed", x_data, x_fake, "the obs= data")
        return trace, latents, x_data, x_fake

    def _pairs(self, model, guide, args, kwargs):
        raise NotImplementedError


def _detach_pair(pair: tuple) -> tuple:
    return tuple(_detach(v) for v in pair)


def _objectives(l_data, l_fake, joint: bool):
    """(discriminator BCE, flipped-label BCE); -log sigma(l) = softplus(-l)."""
    d_loss = F.softplus(-l_data).mean() + F.softplus(l_fake).mean()
    g_loss = F.softplus(-l_fake).mean()
    if joint:
        g_loss = g_loss + F.softplus(l_data).mean()
    return d_loss, g_loss
