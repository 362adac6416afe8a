# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The PCFG experiment of Le et al. (2019) with pyro_rws and with the paper's own code
(tuananhle7/rrws, folder ``pcfg/``, not part of this repository), side by side: same grammar
(astronomers), batch, iterations, K, seeds, and the same initial parameters for a seed.

    git clone https://github.com/tuananhle7/rrws /tmp/rrws   # rrws needs `pip install Levenshtein`
    python benchmarks/pcfg_rrws.py --rrws /tmp/rrws/pcfg run --estimators rws,vimco,ws-le \\
        --particles 2,5,10,20 --seeds 1,2 --iterations 2000 --jobs 2
    python benchmarks/pcfg_rrws.py plot            # figures and table from the saved runs
    python benchmarks/pcfg_rrws.py --rrws /tmp/rrws/pcfg time --particles 5 --repeats 5

``run`` trains every (implementation, estimator, K, seed) in its own process (``--jobs`` at a
time) and saves its curves to ``benchmarks/results/pcfg/`` (existing files are kept: a rerun
resumes). rrws runs through its own ``train.train_wake_wake`` / ``train_wake_sleep`` /
``train_iwae`` with its own ``util.get_p_error`` and ``util.get_q_error`` (against the true
grammar, as the paper plots) called from a callback every ``--eval-every`` iterations.
Estimators: rws = RWS(K, insomnia=1) vs rrws ``ww``; ws-le = RWS(K, insomnia=0,
num_sleep_particles=K) vs rrws ``ws``; vimco = VIMCO(K) vs rrws ``vimco``; ws = WakeSleepELBO
(pyro_rws only); reinforce = VIMCO(K, baseline=None) vs rrws ``reinforce``; vimco-logk (rrws
only) = rrws's ``vimco`` with the ``- log K`` of its bound restored in its leave-one-out
baseline (see ``check``), to tell whether that difference explains the two VIMCO curves.

``check`` compares the gradients of one step of pyro_rws's RWS, VIMCO and REINFORCE with rrws's
wake-theta / wake-phi, VIMCO and REINFORCE losses on the same particles (exact up to float32
rounding).

``time`` interleaves iterations of pyro_rws's RWS and rrws's ``train_wake_wake`` (same K, batch,
one thread, from the same initial parameters), reporting the median ms per iteration of each
and the ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "pcfg"
RRWS_MODE = {
    "rws": "ww",
    "ws-le": "ws",
    "vimco": "vimco",
    "reinforce": "reinforce",
    "vimco-logk": "vimco",
}
RRWS_ONLY = {"vimco-logk"}  # rrws's code with a change, to explain a difference
LABEL = {
    "rws": "RWS wake-wake",
    "ws-le": "wake-sleep (RWS insomnia 0)",
    "ws": "WakeSleepELBO",
    "vimco": "VIMCO",
    "reinforce": "REINFORCE (IWAE)",
    "vimco-logk": "VIMCO, rrws, -log K restored",
}


def _rrws_modules(path: str):
    sys.path.insert(0, path)
    import train as rrws_train  # noqa: E402 - rrws's own modules
    import util as rrws_util

    return rrws_train, rrws_util


def run_rrws(path, estimator, k, seed, iterations, eval_every, batch_size=2):
    rrws_train, util = _rrws_modules(path)
    torch.set_num_threads(1)
    util.set_seed(seed)
    gen, inf, true = util.init_models(os.path.join(path, "pcfgs", "astronomers_pcfg.json"))
    curves = {"iterations": [], "model_error": [], "inference_error": []}
    clock = {"last": None, "total": 0.0}

    def callback(iteration, *rest):
        now = time.perf_counter()
        clock["total"] += now - clock["last"]
        if iteration % eval_every == 0 or iteration == iterations - 1:
            curves["iterations"].append(iteration)
            curves["model_error"].append(float(util.get_p_error(true, gen)))
            curves["inference_error"].append(float(util.get_q_error(true, inf)))
        clock["last"] = time.perf_counter()

    mode = RRWS_MODE[estimator]
    if estimator == "vimco-logk":
        rrws_train.losses.get_vimco_loss = _vimco_loss_with_log_k(rrws_train.losses)
    clock["last"] = time.perf_counter()
    if mode == "ww":
        rrws_train.train_wake_wake(gen, inf, true, batch_size, iterations, k, callback)
    elif mode == "ws":
        rrws_train.train_wake_sleep(gen, inf, true, batch_size, iterations, k, callback)
    else:
        rrws_train.train_iwae(mode, gen, inf, true, batch_size, iterations, k, callback)
    return curves, 1000 * clock["total"] / iterations


def _vimco_loss_with_log_k(rrws_losses):
    """rrws's ``get_vimco_loss`` with the ``- log K`` of its bound restored in the baseline."""

    def get_vimco_loss(generative_model, inference_network, obss, num_particles=1):
        k = num_particles
        lw, lq = rrws_losses.get_log_weight_and_log_q(generative_model, inference_network, obss, k)
        return _vimco_with_log_k(lw, lq, k)

    return get_vimco_loss


def _vimco_with_log_k(lw, lq, k):
    """(loss, bound) of VIMCO from rrws's [batch, K] log-weights and log-q's, -log K restored."""
    bound = torch.logsumexp(lw, 1) - math.log(k)
    signal = 0
    for i in range(k):
        others = lw[:, [j for j in range(k) if j != i]]
        cv = torch.logsumexp(torch.cat([others, others.mean(1, keepdim=True)], 1), 1)
        signal = signal + (bound - cv + math.log(k)).detach() * lq[:, i]
    return -bound.mean() - signal.mean(), bound.mean()


def run_ours(estimator, k, seed, iterations, eval_every, batch_size=2):
    from pyro_rws.examples.pcfg import train

    torch.set_num_threads(1)
    r = train(estimator, k, iterations, batch_size=batch_size, seed=seed, eval_every=eval_every)
    curves = {"iterations": r.iterations, "model_error": r.model_error}
    curves["inference_error"] = r.inference_error
    return curves, r.ms_per_iteration


def one(args) -> None:
    """One run in this process, saved as JSON."""
    import warnings

    warnings.simplefilter("ignore")  # rrws's torch.tensor(tensor) copies warn on each node
    start = time.perf_counter()
    marker = Path(args.out).with_suffix(".running")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    if args.impl == "rrws":
        curves, ms = run_rrws(
            args.rrws, args.estimator, args.k, args.seed, args.iterations, args.eval_every
        )
    else:
        curves, ms = run_ours(args.estimator, args.k, args.seed, args.iterations, args.eval_every)
    record = dict(
        impl=args.impl,
        estimator=args.estimator,
        k=args.k,
        seed=args.seed,
        iterations_total=args.iterations,
        ms_per_iteration=ms,
        wall_s=time.perf_counter() - start,
        **curves,
    )
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    marker.unlink(missing_ok=True)


def _ints(text):
    return [int(t) for t in text.split(",") if t]


def run(args) -> None:
    jobs = []
    for seed in args.seeds:
        for k in args.particles:
            for est in args.estimators:
                for impl in ("rrws", "pyro_rws"):
                    if (impl == "rrws" and est == "ws") or (impl != "rrws" and est in RRWS_ONLY):
                        continue
                    out = OUT / f"{impl}_{est}_K{k}_s{seed}_i{args.iterations}.json"
                    if out.exists() or out.with_suffix(".running").exists():
                        continue  # done, or being run by another runner
                    cmd = [
                        sys.executable,
                        __file__,
                        "--rrws",
                        args.rrws or "",
                        "one",
                        "--impl",
                        impl,
                        "--estimator",
                        est,
                        "--k",
                        str(k),
                        "--seed",
                        str(seed),
                        "--iterations",
                        str(args.iterations),
                        "--eval-every",
                        str(args.eval_every),
                        "--out",
                        str(out),
                    ]
                    jobs.append((out.name, ["nice", "-n", "10", *cmd]))
    print(f"{len(jobs)} runs, {args.jobs} at a time", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    running = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *args.pythonpath]))
    while jobs or running:
        while jobs and len(running) < args.jobs:
            name, cmd = jobs.pop(0)
            marker = (OUT / name).with_suffix(".running")
            if (OUT / name).exists() or marker.exists():
                continue  # taken by another runner meanwhile
            marker.touch()
            running.append((name, time.time(), subprocess.Popen(cmd, env=env)))
        time.sleep(2)
        for item in list(running):
            name, t0, proc = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"{name}: exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True)


def load(iterations=None):
    records = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    return [r for r in records if iterations is None or r["iterations_total"] == iterations]


METRICS = {
    "model_error": "model error: mean KL(p_true(.|A) || p_theta(.|A))",
    "inference_error": "inference error: -mean log q(z|x), (z,x) ~ p_true",
}
COLORS = {"rrws": "C1", "pyro_rws": "C0"}


def _tail_mean(values, fraction=0.25):
    """Mean of the last quarter of a curve (the q-error is a 100-sample Monte Carlo estimate)."""
    n = max(1, int(round(len(values) * fraction)))
    return sum(values[-n:]) / n


def summary(records):
    """Rows (estimator, K, impl, seeds, final metric per seed), final = mean of the last quarter."""
    rows = {}
    for r in records:
        key = (r["estimator"], r["k"], r["impl"])
        row = rows.setdefault(key, {m: [] for m in METRICS} | {"seeds": [], "ms": []})
        row["seeds"].append(r["seed"])
        row["ms"].append(r["ms_per_iteration"])
        for m in METRICS:
            row[m].append(_tail_mean(r[m]))
    return rows


def table(records) -> str:
    rows = summary(records)
    lines = [
        "| estimator | K | implementation | seeds | model error (each seed) | inference error "
        "(each seed) | wall ms/iteration (loaded machine) |",
        "|---|---|---|---|---|---|---|",
    ]
    order = list(LABEL)
    for (est, k, impl), row in sorted(
        rows.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1], kv[0][2])
    ):
        fmt = lambda v: ", ".join(f"{x:.4f}" if x < 1 else f"{x:.2f}" for x in v)  # noqa: E731
        lines.append(
            f"| {LABEL[est]} | {k} | {impl} | {','.join(map(str, row['seeds']))} | "
            f"{fmt(row['model_error'])} | {fmt(row['inference_error'])} | "
            f"{statistics.median(row['ms']):.0f} |"
        )
    return "\n".join(lines)


def _mean_curve(runs, metric):
    n = min(len(r[metric]) for r in runs)
    xs = runs[0]["iterations"][:n]
    return xs, [sum(r[metric][i] for r in runs) / len(runs) for i in range(n)]


def _minor_label(value, _pos) -> str:
    """Label a log axis's minor ticks at 2 and 5 times a power of ten only: labels at 0.09 and
    0.1 (a minor and a major tick) overlapped."""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:.3g}" if round(mantissa) in (2, 5) else ""


def plot(args) -> None:
    """One figure per metric: a panel per (estimator, K) with every seed of both codes, and a
    last row with the seed means of all estimators together (the paper's comparison)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, FuncFormatter

    records = load(args.iterations)
    if not records:
        sys.exit(f"no runs with {args.iterations} iterations in {OUT}")
    ests = [e for e in LABEL if any(r["estimator"] == e for r in records)]
    ks = sorted({r["k"] for r in records})
    dashes = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3))]
    styles = dict(zip(ests, dashes, strict=False))
    for metric, ylabel in METRICS.items():
        fig, axes = plt.subplots(
            len(ests) + 1,
            len(ks),
            figsize=(max(7.0, 3.4 * len(ks) + 0.8), 2.4 * (len(ests) + 1) + 1.0),
            sharex=True,
            sharey=True,
            squeeze=False,
            layout="constrained",
        )
        for j, k in enumerate(ks):
            for i, est in enumerate(ests):
                ax = axes[i, j]
                for r in records:
                    if r["estimator"] == est and r["k"] == k:
                        ls = "-" if r["seed"] % 2 else "--"
                        ax.plot(r["iterations"], r[metric], color=COLORS[r["impl"]], lw=1.1, ls=ls)
                ax.set_title(f"{LABEL[est]}, K = {k}", fontsize=9)
            ax = axes[-1, j]
            # the seeds every (estimator, implementation) at this K ran: a seed fixes the
            # initial parameters, so means over different seeds are not comparable
            groups = [
                {r["seed"] for r in records if (r["estimator"], r["k"], r["impl"]) == (e, k, i)}
                for e in ests
                for i in COLORS
                if e not in RRWS_ONLY  # an explanatory variant does not narrow the others
            ]
            common = set.intersection(*[g for g in groups if g]) if any(groups) else set()
            for est in ests:
                for impl, color in COLORS.items():
                    runs = [
                        r
                        for r in records
                        if (r["estimator"], r["k"], r["impl"]) == (est, k, impl)
                        and r["seed"] in common
                    ]
                    if runs:
                        ax.plot(*_mean_curve(runs, metric), color=color, ls=styles[est], lw=1.4)
            seeds = ",".join(str(s) for s in sorted(common))
            ax.set_title(f"seed means (seeds {seeds}, common to all), K = {k}", fontsize=9)
            ax.set_xlabel("iteration")
        for ax in axes.flat:
            if metric == "model_error":
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
                ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
                ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.grid(True, alpha=0.3, which="both")
        handles = [plt.Line2D([], [], color=c, lw=1.5) for c in COLORS.values()]
        labels = ["rrws (reference code)", "pyro_rws"]
        handles += [plt.Line2D([], [], color="k", lw=1, ls=s) for s in ("-", "--")]
        labels += ["odd seed", "even seed"]
        handles += [plt.Line2D([], [], color="0.4", lw=1.4, ls=styles[e]) for e in ests]
        labels += [f"{LABEL[e]} (last row)" for e in ests]
        fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
        fig.suptitle(f"PCFG (astronomers), batch 2\n{ylabel}", fontsize=10)
        path = OUT.parent / f"pcfg_{metric}{_suffix(args.iterations)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"saved {path}")
    text = table(records)
    (OUT.parent / f"pcfg_rrws{_suffix(args.iterations)}.md").write_text(text + "\n")
    print(text)


def _suffix(iterations) -> str:
    """The runs of 400 iterations keep the plain names; other lengths get their own files."""
    return "" if iterations in (None, 400) else f"_i{iterations}"


def timing(args) -> None:
    """Interleaved ms/iteration: pyro_rws RWS(K, insomnia=1) against rrws's train_wake_wake."""
    import warnings

    import pyro

    from pyro_rws.examples.pcfg import ESTIMATORS, train

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    rrws_train, util = _rrws_modules(args.rrws)
    k = args.particles[0]
    # a common state: pyro_rws's model and guide after --pretrain iterations of RWS at K=2,
    # copied into rrws's modules (same parameters, same order)
    r = train("rws", 2, args.pretrain, seed=args.seeds[0], eval_every=10**9, eval_samples=1)
    model, guide = r.model, r.guide
    gen, inf, true = util.init_models(os.path.join(args.rrws, "pcfgs", "astronomers_pcfg.json"))
    ours = [*model.parameters(), *guide.parameters()]
    theirs = [*gen.parameters(), *inf.parameters()]
    start = [p.detach().clone() for p in ours]
    from pyro_rws.examples.pcfg import PCFG

    true_ours = PCFG(model.grammar, probs=model.grammar.production_probs)
    loss = ESTIMATORS["rws"][0](k)

    def reset():
        with torch.no_grad():
            for p, q, s in zip(ours, theirs, start, strict=True):
                p.copy_(s)
                q.copy_(s)

    def ours_block(n):
        optimizer = torch.optim.Adam(ours)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            sentences = [true_ours.sample()[1] for _ in range(2)]
            optimizer.zero_grad()
            loss.loss_and_grads(model.model, guide.guide, sentences)
            optimizer.step()
        return 1000 * (time.perf_counter() - t0) / n, 1000 * (time.process_time() - c0) / n

    def rrws_block(n):
        t0, c0 = time.perf_counter(), time.process_time()
        rrws_train.train_wake_wake(gen, inf, true, 2, n, k)
        return 1000 * (time.perf_counter() - t0) / n, 1000 * (time.process_time() - c0) / n

    # CPU time of this (single-threaded) process: on a loaded machine the wall time mostly
    # measures how long the scheduler kept the process waiting
    times = {"pyro_rws": [], "rrws": []}
    walls = {"pyro_rws": [], "rrws": []}
    for rep in range(args.repeats):
        pyro.set_rng_seed(100 + rep)
        for name, block in (("pyro_rws", ours_block), ("rrws", rrws_block))[:: 1 - 2 * (rep % 2)]:
            reset()
            torch.manual_seed(100 + rep)
            wall, cpu = block(args.block)
            times[name].append(cpu)
            walls[name].append(wall)
        print(
            f"repeat {rep}: CPU ms/iteration pyro_rws {times['pyro_rws'][-1]:.1f}, rrws "
            f"{times['rrws'][-1]:.1f} (wall {walls['pyro_rws'][-1]:.0f}, {walls['rrws'][-1]:.0f})",
            flush=True,
        )
    med = {n: statistics.median(v) for n, v in times.items()}
    ratios = [a / b for a, b in zip(times["pyro_rws"], times["rrws"], strict=True)]
    result = dict(
        k=k,
        batch=2,
        pretrain=args.pretrain,
        block=args.block,
        cpu_ms=times,
        wall_ms=walls,
        median_cpu_ms=med,
        ratio_of_medians=med["pyro_rws"] / med["rrws"],
        ratio_range=[min(ratios), max(ratios)],
    )
    print(json.dumps(result, indent=1))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT.parent / f"pcfg_step_time_K{k}_pre{args.pretrain}.json").write_text(json.dumps(result))


def _rel(ours, theirs, batch) -> float:
    """Largest relative difference, over parameter tensors, of ours and batch * theirs."""
    err = 0.0
    for a, b in zip(ours, theirs, strict=True):
        a = torch.zeros(()) if a is None else a
        b = torch.zeros(()) if b is None else b * batch
        err = max(err, float((a - b).abs().max() / (b.abs().max() + 1e-6)))
    return err


def check(args) -> None:
    """
    The gradient of one step, pyro_rws against rrws, on the same particles: pyro_rws's loss
    runs with a guide that records the trees it draws, and rrws's ``sample_tree`` is replaced
    by one that returns those trees in rrws's order (sentence-major). From the same initial
    parameters both gradients must agree up to the factor ``batch_size`` (pyro_rws sums the
    per-sentence terms, rrws averages them) and float32 rounding.
    """
    import warnings

    import pyro

    from pyro_rws.examples.pcfg import ASTRONOMERS, ESTIMATORS, PCFG, Grammar, PCFGGuide

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    _, util = _rrws_modules(args.rrws)
    import losses as rrws_losses

    k, batch = args.particles[0], 2
    worst = {}
    for seed in args.seeds:
        util.set_seed(seed)
        gen, inf, true = util.init_models(os.path.join(args.rrws, "pcfgs", "astronomers_pcfg.json"))
        pyro.set_rng_seed(seed)
        grammar = Grammar.from_dict(ASTRONOMERS)
        model, guide = PCFG(grammar), PCFGGuide(grammar)
        words = [true.sample_obs() for _ in range(batch)]
        sentences = [grammar.sentence(w) for w in words]
        for est in args.estimators:
            if est not in ("rws", "vimco", "reinforce"):
                continue
            drawn = []

            def recording_guide(sentences, observations=None, drawn=drawn, guide=guide):
                trees = guide.guide(sentences, observations)
                drawn.append(trees)
                return trees

            for p in [*model.parameters(), *guide.parameters()]:
                p.grad = None
            ESTIMATORS[est][0](k).loss_and_grads(model.model, recording_guide, sentences)
            ours = [p.grad for p in [*model.parameters(), *guide.parameters()]]
            order = iter([drawn[j][i] for i in range(batch) for j in range(k)])
            inf.sample_tree = lambda obs=None, **kw: next(order)  # noqa: B023
            for p in [*gen.parameters(), *inf.parameters()]:
                p.grad = None
            if est == "rws":
                lw, lq = rrws_losses.get_log_weight_and_log_q(gen, inf, words, k)
                theta_loss, _ = rrws_losses.get_wake_theta_loss_from_log_weight(lw)
                theta_grads = torch.autograd.grad(
                    theta_loss, list(gen.parameters()), retain_graph=True, allow_unused=True
                )
                phi_loss = rrws_losses.get_wake_phi_loss_from_log_weight_and_log_q(lw, lq)
                phi_grads = torch.autograd.grad(phi_loss, list(inf.parameters()), allow_unused=True)
                theirs = [*theta_grads, *phi_grads]
            elif est == "reinforce":
                loss, _ = rrws_losses.get_reinforce_loss(gen, inf, words, k)
                theirs = torch.autograd.grad(
                    loss, [*gen.parameters(), *inf.parameters()], allow_unused=True
                )
            else:
                trees = [drawn[j][i] for i in range(batch) for j in range(k)]
                order = iter(trees)
                loss, _ = rrws_losses.get_vimco_loss(gen, inf, words, k)
                theirs = torch.autograd.grad(
                    loss, [*gen.parameters(), *inf.parameters()], allow_unused=True
                )
                # rrws's leave-one-out baseline is logsumexp(others, mean of others), without
                # the -log K of its bound: each learning signal is shifted by -log K. The same
                # loss with the -log K restored:
                order = iter(trees)
                lw, lq = rrws_losses.get_log_weight_and_log_q(gen, inf, words, k)
                fixed = torch.autograd.grad(
                    _vimco_with_log_k(lw, lq, k)[0],
                    [*gen.parameters(), *inf.parameters()],
                    allow_unused=True,
                )
                worst["vimco, rrws with -log K restored"] = max(
                    worst.get("vimco, rrws with -log K restored", 0.0), _rel(ours, fixed, batch)
                )
            del inf.sample_tree
            err = _rel(ours, theirs, batch)
            worst[est] = max(worst.get(est, 0.0), err)
            print(f"seed {seed} {est} K={k}: max relative gradient difference {err:.2e}")
    print("worst:", worst)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rrws", default=None, help="path of rrws's pcfg/ folder")
    p.add_argument(
        "--pythonpath",
        action="append",
        default=[],
        help="extra import path for rrws's dependencies (e.g. Levenshtein)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("one")
    o.add_argument("--impl", choices=["rrws", "pyro_rws"], required=True)
    o.add_argument("--estimator", required=True)
    o.add_argument("--k", type=int, required=True)
    o.add_argument("--seed", type=int, required=True)
    o.add_argument("--iterations", type=int, required=True)
    o.add_argument("--eval-every", type=int, required=True)
    o.add_argument("--out", required=True)
    for name in ("run", "time", "plot", "check"):
        s = sub.add_parser(name)
        s.add_argument(
            "--estimators", type=lambda t: t.split(","), default=["rws", "vimco", "ws-le"]
        )
        s.add_argument("--particles", type=_ints, default=[2, 5, 10, 20])
        s.add_argument("--seeds", type=_ints, default=[1, 2])
        s.add_argument("--iterations", type=int, default=2000)
        s.add_argument("--eval-every", type=int, default=50)
        s.add_argument("--jobs", type=int, default=2)
        s.add_argument("--pretrain", type=int, default=200)
        s.add_argument("--block", type=int, default=20)
        s.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if (
        args.cmd in ("run", "time", "one")
        and not args.rrws
        and not (args.cmd == "one" and args.impl == "pyro_rws")
    ):
        p.error("--rrws PATH (rrws's pcfg/ folder) is needed")
    for extra in args.pythonpath:
        sys.path.insert(0, extra)
    {"one": one, "run": run, "time": timing, "plot": plot, "check": check}[args.cmd](args)


if __name__ == "__main__":
    main()
