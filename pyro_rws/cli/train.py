# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""Training one estimator at one K on one problem, and what a run records (metrics, curves)."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import Adam

from .. import EffectiveSampleSizeWarning, log_evidence
from ..examples.data import load_binarized_mnist, load_digits, shuffled_batches, shuffled_test_split
from ..examples.gmm import GMM, sample_data
from .estimators import ESTIMATORS
from .parser import UsageError


@dataclass
class Run:
    name: str
    k: int
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{ESTIMATORS[self.name].label} K={self.k}"


class _Timer:
    """Sums the wall time of training steps after a warm-up."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.total = 0.0
        self.count = 0
        self.seen = 0

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        elapsed = time.perf_counter() - self.start
        self.seen += 1
        if self.seen > self.warmup:
            self.total += elapsed
            self.count += 1

    @property
    def ms(self) -> float:
        return 1000 * self.total / self.count if self.count else math.nan


def _svi_loop(run, svi, steps, next_batch, evaluate, eval_every, bar):
    """Trains, records ``evaluate()`` every ``eval_every`` steps; returns the timer."""
    timer = _Timer(warmup=min(20, steps // 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EffectiveSampleSizeWarning)
        for step in range(steps):
            if step % eval_every == 0:
                _record(run, step, evaluate())
            x = next_batch()
            with timer:
                svi.step(x)
            if bar is not None:
                bar.update()
        _record(run, steps, evaluate())
    seen = set()
    for w in caught:
        if not issubclass(w.category, EffectiveSampleSizeWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif "ess" not in seen:
            seen.add("ess")
            run.warnings.append("low effective sample size (guide collapsed or K too small)")
    return timer


def _record(run: Run, step: int, values: dict[str, float]) -> None:
    run.steps.append(step)
    for key, value in values.items():
        run.curves.setdefault(key, []).append(value)


def train_gmm(name: str, k: int, args, bar=None) -> Run:
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    gmm = GMM(init=args.init)
    # fixed test points, the same for every run
    gen = torch.Generator().manual_seed(args.seed + 1)
    x_test = sample_data(100, generator=gen)
    x_eval = sample_data(1000, generator=gen)
    svi = SVI(gmm.model, gmm.guide, Adam({"lr": args.lr}), loss=ESTIMATORS[name].make(k))
    run = Run(name, k)

    def evaluate():
        return {"model error": gmm.model_error(), "inference error": gmm.inference_error(x_test)}

    timer = _svi_loop(
        run, svi, args.steps, lambda: sample_data(args.batch_size), evaluate, args.eval_every, bar
    )
    bound = log_evidence(gmm.model, gmm.guide, x_eval, num_particles=k, chunk_size=k)
    run.metrics = {
        "model error": run.curves["model error"][-1],
        "inference error": run.curves["inference error"][-1],
        "bound/point": float(bound.mean()),
        "ms/step": timer.ms,
    }
    run.extra["weights"] = torch.softmax(0.5 * gmm.theta.detach(), -1)
    run.extra["x_eval"] = x_eval
    return run


def load_sbn_data(spec: str):
    """``(train, test, label)`` for ``--data``: 'digits', 'mnist' or a path to an ``.npz``."""
    if spec == "digits":
        try:
            train, test = load_digits()
        except ImportError:
            raise UsageError(
                "--data digits needs scikit-learn (pip install scikit-learn)"
            ) from None
        return train, test, "sklearn digits (binarized at > 7)"
    if spec == "mnist":
        from ..examples.mnist import DownloadError, binarized_mnist_path

        try:
            path = binarized_mnist_path()
        except (DownloadError, ValueError) as e:
            raise UsageError(f"--data mnist: {e}") from e
    else:
        path = Path(spec)
        if not path.is_file():
            raise UsageError(
                f"--data: expected 'digits', 'mnist' or an existing file, got {spec!r}"
            )
    try:
        data = load_binarized_mnist(path)
    except Exception as e:  # noqa: BLE001 - report any unreadable file as a usage error
        raise UsageError(f"--data: could not read {str(path)!r} as binarized MNIST: {e}") from e
    return data["train"], shuffled_test_split(data["test"]), f"binarized MNIST ({path})"


def train_sbn(name: str, k: int, data, args, bar=None) -> Run:
    from ..examples.sbn import SBN

    train, test = data
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    sbn = SBN(train.shape[-1], tuple(args.layers))
    svi = SVI(sbn.model, sbn.guide, Adam({"lr": args.lr}), loss=ESTIMATORS[name].make(k))
    run = Run(name, k)
    batches = shuffled_batches(train, args.batch_size, torch.Generator().manual_seed(args.seed))
    curve_points = test[: min(200, len(test))]

    def evaluate():
        lp = log_evidence(sbn.model, sbn.guide, curve_points, num_particles=args.curve_particles)
        return {"held-out log p(x)": float(lp.mean())}

    timer = _svi_loop(run, svi, args.steps, lambda: next(batches), evaluate, args.eval_every, bar)
    points = test[: args.eval_points]
    # particles per vectorized chunk: keep each (chunk, points, pixels) tensor near 80 MB
    chunk = max(1, min(100, 20_000_000 // (len(points) * points.shape[-1])))
    lp = log_evidence(
        sbn.model, sbn.guide, points, num_particles=args.eval_particles, chunk_size=chunk
    )
    run.metrics = {"test log p(x)": float(lp.mean()), "ms/step": timer.ms}
    # binary images drawn from the model (not the pixel means p(x = 1 | h1))
    run.extra["samples"] = torch.bernoulli(sbn.sample_images(12))
    return run
