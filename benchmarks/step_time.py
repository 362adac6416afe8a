# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Per-step time and peak memory of ``pyro_rws.ReweightedWakeSleep`` (eager, and compiled:
``pyro_rws.JitRWS``; each as a torch module's loss and through ``SVI``) against Pyro's built-in
``pyro.infer.ReweightedWakeSleep`` (with and without ``SVI``) and two hand-written PyTorch
implementations of the same estimator (per-datapoint RWS, wake-theta + wake-phi), on one SBN in
one process: ``lean`` (issue 19's step, the leanest we could write: the baseline of the ratios)
and ``hand`` (the earlier baseline, which computes the bound's log-sum-exp and the weights'
softmax separately and builds ``surrogate - surrogate.detach()``).

    python benchmarks/step_time.py                      # MNIST 784-200 if present, else digits
    python benchmarks/step_time.py --data digits --layers 16
    python benchmarks/step_time.py --particles 5,20 --batch-sizes 32 --rounds 5 --no-memory
    python benchmarks/step_time.py --data digits --layers "16;64" --particles 5,50 \
        --contenders jit,jit-svi,svi,pyro-svi,hand,lean --no-memory    # issue 19's grid
    python benchmarks/step_time.py --data digits --layers 64 --particles 5,50 \
        --contenders jit,jit-svi,jit-inductor,ours,pyro,hand     # the compiled losses
    python benchmarks/step_time.py --data digits --layers 64,16 --baseline hand

Timing: the step functions share one SBN and one ``torch.optim.Adam`` (the ``SVI`` contenders
keep their own ``pyro.optim.Adam``, one ``torch.optim.Adam`` per parameter, as Pyro's ``SVI``
does); they run interleaved in ``--rounds`` rounds (order reversed every other round), each a
block of steps sized to take about ``--block-seconds``, timed in CPU time of the process
(``time.process_time``, one torch thread: on a shared machine wall time mostly measures the
other processes); the table gives the median over rounds of ms/step, and of each round's ratio
to the baseline step (``--baseline``: ``lean``, the default, written for one-layer SBNs; or
``hand``) timed in the same round (so that a change of the machine's load between rounds
cancels out of the ratios), and ``svi/pyro-svi`` likewise. Pyro's validation is disabled for
all (``pyro.enable_validation(False)``); one torch thread.

Memory: for each configuration and step function a fresh subprocess builds the same SBN on
random binary data of the same shape, runs one warm-up step, resets the RSS high-water mark
(/proc/self/clear_refs) and reports the peak RSS of 3 more steps minus the RSS before them:
the transient memory of a step (activations, autograd graph, gradients, allocator slack), in MiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch
from _common import hand_rws_loss, lean_rws_loss, load_data, machine
from pyro.infer import ReweightedWakeSleep as PyroRWS

from pyro_rws import RWS, JitRWS
from pyro_rws.examples.sbn import SBN

NAMES = (
    "ours",
    "ours-svi",
    "pyro",
    "hand",
    "lean",
    "jit",
    "jit-svi",
    "jit-inductor",
    "svi",
    "pyro-svi",
)
DEFAULT = "ours,ours-svi,pyro,hand"
LABELS = {
    "ours": "pyro_rws RWS (differentiable_loss + backward)",
    "ours-svi": "pyro_rws RWS (loss_and_grads, the SVI path)",
    "pyro": "pyro.infer.ReweightedWakeSleep (loss_and_grads)",
    "hand": "hand-written PyTorch (_common.hand_rws_loss: separate logsumexp and softmax, "
    "surrogate - surrogate.detach(), two weighted sums)",
    "lean": "the leanest hand-written step (issue 19, _common.lean_rws_loss; one-layer SBN)",
    "jit": "pyro_rws JitRWS as a torch module, torch.optim.Adam (recorded graph replayed)",
    "jit-svi": "pyro_rws JitRWS through pyro.infer.SVI with pyro.optim.Adam",
    "jit-inductor": "pyro_rws JitRWS(jit_options={'backend': 'inductor'}) as a torch module",
    "svi": "pyro_rws RWS through pyro.infer.SVI with pyro.optim.Adam",
    "pyro-svi": "pyro.infer.ReweightedWakeSleep through pyro.infer.SVI with pyro.optim.Adam",
}


def make_steps(sbn: SBN, K: int, lr: float = 1e-3):
    optim = torch.optim.Adam(sbn.parameters(), lr=lr)
    ours = RWS(num_particles=K, insomnia=1.0, max_plate_nesting=1)
    theirs = PyroRWS(num_particles=K, insomnia=1.0, vectorize_particles=True, max_plate_nesting=1)
    jit_module = JitRWS(K, insomnia=1.0, max_plate_nesting=1)(sbn.model, sbn.guide)
    inductor = JitRWS(K, max_plate_nesting=1, jit_options={"backend": "inductor"})
    inductor_module = inductor(sbn.model, sbn.guide)
    # SVI: the SBN's parameters are in the param store (pyro.module); pyro.optim keeps its own
    # Adam per parameter
    svi = pyro.infer.SVI(
        sbn.model, sbn.guide, pyro.optim.Adam({"lr": lr}), loss=JitRWS(K, max_plate_nesting=1)
    )
    svi_eager = pyro.infer.SVI(
        sbn.model, sbn.guide, pyro.optim.Adam({"lr": lr}), loss=RWS(K, max_plate_nesting=1)
    )
    pyro_loss = PyroRWS(K, insomnia=1.0, vectorize_particles=True, max_plate_nesting=1)
    svi_pyro = pyro.infer.SVI(sbn.model, sbn.guide, pyro.optim.Adam({"lr": lr}), loss=pyro_loss)

    def step_ours(x):
        optim.zero_grad()
        ours.differentiable_loss(sbn.model, sbn.guide, x).backward()
        optim.step()

    def step_ours_svi(x):
        optim.zero_grad()
        ours.loss_and_grads(sbn.model, sbn.guide, x)
        optim.step()

    def step_pyro(x):
        optim.zero_grad()
        theirs.loss_and_grads(sbn.model, sbn.guide, x)
        optim.step()

    def step_hand(x):
        optim.zero_grad()
        hand_rws_loss(sbn, x, K).backward()
        optim.step()

    def step_lean(x):
        loss = lean_rws_loss(sbn, x, K)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()

    def step_jit(x):
        optim.zero_grad()
        jit_module(x).backward()
        optim.step()

    def step_jit_inductor(x):
        optim.zero_grad()
        inductor_module(x).backward()
        optim.step()

    def step_jit_svi(x):
        svi.step(x)

    def step_svi(x):
        svi_eager.step(x)

    def step_pyro_svi(x):
        svi_pyro.step(x)

    return {
        "ours": step_ours,
        "ours-svi": step_ours_svi,
        "pyro": step_pyro,
        "hand": step_hand,
        "lean": step_lean,
        "jit": step_jit,
        "jit-svi": step_jit_svi,
        "jit-inductor": step_jit_inductor,
        "svi": step_svi,
        "pyro-svi": step_pyro_svi,
    }


def check_same_gradient(sbn: SBN, x: torch.Tensor, K: int) -> float:
    """Max abs difference of the gradients of ours and hand-written for the same seed."""
    grads = []
    for fn in (
        lambda: RWS(num_particles=K, max_plate_nesting=1).differentiable_loss(
            sbn.model, sbn.guide, x
        ),
        lambda: hand_rws_loss(sbn, x, K),
    ):
        sbn.zero_grad()
        pyro.set_rng_seed(123)
        fn().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in sbn.parameters()]))
        sbn.zero_grad()
    return float((grads[0] - grads[1]).abs().max() / grads[1].abs().max())


def batches(train: torch.Tensor, B: int):
    gen = torch.Generator().manual_seed(0)
    while True:
        yield train[torch.randint(len(train), (B,), generator=gen)]


def time_config(train, layers, K, B, rounds, block_seconds, names, baseline="hand"):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    sbn = SBN(train.shape[-1], layers)
    steps = make_steps(sbn, K)
    data = batches(train, B)
    x0 = next(data)
    rel_err = check_same_gradient(sbn, x0, K)
    # warm-up and calibration: the block size makes one block take about block_seconds
    per_step, first = {}, {}
    for name in names:
        t0 = time.perf_counter()
        steps[name](next(data))  # a compiled loss records (and compiles) its graph here
        first[name] = time.perf_counter() - t0
        for _ in range(2):
            steps[name](next(data))
        t0 = time.process_time()
        for _ in range(3):
            steps[name](next(data))
        per_step[name] = (time.process_time() - t0) / 3
    block = max(2, round(block_seconds / max(per_step.values())))
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            xs = [next(data) for _ in range(block)]
            # CPU time of the process (one thread): on a shared machine, wall time mostly
            # measures the other processes
            t0 = time.process_time()
            for x in xs:
                steps[name](x)
            times[name].append(1000 * (time.process_time() - t0) / block)
    ms = {n: statistics.median(t) for n, t in times.items()}
    # the ratio of two step functions timed next to each other in the same round, median over
    # rounds: a change of the machine's load between rounds cancels out
    ratios = {
        n: statistics.median(a / h for a, h in zip(t, times[baseline], strict=True))
        for n, t in times.items()
    }
    if "svi" in times and "pyro-svi" in times:
        ratios["svi/pyro-svi"] = statistics.median(
            a / h for a, h in zip(times["svi"], times["pyro-svi"], strict=True)
        )
    return ms, ratios, block, rel_err, first


def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in KiB (Linux)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0])
    return values


def memory_child(args) -> None:
    """
    Subprocess entry: the peak resident memory (MiB) that 3 steps of one step function need
    beyond the process's resident memory before them. After building the SBN and one warm-up
    step (which allocates Adam's state and any lazily created buffers), the RSS high-water mark
    is reset (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0); the figure is VmHWM after 3
    steps minus VmRSS before them: activations, the autograd graph, gradients and allocator
    slack, not the parameters or the optimizer state. Falls back to ``ru_maxrss`` differences.
    """
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    pyro.set_rng_seed(0)
    layers = tuple(int(t) for t in args.layers.split(","))
    sbn = SBN(args.x_dim, layers)
    steps = make_steps(sbn, args.K)
    x = torch.bernoulli(torch.full((args.B, args.x_dim), 0.3))
    steps[args.child](x)
    gc.collect()
    try:
        before = _proc_status()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM"
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss"
    for _ in range(3):
        steps[args.child](x)
    if method == "VmHWM":
        after = _proc_status()["VmHWM"]
    else:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mib": (after - before) / 1024, "method": method}))


def measure_memory(name, x_dim, layers, K, B) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--x-dim",
        str(x_dim),
        "--layers",
        ",".join(map(str, layers)),
        "--K",
        str(K),
        "--B",
        str(B),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["mib"]


def prepare(parser, args):
    """
    One thread, validation off, the data (``args.data``), the SBN's layers (``args.layers``, or
    200 on MNIST and 16 on digits) and the contenders (``args.contenders``, with ``hand``):
    ``(train, label, layers, names)``, or None if MNIST was asked for and is not there.
    """
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    loaded = load_data(args.data)
    if loaded is None:
        print("binarized MNIST not found", file=sys.stderr)
        return None
    train, _, label = loaded
    layers = tuple(
        int(t) for t in (args.layers or ("200" if "MNIST" in label else "16")).split(",")
    )
    names = [n.strip() for n in args.contenders.split(",")]
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {', '.join(NAMES)}")
    if "hand" not in names:
        names.append("hand")
    return train, label, layers, names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--data", default="auto", help="auto (MNIST if found, else digits), mnist, digits"
    )
    p.add_argument(
        "--layers",
        default=None,
        help="latent layers, e.g. 200 or 200,200,200; several SBNs separated by ';' (16;64)",
    )
    p.add_argument("--particles", default="5,20,50")
    p.add_argument("--batch-sizes", default="32,256")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--block-seconds", type=float, default=0.25)
    p.add_argument("--no-memory", action="store_true", help="skip the memory table")
    p.add_argument("--no-timing", action="store_true", help="skip the timing table")
    p.add_argument(
        "--contenders",
        default=DEFAULT,
        help="comma-separated, from: " + ", ".join(NAMES) + f" (default {DEFAULT})",
    )
    p.add_argument(
        "--baseline",
        default="lean",
        choices=("lean", "hand"),
        help="the step the ratios are against (default lean; hand for SBNs of several layers)",
    )
    p.add_argument("--json", default=None, help="also write the results here")
    # subprocess mode (memory)
    p.add_argument("--child", choices=NAMES, help=argparse.SUPPRESS)
    p.add_argument("--x-dim", type=int, help=argparse.SUPPRESS)
    p.add_argument("--K", type=int, help=argparse.SUPPRESS)
    p.add_argument("--B", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        memory_child(args)
        return 0

    layer_sets = (args.layers or "").split(";")
    args.layers = layer_sets[0] or None
    setup = prepare(p, args)
    if setup is None:
        return 1
    train, label, layers, names = setup
    archs = [layers] + [tuple(int(t) for t in ls.split(",")) for ls in layer_sets[1:]]
    base = args.baseline
    if base == "lean" and any(len(a) != 1 for a in archs):
        p.error("the lean step is written for one-layer SBNs: pass --baseline hand")
    if base not in names:
        names.append(base)
    Ks = [int(t) for t in args.particles.split(",")]
    Bs = [int(t) for t in args.batch_sizes.split(",")]
    others = [n for n in names if n != base]
    extra = ["svi/pyro-svi"] if "svi" in names and "pyro-svi" in names else []
    arch_names = ["-".join(map(str, (train.shape[-1], *a))) for a in archs]
    print(f"# step time: SBN {', '.join(arch_names)} on {label}")
    print(f"# {machine()}")
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M %Z')}; validation off; {args.rounds} interleaved "
        "rounds; CPU time of the process (time.process_time), median over rounds; ratios: "
        f"median over rounds of the ratio to {base} in the same round"
    )
    for n in names:
        print(f"# {n}: {LABELS[n]}")
    print()
    results = [{"layers": a, "K": K, "B": B} for a in archs for B in Bs for K in Ks]
    if not args.no_timing:
        print(
            "| H | K | B | "
            + " | ".join(f"{n} ms" for n in names)
            + " | "
            + " | ".join([f"{n}/{base}" for n in others] + extra)
            + " | steps/block | grad rel. diff ours vs hand | first call s (recording) |"
        )
        print("|---|---:|---:|" + "---:|" * (len(names) + len(others) + len(extra) + 3))
    for row in results if not args.no_timing else []:
        K, B = row["K"], row["B"]
        ms, ratios, block, rel_err, first = time_config(
            train, row["layers"], K, B, args.rounds, args.block_seconds, names, base
        )
        row.update(
            ms=ms,
            baseline=base,
            ratio_to_baseline=ratios,
            block=block,
            grad_rel_diff=rel_err,
            first_call_s=first,
        )
        compiled = ", ".join(f"{n} {first[n]:.1f}" for n in names if n.startswith("jit"))
        print(
            f"| {','.join(map(str, row['layers']))} | {K} | {B} | "
            + " | ".join(f"{ms[n]:.2f}" for n in names)
            + " | "
            + " | ".join(f"**{ratios[n]:.2f}**" for n in others + extra)
            + f" | {block} | {rel_err:.1e} | {compiled or '-'} |",
            flush=True,
        )
    if not args.no_memory:
        print()
        print("Peak RSS of a step above the RSS before it (MiB; subprocess per cell, VmHWM reset):")
        print()
        print(
            "| H | K | B | "
            + " | ".join(names)
            + " | "
            + " | ".join(f"{n}/{base}" for n in others)
            + " |"
        )
        print("|---|---:|---:|" + "---:|" * (len(names) + len(others)))
        for row in results:
            mem = {
                n: measure_memory(n, train.shape[-1], row["layers"], row["K"], row["B"])
                for n in names
            }
            row["peak_rss_mib"] = mem

            def ratio(a, b):
                return f"{a / b:.2f}" if b > 0.5 else "n/a"

            print(
                f"| {','.join(map(str, row['layers']))} | {row['K']} | {row['B']} | "
                + " | ".join(f"{mem[n]:.1f}" for n in names)
                + " | "
                + " | ".join(ratio(mem[n], mem[base]) for n in others)
                + " |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"archs": arch_names, "data": label, "machine": machine(), "rows": results},
                indent=1,
            )
        )
    finite = all(math.isfinite(v) for r in results for v in r.get("ms", {}).values())
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
