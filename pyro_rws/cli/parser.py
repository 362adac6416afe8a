# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""The options of ``python -m pyro_rws`` and its subcommands: parsing and checking them."""

from __future__ import annotations

import argparse

from .estimators import (
    ESTIMATORS,
    GMM_DEFAULT_ESTIMATORS,
    GMM_DEFAULT_PARTICLES,
    SBN_DEFAULT_ESTIMATORS,
    SBN_DEFAULT_PARTICLES,
)


class UsageError(Exception):
    """A bad option found after parsing; reported as ``error: ...`` with exit status 2."""


def _estimator_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one estimator")
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown estimator(s) {', '.join(unknown)}; choose from {', '.join(ESTIMATORS)}"
        )
    return list(dict.fromkeys(names))


def _int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def _estimator_help(default: list[str]) -> str:
    lines = "; ".join(f"{name}: {e.help}" for name, e in ESTIMATORS.items())
    return f"comma-separated estimators (default: {','.join(default)}). {lines}"


def _common_options(p: argparse.ArgumentParser, eval_every_help: str) -> None:
    p.add_argument("--eval-every", type=_positive(int), default=None, help=eval_every_help)
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--quick", action="store_true", help="a smoke test of a few seconds (few steps, small K)"
    )
    p.add_argument(
        "--plot", metavar="FILE.png", default=None, help="save the curves as PNG (needs matplotlib)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads",
        type=_positive(int),
        default=1,
        help="torch threads (default 1: these small models run fastest on one)",
    )


GMM_DESCRIPTION = (
    "The Gaussian mixture of Le et al. (2019, sec. 5.1): 20 clusters with means 10c and std 5, "
    "learned prior softmax(0.5 theta) (initialized as in the paper's code, almost all mass on "
    "cluster 0), guide an MLP 1-16-16-20. Every step draws a fresh batch from the true mixture. "
    "Reports model error ||softmax(0.5 theta) - pi_true||, inference error (mean over 100 fixed "
    "test points of ||q(.|x) - p_true(.|x)||), the importance-weighted bound per point with the "
    "training K (on 1000 fresh points, at the end) and ms per training step (after a warm-up, "
    "evaluation excluded). Two wake-sleeps: 'ws-le' is the paper's WS (importance-weighted "
    "wake-theta, sleep-phi on K fantasies), 'ws' the classic one (WakeSleepELBO)."
)

SBN_DESCRIPTION = (
    "Sigmoid belief nets (Bernoulli latent layers, linear-sigmoid conditionals, a mirrored "
    "guide) trained on minibatches of binarized sklearn digits (8x8, no download) or binarized "
    "MNIST (downloaded once into $PYRO_RWS_DATA or ~/.cache/pyro_rws). Reports the held-out "
    "log p(x) (importance-sampled with the trained guide, a lower bound in expectation that "
    "tightens with --eval-particles) and ms per training step."
)


def _training_options(p, estimators, particles, steps, batch_help, lr_help) -> None:
    """The options both experiments share; the defaults of batch size and lr lead their help."""
    p.add_argument(
        "--estimators",
        type=_estimator_list,
        default=estimators,
        help=_estimator_help(estimators),
    )
    p.add_argument(
        "--particles",
        "-K",
        type=_int_list,
        default=particles,
        help=f"comma-separated numbers of particles K (default: {','.join(map(str, particles))})",
    )
    p.add_argument(
        "--steps", type=_positive(int), default=steps, help=f"training steps (default {steps})"
    )
    batch, batch_help = batch_help
    p.add_argument("--batch-size", type=_positive(int), default=batch, help=batch_help)
    lr, lr_help = lr_help
    p.add_argument("--lr", type=_positive(float), default=lr, help=lr_help)


def _gmm_parser(sub) -> None:
    gmm = sub.add_parser(
        "gmm", help="Gaussian mixture of Le et al. 2019 (default)", description=GMM_DESCRIPTION
    )
    _training_options(
        gmm,
        GMM_DEFAULT_ESTIMATORS,
        GMM_DEFAULT_PARTICLES,
        2000,
        (100, "points per step (default 100)"),
        (1e-2, "Adam learning rate (default 1e-2; the paper uses 1e-3 for 100,000 steps)"),
    )
    gmm.add_argument(
        "--init",
        choices=["paper", "uniform"],
        default="paper",
        help="initial theta: 'paper' ([38, 36, ..., 0]) or 'uniform' (default paper)",
    )
    _common_options(gmm, "record the errors every N steps for the plot (default steps/40)")


def _sbn_parser(sub) -> None:
    sbn = sub.add_parser(
        "sbn",
        help="sigmoid belief nets on sklearn digits or binarized MNIST",
        description=SBN_DESCRIPTION,
    )
    sbn.add_argument(
        "--data",
        default="digits",
        help=(
            "'digits' (default), 'mnist' (binarized MNIST: $BINARIZED_MNIST, the cache "
            "$PYRO_RWS_DATA or ~/.cache/pyro_rws, or downloaded there once) or a path to a "
            "binarized_mnist.npz"
        ),
    )
    sbn.add_argument(
        "--layers",
        type=_int_list,
        default=None,
        help="latent layer sizes, bottom first (default 16 for digits, 200 for MNIST)",
    )
    _training_options(
        sbn,
        SBN_DEFAULT_ESTIMATORS,
        SBN_DEFAULT_PARTICLES,
        3000,
        (64, "minibatch size (default 64)"),
        (1e-3, "Adam learning rate (default 1e-3)"),
    )
    sbn.add_argument(
        "--eval-particles",
        type=_positive(int),
        default=1000,
        help="K of the final held-out log p(x) estimate (default 1000; 50 with --quick)",
    )
    sbn.add_argument(
        "--eval-points",
        type=_positive(int),
        default=None,
        help="held-out images for the final estimate (default: all for digits, 1000 for MNIST)",
    )
    _common_options(
        sbn,
        "record held-out log p(x) (K=100, 10 with --quick; <=200 images) every N steps "
        "(default steps/10)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pyro_rws",
        description=(
            "Train and compare wake-sleep family estimators (RWS, wake-sleep, VIMCO, Pyro's\n"
            "built-in RWS) on built-in problems. Without a subcommand runs 'gmm'."
        ),
        epilog=(
            "examples:\n"
            "  python -m pyro_rws                      # GMM, default estimators, K=2,5,10\n"
            "  python -m pyro_rws --quick              # a few seconds\n"
            "  python -m pyro_rws gmm --estimators rws,ws-le --particles 5,20 --plot gmm.png\n"
            "  python -m pyro_rws sbn                  # SBN on sklearn digits\n"
            "  python -m pyro_rws sbn --data mnist --layers 200,200,200 --steps 20000\n"
            "  python -m pyro_rws pcfg -K 5 --estimators rws,vimco --plot pcfg.png\n"
            "see 'python -m pyro_rws gmm --help' and 'python -m pyro_rws sbn --help'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="{gmm,sbn,pcfg}")
    _gmm_parser(sub)
    _sbn_parser(sub)
    from .pcfg import add_pcfg_parser  # here: .pcfg imports this module

    add_pcfg_parser(sub)
    return parser


def check_particles(args) -> None:
    for name in args.estimators:
        est = ESTIMATORS[name]
        small = [k for k in args.particles if k < est.min_particles]
        if small:
            raise UsageError(f"estimator {name} needs K >= {est.min_particles}, got K={small[0]}")
