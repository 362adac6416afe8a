# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
AutoAmortizedProposal (no guide written) against hand-written guides and PyProb's inference
compilation (issue 22). Each part writes benchmarks/results/proposal_<part>.json; ``table``
collects them into benchmarks/results/proposal_compare.md.

Parts (run each under ``nice``, one thread; the committed results used ``simulator --steps 400``,
``csis --steps 1000``, ``gaussian_linear --simulations 10000``, ``pyprob_simulator --simulations
12800`` and ``pyprob_gaussian_linear --simulations 10000``):

- ``simulator``: tutorial 3's simulator (random number of objects), the hand-written proposal of
  the tutorial against AutoAmortizedProposal, same sleep steps, particles and optimizer; mean TV
  of q(n|x) to the exact p(n|x) (100 observations), and with K = 100 importance samples (20
  observations) the mean TV of p̂(n|x) and the mean ESS. ``--eval-obs 100 --reps 2`` (the
  paired runs ``--tag _base``, ``_seed1`` with ``--seed 1``, ``_1000`` with ``--steps 1000``)
  keeps the per-observation values, averaged over 2 IS runs each, so that ``table`` gives
  standard errors and the paired difference: with 20 observations and one IS run the mean TV
  of p̂ has a standard error of a third of its value or more.
- ``csis``: Pyro's CSIS tutorial model (z ~ N(1, 5), x1, x2 ~ N(z, 2)), the tutorial's guide
  against AutoAmortizedProposal, same steps; mean KL(p(z|x) || q(z|x)) over 200 observations
  from the prior predictive, and q at the tutorial's observation (8, 9).
- ``gaussian_linear``: sbibm's gaussian_linear written as a Pyro model (θ ~ N(0, 0.1 I_10),
  x ~ N(θ, 0.1 I_10)), AutoAmortizedProposal trained by SleepPhaseLoss on a budget of
  simulations; C2ST (sklearn MLP, 5-fold, as sbibm's c2st) between 2,000 draws of q(θ|x_o) and
  2,000 draws of the analytic posterior N(x_o/2, 0.05 I), for 3 observations.
- ``pyprob_simulator`` / ``pyprob_gaussian_linear``: the same with PyProb 1.5.0's inference
  compilation (run with /work/venv-pyprob/bin/python), at the same number of simulations.
- ``pcfg``: rrws's PCFG (astronomers grammar), the hand-written inference network against
  AutoAmortizedProposal with a GRU sentence embedding and one address per non-terminal, by
  inference compilation (``--settings ic``) and wake-wake RWS (``rws``); see
  ``benchmarks/proposal_pcfg.py`` (the committed runs: ``pcfg --steps 1000 --eval-every 100
  --settings ic --tag _ic`` and the same with ``--settings rws --tag _rws``, K = 2, seeds 1 2,
  and ``--seeds 3 --settings ic --tag _ic3``).
- ``table``: the markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
RESULTS = Path(__file__).resolve().parent / "results"

# ------------------------------------------------------------------------------------------
# Tutorial 3's simulator (tutorials/03_simulator_sleep_phase.ipynb), copied
# ------------------------------------------------------------------------------------------
NUM_PIXELS, MAX_OBJECTS, WIDTH, NOISE = 16, 3, 1.0, 0.3
PRIOR_N = torch.tensor([0.15, 0.35, 0.30, 0.20])
PIXELS = torch.arange(NUM_PIXELS, dtype=torch.float32)


def render(locs):
    locs = torch.as_tensor(locs, dtype=torch.float32)
    return torch.exp(-0.5 * ((PIXELS - locs.unsqueeze(-1)) / WIDTH) ** 2).sum(-2)


def simulator(signal):
    import pyro
    import pyro.distributions as dist

    n = pyro.sample("n", dist.Categorical(PRIOR_N))
    locs = [
        pyro.sample(f"loc_{i}", dist.Categorical(logits=torch.zeros(NUM_PIXELS)))
        for i in range(int(n))
    ]
    clean = render(torch.stack(locs)) if locs else torch.zeros(NUM_PIXELS)
    pyro.sample("signal", dist.Normal(clean, NOISE).to_event(1), obs=signal)


def test_set(num=100, seed=2024):
    """Observations drawn from the simulator (torch RNG only, so PyProb runs get the same)."""
    torch.manual_seed(seed)
    signals = []
    for _ in range(num):
        n = int(torch.multinomial(PRIOR_N, 1))
        locs = torch.randint(NUM_PIXELS, (n,))
        clean = render(locs.float()) if n else torch.zeros(NUM_PIXELS)
        signals.append(clean + NOISE * torch.randn(NUM_PIXELS))
    return signals


CONFIGS = [
    torch.tensor(list(itertools.product(range(NUM_PIXELS), repeat=n)), dtype=torch.long).reshape(
        NUM_PIXELS**n, n
    )
    for n in range(MAX_OBJECTS + 1)
]


@torch.no_grad()
def exact_p_n(signal):
    out = []
    for n, locs in enumerate(CONFIGS):
        clean = render(locs.float()) if n else torch.zeros(1, NUM_PIXELS)
        log_lik = torch.distributions.Normal(clean, NOISE).log_prob(signal).sum(-1)
        out.append(torch.logsumexp(log_lik, 0) + PRIOR_N[n].log() - n * math.log(NUM_PIXELS))
    return torch.softmax(torch.stack(out), 0)


def tv(p, q):
    return 0.5 * float((torch.as_tensor(p) - torch.as_tensor(q)).abs().sum())


def hand_written():
    """The tutorial's proposal network (section 3)."""
    import pyro
    import pyro.distributions as dist
    from torch import nn

    class Proposal(nn.Module):
        def __init__(self, hidden=64):
            super().__init__()
            self.count = nn.Sequential(
                nn.Linear(NUM_PIXELS, hidden), nn.ReLU(), nn.Linear(hidden, MAX_OBJECTS + 1)
            )
            self.where = nn.Sequential(
                nn.Linear(2 * NUM_PIXELS + 2 * (MAX_OBJECTS + 1), hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, NUM_PIXELS),
            )

        def guide(self, signal):
            pyro.module("proposal", self)
            n = pyro.sample("n", dist.Categorical(logits=self.count(signal)))
            one_hot_n = nn.functional.one_hot(n, MAX_OBJECTS + 1).float()
            residual = signal
            for i in range(int(n)):
                step = nn.functional.one_hot(torch.tensor(i), MAX_OBJECTS + 1).float()
                logits = self.where(torch.cat([signal, residual, one_hot_n, step]))
                loc = pyro.sample(f"loc_{i}", dist.Categorical(logits=logits))
                residual = residual - render(loc.reshape(1))

    return Proposal().guide


@torch.no_grad()
def q_n(guide, signal):
    import pyro.poutine as poutine

    trace = poutine.trace(guide).get_trace(signal)
    return trace.nodes["n"]["fn"].probs.detach()


@torch.no_grad()
def importance(guide, signal, num):
    """Self-normalized IS with the guide as proposal: p̂(n|x) and the ESS."""
    import pyro.poutine as poutine

    log_w, ns = [], []
    for _ in range(num):
        guide_trace = poutine.trace(guide).get_trace(signal)
        model_trace = poutine.trace(poutine.replay(simulator, trace=guide_trace)).get_trace(signal)
        log_w.append(model_trace.log_prob_sum() - guide_trace.log_prob_sum())
        ns.append(int(guide_trace.nodes["n"]["value"]))
    w = torch.softmax(torch.stack(log_w), 0)
    p_n = torch.zeros(MAX_OBJECTS + 1).index_add_(0, torch.tensor(ns), w)
    q_n = torch.zeros(MAX_OBJECTS + 1).index_add_(0, torch.tensor(ns), torch.full((num,), 1 / num))
    return p_n, float(1.0 / (w**2).sum()), q_n


def part_simulator(args):
    import pyro
    from pyro.infer import SVI

    from pyro_rws import AutoAmortizedProposal, SleepPhaseLoss

    signals = test_set()
    truth = [exact_p_n(s) for s in signals]
    auto_kwargs = json.loads(args.auto)
    out = {
        "steps": args.steps,
        "particles": 32,
        "lr": args.lr,
        "K": 100,
        "eval_obs": args.eval_obs,
        "seed": args.seed,
        "reps": args.reps,
        "auto_kwargs": auto_kwargs,
        "guides": {},
    }
    for name in args.guides:
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        guide = (
            hand_written()
            if name == "hand-written"
            else AutoAmortizedProposal(simulator, **auto_kwargs)
        )
        loss = SleepPhaseLoss(num_particles=32, vectorize_particles=False)
        svi = SVI(simulator, guide, pyro.optim.Adam({"lr": args.lr}), loss=loss)
        placeholder = torch.zeros(NUM_PIXELS)
        start = time.process_time()
        for step in range(args.steps):
            svi.step(placeholder)
            if step % 100 == 0:
                print(name, step, f"{time.process_time() - start:.0f}s cpu", flush=True)
        seconds = time.process_time() - start
        tv_q = sum(tv(q_n(guide, s), p) for s, p in zip(signals, truth, strict=True)) / len(signals)
        pyro.set_rng_seed(2)
        ess, tv_is, tv_draws = [], [], []
        for s, p in list(zip(signals, truth, strict=True))[: args.eval_obs]:
            for _ in range(args.reps):  # repeated IS runs per observation, averaged
                p_hat, e, q_hat = importance(guide, s, 100)
                ess.append(e / args.reps)
                tv_is.append(tv(p_hat, p) / args.reps)
                tv_draws.append(tv(q_hat, p) / args.reps)
        fold = args.reps  # per observation: the mean over its repetitions
        ess = [sum(ess[i : i + fold]) for i in range(0, len(ess), fold)]
        tv_is = [sum(tv_is[i : i + fold]) for i in range(0, len(tv_is), fold)]
        tv_draws = [sum(tv_draws[i : i + fold]) for i in range(0, len(tv_draws), fold)]
        out["guides"][name] = {
            "tv_is_n_per_obs": tv_is,
            "ess_per_obs": ess,
            "tv_q_n": tv_q,
            "tv_is_n": sum(tv_is) / len(tv_is),
            "ess": sum(ess) / len(ess),
            "tv_q_n_from_100_draws": sum(tv_draws) / len(tv_draws),
            "cpu_seconds_per_step": seconds / args.steps,
        }
        print(name, out["guides"][name], flush=True)
    return out


# ------------------------------------------------------------------------------------------
# Pyro's CSIS tutorial model
# ------------------------------------------------------------------------------------------
def csis_model(prior_mean, observations={"x1": 0, "x2": 0}):  # noqa: B006 (the tutorial's)
    import pyro
    import pyro.distributions as dist

    x = pyro.sample("z", dist.Normal(prior_mean, torch.tensor(5**0.5)))
    pyro.sample("x1", dist.Normal(x, torch.tensor(2**0.5)), obs=observations["x1"])
    pyro.sample("x2", dist.Normal(x, torch.tensor(2**0.5)), obs=observations["x2"])
    return x


def csis_guide_module():
    """The CSIS tutorial's guide (pyro.ai/examples/csis.html)."""
    import pyro
    import pyro.distributions as dist
    from torch import nn

    class Guide(nn.Module):
        def __init__(self):
            super().__init__()
            self.neural_net = nn.Sequential(
                nn.Linear(2, 10),
                nn.ReLU(),
                nn.Linear(10, 20),
                nn.ReLU(),
                nn.Linear(20, 10),
                nn.ReLU(),
                nn.Linear(10, 5),
                nn.ReLU(),
                nn.Linear(5, 2),
            )

        def forward(self, prior_mean, observations={"x1": 0, "x2": 0}):  # noqa: B006
            pyro.module("guide", self)
            x1, x2 = observations["x1"], observations["x2"]
            v = torch.cat((x1.view(1, 1), x2.view(1, 1)), 1)
            v = self.neural_net(v)
            pyro.sample("z", dist.Normal(v[0, 0], v[0, 1].exp()))

    return Guide()


def csis_posterior(x1, x2):
    precision = 1 / 5 + 2 / 2
    return (1 / 5 + (x1 + x2) / 2) / precision, (1 / precision) ** 0.5


def part_csis(args):
    import pyro
    import pyro.poutine as poutine
    from pyro.infer import SVI

    from pyro_rws import AutoAmortizedProposal, SleepPhaseLoss

    prior_mean = torch.tensor(1.0)
    torch.manual_seed(7)
    z = 1 + 5**0.5 * torch.randn(200)
    xs = z.unsqueeze(-1) + 2**0.5 * torch.randn(200, 2)
    xs = torch.cat([torch.tensor([[8.0, 9.0]]), xs])
    out = {"steps": args.steps, "particles": 10, "lr": 1e-3, "guides": {}}
    for name in args.guides:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        if name == "hand-written":
            guide = csis_guide_module()
        else:
            guide = AutoAmortizedProposal(csis_model)
        zero = {"x1": torch.tensor(0.0), "x2": torch.tensor(0.0)}
        svi = SVI(
            csis_model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=SleepPhaseLoss(num_particles=10)
        )
        start = time.process_time()
        for _ in range(args.steps):
            svi.step(prior_mean, observations=zero)
        seconds = time.process_time() - start
        kls, at = [], None
        for x in xs:
            obs = {"x1": x[0], "x2": x[1]}
            with torch.no_grad():
                q = poutine.trace(guide).get_trace(prior_mean, observations=obs).nodes["z"]["fn"]
            mean, std = csis_posterior(float(x[0]), float(x[1]))
            p = torch.distributions.Normal(torch.tensor(mean), torch.tensor(std))
            qn = torch.distributions.Normal(q.mean.detach(), q.stddev.detach())
            kl = float(torch.distributions.kl_divergence(p, qn))
            at = at or (float(q.mean), float(q.stddev), mean, std)
            kls.append(kl)
        out["guides"][name] = {
            "mean_kl": sum(kls[1:]) / len(kls[1:]),
            "kl_at_8_9": kls[0],
            "q_at_8_9": at[:2],
            "posterior_at_8_9": at[2:],
            "cpu_seconds_per_step": seconds / args.steps,
        }
        print(name, out["guides"][name], flush=True)
    return out


# ------------------------------------------------------------------------------------------
# sbibm gaussian_linear
# ------------------------------------------------------------------------------------------
def gl_model(x=None):
    import pyro
    import pyro.distributions as dist

    theta = pyro.sample("theta", dist.Normal(torch.zeros(10), 0.1**0.5).to_event(1))
    return pyro.sample("data", dist.Normal(theta, 0.1**0.5).to_event(1), obs=x)


def gl_observations():
    torch.manual_seed(11)
    theta = 0.1**0.5 * torch.randn(3, 10)
    return theta + 0.1**0.5 * torch.randn(3, 10)


def c2st(a: torch.Tensor, b: torch.Tensor, seed: int = 1) -> float:
    """sbibm's c2st: an MLP classifier (10 x dim hidden units), 5-fold accuracy."""
    import numpy as np
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.neural_network import MLPClassifier

    x = torch.cat([a, b]).numpy().astype(np.float64)
    y = np.concatenate([np.zeros(len(a)), np.ones(len(b))])
    mean, std = x.mean(0), x.std(0)
    x = (x - mean) / std
    dim = x.shape[1]
    clf = MLPClassifier(
        activation="relu",
        hidden_layer_sizes=(10 * dim, 10 * dim),
        max_iter=1000,
        solver="adam",
        random_state=seed,
    )
    folds = KFold(n_splits=5, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(clf, x, y, cv=folds, scoring="accuracy")))


def gl_reference(x, num=2000, seed=3):
    torch.manual_seed(seed)
    return x / 2 + 0.05**0.5 * torch.randn(num, 10)


def part_gaussian_linear(args):
    import pyro
    import pyro.poutine as poutine
    from pyro.infer import SVI

    from pyro_rws import AutoAmortizedProposal, SleepPhaseLoss

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoAmortizedProposal(gl_model)
    batch = args.batch
    svi = SVI(gl_model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=SleepPhaseLoss(batch))
    start = time.process_time()
    for _ in range(args.simulations // batch):
        svi.step(torch.zeros(10))
    seconds = time.process_time() - start
    scores, kls = [], []
    for x in gl_observations():
        with torch.no_grad(), pyro.plate("samples", 2000, dim=-1):
            trace = poutine.trace(guide).get_trace(x)
        q = trace.nodes["theta"]["fn"]  # a diagonal Normal: KL to the analytic posterior
        p = torch.distributions.Normal(x / 2, 0.05**0.5)
        kls.append(
            float(
                torch.distributions.kl_divergence(
                    p, torch.distributions.Normal(q.mean[0].detach(), q.stddev[0].detach())
                ).sum()
            )
        )
        if not args.no_c2st:
            scores.append(c2st(trace.nodes["theta"]["value"], gl_reference(x)))
    out = {
        "simulations": args.simulations,
        "batch": batch,
        "kl_p_q": kls,
        "c2st": scores,
        "mean_c2st": sum(scores) / max(len(scores), 1),
        "cpu_seconds": seconds,
    }
    print(out, flush=True)
    return out


# ------------------------------------------------------------------------------------------
# PyProb 1.5.0 inference compilation (run with /work/venv-pyprob/bin/python)
# ------------------------------------------------------------------------------------------
def _pyprob_simulator_model():
    import pyprob
    from pyprob.distributions import Categorical, Normal

    class Simulator(pyprob.Model):
        def __init__(self):
            super().__init__(name="objects")

        def forward(self):
            n = int(pyprob.sample(Categorical(PRIOR_N), name="n"))
            locs = [
                int(
                    pyprob.sample(Categorical(torch.ones(NUM_PIXELS) / NUM_PIXELS), name=f"loc_{i}")
                )
                for i in range(n)
            ]
            clean = render(torch.tensor(locs)) if locs else torch.zeros(NUM_PIXELS)
            pyprob.observe(Normal(clean, NOISE * torch.ones(NUM_PIXELS)), name="signal")
            return n

    return Simulator()


def part_pyprob_simulator(args):
    import pyprob
    from pyprob import InferenceEngine, InferenceNetwork

    pyprob.util.seed(0)
    model = _pyprob_simulator_model()
    start = time.process_time()
    model.learn_inference_network(
        num_traces=args.simulations,
        inference_network=InferenceNetwork.LSTM,
        observe_embeddings={"signal": {"dim": 32}},
        batch_size=32,
    )
    seconds = time.process_time() - start
    signals = test_set()
    pyprob.util.seed(2)
    ess, tv_is, tv_draws = [], [], []
    for signal in signals[: args.eval_obs]:
        post = model.posterior(
            num_traces=100,
            inference_engine=InferenceEngine.IMPORTANCE_SAMPLING_WITH_INFERENCE_NETWORK,
            observe={"signal": signal},
            map_func=lambda trace: int(trace.result),
        )
        ns = torch.tensor([int(v) for v in post.values])
        w = post.weights.to(torch.float64)
        p = exact_p_n(signal)
        p_hat = torch.zeros(MAX_OBJECTS + 1, dtype=torch.float64).index_add_(0, ns, w)
        q_hat = torch.bincount(ns, minlength=MAX_OBJECTS + 1).double() / len(ns)
        ess.append(float(post.effective_sample_size))
        tv_is.append(tv(p_hat, p.double()))
        tv_draws.append(tv(q_hat, p.double()))
    out = {
        "simulations": args.simulations,
        "network": "LSTM (PyProb defaults: lstm_dim 512, 10 mixture components), batch 32",
        "tv_is_n": sum(tv_is) / len(tv_is),
        "ess": sum(ess) / len(ess),
        "tv_q_n_from_100_draws": sum(tv_draws) / len(tv_draws),
        "cpu_seconds": seconds,
        "eval_obs": len(tv_is),
        "tv_is_n_per_obs": tv_is,
        "ess_per_obs": ess,
        "tv_q_n_from_100_draws_per_obs": tv_draws,
    }
    print(out, flush=True)
    return out


def part_pyprob_gaussian_linear(args):
    import pyprob
    from pyprob import InferenceEngine
    from pyprob.distributions import Normal

    class GaussianLinear(pyprob.Model):
        def __init__(self):
            super().__init__(name="gaussian_linear")

        def forward(self):
            # one address per coordinate: PyProb's proposals are scalar
            theta = torch.stack(
                [pyprob.sample(Normal(0.0, 0.1**0.5), name=f"theta_{i}") for i in range(10)]
            )
            pyprob.observe(Normal(theta, 0.1**0.5 * torch.ones(10)), name="data")
            return theta

    pyprob.util.seed(0)
    model = GaussianLinear()
    start = time.process_time()
    model.learn_inference_network(
        num_traces=args.simulations, observe_embeddings={"data": {"dim": 32}}, batch_size=64
    )
    seconds = time.process_time() - start
    scores, resampled = [], []
    for x in gl_observations():
        post = model.posterior(
            num_traces=2000,
            inference_engine=InferenceEngine.IMPORTANCE_SAMPLING_WITH_INFERENCE_NETWORK,
            observe={"data": x},
            map_func=lambda trace: trace.result,
        )
        draws = torch.stack([torch.as_tensor(v).float() for v in post.values])
        scores.append(c2st(draws, gl_reference(x)))  # the proposal's draws, unweighted
        idx = torch.multinomial(post.weights.float(), 2000, replacement=True)
        resampled.append(c2st(draws[idx], gl_reference(x)))  # reweighted (resampled)
    out = {
        "simulations": args.simulations,
        "network": "FEEDFORWARD (PyProb default), batch 64",
        "c2st": scores,
        "mean_c2st": sum(scores) / len(scores),
        "c2st_resampled": resampled,
        "mean_c2st_resampled": sum(resampled) / len(resampled),
        "cpu_seconds": seconds,
    }
    print(out, flush=True)
    return out


def _load(name):
    path = RESULTS / f"proposal_{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _mean_se(values):
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def _paired_simulator_table():
    """Runs of both guides in one process with per-observation values (``--eval-obs``)."""
    runs = [(t, _load(f"simulator{t}")) for t in ("_base", "_seed1", "_1000")]
    runs = [(t, r) for t, r in runs if r and "tv_is_n_per_obs" in r["guides"].get("auto", {})]
    if not runs:
        return []
    lines = [
        "### Paired runs: both guides in one process, IS on 100 observations x 2 runs of K = 100",
        "",
        "Mean ± standard error over observations; the difference is auto minus hand-written "
        "per observation (paired).",
        "",
        "| run | steps | seed | TV p̂(n\\|x) hand-written | TV p̂(n\\|x) auto | difference | "
        "ESS hand-written | ESS auto | difference | TV q(n\\|x) hand / auto | CPU s / step "
        "hand / auto |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tag, r in runs:
        h, a = r["guides"]["hand-written"], r["guides"]["auto"]
        cells = []
        for key in ("tv_is_n_per_obs", "ess_per_obs"):
            diff = [x - y for x, y in zip(a[key], h[key], strict=True)]
            fmt = ".4f" if key.startswith("tv") else ".1f"
            for values in (h[key], a[key], diff):
                m, se = _mean_se(values)
                cells.append(f"{m:{fmt}} ± {se:{fmt}}")
        lines.append(
            f"| {tag[1:]} | {r['steps']} | {r.get('seed', 0)} | "
            + " | ".join(cells)
            + f" | {h['tv_q_n']:.3f} / {a['tv_q_n']:.3f} | "
            f"{h['cpu_seconds_per_step']:.2f} / {a['cpu_seconds_per_step']:.2f} |"
        )
    return lines + [""]


def write_table():
    """benchmarks/results/proposal_compare.md from the parts' json files."""
    lines = ["# AutoAmortizedProposal against hand-written guides and PyProb IC", ""]
    sims = {g: _load(f"simulator_{g}") for g in ("hand-written", "auto")}
    pp = _load("pyprob_simulator")
    if any(sims.values()) or pp:
        some = next(v for v in sims.values() if v)
        lines += [
            f"## Tutorial 3's simulator: {some['steps']} sleep steps x {some['particles']} "
            f"particles ({some['steps'] * some['particles']:,} simulations), Adam "
            f"{some['lr']}, K = {some['K']}",
            "",
            "| proposal | TV q(n\\|x) (100 obs) | TV q(n\\|x) from 100 draws (20 obs) | "
            "TV p̂(n\\|x), K = 100 (20 obs) | ESS of 100 | CPU s / step |",
            "|---|---|---|---|---|---|",
        ]
        for g, v in sims.items():
            if v:
                r = v["guides"][g]
                lines.append(
                    f"| {g} | {r['tv_q_n']:.3f} | {r['tv_q_n_from_100_draws']:.3f} | "
                    f"{r['tv_is_n']:.3f} | {r['ess']:.1f} | {r['cpu_seconds_per_step']:.2f} |"
                )
        if pp:
            lines.append(
                f"| PyProb 1.5.0 IC ({pp['network']}, {pp['simulations']:,} simulations) | – | "
                f"{pp['tv_q_n_from_100_draws']:.3f} | {pp['tv_is_n']:.3f} | {pp['ess']:.1f} | "
                f"{pp['cpu_seconds'] / (pp['simulations'] / 32):.2f} (per 32 traces) |"
            )
        lines.append("")
    lines += _paired_simulator_table()
    csis = {g: _load(f"csis_{g}") for g in ("hand-written", "auto")}
    if any(csis.values()):
        some = next(v for v in csis.values() if v)
        lines += [
            f"## Pyro's CSIS tutorial model: {some['steps']} sleep steps x {some['particles']} "
            f"particles, Adam {some['lr']}",
            "",
            "| guide | mean KL(p(z\\|x) ‖ q(z\\|x)), 200 x | KL at x = (8, 9) | q at (8, 9) "
            "(mean, sd) | exact (mean, sd) | CPU s / step |",
            "|---|---|---|---|---|---|",
        ]
        for g, v in csis.items():
            if v:
                r = v["guides"][g]
                q, p = r["q_at_8_9"], r["posterior_at_8_9"]
                lines.append(
                    f"| {g} | {r['mean_kl']:.4f} | {r['kl_at_8_9']:.4f} | ({q[0]:.3f}, "
                    f"{q[1]:.3f}) | ({p[0]:.3f}, {p[1]:.3f}) | {r['cpu_seconds_per_step']:.3f} |"
                )
        lines.append("")
    gls = [(t, _load(f"gaussian_linear{t}")) for t in ("", "_kl")]
    gls = [(t, g) for t, g in gls if g]
    ppgl = _load("pyprob_gaussian_linear")
    if gls or ppgl:
        lines += [
            "## sbibm gaussian_linear (10-d), 3 observations: KL(p(θ|x) ‖ q(θ|x)) (closed "
            "form, q diagonal Normal) and C2ST against 2,000 analytic posterior draws "
            "(sklearn MLP, 5-fold; 0.5 is perfect)",
            "",
            "| method | simulations | KL per observation | C2ST per observation | mean C2ST | "
            "CPU s (training) |",
            "|---|---|---|---|---|---|",
        ]
        for _, gl in gls:
            c2 = ", ".join(f"{c:.3f}" for c in gl["c2st"]) or "not run"
            mean = f"{gl['mean_c2st']:.3f}" if gl["c2st"] else "–"
            lines.append(
                f"| AutoAmortizedProposal, SleepPhaseLoss (batch {gl['batch']}), q's draws | "
                f"{gl['simulations']:,} | {', '.join(f'{k:.3f}' for k in gl.get('kl_p_q', []))} "
                f"| {c2} | {mean} | {gl['cpu_seconds']:.0f} |"
            )
        if ppgl:
            lines.append(
                f"| PyProb 1.5.0 IC ({ppgl['network']}), proposal's draws | "
                f"{ppgl['simulations']:,} | – | {', '.join(f'{c:.3f}' for c in ppgl['c2st'])} | "
                f"{ppgl['mean_c2st']:.3f} | {ppgl['cpu_seconds']:.0f} |"
            )
            lines.append(
                f"| PyProb 1.5.0 IC, 2,000 IS draws resampled by weight | "
                f"{ppgl['simulations']:,} | – | "
                f"{', '.join(f'{c:.3f}' for c in ppgl['c2st_resampled'])} | "
                f"{ppgl['mean_c2st_resampled']:.3f} | |"
            )
        lines.append("")
    from proposal_pcfg import table_lines

    lines += table_lines(_load)
    (RESULTS / "proposal_compare.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--simulations", type=int, default=10000)
    parser.add_argument("--guides", nargs="+", default=["hand-written", "auto"])
    parser.add_argument("--tag", default="")
    parser.add_argument("--batch", type=int, default=10, help="gaussian_linear: sleep particles")
    parser.add_argument("--no-c2st", action="store_true", help="gaussian_linear: KL only")
    parser.add_argument("--eval-obs", type=int, default=20, help="simulator: IS observations")
    parser.add_argument("--reps", type=int, default=1, help="simulator: IS runs per observation")
    parser.add_argument("--lr", type=float, default=3e-3, help="simulator: Adam's lr")
    parser.add_argument("--seed", type=int, default=0, help="simulator: training seed")
    parser.add_argument(
        "--auto", default="{}", help="simulator, pcfg: AutoAmortizedProposal keyword arguments"
    )
    parser.add_argument("--particles", type=int, default=2, help="pcfg: K")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="pcfg: seeds")
    parser.add_argument("--settings", nargs="+", default=["ic", "rws"], help="pcfg: ic, rws")
    parser.add_argument("--eval-every", type=int, default=50, help="pcfg: evaluation interval")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part == "table":
        write_table()
        return
    if args.part == "pcfg":
        from proposal_pcfg import part_pcfg

        part_pcfg(args)  # writes its json after every run
        return
    out = globals()[f"part_{args.part}"](args)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"proposal_{args.part}{args.tag}.json"
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
