# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Memoised wake-sleep on a model with a sharply peaked discrete posterior: the GP kernel-structure
model of ``pyro_rws.examples.kernels`` (292 kernel expressions, three continuous hyperparameters
per series, T=20 points). Learns the model from simulated series and reports the held-out
log p_theta(x) of the learned model (exact sum over structures, hyperparameters importance-sampled
from their learned prior: guide-free, so every method is scored alike), next to the true model's.

Methods at equal compute (50 model evaluations per datapoint and step):

* ``hmws``: ``pyro_rws.MemoisedWakeSleep(memory_size=5, num_particles=5,
  num_continuous_particles=5)`` (HMWS: (5 + 5) candidates x 5 continuous particles);
* ``rws``: ``pyro_rws.RWS(num_particles=50)``; ``vimco``: ``pyro_rws.VIMCO(num_particles=50)``;
* with ``--hmws-path`` (a checkout of github.com/tuananhle7/hmws): the authors' own losses on the
  same model, data, initial parameters and minibatches: ``hmws-code`` (``get_cmws_5_loss``,
  memory 5, 5 proposals, 5 particles; its memory initialized from the prior as in hmws) and
  ``rws-code`` (``get_rws_loss``, 50 particles).

All use insomnia 1 (no sleep phase), Adam (lr 1e-2) over model and guide, one torch thread.

    python benchmarks/memoised.py --hmws-path /tmp/hmws   # writes benchmarks/results/memoised.*
    python benchmarks/memoised.py --steps 50 --seeds 0 --methods hmws,rws   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path

import pyro
import torch
from _common import machine

from pyro_rws import RWS, VIMCO, MemoisedWakeSleep
from pyro_rws.examples import kernels as K

RESULTS = Path(__file__).resolve().parent / "results"


def import_hmws(root: str):
    package = types.ModuleType("cmws")  # skip cmws/__init__.py (imports every example)
    package.__path__ = [os.path.join(root, "cmws")]
    sys.modules.setdefault("cmws", package)
    sys.modules.setdefault("imageio", types.ModuleType("imageio"))
    import cmws.losses
    import cmws.memory

    return cmws


class HmwsModel:
    """hmws's generative-model interface on the same parameters."""

    def discrete_latent_sample(self, shape):
        return torch.distributions.Categorical(logits=K.prior_params()["alpha"]).sample(shape)

    def log_prob_discrete_continuous(self, d, c, x):
        return K.log_joint(d, c, x, K.prior_params())

    def log_prob(self, latent, x):
        return K.log_joint(latent[0], latent[1], x, K.prior_params())


class HmwsGuide:
    """hmws's guide interface on the same guide network."""

    def __init__(self, guide):
        self.guide = guide

    def sample_discrete(self, x, shape=()):
        return self.guide.discrete_dist(x).sample(shape)

    def sample_continuous(self, x, d, shape=()):
        return self.guide.continuous_dist(x, d).sample(shape)

    def log_prob_discrete(self, x, d):
        return self.guide.discrete_dist(x).log_prob(d)

    def log_prob_continuous(self, x, d, c):
        return self.guide.continuous_dist(x, d).log_prob(c)

    def sample(self, x, shape=()):
        d = self.sample_discrete(x, shape)
        return [d, self.sample_continuous(x, d)]

    def log_prob(self, x, latent):
        return self.log_prob_discrete(x, latent[0]) + self.log_prob_continuous(x, *latent)


def make_step(method, guide, num_data, cmws):
    if method in ("hmws", "rws", "vimco"):
        loss = {
            "hmws": lambda: MemoisedWakeSleep(5, 5, num_continuous_particles=5),
            "rws": lambda: RWS(num_particles=50),
            "vimco": lambda: VIMCO(num_particles=50),
        }[method]()

        def step(x, idx):
            return loss.differentiable_loss(K.model, guide, x, idx, num_data)

        return step
    hmws_model, hmws_guide = HmwsModel(), HmwsGuide(guide)
    if method == "hmws-code":
        cmws.util.logging.disable()
        memory = cmws.memory.Memory(num_data, 5, hmws_model)

        def step(x, idx):
            return cmws.losses.get_cmws_5_loss(hmws_model, hmws_guide, memory, x, idx, 5, 5).mean()

        return step

    def step(x, idx):
        return cmws.losses.get_rws_loss(hmws_model, hmws_guide, x, 50).mean()

    return step


def run(method, seed, args, data, cmws):
    x_train, x_test = data
    N = len(x_train)
    pyro.clear_param_store()
    torch.manual_seed(1000 + seed)
    guide = K.Guide(x_train.shape[-1])
    K.prior_params()
    pyro.module("guide", guide)
    params = [v.unconstrained() for v in pyro.get_param_store().values()]
    optim = torch.optim.Adam(params, lr=args.lr)
    step = make_step(method, guide, N, cmws)
    batches = torch.Generator().manual_seed(seed)
    pyro.set_rng_seed(seed)
    curve, seconds = [], 0.0
    for i in range(args.steps + 1):
        if i % args.eval_every == 0 or i == args.steps:
            p = {k: v.detach() for k, v in K.prior_params().items()}
            with torch.random.fork_rng():
                torch.manual_seed(12345)
                logp = K.log_marginal(x_test, p, args.eval_samples).mean().item()
            curve.append((i, logp, seconds))
            print(
                f"  {method:10s} seed {seed} step {i:5d} test log p {logp:8.3f} ({seconds:.0f} s)",
                flush=True,
            )
        if i == args.steps:
            break
        idx = torch.randperm(N, generator=batches)[: args.batch_size]
        t0 = time.perf_counter()
        optim.zero_grad()
        step(x_train[idx], idx).backward()
        optim.step()
        seconds += time.perf_counter() - t0
    return {"curve": curve, "ms_per_step": 1000 * seconds / args.steps}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="hmws,rws,vimco,hmws-code,rws-code")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=150)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=40)
    parser.add_argument("--num-test", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--T", type=int, default=20)
    parser.add_argument("--hmws-path", default=os.environ.get("HMWS_PATH"))
    parser.add_argument("--out", default=str(RESULTS / "memoised"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    cmws = None
    if any(m.endswith("-code") for m in methods):
        if not args.hmws_path:
            print("no --hmws-path: skipping the hmws code", file=sys.stderr)
            methods = [m for m in methods if not m.endswith("-code")]
        else:
            cmws = import_hmws(args.hmws_path)
    truth = K.true_params(0)
    x_train, _ = K.simulate(args.num_train, args.T, truth, seed=1)
    x_test, _ = K.simulate(args.num_test, args.T, truth, seed=2)
    with torch.random.fork_rng():
        torch.manual_seed(12345)
        true_logp = K.log_marginal(x_test, truth, args.eval_samples).mean().item()
    print(f"true model: test log p {true_logp:.3f}", flush=True)
    results = {}
    for seed in map(int, args.seeds.split(",")):
        for method in methods:
            results.setdefault(method, {})[seed] = run(method, seed, args, (x_train, x_test), cmws)
    report(results, true_logp, args, methods)


def report(results, true_logp, args, methods):
    lines = [
        f"Kernel-structure model (292 structures, T={args.T}), {args.num_train} training / "
        f"{args.num_test} test series, B={args.batch_size}, {args.steps} Adam steps "
        f"(lr {args.lr}), "
        f"50 model evaluations per datapoint and step; held-out log p(x) per series (sum over "
        f"structures, {args.eval_samples} prior draws of the hyperparameters); true model: "
        f"{true_logp:.3f}. {machine()}",
        "",
        "| method | test log p(x), final (per seed) | mean | ms/step |",
        "|---|---|---|---|",
    ]
    for m in methods:
        finals = [r["curve"][-1][1] for r in results[m].values()]
        ms = statistics.mean(r["ms_per_step"] for r in results[m].values())
        per_seed = ", ".join(f"{v:.3f}" for v in finals)
        lines.append(f"| {m} | {per_seed} | {statistics.mean(finals):.3f} | {ms:.0f} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"true_logp": true_logp, "args": vars(args), "results": results}, indent=1)
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        for j, r in enumerate(results[m].values()):
            steps, logp, _ = zip(*r["curve"], strict=True)
            ax.plot(
                steps, logp, color=f"C{methods.index(m)}", alpha=0.8, label=m if j == 0 else None
            )
    ax.axhline(true_logp, color="k", ls="--", label="true model")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out log p(x) per series")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out}.md/.json/.png", file=sys.stderr)
    return math.nan


if __name__ == "__main__":
    main()
