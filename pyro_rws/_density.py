# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The log-density of a sample site, as every estimator computes it (weights, sleep phase,
enumeration).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Independent
from torch.distributions.utils import _sum_rightmost, broadcast_all


def log_density(site: dict) -> torch.Tensor:
    """
    ``site["fn"].log_prob(site["value"])``. For ``Bernoulli(...).to_event(n)`` (without argument
    validation) the same number is computed with the negation after the event sum:
    ``Bernoulli.log_prob`` returns ``-binary_cross_entropy_with_logits(...)`` for every element,
    and negating the whole ``(K, batch, event)`` tensor, forward and backward, is a tenth of a
    step of a sigmoid belief net. Negation commutes exactly with rounding, so the result is
    identical.
    """
    fn, value = site["fn"], site["value"]
    base, event_dims = fn, 0
    while type(base).log_prob is Independent.log_prob:
        event_dims += base.reinterpreted_batch_ndims
        base = base.base_dist
    if (
        event_dims
        and type(base).log_prob is Bernoulli.log_prob
        and not base._validate_args
        and not site["args"]
        and not site["kwargs"]
    ):
        logits, value = broadcast_all(base.logits, value)
        bce = F.binary_cross_entropy_with_logits(logits, value, reduction="none")
        # _sum_rightmost, as Independent.log_prob sums (without a no-op reshape for one dim)
        return -(bce.sum(-1) if event_dims == 1 else _sum_rightmost(bce, event_dims))
    return fn.log_prob(value, *site["args"], **site["kwargs"])
