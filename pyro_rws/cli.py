# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
``python -m pyro_rws``: train and compare wake-sleep estimators on built-in problems.

Subcommands:

* ``gmm`` (the default): the Gaussian-mixture experiment of Le et al. (2019), which needs no
  download. Prints model error, inference error, bound and ms/step per estimator and K.
* ``sbn``: sigmoid belief nets on scikit-learn's digits, or on binarized MNIST given a path.
  Prints held-out log p(x) and ms/step per estimator.

``--plot FILE.png`` saves the curves (needs matplotlib); ``--quick`` is a smoke test of a few
seconds. Run ``python -m pyro_rws gmm --help`` or ``python -m pyro_rws sbn --help`` for the
options of each.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import Adam
from tqdm import tqdm

from . import RWS, VIMCO, EffectiveSampleSizeWarning, WakeSleepELBO, log_evidence
from .examples.gmm import GMM, sample_data, true_weights


def _pyro_rws(k: int):
    from pyro.infer import ReweightedWakeSleep

    # insomnia=1 (wake-phi only): Pyro's sleep phase needs an `observations=` keyword in the guide
    return ReweightedWakeSleep(
        num_particles=k, insomnia=1.0, vectorize_particles=True, max_plate_nesting=1
    )


@dataclass(frozen=True)
class Estimator:
    label: str
    make: Callable[[int], object]
    min_particles: int
    help: str


ESTIMATORS: dict[str, Estimator] = {
    "rws": Estimator(
        "RWS wake-phi",
        lambda k: RWS(num_particles=k, insomnia=1.0, max_plate_nesting=1),
        2,
        "reweighted wake-sleep, guide by wake-phi (insomnia 1)",
    ),
    "rws-sleep": Estimator(
        "RWS sleep-phi",
        lambda k: RWS(num_particles=k, insomnia=0.0, max_plate_nesting=1),
        1,
        "reweighted wake-sleep, guide by sleep-phi (insomnia 0)",
    ),
    "rws-mix": Estimator(
        "RWS wake+sleep-phi",
        lambda k: RWS(num_particles=k, insomnia=0.5, max_plate_nesting=1),
        2,
        "reweighted wake-sleep, guide by half wake-phi, half sleep-phi (insomnia 0.5)",
    ),
    "ws": Estimator(
        "wake-sleep",
        lambda k: WakeSleepELBO(num_particles=k, max_plate_nesting=1),
        1,
        "classic wake-sleep (WakeSleepELBO: wake-theta on K samples, sleep-phi)",
    ),
    "vimco": Estimator(
        "VIMCO",
        lambda k: VIMCO(num_particles=k, max_plate_nesting=1),
        2,
        "VIMCO: IWAE bound with leave-one-out baselines",
    ),
    "pyro-rws": Estimator(
        "Pyro RWS (joint)",
        _pyro_rws,
        2,
        "pyro.infer.ReweightedWakeSleep, insomnia 1 (one joint weight per minibatch)",
    ),
}

GMM_DEFAULT_ESTIMATORS = ["rws", "ws", "vimco", "pyro-rws"]
GMM_DEFAULT_PARTICLES = [2, 5, 10]
SBN_DEFAULT_ESTIMATORS = ["rws", "ws", "vimco", "pyro-rws"]


# ---------------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------------
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


def _common_options(p: argparse.ArgumentParser) -> None:
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
            "  python -m pyro_rws gmm --estimators rws,rws-sleep --particles 5,20 --plot gmm.png\n"
            "  python -m pyro_rws sbn                  # SBN on sklearn digits\n"
            "  python -m pyro_rws sbn --data mnist --layers 200,200,200 --steps 20000\n"
            "see 'python -m pyro_rws gmm --help' and 'python -m pyro_rws sbn --help'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="{gmm,sbn}")

    gmm = sub.add_parser(
        "gmm",
        help="Gaussian mixture of Le et al. 2019 (default)",
        description=(
            "The Gaussian mixture of Le et al. (2019, sec. 5.1): 20 clusters with means 10c and "
            "std 5, learned prior softmax(0.5 theta) (initialized as in the paper's code, almost "
            "all mass on cluster 0), guide an MLP 1-16-16-20. Every step draws a fresh batch "
            "from the true mixture. Reports model error ||softmax(0.5 theta) - pi_true||, "
            "inference error (mean over 100 fixed test points of ||q(.|x) - p_true(.|x)||), the "
            "importance-weighted bound per point with the training K (on 1000 fresh points, "
            "at the end) and ms per training step (after a warm-up, evaluation excluded)."
        ),
    )
    gmm.add_argument(
        "--estimators",
        type=_estimator_list,
        default=GMM_DEFAULT_ESTIMATORS,
        help=_estimator_help(GMM_DEFAULT_ESTIMATORS),
    )
    gmm.add_argument(
        "--particles",
        "-K",
        type=_int_list,
        default=GMM_DEFAULT_PARTICLES,
        help="comma-separated numbers of particles K (default: 2,5,10)",
    )
    gmm.add_argument(
        "--steps", type=_positive(int), default=2000, help="training steps (default 2000)"
    )
    gmm.add_argument(
        "--lr",
        type=_positive(float),
        default=1e-2,
        help="Adam learning rate (default 1e-2; the paper uses 1e-3 for 100,000 steps)",
    )
    gmm.add_argument(
        "--batch-size", type=_positive(int), default=100, help="points per step (default 100)"
    )
    gmm.add_argument(
        "--init",
        choices=["paper", "uniform"],
        default="paper",
        help="initial theta: 'paper' ([38, 36, ..., 0]) or 'uniform' (default paper)",
    )
    gmm.add_argument(
        "--eval-every",
        type=_positive(int),
        default=None,
        help="record the errors every N steps for the plot (default steps/40)",
    )
    _common_options(gmm)

    sbn = sub.add_parser(
        "sbn",
        help="sigmoid belief nets on sklearn digits or binarized MNIST",
        description=(
            "Sigmoid belief nets (Bernoulli latent layers, linear-sigmoid conditionals, a "
            "mirrored guide) trained on minibatches of binarized sklearn digits (8x8, no "
            "download) or binarized MNIST (a local .npz). Reports the held-out log p(x) "
            "(importance-sampled with the trained guide, a lower bound in expectation that "
            "tightens with --eval-particles) and ms per training step."
        ),
    )
    sbn.add_argument(
        "--data",
        default="digits",
        help=(
            "'digits' (default), 'mnist' (binarized MNIST found via $BINARIZED_MNIST or "
            "../shared/data/binarized_mnist.npz) or a path to binarized_mnist.npz"
        ),
    )
    sbn.add_argument(
        "--layers",
        type=_int_list,
        default=None,
        help="latent layer sizes, bottom first (default 16 for digits, 200 for MNIST)",
    )
    sbn.add_argument(
        "--estimators",
        type=_estimator_list,
        default=SBN_DEFAULT_ESTIMATORS,
        help=_estimator_help(SBN_DEFAULT_ESTIMATORS),
    )
    sbn.add_argument(
        "--particles", "-K", type=_int_list, default=[10], help="comma-separated K (default 10)"
    )
    sbn.add_argument(
        "--steps", type=_positive(int), default=3000, help="training steps (default 3000)"
    )
    sbn.add_argument(
        "--batch-size", type=_positive(int), default=64, help="minibatch size (default 64)"
    )
    sbn.add_argument(
        "--lr", type=_positive(float), default=1e-3, help="Adam learning rate (default 1e-3)"
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
    sbn.add_argument(
        "--eval-every",
        type=_positive(int),
        default=None,
        help="record held-out log p(x) (K=100, 10 with --quick; <=200 images) every N steps "
        "(default steps/10)",
    )
    _common_options(sbn)
    return parser


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
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
    run.extra["log p(x)"] = float(_gmm_log_likelihood(gmm, x_eval).mean())
    run.extra["x_eval"] = x_eval
    return run


@torch.no_grad()
def _gmm_log_likelihood(gmm: GMM | None, x: torch.Tensor) -> torch.Tensor:
    """Exact log p(x) under the learned mixture (or the true one for ``gmm=None``)."""
    if gmm is None:
        log_pi = true_weights(x.dtype).log()
    else:
        log_pi = torch.log_softmax(0.5 * gmm.theta.detach(), -1)
    c = 10.0 * torch.arange(len(log_pi), dtype=x.dtype)
    log_norm = -0.5 * ((x.unsqueeze(-1) - c) / 5.0) ** 2 - math.log(5.0 * math.sqrt(2 * math.pi))
    return torch.logsumexp(log_pi + log_norm, -1)


def _load_sbn_data(spec: str):
    from .examples.data import find_binarized_mnist, load_binarized_mnist, load_digits

    if spec == "digits":
        try:
            train, test = load_digits()
        except ImportError:
            raise _UsageError(
                "--data digits needs scikit-learn (pip install scikit-learn)"
            ) from None
        return train, test, "sklearn digits (binarized at > 7)"
    if spec == "mnist":
        path = find_binarized_mnist()
        if path is None:
            raise _UsageError(
                "binarized MNIST not found: set $BINARIZED_MNIST or pass --data /path/to/"
                "binarized_mnist.npz (keys train/valid/test of numpy.packbits rows)"
            )
    else:
        from pathlib import Path

        path = Path(spec)
        if not path.is_file():
            raise _UsageError(
                f"--data: expected 'digits', 'mnist' or an existing file, got {spec!r}"
            )
    try:
        data = load_binarized_mnist(path)
    except Exception as e:  # noqa: BLE001 - report any unreadable file as a usage error
        raise _UsageError(f"--data: could not read {str(path)!r} as binarized MNIST: {e}") from e
    # the test split is sorted by digit: shuffle it once (fixed seed) so test[:n] is fair
    test = data["test"][
        torch.randperm(len(data["test"]), generator=torch.Generator().manual_seed(0))
    ]
    return data["train"], test, f"binarized MNIST ({path})"


def train_sbn(name: str, k: int, data, args, bar=None) -> Run:
    from .examples.sbn import SBN

    train, test = data
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    sbn = SBN(train.shape[-1], tuple(args.layers))
    svi = SVI(sbn.model, sbn.guide, Adam({"lr": args.lr}), loss=ESTIMATORS[name].make(k))
    run = Run(name, k)
    gen = torch.Generator().manual_seed(args.seed)
    order, pos = torch.randperm(len(train), generator=gen), 0
    curve_points = test[: min(200, len(test))]

    def next_batch():
        nonlocal order, pos
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(train), generator=gen), 0
        batch = train[order[pos : pos + args.batch_size]]
        pos += args.batch_size
        return batch

    def evaluate():
        lp = log_evidence(sbn.model, sbn.guide, curve_points, num_particles=args.curve_particles)
        return {"held-out log p(x)": float(lp.mean())}

    timer = _svi_loop(run, svi, args.steps, next_batch, evaluate, args.eval_every, bar)
    points = test[: args.eval_points]
    # particles per vectorized chunk: keep each (chunk, points, pixels) tensor near 80 MB
    chunk = max(1, min(100, 20_000_000 // (len(points) * points.shape[-1])))
    lp = log_evidence(
        sbn.model, sbn.guide, points, num_particles=args.eval_particles, chunk_size=chunk
    )
    run.metrics = {"test log p(x)": float(lp.mean()), "ms/step": timer.ms}
    run.extra["samples"] = sbn.sample_images(8)
    return run


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def _print_table(runs: list[Run], title: str) -> None:
    print()
    print(title)
    columns = list(runs[0].metrics)
    width = max(len(ESTIMATORS[r.name].label) for r in runs) + 2
    header = f"{'estimator':<{width}}{'K':>4}" + "".join(f"{c:>18}" for c in columns)
    print(header)
    print("-" * len(header))
    for r in runs:
        cells = "".join(f"{r.metrics[c]:>18.3f}" for c in columns)
        note = "  *" if r.warnings else ""
        print(f"{ESTIMATORS[r.name].label:<{width}}{r.k:>4}{cells}{note}")
    if any(r.warnings for r in runs):
        print("* " + "; ".join(sorted({w for r in runs for w in r.warnings})))


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise _UsageError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _styles(runs: list[Run]):
    names = list(dict.fromkeys(r.name for r in runs))
    ks = sorted({r.k for r in runs})
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    dashes = ["-", "--", ":", "-."]
    widths = {k: 1.0 + 1.2 * i / max(1, len(ks) - 1) for i, k in enumerate(ks)}
    return {
        (r.name, r.k): dict(
            color=colors[r.name],
            linestyle=dashes[ks.index(r.k) % len(dashes)],
            linewidth=widths[r.k],
        )
        for r in runs
    }


def _plot_gmm(runs: list[Run], path: str, title: str) -> None:
    plt = _pyplot()
    styles = _styles(runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for ax, key in zip(axes, ["model error", "inference error"], strict=True):
        for r in runs:
            ax.plot(r.steps, r.curves[key], label=r.label, **styles[(r.name, r.k)])
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel(key)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(r"model error $\|\pi_\theta - \pi_{true}\|_2$")
    axes[1].set_title(r"inference error $E\,\|q(\cdot|x) - p_{true}(\cdot|x)\|_2$")
    axes[1].legend(fontsize=8, loc="best", ncol=1 + len(runs) // 9)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_sbn(
    runs: list[Run], path: str, title: str, image_side: int | None, curve_title: str
) -> None:
    plt = _pyplot()
    styles = _styles(runs)
    rows = len(runs) if image_side else 0
    fig = plt.figure(figsize=(12, 4.5 + 1.0 * rows), constrained_layout=True)
    grid = fig.add_gridspec(1 + rows, 2, height_ratios=[4.5] + [1.0] * rows)
    ax = fig.add_subplot(grid[0, :])
    for r in runs:
        ax.plot(r.steps, r.curves["held-out log p(x)"], label=r.label, **styles[(r.name, r.k)])
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out log p(x) (nats/image)")
    ax.set_title(curve_title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    for i, r in enumerate(runs if image_side else []):
        sub = fig.add_subplot(grid[1 + i, :])
        images = r.extra["samples"].reshape(-1, image_side, image_side)
        sub.imshow(torch.cat(list(images), dim=1).numpy(), cmap="gray_r", vmin=0, vmax=1)
        sub.set_axis_off()
        sub.set_title(f"samples: {r.label}", fontsize=9)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
class _UsageError(Exception):
    pass


def _progress(total: int, args):
    return tqdm(total=total, desc="training", unit="step", disable=args.no_progress, leave=False)


def _check_plot(args) -> None:
    """Fail before training when the plot cannot be written."""
    if args.plot:
        from pathlib import Path

        _pyplot()
        if not Path(args.plot).resolve().parent.is_dir():
            raise _UsageError(f"--plot: the folder of {args.plot!r} does not exist")


def _check_particles(args) -> None:
    for name in args.estimators:
        est = ESTIMATORS[name]
        small = [k for k in args.particles if k < est.min_particles]
        if small:
            raise _UsageError(f"estimator {name} needs K >= {est.min_particles}, got K={small[0]}")


def run_gmm(args) -> int:
    if args.quick:
        args.steps = min(args.steps, 100)
        args.particles = [k for k in args.particles if k <= 5] or [min(args.particles)]
    _check_particles(args)
    _check_plot(args)
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 40)
    jobs = [(e, k) for e in args.estimators for k in args.particles]
    runs = []
    start = time.perf_counter()
    with _progress(len(jobs) * args.steps, args) as bar:
        for name, k in jobs:
            bar.set_postfix_str(f"{name} K={k}")
            runs.append(train_gmm(name, k, args, None if args.no_progress else bar))
    elapsed = time.perf_counter() - start
    x_eval = runs[0].extra["x_eval"]
    _print_table(
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
        f"{float(_gmm_log_likelihood(None, x_eval).mean()):.3f}"
    )
    best = min(runs, key=lambda r: r.metrics["model error"])
    print(f"\nmixture weights learned by {best.label} (lowest model error) vs true:")
    print("  learned:", " ".join(f"{p:.3f}" for p in best.extra["weights"].tolist()))
    print("  true:   ", " ".join(f"{p:.3f}" for p in true_weights().tolist()))
    if args.plot:
        _plot_gmm(runs, args.plot, f"Gaussian mixture, batch {args.batch_size}, lr {args.lr}")
        print(f"\nplot saved to {args.plot}")
    return 0


def run_sbn(args) -> int:
    train, test, label = _load_sbn_data(args.data)
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
    _check_particles(args)
    _check_plot(args)
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 10)
    arch = "-".join(map(str, [train.shape[-1], *args.layers]))
    jobs = [(e, k) for e in args.estimators for k in args.particles]
    runs = []
    start = time.perf_counter()
    with _progress(len(jobs) * args.steps, args) as bar:
        for name, k in jobs:
            bar.set_postfix_str(f"{name} K={k}")
            runs.append(train_sbn(name, k, (train, test), args, None if args.no_progress else bar))
    elapsed = time.perf_counter() - start
    _print_table(
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
        _plot_sbn(runs, args.plot, f"SBN {arch} on {label}", side, curve)
        print(f"\nplot saved to {args.plot}")
    return 0


COMMANDS = {"gmm": run_gmm, "sbn": run_sbn}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pyro_rws``; returns the exit status (2 for bad options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["gmm", *argv]  # gmm is the default command
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, message already printed)
        return 0 if e.code is None else int(e.code)
    torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except _UsageError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
