# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Property-based tests over random plate structures (issue 9): model and guide agree, or the loss
says so.

Programs are generated from a :class:`Spec`: 0-2 nested plates with explicit or implicit dims,
at most one of them subsampled (by size, or by explicit indices: a subset, a permutation of the
whole range, or indices with repeats), an optional global latent, one local latent per plate
(Normal, Bernoulli, Categorical or Poisson) and a Normal observation inside every plate, read
from a positional or keyword data argument. Guides are amortized: every local latent's
parameters are a function of the data at its datapoint.

Matched pairs (``test_matched_pairs``) must compute, for every loss: finite values, the same
value and gradients from ``loss``, ``loss_and_grads`` and ``differentiable_loss`` for the same
seed, the data dtype, no caller argument modified, and, in every sleep phase, a guide that reads
exactly the fantasy the model produced, datapoint by datapoint, and scores the model's latents.
The only errors allowed are the documented limitations (:func:`allowed_error`), as a
ValueError/NotImplementedError that names the plate or site.

Mismatched pairs (``test_mismatched_pairs``: plate names, dims or sizes that differ, a guide
site the model lacks, a model latent the guide lacks) must raise a ValueError or
NotImplementedError that names the site or plate, from every loss and every method: never
compute silently.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_rws import RWS, VIMCO, EffectiveSampleSizeWarning, SleepPhaseLoss, WakeSleepELBO

KINDS = ("normal", "bernoulli", "categorical", "poisson")
PLATE_NAMES = ("data", "cells")
OTHER_NAME = "batch"  # the guide's plate name in a name mismatch
EXTRA_SITE = "w"  # the guide's extra site in an extra-site mismatch
FREE_DIM = -3  # the guide's plate dim in a dim mismatch (no model plate uses it)

# name -> (constructor(vectorize, sleep particles, fantasy_args), has a sleep phase,
#          uses per-datapoint importance weights)
LOSSES = {
    "rws-1": (lambda v, s, f: RWS(2, insomnia=1.0, vectorize_particles=v), False, True),
    "rws-0.5": (
        lambda v, s, f: RWS(
            2, insomnia=0.5, num_sleep_particles=s, vectorize_particles=v, fantasy_args=f
        ),
        True,
        True,
    ),
    "rws-0": (
        lambda v, s, f: RWS(
            2, insomnia=0.0, num_sleep_particles=s, vectorize_particles=v, fantasy_args=f
        ),
        True,
        True,
    ),
    "ws-sleep": (
        lambda v, s, f: WakeSleepELBO(
            2, phase_q="sleep", num_sleep_particles=s, vectorize_particles=v, fantasy_args=f
        ),
        True,
        False,
    ),
    "ws-wake": (
        lambda v, s, f: WakeSleepELBO(2, phase_q="wake", vectorize_particles=v),
        False,
        True,
    ),
    "sleep": (
        lambda v, s, f: SleepPhaseLoss(s, vectorize_particles=v, fantasy_args=f),
        True,
        False,
    ),
    "vimco": (lambda v, s, f: VIMCO(2, vectorize_particles=v), False, True),
}

SETTINGS = dict(
    derandomize=True,
    deadline=None,
    report_multiple_bugs=False,  # one shrunk failure per test keeps a failing run short
    database=None,  # the same examples on every run and machine, no files written
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --------------------------------------------------------------------------------------------
# Program specifications
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plate:
    name: str
    size: int
    dim: int  # the dim the plate occupies (negative)
    explicit: bool  # pass dim= (else Pyro allocates it, to the same value)
    subsample: str = "none"  # none | size | subset | perm | repeat
    indices: tuple[int, ...] = ()  # explicit subsample indices, or the subsample size ("size")

    def kwargs(self) -> dict:
        kw = {"dim": self.dim} if self.explicit else {}
        if self.subsample == "size":
            kw["subsample_size"] = len(self.indices)
        elif self.subsample != "none":
            kw["subsample"] = torch.tensor(self.indices)
        return kw


@dataclasses.dataclass(frozen=True)
class Spec:
    plates: tuple[Plate, ...]
    kinds: tuple[str, ...]  # latent kind of z0 (in plate 0, or global without plates), z1
    global_kind: str | None  # a latent "g" outside every plate, or None
    keyword: bool  # data passed as data=x, else positionally
    guide_len: bool  # the guide sizes its outermost data plate by len(x), the ordinary way
    dtype: torch.dtype

    @property
    def data_shape(self) -> tuple[int, ...]:
        n = max((-p.dim for p in self.plates), default=0)
        shape = [1] * n
        for p in self.plates:
            shape[p.dim] = p.size
        return tuple(shape)

    @property
    def latents(self) -> list[str]:
        return (["g"] if self.global_kind else []) + [f"z{k}" for k in range(len(self.kinds))]

    @property
    def subsampled(self) -> Plate | None:
        return next((p for p in self.plates if p.subsample != "none"), None)

    def program(self) -> str:
        """A one-line description, for failure reports."""
        plates = ", ".join(
            f"plate({p.name!r}, {p.size}"
            + (f", dim={p.dim}" if p.explicit else f" [dim {p.dim}]")
            + (
                f", subsample_size={len(p.indices)}"
                if p.subsample == "size"
                else f", subsample={list(p.indices)} ({p.subsample})"
                if p.subsample != "none"
                else ""
            )
            + ")"
            for p in self.plates
        )
        return (
            f"plates=[{plates}] z-kinds={list(self.kinds)} global={self.global_kind} "
            f"data={'keyword' if self.keyword else 'positional'} {self.dtype}"
            + (" guide-plate-size=len(x)" if self.guide_len else "")
        )


@st.composite
def subsampling(draw, size: int):
    mode = draw(st.sampled_from(("size", "subset", "perm", "repeat")))
    if mode == "size":
        return mode, tuple(range(draw(st.integers(1, size))))
    if mode == "subset":
        chosen = draw(st.sets(st.integers(0, size - 1), min_size=1, max_size=size))
        return mode, tuple(sorted(chosen))
    if mode == "perm":
        return mode, tuple(draw(st.permutations(range(size))))
    first = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=size))
    repeated = draw(st.sampled_from(first))
    at = draw(st.integers(0, len(first)))
    return mode, tuple(first[:at] + [repeated] + first[at:])  # at least one repeat


@st.composite
def specs(draw) -> Spec:
    num_plates = draw(st.integers(0, 2))
    dims = draw(st.permutations((-1, -2)))[:num_plates] if num_plates else []
    if num_plates == 1:
        dims = [draw(st.sampled_from((-1, -2)))]
    plates = []
    for k, dim in enumerate(dims):
        # Pyro gives an implicit plate the rightmost free dim when it is entered.
        implicit_dim = -1 if k == 0 or dims[0] != -1 else -2
        explicit = dim != implicit_dim or draw(st.booleans())
        plates.append(Plate(PLATE_NAMES[k], draw(st.integers(1, 4)), dim, explicit))
    if plates and draw(st.booleans()):
        k = draw(st.integers(0, num_plates - 1))
        mode, indices = draw(subsampling(plates[k].size))
        plates[k] = dataclasses.replace(plates[k], subsample=mode, indices=indices)
    return Spec(
        plates=tuple(plates),
        kinds=tuple(draw(st.sampled_from(KINDS)) for _ in range(max(num_plates, 1))),
        global_kind=draw(st.none() | st.sampled_from(KINDS)) if num_plates else None,
        keyword=draw(st.booleans()),
        guide_len=draw(st.booleans()),
        dtype=draw(st.sampled_from((torch.float64, torch.float32))),
    )


@dataclasses.dataclass(frozen=True)
class Mismatch:
    kind: str  # plate-name | plate-dim | plate-size | extra-site | missing-latent
    plate: int = 0  # the plate that differs
    site: str = ""  # the latent the guide lacks

    def names(self, spec: Spec) -> set[str]:
        """Names one of which the error message must quote."""
        if self.kind == "extra-site":
            return {EXTRA_SITE}
        if self.kind == "missing-latent":
            return {self.site}
        p = spec.plates[self.plate]
        sites = {f"z{k}" for k in range(self.plate, len(spec.plates))} | {"x"}
        return {p.name, OTHER_NAME} | sites


@st.composite
def mismatches(draw, spec: Spec) -> Mismatch:
    options = [Mismatch("extra-site")]
    options += [Mismatch("missing-latent", site=s) for s in spec.latents]
    for k, p in enumerate(spec.plates):
        options += [Mismatch("plate-name", k), Mismatch("plate-dim", k)]
        if p.subsample != "size" or p.size > 1:
            options.append(Mismatch("plate-size", k))
    return draw(st.sampled_from(options))


# --------------------------------------------------------------------------------------------
# Model and guide
# --------------------------------------------------------------------------------------------
class Record:
    """What model and guide saw, in call order."""

    def __init__(self):
        self.model = []  # (value of the observed site, obs= tensor, {latent: value})
        self.guide = []  # (data argument, data at the guide's datapoints, {latent: value})


def prior(kind: str, like: torch.Tensor):
    one = torch.ones((), dtype=like.dtype, device=like.device)
    if kind == "normal":
        return dist.Normal(0 * one, one)
    if kind == "bernoulli":
        return dist.Bernoulli(probs=0.4 * one)
    if kind == "categorical":
        return dist.Categorical(probs=torch.stack([0.2 * one, 0.3 * one, 0.5 * one]))
    return dist.Poisson(1.5 * one)


def proposal(kind: str, feature: torch.Tensor, a: torch.Tensor):
    h = a * feature
    if kind == "normal":
        return dist.Normal(h, torch.ones_like(h))
    if kind == "bernoulli":
        return dist.Bernoulli(logits=h)
    if kind == "categorical":
        return dist.Categorical(logits=torch.stack([h, torch.zeros_like(h), -h], -1))
    return dist.Poisson(torch.nn.functional.softplus(h) + 0.5)


def as_float(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(like.dtype)


def data_of(spec: Spec, args, kwargs) -> torch.Tensor:
    return kwargs["data"] if spec.keyword else args[0]


def make_model(spec: Spec, record: Record):
    def model(*args, **kwargs):
        x = data_of(spec, args, kwargs)
        m = pyro.param("m", lambda: torch.tensor(0.2, dtype=x.dtype, device=x.device))
        mean, latents = m, {}
        if spec.global_kind:
            latents["g"] = pyro.sample("g", prior(spec.global_kind, x))
            mean = mean + as_float(latents["g"], x)
        obs = x
        with ExitStack() as stack:
            for k, p in enumerate(spec.plates):
                idx = stack.enter_context(pyro.plate(p.name, p.size, **p.kwargs()))
                if p.subsample != "none":
                    obs = obs.index_select(p.dim, idx)
                latents[f"z{k}"] = pyro.sample(f"z{k}", prior(spec.kinds[k], x))
                mean = mean + as_float(latents[f"z{k}"], x)
            if not spec.plates:
                latents["z0"] = pyro.sample("z0", prior(spec.kinds[0], x))
                mean = mean + as_float(latents["z0"], x)
            value = pyro.sample("x", dist.Normal(mean, torch.ones_like(mean)), obs=obs)
        record.model.append((value, obs, latents))

    return model


def make_guide(spec: Spec, record: Record, mismatch: Mismatch | None = None):
    kind = mismatch.kind if mismatch else None
    width = max((-p.dim for p in spec.plates), default=0)

    def local_feature(xs: torch.Tensor, k: int) -> torch.Tensor:
        """The data at the datapoints of z_k (plates 0..k), summed over inner plates."""
        for p in spec.plates[k + 1 :]:
            xs = xs.sum(p.dim, keepdim=True)
        keep = max(-p.dim for p in spec.plates[: k + 1])
        lead = xs.dim() - width  # leading dims (sleep particles), kept
        return xs.reshape(xs.shape[:lead] + xs.shape[xs.dim() - keep :])

    def guide(*args, **kwargs):
        x = data_of(spec, args, kwargs)
        latents = {}

        def param(name):
            return pyro.param(name, lambda: torch.tensor(0.3, dtype=x.dtype, device=x.device))

        def sample(name, site_kind, feature):
            if kind == "missing-latent" and mismatch.site == name:
                return
            latents[name] = pyro.sample(name, proposal(site_kind, feature, param(f"a_{name}")))

        if spec.global_kind:
            sample("g", spec.global_kind, x.mean())
        xs = x
        changed = False  # the guide's plate layout differs from the model's
        with ExitStack() as stack:
            for k, p in enumerate(spec.plates):
                name, size, kw = p.name, p.size, p.kwargs()
                if spec.guide_len and p.dim == -width:
                    size = len(x)
                if mismatch and mismatch.plate == k and kind.startswith("plate-"):
                    if kind == "plate-name":
                        name = OTHER_NAME
                    elif kind == "plate-dim":
                        kw["dim"], changed = FREE_DIM, True
                    else:
                        size, changed = (size - 1 if size > 1 else size + 1), True
                        if "subsample_size" in kw:  # keep the guide's own plate valid
                            kw["subsample_size"] = min(kw["subsample_size"], size)
                idx = stack.enter_context(pyro.plate(name, size, **kw))
                if p.subsample != "none":
                    xs = xs.index_select(p.dim, idx.clamp(max=p.size - 1))
                sample(f"z{k}", spec.kinds[k], x.mean() if changed else local_feature(xs, k))
            if not spec.plates:
                sample("z0", spec.kinds[0], x)
            if kind == "extra-site":
                pyro.sample(EXTRA_SITE, dist.Normal(x.mean(), torch.ones_like(x.mean())))
        record.guide.append((x, xs, latents))

    return guide


# --------------------------------------------------------------------------------------------
# Running the three methods
# --------------------------------------------------------------------------------------------
def make_inputs(spec: Spec, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.data_shape, generator=generator, dtype=torch.float64).to(spec.dtype)
    args, kwargs = ((), {"data": x}) if spec.keyword else ((x,), {})
    fantasy_args = None
    if spec.subsampled is not None:  # obs= is a slice of the argument: say where fantasies go
        fantasy_args = {"x": "data" if spec.keyword else 0}
    return x, args, kwargs, fantasy_args


def snapshot(args, kwargs):
    return tuple(a.clone() for a in args), {k: v.clone() for k, v in kwargs.items()}


def check_unmodified(args, kwargs, saved, where):
    saved_args, saved_kwargs = saved
    assert len(args) == len(saved_args) and kwargs.keys() == saved_kwargs.keys(), where
    for new, old in zip(
        (*args, *kwargs.values()), (*saved_args, *saved_kwargs.values()), strict=True
    ):
        assert new.dtype == old.dtype and torch.equal(new, old), f"{where}: argument modified"


def grads() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    out = {}
    for name in store.keys():
        p = store.get_param(name).unconstrained()
        out[name] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
    return out


def zero_grads():
    store = pyro.get_param_store()
    for name in store.keys():
        store.get_param(name).unconstrained().grad = None


def call(method: str, loss, model, guide, args, kwargs, seed):
    """One call of ``method`` with seed ``seed``: (value as float, its dtype, gradients)."""
    zero_grads()
    pyro.set_rng_seed(seed)
    if method == "loss":
        return loss.loss(model, guide, *args, **kwargs), None, None
    if method == "loss_and_grads":
        return loss.loss_and_grads(model, guide, *args, **kwargs), None, grads()
    value = loss.differentiable_loss(model, guide, *args, **kwargs)
    if value.requires_grad:
        value.backward()
    return value.item(), value.dtype, grads()


METHODS = ("loss", "loss_and_grads", "differentiable_loss")


def same(a, b) -> bool:
    return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)


def flat(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).to(torch.float64) for v in values])


def check_sleep_alignment(record: Record, x: torch.Tensor, where: str):
    """
    Every sleep run of the guide read, at its datapoints and in their order (repeats included),
    exactly the fantasy of one model run (or of one particle of it, if particles are split
    between guide runs), and scored that run's latents. A model run is a sleep run when its
    observed site returned something other than the data (Normal fantasies differ from the data
    almost surely); a guide run when its data argument is not the caller's data.
    """
    fantasies = [(value, latents) for value, obs, latents in record.model if not same(value, obs)]
    seen = [(xs, latents) for arg, xs, latents in record.guide if not same(arg, x)]
    assert seen, f"{where}: the guide never ran on fantasies"
    for xs, guide_z in seen:
        assert xs.dtype == x.dtype, f"{where}: the guide got fantasies of dtype {xs.dtype}"
        assert any(is_particle_of(xs, guide_z, f, model_z) for f, model_z in fantasies), (
            f"{where}: the guide read\n{xs}\nand scored {guide_z}, which is no model run's "
            f"fantasy and latents; the model's fantasies and latents were\n"
            + "\n".join(f"{f}, {z}" for f, z in fantasies)
        )


def is_particle_of(xs, guide_z, fantasy, model_z) -> bool:
    """Whether (xs, guide_z) is, element by element, one of the particles of a model run."""
    n, total = xs.numel(), fantasy.numel()
    if n == 0 or total % n or guide_z.keys() != model_z.keys():
        return False
    parts = total // n
    for c in range(parts):
        if torch.equal(flat([fantasy]).chunk(parts)[c], flat([xs])) and all(
            torch.equal(flat([model_z[name]]).chunk(parts)[c], flat([guide_z[name]]))
            for name in guide_z
        ):
            return True
    return False


def quotes_one_of(message: str, names) -> bool:
    return any(f"'{n}'" in message or f'"{n}"' in message for n in names)


def allowed_error(spec: Spec, has_sleep: bool, per_datapoint: bool) -> set[str] | None:
    """
    Documented limitations under which a matched pair may raise (a ValueError naming the plate):

    - weights per datapoint with a latent outside a subsampled plate (no unbiased estimate);
    - a sleep phase with repeated subsample indices: one full-size data argument cannot hold
      two different fantasies for the same datapoint, so the guide cannot read them aligned.
    """
    p = spec.subsampled
    if p is None:
        return None
    k = spec.plates.index(p)
    outside = spec.global_kind is not None or k > 0
    if per_datapoint and outside and len(p.indices) != p.size:
        return {p.name}
    if has_sleep and p.subsample == "repeat":
        return {p.name}
    return None


def tolerance(dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-10


@pytest.fixture(autouse=True)
def float32_default():
    """float32 stays the default, so float64 data really tests that dtypes are kept."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


def examples(name):
    return {"matched": 40, "mismatched": 25}[name]


# --------------------------------------------------------------------------------------------
# The properties
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_name", LOSSES)
@settings(max_examples=examples("matched"), **SETTINGS)
@given(
    spec=specs(),
    vectorize=st.booleans(),
    sleep_particles=st.sampled_from((1, 2)),
    seed=st.integers(0, 2**16),
)
def test_matched_pairs(loss_name, spec, vectorize, sleep_particles, seed):
    check_matched(loss_name, spec, vectorize, sleep_particles, seed)


def check_matched(loss_name, spec, vectorize, sleep_particles, seed):
    pyro.clear_param_store()
    pyro.enable_validation(True)
    make_loss, has_sleep, per_datapoint = LOSSES[loss_name]
    x, args, kwargs, fantasy_args = make_inputs(spec, seed)
    saved = snapshot(args, kwargs)
    record = Record()
    model, guide = make_model(spec, record), make_guide(spec, record)
    loss = make_loss(vectorize, sleep_particles, fantasy_args)
    where = (
        f"{loss_name} ({'vectorized' if vectorize else 'sequential'}, "
        f"{sleep_particles} sleep particle(s)) on {spec.program()}"
    )
    allowed = allowed_error(spec, has_sleep, per_datapoint)
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EffectiveSampleSizeWarning)
        for method in METHODS:
            try:
                results[method] = call(method, loss, model, guide, args, kwargs, seed)
            except (ValueError, NotImplementedError) as e:
                if allowed is None:
                    raise AssertionError(
                        f"{where}: {method} raised on a matched pair: {type(e).__name__}: {e}"
                    ) from e
                assert quotes_one_of(str(e), allowed), f"{where}: the error names none of {allowed}"
                return
            finally:
                check_unmodified(args, kwargs, saved, f"{where}, after {method}")
    tol = tolerance(spec.dtype)
    (v1, _, _), (v2, _, g2), (v3, dtype, g3) = (results[m] for m in METHODS)
    assert all(math.isfinite(v) for v in (v1, v2, v3)), f"{where}: values {v1}, {v2}, {v3}"
    assert math.isclose(v1, v2, rel_tol=tol, abs_tol=tol), f"{where}: loss {v1} != {v2}"
    assert math.isclose(v1, v3, rel_tol=tol, abs_tol=tol), f"{where}: loss {v1} != {v3}"
    assert dtype == spec.dtype, f"{where}: differentiable_loss has dtype {dtype}"
    assert g2.keys() == g3.keys()
    for name in g2:
        assert torch.isfinite(g2[name]).all(), f"{where}: gradient of {name} is {g2[name]}"
        assert torch.allclose(g2[name], g3[name], rtol=tol, atol=tol), (
            f"{where}: gradient of {name}: {g2[name]} from loss_and_grads, "
            f"{g3[name]} from differentiable_loss"
        )
    if has_sleep:
        check_sleep_alignment(record, x, where)


@pytest.mark.parametrize("loss_name", LOSSES)
@settings(max_examples=examples("mismatched"), **SETTINGS)
@given(
    case=specs().flatmap(lambda spec: st.tuples(st.just(spec), mismatches(spec))),
    vectorize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_mismatched_pairs(loss_name, case, vectorize, seed):
    check_mismatched(loss_name, *case, vectorize, seed)


def check_mismatched(loss_name, spec, mismatch, vectorize, seed):
    pyro.clear_param_store()
    pyro.enable_validation(True)
    make_loss, _, _ = LOSSES[loss_name]
    x, args, kwargs, fantasy_args = make_inputs(spec, seed)
    saved = snapshot(args, kwargs)
    record = Record()
    model, guide = make_model(spec, record), make_guide(spec, record, mismatch)
    loss = make_loss(vectorize, 1, fantasy_args)
    where = (
        f"{loss_name} ({'vectorized' if vectorize else 'sequential'}) with mismatch {mismatch} "
        f"on {spec.program()}"
    )
    names = mismatch.names(spec)
    # a documented limitation of the matched program may be what is reported first
    _, has_sleep, per_datapoint = LOSSES[loss_name]
    names = names | (allowed_error(spec, has_sleep, per_datapoint) or set())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EffectiveSampleSizeWarning)
        for method in METHODS:
            try:
                value = call(method, loss, model, guide, args, kwargs, seed)[0]
            except (ValueError, NotImplementedError) as e:
                assert quotes_one_of(str(e), names), (
                    f"{where}: {method} raised, but the error names none of {sorted(names)}: {e}"
                )
            else:
                raise AssertionError(f"{where}: {method} computed {value} silently")
            finally:
                check_unmodified(args, kwargs, saved, f"{where}, after {method}")
