# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""What the command line shows: the results table and the PNG plots of the curves."""

from __future__ import annotations

from pathlib import Path

import torch

from .estimators import ESTIMATORS
from .parser import UsageError


def print_table(runs, title: str) -> None:
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
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_plot(args) -> None:
    """Fail before training when the plot cannot be written."""
    if args.plot:
        _pyplot()
        if not Path(args.plot).resolve().parent.is_dir():
            raise UsageError(f"--plot: the folder of {args.plot!r} does not exist")


def _plain_log_ticks(ax) -> None:
    """Label a log y-axis with plain numbers (0.7, not 7x10^-1), minor ticks where room."""
    from matplotlib.ticker import LogFormatterSciNotation

    class Plain(LogFormatterSciNotation):
        def __call__(self, x, pos=None):
            return f"{float(f'{x:.2g}'):g}" if super().__call__(x, pos) else ""

    ax.yaxis.set_major_formatter(Plain())
    ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1, 0.5)))


def _panels(runs):
    """Runs grouped by estimator (one panel each), and one color per K shared by all panels."""
    names = list(dict.fromkeys(r.name for r in runs))
    ks = sorted({r.k for r in runs})
    colors = {k: f"C{i}" for i, k in enumerate(ks)}
    return {n: [r for r in runs if r.name == n] for n in names}, colors


def _context(ax, runs, key, own) -> None:
    """The other estimators' curves, thin and grey, behind a panel's own."""
    for r in runs:
        if r.name != own:
            ax.plot(r.steps, r.curves[key], color="0.82", linewidth=0.8, zorder=1)


def plot_gmm(runs, path: str, title: str) -> None:
    """Small multiples: a row per error, a column per estimator, a color per K."""
    plt = _pyplot()
    groups, colors = _panels(runs)
    keys = {
        "model error": r"model error $\|\pi_\theta - \pi_{true}\|_2$",
        "inference error": r"inference error $E\,\|q(\cdot|x) - p_{true}(\cdot|x)\|_2$",
    }
    fig, axes = plt.subplots(
        len(keys),
        len(groups),
        figsize=(2.9 * len(groups) + 1.4, 5.6),
        sharex=True,
        sharey="row",
        squeeze=False,
        layout="constrained",
    )
    for row, (key, ylabel) in enumerate(keys.items()):
        for col, (name, group) in enumerate(groups.items()):
            ax = axes[row, col]
            _context(ax, runs, key, name)
            for r in group:
                ax.plot(r.steps, r.curves[key], color=colors[r.k], linewidth=1.6, zorder=2)
            ax.set_yscale("log")
            _plain_log_ticks(ax)
            ax.grid(True, which="both", alpha=0.3)
            if row == 0:
                ax.set_title(ESTIMATORS[name].label, fontsize=10)
            if row == len(keys) - 1:
                ax.set_xlabel("iteration")
            if col == 0:
                ax.set_ylabel(ylabel, fontsize=9)
    handles = [plt.Line2D([], [], color=c, linewidth=1.6) for c in colors.values()]
    labels = [f"K={k}" for k in colors]
    handles.append(plt.Line2D([], [], color="0.82", linewidth=0.8))
    labels.append("other\nestimators")
    fig.legend(handles, labels, loc="outside right upper", fontsize=9)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sbn(runs, path: str, title: str, image_side: int | None, curve_title: str) -> None:
    """A curve panel per estimator (the others grey behind it), then images sampled from each."""
    plt = _pyplot()
    groups, colors = _panels(runs)
    rows = len(runs) if image_side else 0
    fig = plt.figure(figsize=(2.9 * len(groups) + 1.4, 3.4 + 0.9 * rows), layout="constrained")
    grid = fig.add_gridspec(1 + rows, len(groups), height_ratios=[3.4] + [0.9] * rows)
    first = None
    for col, (name, group) in enumerate(groups.items()):
        ax = fig.add_subplot(grid[0, col], sharey=first)
        first = first or ax
        _context(ax, runs, "held-out log p(x)", name)
        for r in group:
            ax.plot(r.steps, r.curves["held-out log p(x)"], color=colors[r.k], linewidth=1.6)
        final = ", ".join(f"{r.metrics['test log p(x)']:.2f}" for r in group)
        ax.set_title(f"{ESTIMATORS[name].label}\nfinal test log p(x) {final}", fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        if col == 0:
            ax.set_ylabel("held-out log p(x)\n(nats/image)")
        else:
            ax.tick_params(labelleft=False)
    handles = [plt.Line2D([], [], color=c, linewidth=1.6) for c in colors.values()]
    labels = [f"K={k}" for k in colors]
    handles.append(plt.Line2D([], [], color="0.82", linewidth=0.8))
    labels.append("other\nestimators")
    fig.legend(handles, labels, loc="outside right upper", fontsize=9)
    for i, r in enumerate(runs if image_side else []):
        sub = fig.add_subplot(grid[1 + i, :])
        images = r.extra["samples"].reshape(-1, image_side, image_side)
        gap = torch.zeros(image_side, 2, dtype=images.dtype)
        strip = torch.cat([torch.cat([im, gap], dim=1) for im in images], dim=1)
        sub.imshow(strip.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        sub.set_axis_off()
        sub.set_title(
            f"binary samples x ~ p(x) from {r.label} (same random draws for every estimator)",
            fontsize=9,
        )
    fig.suptitle(f"{title}\n{curve_title}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
