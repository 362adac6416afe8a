# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Learning efficiency: held-out log p(x) after a fixed number of steps, ``pyro_rws.RWS``
(per-datapoint weights) against ``pyro.infer.ReweightedWakeSleep`` (one joint weight per
minibatch), both with insomnia=1 (wake-theta + wake-phi), same seeds, same initial parameters,
same minibatches, same optimizer (Adam).

    python benchmarks/learning.py                          # digits, SBN 64-16, 3 seeds
    python benchmarks/learning.py --seeds 0 --steps 1000   # faster
    python benchmarks/learning.py --data mnist --layers 200 --steps 3000 --eval-points 1000
    python benchmarks/learning.py --num-data               # subsampled plate (N/B scale)

Held-out log p(x): ``pyro_rws.log_evidence`` with the trained guide, K=--eval-particles (1000),
on the test split (digits: 359 images), in nats/image; higher is better.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from _common import load_data, machine
from pyro.infer import ReweightedWakeSleep as PyroRWS

from pyro_rws import RWS, log_evidence
from pyro_rws.examples.data import shuffled_batches
from pyro_rws.examples.sbn import SBN


def make_loss(name: str, K: int):
    if name == "ours":
        return RWS(num_particles=K, insomnia=1.0, max_plate_nesting=1)
    return PyroRWS(num_particles=K, insomnia=1.0, vectorize_particles=True, max_plate_nesting=1)


def train(name, train_x, test_x, args, seed):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    sbn = SBN(train_x.shape[-1], args.layers)
    loss = make_loss(name, args.particles)
    optim = torch.optim.Adam(sbn.parameters(), lr=args.lr)
    batches = shuffled_batches(train_x, args.batch_size, torch.Generator().manual_seed(seed))
    num_data = len(train_x) if args.num_data else None
    curve = []
    step_time = 0.0
    for step in range(1, args.steps + 1):
        x = next(batches)
        t0 = time.perf_counter()
        optim.zero_grad()
        if name == "ours":
            loss.differentiable_loss(sbn.model, sbn.guide, x, num_data).backward()
        else:
            loss.loss_and_grads(sbn.model, sbn.guide, x, num_data)
        optim.step()
        step_time += time.perf_counter() - t0
        if step % args.curve_every == 0 and step < args.steps:
            lp = log_evidence(sbn.model, sbn.guide, test_x, num_particles=100)
            curve.append((step, float(lp.mean())))
    lp = log_evidence(
        sbn.model, sbn.guide, test_x, num_particles=args.eval_particles, chunk_size=100
    )
    curve.append((args.steps, float(lp.mean())))
    return {"final": float(lp.mean()), "curve": curve, "ms_per_step": 1000 * step_time / args.steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="digits", help="digits or mnist")
    p.add_argument("--layers", default=None, help="default 16 (digits), 200 (MNIST)")
    p.add_argument("--particles", "-K", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eval-particles", type=int, default=1000)
    p.add_argument("--eval-points", type=int, default=None, help="default: all test images")
    p.add_argument("--curve-every", type=int, default=500, help="log p(x) (K=100) every N steps")
    p.add_argument("--num-data", action="store_true", help="subsampled data plate (scale N/B)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    loaded = load_data(args.data)
    if loaded is None:
        print("binarized MNIST not found; skipping", file=sys.stderr)
        return 0
    train_x, test_x, label = loaded
    if args.eval_points:
        test_x = test_x[: args.eval_points]
    mnist = train_x.shape[-1] == 784
    args.layers = tuple(int(t) for t in (args.layers or ("200" if mnist else "16")).split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    arch = "-".join(map(str, (train_x.shape[-1], *args.layers)))
    plate = "subsampled (N/B)" if args.num_data else "batch"
    print(
        f"# learning: SBN {arch} on {label}, B={args.batch_size}, K={args.particles}, "
        f"{args.steps} Adam steps lr {args.lr}, plate {plate}"
    )
    print(f"# held-out log p(x): log_evidence K={args.eval_particles} on {len(test_x)} test images")
    print(f"# {machine()}; {time.strftime('%Y-%m-%d %H:%M %Z')}; validation off")
    print()
    print("| seed | pyro_rws RWS | Pyro RWS | difference | ours ms/step | Pyro ms/step |")
    print("|---:|---:|---:|---:|---:|---:|")
    results = {"ours": [], "pyro": []}
    for seed in seeds:
        row = {name: train(name, train_x, test_x, args, seed) for name in ("ours", "pyro")}
        for name in row:
            results[name].append(row[name])
        o, q = row["ours"], row["pyro"]
        print(
            f"| {seed} | {o['final']:.2f} | {q['final']:.2f} | {o['final'] - q['final']:+.2f} "
            f"| {o['ms_per_step']:.1f} | {q['ms_per_step']:.1f} |",
            flush=True,
        )
    if len(seeds) > 1:
        mean = {n: statistics.mean(r["final"] for r in results[n]) for n in results}
        diff = mean["ours"] - mean["pyro"]
        print(f"| mean | {mean['ours']:.2f} | {mean['pyro']:.2f} | {diff:+.2f} | | |")
    print()
    print(
        "Held-out log p(x) (K=100, K=--eval-particles at the last step) during training, seed "
        f"{seeds[0]}:"
    )
    print()
    steps = [s for s, _ in results["ours"][0]["curve"]]
    print("| step | " + " | ".join(map(str, steps)) + " |")
    print("|---|" + "---:|" * len(steps))
    for name, title in (("ours", "pyro_rws RWS"), ("pyro", "Pyro RWS")):
        print(f"| {title} | " + " | ".join(f"{v:.2f}" for _, v in results[name][0]["curve"]) + " |")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"args": vars(args), "machine": machine(), "results": results},
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
