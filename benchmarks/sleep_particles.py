# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The cost of several sleep particles with a guide that cannot broadcast over them.

A guide written with ``len(x)`` is run once per sleep particle (issue 9); a guide that reads its
plate size from the right (``x.shape[-2]``) gets all fantasies in one run. Both compute the same
estimator; this measures ms/step of ``SleepPhaseLoss(num_particles=S)`` on the digits SBN for
each, interleaved, one thread, validation off:

    python benchmarks/sleep_particles.py --particles 1,10 --batch-size 32 --layers 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from _common import load_data, machine

from pyro_rws import SleepPhaseLoss
from pyro_rws.examples.sbn import SBN


def len_guide(sbn: SBN):
    """``sbn.guide`` with the data plate sized by ``len(x)``, the ordinary way."""

    def guide(x):
        pyro.module("sbn_inference", sbn.encoders)
        with pyro.plate("data", len(x)):
            h = x
            for layer, encoder in enumerate(sbn.encoders, start=1):
                h = pyro.sample(f"h{layer}", dist.Bernoulli(logits=encoder(h)).to_event(1))

    return guide


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--particles", default="1,10")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layers", default="16")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    train = load_data("digits")[0][: args.batch_size]
    sbn = SBN(train.shape[-1], [int(h) for h in args.layers.split(",")])
    guides = {"broadcasting (x.shape[-2])": sbn.guide, "len(x), run per particle": len_guide(sbn)}
    print(f"# SleepPhaseLoss ms/step, digits SBN {args.layers}, B={args.batch_size}; {machine()}")
    print("| S | " + " | ".join(guides) + " | ratio |")
    print("|---|" + "---|" * (len(guides) + 1))
    for S in (int(s) for s in args.particles.split(",")):
        losses = {name: SleepPhaseLoss(num_particles=S, max_plate_nesting=1) for name in guides}
        times = {name: [] for name in guides}
        for r in range(args.rounds):
            for name in guides if r % 2 == 0 else reversed(list(guides)):
                start = time.perf_counter()
                for _ in range(args.steps):
                    losses[name].differentiable_loss(sbn.model, guides[name], train).backward()
                times[name].append((time.perf_counter() - start) / args.steps * 1e3)
        med = [statistics.median(times[name]) for name in guides]
        print(f"| {S} | " + " | ".join(f"{m:.2f}" for m in med) + f" | {med[1] / med[0]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
