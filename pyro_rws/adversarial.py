# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
Adversarially learned inference (:class:`BiGAN`, alias :class:`ALI`) and plain :class:`GAN`\ s
as Pyro losses: a discriminator tells data pairs from model pairs, and one backward pass trains
both sides without leakage between them (the math is in :class:`BiGAN`).

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
:attr:`~pyro_rws._adversarial.AdversarialLoss.update` between steps (``k`` discriminator steps
per generator step)::

    bigan.update = "discriminator"
    for _ in range(k):
        svi.step(x)
    bigan.update = "generator"
    svi.step(x)
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.poutine as poutine
import torch

from ._adversarial import (
    AdversarialLoss,
    AdversarialStats,
    _check_rsample,
    _check_shapes,
    _pack,
)
from ._structure import check_model_guide_match
from ._traces import subsample_sites

__all__ = ["ALI", "AdversarialLoss", "AdversarialStats", "BiGAN", "GAN"]


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
