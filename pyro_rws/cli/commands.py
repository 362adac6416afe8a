# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""The two experiments, ``gmm`` and ``sbn``: settings from the options, the runs, the report."""

from __future__ import annotations

import math
import time

from tqdm import tqdm

from ..examples.gmm import log_likelihood, true_weights
from .parser import check_particles
from .report import check_plot, plot_gmm, plot_sbn, print_table
from .train import load_sbn_data, train_gmm, train_sbn


def _train_all(args, train_one):
    """One run per (estimator, K), under one progress bar; ``(runs, seconds)``."""
    jobs = [(e, k) for e in args.estimators for k in args.particles]
    runs = []
    start = time.perf_counter()
    with tqdm(
        total=len(jobs) * args.steps,
        desc="training",
        unit="step",
        disable=args.no_progress,
        leave=False,
    ) as bar:
        for name, k in jobs:
            bar.set_postfix_str(f"{name} K={k}")
            runs.append(train_one(name, k, None if args.no_progress else bar))
    return runs, time.perf_counter() - start


def run_gmm(args) -> int:
    if args.quick:
        args.steps = min(args.steps, 100)
        args.particles = [k for k in args.particles if k <= 5] or [min(args.particles)]
    check_particles(args)
    check_plot(args)
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 40)
    runs, elapsed = _train_all(args, lambda name, k, bar: train_gmm(name, k, args, bar))
    x_eval = runs[0].extra["x_eval"]
    print_table(
        runs,
        f"Gaussian mixture (Le et al. 2019), {args.steps} steps of {args.batch_size} fresh "
        f"points, Adam lr {args.lr}, init {args.init}, seed {args.seed} ({elapsed:.0f} s)",
    )
    print(
        "model error: ||softmax(0.5 theta) - pi_true||; inference error: mean over 100 fixed "
        "points of ||q(.|x) - p_true(.|x)||;\nbound/point: log p(x) importance-sampled with the "
        "guide and the training K (1000 fresh points); ms/step after warm-up."
    )
    print(
        f"reference: exact log p(x) per point on those points under the true mixture "
        f"{float(log_likelihood(x_eval).mean()):.3f}"
    )
    best = min(runs, key=lambda r: r.metrics["model error"])
    print(f"\nmixture weights learned by {best.label} (lowest model error) vs true:")
    print("  learned:", " ".join(f"{p:.3f}" for p in best.extra["weights"].tolist()))
    print("  true:   ", " ".join(f"{p:.3f}" for p in true_weights().tolist()))
    if args.plot:
        plot_gmm(runs, args.plot, f"Gaussian mixture, batch {args.batch_size}, lr {args.lr}")
        print(f"\nplot saved to {args.plot}")
    return 0


def run_sbn(args) -> int:
    train, test, label = load_sbn_data(args.data)
    mnist = train.shape[-1] == 784
    if args.layers is None:
        args.layers = [200] if mnist else [16]
    if args.eval_points is None:
        args.eval_points = 1000 if mnist else len(test)
    args.curve_particles = 100
    if args.quick:
        args.steps = min(args.steps, 100)
        args.particles = [min(args.particles)]
        args.eval_particles = min(args.eval_particles, 50)
        args.eval_points = min(args.eval_points, 200)
        args.curve_particles = 10
        if mnist:
            train = train[:5000]
    check_particles(args)
    check_plot(args)
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 10)
    arch = "-".join(map(str, [train.shape[-1], *args.layers]))
    runs, elapsed = _train_all(
        args, lambda name, k, bar: train_sbn(name, k, (train, test), args, bar)
    )
    print_table(
        runs,
        f"SBN {arch} on {label}: {args.steps} steps, batch {args.batch_size}, Adam lr {args.lr}, "
        f"seed {args.seed} ({elapsed:.0f} s)",
    )
    print(
        f"test log p(x): nats/image on {min(args.eval_points, len(test))} held-out images, "
        f"importance-sampled with the trained guide, K={args.eval_particles} (a lower bound in "
        "expectation); ms/step after warm-up."
    )
    if args.plot:
        side = int(round(math.sqrt(train.shape[-1])))
        side = side if side * side == train.shape[-1] else None
        curve = f"held-out log p(x), K={args.curve_particles} on {min(200, len(test))} test images"
        plot_sbn(runs, args.plot, f"SBN {arch} on {label}", side, curve)
        print(f"\nplot saved to {args.plot}")
    return 0
