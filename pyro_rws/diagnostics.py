# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
What the last step computed, and a warning when importance sampling has degenerated.

Every loss in :mod:`pyro_rws` keeps a :class:`StepStats` of its last call in its ``stats``
attribute: the loss terms, the bound and the per-datapoint effective sample size, as detached
tensors (no recomputation, and no device synchronization until a number is read)::

    rws = RWS(num_particles=10)
    svi = SVI(model, guide, Adam({"lr": 1e-3}), loss=rws)
    for step in range(1000):
        svi.step(data)
        print(rws.stats.bound, rws.stats.ess_mean, rws.stats.wake_phi)
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass

import pyro
import torch

# Frames in these directories are library code: a warning points past them to the caller.
_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep
    for path in (__file__, pyro.__file__, torch.__file__)
)
_USER_DIRS = tuple(_LIBRARY_DIRS[0] + name + os.sep for name in ("cli", "examples"))


def _user_stacklevel() -> int:
    """
    The ``stacklevel`` that makes a warning raised by the caller of this function point at the
    first frame outside pyro_rws, Pyro and PyTorch: the user's ``svi.step(...)`` or
    ``loss.differentiable_loss(...)`` line, however deep the call went.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not name.startswith(_LIBRARY_DIRS) or name.startswith(_USER_DIRS):
            return level
        frame, level = frame.f_back, level + 1
    return 1


class EffectiveSampleSizeWarning(UserWarning):
    """
    The mean effective sample size of the importance weights has stayed near 1 for many steps:
    one particle carries almost all the weight for almost every datapoint. The usual causes are
    a guide that has collapsed (e.g. too confident) or too few particles. Silence it with
    ``warnings.simplefilter("ignore", EffectiveSampleSizeWarning)``.
    """


@dataclass
class StepStats:
    """
    The terms of one step as detached 0-d tensors (``float(stats.bound)``, ``f"{stats.bound:.2f}"``
    and :meth:`as_dict` turn them into numbers).

    :ivar loss: the value the loss returned.
    :ivar wake_theta: the wake-theta objective (negative bound for RWS and VIMCO, negative mean
        log-joint for classic wake-sleep), summed over datapoints, scaled for subsampling.
    :ivar wake_phi: the self-normalized wake-phi objective ``-sum_k wbar_k log q(z_k|x)``.
    :ivar sleep_phi: the sleep-phi objective ``-log q(z|x)`` on fantasies, averaged over sleep
        particles and summed over the fantasies of each.
    :ivar bound: the importance-weighted bound estimate (RWS, VIMCO) or ELBO estimate
        (wake-sleep), summed over datapoints and scaled for subsampling.
    :ivar ess: per-datapoint effective sample size ``1 / sum_k wbar_k^2``, with the shape of the
        batch plates (None where the loss did not weight particles).
    :ivar num_particles: the number of wake particles K.
    """

    loss: torch.Tensor
    wake_theta: torch.Tensor | None = None
    wake_phi: torch.Tensor | None = None
    sleep_phi: torch.Tensor | None = None
    bound: torch.Tensor | None = None
    ess: torch.Tensor | None = None
    num_particles: int | None = None

    @property
    def ess_mean(self) -> torch.Tensor | None:
        """Mean over datapoints of the effective sample size."""
        return None if self.ess is None else self.ess.mean()

    @property
    def ess_min(self) -> torch.Tensor | None:
        """Smallest effective sample size over datapoints."""
        return None if self.ess is None else self.ess.min()

    def as_dict(self) -> dict[str, float]:
        """Every available scalar as a float (one device synchronization), for logging."""
        names = ("loss", "wake_theta", "wake_phi", "sleep_phi", "bound", "ess_mean", "ess_min")
        present = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        values = torch.stack([v.detach().double().reshape(()) for v in present.values()])
        return dict(zip(present, values.tolist(), strict=True))


class ESSMonitor:
    """
    Warns (rate-limited) when the batch-mean effective sample size stays near its minimum of 1.

    "Near 1" means below ``1 + min(0.1, 0.02 (K - 1))`` (1.02 for K = 2, 1.1 for K >= 6);
    "stays" means for ``patience`` consecutive steps. After a warning, the next one
    comes no sooner than ``cooldown`` steps later.
    """

    def __init__(self, patience: int = 100, cooldown: int = 1000):
        self.patience = patience
        self.cooldown = cooldown
        self.step = 0
        self.low_run = 0
        self.last_warning = None

    def update(self, ess_mean: float, num_particles: int) -> None:
        if num_particles < 2:
            return
        self.step += 1
        threshold = 1.0 + min(0.1, 0.02 * (num_particles - 1))
        self.low_run = self.low_run + 1 if ess_mean < threshold else 0
        if self.low_run < self.patience:
            return
        if self.last_warning is not None and self.step - self.last_warning < self.cooldown:
            return
        self.last_warning = self.step
        warnings.warn(
            f"the mean effective sample size has been below {threshold:.2f} (of K="
            f"{num_particles} particles) for {self.low_run} consecutive steps (now "
            f"{ess_mean:.3f}): one particle carries almost all the weight. The guide may have "
            "collapsed, or num_particles is too small for this guide.",
            EffectiveSampleSizeWarning,
            stacklevel=_user_stacklevel(),
        )
