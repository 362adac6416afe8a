# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""Validation of the losses' constructor arguments: counts, fractions and flags."""

from __future__ import annotations

import numbers


def check_count(name: str, value, minimum: int, why: str = "") -> int:
    """``value`` as an int, or a ValueError/TypeError that says what was expected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}{why}, got {value}")
    return int(value)


def check_fraction(name: str, value) -> float:
    """``value`` as a float in [0, 1], or a ValueError/TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)
