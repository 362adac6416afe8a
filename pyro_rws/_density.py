# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The log-density of a sample site, as every estimator computes it (weights, sleep phase,
enumeration).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pyro.distributions import Categorical as PyroCategorical
from torch.distributions import Bernoulli, Categorical, Independent
from torch.distributions.utils import _sum_rightmost, broadcast_all


def log_density(site: dict) -> torch.Tensor:
    """
    ``site["fn"].log_prob(site["value"])``. For ``Bernoulli(...).to_event(n)`` (without argument
    validation) the same number is computed with the negation after the event sum:
    ``Bernoulli.log_prob`` returns ``-binary_cross_entropy_with_logits(...)`` for every element,
    and negating the whole ``(K, batch, event)`` tensor, forward and backward, is a tenth of a
    step of a sigmoid belief net. Negation commutes exactly with rounding, so the result is
    identical.

    For ``Categorical`` (without argument validation) at a value of its batch shape, the
    normalized logits are gathered at the value directly: ``Categorical.log_prob`` broadcasts
    value and logits first, which for equal batch shapes is a no-op that costs more than the
    gather in a run per particle. The same operation on the same tensors: the same numbers and
    gradients.
    """
    fn, value = site["fn"], site["value"]
    if (
        type(fn).log_prob in _CATEGORICAL_LOG_PROBS
        and not fn._validate_args
        and not site["args"]
        and not site["kwargs"]
        and torch.is_tensor(value)
        and getattr(value, "_pyro_categorical_support", None) is None
    ):
        logits = fn.logits
        if value.shape == logits.shape[:-1]:
            return logits.gather(-1, value.long().unsqueeze(-1)).squeeze(-1)
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


_CATEGORICAL_LOG_PROBS = (Categorical.log_prob, PyroCategorical.log_prob)
