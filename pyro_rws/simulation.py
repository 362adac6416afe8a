# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
A simulation budget: pairs :math:`(z_i, x_i) \sim p(z)\,p(x | z)`, drawn once and kept.

:func:`~pyro_rws.simulate` runs the model forward ``num_simulations`` times, with every
``obs=`` site sampled (as the sleep phase does) and the sites named in ``observed=`` counted
as data, and returns them as :class:`~pyro_rws.Simulations`, a
:class:`torch.utils.data.Dataset`, on which :func:`~pyro_rws.fit_guide`
(:mod:`pyro_rws.fitting`) fits the guide.

**How the model is run.** In chunks of ``chunk_size`` simulations, in order of preference:

1. ``"plate"``: one run inside the particle plate of the vectorized losses (a plate of the chunk
   size at dim ``-(max_plate_nesting + 1)``), so each simulation is one particle;
2. ``"leading"``: for simulators written as ``sbibm``'s (no plates, every site with a leading
   batch dim of size 1 that the code itself treats as the simulation dim, e.g. a prior
   ``expand_by([num_samples])`` and a simulator that asserts 2-d parameters), that leading dim
   is expanded to the chunk size at every site;
3. ``"runs"``: one run per simulation (stochastic control flow, or ``vectorize=False``).

**Seeds.** Chunk ``k`` (vectorized) or simulation ``i`` (one run each) is seeded from one base
``seed`` and its index, so the simulations do not depend on ``num_workers``; with one run per
simulation they do not depend on ``chunk_size`` either (vectorized chunks do: ``chunk_size``
decides which draws share a run).

**Storage.** Each site is stored as one tensor ``(num_simulations, *shape)``, ``shape`` being
the site's shape inside the particle plate without the particle dim (plates of the model
kept, as the vectorized losses see it), so that a minibatch of ``B`` simulations sits in a
particle plate of size ``B`` as ``B`` fantasies of :class:`~pyro_rws.SleepPhaseLoss` do. Each
site's structure is recorded too (:class:`~pyro_rws.simulation.Site`: plates, event dim,
which argument an ``obs=`` came from), for :func:`~pyro_rws.fit_guide` to score the guide
without running the model again.
Runs whose sites differ (random structure) are stored run by run.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
from pyro.util import get_rng_state, set_rng_state

from ._args import check_count, check_fraction
from ._simulate import (
    Site,
    _bar,
    _Job,
    _keywords,
    _run_chunk,
    _run_chunks,
    _tails,
    _Unvectorizable,
)

__all__ = ["Simulations", "Site", "simulate"]


def simulate(
    model: Callable,
    num_simulations: int,
    *args,
    observed: Iterable[str] | None = None,
    num_workers: int = 1,
    chunk_size: int = 1000,
    seed: int | None = None,
    vectorize: bool = True,
    max_plate_nesting: int | None = None,
    progress: bool | None = None,
    **kwargs,
) -> Simulations:
    r"""
    Run ``model(*args, **kwargs)`` forward ``num_simulations`` times and keep every sample site:
    a simulation budget for :func:`~pyro_rws.fit_guide`, as ``sbi``'s ``simulate_for_sbi``.

    Every ``obs=`` site is sampled instead of observed, as in the sleep phase. A site counts as
    *observed* (the data ``x`` the guide is conditioned on) if it has ``obs=`` in the model or
    is named in ``observed``; every other sample site is a latent ``z`` (``pyro.deterministic``
    sites are kept, but are neither, unless named). Simulators that sample their data without
    ``obs=`` (as ``sbibm``'s do) name it: ``observed=("data",)``.

    :param model: a Pyro model; ``*args`` and ``**kwargs`` are passed to it.
    :param int num_simulations: how many simulations.
    :param observed: names of sites to treat as observations besides the ``obs=`` sites.
    :param int num_workers: worker processes (forked; the model need not be picklable where
        fork is available). Each chunk is seeded by its index, so the result does not depend on
        the number of workers.
    :param int chunk_size: simulations per vectorized run, and per task of a worker (run one
        by one, the simulations go out in pieces of at most ``chunk_size``, small enough to
        keep every worker busy).
    :param int seed: base seed of the simulations (drawn from torch's generator if omitted,
        so ``pyro.set_rng_seed`` before the call also fixes them). The global random state is
        left as it was.
    :param bool vectorize: try vectorized runs (``"plate"``, then ``"leading"``, see the
        module docs) before one run per simulation; False: one run per simulation.
    :param int max_plate_nesting: nested plates of the model (guessed from one run).
    :param bool progress: show a progress bar (default: when writing to a terminal or a
        notebook).
    :rtype: Simulations
    """
    n = check_count("num_simulations", num_simulations, 1)
    chunk_size = check_count("chunk_size", chunk_size, 1)
    num_workers = check_count("num_workers", num_workers, 1)
    observed = frozenset([observed] if isinstance(observed, str) else (observed or ()))
    rng = get_rng_state()
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    job = _Job(model, args, dict(kwargs), observed, n, chunk_size, int(seed))
    job.keywords = _keywords(model)
    try:
        with _bar(n, progress, "simulate", "sim") as bar:
            # one run to learn the structure (seeded like simulation 0 when run alone)
            ((sites, _),) = _run_chunk(replace(job, num_simulations=1, chunk_size=1), 0)
            _check_sites(sites, observed, job)
            nesting = max_plate_nesting
            if nesting is None:
                dims = [f.dim for s in sites for f in s.frames if f.vectorized]
                nesting = -min(dims) if dims else 0
            job.sites, job.nesting = sites, check_count("max_plate_nesting", nesting, 0)
            chunks, reasons = [], []
            for mode in ("plate", "leading") if vectorize else ():
                tails = _tails(sites, mode, job.nesting)
                if tails is None:
                    reasons.append(f"{mode}: the site shapes do not fit")
                    continue
                job.mode, job.tails = mode, tails
                try:
                    chunks.append(_run_chunk(job, 0))
                    break
                except _Unvectorizable as e:
                    reasons.append(f"{mode}: {e}")
            if chunks:
                bar.update(min(chunk_size, n))
                job.nesting = 0 if job.mode == "leading" else job.nesting
            else:
                job.mode = "runs"
                if vectorize:
                    warnings.warn(
                        "simulate runs the model once per simulation (slow): it could not be "
                        "run vectorized (" + "; ".join(reasons) + "). Pass vectorize=False to "
                        "say so and silence this warning.",
                        UserWarning,
                        stacklevel=2,
                    )
                # one run per simulation does not depend on the chunks: pieces small enough to
                # keep every worker busy and the progress bar moving
                job.chunk_size = max(1, min(chunk_size, -(-n // (8 * num_workers))))
            chunks += _run_chunks(job, len(chunks), num_workers, bar)
    finally:
        set_rng_state(rng)
    return _assemble(job, chunks)


def _check_sites(sites, observed, job: _Job) -> None:
    names = {s.name for s in sites}
    unknown = sorted(observed - names)
    if unknown:
        raise ValueError(
            f"observed={sorted(observed)} names {unknown}, which are not sample sites of the "
            f"model (its sites: {sorted(names)})"
        )
    if not any(s.observed for s in sites):
        # Pyro's `def model(x=None): ... obs=x` called without x: the site looks latent
        unset = sorted(n for n in names if n in job.keywords and job.kwargs.get(n) is None)
        example = repr(tuple(unset)) if unset else "('data',)"
        hint = (
            f" The site(s) {unset} share their name with a keyword argument of the model left "
            f"unset (obs=None samples them as latents): pass observed={example}."
            if unset
            else ""
        )
        raise ValueError(
            "the model has no observed site: no site has obs= and observed= names none. Name "
            f"the data sites, e.g. observed={example} (the model's sites: {sorted(names)}); a "
            "simulator that returns its data rather than sampling it can record it with "
            "pyro.deterministic('data', x, event_dim=...)." + hint
        )
    for s in sites:
        if any(f.size != (f.full_size or f.size) for f in s.frames):
            raise ValueError(
                f"site '{s.name}' lies in a subsampled plate: simulate runs the full model "
                "(drop subsample_size= for the simulations)."
            )


def _assemble(job: _Job, chunks) -> Simulations:
    common = dict(
        plate_nesting=job.nesting, mode=job.mode, seed=job.seed, args=job.args, kwargs=job.kwargs
    )
    if job.mode != "runs":
        values = {s.name: torch.cat([c[s.name] for c in chunks]) for s in job.sites}
        return Simulations(values, job.sites, **common)
    runs = [run for chunk in chunks for run in chunk]
    if len({sites for sites, _ in runs}) == 1:
        tails = _tails(runs[0][0], "plate", job.nesting)
        if tails is not None:
            values = {
                s.name: torch.stack([v[s.name].reshape(tails[s.name]) for _, v in runs])
                for s in runs[0][0]
            }
            return Simulations(values, runs[0][0], **common)
    return Simulations(None, None, runs=runs, **common)


# --------------------------------------------------------------------------------------------
# The stored simulations
# --------------------------------------------------------------------------------------------
class Simulations(torch.utils.data.Dataset):
    """
    Simulations ``(z_i, x_i)``, as returned by :func:`~pyro_rws.simulate`: a
    :class:`~torch.utils.data.Dataset` whose item ``i`` is a dict ``{site name: value}`` (so a
    :class:`~torch.utils.data.DataLoader` batches them into ``{site name: (B, *shape)}``).

    Sites of a model with fixed structure are stored stacked, one tensor of shape
    ``(len(self), *shape)`` per site (``values``, :attr:`latents`,
    :attr:`observations`), ``shape`` being the site's shape inside the particle plate of the
    vectorized losses without the particle dim (e.g. ``(10,)`` for sbibm's 10-d data, ``(1,)``
    for a global scalar latent of a model with one plate). Simulations whose sites differ are
    stored run by run (``values`` is None, ``runs`` lists ``(sites, values)``).

    :ivar str mode: how they were run: ``"plate"``, ``"leading"`` or ``"runs"``.
    :ivar int plate_nesting: the particle plate's dim is ``-(plate_nesting + 1)``.
    :ivar int seed: the base seed of :func:`~pyro_rws.simulate`.
    :ivar tuple args: the model's arguments in :func:`~pyro_rws.simulate` (with ``kwargs``; not
        saved by :meth:`save`): :func:`~pyro_rws.fit_guide`'s default.
    """

    def __init__(
        self,
        values,
        sites,
        *,
        runs=None,
        plate_nesting=0,
        mode="plate",
        seed=None,
        args=(),
        kwargs=None,
    ):
        self.values: dict[str, torch.Tensor] | None = values
        self.sites: tuple[Site, ...] | None = sites
        self.runs: list | None = runs
        self.plate_nesting, self.mode, self.seed = plate_nesting, mode, seed
        self.args, self.kwargs = tuple(args), dict(kwargs or {})

    def _like(self, values=None, runs=None) -> Simulations:
        return Simulations(
            values,
            self.sites if values is not None else None,
            runs=runs,
            plate_nesting=self.plate_nesting,
            mode=self.mode,
            seed=self.seed,
            args=self.args,
            kwargs=self.kwargs,
        )

    def __len__(self) -> int:
        if self.values is None:
            return len(self.runs)
        return len(next(iter(self.values.values())))

    def __getitem__(self, index):
        """An int gives ``{site: value}``; a slice, list or index tensor gives Simulations."""
        if isinstance(index, numbers.Integral) or (torch.is_tensor(index) and index.dim() == 0):
            if self.values is None:
                return dict(self.runs[int(index)][1])
            return {name: v[int(index)] for name, v in self.values.items()}
        return self.subset(index)

    def subset(self, index) -> Simulations:
        """The simulations at ``index`` (a slice, list or index tensor)."""
        if self.values is None:
            picked = range(len(self))[index] if isinstance(index, slice) else index
            return self._like(runs=[self.runs[int(i)] for i in picked])
        if not isinstance(index, slice):
            index = torch.as_tensor(index, device=next(iter(self.values.values())).device)
        return self._like({name: v[index] for name, v in self.values.items()})

    @classmethod
    def cat(cls, parts: Iterable[Simulations]) -> Simulations:
        """Simulations of the same model, one after the other (e.g. a budget in rounds)."""
        parts = list(parts)
        first = parts[0]
        if any(p.sites != first.sites or p.plate_nesting != first.plate_nesting for p in parts):
            raise ValueError("Simulations.cat joins simulations of the same sites and plates")
        if first.values is None or any(p.values is None for p in parts):
            runs = [run for p in parts for run in (p.runs or [])]
            if any(p.values is not None for p in parts):
                raise ValueError("Simulations.cat cannot join stacked with run-by-run ones")
            return first._like(runs=runs)
        return first._like({n: torch.cat([p.values[n] for p in parts]) for n in first.values})

    def _names(self, observed: bool) -> dict:
        if self.values is None:
            raise ValueError("these simulations differ in their sites: read them run by run")
        return {
            s.name: self.values[s.name]
            for s in self.sites
            if s.observed == observed and (observed or not s.deterministic)
        }

    @property
    def latents(self) -> dict[str, torch.Tensor]:
        """``{site: (len(self), *shape)}`` of the latent sites."""
        return self._names(False)

    @property
    def observations(self) -> dict[str, torch.Tensor]:
        """``{site: (len(self), *shape)}`` of the observed sites."""
        return self._names(True)

    @property
    def shapes(self) -> dict[str, tuple]:
        """The shape of each site per simulation (stacked storage)."""
        return {name: tuple(v.shape[1:]) for name, v in (self.values or {}).items()}

    def split(self, validation_fraction: float = 0.1, seed: int | None = None):
        """
        ``(training, validation)``: a random split, ``validation_fraction`` of the simulations
        (rounded down) in the second part. ``seed`` fixes the permutation (default: torch's
        generator).
        """
        fraction = check_fraction("validation_fraction", validation_fraction)
        n = len(self)
        num_val = int(fraction * n)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=generator)
        return self.subset(perm[num_val:]), self.subset(perm[:num_val])

    def to(self, *args, **kwargs) -> Simulations:
        """A copy with every value converted by :meth:`torch.Tensor.to` (a device, a dtype)."""
        if self.values is None:
            return self._like(
                runs=[(s, {k: v.to(*args, **kwargs) for k, v in r.items()}) for s, r in self.runs]
            )
        return self._like({name: v.to(*args, **kwargs) for name, v in self.values.items()})

    def save(self, path) -> None:
        """Save to ``path`` (a file or file-like object), for :meth:`~pyro_rws.Simulations.load`."""
        plain = lambda sites: [s.to_plain() for s in sites]  # noqa: E731
        torch.save(
            {
                "values": self.values,
                "sites": None if self.sites is None else plain(self.sites),
                "runs": None if self.runs is None else [(plain(s), r) for s, r in self.runs],
                "plate_nesting": self.plate_nesting,
                "mode": self.mode,
                "seed": self.seed,
            },
            path,
        )

    @classmethod
    def load(cls, path, map_location=None) -> Simulations:
        """Load simulations saved by :meth:`~pyro_rws.Simulations.save` (weights only)."""
        d = torch.load(path, map_location=map_location, weights_only=True)
        sites = lambda plain: tuple(Site.from_plain(t) for t in plain)  # noqa: E731
        runs = None if d["runs"] is None else [(sites(s), r) for s, r in d["runs"]]
        return cls(
            d["values"],
            None if d["sites"] is None else sites(d["sites"]),
            runs=runs,
            plate_nesting=d["plate_nesting"],
            mode=d["mode"],
            seed=d["seed"],
        )

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {v}" for k, v in self.shapes.items()) or "run by run"
        return f"Simulations({len(self)}, mode={self.mode!r}, {shapes})"
