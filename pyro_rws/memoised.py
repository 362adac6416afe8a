# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
Memoised wake-sleep (:class:`MemoisedWakeSleep`): MWS [1] for guides whose latents are all
discrete, hybrid memoised wake-sleep (HMWS [2]) when the guide also samples continuous latents.
Its tests are tests/test_memoised.py; the memory itself is in ``pyro_rws._memory``.

Write the guide's latents as :math:`z = (d, c)`: :math:`d` the sites with enumerable support
(Bernoulli, Categorical, ...), :math:`c` the others. For each datapoint :math:`x_n` the loss
keeps a memory :math:`\mathcal{M}_n` of at most :math:`L` distinct values of :math:`d`. One step:

1. *Propose.* :math:`d'_1, \dots, d'_K \sim q_\phi(d | x_n)`.
2. *Score.* For every candidate :math:`d \in \mathcal{M}_n \cup \{d'_k\}` (memory re-scored
   with the current :math:`\theta`), draw :math:`c_1, \dots, c_J \sim q_\phi(c | d, x_n)` and
   estimate the marginal
   :math:`\hat p_\theta(d, x_n) = \frac1J \sum_j p_\theta(d, c_j, x_n) / q_\phi(c_j | d, x_n)`
   (unbiased; exactly :math:`p_\theta(d, x_n)` when there is no :math:`c`, then :math:`J = 1`).
3. *Select.* :math:`\mathcal{M}_n \leftarrow` the :math:`L` distinct candidates with the highest
   :math:`\log \hat p_\theta(d, x_n)` (of equal values the memory's copy and its particles count).
4. *Learn,* with :math:`w_{mj} = p_\theta(d_m, c_{mj}, x_n) / q_\phi(c_{mj} | d_m, x_n)` over
   :math:`d_m \in \mathcal{M}_n`, :math:`v_{mj} = w_{mj} / \sum_{m'j'} w_{m'j'}` (normalized over
   memory and particles) and :math:`\omega_m = \sum_j v_{mj}`:

.. math::

    \mathcal{L}_\theta &= -\log \sum_{m=1}^{L} \hat p_\theta(d_m, x_n)
        \quad\text{(gradient } -\textstyle\sum_{mj} v_{mj} \nabla_\theta
        \log p_\theta(d_m, c_{mj}, x_n)\text{)}, \\
    \mathcal{L}_\phi^{\text{wake}} &= -\sum_{m} \mathrm{sg}(\omega_m) \log q_\phi(d_m | x_n)
        - \frac1{L} \sum_{m} \sum_j \mathrm{sg}(\bar u_{mj}) \log q_\phi(c_{mj} | d_m, x_n),
        \qquad \bar u_{mj} = w_{mj} / \textstyle\sum_{j'} w_{mj'}, \\
    \mathcal{L}_\phi &= \text{insomnia} \cdot \mathcal{L}_\phi^{\text{wake}}
        + (1 - \text{insomnia}) \cdot \mathcal{L}_\phi^{\text{sleep}}.

Without continuous latents :math:`\mathcal{L}_\theta` is exactly
:math:`-\log \sum_{d \in \mathcal{M}_n} p_\theta(d, x_n)`, a lower bound on
:math:`-\log p_\theta(x_n)` that is tight once the memory holds the posterior's mass, and the
discrete guide term fits :math:`q_\phi(d|x)` to the posterior restricted to the memory
(:math:`\omega_m = p_\theta(d_m|x_n) / \sum_{m'} p_\theta(d_{m'}|x_n)`): the expectation of
MWS's training on memory samples, without its sampling noise. These are the estimators of
``get_cmws_5_loss`` of the authors' code (github.com/tuananhle7/hmws, the variant its time-series
experiments run as HMWS); the particles scored in step 2 are those of step 4. In the sleep term
(:math:`-\log q_\phi(d, c | x)` on fantasies, as in :class:`~pyro_rws.RWS`) the model's fantasy
replaces the data. Empty slots (a datapoint's first steps) carry no weight, and the mean over
:math:`L` is over filled slots. Sums over datapoints carry the subsample scale :math:`N/B`.

References

[1] `Learning to learn generative programs with Memoised Wake-Sleep`, Luke B. Hewitt,
    Tuan Anh Le, Joshua B. Tenenbaum (UAI 2020), arXiv:2007.03132

[2] `Hybrid Memoised Wake-Sleep: Approximate Inference at the Discrete-Continuous Interface`,
    Tuan Anh Le, Katherine M. Collins, Luke Hewitt, Kevin Ellis, N. Siddharth, Samuel J.
    Gershman, Joshua B. Tenenbaum (ICLR 2022), arXiv:2107.06393
"""

from __future__ import annotations

import math

import pyro.poutine as poutine
import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace
from pyro.util import warn_if_nan

from ._args import check_count, check_fraction
from ._base import WakeSleepLoss, shared_docs
from ._fantasy import FantasyArgs
from ._memory import Memory, from_memory_layout, support_size, to_memory_layout, top_distinct
from ._structure import is_latent
from ._traces import SampleTrace, in_particle_plate, wake_traces
from ._weights import _aligned, check_finite_bound, log_weights, scaled, site_log_prob
from .diagnostics import StepStats


def _is_discrete(site: dict) -> bool:
    return bool(getattr(site["fn"], "has_enumerate_support", False))


@shared_docs
class MemoisedWakeSleep(WakeSleepLoss):
    r"""
    Memoised wake-sleep [1] and, when the guide also samples continuous latents, hybrid memoised
    wake-sleep [2] (the math is in :mod:`pyro_rws.memoised`). For models whose posterior over
    discrete structure is sharply peaked (program induction, kernel structure, object counts):
    importance sampling from the guide rarely hits the few values that carry the mass, while a
    memory of the best values found so far keeps them once found.

    The guide's sites with enumerable support (``dist.Bernoulli``, ``dist.Categorical``, ...)
    are the discrete latents held in memory; its other sites are importance-sampled given them,
    ``num_continuous_particles`` per memory element. The guide must sample the discrete sites
    before the continuous ones that depend on them. Particles always run vectorized (there is
    no ``vectorize_particles=False``): model and guide must broadcast over a particle dimension
    left of their plates.

    **The memory** is kept per datapoint of the plate named ``data_plate`` (default ``"data"``),
    indexed by its subsample indices: ``pyro.plate("data", N, subsample=idx)`` (or
    ``subsample_size=B``; without subsampling, all N). It is made on the first step, on the
    device of the data, and holds up to ``memory_size`` distinct values per datapoint; every
    call of :meth:`loss`, :meth:`loss_and_grads` or :meth:`differentiable_loss` updates it for
    the datapoints it sees. Save and restore it with :meth:`state_dict` and
    :meth:`load_state_dict` (alongside the parameters); read it with :meth:`memory`. Every
    latent site must lie in the data plate.

    **Value.** :meth:`loss` returns :math:`-\sum_n \frac{N}{B}\log \sum_{d \in \mathcal{M}_n}
    \hat p_\theta(d, x_n)`, the negative log of the memory-restricted marginal (without
    continuous latents a bound: the memory's mass never exceeds :math:`p_\theta(x_n)`).
    :attr:`stats` holds it as ``bound`` and ``wake_theta``, the guide terms, and as ``ess``
    :math:`1/\sum_{mj} v_{mj}^2` per datapoint (not watched: a memory that concentrates on one
    value is what MWS aims for on a peaked posterior).

    <<methods>>

    Example::

        mws = MemoisedWakeSleep(memory_size=5, num_particles=10)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=mws)
        for step in range(num_steps):
            idx = torch.randint(N, (B,))
            svi.step(x[idx], idx)     # the model and guide use pyro.plate("data", N, subsample=idx)
        torch.save({"params": pyro.get_param_store().get_state(), "memory": mws.state_dict()}, f)

    :param int memory_size: L, the distinct discrete values kept per datapoint.
    :param int num_particles: K, discrete proposals drawn from the guide per datapoint and step.
    :param int num_continuous_particles: J, continuous particles per memory element and proposal
        for the estimate of its marginal (default K; unused without continuous latents).
    :param float insomnia: weight of the memory (wake) term against the sleep term for the
        guide, in [0, 1]. Default 1 (memory only, as in MWS); the hmws experiments use 0.5.
    :param str data_plate: the name of the plate whose datapoints have a memory each.
    <<num_sleep_particles>>
    <<max_plate_nesting>>
    <<fantasy_args>>
    <<retain_graph>>
    """

    def __init__(
        self,
        memory_size: int = 10,
        num_particles: int = 10,
        num_continuous_particles: int | None = None,
        insomnia: float = 1.0,
        data_plate: str = "data",
        num_sleep_particles: int | None = None,
        max_plate_nesting: int | float = math.inf,
        *,
        fantasy_args: FantasyArgs = None,
        retain_graph: bool | None = None,
    ):
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=True,
            retain_graph=retain_graph,
            fantasy_args=fantasy_args,
            num_sleep_particles=num_sleep_particles,
        )
        self.memory_size = check_count("memory_size", memory_size, 1)
        self.num_continuous_particles = check_count(
            "num_continuous_particles",
            self.num_particles if num_continuous_particles is None else num_continuous_particles,
            1,
        )
        self.insomnia = check_fraction("insomnia", insomnia)
        if not isinstance(data_plate, str):
            raise TypeError(f"data_plate must be the name of a plate (a str), got {data_plate!r}")
        self.data_plate = data_plate
        self._memory = Memory(self.memory_size)

    @property
    def uses_sleep_phase(self) -> bool:
        return self.insomnia < 1.0

    # ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The memory (values, validity and last scores per datapoint), for ``torch.save``."""
        return self._memory.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the memory saved by :meth:`state_dict` (copied, on the device it was on)."""
        self._memory.load_state_dict(state)

    def memory(self, index: torch.Tensor | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """
        The memory of the datapoints ``index`` (all if None), best first: per discrete site its
        values of shape ``(B, memory_size) + rest``, whether each slot is filled, and the
        log-marginal estimate each value had at its last selection.
        """
        if not self._memory.allocated:
            raise ValueError("the memory is empty: it is made on the first step of the loss")
        if index is None:
            index = torch.arange(self._memory.num_data, device=self._memory.valid.device)
        values, valid = self._memory.select(index)
        return values, valid, self._memory.scores[index]

    # ----------------------------------------------------------------------------------------
    def _terms(self, model, guide, args, kwargs):
        P = self._plate_nesting(model, guide, args, kwargs)
        K, L = self.num_particles, self.memory_size
        with torch.no_grad():
            proposal = SampleTrace(detach=True)(in_particle_plate(guide, K, P)).get_trace(
                *args, **kwargs
            )
        index, frame, discrete, continuous = self._inspect(proposal)
        J = self.num_continuous_particles if continuous else 1
        event = {name: proposal.nodes[name]["fn"].event_dim for name in discrete}
        proposed = {
            name: to_memory_layout(proposal.nodes[name]["value"], event[name], frame.dim, P)
            for name in discrete
        }
        B = index.shape[0]
        self._prepare_memory(proposal, frame, proposed, event)
        stored, stored_valid = self._memory.select(index)
        candidates = {n: torch.cat([stored[n], proposed[n]], 1) for n in discrete}
        keep = torch.cat([stored_valid, stored_valid.new_ones(B, K)], 1)
        C = L + K

        # score every candidate with J continuous particles from the guide, model replayed
        replay = Trace()
        for name, site in proposal.nodes.items():
            if site["type"] == "sample" and name in discrete or name == self.data_plate:
                value = site["value"]
                if name in discrete:
                    value = candidates[name].repeat_interleave(J, 1)
                    value = from_memory_layout(value, event[name], frame.dim, P)
                replay.add_node(name, **{**site, "value": value})
        runs, minibatch = self._score_runs(
            model, poutine.replay(guide, trace=replay), args, kwargs, P, num=C * J
        )
        lw = log_weights(runs, plate_nesting=P, vectorized=True)
        if lw.log_p.shape != (C * J, B):
            raise ValueError(
                f"MemoisedWakeSleep keeps one memory per datapoint of plate '{self.data_plate}', "
                "which must be the only plate that encloses every sample site of model and "
                f"guide; the importance weights have batch shape {tuple(lw.log_p.shape[1:])} "
                f"instead of ({B},). Move global latents into the data plate (or use RWS)."
            )
        log_q_d = self._log_q_discrete(runs[0][1], discrete, lw.scale, P, frame.dim, B)
        log_p = lw.log_p.view(C, J, B)
        log_q_c = (lw.log_q - log_q_d).view(C, J, B)
        log_q_d = log_q_d.view(C, J, B)
        log_w = (log_p - log_q_c).detach()
        scores = torch.logsumexp(log_w, 1) - math.log(J)  # (C, B)

        with torch.no_grad():
            best, valid = top_distinct(candidates, scores.T, keep, L)  # (B, L)
            selected = {
                n: v.gather(1, best.view(B, L, *(1,) * (v.dim() - 2)).expand(B, L, *v.shape[2:]))
                for n, v in candidates.items()
            }
            self._memory.update(index, selected, valid, scores.T.gather(1, best))

        at = best.T[:, None, :].expand(L, J, B)
        filled = valid.T[:, None, :]
        log_w = torch.where(filled, log_w.gather(0, at), -math.inf)
        flat = log_w.reshape(L * J, B)
        marginal = torch.logsumexp(flat, 0) - math.log(J)
        check_finite_bound(marginal, flat, runs)
        v = torch.softmax(flat, 0).view(L, J, B)
        bound = scaled(lw.scale, marginal.sum())
        loss = -bound

        def weighted(weights, log_density):  # weight-zero terms dropped (0 * -inf is NaN)
            return (weights * torch.where(weights > 0, log_density.gather(0, at), 0.0)).sum()

        surrogate = scaled(-lw.scale, weighted(v, log_p))
        stats = StepStats(loss, wake_theta=loss, bound=bound)
        stats.ess = v.square().sum((0, 1)).reciprocal()
        if self.insomnia > 0.0:
            wake_phi = weighted(v, log_q_d)
            if continuous:
                u = torch.where(filled, torch.softmax(log_w, 1), 0.0)
                wake_phi = wake_phi + weighted(u / valid.sum(1).clamp(min=1), log_q_c)
            wake_phi = scaled(-lw.scale, wake_phi)
            stats.wake_phi = wake_phi.detach()
            surrogate = surrogate + scaled(self.insomnia, wake_phi)
        if self.insomnia < 1.0:
            sleep_phi = self._sleep_phi(
                model, guide, args, kwargs, P, minibatch, self.num_sleep_particles
            )
            surrogate = surrogate + (1.0 - self.insomnia) * sleep_phi
            stats.sleep_phi = sleep_phi.detach()
        if is_validation_enabled():
            warn_if_nan(surrogate, "memoised wake-sleep surrogate loss")
        return loss, surrogate, stats

    def _score_runs(self, model, guide, args, kwargs, plate_nesting, num):
        return wake_traces(
            model,
            guide,
            args,
            kwargs,
            num_particles=num,
            vectorize=True,
            plate_nesting=plate_nesting,
            detach=True,
            need_minibatch=self.uses_sleep_phase,
        )

    def _inspect(self, trace: Trace):
        """The data plate's indices and frame, and the guide's discrete and continuous sites."""
        plate = trace.nodes.get(self.data_plate)
        if plate is None or plate["type"] != "sample":
            raise ValueError(
                f"MemoisedWakeSleep keeps a memory per datapoint of the plate named "
                f"'{self.data_plate}', but the guide has no such plate. Put the guide's latents "
                f"in pyro.plate('{self.data_plate}', N, subsample=idx) (the same in the model), "
                "or pass data_plate='<name of your data plate>'."
            )
        latents = [(n, s) for n, s in trace.nodes.items() if is_latent(s)]
        discrete = [n for n, s in latents if _is_discrete(s)]
        continuous = [n for n, s in latents if not _is_discrete(s)]
        if not discrete:
            raise ValueError(
                "MemoisedWakeSleep needs discrete latents (guide sites with enumerable support, "
                "e.g. Bernoulli or Categorical) to keep in memory; this guide has none. Use RWS "
                "or VIMCO for models with continuous latents only."
            )
        frame = None
        for name, site in latents:
            frames = [f for f in site["cond_indep_stack"] if f.name == self.data_plate]
            if not frames:
                raise ValueError(
                    f"guide site '{name}' is outside the data plate '{self.data_plate}': "
                    "MemoisedWakeSleep keeps a memory per datapoint, so every latent must be "
                    "per datapoint (inside that plate)."
                )
            if not frames[0].vectorized:
                raise ValueError(
                    f"the data plate '{self.data_plate}' is a sequential plate (a Python loop); "
                    "MemoisedWakeSleep needs it vectorized (`with pyro.plate(...)`)."
                )
            frame = frames[0]
        return plate["value"], frame, discrete, continuous

    def _prepare_memory(self, trace, frame, proposed, event) -> None:
        N = frame.size if frame.full_size is None else frame.full_size
        any_value = next(iter(proposed.values()))
        score_like = any_value.new_zeros((), dtype=torch.get_default_dtype())
        if not self._memory.allocated:
            total = 1
            for name, v in proposed.items():
                draws = math.prod(v.shape[2 : v.dim() - event[name]])
                total *= support_size(trace.nodes[name]["fn"], draws)
            if self.memory_size > total:
                raise ValueError(
                    f"memory_size={self.memory_size} is more than the {total} distinct values "
                    f"the discrete latents {sorted(proposed)} of one datapoint can take: the "
                    f"memory could never fill. Use memory_size <= {total}."
                )
            self._memory.allocate(N, proposed, score_like)
            return
        self._memory.check(N, proposed)
        if self._memory.valid.device != any_value.device:
            self._memory.to(any_value.device)

    @staticmethod
    def _log_q_discrete(guide_trace, discrete, scale, P, data_dim, B) -> torch.Tensor:
        """``log q(d | x)`` of the discrete guide sites, per particle and datapoint."""
        total = 0.0
        for name in discrete:
            site = guide_trace.nodes[name]
            lp = _aligned(site_log_prob(site, scale), site, P, True)
            keep = P + 1 + data_dim
            drop = [d for d in range(1, lp.dim()) if d != keep]
            lp = lp.sum(drop) if drop else lp
            total = total + lp.expand(lp.shape[0], B)
        return total


#: Short name for :class:`MemoisedWakeSleep`.
MWS = MemoisedWakeSleep
