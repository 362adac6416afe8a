# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The cost of an enumerated site: one training step of the Gaussian mixture of tutorial 1 with the
cluster assignment summed out by ``infer={"enumerate": "parallel"}``, against the same model
with the sum written by hand.

    python benchmarks/enum_cost.py                       # B = 100, 20 clusters (tutorial 1)
    python benchmarks/enum_cost.py --batch-sizes 100,1000 --json results/enum_cost.json

Contenders (one step = loss, one backward, one ``torch.optim.Adam`` step on theta; every Pyro
contender with ``pyro.enable_validation(False)`` and ``max_plate_nesting=1``):

* ``enum``: ``RWS(num_particles=2)`` on the model with ``c`` marked for parallel enumeration and
  an empty guide (every latent summed out: the bound is the exact log-likelihood);
* ``factor``: the same loss on a model whose likelihood is a hand-written log-sum-exp over the
  clusters in a ``pyro.factor`` (same value and gradient, no enumeration machinery);
* ``torch``: the hand-written log-sum-exp in plain PyTorch, no Pyro;
* ``sampled``: for reference, ``RWS(num_particles=10)`` with ``c`` sampled by the tutorial's MLP
  guide (what one pays *without* enumeration; it also trains the guide).

The step functions run interleaved in ``--rounds`` rounds (order reversed every other round),
each a block of steps sized to take about ``--block-seconds``; the table gives the median over
rounds of ms/step and the ratios of medians. Times are the process's CPU time
(``time.process_time``), not wall time, so that other jobs on a shared machine inflate them less.
One torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from _common import machine
from pyro.infer import config_enumerate

from pyro_rws import RWS
from pyro_rws.examples.gmm import GMM, NUM_CLUSTERS, STD, cluster_means, sample_data

NAMES = ("enum", "factor", "torch", "sampled")
LABELS = {
    "enum": "pyro_rws RWS(2), c enumerated, empty guide",
    "factor": "pyro_rws RWS(2), hand-written logsumexp in pyro.factor",
    "torch": "plain PyTorch, hand-written logsumexp",
    "sampled": "pyro_rws RWS(10), c sampled by the MLP guide",
}


def make_steps(gmm: GMM):
    optim = torch.optim.Adam(gmm.parameters(), lr=1e-2)
    rws2 = RWS(num_particles=2, max_plate_nesting=1)
    rws10 = RWS(num_particles=10, max_plate_nesting=1)

    def empty_guide(x):
        pass

    enum_model = config_enumerate(gmm.model)

    def factor_model(x):
        pyro.module("gmm_prior", gmm.prior)
        log_prior = torch.log_softmax(0.5 * gmm.theta, -1)
        log_lik = dist.Normal(cluster_means(x), STD).log_prob(x.unsqueeze(-1))
        with pyro.plate("data", x.shape[-1]):
            pyro.factor("x", torch.logsumexp(log_prior + log_lik, -1))

    def step(loss_fn):
        def run(x):
            optim.zero_grad()
            loss_fn(x).backward()
            optim.step()

        return run

    def torch_loss(x):
        log_prior = torch.log_softmax(0.5 * gmm.theta, -1)
        log_lik = dist.Normal(cluster_means(x), STD).log_prob(x.unsqueeze(-1))
        return -torch.logsumexp(log_prior + log_lik, -1).sum()

    return {
        "enum": step(lambda x: rws2.differentiable_loss(enum_model, empty_guide, x)),
        "factor": step(lambda x: rws2.differentiable_loss(factor_model, empty_guide, x)),
        "torch": step(torch_loss),
        "sampled": step(lambda x: rws10.differentiable_loss(gmm.model, gmm.guide, x)),
    }


def check_agree(gmm: GMM, x: torch.Tensor) -> float:
    """Largest disagreement of the enumerated and hand-written losses: relative in the value,
    absolute in the gradient (float32)."""
    rws = RWS(num_particles=2, max_plate_nesting=1)
    enum = rws.differentiable_loss(config_enumerate(gmm.model), lambda x: None, x)
    (g_enum,) = torch.autograd.grad(enum, [gmm.theta])
    log_prior = torch.log_softmax(0.5 * gmm.theta, -1)
    log_lik = dist.Normal(cluster_means(x), STD).log_prob(x.unsqueeze(-1))
    hand = -torch.logsumexp(log_prior + log_lik, -1).sum()
    (g_hand,) = torch.autograd.grad(hand, [gmm.theta])
    rel = abs(float(enum.detach() - hand.detach())) / abs(float(hand.detach()))
    return max(rel, float((g_enum - g_hand).abs().max()))


def time_steps(steps: dict, x: torch.Tensor, rounds: int, block_seconds: float) -> dict:
    for fn in steps.values():  # warm up
        for _ in range(3):
            fn(x)
    sizes = {}
    for name, fn in steps.items():
        t0 = time.process_time()
        n = 0
        while time.process_time() - t0 < 0.2:
            fn(x)
            n += 1
        sizes[name] = max(3, int(n * block_seconds / (time.process_time() - t0)))
    times = {name: [] for name in steps}
    order = list(steps)
    for r in range(rounds):
        for name in order if r % 2 == 0 else reversed(order):
            t0 = time.process_time()
            for _ in range(sizes[name]):
                steps[name](x)
            times[name].append(1e3 * (time.process_time() - t0) / sizes[name])
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="100")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--block-seconds", type=float, default=1.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    pyro.set_rng_seed(0)
    print(f"machine: {machine()}\n")
    print(f"Gaussian mixture, {NUM_CLUSTERS} clusters; median over {args.rounds} rounds, ms/step\n")
    print(
        "| B | " + " | ".join(NAMES) + " | enum / factor | enum / torch | enum vs hand: max diff |"
    )
    print("|---:|" + "---:|" * (len(NAMES) + 3))
    records = []
    for B in map(int, args.batch_sizes.split(",")):
        pyro.clear_param_store()
        gmm = GMM()
        x = sample_data(B, generator=torch.Generator().manual_seed(B))
        diff = check_agree(gmm, x)
        times = time_steps(make_steps(gmm), x, args.rounds, args.block_seconds)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(
            f"| {B} | "
            + " | ".join(f"{med[n]:.3f}" for n in NAMES)
            + f" | **{med['enum'] / med['factor']:.2f}×** | {med['enum'] / med['torch']:.2f}× "
            f"| {diff:.1e} |"
        )
        records.append({"batch_size": B, "ms_per_step": times, "median": med, "max_diff": diff})
    print()
    for name in NAMES:
        print(f"* {name}: {LABELS[name]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rounds": args.rounds, "runs": records}, f, indent=1)
    return records


if __name__ == "__main__":
    main()
