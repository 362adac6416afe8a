# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
Neural posterior estimation: the guide fitted to stored simulations.

:func:`~pyro_rws.fit_guide` fits the guide to exactly the pairs :math:`(z_i, x_i)` of
:class:`~pyro_rws.Simulations` by the sleep-phi loss of :class:`~pyro_rws.SleepPhaseLoss`,

.. math:: \mathcal{L}_\phi = -\frac{1}{B} \sum_{i \in \text{batch}} \log q_\phi(z_i | x_i),

by epochs over minibatches with early stopping on a validation part (neural posterior
estimation, as in ``sbi``, whose defaults it takes). The minibatch sits in a particle plate of
size ``B`` and the guide is called and replayed by the sleep phase's own code
(``pyro_rws._sleep.sleep_traces``); the model is not run: its recorded structure, with the
stored values, stands in for it (:func:`sleep_loss` is that loss on given simulations, the same
estimator as :class:`~pyro_rws.SleepPhaseLoss` on the same pairs). An
:class:`~pyro_rws.AutoAmortizedFlow` on a model without data plates is trained through its own
``log_prob``, the same loss without Pyro's effect handlers per step.

The fitted guide's samples are reweighted for an observation by
:func:`~pyro_rws.importance_posterior` (:mod:`pyro_rws.posterior`); :func:`~pyro_rws.refine_guide`
first trains a copy of it on that observation by RWS's wake-phi update, for a proposal closer to
that observation's posterior.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import ImproperUniform, constraints
from pyro.poutine.runtime import _PYRO_STACK

from ._args import check_count, check_fraction
from ._simulate import _bar
from ._sleep import SleepState, sleep_log_q, sleep_traces
from ._structure import PARTICLE_PLATE
from .posterior import condition_on
from .rws import ReweightedWakeSleep
from .simulation import Simulations


def _in_particle_plate() -> bool:
    return any(getattr(m, "name", None) == PARTICLE_PLATE for m in _PYRO_STACK)


class _Replayed(poutine.messenger.Messenger):
    """Give each site its stored value, plates and (for observations) its fantasy marks."""

    def __init__(self, stand_in: _StandIn, values: dict, obs: dict):
        super().__init__()
        self.stand_in, self.values, self.obs = stand_in, values, obs

    def _process_message(self, msg) -> None:
        name = msg["name"]
        if msg["type"] != "sample" or name not in self.values:
            return
        msg["value"] = self.values[name]
        msg["cond_indep_stack"] = self.stand_in.frames[name] + msg["cond_indep_stack"]
        if name in self.obs:
            msg["infer"] = {"was_observed": True, "obs": self.obs[name]}


class _StandIn:
    """
    The model as the sleep phase sees it, rebuilt from the recorded sites with the stored
    values: every latent and observation at its stored value, in its plates, with its event
    dim, and each observation marked as the fantasy of the argument its ``obs=`` was (or of
    none). Inside the particle plate it serves the whole minibatch; outside (a guide that does
    not broadcast, run once per simulation) one simulation per call.
    """

    def __init__(self, sites, values: dict, nesting: int):
        self.sites = [s for s in sites if not (s.deterministic and not s.observed)]
        self.values, self.nesting, self.count = values, nesting, 0
        self.frames = {s.name: tuple(s.frames) for s in self.sites}

    def __call__(self, *args, **kwargs):
        if _in_particle_plate():
            values = {s.name: self.values[s.name] for s in self.sites}
        else:
            k, self.count = self.count, self.count + 1
            values = {s.name: self.values[s.name][k].reshape(s.run_shape) for s in self.sites}
        obs = {}
        for s in self.sites:
            if s.observed:
                slot = s.obs_slot
                obs[s.name] = (
                    args[slot]
                    if isinstance(slot, int) and slot < len(args)
                    else kwargs.get(slot)
                    if isinstance(slot, str)
                    else None
                )
        with _Replayed(self, values, obs):
            for s in self.sites:
                shape = values[s.name].shape[1:] if _in_particle_plate() else s.run_shape
                event_dim = s.event_dim
                if _in_particle_plate() and s.observed:
                    event_dim = max(event_dim, len(shape) - self.nesting)
                split = len(shape) - event_dim
                fn = ImproperUniform(constraints.real, shape[:split], shape[split:])
                pyro.sample(s.name, fn)


def _keyword_placeholders(simulations: Simulations, kwargs: dict) -> dict:
    """
    For an observation recorded as the fantasy of an unset keyword of the model (``x=None``), a
    placeholder in that keyword, so the sleep phase routes the stored value there.
    """
    runs = [(simulations.sites, simulations.values)] if simulations.values is not None else []
    for sites, values in runs or simulations.runs:
        for s in sites:
            if s.observed and isinstance(s.obs_slot, str) and kwargs.get(s.obs_slot) is None:
                kwargs = {**kwargs, s.obs_slot: values[s.name].new_empty(0)}
    return kwargs


def sleep_loss(
    model: Callable,
    guide: Callable,
    simulations: Simulations,
    *args,
    fantasy_args=None,
    **kwargs,
) -> torch.Tensor:
    r"""
    The sleep-phi loss :math:`-\frac{1}{B} \sum_i \log q_\phi(z_i | x_i)` on the ``B`` stored
    simulations, with gradients for the guide: :class:`~pyro_rws.SleepPhaseLoss`'s value on
    fantasies equal to them (the guide is called with the stored observations as the sleep
    phase calls it, see ``fantasy_args``, and scored at the stored latents, all ``B`` in one
    particle plate). ``*args`` and ``**kwargs`` are those the model was simulated with (by
    default ``simulations.args``). The model itself is not run (its recorded structure
    stands in for it).
    """
    return _sleep_loss(model, guide, simulations, args, kwargs, fantasy_args, SleepState())


def _sleep_loss(model, guide, simulations, args, kwargs, fantasy_args, state) -> torch.Tensor:
    """:func:`sleep_loss` with the sleep phase's state kept by the caller (:func:`fit_guide`)."""
    if not args and not kwargs:
        args, kwargs = simulations.args, simulations.kwargs
    kwargs = _keyword_placeholders(simulations, kwargs)
    options = dict(plate_nesting=simulations.plate_nesting, fantasy_args=fantasy_args, state=state)
    if simulations.values is not None:
        stand_in = _StandIn(simulations.sites, simulations.values, simulations.plate_nesting)
        B = len(simulations)
        runs = sleep_traces(
            stand_in, guide, args, kwargs, num_particles=B, vectorize=True, **options
        )
        return -sleep_log_q(runs, B)
    total = 0.0
    for sites, values in simulations.runs:
        stacked = {name: v.unsqueeze(0) for name, v in values.items()}
        stand_in = _StandIn(sites, stacked, simulations.plate_nesting)
        runs = sleep_traces(
            stand_in, guide, args, kwargs, num_particles=1, vectorize=False, **options
        )
        total = total + sleep_log_q(runs, 1)
    return -total / len(simulations)


@dataclass
class FitHistory:
    """What :func:`~pyro_rws.fit_guide` did: losses per epoch, the epoch whose weights it kept."""

    train_loss: list = field(default_factory=list)
    validation_loss: list = field(default_factory=list)
    best_epoch: int = -1
    best_validation_loss: float = math.inf
    num_steps: int = 0
    converged: bool = False  # stopped early (no improvement for stop_after_epochs epochs)
    learning_rate: list = field(default_factory=list)  # per epoch
    decay_epochs: list = field(default_factory=list)  # epochs after which it was lowered

    @property
    def epochs(self) -> int:
        return len(self.train_loss)


def _guide_parameters(guide, capture) -> list:
    params = {
        id(site["value"].unconstrained()): site["value"].unconstrained()
        for site in capture.trace.nodes.values()
        if site["type"] == "param"
    }
    owner = guide if isinstance(guide, torch.nn.Module) else getattr(guide, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        params.update({id(p): p for p in owner.parameters()})
    return [p for p in params.values() if p.requires_grad]


def _direct(guide, simulations: Simulations, fantasy_args) -> bool:
    """
    Whether the sleep-phi loss of this guide on these simulations is its own ``log_prob``
    (an :class:`~pyro_rws.AutoAmortizedFlow` reads the observations by site name, so the
    sleep phase's routing of them changes nothing): stored values, no ``fantasy_args``, no
    data plates (whose subsampling the sleep phase scales), every site stored.
    """
    from .autoguides.flow import AutoAmortizedFlow

    return (
        isinstance(guide, AutoAmortizedFlow)
        and guide.prototype_trace is not None
        and fantasy_args is None
        and simulations.values is not None
        and not guide._plate_frames
        and set(guide._latent_sites) <= set(simulations.latents)
        and guide._observed_sites <= set(simulations.observations)
    )


DEFAULT_NUM_LR_DECAYS = 2  # fit_guide's, where there is a validation part


def fit_guide(
    model: Callable,
    guide: Callable,
    simulations: Simulations,
    *args,
    batch_size: int = 200,
    learning_rate: float = 5e-4,
    validation_fraction: float = 0.1,
    stop_after_epochs: int = 20,
    max_epochs: int | None = None,
    clip_max_norm: float | None = 5.0,
    num_lr_decays: int | None = None,
    lr_decay_factor: float = 0.2,
    fantasy_args=None,
    seed: int | None = None,
    progress: bool | None = None,
    **kwargs,
) -> FitHistory:
    r"""
    Fit the guide to exactly the given simulations by the sleep-phi loss of
    :class:`~pyro_rws.SleepPhaseLoss` (neural posterior estimation): epochs over shuffled
    minibatches of the training part, Adam, and after each epoch the loss on the validation
    part; training stops when it has not improved for ``stop_after_epochs`` epochs, and the
    guide's parameters of the best epoch are restored. The defaults are ``sbi``'s but one:
    the first ``num_lr_decays=2`` times the validation loss stalls so, training goes on from
    the best parameters with the learning rate times ``lr_decay_factor`` (and a fresh Adam),
    and only the next stall stops it.

    Up to the first stall the run is ``sbi``'s schedule exactly (``num_lr_decays=0``), and a
    later stage replaces the best parameters only where it improves on them, so the decays
    never end with a worse validation loss. They cost epochs: two more stalls of
    ``stop_after_epochs`` at least, 1.2–3 times as many on sbibm at 10⁴–10⁵ simulations. At a
    constant learning rate the minibatch noise of the last epochs limits how closely the
    guide fits: on sbibm's bernoulli_glm with 10⁵ simulations two decays took the best
    validation loss from 1.953 to 1.889 nats (``sbi``'s 1.936) and the C2ST from behind
    ``sbi``'s to ahead of it, at three times the epochs (323 against 107;
    ``benchmarks/README.md``, section 12).

    The guide is called as the sleep phase calls it (see
    :func:`~pyro_rws.fitting.sleep_loss`), with the arguments the model was simulated with
    (``*args``, ``**kwargs``; by default those that :func:`~pyro_rws.simulate` was given,
    ``simulations.args``). Its parameters are those it creates with ``pyro.param`` or
    ``pyro.module`` (found by running it once), and those of the guide itself if it is a
    :class:`torch.nn.Module` (or a method of one).

    :param ~pyro_rws.Simulations simulations: from :func:`~pyro_rws.simulate`.
    :param int batch_size: simulations per gradient step.
    :param float learning_rate: Adam's learning rate.
    :param float validation_fraction: the part held out for early stopping (0: none; then
        training runs ``max_epochs`` and keeps the last parameters).
    :param int stop_after_epochs: epochs without improvement of the validation loss to stop.
    :param int max_epochs: at most this many epochs (default: no limit with a validation
        part, else 100).
    :param float clip_max_norm: clip the gradient norm (None: no clipping).
    :param int num_lr_decays: how many times to lower the learning rate when the validation
        loss stalls, before stopping (0: stop at the first stall, as ``sbi`` does; default:
        2 with a validation part, none without one).
    :param float lr_decay_factor: what each decay multiplies the learning rate by, in (0, 1).
    :param fantasy_args: as for :class:`~pyro_rws.SleepPhaseLoss`.
    :param int seed: fixes the split and the order of the minibatches.
    :param bool progress: show a progress bar (default: in a terminal or notebook).
    :returns: the losses and learning rate per epoch, the best epoch.
    :rtype: FitHistory
    """
    batch_size = check_count("batch_size", batch_size, 1)
    if not 0 < check_fraction("lr_decay_factor", lr_decay_factor) < 1:
        raise ValueError(f"lr_decay_factor must lie in (0, 1), got {lr_decay_factor!r}")
    if not args and not kwargs:
        args, kwargs = simulations.args, simulations.kwargs
    stop_after_epochs = check_count("stop_after_epochs", stop_after_epochs, 1)
    generator = torch.Generator()
    generator.manual_seed(int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)
    split_seed = int(torch.randint(0, 2**62, (), generator=generator))
    train, val = simulations.split(validation_fraction, seed=split_seed)
    if len(train) == 0:
        raise ValueError(
            f"no training simulations: {len(simulations)} with "
            f"validation_fraction={validation_fraction}"
        )
    if num_lr_decays is None:
        num_lr_decays = DEFAULT_NUM_LR_DECAYS if len(val) else 0
    num_lr_decays = check_count("num_lr_decays", num_lr_decays, 0)
    if num_lr_decays and not len(val):
        raise ValueError(
            "num_lr_decays needs a validation part to tell when the loss stalls: "
            f"validation_fraction={validation_fraction} left none of {len(simulations)} "
            "simulations"
        )
    if max_epochs is None:
        max_epochs = 2**31 - 1 if len(val) else 100
    max_epochs = check_count("max_epochs", max_epochs, 1)
    state = SleepState()

    def loss_on(part):
        return _sleep_loss(model, guide, part, args, kwargs, fantasy_args, state)

    def mean_loss(part) -> float:
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(part), batch_size):
                batch = part[i : i + batch_size]
                total = total + loss_on(batch) * len(batch)
        return float(total) / len(part)

    with poutine.trace(param_only=True) as capture:
        loss_on(train[:1])
    params = _guide_parameters(guide, capture)
    if _direct(guide, simulations, fantasy_args):  # the same loss without Pyro's handlers

        def loss_on(part):  # noqa: F811
            return -guide.log_prob(part.latents, part.observations).mean()

    if not params:
        raise ValueError(
            "the guide has no parameters to fit (no pyro.param, pyro.module or "
            "nn.Module parameters)"
        )
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    history, best, since_best, lr = FitHistory(), None, 0, learning_rate
    with _bar(
        max_epochs if max_epochs < 2**31 - 1 else None, progress, "fit_guide", "epoch"
    ) as bar:
        for epoch in range(max_epochs):
            perm = torch.randperm(len(train), generator=generator)
            total = 0.0  # a tensor after the first step: one host sync per epoch
            for start in range(0, len(train), batch_size):
                batch = train.subset(perm[start : start + batch_size])
                optimizer.zero_grad()
                loss = loss_on(batch)
                loss.backward()
                if clip_max_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip_max_norm)
                optimizer.step()
                total = total + loss.detach() * len(batch)
                history.num_steps += 1
            history.train_loss.append(float(total) / len(train))
            history.learning_rate.append(lr)
            bar.update(1)
            if not len(val):
                bar.set_postfix(train=f"{history.train_loss[-1]:.4g}")
                continue
            history.validation_loss.append(mean_loss(val))
            bar.set_postfix(
                train=f"{history.train_loss[-1]:.4g}", val=f"{history.validation_loss[-1]:.4g}"
            )
            if history.validation_loss[-1] < history.best_validation_loss:
                history.best_validation_loss = history.validation_loss[-1]
                history.best_epoch, since_best = epoch, 0
                best = [p.detach().clone() for p in params]
            else:
                since_best += 1
                if since_best >= stop_after_epochs:
                    if best is None:
                        raise ValueError(
                            f"the validation loss was not finite in any of the first "
                            f"{history.epochs} epochs ({history.validation_loss[-1]}): the "
                            "guide's log_prob is nan or inf on the validation simulations "
                            "(check its parameters and learning_rate)"
                        )
                    if len(history.decay_epochs) == num_lr_decays:
                        history.converged = True
                        break
                    _restore(params, best)  # and go on from there, more slowly
                    history.decay_epochs.append(epoch)
                    lr, since_best = lr * lr_decay_factor, 0
                    optimizer = torch.optim.Adam(params, lr=lr)
    if best is not None:
        _restore(params, best)
    elif not len(val):
        history.best_epoch = history.epochs - 1
    return history


def _restore(params: list, values: list) -> None:
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)


def refine_guide(
    model: Callable,
    guide: torch.nn.Module,
    *args,
    observations: dict | None = None,
    num_steps: int = 300,
    num_particles: int | None = None,
    learning_rate: float = 1e-4,
    clip_max_norm: float | None = 5.0,
    max_plate_nesting: int | None = None,
    vectorize_particles: bool = True,
    progress: bool | None = None,
    **kwargs,
) -> torch.nn.Module:
    r"""
    A copy of an amortized guide trained further on one observation :math:`x_o` by the wake-phi
    update of reweighted wake-sleep (:class:`~pyro_rws.RWS` with ``insomnia=1``, the model's
    likelihood at K of the guide's own proposals per step), to use as the proposal of
    :func:`~pyro_rws.importance_posterior` for that observation.

    A guide fitted to simulations (:func:`fit_guide`: neural posterior estimation) covers the
    posterior of every observation the prior predicts, so for a given :math:`x_o` it is often
    much wider than the posterior, and importance sampling from it needs very many particles
    (few of them carry weight). The wake-phi gradient, :math:`-\sum_k \bar w_k \nabla_\phi \log
    q_\phi(z_k | x_o)` with self-normalized weights :math:`\bar w_k \propto p(z_k, x_o) /
    q_\phi(z_k | x_o)`, moves :math:`q` towards the posterior of :math:`x_o` itself (it
    minimizes :math:`\mathrm{KL}(p(z | x_o) \,\|\, q_\phi)`, biased for finite K), using the
    likelihood but no new simulations. The guide passed in is left as it is.

    On sbibm's slcp at 10⁴ simulations (a four-mode posterior in five dimensions), 300 steps
    of 1,000 particles (~20 s) took the C2ST of the reweighted posterior (500,000 particles)
    from 0.565 and 0.658 to 0.507 and 0.527 (two seeds, observations 1–3; 0.5 is perfect;
    ``benchmarks/README.md``, section 12). Where almost no particle carries weight, each step
    follows one or two particles and can pull the guide off a mode of the posterior, which the
    weights do not reveal: with 100 particles per step one observation of six got worse. Keep
    ``num_particles`` large and the learning rate small.

    Example::

        guide_o = pyro_rws.refine_guide(model, guide, observations={"data": x_o})
        posterior = pyro_rws.importance_posterior(
            model, guide_o, observations={"data": x_o}, num_particles=50_000)

    :param model: the model, with a likelihood (an observed site with a density); conditioned
        on ``observations``, or on its arguments (``*args``, ``**kwargs``, passed to model and
        guide) as in :func:`~pyro_rws.importance_posterior`.
    :param torch.nn.Module guide: an amortized guide whose parameters are its own (e.g.
        :class:`~pyro_rws.AutoAmortizedFlow`); it is deep-copied and the copy is trained.
    :param dict observations: ``{site: value}``, the observation.
    :param int num_steps: gradient steps.
    :param int num_particles: K, proposals per step (at least 2); default 1,000 with vectorized
        particles (on slcp 1,000 did much better than 100 at twice the time per step, and
        5,000 no better), 100 with ``vectorize_particles=False`` (one program run each).
    :param float learning_rate: Adam's learning rate (small: the guide is already close).
    :param float clip_max_norm: clip the gradient norm (None: no clipping).
    :param int max_plate_nesting: nested plates (guessed from one run of the model).
    :param bool vectorize_particles: as for :class:`~pyro_rws.RWS`.
    :param bool progress: show a progress bar (default: in a terminal or notebook).
    :returns: the trained copy of the guide.
    """
    if not isinstance(guide, torch.nn.Module):
        raise TypeError(
            "refine_guide trains a copy of the guide, so the guide must be a torch.nn.Module "
            "holding its parameters (e.g. AutoAmortizedFlow); for a guide with pyro.param, run "
            "SVI(model, guide, optim, loss=RWS(K, insomnia=1.0)) on the observation instead"
        )
    num_steps = check_count("num_steps", num_steps, 1)
    if num_particles is None:
        num_particles = 1000 if vectorize_particles else 100
    check_count("num_particles", num_particles, 2)
    refined = copy.deepcopy(guide)
    model_o, guide_o, nesting = condition_on(
        model, refined, observations, args, kwargs, max_plate_nesting
    )
    loss = ReweightedWakeSleep(
        num_particles,
        insomnia=1.0,
        max_plate_nesting=nesting,
        vectorize_particles=vectorize_particles,
    )
    params, seen, optimizer = [], set(), None
    with _bar(num_steps, progress, "refine_guide", "step") as bar:
        for _ in range(num_steps):
            value = loss.differentiable_loss(model_o, guide_o, *args, **kwargs)
            # a guide may create parameters when it meets a site for the first time
            # (AutoAmortizedProposal's heads): they join the optimizer as they appear
            fresh = [p for p in refined.parameters() if p.requires_grad and id(p) not in seen]
            if fresh:
                params += fresh
                seen.update(id(p) for p in fresh)
                if optimizer is None:
                    optimizer = torch.optim.Adam(fresh, lr=learning_rate)
                else:
                    optimizer.add_param_group({"params": fresh})
            if optimizer is None:
                raise ValueError("the guide has no parameters to train")
            optimizer.zero_grad()
            value.backward(inputs=params)  # the guide's only: no wake-theta on model params
            if clip_max_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_max_norm)
            optimizer.step()
            bar.update(1)
    return refined
