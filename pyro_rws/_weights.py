# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Per-datapoint importance weights, written once for every estimator.

From traces of the wake phase this module builds ``log p(x, z^k)`` and ``log q(z^k | x)`` with
one entry per particle ``k`` and per element of every plate that encloses *all* sample sites of
model and guide (the "batch plates", usually the data plate). Plates nested inside are summed.
Sites outside a plate (global latents) force joint weights along it.

Subsampling: for ``pyro.plate("data", N, subsample_size=B)`` the factor ``N / B`` is taken out
of every site and returned as :attr:`LogWeights.scale`, to multiply per-datapoint bounds
*outside* the log-sum-exp over particles. All other scales (``poutine.scale``) and masks stay
inside the weights as part of the model.

Model sites enumerated in the wake phase are summed out of ``log p`` per particle and per element
of the batch plates (see :mod:`pyro_rws._enum`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace
from pyro.util import check_site_shape
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from ._density import log_density
from ._enum import enumerated_log_p, is_enumerated
from ._structure import PARTICLE_PLATE, is_deterministic, is_latent, is_sample


@dataclass
class LogWeights:
    """
    Log densities of K particles, per element of the batch plates.

    ``log_p`` and ``log_q`` have shape ``(K,) + batch_shape``; ``batch_shape`` lists sequential
    batch plates (in order of nesting) and then vectorized ones (left to right). ``log_p`` carries
    the graph of the model's parameters, ``log_q`` that of the guide's. ``log_q_score`` is the part
    of ``log_q`` from sites without ``rsample`` (only computed on request, for VIMCO).
    """

    log_p: torch.Tensor
    log_q: torch.Tensor
    log_q_score: torch.Tensor | None
    scale: float

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_p - self.log_q


# --------------------------------------------------------------------------------------------
# Batch plates and the subsample scale
# --------------------------------------------------------------------------------------------
def _sites(runs: list[tuple[Trace, Trace]]):
    """Yield ``(site, role)`` for every sample site of model and guide in every run."""
    for model_trace, guide_trace in runs:
        for site in model_trace.nodes.values():
            if is_sample(site) and not is_deterministic(site):
                yield site, "model"
        for site in guide_trace.nodes.values():
            if is_latent(site):
                yield site, "guide"


def _full_size(frame) -> int:
    return frame.size if frame.full_size is None else frame.full_size


#: What to do about a subsampled plate that does not enclose every site, for the losses.
SUBSAMPLE_REMEDY = (
    "Put every latent inside the data plate, or train without subsampling, or use a loss that "
    "is linear in the log-weights (WakeSleepELBO with phase_q='sleep', or SleepPhaseLoss)."
)


def _batch_plates(runs, per_datapoint: bool, remedy: str) -> tuple[dict, float]:
    """
    The frames of plates enclosing every site (by name), and the product of their subsample
    factors. Raises if a subsampled plate does not enclose every site, because then its factor
    would have to act inside the weights, which is neither a bound nor unbiased.
    """
    if not per_datapoint:
        return {}, 1.0
    site_frames, common = [], None
    for site, _ in _sites(runs):
        # (most sites of a program run per particle lie in no plate: no frames to collect)
        stack = site["cond_indep_stack"]
        fr = {f.name: f for f in stack if f.name != PARTICLE_PLATE} if stack else {}
        site_frames.append((site["name"], fr))
        common = set(fr) if common is None else common.intersection(fr) if common else common
    common = common or set()
    frames = {}
    for _, fr in site_frames:
        for name, f in fr.items():
            if name in common:
                frames.setdefault(name, f)
            elif _full_size(f) != f.size:
                outside = sorted({n for n, other in site_frames if name not in other})
                raise ValueError(
                    f"plate '{name}' is subsampled ({f.size} of {_full_size(f)}) but does not "
                    f"enclose site(s) {outside}. Importance weights are then joint across the "
                    "minibatch, and a log-sum-exp over particles of a joint weight has no "
                    f"unbiased minibatch estimate (the {_full_size(f)}/{f.size} scale would act "
                    f"inside the weights). {remedy}"
                )
    scale = float(math.prod(_full_size(f) / f.size for f in frames.values()))
    return frames, scale


# --------------------------------------------------------------------------------------------
# Reducing one site's log-density to (K, batch)
# --------------------------------------------------------------------------------------------
def site_log_prob(site: dict, scale_divisor: float = 1.0) -> torch.Tensor:
    """``log fn(value)`` scaled and masked as the site says, with ``scale_divisor`` taken out."""
    log_p = log_density(site)
    scale, mask = site["scale"], site["mask"]
    if scale_divisor != 1.0:
        scale = scale / scale_divisor
    if mask is None and type(scale) in (float, int) and scale == 1:
        return log_p  # what scale_and_mask returns, without its checks (once per site and run)
    return scale_and_mask(log_p, scale, mask)


def _aligned(log_p: torch.Tensor, site: dict, plate_nesting: int, vectorized: bool):
    """Reshape a site's log-density to ``plate_nesting + 1`` dims, the particle dim first."""
    ndim = plate_nesting + (1 if vectorized else 0)
    if log_p.dim() > ndim:
        raise ValueError(
            f"site '{site['name']}' has log_prob of shape {tuple(log_p.shape)}, more batch "
            f"dimensions than its plates declare (max_plate_nesting={plate_nesting}). Declare "
            "event dimensions with .to_event(), wrap batch dimensions in pyro.plate, or raise "
            "max_plate_nesting."
        )
    if log_p.dim() < ndim:
        log_p = log_p.reshape((1,) * (ndim - log_p.dim()) + log_p.shape)
    return log_p if vectorized else log_p.unsqueeze(0)


def _reduce(log_p, keep_dims: list[int]) -> torch.Tensor:
    """Sum all dims except the particle dim and ``keep_dims`` (indices into the aligned shape)."""
    drop = [d for d in range(1, log_p.dim()) if d not in keep_dims]
    return log_p.sum(drop, keepdim=True) if drop else log_p


def log_weights(
    runs: list[tuple[Trace, Trace]],
    *,
    plate_nesting: int,
    vectorized: bool,
    per_datapoint: bool = True,
    score_parts: bool = False,
    subsample_remedy: str = SUBSAMPLE_REMEDY,
) -> LogWeights:
    """
    Build :class:`LogWeights` from wake-phase runs (see :func:`pyro_rws._traces.wake_traces`).

    :param int plate_nesting: the number of user plates (the particle dim sits left of them).
    :param bool vectorized: one run holds all particles (else one run per particle).
    :param bool per_datapoint: keep batch plates (for log-sum-exp estimators). If False, all
        plate dims are summed with every scale inside, giving shape ``(K,)``: enough for
        estimators linear in the log-weights (wake-sleep's wake-theta and ELBO).
    :param bool score_parts: also return the log-density of non-reparameterized guide sites.
    :param str subsample_remedy: what the error for a subsampled plate that does not enclose
        every site advises.
    """
    frames, scale = _batch_plates(runs, per_datapoint, subsample_remedy)
    vec = sorted((f for f in frames.values() if f.vectorized), key=lambda f: f.dim)
    seq = sorted(f.name for f in frames.values() if not f.vectorized)
    keep_dims = [plate_nesting + 1 + f.dim for f in vec]
    vec_shape = [f.size for f in vec]
    check_shapes = is_validation_enabled()

    def key_of(site):  # the counters of the site's sequential batch plates
        if not seq:
            return ()
        return tuple(
            next(f.counter for f in site["cond_indep_stack"] if f.name == name) for name in seq
        )

    particles = []
    for model_trace, guide_trace in runs:
        # accumulators keyed by the counters of sequential batch plates
        acc = {"model": {}, "guide": {}, "score": {}}

        def add(target, key, lp, acc=acc):
            prev = acc[target].get(key)
            acc[target][key] = lp if prev is None else prev + lp

        # (site, role, log-density or None to compute it)
        pieces = [(site, role, None) for site, role in _sites([(model_trace, guide_trace)])]
        if is_enumerated(model_trace):
            contracted, others = enumerated_log_p(
                model_trace,
                [site for site, role, _ in pieces if role == "model"],
                plate_nesting=plate_nesting,
                vectorized=vectorized,
                keep_plates=[PARTICLE_PLATE] + [f.name for f in vec],
                scale_divisor=scale,
                key_of=key_of,
            )
            for key, lp in contracted:
                add("model", key, _reduce(lp, keep_dims))
            pieces = [(site, "model", lp) for site, lp in others] + [
                piece for piece in pieces if piece[1] == "guide"
            ]
        for site, role, lp in pieces:
            if lp is None:
                lp = site_log_prob(site, scale)
            if check_shapes:
                site["log_prob"] = lp
                check_site_shape(site, plate_nesting + (1 if vectorized else 0))
            lp = _reduce(_aligned(lp, site, plate_nesting, vectorized), keep_dims)
            key = key_of(site)
            add(role, key, lp)
            if role == "guide" and score_parts and not site["fn"].has_rsample:
                add("score", key, lp)
        particles.append({k: _assemble(v, seq, vec_shape) for k, v in acc.items()})

    def stack(key):
        parts = [p[key] for p in particles]
        if any(part is None for part in parts):
            return None
        shapes = {tuple(part.shape[1:]) for part in parts}
        if len(shapes) > 1:
            raise ValueError(
                f"particles disagree on the sizes of the batch plates {list(frames)}: "
                f"{sorted(shapes)}. Every particle must visit the same datapoints."
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    log_p, log_q = stack("model"), stack("guide")
    if log_p is None:
        raise ValueError("the model has no sample sites: there is nothing to weight")
    if log_q is None:  # a model without latent variables
        log_q = torch.zeros_like(log_p)
    log_q_score = stack("score") if score_parts else None
    if score_parts and log_q_score is None:
        log_q_score = torch.zeros_like(log_q)
    return LogWeights(log_p, log_q, log_q_score, scale)


def _assemble(entries: dict, seq: list[str], vec_shape: list[int]) -> torch.Tensor | None:
    """Stack per-counter tensors ``(K, ...)`` into ``(K, *seq_sizes, *vec_shape)``."""
    if not entries:
        return None
    flat = {
        key: t if t.shape[1:] == tuple(vec_shape) else t.reshape(t.shape[0], *vec_shape)
        for key, t in entries.items()
    }
    if not seq:
        return flat[()]
    counters = [sorted({key[i] for key in flat}) for i in range(len(seq))]
    index = [{c: j for j, c in enumerate(cs)} for cs in counters]
    like = next(iter(flat.values()))
    zero = torch.zeros_like(like)
    grid = {tuple(index[i][c] for i, c in enumerate(key)): t for key, t in flat.items()}
    sizes = [len(cs) for cs in counters]
    cells = [grid.get(pos, zero) for pos in itertools.product(*map(range, sizes))]
    return torch.stack(cells, 1).reshape(like.shape[0], *sizes, *vec_shape)


# --------------------------------------------------------------------------------------------
# Estimator pieces shared by the losses
# --------------------------------------------------------------------------------------------
def log_mean_exp(log_w: torch.Tensor) -> torch.Tensor:
    """``log (1/K) sum_k exp(log_w[k])`` over the particle dim 0, per batch element."""
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def scaled(factor: float, value: torch.Tensor) -> torch.Tensor:
    """``factor * value``, without an operation (and an autograd node) when ``factor`` is 1."""
    return value if factor == 1 else factor * value


def effective_sample_size(log_w: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """
    Kish's effective sample size ``1 / sum_k wbar_k^2`` per batch element (``weights``: the
    normalized weights ``softmax(log_w, 0)``, if already computed).
    """
    if weights is None:
        weights = torch.softmax(log_w, 0)
    return weights.square().sum(0).reciprocal()


def _nan_sites(runs) -> list[str]:
    names = []
    for site, role in _sites(runs or []):
        if bool(torch.isnan(site_log_prob(site)).any()):
            names.append(f"{role} site '{site['name']}'")
    return sorted(set(names))


def _raise_nan(runs) -> None:
    where = _nan_sites(runs)
    raise ValueError(
        "log importance weights contain NaN: "
        + (f"log_prob is NaN at {', '.join(where)}." if where else "a log_prob returned NaN.")
        + " Check the distribution parameters computed there (e.g. a network output)."
    )


def recording() -> bool:
    """True while :mod:`pyro_rws.jit` records a step: no concrete values (it checks them after)."""
    return get_proxy_mode() is not None


def check_finite_bound(bound: torch.Tensor, log_w: torch.Tensor, runs=None) -> None:
    """
    Raise a clear error if some datapoint has no particle with positive weight, or a weight is
    NaN or infinite. ``runs`` (the traces) let the error name the offending sites. Only with
    validation enabled (it synchronizes with the device); otherwise the loss checks the value it
    returns as a float.
    """
    if not is_validation_enabled() or recording() or bool(torch.isfinite(bound).all()):
        return
    if bool(torch.isnan(log_w).any()):
        _raise_nan(runs)
    if bool((bound == math.inf).any()):
        raise ValueError(
            "log importance weights contain +inf: the guide gives probability zero (or the model "
            "infinite density) to a sampled value. Check the guide's support against the model's."
        )
    bad = int((bound == -math.inf).sum())
    raise ValueError(
        f"all {log_w.shape[0]} particles have zero importance weight (log w = -inf) for {bad} "
        "batch element(s): the guide proposes values the model gives probability zero. Make "
        "the guide's support match the model's, or increase num_particles."
    )


def check_finite_elbo(elbo: torch.Tensor, log_w: torch.Tensor, runs=None) -> None:
    """Like :func:`check_finite_bound`, for estimators that average log-weights (the ELBO)."""
    if not is_validation_enabled() or recording() or bool(torch.isfinite(elbo)):
        return
    if bool(torch.isnan(log_w).any()):
        _raise_nan(runs)
    raise ValueError(
        "the ELBO is infinite: a guide sample has "
        + (
            "infinite density under the model or zero under the guide (log w = +inf)"
            if bool((log_w == math.inf).any())
            else "probability zero under the model (log p(x, z) = -inf)"
        )
        + ". Make the guide's support match the model's."
    )
