# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Sigmoid belief networks (Neal 1992) with layers of Bernoulli latents, as in the experiments of
Mnih & Gregor (2014), Bornschein & Bengio (2015) and Mnih & Rezende (2016).

``SBN(784, (200, 200, 200))`` is the 200-200-200 network: the model draws the top layer from a
learned factorized prior and each layer below from ``Bernoulli(sigmoid(W h + b))``; the guide
mirrors it bottom-up, ``q(h1|x) q(h2|h1) q(h3|h2)``, each layer linear-sigmoid.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn


def _data_plate(x: torch.Tensor, num_data: int | None):
    """The data plate: the batch itself, or a minibatch of ``num_data`` points (scaled)."""
    batch = x.shape[-2]
    if num_data is None:
        return pyro.plate("data", batch)
    # the batch is the minibatch: no indices to draw, scale num_data / batch
    return pyro.plate("data", num_data, subsample=torch.arange(batch, device=x.device))


class SBN(nn.Module):
    """
    :param int x_dim: number of binary pixels.
    :param latent_dims: sizes of the latent layers, bottom (next to x) first.

    ``model(x)`` and ``guide(x)`` take a batch ``x`` of shape ``(batch, x_dim)``. With
    ``num_data`` set, the data plate has that full size and the batch is treated as a minibatch
    (scale ``num_data / batch``).

    Parameters are registered in Pyro's param store under fixed names ("sbn_generative",
    "sbn_inference"): clear the store (``pyro.clear_param_store()``) before training a second
    SBN in the same process.
    """

    def __init__(self, x_dim: int, latent_dims: Sequence[int] = (200,)):
        super().__init__()
        dims = [x_dim, *latent_dims]
        self.latent_dims = tuple(latent_dims)
        # model parameters: top-layer prior logits and decoders[l], mapping layer l+1 to layer l
        self.generative = nn.Module()
        self.generative.prior_logits = nn.Parameter(torch.zeros(dims[-1]))
        self.generative.decoders = nn.ModuleList(
            nn.Linear(dims[i + 1], dims[i]) for i in range(len(dims) - 1)
        )
        # guide parameters: encoders[l] maps layer l to layer l+1
        self.encoders = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(len(dims) - 1))

    @property
    def prior_logits(self) -> nn.Parameter:
        return self.generative.prior_logits

    @property
    def decoders(self) -> nn.ModuleList:
        return self.generative.decoders

    def model(self, x: torch.Tensor, num_data: int | None = None) -> None:
        pyro.module("sbn_generative", self.generative)
        prior = self.prior_logits
        batch = x.shape[-2]
        with _data_plate(x, num_data):
            top = len(self.latent_dims)
            h = pyro.sample(
                f"h{top}", dist.Bernoulli(logits=prior).expand([batch, prior.shape[-1]]).to_event(1)
            )
            for layer in range(top - 1, 0, -1):
                h = pyro.sample(
                    f"h{layer}", dist.Bernoulli(logits=self.decoders[layer](h)).to_event(1)
                )
            pyro.sample("x", dist.Bernoulli(logits=self.decoders[0](h)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        pyro.module("sbn_inference", self.encoders)
        with _data_plate(x, num_data):
            h = x
            for layer, encoder in enumerate(self.encoders, start=1):
                h = pyro.sample(f"h{layer}", dist.Bernoulli(logits=encoder(h)).to_event(1))

    @torch.no_grad()
    def sample_images(self, num: int) -> torch.Tensor:
        """Pixel probabilities of ``num`` images from the model."""
        h = torch.bernoulli(torch.sigmoid(self.prior_logits).expand(num, -1))
        for layer in range(len(self.latent_dims) - 1, 0, -1):
            h = torch.bernoulli(torch.sigmoid(self.decoders[layer](h)))
        return torch.sigmoid(self.decoders[0](h))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel probabilities of ``p(x | h1)`` with ``h1 ~ q(h1 | x)``."""
        h1 = torch.bernoulli(torch.sigmoid(self.encoders[0](x)))
        return torch.sigmoid(self.decoders[0](h1))
