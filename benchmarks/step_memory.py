# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Peak tensor memory of one step, per step function of ``step_time.py``, without allocator noise.

``step_time.py`` measures the peak resident memory of a process (RSS), which includes glibc's
allocator slack and varies by ±20–40 MiB between processes for the same step. This script
counts tensor bytes instead: one step runs under ``torch.profiler`` with memory profiling, and
the profiler's memory timeline (every allocation and free of a tensor, by category) gives the
most bytes alive at once during the step, above what was alive before it. That timeline is a
private torch API (``torch.profiler._memory_profiler``): it fails on some programs (in torch
2.13, on the ``SVI`` steps, whose ``pyro.optim`` updates it cannot follow), which are reported
as ``n/a``.

    python benchmarks/step_memory.py                       # MNIST 784-200 if present, else digits
    python benchmarks/step_memory.py --data digits --layers 64 --particles 50 --batch-size 256
"""

from __future__ import annotations

import argparse
import sys

import pyro
import torch
from _common import machine
from step_time import LABELS, make_steps, prepare

from pyro_rws.examples.sbn import SBN


def peak_tensor_mib(step, x) -> float | None:
    """Most tensor MiB alive at once during ``step(x)`` beyond those alive before it."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    step(x)
    step(x)  # optimizer state, recorded graphs and lazily created buffers exist from here
    try:
        with profile(
            activities=[ProfilerActivity.CPU],
            profile_memory=True,
            record_shapes=True,
            with_stack=True,
        ) as prof:
            step(x)
        timeline = MemoryProfileTimeline(prof._memory_profile())
        _, sizes = timeline._coalesce_timeline(torch.device("cpu"))
    except (AssertionError, RuntimeError, KeyError):
        return None
    totals = [sum(s) for s in sizes]
    return (max(totals) - totals[0]) / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="auto", help="auto (MNIST if found), mnist, digits")
    p.add_argument("--layers", default=None, help="latent layers, e.g. 200")
    p.add_argument("--particles", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--contenders", default="jit,ours,pyro,hand")
    args = p.parse_args(argv)
    setup = prepare(p, args)
    if setup is None:
        return 1
    train, label, layers, names = setup
    K, B = args.particles, args.batch_size
    print(f"# peak tensor memory of a step: SBN {'-'.join(map(str, (train.shape[-1], *layers)))}")
    print(f"# on {label}, K={K}, B={B}; {machine()}")
    for n in names:
        print(f"# {n}: {LABELS[n]}")
    print()
    mib = {}
    for n in names:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        sbn = SBN(train.shape[-1], layers)
        mib[n] = peak_tensor_mib(make_steps(sbn, K)[n], train[:B])
    ratio_names = [f"{n}/hand" for n in names if n != "hand"]
    print("| " + " | ".join(names + ratio_names) + " |")
    print("|" + "---:|" * (2 * len(names) - 1))
    cells = [("n/a" if mib[n] is None else f"{mib[n]:.1f}") for n in names]
    ratios = [
        "n/a" if mib[n] is None else f"{mib[n] / mib['hand']:.3f}" for n in names if n != "hand"
    ]
    print("| " + " | ".join(cells + ratios) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
