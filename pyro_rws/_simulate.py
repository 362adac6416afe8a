# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
How :func:`~pyro_rws.simulate` runs the model: what is recorded of a site
(:class:`~pyro_rws.simulation.Site`), the vectorized modes (``"plate"``, ``"leading"``) and one
run per simulation, the seed of each chunk or run, and the worker processes. The public function
and the stored :class:`~pyro_rws.Simulations` are in :mod:`pyro_rws.simulation`.
"""

from __future__ import annotations

import inspect
import io
import multiprocessing
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyro.poutine as poutine
import torch
from pyro.poutine.indep_messenger import CondIndepStackFrame

from ._sleep import Uncondition, reject_factors
from ._structure import is_deterministic, is_sample, plate_frames
from ._traces import SampleTrace, in_particle_plate
from .examples.progress import progress as _progress


# --------------------------------------------------------------------------------------------
# What is recorded of a site
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    """One sample site of a simulation: its role, per-run shape, event dim and plates."""

    name: str
    observed: bool
    deterministic: bool
    event_dim: int
    run_shape: tuple
    frames: tuple  # CondIndepStackFrame of the model's plates, outermost first
    obs_slot: int | str | None  # the argument an obs= value was, for the guide's routing

    def to_plain(self) -> tuple:
        frames = tuple(tuple(f) for f in self.frames)
        return (
            self.name,
            self.observed,
            self.deterministic,
            self.event_dim,
            self.run_shape,
            frames,
            self.obs_slot,
        )

    @classmethod
    def from_plain(cls, t) -> Site:
        frames = tuple(CondIndepStackFrame(*f) for f in t[5])
        return cls(t[0], t[1], t[2], t[3], tuple(t[4]), frames, t[6])


def _obs_slot(obs, args, kwargs):
    if obs is None:
        return None
    for i, a in enumerate(args):
        if a is obs:
            return i
    return next((k for k, v in kwargs.items() if v is obs), None)


def _keywords(model: Callable) -> frozenset:
    """The model's keyword parameters (of ``forward`` for a module)."""
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params if p.kind in kinds)


def _sites(trace, job: _Job) -> tuple[Site, ...]:
    """
    The sites of one run. An observation named in ``observed=`` that has no ``obs=`` but the
    name of a keyword parameter of the model left unset (Pyro's ``def model(x=None)``) is
    recorded as the fantasy of that keyword, so the guide receives it there.
    """
    args, kwargs, sites = job.args, job.kwargs, []
    for name, site in trace.nodes.items():
        if not is_sample(site):
            continue
        was_observed = bool(site["infer"].get("was_observed"))
        slot = _obs_slot(site["infer"].get("obs"), args, kwargs) if was_observed else None
        if (
            not was_observed
            and name in job.observed
            and name in job.keywords
            and kwargs.get(name) is None
        ):
            slot = name
        sites.append(
            Site(
                name,
                was_observed or name in job.observed,
                is_deterministic(site),
                int(site["fn"].event_dim),
                tuple(site["value"].shape),
                plate_frames(site),
                slot,
            )
        )
    return tuple(sites)


def _plate_tail(site: Site, nesting: int) -> tuple | None:
    """The site's shape inside a particle plate at dim ``-(nesting + 1)``, without that dim."""
    batch = site.run_shape[: len(site.run_shape) - site.event_dim]
    if len(batch) <= nesting:
        return (1,) * (nesting - len(batch)) + site.run_shape
    lead = len(batch) - nesting
    return site.run_shape[lead:] if all(s == 1 for s in batch[:lead]) else None


def _leading_tail(site: Site) -> tuple | None:
    """The site's shape without its leading batch dim of size 1 (sbibm's simulation dim)."""
    batch = site.run_shape[: len(site.run_shape) - site.event_dim]
    if not batch or batch[0] != 1 or any(f.vectorized for f in site.frames):
        return None
    if not site.observed and len(batch) != 1:
        return None  # a latent must be scored by the guide with its own event dims
    return site.run_shape[1:]


def _tails(sites, mode: str, nesting: int) -> dict | None:
    tail = _plate_tail if mode != "leading" else (lambda s, n: _leading_tail(s))
    tails = {s.name: tail(s, nesting) for s in sites}
    return None if any(t is None for t in tails.values()) else tails


# --------------------------------------------------------------------------------------------
# Seeds and runs
# --------------------------------------------------------------------------------------------
def _derived_seed(base: int, *key: int) -> int:
    """A 64-bit seed for ``key`` (chunk or simulation index) from the base seed."""
    state = np.random.SeedSequence(base, spawn_key=key).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def _set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class _LeadingBatch(poutine.messenger.Messenger):
    """Expand every sample site's leading batch dim of size 1 to ``size`` (sbibm's batching)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or msg["done"] or not is_sample(msg):
            return
        shape = msg["fn"].batch_shape
        if not shape or shape[0] not in (1, self.size):
            raise ValueError(
                f"site '{msg['name']}' has batch shape {tuple(shape)}, not a leading "
                f"simulation dim of size 1 or {self.size}"
            )
        if shape[0] == 1:
            msg["fn"] = msg["fn"].expand((self.size,) + tuple(shape[1:]))


class _Unvectorizable(Exception):
    pass


@dataclass
class _Job:
    model: Callable
    args: tuple
    kwargs: dict
    observed: frozenset
    num_simulations: int
    chunk_size: int
    seed: int
    mode: str = "runs"
    nesting: int = 0
    sites: tuple = ()
    tails: dict = field(default_factory=dict)
    keywords: frozenset = frozenset()


@torch.no_grad()
def _trace(fn, args, kwargs):
    return SampleTrace()(fn).get_trace(*args, **kwargs)


def _run_chunk(job: _Job, k: int):
    start = k * job.chunk_size
    size = min(job.chunk_size, job.num_simulations - start)
    model = Uncondition()(job.model)
    if job.mode == "runs":
        out = []
        for i in range(start, start + size):
            _set_seed(_derived_seed(job.seed, 1, i))
            trace = _trace(model, job.args, job.kwargs)
            reject_factors(trace, "simulate", "Write the factor as an observed sample site.")
            sites = _sites(trace, job)
            out.append((sites, {s.name: trace.nodes[s.name]["value"].detach() for s in sites}))
        return out
    _set_seed(_derived_seed(job.seed, 0, k))
    if job.mode == "plate":
        fn = in_particle_plate(model, size, job.nesting)
    else:
        fn = _LeadingBatch(size)(model)
    try:
        trace = _trace(fn, job.args, job.kwargs)
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as e:
        raise _Unvectorizable(f"{type(e).__name__}: {e}") from e
    names = [n for n, s in trace.nodes.items() if is_sample(s)]
    if names != [s.name for s in job.sites]:
        raise _Unvectorizable(f"the sites {names} differ from one run's {job.sites}")
    values = {}
    for name in names:
        value = trace.nodes[name]["value"].detach()
        if tuple(value.shape) != (size,) + job.tails[name]:
            raise _Unvectorizable(
                f"site '{name}' has shape {tuple(value.shape)}, not {(size,) + job.tails[name]}"
            )
        values[name] = value.contiguous()
    return values


_WORKER_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job
    torch.set_num_threads(1)


def _later_chunk(job: _Job, k: int):
    """Chunk ``k >= 1``, run the way chunk 0 was: a failure now is the model's to fix."""
    try:
        return _run_chunk(job, k)
    except _Unvectorizable as e:
        raise ValueError(
            f"simulate ran chunk 0 vectorized ({job.mode!r}), but chunk {k} failed that way: "
            f"{e}. The model's structure depends on its random draws: pass vectorize=False."
        ) from None


def _work(k: int) -> bytes:
    buffer = io.BytesIO()
    torch.save(_later_chunk(_WORKER_JOB, k) if k else _run_chunk(_WORKER_JOB, k), buffer)
    return buffer.getvalue()


def _run_chunks(job: _Job, first: int, num_workers: int, bar) -> list:
    """Chunks ``first, first + 1, ...`` in this process or in worker processes, in order."""
    num_chunks = -(-job.num_simulations // job.chunk_size)
    size = lambda k: min(job.chunk_size, job.num_simulations - k * job.chunk_size)  # noqa: E731
    chunks = []
    if num_workers == 1 or num_chunks - first <= 1:
        for k in range(first, num_chunks):
            chunks.append(_later_chunk(job, k) if k else _run_chunk(job, k))
            bar.update(size(k))
        return chunks
    # fork (the model need not pickle) unless CUDA is initialized (unsafe to fork)
    fork = "fork" in multiprocessing.get_all_start_methods()
    fork = fork and not (torch.cuda.is_available() and torch.cuda.is_initialized())
    context = multiprocessing.get_context("fork" if fork else "spawn")
    with context.Pool(num_workers, _init_worker, (job,)) as pool:
        for k, data in enumerate(pool.imap(_work, range(first, num_chunks)), first):
            # our own workers' results (with Site records): not a file from elsewhere
            chunks.append(torch.load(io.BytesIO(data), weights_only=False))
            bar.update(size(k))
    return chunks


def _bar(total: int, show: bool | None, desc: str, unit: str):
    return _progress(total=total, disable=None if show is None else not show, desc=desc, unit=unit)
