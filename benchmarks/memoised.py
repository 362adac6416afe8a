# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Memoised wake-sleep where it is meant to help: models whose posterior over discrete structure is
sharply peaked. Learns a model from simulated data and reports the held-out log p_theta(x) of the
learned model (guide-free, so every method is scored alike), next to the true model's.

``--model programs`` (default): ``pyro_rws.examples.arithmetic``, programs
``(a o1 i) o2 b`` on inputs i = 1..4 (900 programs; ``--depth 3``: ``((a o1 i) o2 b) o3 c``,
27,000 programs), discrete only: MWS. Held-out log p(x) exact
(sum over all programs). Equal compute: 20 model evaluations per datapoint and step:

* ``mws``: ``MemoisedWakeSleep(memory_size=10, num_particles=10)`` (10 memory + 10 proposals);
* ``rws``: ``RWS(num_particles=20)``; ``vimco``: ``VIMCO(num_particles=20)``;
* with ``--hmws-path`` (a checkout of github.com/tuananhle7/hmws), the authors' losses on the
  same model, data, initial parameters and minibatches: ``mws-code`` (``get_cmws_5_loss`` with
  memory 10, 10 proposals, one particle of a dummy continuous latent whose model and guide
  densities are equal, so that it is MWS; its memory initialized from the prior as in hmws) and
  ``rws-code`` (``get_rws_loss``, 20 particles).

``--model kernels``: ``pyro_rws.examples.kernels``, 292 GP kernel expressions and three
continuous hyperparameters per series: HMWS. Held-out log p(x): exact sum over structures,
hyperparameters importance-sampled from their learned prior. 50 model evaluations per datapoint
and step: ``hmws`` = ``MemoisedWakeSleep(5, 5, num_continuous_particles=5)``, ``rws`` / ``vimco``
with 50 particles, ``hmws-code`` (``get_cmws_5_loss``, 5/5/5), ``rws-code`` (50 particles).

All use insomnia 1 (no sleep phase; ``--insomnia 0.5`` adds it, as in the hmws experiments),
Adam (lr 1e-2) over model and guide, one torch thread.

    python benchmarks/memoised.py --hmws-path /tmp/hmws   # results/memoised_programs.*
    python benchmarks/memoised.py --model kernels --hmws-path /tmp/hmws   # memoised_kernels.*
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
from pyro_rws.examples import arithmetic as A
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


class ProgramsHmwsModel:
    """hmws's generative-model interface for the programs model, with a dummy continuous latent
    ``c ~ N(0, 1)`` (hmws's losses need one) that the guide also draws from N(0, 1)."""

    def __init__(self, depth):
        self.depth = depth

    def discrete_latent_sample(self, shape):
        logits = A.prior_logits(depth=self.depth)
        return torch.stack(
            [torch.distributions.Categorical(logits=v).sample(shape) for v in logits.values()], -1
        )

    def log_prob_discrete_continuous(self, d, c, x):
        logits = A.prior_logits(depth=self.depth)
        return A.log_joint(d, x, logits) + torch.distributions.Normal(0.0, 1.0).log_prob(c)

    def log_prob(self, latent, x):
        return self.log_prob_discrete_continuous(latent[0], latent[1], x)

    def sample(self, sample_shape):
        """Fantasies for hmws's sleep loss: ``([programs, c], outputs)``."""
        with torch.no_grad():
            d = self.discrete_latent_sample(sample_shape)
            mean = A.evaluate(d, A.inputs(M_INPUTS))
            x = mean + A.NOISE * torch.randn(mean.shape)
        return [d, torch.randn(tuple(sample_shape))], x


M_INPUTS = 4


class ProgramsHmwsGuide:
    def __init__(self, guide):
        self.guide = guide

    def sample_discrete(self, x, shape=()):
        return self.guide.sample(x, shape)

    def sample_continuous(self, x, d, shape=()):
        return torch.randn(tuple(shape) + d.shape[:-1], dtype=x.dtype)

    def log_prob_discrete(self, x, d):
        return self.guide.log_prob(x, d)

    def log_prob_continuous(self, x, d, c):
        return torch.distributions.Normal(0.0, 1.0).log_prob(c)

    def sample(self, x, shape=()):
        d = self.sample_discrete(x, shape)
        return [d, self.sample_continuous(x, d)]

    def log_prob(self, x, latent):
        return self.log_prob_discrete(x, latent[0]) + self.log_prob_continuous(x, *latent)


SETTINGS = {
    # model: (module, memory L, proposals K, continuous particles J, RWS/VIMCO particles)
    "programs": (A, 10, 10, 1, 20),
    "kernels": (K, 5, 5, 5, 50),
}


def make_step(method, guide, num_data, cmws, setting, insomnia=1.0, depth=2, particles=None):
    module, L, Kp, J, P = setting
    P = particles or P
    if not method.endswith("-code"):
        loss = {
            "mws": lambda: MemoisedWakeSleep(L, Kp, insomnia=insomnia),
            "hmws": lambda: MemoisedWakeSleep(L, Kp, num_continuous_particles=J, insomnia=insomnia),
            "rws": lambda: RWS(num_particles=P, insomnia=insomnia),
            "vimco": lambda: VIMCO(num_particles=P),
        }[method]()

        extra = {"depth": depth} if module is A else {}

        def step(x, idx):
            return loss.differentiable_loss(module.model, guide, x, idx, num_data, **extra)

        return step
    if module is A:
        hmws_model, hmws_guide = ProgramsHmwsModel(depth), ProgramsHmwsGuide(guide)
    else:
        hmws_model, hmws_guide = HmwsModel(), HmwsGuide(guide)
    if method in ("mws-code", "hmws-code"):
        cmws.util.logging.disable()
        memory = cmws.memory.Memory(num_data, L, hmws_model)

        def step(x, idx):
            return cmws.losses.get_cmws_5_loss(
                hmws_model, hmws_guide, memory, x, idx, J, Kp, insomnia=insomnia
            ).mean()

        return step

    def step(x, idx):
        return cmws.losses.get_rws_loss(hmws_model, hmws_guide, x, P, insomnia=insomnia).mean()

    return step


def run(method, seed, args, data, cmws):
    x_train, x_test = data
    N = len(x_train)
    pyro.clear_param_store()
    torch.manual_seed(1000 + seed)
    module = SETTINGS[args.model][0]
    guide = module.Guide(x_train.shape[-1], **({"depth": args.depth} if module is A else {}))
    evaluate = make_evaluate(args)
    evaluate()  # makes the model's parameters
    pyro.module("guide", guide)
    params = [v.unconstrained() for v in pyro.get_param_store().values()]
    optim = torch.optim.Adam(params, lr=args.lr)
    step = make_step(
        method, guide, N, cmws, SETTINGS[args.model], args.insomnia, args.depth, args.particles
    )
    batches = torch.Generator().manual_seed(seed)
    pyro.set_rng_seed(seed)
    curve, seconds = [], 0.0
    for i in range(args.steps + 1):
        if i % args.eval_every == 0 or i == args.steps:
            logp = evaluate(x_test)
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


def make_evaluate(args):
    def evaluate(x=None, params=None):
        with torch.random.fork_rng():
            torch.manual_seed(12345)
            if args.model == "programs":
                p = A.prior_logits(depth=args.depth) if params is None else params
                return None if x is None else A.log_marginal(x, p).mean().item()
            p = K.prior_params() if params is None else params
            if x is None:
                return None
            p = {k: v.detach() for k, v in p.items()}
            return K.log_marginal(x, p, args.eval_samples).mean().item()

    return evaluate


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="programs", choices=sorted(SETTINGS))
    parser.add_argument("--methods", default=None, help="default: all five")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=None, help="programs 800, kernels 600")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=None, help="programs 100, kernels 40")
    parser.add_argument("--num-test", type=int, default=None, help="programs 200, kernels 20")
    parser.add_argument("--batch-size", type=int, default=None, help="programs 20, kernels 10")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument(
        "--insomnia",
        type=float,
        default=1.0,
        help="wake weight of the guide for mws/hmws/rws (and their -code); < 1 adds the sleep "
        "phase (the hmws experiments use 0.5); hmws code with < 1: programs model only",
    )
    parser.add_argument(
        "--particles",
        type=int,
        default=None,
        help="particles of rws/vimco (and -code): default the equal-evaluations 20 / 50",
    )
    parser.add_argument(
        "--depth", type=int, default=2, help="programs: operators (2: 900, 3: 27,000 programs)"
    )
    parser.add_argument("--T", type=int, default=None, help="series length / inputs (20 / 4)")
    parser.add_argument("--hmws-path", default=os.environ.get("HMWS_PATH"))
    parser.add_argument("--out", default=None, help="default: results/memoised_<model>")
    args = parser.parse_args()
    programs = args.model == "programs"
    defaults = {
        "methods": "mws,rws,vimco,mws-code,rws-code"
        if programs
        else "hmws,rws,vimco,hmws-code,rws-code",
        "steps": 800 if programs else 600,
        "num_train": 100 if programs else 40,
        "num_test": 200 if programs else 20,
        "batch_size": 20 if programs else 10,
        "T": 4 if programs else 20,
        "out": str(
            RESULTS
            / (f"memoised_{args.model}" + ("" if args.depth == 2 else f"_depth{args.depth}"))
        ),
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    cmws = None
    if any(m.endswith("-code") for m in methods):
        if not args.hmws_path:
            print("no --hmws-path: skipping the hmws code", file=sys.stderr)
            methods = [m for m in methods if not m.endswith("-code")]
        else:
            cmws = import_hmws(args.hmws_path)
    if programs:
        truth = A.true_logits(args.depth)
        x_train, _ = A.simulate(args.num_train, args.T, truth, seed=1)
        x_test, _ = A.simulate(args.num_test, args.T, truth, seed=2)
    else:
        truth = K.true_params(0)
        x_train, _ = K.simulate(args.num_train, args.T, truth, seed=1)
        x_test, _ = K.simulate(args.num_test, args.T, truth, seed=2)
    true_logp = make_evaluate(args)(x_test, truth)
    print(f"true model: test log p {true_logp:.3f}", flush=True)
    results = {}
    for seed in map(int, args.seeds.split(",")):
        for method in methods:
            results.setdefault(method, {})[seed] = run(method, seed, args, (x_train, x_test), cmws)
    report(results, true_logp, args, methods)


def report(results, true_logp, args, methods):
    if args.model == "programs":
        what = (
            f"Programs model ({len(A.programs(args.depth)):,} programs, depth {args.depth}, "
            f"{args.T} inputs), {args.num_train} training / "
            f"{args.num_test} test datapoints, B={args.batch_size}, {args.steps} Adam steps "
            f"(lr {args.lr}), insomnia {args.insomnia}, MWS 20 and RWS/VIMCO "
            f"{args.particles or 20} model evaluations per datapoint and "
            f"step (+ one sleep fantasy per datapoint with insomnia < 1); held-out log p(x) per "
            f"datapoint, exact"
        )
    else:
        what = (
            f"Kernel-structure model (292 structures, T={args.T}), {args.num_train} training / "
            f"{args.num_test} test series, B={args.batch_size}, {args.steps} Adam steps "
            f"(lr {args.lr}), 50 model evaluations per datapoint and step; held-out log p(x) per "
            f"series (sum over structures, {args.eval_samples} prior draws of the "
            f"hyperparameters)"
        )
    lines = [
        f"{what}; true model: {true_logp:.3f}. {machine()}",
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
    ax.set_ylabel("held-out log p(x) per datapoint")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out}.md/.json/.png", file=sys.stderr)
    return math.nan


if __name__ == "__main__":
    main()
