# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
``python -m pyro_rws``: train and compare wake-sleep estimators on a built-in problem.

The default is the Gaussian-mixture experiment of Le et al. (2019), which needs no download.
"""

from __future__ import annotations

import argparse
import sys
import time

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import Adam
from tqdm.auto import tqdm

from . import RWS, WakeSleepELBO
from .examples.gmm import GMM, sample_data, true_weights

ESTIMATORS = {
    "rws": ("RWS, wake-phi", lambda k: RWS(num_particles=k, insomnia=1.0)),
    "rws-sleep": ("RWS, sleep-phi", lambda k: RWS(num_particles=k, insomnia=0.0)),
    "rws-mix": ("RWS, wake+sleep-phi", lambda k: RWS(num_particles=k, insomnia=0.5)),
    "ws": ("wake-sleep", lambda k: WakeSleepELBO(num_particles=k)),
}


def _csv(kind):
    def parse(text):
        return [kind(t) for t in text.split(",") if t]

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pyro_rws",
        description=(
            "Train and compare wake-sleep estimators on the Gaussian mixture of Le et al. "
            "(2019): 20 clusters, fresh data every step, learned mixture weights and an "
            "amortized guide. Prints the learned weights and a table of model error "
            "||pi_theta - pi_true||, inference error E||q(.|x) - p(.|x)|| and bound."
        ),
    )
    parser.add_argument(
        "--estimators",
        type=_csv(str),
        default=["rws"],
        help=f"comma-separated, from {', '.join(ESTIMATORS)} (default: rws)",
    )
    parser.add_argument(
        "--particles", type=_csv(int), default=[5], help="comma-separated K (default: 5)"
    )
    parser.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 1e-2)")
    parser.add_argument("--batch-size", type=int, default=100, help="points per step (100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="a few hundred steps, for a smoke test"
    )
    return parser


def train_gmm(loss, steps: int, lr: float, batch_size: int, seed: int, progress=None):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    gmm = GMM()
    x_test = sample_data(100)
    svi = SVI(gmm.model, gmm.guide, Adam({"lr": lr}), loss=loss)
    warmup = min(10, steps - 1)  # the first steps include one-off set-up costs
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        svi.step(sample_data(batch_size))
        if progress is not None:
            progress.update()
    ms = 1000 * (time.perf_counter() - start) / (steps - warmup)
    bound = -sum(loss.loss(gmm.model, gmm.guide, sample_data(batch_size)) for _ in range(10)) / 10
    return gmm, {
        "model error": gmm.model_error(),
        "inference error": gmm.inference_error(x_test),
        "bound/point": bound / batch_size,
        "ms/step": ms,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [e for e in args.estimators if e not in ESTIMATORS]
    if unknown:
        print(f"unknown estimator(s) {unknown}; choose from {list(ESTIMATORS)}", file=sys.stderr)
        return 2
    if args.quick:
        args.steps = min(args.steps, 300)
    torch.set_num_threads(1)
    runs = [(e, k) for e in args.estimators for k in args.particles]
    rows = []
    with tqdm(total=len(runs) * args.steps, desc="training", unit="step") as bar:
        for name, k in runs:
            bar.set_postfix_str(f"{name} K={k}")
            gmm, metrics = train_gmm(
                ESTIMATORS[name][1](k), args.steps, args.lr, args.batch_size, args.seed, bar
            )
            rows.append((ESTIMATORS[name][0], k, metrics, gmm))
    print()
    header = f"{'estimator':<22}{'K':>4}" + "".join(f"{m:>17}" for m in rows[0][2])
    print(header)
    print("-" * len(header))
    for label, k, metrics, _ in rows:
        print(f"{label:<22}{k:>4}" + "".join(f"{v:>17.3f}" for v in metrics.values()))
    gmm = rows[-1][3]
    learned = torch.softmax(0.5 * gmm.theta.detach(), -1)
    print(f"\nmixture weights learned by {rows[-1][0]} (K={rows[-1][1]}) vs true:")
    print("  learned:", " ".join(f"{p:.3f}" for p in learned.tolist()))
    print("  true:   ", " ".join(f"{p:.3f}" for p in true_weights().tolist()))
    return 0
