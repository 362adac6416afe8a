# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Sigmoid belief nets on binarized MNIST: wake-sleep, RWS and VIMCO (all from pyro_rws) for a fixed
wall-clock budget per run, test NLL next to the published figures (experiments.md).

    python benchmarks/mnist_sbn.py                                   # SBN 200 and 200-200-200
    python benchmarks/mnist_sbn.py --layers 200 --minutes 5          # a modest budget
    python benchmarks/mnist_sbn.py --estimators rws --particles 5,20 --minutes 30

Budget: --minutes of training per run (evaluation excluded) or --steps, whichever ends first.
Test NLL: -log_evidence (importance sampling with the trained guide, K=--eval-particles) on
--eval-points test images (the test split is shuffled once with seed 0: it is stored sorted by
digit); an upper bound on the true NLL in expectation. Results go to --out (JSON, rewritten
after every run) and a markdown table on stdout. Skips (exit 0) when
binarized MNIST is not found.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyro
import torch
from _common import load_data, machine

from pyro_rws import RWS, VIMCO, WakeSleepELBO, log_evidence
from pyro_rws.examples.data import shuffled_batches
from pyro_rws.examples.sbn import SBN

# test NLL in nats, Mnih & Gregor 2014 Table 1 as recalled in experiments.md (approximate)
PUBLISHED = {
    "200": {"ws": 120.7, "nvil": 113.1},
    "200,200": {"ws": 107.7, "nvil": 99.8},
    "200,200,200": {"ws": 101.3, "nvil": 96.7},
}

LOSSES = {
    "ws": ("wake-sleep", lambda k: WakeSleepELBO(num_particles=k, max_plate_nesting=1)),
    "rws": ("RWS (wake-phi)", lambda k: RWS(num_particles=k, insomnia=1.0, max_plate_nesting=1)),
    "vimco": ("VIMCO", lambda k: VIMCO(num_particles=k, max_plate_nesting=1)),
}


def run(train_x, test_x, layers, name, K, args):
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    sbn = SBN(784, layers)
    # initialize the output biases at the data's log-odds, as is usual for SBNs on MNIST
    mean = train_x.mean(0).clamp(1e-3, 1 - 1e-3)
    with torch.no_grad():
        sbn.decoders[0].bias.copy_(torch.log(mean) - torch.log1p(-mean))
    loss = LOSSES[name][1](K)
    optim = torch.optim.Adam(sbn.parameters(), lr=args.lr)
    batches = shuffled_batches(train_x, args.batch_size, torch.Generator().manual_seed(args.seed))
    steps, train_time = 0, 0.0
    budget = 60 * args.minutes
    while train_time < budget and (args.steps is None or steps < args.steps):
        x = next(batches)
        t0 = time.perf_counter()
        optim.zero_grad()
        loss.differentiable_loss(sbn.model, sbn.guide, x).backward()
        optim.step()
        train_time += time.perf_counter() - t0
        steps += 1
    t0 = time.perf_counter()
    lp = log_evidence(
        sbn.model, sbn.guide, test_x, num_particles=args.eval_particles, chunk_size=20
    )
    return {
        "layers": ",".join(map(str, layers)),
        "estimator": name,
        "K": K,
        "steps": steps,
        "epochs": steps * args.batch_size / len(train_x),
        "train_minutes": train_time / 60,
        "ms_per_step": 1000 * train_time / steps,
        "test_nll": -float(lp.mean()),
        "eval_seconds": time.perf_counter() - t0,
    }


def table(rows, args) -> str:
    lines = [
        f"Test NLL (nats; -log p(x) with K={args.eval_particles} on {args.eval_points} test "
        f"images), batch {args.batch_size}, Adam lr {args.lr}, budget {args.minutes} min/run",
        "",
        "| SBN | estimator | K | steps | epochs | ms/step | test NLL "
        "| published WS | published NVIL |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pub = PUBLISHED.get(r["layers"], {})
        lines.append(
            f"| 784-{r['layers'].replace(',', '-')} | {LOSSES[r['estimator']][0]} | {r['K']} "
            f"| {r['steps']} | {r['epochs']:.2f} | {r['ms_per_step']:.1f} | {r['test_nll']:.2f} "
            f"| {pub.get('ws', '')} | {pub.get('nvil', '')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", default="200;200,200,200", help="';'-separated architectures")
    p.add_argument("--estimators", default="ws,rws,vimco")
    p.add_argument("--particles", "-K", default="5")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per run")
    p.add_argument("--steps", type=int, default=None, help="optional step limit per run")
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-particles", type=int, default=1000)
    p.add_argument("--eval-points", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/mnist_sbn.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    loaded = load_data("mnist")
    if loaded is None:
        print("binarized MNIST not found; skipping")
        return 0
    train_x, test_x, label = loaded
    test_x = test_x[: args.eval_points]
    print(f"# {label}; {machine()}; {time.strftime('%Y-%m-%d %H:%M %Z')}", flush=True)
    rows = []
    for arch in args.layers.split(";"):
        layers = tuple(int(t) for t in arch.split(","))
        for name in args.estimators.split(","):
            for K in (int(k) for k in args.particles.split(",")):
                rows.append(run(train_x, test_x, layers, name, K, args))
                print(json.dumps(rows[-1]), flush=True)
                out = Path(args.out)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(
                    json.dumps({"args": vars(args), "machine": machine(), "rows": rows}, indent=1)
                )
    print()
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
