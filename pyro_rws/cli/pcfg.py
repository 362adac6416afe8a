# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""``python -m pyro_rws pcfg``: the PCFG experiment of Le et al. (2019), sec. 5.2."""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from .parser import UsageError, _common_options, _int_list, _positive
from .report import check_plot

PCFG_DEFAULT_ESTIMATORS = ["rws", "vimco", "ws-le"]
PCFG_ESTIMATOR_HELP = {
    "rws": "RWS wake-wake: RWS(K, insomnia=1) (rrws 'ww')",
    "ws-le": "wake-sleep of Le et al.: RWS(K, insomnia=0, num_sleep_particles=K) (rrws 'ws')",
    "ws": "classic wake-sleep: WakeSleepELBO(K, num_sleep_particles=K)",
    "vimco": "VIMCO(K) (rrws 'vimco')",
    "reinforce": "IWAE, score-function gradient: VIMCO(K, baseline=None) (rrws 'reinforce')",
}

PCFG_DESCRIPTION = (
    "The probabilistic context-free grammar of Le et al. (2019, sec. 5.2) with the semantics of "
    "their code (tuananhle7/rrws): a tree expanded from the start symbol, one pyro.sample per "
    "non-terminal visited (stochastic control flow, so every loss runs with "
    "vectorize_particles=False), the sentence observed through -levenshtein(leaves, x)^2; the "
    "guide is rrws's recurrent inference network. Every iteration draws a fresh batch of "
    "sentences from the true grammar (astronomers). Reports model error (mean over "
    "non-terminals of KL(true production probabilities || learned)), inference error "
    "(-mean log q(z|x) on 100 fresh (z, x) from the true grammar) and ms per iteration. The "
    "full grid is slow (about 0.1 s per particle and iteration on one core): start with "
    "--quick or one K."
)


def _estimators(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in PCFG_ESTIMATOR_HELP]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown estimator(s) {', '.join(unknown) or '(none)'}; choose from "
            f"{', '.join(PCFG_ESTIMATOR_HELP)}"
        )
    return list(dict.fromkeys(names))


def add_pcfg_parser(sub) -> None:
    p = sub.add_parser(
        "pcfg",
        help="probabilistic context-free grammar of Le et al. 2019",
        description=PCFG_DESCRIPTION,
    )
    lines = "; ".join(f"{k}: {v}" for k, v in PCFG_ESTIMATOR_HELP.items())
    p.add_argument(
        "--estimators",
        type=_estimators,
        default=PCFG_DEFAULT_ESTIMATORS,
        help=f"comma-separated (default: {','.join(PCFG_DEFAULT_ESTIMATORS)}). {lines}",
    )
    p.add_argument(
        "--particles",
        "-K",
        type=_int_list,
        default=[2, 5],
        help="comma-separated numbers of particles K (default 2,5; the paper: 2,5,10,20)",
    )
    p.add_argument(
        "--steps",
        type=_positive(int),
        default=2000,
        help="training iterations (default 2000, as rrws)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive(int),
        default=2,
        help="sentences per iteration (default 2, as rrws)",
    )
    p.add_argument("--lr", type=_positive(float), default=1e-3, help="Adam lr (default 1e-3)")
    p.add_argument(
        "--eval-samples",
        type=_positive(int),
        default=100,
        help="(z, x) draws of the inference error (default 100, as rrws)",
    )
    p.add_argument(
        "--grammar",
        default=None,
        help="a grammar in rrws's JSON format (default: astronomers, built in)",
    )
    _common_options(p, "record the errors every N iterations (default 10, as rrws)")


def run_pcfg(args) -> int:
    from ..examples.pcfg import PCFG, Grammar, train

    if args.quick:
        args.steps = min(args.steps, 20)
        args.particles = [min(args.particles)]
        args.eval_samples = min(args.eval_samples, 10)
    if args.eval_every is None:
        args.eval_every = 10 if not args.quick else 10
    if any(k < 2 for k in args.particles) and set(args.estimators) & {"rws", "vimco"}:
        raise UsageError("estimators rws and vimco need K >= 2")
    check_plot(args)
    try:
        grammar = Grammar.load(args.grammar) if args.grammar else None
    except (OSError, KeyError, ValueError) as e:
        raise UsageError(f"--grammar: could not read {args.grammar!r}: {e}") from e
    jobs = [(e, k) for e in args.estimators for k in args.particles]
    start = time.perf_counter()
    results = []
    with tqdm(
        total=len(jobs) * args.steps,
        desc="training",
        unit="it",
        disable=args.no_progress,
        leave=False,
    ) as bar:
        for name, k in jobs:
            bar.set_postfix_str(f"{name} K={k}")
            results.append(
                train(
                    name,
                    k,
                    args.steps,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    eval_every=args.eval_every,
                    eval_samples=args.eval_samples,
                    lr=args.lr,
                    grammar=grammar,
                    progress=lambda i: bar.update(),
                )
            )
    elapsed = time.perf_counter() - start
    g = results[0].model.grammar
    print(
        f"\nPCFG ({g.name}), {args.steps} iterations of {args.batch_size} fresh sentences, "
        f"Adam lr {args.lr}, seed {args.seed} ({elapsed:.0f} s)"
    )
    header = f"{'estimator':<10}{'K':>4}{'model error':>16}{'inference error':>18}{'ms/iter':>10}"
    print(header + "\n" + "-" * len(header))
    for r in results:
        print(
            f"{r.estimator:<10}{r.num_particles:>4}{r.model_error[-1]:>16.4f}"
            f"{r.inference_error[-1]:>18.3f}{r.ms_per_iteration:>10.1f}"
        )
    print(
        "model error: mean over non-terminals of KL(p_true(.|A) || p_theta(.|A)); inference "
        f"error: -mean log q(z|x) on {args.eval_samples} fresh (z, x) ~ p_true (rrws's "
        "get_q_error); ms/iter: training only."
    )
    best = min(results, key=lambda r: r.model_error[-1])
    true = PCFG(g, probs=g.production_probs).production_probs()
    print(
        f"\nproduction probabilities learned by {best.estimator} K={best.num_particles} "
        "(lowest model error) vs true:"
    )
    for a, probs in best.model.production_probs().items():
        if len(probs) > 1:
            print(f"  {a:>3} learned: " + " ".join(f"{p:.3f}" for p in probs.tolist()))
            print(f"  {'':>3} true:    " + " ".join(f"{p:.3f}" for p in true[a].tolist()))
    if args.plot:
        _plot(results, args.plot, f"PCFG ({g.name}), batch {args.batch_size}, seed {args.seed}")
        print(f"\nplot saved to {args.plot}")
    return 0


def _plot(results, path: str, title: str) -> None:
    from .report import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    names = list(dict.fromkeys(r.estimator for r in results))
    ks = sorted({r.num_particles for r in results})
    styles = ["-", "--", ":", "-."]
    for r in results:
        color = f"C{names.index(r.estimator)}"
        ls = styles[ks.index(r.num_particles) % len(styles)]
        axes[0].plot(
            r.iterations,
            r.model_error,
            color=color,
            ls=ls,
            label=f"{r.estimator} K={r.num_particles}",
        )
        axes[1].plot(r.iterations, r.inference_error, color=color, ls=ls)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("model error (mean KL)")
    axes[1].set_ylabel("inference error (-mean log q)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
