# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The registry of the wake-sleep losses the tests run on, with what each one does as data.

``LOSSES`` holds one :class:`LossSpec` per loss (class and mode); ``CASES`` each of them with
vectorized and with sequential particles. The contract, program, sleep-input and distributed
tests take their losses from here and decide what to assert from the capabilities, so that a new
loss gets all of those tests by adding one entry to ``LOSSES``. A test that does not apply to a
loss says why in a capability, not by a list of names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyro_rws import RWS, VIMCO, SleepPhaseLoss, WakeSleepELBO


@dataclass(frozen=True)
class LossSpec:
    """One loss and its capabilities."""

    name: str
    #: ``factory(num_particles, num_sleep_particles, vectorize_particles, **kwargs)``
    factory: Callable
    #: The model's parameters get a gradient (wake-theta).
    has_wake_theta: bool
    #: The guide learns from fantasies of the model (sleep-phi); takes ``fantasy_args``.
    has_sleep: bool
    #: The guide learns from the wake-phase particles (``stats.wake_phi`` is set).
    has_wake_phi: bool
    #: The value is a bound on log p(x) from the guide's particles: ``stats.bound = -value``.
    #: ``"iwae"`` (log mean of the weights, ``stats.wake_theta = value``) or ``"elbo"``.
    bound: str | None
    #: Self-normalized weights per datapoint: ``stats.ess`` is set, the ESS is watched.
    returns_ess: bool
    #: A global latent outside a subsampled plate is fine (linear in the log-densities); with
    #: self-normalized weights the N/B scale cannot act inside the log-sum-exp, so it raises.
    supports_subsampled_globals: bool
    #: A particle of weight zero (outside a hard constraint) is dropped and the others carry
    #: value and gradient; an ELBO of such a particle is -inf.
    drops_zero_weight_particles: bool
    #: The fewest wake particles the constructor accepts (None: no wake phase).
    min_particles: int | None
    #: The name under which a NaN surrogate is reported (``pyro.util.warn_if_nan``).
    surrogate_nan_name: str | None

    @property
    def has_wake(self) -> bool:
        """The model is scored at the guide's particles (the wake phase runs)."""
        return self.bound is not None

    def make(self, vectorize=True, num_particles=3, num_sleep_particles=1, **kwargs):
        """
        The loss. ``num_sleep_particles`` is the ``num_particles`` of a sleep-only loss;
        ``fantasy_args`` is passed to losses with a sleep phase only (no other loss reads it).
        """
        fantasy_args = kwargs.pop("fantasy_args", None)
        if self.has_sleep and fantasy_args is not None:
            kwargs["fantasy_args"] = fantasy_args
        return self.factory(num_particles, num_sleep_particles, vectorize, **kwargs)

    def __str__(self):
        return self.name


def _rws(insomnia):
    def factory(num_particles, num_sleep_particles, vectorize, **kwargs):
        if insomnia < 1:
            kwargs["num_sleep_particles"] = num_sleep_particles
        return RWS(
            num_particles=num_particles,
            insomnia=insomnia,
            vectorize_particles=vectorize,
            **kwargs,
        )

    return factory


def _wake_sleep(phase_q):
    def factory(num_particles, num_sleep_particles, vectorize, **kwargs):
        if phase_q == "sleep":
            kwargs["num_sleep_particles"] = num_sleep_particles
        return WakeSleepELBO(
            num_particles=num_particles, phase_q=phase_q, vectorize_particles=vectorize, **kwargs
        )

    return factory


def _sleep(num_particles, num_sleep_particles, vectorize, **kwargs):
    return SleepPhaseLoss(
        num_particles=num_sleep_particles, vectorize_particles=vectorize, **kwargs
    )


def _vimco(num_particles, num_sleep_particles, vectorize, **kwargs):
    return VIMCO(num_particles=num_particles, vectorize_particles=vectorize, **kwargs)


_RWS = "wake-theta/wake-phi surrogate loss"
_WS = "wake-sleep surrogate loss"

LOSSES = [
    LossSpec(
        name="rws-1",
        factory=_rws(1.0),
        has_wake_theta=True,
        has_sleep=False,
        has_wake_phi=True,
        bound="iwae",
        returns_ess=True,
        supports_subsampled_globals=False,
        drops_zero_weight_particles=True,
        min_particles=2,
        surrogate_nan_name=_RWS,
    ),
    LossSpec(
        name="rws-0.5",
        factory=_rws(0.5),
        has_wake_theta=True,
        has_sleep=True,
        has_wake_phi=True,
        bound="iwae",
        returns_ess=True,
        supports_subsampled_globals=False,
        drops_zero_weight_particles=True,
        min_particles=2,
        surrogate_nan_name=_RWS,
    ),
    LossSpec(
        name="rws-0",
        factory=_rws(0.0),
        has_wake_theta=True,
        has_sleep=True,
        has_wake_phi=False,
        bound="iwae",
        returns_ess=True,
        supports_subsampled_globals=False,
        drops_zero_weight_particles=True,
        min_particles=1,
        surrogate_nan_name=_RWS,
    ),
    LossSpec(
        name="ws-sleep",
        factory=_wake_sleep("sleep"),
        has_wake_theta=True,
        has_sleep=True,
        has_wake_phi=False,
        bound="elbo",
        returns_ess=False,
        supports_subsampled_globals=True,
        drops_zero_weight_particles=False,
        min_particles=1,
        surrogate_nan_name=_WS,
    ),
    LossSpec(
        name="ws-wake",
        factory=_wake_sleep("wake"),
        has_wake_theta=True,
        has_sleep=False,
        has_wake_phi=True,
        bound="elbo",
        returns_ess=True,
        supports_subsampled_globals=False,
        drops_zero_weight_particles=False,
        min_particles=1,
        surrogate_nan_name=_WS,
    ),
    LossSpec(
        name="sleep",
        factory=_sleep,
        has_wake_theta=False,
        has_sleep=True,
        has_wake_phi=False,
        bound=None,
        returns_ess=False,
        supports_subsampled_globals=True,
        drops_zero_weight_particles=False,
        min_particles=None,
        surrogate_nan_name=None,
    ),
    LossSpec(
        name="vimco",
        factory=_vimco,
        has_wake_theta=True,
        has_sleep=False,
        has_wake_phi=True,
        bound="iwae",
        returns_ess=True,
        supports_subsampled_globals=False,
        drops_zero_weight_particles=True,
        min_particles=2,
        surrogate_nan_name="VIMCO surrogate loss",
    ),
]
BY_NAME = {spec.name: spec for spec in LOSSES}


@dataclass(frozen=True)
class LossCase:
    """A loss with vectorized or sequential particles."""

    spec: LossSpec
    vectorize: bool

    def make(self, **kwargs):
        return self.spec.make(self.vectorize, **kwargs)

    def __getattr__(self, name):  # the capabilities of the spec
        if name == "spec":  # not set yet (copying)
            raise AttributeError(name)
        return getattr(self.spec, name)

    def __str__(self):
        return f"{self.spec.name}-{'vec' if self.vectorize else 'seq'}"


def cases(where: Callable[[LossSpec], bool] = lambda spec: True) -> list[LossCase]:
    """Every loss that ``where`` accepts, with vectorized and with sequential particles."""
    return [LossCase(spec, v) for spec in LOSSES if where(spec) for v in (True, False)]


CASES = cases()
