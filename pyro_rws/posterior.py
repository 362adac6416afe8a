# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
Posteriors for an observation: the guide's samples reweighted by importance sampling.

The guide itself is fitted to the simulations by :func:`~pyro_rws.fit_guide`
(:mod:`pyro_rws.fitting`).

**Reweighting.** For particles :math:`z^k \sim q(z | x)`, :math:`k = 1..K`, the
self-normalized weights

.. math:: \bar w_k = \frac{w_k}{\sum_j w_j}, \qquad w_k = \frac{p(x, z^k)}{q(z^k | x)},

make :math:`\sum_k \bar w_k \delta_{z^k}` an approximation of :math:`p(z | x)` that is consistent
as :math:`K \to \infty` whatever the guide (whose support must cover the posterior's), while
:math:`\log \frac1K \sum_k w_k` estimates :math:`\log p(x)` (a lower bound in expectation, the
number :func:`~pyro_rws.log_evidence` returns for the same particles) and Kish's effective
sample size :math:`1 / \sum_k \bar w_k^2` says how many independent posterior draws the
particles are worth. :meth:`~pyro_rws.ImportancePosterior.sample` resamples them
(multinomially, with replacement) into unweighted posterior draws.

Particles are drawn ``chunk_size`` at a time, as :func:`~pyro_rws.log_evidence` draws them
(the same weights for the same seed and chunk size); the latents of every chunk are kept for
resampling (memory ``K`` times the latents' size, 10⁶ particles of a 10-d latent are 80 MB in
float64), the per-chunk traces are not. ``keep_particles=False`` keeps the weights only.

**Stochastic control flow.** With ``vectorize_particles=False`` each particle is a separate run
of guide and model, as in the losses, so particles may differ in structure (a random number of
objects, a parse tree). Each particle is then kept as a dict of the sites its run drew
(``ImportancePosterior.particles``), and
:meth:`~pyro_rws.ImportancePosterior.sample_particles` resamples whole runs: a list of dicts,
one per draw, each a consistent run (see ``pyro_rws._particles``). Weighted expectations
need no resampling: ``sum_k exp(log_weights[k]) f(particles[k])``.

A model whose observed site has no density (``pyro.deterministic``, a ``Delta``, or a
distribution without ``log_prob``: a simulator whose data are a deterministic function of its
noise) has no importance weights: the guide's samples are then returned unweighted, with a
warning, ``reweighted`` False and ``reason``
saying why; its evidence and effective sample size raise an error.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping

import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from ._args import check_count
from ._fantasy import accepts_observations
from ._particles import batch_cells, resample_particles, run_particle, stack_particles
from ._structure import (
    check_guide,
    is_deterministic,
    is_latent,
    is_sample,
    plate_frames,
)
from ._traces import SampleTrace, _cuda_devices, guess_plate_nesting, in_particle_plate
from ._weights import _batch_plates, check_finite_bound, effective_sample_size
from .evaluation import add_chunk, chunk_log_weights

# --------------------------------------------------------------------------------------------
# Importance sampling
# --------------------------------------------------------------------------------------------
_SUBSAMPLE_REMEDY = (
    "importance_posterior weights the particles per datapoint: condition on the full data "
    "(without subsampling the plate), or put every latent inside the data plate."
)


class ImportancePosterior:
    """
    Weighted particles from :func:`~pyro_rws.importance_posterior`.

    :ivar dict latents: ``{site: (K, *shape)}``, the guide's particles of every latent site, the
        particle dim first (as in the vectorized losses); None with ``keep_particles=False``, or
        where sequential particles differ in structure (then see ``particles``).
    :ivar list particles: with ``vectorize_particles=False``: one dict ``{site: value}`` per
        particle, the latent sites its run drew (None for vectorized particles).
    :ivar torch.Tensor log_weights: normalized log-weights ``(K, *batch)``: one set per element
        of the plates that enclose every site (``(K,)`` for one observation and global latents).
    :ivar bool reweighted: False where the model has no likelihood to weight by (then the
        weights are uniform, the particles are the guide's samples).
    :ivar str reason: why not, or None.
    """

    def __init__(
        self,
        latents,
        log_weights,
        log_evidence,
        reweighted,
        reason,
        batch_dims,
        particles=None,
        cells=None,
        why_not_stacked=None,
    ):
        self.latents: dict[str, torch.Tensor] | None = latents
        self.particles: list[dict[str, torch.Tensor]] | None = particles
        self._cells = cells  # per particle {site: batch element}, sequential batch plates
        self._why_not_stacked = why_not_stacked
        self.log_weights: torch.Tensor = log_weights
        self.reweighted: bool = reweighted
        self.reason: str | None = reason
        self._log_evidence = log_evidence
        self._batch_dims = batch_dims  # positions of the batch plates in a site's shape

    @property
    def num_particles(self) -> int:
        return self.log_weights.shape[0]

    def __repr__(self) -> str:
        sites = list(self.latents) if self.latents is not None else None
        if sites is None and self.particles:
            sites = sorted({name for particle in self.particles for name in particle})
        batch = tuple(self.log_weights.shape[1:])
        text = f"ImportancePosterior(num_particles={self.num_particles}"
        text += f", batch_shape={batch}" if batch else ""
        text += f", sites={sites}" if sites is not None else ""
        if not self.reweighted:
            return text + ", reweighted=False)"

        def fmt(t):  # one number, or the range over the batch
            t = t.detach().reshape(-1)
            if t.numel() == 1:
                return f"{float(t):.4g}"
            return f"{float(t.min()):.4g}..{float(t.max()):.4g}"

        ess, log_z = self.effective_sample_size, self._log_evidence
        return text + f", ess={fmt(ess)}, log_evidence={fmt(log_z)})"

    def _check(self, what: str) -> None:
        if not self.reweighted:
            raise ValueError(
                f"{what} needs importance weights, and this model has none: {self.reason} "
                "The particles are the guide's samples, unweighted."
            )

    @property
    def log_evidence(self) -> torch.Tensor:
        """:math:`\\log \\frac1K \\sum_k w_k` per batch element (:func:`~pyro_rws.log_evidence`)."""
        self._check("log_evidence")
        return self._log_evidence

    @property
    def effective_sample_size(self) -> torch.Tensor:
        """Kish's ``1 / sum_k wbar_k^2`` per batch element (``K`` for a perfect guide)."""
        self._check("the effective sample size")
        return effective_sample_size(self.log_weights)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> dict:
        """
        ``num_samples`` posterior draws per batch element, resampled multinomially (with
        replacement) by the weights: ``{site: (num_samples, *shape)}``.
        """
        num_samples = check_count("num_samples", num_samples, 1)
        if self.latents is None and self.particles is not None:
            raise ValueError(
                f"sample stacks every site over the draws, and the particles differ in "
                f"structure: {self._why_not_stacked}. Use sample_particles(num_samples), a "
                "list of draws, each a dict of the sites of one run."
            )
        if self.latents is None:
            raise ValueError("sample needs the particles: call with keep_particles=True")
        if self._batch_dims is None:
            raise ValueError(
                "sample resamples along vectorized plates only, and the weights lie in a "
                "sequential plate (pyro.plate used as an iterator): vectorize that plate"
            )
        K = self.num_particles
        batch = self.log_weights.shape[1:]
        probs = self.log_weights.exp().reshape(K, -1).T  # (M, K)
        index = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
        index = index.T.reshape((num_samples,) + batch)
        out = {}
        for name, value in self.latents.items():
            shape = [1] * (value.dim() - 1)
            for size, pos in zip(batch, self._batch_dims, strict=True):
                shape[pos] = size
            idx = index.reshape(num_samples, *shape).expand(num_samples, *value.shape[1:])
            out[name] = torch.gather(value, 0, idx.to(value.device))
        return out

    def sample_particles(
        self, num_samples: int, generator: torch.Generator | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """
        ``num_samples`` posterior draws resampled multinomially (with replacement) by the
        weights, each a dict ``{site: value}`` of one particle's sites: defined whatever the
        structure of the particles (stochastic control flow, ``vectorize_particles=False``),
        each draw a complete run with exactly the sites its control flow met. With sequential
        batch plates (``for i in pyro.plate(...)``) each batch element is drawn by its own
        weights, and a draw holds, for each element, that element's sites from the particle
        drawn for it. Sequential particles are the values of their runs; vectorized ones
        (and sequential ones with vectorized batch plates) are slices of ``latents``, in
        the layout of :meth:`sample`.
        """
        num_samples = check_count("num_samples", num_samples, 1)
        if self.particles is None and self.latents is None:
            raise ValueError("sample_particles needs the particles: call with keep_particles=True")
        K, batch = self.num_particles, self.log_weights.shape[1:]
        if self.particles is not None and (not batch or self._cells is not None):
            probs = self.log_weights.exp().reshape(K, -1).T  # (M, K)
            index = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
            index = index[0] if not batch else index.T  # (S,) or (S, M)
            return resample_particles(self.particles, self._cells, index.cpu())
        if self.latents is None:
            raise ValueError(
                "sample_particles resamples per batch element along sequential batch plates "
                f"only, and these particles differ in structure ({self._why_not_stacked}) "
                "with vectorized batch plates: weight the particles (log_weights, particles) "
                "instead of resampling them."
            )
        out = self.sample(num_samples, generator)
        return [{name: value[j] for name, value in out.items()} for j in range(num_samples)]


def condition_on(model, guide, observations, args, kwargs, max_plate_nesting=None):
    """
    ``(model, guide, max_plate_nesting)`` for one observation, as :func:`importance_posterior`
    and :func:`~pyro_rws.refine_guide` run them: the model conditioned on ``observations``
    (``poutine.condition``; None: on its arguments), the guide given them as its
    ``observations`` keyword if it has one, the plate nesting guessed from one run if not
    given, and observed batch dims that no plate declares read as event dims
    (:class:`_FoldBatch`).
    """
    if observations is not None:
        model = poutine.condition(model, data=dict(observations))
        if accepts_observations(guide):
            inner = guide

            def guide(*a, **kw):
                return inner(*a, observations=observations, **kw)

    if max_plate_nesting is None:
        max_plate_nesting = guess_plate_nesting(model, args, kwargs)
    return _FoldBatch(max_plate_nesting)(model), guide, max_plate_nesting


class _FoldBatch(poutine.messenger.Messenger):
    """
    Observed sites with batch dims right of the particle dim that no plate declares (sbibm's
    slcp: ``(B, 4)`` draws per simulation) have them read as event dims: one joint likelihood
    per particle, as :func:`~pyro_rws.simulate` stores them.
    """

    def __init__(self, plate_nesting: int):
        super().__init__()
        self.plate_nesting = plate_nesting

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and msg["is_observed"] and is_sample(msg):
            extra = len(msg["fn"].batch_shape) - self.plate_nesting - 1
            if extra > 0 and not any(f.vectorized for f in plate_frames(msg)):
                msg["fn"] = msg["fn"].to_event(extra)


def _without_density(site: dict) -> str | None:
    fn = site["fn"]
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution, dist.ExpandedDistribution)):
        fn = fn.base_dist
    name = site["name"]
    if is_deterministic(site) or isinstance(fn, dist.Delta):
        return f"observed site '{name}' is a deterministic function of the latents (a Delta)"
    try:
        site["fn"].log_prob(site["value"])
    except NotImplementedError:
        return f"observed site '{name}' has no log_prob ({type(site['fn']).__name__})"
    return None


def _no_likelihood(model, args, kwargs) -> str | None:
    with torch.random.fork_rng(devices=_cuda_devices()), poutine.block():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    for site in trace.nodes.values():
        if is_sample(site) and site["is_observed"]:
            reason = _without_density(site)
            if reason is not None:
                return reason
    return None


def _device(trace) -> torch.device:
    values = [s["value"] for s in trace.nodes.values() if is_latent(s)]
    return values[0].device if values else torch.device("cpu")


@torch.no_grad()
def importance_posterior(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 10_000,
    chunk_size: int = 1000,
    observations: Mapping | None = None,
    keep_particles: bool = True,
    max_plate_nesting: int | None = None,
    vectorize_particles: bool = True,
    **kwargs,
) -> ImportancePosterior:
    r"""
    The posterior of the observed data by importance sampling with the guide as proposal (see
    :mod:`pyro_rws.posterior`): ``num_particles`` weighted particles, their effective sample
    size, :math:`\log \hat p(x)`, and resampled posterior draws.

    Example (sbibm's simulator, an amortized guide trained by :func:`~pyro_rws.fit_guide`)::

        posterior = pyro_rws.importance_posterior(
            model, guide, observations={"data": x_o}, num_particles=100_000)
        print(posterior.effective_sample_size / posterior.num_particles)
        theta = posterior.sample(10_000)["parameters"]

    :param model: the model, conditioned on the data (``obs=`` of its arguments, or
        ``observations``); ``*args`` and ``**kwargs`` go to model and guide.
    :param guide: the proposal, e.g. a guide trained by :func:`~pyro_rws.fit_guide`.
    :param int num_particles: K.
    :param int chunk_size: particles per vectorized run, or sequential runs whose traces are
        kept at once (memory for traces).
    :param dict observations: ``{site: value}`` to condition the model on
        (``poutine.condition``), also passed to a guide with an ``observations`` keyword.
    :param bool keep_particles: keep the latents of every particle (for
        :meth:`~pyro_rws.ImportancePosterior.sample`).
    :param int max_plate_nesting: nested plates (guessed from one run of the model).
    :param bool vectorize_particles: one vectorized run per chunk (default, as in the
        losses), or one run of guide and model per particle, for programs with stochastic
        control flow (then :meth:`~pyro_rws.ImportancePosterior.sample_particles` resamples
        whole runs, and :meth:`~pyro_rws.ImportancePosterior.sample` works where every
        particle has the same sites).
    :rtype: ImportancePosterior
    """
    K = check_count("num_particles", num_particles, 1)
    chunk_size = check_count("chunk_size", chunk_size, 1)
    vectorize = bool(vectorize_particles)
    check_guide(guide, sleep=False)
    model, guide, max_plate_nesting = condition_on(
        model, guide, observations, args, kwargs, max_plate_nesting
    )
    reason = _no_likelihood(model, args, kwargs)
    if reason is not None:
        warnings.warn(
            f"importance_posterior cannot reweight the guide's samples: {reason}, so the model "
            "has no likelihood p(x | z) to weight by. It returns the guide's samples, "
            "unweighted (reweighted=False); log_evidence and the effective sample size are not "
            "available. Give the observed site a distribution with a density to reweight.",
            UserWarning,
            stacklevel=3,
        )
    latents, chunks, total, minibatch, batch_dims = {}, [], None, None, ()
    particles, cells, event_dims = [], [], {}
    for start in range(0, K, chunk_size):
        size = min(chunk_size, K - start)
        if reason is None:
            runs, lw, minibatch = chunk_log_weights(
                model,
                guide,
                args,
                kwargs,
                size,
                max_plate_nesting,
                minibatch,
                _SUBSAMPLE_REMEDY,
                vectorize,
            )
            total = add_chunk(total, lw)
            frames = _batch_plates(runs, True, _SUBSAMPLE_REMEDY)[0]
            if start == 0:
                ordered = sorted(frames.values(), key=str)
                if all(f.vectorized for f in ordered):  # else sample() says it cannot
                    ordered = sorted(ordered, key=lambda f: f.dim)
                    batch_dims = tuple(max_plate_nesting + f.dim for f in ordered)
                else:
                    batch_dims = None
            guide_traces = [guide_trace for _, guide_trace in runs]
        else:
            if vectorize:
                fn = in_particle_plate(guide, size, max_plate_nesting)
                guide_traces = [SampleTrace(detach=True)(fn).get_trace(*args, **kwargs)]
            else:
                guide_traces = [
                    SampleTrace(detach=True)(guide).get_trace(*args, **kwargs) for _ in range(size)
                ]
            lw = torch.zeros(size, device=_device(guide_traces[0]))
            runs, frames = None, {}
        chunks.append(lw)
        if keep_particles and vectorize:
            _keep_vectorized(guide_traces[0], size, max_plate_nesting, latents, start == 0)
        elif keep_particles:
            for guide_trace in guide_traces:
                particles.append(run_particle(guide_trace))
                for name, site in guide_trace.nodes.items():
                    if is_latent(site):
                        event_dims.setdefault(name, site["fn"].event_dim)
            if frames and not any(f.vectorized for f in frames.values()):
                cells.extend(batch_cells(runs, frames))
    lw = torch.cat(chunks)
    normalized = lw - torch.logsumexp(lw, 0)
    log_evidence = None if total is None else total - math.log(K)
    if log_evidence is not None:
        check_finite_bound(log_evidence, lw)  # with validation on: a clear error if all w = 0
    if not keep_particles:
        return ImportancePosterior(
            None, normalized, log_evidence, reason is None, reason, batch_dims
        )
    if vectorize:
        latents = {n: torch.cat(v) for n, v in latents.items()}
        return ImportancePosterior(
            latents, normalized, log_evidence, reason is None, reason, batch_dims
        )
    stacked, why = stack_particles(particles, event_dims, max_plate_nesting)
    return ImportancePosterior(
        stacked,
        normalized,
        log_evidence,
        reason is None,
        reason,
        batch_dims,
        particles=particles,
        cells=cells or None,
        why_not_stacked=why,
    )


def _keep_vectorized(guide_trace, size, plate_nesting, latents, first) -> None:
    """Append the latents of one vectorized chunk to ``latents`` (same sites in every chunk)."""
    names = [name for name, site in guide_trace.nodes.items() if is_latent(site)]
    if not first and set(names) != set(latents):
        diff = sorted(set(names).symmetric_difference(latents))
        raise ValueError(
            f"the chunks of vectorized particles have different latent sites ({', '.join(diff)}): "
            "the program's structure is not static. Pass vectorize_particles=False (one run "
            "per particle)."
        )
    for name in names:
        value = guide_trace.nodes[name]["value"].detach()
        if value.shape[:1] != (size,):
            raise ValueError(
                f"guide site '{name}' has shape {tuple(value.shape)}, without the "
                f"particle dim in front (max_plate_nesting={plate_nesting})"
            )
        latents.setdefault(name, []).append(value)
