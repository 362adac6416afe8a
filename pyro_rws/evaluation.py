# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""Importance-sampled estimates of the marginal likelihood, for held-out evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._args import check_count
from ._structure import check_guide
from ._traces import guess_plate_nesting, wake_traces
from ._weights import log_weights


@torch.no_grad()
def log_evidence(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 1000,
    chunk_size: int = 100,
    max_plate_nesting: int | None = None,
    vectorize_particles: bool = True,
    **kwargs,
) -> torch.Tensor:
    r"""
    Importance-sampled estimate of :math:`\log p(x)` per datapoint, using the guide as proposal:

    .. math:: \log \hat p(x) = \log \frac{1}{K} \sum_{k=1}^K
        \frac{p(x, z^k)}{q(z^k | x)}, \qquad z^k \sim q(\cdot | x).

    By Jensen's inequality :math:`\mathbb{E}\log \hat p(x) \le \log p(x)`: the estimate is a
    stochastic *lower bound* in expectation (the IWAE bound of Burda et al. 2016), which
    tightens monotonically as K grows and is exact for any K when the guide is the exact
    posterior. Report it with the K used, e.g. "log p(x) >= -85.3 (K = 5000)".

    Particles are drawn ``chunk_size`` at a time and combined with a running log-sum-exp, so
    memory grows with ``chunk_size``, not ``num_particles``; no autograd graph is built. As in
    the losses, ``vectorize_particles=True`` draws a chunk in one run of guide and model inside
    a particle plate (fast; needs static structure and programs that broadcast over the
    particle dim), and ``vectorize_particles=False`` runs guide and model once per particle
    (stochastic control flow: a random number of sites, Python branches on sampled values).
    A sequential run draws the same particles whatever ``chunk_size`` (which then only bounds
    the traces kept at once).

    :param model: a Pyro model; ``*args`` and ``**kwargs`` are passed to model and guide.
    :param guide: the proposal, usually the trained guide.
    :param int num_particles: K, particles per datapoint.
    :param int chunk_size: particles per vectorized run (sequential: per batch of traces).
    :param int max_plate_nesting: number of nested plates (guessed if omitted).
    :param bool vectorize_particles: one vectorized run per chunk (default), or one run per
        particle for programs with stochastic control flow.
    :returns: a tensor with one entry per element of the plates that enclose every sample site
        (usually the data plate: shape ``(N,)``); with a subsampled plate, for the datapoints of
        the drawn minibatch, unscaled. A model with global latents has joint weights, and the
        result is :math:`\log \hat p` of the whole batch (a 0-d tensor).
    """
    K = check_count("num_particles", num_particles, 1)
    chunk_size = check_count("chunk_size", chunk_size, 1)
    vectorize = bool(vectorize_particles)
    check_guide(guide, sleep=False)
    if max_plate_nesting is None:
        max_plate_nesting = guess_plate_nesting(model, args, kwargs)
    total, minibatch = None, None
    for start in range(0, K, chunk_size):
        size = min(chunk_size, K - start)
        _, lw, minibatch = chunk_log_weights(
            model,
            guide,
            args,
            kwargs,
            size,
            max_plate_nesting,
            minibatch,
            _SUBSAMPLE_REMEDY,
            vectorize,
        )
        total = add_chunk(total, lw)
    return total - math.log(K)


_SUBSAMPLE_REMEDY = (
    "log_evidence estimates log p(x) per datapoint: evaluate on the full data "
    "(without subsampling the plate), or put every latent inside the data plate."
)


def chunk_log_weights(
    model, guide, args, kwargs, size, plate_nesting, minibatch, remedy, vectorize=True
):
    """
    One chunk of ``size`` particles: ``(runs, log_w, minibatch)``, the wake runs (one
    vectorized run, or ``size`` runs of one particle), their log-weights (particles first,
    shape ``(size, *batch)``) and the minibatch to replay in the next chunk. The one step of
    :func:`log_evidence` and :func:`~pyro_rws.importance_posterior`.
    """
    runs, minibatch = wake_traces(
        model,
        guide,
        args,
        kwargs,
        num_particles=size,
        vectorize=vectorize,
        plate_nesting=plate_nesting,
        minibatch=minibatch,
    )
    lw = log_weights(
        runs, plate_nesting=plate_nesting, vectorized=vectorize, subsample_remedy=remedy
    )
    return runs, lw.log_w, minibatch


def add_chunk(total: torch.Tensor | None, lw: torch.Tensor) -> torch.Tensor:
    """The running ``logsumexp`` of the log-weights over particles, with one more chunk."""
    chunk = torch.logsumexp(lw, 0)
    if total is None:
        return chunk
    if chunk.shape != total.shape:
        raise ValueError(
            f"particles disagree on the sizes of the batch plates: weights of shape "
            f"{tuple(total.shape)} and {tuple(chunk.shape)} per datapoint. Every particle must "
            "visit the same datapoints, and the plates that enclose every site must be the same "
            "in every run."
        )
    return torch.logaddexp(total, chunk)
