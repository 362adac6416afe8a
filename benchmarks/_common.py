# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""Shared helpers of the benchmark scripts (not part of the package)."""

from __future__ import annotations

import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def machine() -> str:
    import os

    import pyro

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs visible, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread), pyro-ppl {pyro.__version__}, "
        f"Python {platform.python_version()}"
    )


def load_data(name: str = "auto"):
    """``(train, test, label)``: binarized MNIST when available (or asked for), else digits."""
    from pyro_rws.examples.data import (
        find_binarized_mnist,
        load_binarized_mnist,
        load_digits,
        shuffled_test_split,
    )

    if name in ("auto", "mnist"):
        path = find_binarized_mnist()
        if path is None and name == "mnist":
            from pyro_rws.examples.mnist import DownloadError, binarized_mnist_path

            try:
                path = binarized_mnist_path()  # downloads it once into the cache
            except DownloadError as e:
                print(e, file=sys.stderr)
                return None
        if path is not None:
            data = load_binarized_mnist(path)
            test = shuffled_test_split(data["test"])  # stored sorted by digit
            return data["train"], test, "binarized MNIST (test split shuffled, seed 0)"
        if name == "mnist":
            return None
    train, test = load_digits()
    return train, test, "sklearn digits (binarized)"


def bernoulli_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(value | logits) summed over the last dimension."""
    return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


def hand_rws_loss(sbn, x: torch.Tensor, K: int) -> torch.Tensor:
    """
    Hand-written per-datapoint RWS (wake-theta + wake-phi) for ``pyro_rws.examples.sbn.SBN``:
    a scalar whose value is the negative IWAE bound summed over the batch and whose gradient
    is the RWS estimator, as ``ReweightedWakeSleep(insomnia=1).differentiable_loss``.
    """
    B = x.shape[0]
    # the first encoder sees the same x for every particle: run it once, expand its output
    logits = sbn.encoders[0](x).expand(K, B, -1)
    with torch.no_grad():
        h = torch.bernoulli(torch.sigmoid(logits))
    log_q = bernoulli_log_prob(logits, h)
    hs = [h]
    for encoder in sbn.encoders[1:]:
        logits = encoder(h)
        with torch.no_grad():
            h = torch.bernoulli(torch.sigmoid(logits))
        log_q = log_q + bernoulli_log_prob(logits, h)
        hs.append(h)
    top = hs[-1]
    log_p = bernoulli_log_prob(sbn.prior_logits.expand_as(top), top)
    for layer in range(len(hs) - 1, 0, -1):
        log_p = log_p + bernoulli_log_prob(sbn.decoders[layer](hs[layer]), hs[layer - 1])
    log_p = log_p + bernoulli_log_prob(sbn.decoders[0](hs[0]), x.expand(K, *x.shape))
    log_w = log_p.detach() - log_q.detach()  # (K, B)
    bound = (torch.logsumexp(log_w, 0) - torch.log(torch.tensor(float(K)))).sum()
    weights = torch.softmax(log_w, 0)
    surrogate = -(weights * log_p).sum() - (weights * log_q).sum()
    return -bound + (surrogate - surrogate.detach())


def lean_rws_loss(sbn, x: torch.Tensor, K: int) -> torch.Tensor:
    """
    The leanest hand-written per-datapoint RWS (wake-theta + wake-phi) for a one-layer ``SBN``,
    exactly as issue 19 gives it, and the baseline of ``step_time.py``'s ratios: the encoder run
    once on x, each Bernoulli log-prob one ``binary_cross_entropy_with_logits``, one log-sum-exp
    shared by the bound and the weights, one weighted sum per term, no
    ``surrogate - surrogate.detach()``. Its gradient is the RWS estimator (that of
    ``hand_rws_loss``); its value is not the bound.
    """
    if len(sbn.encoders) != 1:
        raise ValueError("the lean step is written for a one-layer SBN (--layers H)")
    V, c = sbn.encoders[0].weight, sbn.encoders[0].bias
    W, b = sbn.decoders[0].weight, sbn.decoders[0].bias
    prior = sbn.prior_logits
    q_logits = x @ V.t() + c  # [B, H]
    with torch.no_grad():
        z = torch.bernoulli(torch.sigmoid(q_logits).expand((K,) + q_logits.shape))
    log_q = -F.binary_cross_entropy_with_logits(q_logits.expand_as(z), z, reduction="none").sum(-1)
    log_p = -F.binary_cross_entropy_with_logits(prior.expand_as(z), z, reduction="none").sum(
        -1
    ) - F.binary_cross_entropy_with_logits(
        z @ W.t() + b, x.expand(K, *x.shape), reduction="none"
    ).sum(-1)
    log_w = log_p - log_q.detach()
    lse = torch.logsumexp(log_w, 0)  # [B]
    theta = -(lse - math.log(K)).sum()
    phi = -((log_w - lse).exp().detach() * log_q).sum()
    return theta + phi
