# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Which compiler for ``pyro_rws.JitRWS``: ms/step of the same RWS step (SBN on digits, module
parameters, ``torch.optim.Adam``) compiled three ways, against eager and the hand-written step:

* ``trace``: :func:`torch.jit.trace` of the step with the parameters as inputs (what Pyro's
  ``JitTrace_ELBO`` does; note that a trace does not record ``torch.no_grad`` blocks, so with a
  sleep phase its gradients would be wrong: timing only, wake phase only here);
* ``replay``: ``JitRWS`` default, the step recorded once as an ATen graph and replayed;
* ``inductor``: ``JitRWS(jit_options={"backend": "inductor"})``, that graph through
  :func:`torch.compile`.

    python benchmarks/jit_backends.py            # cells H/B/K = 16/32/5 and 64/256/50
    python benchmarks/jit_backends.py --cells 64/32/5 --rounds 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import pyro
import torch
from _common import hand_rws_loss, load_data, machine

from pyro_rws import RWS, JitRWS
from pyro_rws.examples.sbn import SBN

NAMES = ("hand", "eager", "trace", "replay", "inductor")


def make_steps(sbn, K, x0):
    optim = torch.optim.Adam(sbn.parameters(), lr=1e-3)
    eager = RWS(K, max_plate_nesting=1)
    params = list(sbn.parameters())

    def traced_step(*inputs):
        value, surrogate, _ = eager._terms(sbn.model, sbn.guide, (inputs[-1],), {})
        return value + (surrogate - surrogate.detach())

    eager.differentiable_loss(sbn.model, sbn.guide, x0)  # guesses the plate nesting
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(traced_step, (*params, x0), check_trace=False)
    record = {"trace": time.perf_counter() - t0}
    replay = JitRWS(K, max_plate_nesting=1)(sbn.model, sbn.guide)
    inductor = JitRWS(K, max_plate_nesting=1, jit_options={"backend": "inductor"})
    inductor = inductor(sbn.model, sbn.guide)

    def run(fn):
        def step(x):
            optim.zero_grad()
            fn(x).backward()
            optim.step()

        return step

    steps = {
        "hand": run(lambda x: hand_rws_loss(sbn, x, K)),
        "eager": run(lambda x: eager.differentiable_loss(sbn.model, sbn.guide, x)),
        "trace": run(lambda x: traced(*params, x)),
        "replay": run(replay),
        "inductor": run(inductor),
    }
    for name in ("replay", "inductor"):
        t0 = time.perf_counter()
        steps[name](x0)
        record[name] = time.perf_counter() - t0
    return steps, record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cells", default="16/32/5,64/256/50", help="H/B/K,...")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--block-seconds", type=float, default=0.25)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    train, _, label = load_data("digits")
    print(f"# compilers for JitRWS: SBN on {label}; {machine()}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}; {args.rounds} interleaved rounds")
    print()
    print(
        "| H | B | K | "
        + " | ".join(f"{n} ms" for n in NAMES)
        + " | "
        + " | ".join(f"{n}/hand" for n in NAMES[1:])
        + " | recording s (trace, replay, inductor) |"
    )
    print("|---:|---:|---:|" + "---:|" * (2 * len(NAMES) - 1) + "---|")
    for cell in args.cells.split(","):
        H, B, K = (int(t) for t in cell.split("/"))
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        sbn = SBN(train.shape[-1], (H,))
        gen = torch.Generator().manual_seed(0)

        def batch(B=B, gen=gen):
            return train[torch.randint(len(train), (B,), generator=gen)]

        steps, record = make_steps(sbn, K, batch())
        for step in steps.values():
            for _ in range(3):
                step(batch())
        t0 = time.perf_counter()
        steps["eager"](batch())
        block = max(2, round(args.block_seconds / (time.perf_counter() - t0)))
        times = {n: [] for n in NAMES}
        for r in range(args.rounds):
            for name in NAMES if r % 2 == 0 else NAMES[::-1]:
                xs = [batch() for _ in range(block)]
                t0 = time.perf_counter()
                for x in xs:
                    steps[name](x)
                times[name].append(1000 * (time.perf_counter() - t0) / block)
        ms = {n: statistics.median(t) for n, t in times.items()}
        print(
            f"| {H} | {B} | {K} | "
            + " | ".join(f"{ms[n]:.2f}" for n in NAMES)
            + " | "
            + " | ".join(f"**{ms[n] / ms['hand']:.2f}**" for n in NAMES[1:])
            + f" | {record['trace']:.2f}, {record['replay']:.2f}, {record['inductor']:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
