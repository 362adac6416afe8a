# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The sbibm benchmark: pyro_rws's neural posterior estimation against ``sbi``'s NPE, by C2ST
against sbibm's reference posteriors (0.5 is perfect, 1.0 is separable).

Contenders, each trained once per task and budget (amortized) and evaluated on every requested
observation:

- ``sbi``: ``sbi.inference.NPE`` with its defaults (MAF of 5 transforms, 50 hidden features,
  batch 200, lr 5e-4, 10 % validation, stop after 20 epochs without improvement), trained on
  the very simulations pyro_rws drew (``theta ~ prior``, ``x ~ simulator(theta)``, flattened as
  sbibm flattens them), so that the two differ only in the estimator;
- ``pyro_rws``: ``pyro_rws.simulate`` + ``AutoAmortizedFlow`` (default size, matched to sbi's
  MAF) + ``fit_guide`` (the same defaults as sbi's), posterior samples from the guide;
- ``pyro_rws+is``: the same guide as the proposal of ``pyro_rws.importance_posterior`` on the
  model with its likelihood (sbibm's own Pyro model for gaussian_linear,
  gaussian_linear_uniform and slcp; written below: the mixture's marginal likelihood for
  gaussian_mixture, the exact density of the two-moons simulator, and for bernoulli_glm the
  likelihood of the spike train, which its summary statistics determine, so that the weights
  are exact up to a constant);
- ``pyro_rws+wake+is`` (with ``--refine-steps N``): for each observation a copy of the same
  guide trained further on it by ``pyro_rws.refine_guide`` (N steps of RWS wake-phi, 100
  particles, lr 1e-4: the likelihood at the guide's proposals, no new simulations), then
  ``importance_posterior`` with it (tasks with a likelihood).

Also recorded: the wall time of simulation + training, and the time per gradient step
(training time / steps, validation passes included, for both), plus an interleaved
micro-benchmark of one training step (log_prob + backward + Adam on a batch of 200) of the two
flows on the task's dimensions, in one thread.

Needs sbi and sbibm (the ``sbi`` benchmark extra): ``pip install sbi==0.27.0 pandas future
autograd`` and ``pip install --no-deps sbibm==1.1.0``. Results are appended to
``<out>.jsonl`` cell by cell (a cell already there is skipped), and ``<out>.md`` and
``<out>.png`` are rebuilt from all of them. Example::

    python benchmarks/sbibm_c2st.py --tasks two_moons gaussian_linear --budgets 1000 10000 \\
        --observations 1 --out benchmarks/results/sbibm
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import pyro.distributions as dist
import torch

TASKS = (
    "gaussian_linear",
    "gaussian_linear_uniform",
    "slcp",
    "gaussian_mixture",
    "two_moons",
    "bernoulli_glm",
)


# --------------------------------------------------------------------------------------------
# The tasks as Pyro models
# --------------------------------------------------------------------------------------------
class _ScoredSimulator(dist.TorchDistribution):
    """A simulator with a density, as a distribution given its parameters ``theta`` (..., d):
    one data vector of ``event_size`` values (``d`` if None) per parameter vector. Subclasses
    write ``sample`` (the simulator) and ``log_prob`` (its likelihood)."""

    arg_constraints = {}
    support = dist.constraints.real_vector
    event_size: int | None = None

    def __init__(self, theta, validate_args=None):
        self.theta = theta
        size = self.event_size or theta.shape[-1]
        super().__init__(theta.shape[:-1], (size,), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return type(self)(self.theta.expand(tuple(batch_shape) + self.theta.shape[-1:]))


def two_moons_distribution():
    """The two-moons simulator as a distribution with its exact density (sbibm's simulator)."""

    class TwoMoons(_ScoredSimulator):
        event_size = 2

        def _shift(self):
            c = s = math.sqrt(0.5)  # cos and sin of -pi/4, up to the sign of s
            z0 = c * self.theta[..., 0] + s * self.theta[..., 1]
            z1 = -s * self.theta[..., 0] + c * self.theta[..., 1]
            return torch.stack([-z0.abs(), z1], -1)

        def sample(self, sample_shape=()):
            shape = self._extended_shape(sample_shape)[:-1]
            a = (torch.rand(shape) - 0.5) * math.pi
            r = 0.1 + 0.01 * torch.randn(shape)
            p = torch.stack([torch.cos(a) * r + 0.25, torch.sin(a) * r], -1)
            return p + self._shift()

        def log_prob(self, x):
            p = x - self._shift()
            u, v = p[..., 0] - 0.25, p[..., 1]
            r = (u**2 + v**2).sqrt()
            lp = (
                dist.Normal(0.1, 0.01).log_prob(r) - math.log(math.pi) - r.log()
            )  # polar change of variables, angle uniform on (-pi/2, pi/2)
            return torch.where(u > 0, lp, torch.full_like(lp, -math.inf))

    return TwoMoons


def bernoulli_glm_distribution(task):
    """sbibm's Bernoulli GLM as a distribution of its summary statistics ``T = Xᵀy`` (spike count
    and spike-triggered sums, ``X`` the 100 × 10 design matrix, ``y`` the spike train).

    ``sample`` is sbibm's own simulator (the same random stream as calling it directly);
    ``log_prob`` is ``θ·T − Σᵢ softplus(Xᵢ·θ)``, the likelihood of any spike train with these
    statistics. The density of ``T`` itself is that times the number of spike trains sharing them,
    a constant in ``θ``: self-normalized importance weights, hence the reweighted posterior, are
    exact, while ``log_evidence`` is off by that (unknown) constant.
    """
    simulator = task.get_simulator()
    design = torch.load(task.path / "files" / "design_matrix.pt")

    class SufficientGLM(_ScoredSimulator):
        event_size = design.shape[1]

        def sample(self, sample_shape=()):
            theta = self.theta.expand(sample_shape + self.theta.shape)
            t = simulator(theta.reshape(-1, theta.shape[-1]).float())  # sbibm's code: float32
            return t.reshape(theta.shape[:-1] + self.event_shape).to(theta)

        def log_prob(self, t):
            psi = self.theta @ design.to(self.theta).T  # (..., 100) logits of the spikes
            return (self.theta * t).sum(-1) - torch.nn.functional.softplus(psi).sum(-1)

    return SufficientGLM


def task_model(task):
    """``model(data=None)`` for an sbibm task, its data site ``"data"`` with a likelihood."""
    import pyro

    name = task.name
    prior = task.get_prior()
    if name in ("gaussian_linear", "gaussian_linear_uniform", "slcp"):
        simulator = task.get_simulator()

        def model():  # sbibm's own prior and simulator, as they are
            return simulator(prior())

        return model
    if name == "gaussian_mixture":
        p = task.simulator_params
        w, f, s = p["mixture_weights"], p["mixture_locs_factor"], p["mixture_scales"]

        class Mixture(_ScoredSimulator):  # sbibm's simulator, mixture index summed out
            def sample(self, sample_shape=()):
                theta = self.theta.expand(self._extended_shape(sample_shape))
                k = torch.multinomial(w, theta[..., 0].numel(), replacement=True)
                k = k.reshape(theta.shape[:-1] + (1,))
                return f[k] * theta + s[k] * torch.randn_like(theta)

            def log_prob(self, x):
                comp = dist.Normal(f[:, None] * self.theta.unsqueeze(-2), s[:, None])
                lp = comp.log_prob(x.unsqueeze(-2)).sum(-1) + w.log()
                return lp.logsumexp(-1)

        def model(data=None):
            return pyro.sample("data", Mixture(prior()), obs=data)

        return model
    if name == "two_moons":
        TwoMoons = two_moons_distribution()

        def model(data=None):
            theta = prior()
            return pyro.sample("data", TwoMoons(theta), obs=data)

        return model
    if name == "bernoulli_glm":
        GLM = bernoulli_glm_distribution(task)

        def model(data=None):
            return pyro.sample("data", GLM(prior()), obs=data)

        return model
    raise ValueError(f"no Pyro model for sbibm task {name!r}; choose from {TASKS}")


# --------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------
def run_sbi(task, budget, observations, num_samples, seed, simulations=None):
    from sbi.inference import NPE

    torch.manual_seed(seed)
    start = time.perf_counter()
    if simulations is None:
        theta = task.get_prior()(num_samples=budget)
        x = task.get_simulator()(theta)
    else:  # pyro_rws's simulations: both contenders train on the same pairs
        theta, x = simulations
    inference = NPE(prior=task.get_prior_dist(), show_progress_bars=False)
    inference.append_simulations(theta, x)
    t_train = time.perf_counter()
    inference.train()
    train_time = time.perf_counter() - t_train
    wall = time.perf_counter() - start
    epochs = inference._summary["epochs_trained"][-1]
    steps = epochs * math.ceil(int(0.9 * budget) / 200)
    posterior = inference.build_posterior()
    samples = {
        i: posterior.sample((num_samples,), x=task.get_observation(i), show_progress_bars=False)
        for i in observations
    }
    info = dict(wall=wall, train=train_time, steps=steps, epochs=epochs)
    info["best_validation_loss"] = float(inference._summary["best_validation_loss"][-1])
    return samples, info


def fit_pyro_rws(model, budget, seed, masks="pyro", lr_decays=None):
    """``(simulations, guide, history, train seconds)``: ``budget`` simulations of ``model`` and
    an ``AutoAmortizedFlow`` fitted to them by ``fit_guide`` with its defaults (sbi's, but for
    two learning-rate decays), or ``num_lr_decays=lr_decays`` where given."""
    import pyro

    import pyro_rws

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    sims = pyro_rws.simulate(model, budget, observed=("data",), seed=seed, progress=False)
    guide = pyro_rws.AutoAmortizedFlow(model, masks=masks)
    guide.standardize(sims)
    start = time.perf_counter()
    history = pyro_rws.fit_guide(
        model, guide, sims, seed=seed, progress=False, num_lr_decays=lr_decays
    )
    return sims, guide, history, time.perf_counter() - start


def run_pyro_rws(
    task,
    budget,
    observations,
    num_samples,
    seed,
    num_particles,
    refine_steps=0,
    masks="pyro",
    lr_decays=None,
):
    import pyro_rws

    model = task_model(task)
    start = time.perf_counter()
    sims, guide, history, train_time = fit_pyro_rws(model, budget, seed, masks, lr_decays)
    wall = time.perf_counter() - start
    sleep, reweighted, ess, refined, refined_ess, refine_s = {}, {}, {}, {}, {}, {}

    def reweight(proposal, x_o):  # resampled importance draws and ESS / K on observation x_o
        post = pyro_rws.importance_posterior(
            model, proposal, observations={"data": x_o}, num_particles=num_particles
        )
        draws = post.sample(num_samples)["parameters"].reshape(num_samples, -1)
        return draws, float(post.effective_sample_size.reshape(-1)[0]) / num_particles

    for i in observations:
        x_o = task.unflatten_data(task.get_observation(i))  # sbibm's data shape, (1, ...)
        with torch.no_grad():
            x = x_o.expand((num_samples,) + x_o.shape[1:])
            sleep[i] = guide(observations={"data": x})["parameters"].reshape(num_samples, -1)
        reweighted[i], ess[i] = reweight(guide, x_o)
        if refine_steps:  # wake-phi on x_o, then importance sampling
            t = time.perf_counter()
            guide_o = pyro_rws.refine_guide(
                model, guide, observations={"data": x_o}, num_steps=refine_steps, progress=False
            )
            refine_s[i] = time.perf_counter() - t
            refined[i], refined_ess[i] = reweight(guide_o, x_o)
    info = dict(
        wall=wall,
        train=train_time,
        steps=history.num_steps,
        epochs=history.epochs,
        best_validation_loss=history.best_validation_loss,
        decay_epochs=history.decay_epochs,
        ess_fraction=ess,
        refined=refined,
        refined_ess_fraction=refined_ess,
        refine_s=refine_s,
    )
    pairs = (sims.latents["parameters"].reshape(budget, -1), sims.observations["data"])
    return sleep, reweighted, info, (pairs[0], pairs[1].reshape(budget, -1))


def step_ratio(task, rounds=5, steps=10):
    """Interleaved per-step time (log_prob + backward + Adam, batch 200) of the two flows."""
    import pyro
    from sbi.neural_nets.net_builders import build_maf

    from pyro_rws import AutoAmortizedFlow
    from pyro_rws.autoguides.embedding import datapoints

    pyro.enable_validation(False)
    model = task_model(task)
    theta = task.get_prior()(num_samples=1000)
    x = task.get_simulator()(theta)
    net = build_maf(theta, x)
    guide = AutoAmortizedFlow(model, observed=["data"])
    x_model = task.unflatten_data(x)
    guide.standardize({"parameters": theta, "data": x_model})
    b = slice(0, 200)
    opt_sbi = torch.optim.Adam(net.parameters(), lr=5e-4)
    opt_rws = torch.optim.Adam(guide.parameters(), lr=5e-4)

    def sbi_step():
        loss = -net.log_prob(theta[b], x[b]).mean()
        opt_sbi.zero_grad()
        loss.backward()
        opt_sbi.step()

    def rws_step():
        data = datapoints(x_model[b], **guide._layout["data"])
        context = guide._context({"data": data}, {})
        loss = -guide._site_distribution("parameters", context).log_prob(theta[b]).mean()
        opt_rws.zero_grad()
        loss.backward()
        opt_rws.step()

    times = {"sbi": [], "pyro_rws": []}
    for _ in range(rounds):
        for key, fn in (("sbi", sbi_step), ("pyro_rws", rws_step)):
            fn()
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            times[key].append((time.perf_counter() - t) / steps)
    ratios = [a / b for a, b in zip(times["pyro_rws"], times["sbi"], strict=True)]
    return dict(
        sbi_ms=1e3 * statistics.median(times["sbi"]),
        pyro_rws_ms=1e3 * statistics.median(times["pyro_rws"]),
        ratio=statistics.median(ratios),
        sbi_weights=sum(p.numel() for p in net.parameters()),
        pyro_rws_weights=sum(p.numel() for p in guide.parameters()),
    )


# --------------------------------------------------------------------------------------------
# Driver and report
# --------------------------------------------------------------------------------------------
def c2st_of(task, i, samples, num_samples):
    from sbibm.metrics import c2st

    ref = task.get_reference_posterior_samples(num_observation=i)[:num_samples]
    return float(c2st(ref, samples[:num_samples].float()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--budgets", nargs="+", type=int, default=[1000, 10000, 100000])
    parser.add_argument("--observations", nargs="+", type=int, default=list(range(1, 11)))
    parser.add_argument("--num-samples", type=int, default=10000, help="per C2ST side")
    parser.add_argument("--num-particles", type=int, default=100000, help="importance sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--refine-steps",
        type=int,
        default=0,
        help="also refine the guide on each observation (pyro_rws.refine_guide, RWS wake-phi) "
        "for this many steps before importance sampling (0: not)",
    )
    parser.add_argument(
        "--masks",
        default="pyro",
        choices=("pyro", "made"),
        help="the conditioners' masks of pyro_rws's flow (AutoAmortizedFlow's masks=)",
    )
    parser.add_argument(
        "--lr-decays",
        type=int,
        default=None,
        help="fit pyro_rws's guide with this many learning-rate decays (fit_guide's "
        "num_lr_decays=; default: fit_guide's; 0: sbi's schedule)",
    )
    parser.add_argument(
        "--sbi-from",
        default=None,
        help="a results stem of an earlier run with the same --seed: take sbi's C2ST from its "
        "rows instead of training sbi again (sbi's NPE is deterministic on the same simulations "
        "and seed; the cells not found there are run)",
    )
    parser.add_argument("--out", default="benchmarks/results/sbibm")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import pyro
    import sbibm

    from pyro_rws.fitting import DEFAULT_NUM_LR_DECAYS

    pyro.enable_validation(False)
    done = _load(args.out)
    for name in [] if args.report_only else args.tasks:
        task = sbibm.get_task(name)
        key = ("steps", name)
        if key not in {(r["kind"], r["task"]) for r in done}:
            try:
                _append(args.out, dict(kind="steps", task=name, **step_ratio(task)), done)
            except Exception as e:  # report and go on with the C2ST cells
                print(f"{name}: step timing failed: {type(e).__name__}: {e}", flush=True)
        for budget in args.budgets:
            todo = [
                i
                for i in args.observations
                if not any(
                    r["kind"] == "c2st"
                    and (r["task"], r["budget"], r["observation"]) == (name, budget, i)
                    for r in done
                )
            ]
            if not todo:
                continue
            print(f"{name} {budget}: pyro_rws", flush=True)
            sleep, reweighted, info, pairs = run_pyro_rws(
                task,
                budget,
                todo,
                args.num_samples,
                args.seed,
                args.num_particles,
                args.refine_steps,
                args.masks,
                args.lr_decays,
            )
            earlier = {
                r["observation"]: r
                for r in (_load(args.sbi_from) if args.sbi_from else [])
                if r["kind"] == "c2st" and (r["task"], r["budget"]) == (name, budget)
            }
            if all(i in earlier for i in todo):
                print(f"{name} {budget}: sbi from {args.sbi_from}", flush=True)
                sbi_samples = None
            else:
                print(f"{name} {budget}: sbi", flush=True)
                sbi_samples, sbi_info = run_sbi(
                    task, budget, todo, args.num_samples, args.seed, pairs
                )
            for i in todo:
                row = dict(kind="c2st", task=name, budget=budget, observation=i)
                if sbi_samples is None:
                    row["sbi"], sbi_info = earlier[i]["sbi"], earlier[i]["sbi_info"]
                    row["sbi_from"] = args.sbi_from
                else:
                    row["sbi"] = c2st_of(task, i, sbi_samples[i], args.num_samples)
                row["pyro_rws"] = c2st_of(task, i, sleep[i], args.num_samples)
                if i in reweighted:
                    row["pyro_rws+is"] = c2st_of(task, i, reweighted[i], args.num_samples)
                    row["ess_fraction"] = info["ess_fraction"][i]
                if i in info["refined"]:
                    row["pyro_rws+wake+is"] = c2st_of(task, i, info["refined"][i], args.num_samples)
                    row["ess_fraction_wake"] = info["refined_ess_fraction"][i]
                    row["refine_s"] = info["refine_s"][i]
                    row["refine_steps"] = args.refine_steps
                row["lr_decays"] = (
                    DEFAULT_NUM_LR_DECAYS if args.lr_decays is None else args.lr_decays
                )
                row["sbi_info"] = sbi_info
                per_observation = ("ess_fraction", "refined", "refined_ess_fraction", "refine_s")
                row["pyro_rws_info"] = {k: v for k, v in info.items() if k not in per_observation}
                row["num_samples"] = args.num_samples
                print(json.dumps(row), flush=True)
                _append(args.out, row, done)
    report(done, args.out)


def _load(out):
    path = out + ".jsonl"
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _append(out, row, done):
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    done.append(row)


def report(rows, out):
    """Write ``<out>.md`` (tables) and ``<out>.png`` (C2ST by budget) from the results."""
    cells = {}
    for r in rows:
        if r["kind"] == "c2st":
            cells.setdefault((r["task"], r["budget"]), []).append(r)
    lines = [
        "C2ST against sbibm's reference posteriors (0.5 is perfect), mean over the observations "
        "listed; time per step = training time / gradient steps (validation included); both "
        "contenders train on the same simulations (pyro_rws's wall time includes simulating).",
        "",
        "| task | budget | obs. | sbi NPE | pyro_rws | pyro_rws + IS | ESS/K | "
        "pyro_rws + wake + IS | ESS/K | "
        "epochs sbi / pyro_rws | sbi wall s | pyro_rws wall s | sbi ms/step | pyro_rws ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mean = lambda rs, k: statistics.mean(r[k] for r in rs) if all(k in r for r in rs) else None  # noqa: E731
    fmt = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    for (task, budget), rs in sorted(cells.items()):
        si, pi = rs[-1]["sbi_info"], rs[-1]["pyro_rws_info"]
        lines.append(
            f"| {task} | {budget} | {','.join(str(r['observation']) for r in rs)} | "
            f"{fmt(mean(rs, 'sbi'))} | {fmt(mean(rs, 'pyro_rws'))} | "
            f"{fmt(mean(rs, 'pyro_rws+is'))} | {fmt(mean(rs, 'ess_fraction'), 3)} | "
            f"{fmt(mean(rs, 'pyro_rws+wake+is'))} | {fmt(mean(rs, 'ess_fraction_wake'), 3)} | "
            f"{si['epochs']} / {pi['epochs']} | {si['wall']:.0f} | {pi['wall']:.0f} | "
            f"{1e3 * si['train'] / max(si['steps'], 1):.1f} | "
            f"{1e3 * pi['train'] / max(pi['steps'], 1):.1f} |"
        )
    steps = [r for r in rows if r["kind"] == "steps"]
    if steps:
        lines += [
            "",
            "One training step (log_prob + backward + Adam, batch 200, one thread), interleaved, "
            "median of rounds:",
            "",
            "| task | sbi weights | pyro_rws weights | sbi ms | pyro_rws ms | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for r in steps:
            lines.append(
                f"| {r['task']} | {r['sbi_weights']} | {r['pyro_rws_weights']} | "
                f"{r['sbi_ms']:.2f} | {r['pyro_rws_ms']:.2f} | {r['ratio']:.2f} |"
            )
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(cells, out + ".png")


def _plot(cells, path):
    if not cells:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for t, _ in cells})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3 * len(tasks), 3), squeeze=False)
    styles = (  # contender: marker and line, one colour in every panel
        ("sbi", "o-", "C0"),
        ("pyro_rws", "s-", "C1"),
        ("pyro_rws+is", "^-", "C2"),
        ("pyro_rws+wake+is", "d-", "C3"),
    )
    legend = {}  # one entry per contender, from whichever panel has it
    for ax, task in zip(axes[0], tasks, strict=True):
        budgets = sorted(b for t, b in cells if t == task)
        for key, style, color in styles:
            pts = [
                (b, statistics.mean(r[key] for r in cells[(task, b)]))
                for b in budgets
                if all(key in r for r in cells[(task, b)])
            ]
            if pts:
                (line,) = ax.plot(*zip(*pts, strict=True), style, color=color)
                legend.setdefault(key, line)
        ax.set_xscale("log")
        ax.set_ylim(0.45, 1.02)
        ax.axhline(0.5, color="gray", lw=0.5)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("simulations")
    axes[0][0].set_ylabel("C2ST")
    axes[0][0].legend(legend.values(), legend.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
