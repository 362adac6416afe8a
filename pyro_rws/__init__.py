# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""Wake-sleep family of inference algorithms for Pyro."""

from .adversarial import ALI, GAN, AdversarialStats, BiGAN
from .autoguides.flow import AutoAmortizedFlow  # amortized flow guide (simulation-based inference)
from .autoguides.proposal import AutoAmortizedProposal
from .diagnostics import EffectiveSampleSizeWarning, StepStats
from .evaluation import log_evidence
from .fitting import FitHistory, fit_guide, refine_guide  # simulation-based inference
from .jit import JitReweightedWakeSleep, JitRWS, JitSleepPhaseLoss, JitVIMCO, JitWakeSleepELBO
from .memoised import MWS, MemoisedWakeSleep
from .posterior import ImportancePosterior, importance_posterior
from .rws import RWS, ReweightedWakeSleep
from .simulation import Simulations, simulate  # simulation-based inference
from .sleep_phase import SleepPhaseLoss
from .vimco import VIMCO
from .wake_sleep import WakeSleepELBO

__version__ = "0.1.0"

__all__ = [
    "ALI",
    "AdversarialStats",
    "AutoAmortizedFlow",
    "AutoAmortizedProposal",
    "BiGAN",
    "GAN",
    "JitRWS",
    "JitReweightedWakeSleep",
    "JitSleepPhaseLoss",
    "JitVIMCO",
    "JitWakeSleepELBO",
    "MWS",
    "MemoisedWakeSleep",
    "RWS",
    "EffectiveSampleSizeWarning",
    "ReweightedWakeSleep",
    "SleepPhaseLoss",
    "StepStats",
    "VIMCO",
    "WakeSleepELBO",
    "log_evidence",
    # simulation-based inference (pyro_rws/simulation.py, fitting.py, posterior.py)
    "FitHistory",
    "ImportancePosterior",
    "Simulations",
    "fit_guide",
    "refine_guide",
    "importance_posterior",
    "simulate",
]
