# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Doubly reparameterized gradients (``dreg=True``) against the standard estimators.

1. Per-draw variance of the guide's gradient, DReG versus standard, for K in {1, 5, 10, 50}:
   (a) a linear-Gaussian model (z ~ N(0, I_2), x | z ~ N(A z, 0.7^2 I_3)) with a diagonal Normal
   guide near the exact posterior and far from it; 4000 independent draws per setting in one
   vectorized call (a replicate plate with its own guide parameters per replicate);
   (b) a small VAE on binarized sklearn digits (64-100-8, continuous latent, Bernoulli pixels),
   after a short IWAE pre-training, 200 draws on a fixed minibatch of 32 images, gradient of the
   encoder's parameters.
   Estimators: IWAE (VIMCO with an all-reparameterized guide, i.e. the pathwise gradient), IWAE-
   DReG (VIMCO(dreg=True)), RWS wake-phi, RWS-DReG (RWS(dreg=True)). RWS needs K >= 2.
2. Learning curves on digits for the same VAE: held-out log p(x) (``pyro_rws.log_evidence``,
   K=1000, 359 test images) for IWAE / IWAE-DReG / RWS / RWS-DReG at K=10, equal steps, same
   seeds, initial parameters and minibatches, Adam(1e-3), batch 64.

    python benchmarks/dreg_variance.py                 # everything (~30 min of one loaded core)
    python benchmarks/dreg_variance.py --quick         # seconds
    python benchmarks/dreg_variance.py --part variance # or: learning, timing

3. Step time of the four on the VAE (K=10, batch 64), interleaved rounds.

Writes benchmarks/results/dreg_variance.{json,md}, dreg_step_time.md and
dreg_learning.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from _common import machine
from pyro.distributions import constraints
from torch import nn

from pyro_rws import RWS, VIMCO, log_evidence
from pyro_rws.examples.data import load_digits

RESULTS = Path(__file__).resolve().parent / "results"
ESTIMATORS = ("IWAE", "IWAE-DReG", "RWS", "RWS-DReG")


def make_loss(name: str, K: int, plates: int):
    dreg = name.endswith("DReG")
    if name == "IWAE" and K == 1:  # the reparameterized ELBO gradient (VIMCO needs K >= 2)
        return pyro.infer.Trace_ELBO(max_plate_nesting=plates)
    if name.startswith("IWAE"):
        return VIMCO(num_particles=K, dreg=dreg, max_plate_nesting=plates)
    return RWS(num_particles=K, dreg=dreg, max_plate_nesting=plates)


def available(name: str, K: int) -> bool:
    return not (K == 1 and name.startswith("RWS"))


# --------------------------------------------------------------------------------------------
# (a) linear-Gaussian model
# --------------------------------------------------------------------------------------------
DZ, DX, SIGMA = 2, 3, 0.7


def linear_gaussian(R: int, where: str):
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(DX, DZ, generator=gen, dtype=torch.float64)
    x = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    cov = torch.linalg.inv(torch.eye(DZ, dtype=torch.float64) + A.T @ A / SIGMA**2)
    mean = cov @ (A.T @ x) / SIGMA**2
    sd = cov.diagonal().sqrt()
    shift, width = {"near": (0.1, 1.1), "mid": (1.0, 0.8), "far": (2.0, 0.5)}[where]
    loc, scale = mean + shift * sd, sd * width

    def model(xs):
        with pyro.plate("rep", R, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(loc), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ A.T, SIGMA).to_event(1), obs=xs)

    def guide(xs):
        q_loc = pyro.param("q_loc", loc.expand(R, DZ).clone())
        q_scale = pyro.param(
            "q_scale", scale.expand(R, DZ).clone(), constraint=constraints.positive
        )
        with pyro.plate("rep", R, dim=-1):
            pyro.sample("z", dist.Normal(q_loc, q_scale).to_event(1))

    return model, guide, x.expand(R, DX)


def variance_linear_gaussian(Ks, R, seed=0):
    rows = []
    for where in ("near", "mid", "far"):
        model, guide, xs = linear_gaussian(R, where)
        for K in Ks:
            for name in ESTIMATORS:
                if not available(name, K):
                    continue
                pyro.clear_param_store()
                pyro.set_rng_seed(seed)
                make_loss(name, K, 1).differentiable_loss(model, guide, xs).backward()
                store = pyro.get_param_store()
                # per-replicate gradient in (loc, unconstrained log-scale)
                g = torch.cat(
                    [store["q_loc"].unconstrained().grad, store["q_scale"].unconstrained().grad], -1
                )
                rows.append(summary("linear-Gaussian", where, name, K, g))
    return rows


def summary(problem, where, name, K, g):
    """g: (draws, params). Total variance, mean squared norm of the mean, SNR per coordinate."""
    g = g.double()
    mean, var = g.mean(0), g.var(0)
    snr = mean.abs() / var.sqrt().clamp_min(1e-300)
    return {
        "problem": problem,
        "where": where,
        "estimator": name,
        "K": K,
        "draws": g.shape[0],
        "total_variance": float(var.sum()),
        "mean_norm": float(mean.norm()),
        "median_snr": float(snr.median()),
    }


# --------------------------------------------------------------------------------------------
# (b) a small VAE on digits
# --------------------------------------------------------------------------------------------
class VAE(nn.Module):
    def __init__(self, dx=64, hidden=100, dz=8):
        super().__init__()
        self.dz = dz
        self.encoder = nn.Sequential(nn.Linear(dx, hidden), nn.Tanh(), nn.Linear(hidden, 2 * dz))
        self.decoder = nn.Sequential(nn.Linear(dz, hidden), nn.Tanh(), nn.Linear(hidden, dx))

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.dz), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        loc, s = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(s) + 1e-3).to_event(1))


def batches(train_x, batch_size, gen):
    while True:
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield train_x[order[i : i + batch_size]]


def train(vae, loss, train_x, steps, seed, lr=1e-3, batch_size=64, callback=None):
    optim = torch.optim.Adam(vae.parameters(), lr=lr)
    data = batches(train_x, batch_size, torch.Generator().manual_seed(seed))
    pyro.set_rng_seed(seed)
    for step in range(1, steps + 1):
        optim.zero_grad()
        loss.differentiable_loss(vae.model, vae.guide, next(data)).backward()
        optim.step()
        if callback is not None:
            callback(step)


def variance_vae(Ks, draws, pretrain_steps, seed=0):
    train_x, _ = load_digits()
    torch.manual_seed(seed)
    vae = VAE()
    train(vae, VIMCO(10, max_plate_nesting=1), train_x, pretrain_steps, seed)
    x = train_x[:32]
    params = list(vae.encoder.parameters())
    rows = []
    for K in Ks:
        for name in ESTIMATORS:
            if not available(name, K):
                continue
            loss = make_loss(name, K, 1)
            pyro.set_rng_seed(seed + 1)
            grads = []
            for _ in range(draws):
                vae.zero_grad()
                loss.differentiable_loss(vae.model, vae.guide, x).backward()
                grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
            rows.append(
                summary(
                    "VAE digits", f"after {pretrain_steps} IWAE steps", name, K, torch.stack(grads)
                )
            )
    return rows


# --------------------------------------------------------------------------------------------
# learning curves
# --------------------------------------------------------------------------------------------
class Evaluator:
    """Held-out log p(x) every ``every`` steps, with its own seed (training RNG untouched)."""

    def __init__(self, vae, test_x, every, num_particles):
        self.vae, self.test_x, self.every, self.num_particles = vae, test_x, every, num_particles
        self.curve = []

    def __call__(self, step):
        if step % self.every:
            return
        state = torch.random.get_rng_state()
        pyro.set_rng_seed(12345)
        lp = log_evidence(
            self.vae.model,
            self.vae.guide,
            self.test_x,
            num_particles=self.num_particles,
            max_plate_nesting=1,
        )
        torch.random.set_rng_state(state)
        self.curve.append((step, float(lp.mean())))


def learning(K, steps, eval_every, eval_particles, seeds):
    train_x, test_x = load_digits()
    out = {}
    for name in ESTIMATORS:
        for seed in seeds:
            torch.manual_seed(seed)
            vae = VAE()
            pyro.clear_param_store()
            evaluate = Evaluator(vae, test_x, eval_every, eval_particles)
            t0 = time.perf_counter()
            train(vae, make_loss(name, K, 1), train_x, steps, seed, callback=evaluate)
            seconds = time.perf_counter() - t0
            out[f"{name}/seed{seed}"] = {"curve": evaluate.curve, "seconds": seconds}
            print(f"{name} seed {seed}: {evaluate.curve[-1][1]:.3f} nats ({seconds:.0f} s)")
    return out


def learning_table(out, K, seeds, eval_particles, header):
    steps = [s for s, _ in out[f"{ESTIMATORS[0]}/seed{seeds[0]}"]["curve"]]
    lines = [
        f"Held-out log p(x) (nats/image, mean over seeds {list(seeds)}; log_evidence with "
        f"K={eval_particles} on the 359 digits test images), VAE 64-100-8, training K={K}, "
        "batch 64, Adam(1e-3). Seconds per run include the evaluations.",
        "",
        header,
        "",
        "| estimator | " + " | ".join(f"step {s}" for s in steps) + " | s/run |",
        "|---|" + "---:|" * (len(steps) + 1),
    ]
    for name in ESTIMATORS:
        curves = [out[f"{name}/seed{s}"]["curve"] for s in seeds]
        means = [sum(c[i][1] for c in curves) / len(curves) for i in range(len(steps))]
        secs = sum(out[f"{name}/seed{s}"]["seconds"] for s in seeds) / len(seeds)
        lines.append(f"| {name} | " + " | ".join(f"{m:.2f}" for m in means) + f" | {secs:.0f} |")
    return "\n".join(lines) + "\n"


def plot_learning(out, K, seeds, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, name in enumerate(ESTIMATORS):
        for j, s in enumerate(seeds):
            steps, lps = zip(*out[f"{name}/seed{s}"]["curve"], strict=True)
            ax.plot(steps, lps, color=f"C{i}", label=name if j == 0 else None, alpha=0.8)
    ax.set(xlabel="step", ylabel="held-out log p(x) (nats)", title=f"VAE on digits, K={K}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def step_times(K=10, rounds=30, repeats=5, batch_size=64):
    """ms per differentiable_loss + backward on the VAE, interleaved, median over rounds."""
    train_x, _ = load_digits()
    x = train_x[:batch_size]
    vae = VAE()
    losses = {name: make_loss(name, K, 1) for name in ESTIMATORS}
    times = {name: [] for name in ESTIMATORS}
    for r in range(rounds):
        for name in ESTIMATORS if r % 2 == 0 else ESTIMATORS[::-1]:
            t0 = time.perf_counter()
            for _ in range(repeats):
                vae.zero_grad()
                losses[name].differentiable_loss(vae.model, vae.guide, x).backward()
            times[name].append(1000 * (time.perf_counter() - t0) / repeats)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


# --------------------------------------------------------------------------------------------
def variance_table(rows):
    lines = [
        "| problem | guide | K | "
        + " | ".join(ESTIMATORS)
        + " | IWAE / IWAE-DReG | RWS / RWS-DReG |",
        "|---|---|---:|" + "---:|" * (len(ESTIMATORS) + 2),
    ]
    keys = sorted({(r["problem"], r["where"], r["K"]) for r in rows})
    for problem, where, K in keys:
        v = {
            r["estimator"]: r
            for r in rows
            if (r["problem"], r["where"], r["K"]) == (problem, where, K)
        }
        cells = [
            f"{v[n]['total_variance']:.3g} ({v[n]['median_snr']:.2f})" if n in v else "—"
            for n in ESTIMATORS
        ]
        ratios = [
            f"{v[a]['total_variance'] / v[b]['total_variance']:.3g}×" if a in v and b in v else "—"
            for a, b in (("IWAE", "IWAE-DReG"), ("RWS", "RWS-DReG"))
        ]
        lines.append(f"| {problem} | {where} | {K} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=["all", "variance", "learning", "timing"], default="all")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    Ks = (1, 5, 10, 50)
    RESULTS.mkdir(exist_ok=True)
    tag = args.tag or ("_quick" if args.quick else "")
    header = f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}."
    if args.part in ("all", "variance"):
        t0 = time.perf_counter()
        rows = variance_linear_gaussian(Ks, R=400 if args.quick else 4000)
        rows += variance_vae(
            Ks, draws=10 if args.quick else 200, pretrain_steps=20 if args.quick else 500
        )
        table = variance_table(rows)
        info = {"machine": machine(), "rows": rows}
        (RESULTS / f"dreg_variance{tag}.json").write_text(json.dumps(info, indent=1))
        (RESULTS / f"dreg_variance{tag}.md").write_text(
            "Per-draw variance of the guide gradient: total variance (sum over parameters) and, in "
            "parentheses, the median over parameters of |mean| / sd (signal-to-noise ratio). "
            "Linear-Gaussian: gradient in (loc, log scale), 4000 draws; VAE: encoder parameters, "
            "200 draws on 32 fixed images.\n\n"
            f"{header} {time.perf_counter() - t0:.0f} s.\n\n{table}\n"
        )
        print(table, flush=True)
    if args.part in ("all", "timing"):
        ms = step_times(rounds=4 if args.quick else 30)
        lines = [
            f"ms per step (loss + backward), VAE 64-100-8 on 64 digits, K=10, median of "
            f"interleaved rounds. {header}",
            "",
            "| " + " | ".join(ESTIMATORS) + " |",
            "|" + "---:|" * len(ESTIMATORS),
            "| " + " | ".join(f"{ms[n]:.1f}" for n in ESTIMATORS) + " |",
        ]
        (RESULTS / f"dreg_step_time{tag}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
    if args.part in ("all", "learning"):
        K = 10
        steps = 40 if args.quick else args.steps
        seeds = args.seeds[:1] if args.quick else args.seeds
        eval_particles = 50 if args.quick else 1000
        out = learning(K, steps, max(1, steps // 8), eval_particles, seeds)
        info = {"machine": machine(), "K": K, "runs": out}
        (RESULTS / f"dreg_learning{tag}.json").write_text(json.dumps(info, indent=1))
        table = learning_table(out, K, seeds, eval_particles, header)
        (RESULTS / f"dreg_learning{tag}.md").write_text(table)
        print(table)
        plot_learning(out, K, seeds, RESULTS / f"dreg_learning{tag}.png")


if __name__ == "__main__":
    main()
