# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
Adversarially learned inference (BiGAN / ALI) and plain GANs as Pyro losses.

A discriminator :math:`D` (a :class:`torch.nn.Module` returning logits) tells *data pairs*
:math:`(x, \tilde z)`, :math:`x` from the data and :math:`\tilde z \sim q_\phi(z|x)` from the
guide (the encoder), from *model pairs* :math:`(\tilde x, z)`, :math:`z \sim p(z)` and
:math:`\tilde x \sim p_\theta(x|z)` from the model (the generator). With :math:`\sigma` the
logistic function and every expectation a mean over the pairs of the batch,

.. math::

    \mathcal{L}_D &= -\mathbb{E}\log\sigma D(x, \tilde z)
        - \mathbb{E}\log\bigl(1 - \sigma D(\tilde x, z)\bigr), \\
    \mathcal{L}_{\theta,\phi} &= -\mathbb{E}\log\bigl(1 - \sigma D(x, \tilde z)\bigr)
        - \mathbb{E}\log\sigma D(\tilde x, z).

:math:`\mathcal{L}_D` is the discriminator's binary cross-entropy (data pairs labelled 1);
:math:`\mathcal{L}_{\theta,\phi}` is the same cross-entropy with the labels flipped, the
non-saturating form of the generator's objective [3]. One backward pass through the surrogate

.. math::

    \mathcal{L}_D(\mathrm{sg}\,\text{pairs};\ \psi)
        + \mathcal{L}_{\theta,\phi}(\text{pairs};\ \mathrm{sg}\,\psi)

(sg: stop-gradient, :math:`\psi` the discriminator's parameters, the second term evaluated with
:func:`torch.func.functional_call`) gives :math:`\psi` the gradient of :math:`\mathcal{L}_D`
and the model and guide parameters :math:`\theta, \phi` the gradient of
:math:`\mathcal{L}_{\theta,\phi}`, reparameterized through the samples; neither leaks into the
other. :class:`BiGAN` (alias :class:`ALI`) is the joint form of [1, 2]; :class:`GAN` is the
form of [3] where the discriminator sees :math:`x` alone and there is no encoder.

Usage, with the discriminator on its own learning rate and parameters named
``"discriminator.<name in the module>"`` for Pyro's per-parameter optimizer arguments::

    bigan = BiGAN(discriminator)
    optim = pyro.optim.Adam(
        lambda name: {"lr": 4e-4 if name.startswith("discriminator.") else 1e-4,
                      "betas": (0.5, 0.999)}
    )
    svi = SVI(model, guide, optim, loss=bigan)
    for step in range(num_steps):
        svi.step(x)                       # both sides, from one backward pass
        print(bigan.stats.discriminator, bigan.stats.generator)

To update one side per step, as Edward's ``update(variables="Disc" | "Gen")``, switch
:attr:`~AdversarialLoss.update` between steps (``k`` discriminator steps per generator step)::

    bigan.update = "discriminator"
    for _ in range(k):
        svi.step(x)
    bigan.update = "generator"
    svi.step(x)

References

[1] `Adversarial Feature Learning`, Jeff Donahue, Philipp Krähenbühl, Trevor Darrell
    (ICLR 2017), arXiv:1605.09782

[2] `Adversarially Learned Inference`, Vincent Dumoulin, Ishmael Belghazi, Ben Poole, Olivier
    Mastropietro, Alex Lamb, Martin Arjovsky, Aaron Courville (ICLR 2017), arXiv:1606.00704

[3] `Generative Adversarial Networks`, Ian J. Goodfellow, Jean Pouget-Abadie, Mehdi Mirza,
    Bing Xu, David Warde-Farley, Sherjil Ozair, Aaron Courville, Yoshua Bengio (NeurIPS 2014),
    arXiv:1406.2661
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
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
from ._structure import check_model_guide_match, is_model_latent
from ._traces import subsample_sites

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
    Shared machinery of :class:`BiGAN` and :class:`GAN` (not used directly).

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


class BiGAN(AdversarialLoss):
    r"""
    Bidirectional GAN [1] / adversarially learned inference [2]: the model is a generator
    :math:`z \sim p(z)`, :math:`x \sim p_\theta(x|z)`, the guide an encoder
    :math:`q_\phi(z|x)`, and a discriminator :math:`D(x, z)` tells data pairs
    :math:`(x, \tilde z)`, :math:`\tilde z \sim q_\phi(z|x)`, from model pairs
    :math:`(\tilde x, z)`. Objectives, means over the pairs of the batch:

    .. math::

        \mathcal{L}_D &= -\mathbb{E}\log\sigma D(x, \tilde z)
            - \mathbb{E}\log\bigl(1 - \sigma D(\tilde x, z)\bigr), \\
        \mathcal{L}_{\theta,\phi} &= -\mathbb{E}\log\bigl(1 - \sigma D(x, \tilde z)\bigr)
            - \mathbb{E}\log\sigma D(\tilde x, z).

    The discriminator's parameters receive the gradient of :math:`\mathcal{L}_D` (pairs
    detached), model and guide parameters the gradient of the non-saturating
    :math:`\mathcal{L}_{\theta,\phi}` [3] (discriminator parameters detached), from one
    backward pass of ``loss_and_grads`` or of the tensor ``differentiable_loss`` returns.

    **Model and guide.** The model samples every latent from its prior and the data from the
    generator at observed sites, ``pyro.sample("x", d, obs=data)``, where ``d`` has ``rsample``:
    ``dist.Normal(net(z), s).to_event(1)``, or ``dist.Delta(net(z, eps), event_dim=1)`` for an
    implicit generator. The model runs once per step under :func:`~pyro.poutine.uncondition`:
    the sampled values are the model pairs' :math:`\tilde x` and :math:`z`, the ``obs=`` values
    the data. The guide runs once on the caller's arguments, giving :math:`\tilde z`. Every
    sample that reaches the discriminator must be reparameterized, or a :class:`ValueError`
    says which site is not. ``pyro.deterministic`` sites are records, never data.

    **What the discriminator sees.** ``discriminator(x, z)``: ``x`` is the value of the model's
    observed site (a dict ``{site name: value}`` if there are several), ``z`` the value of the
    latent site (a dict if several), in data pairs and model pairs alike. Model latents not
    named in ``latent_sites`` are generator noise: resampled in the model, never shown to the
    discriminator, not needed in the guide. The guide must sample every site in
    ``latent_sites`` (guide-only variables need ``infer={"is_auxiliary": True}``).

    **Batches.** Under ``pyro.plate("data", N)`` each datapoint makes one data pair and one
    model pair. Subsample in the guide as well as the model (as for any Pyro loss): the model
    replays the guide's minibatch. The objectives are means over pairs, so subsampling scales
    do not enter and the minibatch estimate is unbiased; nor do ``poutine.scale`` or masks.

    **Value.** :meth:`loss` and ``loss_and_grads`` return :math:`\mathcal{L}_D`, the
    discriminator's cross-entropy (a sum of two means), whatever :attr:`update` is. A
    discriminator that cannot tell the pairs apart (:math:`\sigma D = 1/2`) gives
    :math:`\log 4 \approx 1.386`; near 0 the discriminator wins, large values mean it is
    fooled. Both objectives and the mean :math:`\sigma D` on each kind of pair are in
    :attr:`stats` (:class:`AdversarialStats`).

    **Optimizers.** The discriminator is registered with ``pyro.module(discriminator_name,
    discriminator)`` in every call, so SVI trains it with the same Pyro optimizer. Its
    parameters are named ``"discriminator.<param>"`` for a one-argument per-parameter optimizer
    function, e.g. ``Adam(lambda name: {"lr": 4e-4 if name.startswith("discriminator.") else
    1e-4})`` (or ``lambda module_name, param_name: ...`` with ``module_name ==
    "discriminator"``). Set :attr:`update` to ``"discriminator"`` or ``"generator"`` to train
    one side per step; with :meth:`differentiable_loss` and a plain PyTorch optimizer the side
    left out simply has no gradient (``None``).

    .. note:: Cost per step: one guide run, one model run, and four discriminator evaluations
        (two with ``update`` set to one side, two under :meth:`loss`).

    :param torch.nn.Module discriminator: ``discriminator(x, z)`` returns one logit per pair
        (log-odds that the pair is a data pair), e.g. of shape ``(N,)`` or ``(N, 1)``; the
        objectives average over all of its elements.
    :param str update: ``"both"`` (default), ``"generator"`` (model and guide) or
        ``"discriminator"``; an attribute that may be changed between steps.
    :param latent_sites: names of the model's latent sites the discriminator sees, in its
        dict's order when several. Default: every latent site of the model.
    :param str discriminator_name: the module name given to :func:`pyro.module`
        (default ``"discriminator"``).
    :param bool retain_graph: passed to ``backward``.

    References

    [1] `Adversarial Feature Learning`, Jeff Donahue, Philipp Krähenbühl, Trevor Darrell
        (ICLR 2017), arXiv:1605.09782

    [2] `Adversarially Learned Inference`, Vincent Dumoulin, Ishmael Belghazi, Ben Poole,
        Olivier Mastropietro, Alex Lamb, Martin Arjovsky, Aaron Courville (ICLR 2017),
        arXiv:1606.00704

    [3] `Generative Adversarial Networks`, Ian J. Goodfellow et al. (NeurIPS 2014),
        arXiv:1406.2661
    """

    joint = True

    def __init__(
        self,
        discriminator: torch.nn.Module,
        update: str = "both",
        *,
        latent_sites: Sequence[str] | None = None,
        discriminator_name: str = "discriminator",
        retain_graph: bool | None = None,
    ):
        super().__init__(
            discriminator,
            update,
            discriminator_name=discriminator_name,
            retain_graph=retain_graph,
        )
        if latent_sites is not None:
            if isinstance(latent_sites, str):
                latent_sites = [latent_sites]
            latent_sites = list(latent_sites)
            if not latent_sites or not all(isinstance(n, str) for n in latent_sites):
                raise TypeError(
                    f"latent_sites must be a non-empty sequence of site names, got {latent_sites!r}"
                )
        self.latent_sites = latent_sites

    def _pairs(self, model, guide, args, kwargs):
        if guide is None:
            raise TypeError(
                "BiGAN needs a guide, the encoder q(z|x); for a generator alone use GAN"
            )
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        trace, latents, x_data, x_fake = self._model_trace(
            model, args, kwargs, subsample_sites(guide_trace)
        )
        names = latents if self.latent_sites is None else self.latent_sites
        unknown = [n for n in names if n not in latents]
        if unknown:
            raise ValueError(
                f"latent_sites {unknown} are not latent sites of the model (its latent sites: "
                f"{latents})"
            )
        if not names:
            raise ValueError(
                "the model has no latent site for the discriminator to see. For a generator "
                "without an encoder use GAN."
            )
        check_model_guide_match(trace, guide_trace, "adversarial", model_latents=set(names))
        _check_rsample(guide_trace, names, "guide")
        z_data = {n: guide_trace.nodes[n]["value"] for n in names}
        z_fake = {n: trace.nodes[n]["value"] for n in names}
        _check_shapes("latent", z_data, z_fake, "from the guide")
        return (_pack(x_data), _pack(z_data)), (_pack(x_fake), _pack(z_fake))


#: Adversarially learned inference [2]: the same algorithm as :class:`BiGAN`.
ALI = BiGAN


class GAN(AdversarialLoss):
    r"""
    A generative adversarial network [1] with the non-saturating generator loss: the
    discriminator :math:`D(x)` tells data :math:`x` from model samples :math:`\tilde x \sim
    p_\theta(x)`; there is no encoder, and the guide is never run (pass ``None`` or an empty
    function to SVI).

    .. math::

        \mathcal{L}_D = -\mathbb{E}\log\sigma D(x) - \mathbb{E}\log\bigl(1 - \sigma
            D(\tilde x)\bigr), \qquad
        \mathcal{L}_\theta = -\mathbb{E}\log\sigma D(\tilde x).

    Everything else (observed sites as data, every model latent as generator noise that must be
    reparameterized, ``discriminator(x)`` with a dict for several observed sites, the value
    :math:`\mathcal{L}_D`, :attr:`update`, per-parameter learning rates, :attr:`stats`) is as
    in :class:`BiGAN`. With subsampling, the model's own plate draws the minibatch.

    :param torch.nn.Module discriminator: ``discriminator(x)`` returns one logit per sample.
    :param str update: ``"both"`` (default), ``"generator"`` or ``"discriminator"``.
    :param str discriminator_name: the module name given to :func:`pyro.module`.
    :param bool retain_graph: passed to ``backward``.

    References

    [1] `Generative Adversarial Networks`, Ian J. Goodfellow, Jean Pouget-Abadie, Mehdi Mirza,
        Bing Xu, David Warde-Farley, Sherjil Ozair, Aaron Courville, Yoshua Bengio
        (NeurIPS 2014), arXiv:1406.2661
    """

    joint = False

    def _pairs(self, model, guide, args, kwargs):
        _, _, x_data, x_fake = self._model_trace(model, args, kwargs, None)
        return (_pack(x_data),), (_pack(x_fake),)
