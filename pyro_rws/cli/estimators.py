# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""The estimators the command line offers: each name, the loss it builds for K, its label."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .. import RWS, VIMCO, WakeSleepELBO


def _pyro_rws(k: int):
    from pyro.infer import ReweightedWakeSleep

    # insomnia=1 (wake-phi only): Pyro's sleep phase needs an `observations=` keyword in the guide
    return ReweightedWakeSleep(
        num_particles=k, insomnia=1.0, vectorize_particles=True, max_plate_nesting=1
    )


@dataclass(frozen=True)
class Estimator:
    label: str
    make: Callable[[int], object]
    min_particles: int
    help: str


ESTIMATORS: dict[str, Estimator] = {
    "rws": Estimator(
        "RWS wake-phi",
        lambda k: RWS(num_particles=k, insomnia=1.0, max_plate_nesting=1),
        2,
        "reweighted wake-sleep, guide by wake-phi (insomnia 1)",
    ),
    "rws-sleep": Estimator(
        "RWS sleep-phi",
        lambda k: RWS(num_particles=k, insomnia=0.0, max_plate_nesting=1),
        1,
        "reweighted wake-sleep, guide by sleep-phi on one fantasy per point (insomnia 0)",
    ),
    "rws-mix": Estimator(
        "RWS wake+sleep-phi",
        lambda k: RWS(num_particles=k, insomnia=0.5, max_plate_nesting=1),
        2,
        "reweighted wake-sleep, guide by half wake-phi, half sleep-phi (insomnia 0.5)",
    ),
    "ws": Estimator(
        "wake-sleep",
        lambda k: WakeSleepELBO(num_particles=k, max_plate_nesting=1),
        1,
        "classic wake-sleep (WakeSleepELBO: unweighted wake-theta on K samples, sleep-phi)",
    ),
    "ws-le": Estimator(
        "WS (Le et al.)",
        lambda k: RWS(num_particles=k, insomnia=0.0, num_sleep_particles=k, max_plate_nesting=1),
        1,
        "the WS of Le et al. 2019: importance-weighted wake-theta, sleep-phi on K fantasies "
        "per point (RWS insomnia 0, num_sleep_particles K)",
    ),
    "vimco": Estimator(
        "VIMCO",
        lambda k: VIMCO(num_particles=k, max_plate_nesting=1),
        2,
        "VIMCO: IWAE bound with leave-one-out baselines",
    ),
    "reinforce": Estimator(
        "REINFORCE (IWAE)",
        lambda k: VIMCO(num_particles=k, max_plate_nesting=1, baseline=None),
        1,
        "IWAE bound with the plain score-function gradient (VIMCO without baselines)",
    ),
    "pyro-rws": Estimator(
        "Pyro RWS (joint)",
        _pyro_rws,
        2,
        "pyro.infer.ReweightedWakeSleep, insomnia 1 (one joint weight per minibatch)",
    ),
}

GMM_DEFAULT_ESTIMATORS = ["rws", "ws", "vimco", "pyro-rws"]
GMM_DEFAULT_PARTICLES = [2, 5, 10]
SBN_DEFAULT_ESTIMATORS = ["rws", "ws", "vimco", "pyro-rws"]
SBN_DEFAULT_PARTICLES = [10]
