# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The step time of sequential particles (``vectorize_particles=False``: one Python run of model
and guide per particle) on tutorial 3's simulator (``pyro_rws.examples.objects``: a random
number of objects, each at a random pixel), against hand-written PyTorch loops of the same work.

    python benchmarks/sequential_step.py
    python benchmarks/sequential_step.py --groups sleep --rounds 15 --profile sleep-svi

Two groups, each timed in its own interleaved run against its own hand-written loop:

- **sleep**: one step of ``SleepPhaseLoss(32, vectorize_particles=False)`` (32 fantasies from the
  simulator, the proposal scored on each): through ``SVI`` with ``pyro.optim.Adam``
  (``sleep-svi``), as a torch module with one ``torch.optim.Adam`` (``sleep-module``), Pyro's own
  ``CSIS`` with ``training_batch_size=32`` (``csis``), and the hand-written loops.
- **wake**: one step of ``RWS(10, insomnia=1, vectorize_particles=False)`` on one observed signal
  (10 proposals, wake-phi): through ``SVI`` (``wake-svi``), as a module (``wake-module``),
  Pyro's ``ReweightedWakeSleep(10, insomnia=1, vectorize_particles=False)`` through ``SVI``
  (``pyro-rws``), and the hand-written loops.

The hand-written loops (``hand``) are the leanest per-particle code: the simulation under
``torch.no_grad`` in plain tensor operations (``torch.multinomial``, ``torch.randint``,
``torch.randn``), ``log_softmax`` picked at the drawn index for the proposal's log-densities,
the same proposal network called exactly as the guide calls it, one ``torch.optim.Adam``, and
the loss value read as a float once per step (as ``SVI.step`` returns it). ``hand-dist`` is the
same loop written with ``torch.distributions`` objects (``Categorical``, ``Normal``), as the Pyro
programs are. ``floor`` runs the Pyro programs themselves (simulator and ``Proposal.guide``, which
calls ``pyro.module``) under one bare recording handler per run with no checks, no fantasy
routing and no per-site bookkeeping: a floor for any library that runs the programs per
particle, so the distance from ``floor`` to ``hand`` is the cost of the programs being Pyro
programs (``pyro.module``, ``pyro.sample`` messages, distribution objects), and the distance from
a pyro_rws contender to ``floor`` is what pyro_rws adds. None batches the networks across
particles: that is the vectorized path's job, and impossible for a program whose structure
differs between particles.

Timing: the contenders of a group run interleaved in ``--rounds`` rounds (order reversed every
other round), each a block of steps sized to take about ``--block-seconds``; the table gives the
median ms/step and the median over rounds of each round's ratio to ``hand`` timed in the same
round. One torch thread, Pyro's validation off. Times are the thread's CPU time by default
(``--clock cpu``, ``time.thread_time``): on a machine shared with other jobs, wall-clock time
includes the time the process waits for a core; ``--clock wall`` gives ``time.perf_counter``.
"""

from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import statistics
import sys
import time

import pyro
import pyro.distributions as dist
import torch
from _common import machine
from pyro.poutine.messenger import Messenger
from torch import nn

from pyro_rws import RWS, SleepPhaseLoss
from pyro_rws.examples.objects import (
    MAX_OBJECTS,
    NOISE,
    NUM_PIXELS,
    Proposal,
    prior_n,
    render,
    simulate,
    simulator,
)

LABELS = {
    "sleep-svi": "pyro_rws SleepPhaseLoss(32, vectorize_particles=False) through SVI",
    "sleep-module": "pyro_rws SleepPhaseLoss(32, vectorize_particles=False) as a torch module",
    "sleep-module-lean": "the same, the guide without pyro.module (Proposal(register=False))",
    "csis": "pyro.infer.CSIS(training_batch_size=32) (its own per-particle autograd.grad)",
    "wake-svi": "pyro_rws RWS(10, insomnia=1, vectorize_particles=False) through SVI",
    "wake-module": "pyro_rws RWS(10, insomnia=1, vectorize_particles=False) as a torch module",
    "wake-module-lean": "the same, the guide without pyro.module (Proposal(register=False))",
    "pyro-rws": "pyro.infer.ReweightedWakeSleep(10, insomnia=1, vectorize_particles=False), SVI",
    "floor": "the Pyro programs under one bare recording handler per run, no checks (a floor)",
    "hand-dist": "hand-written loop with torch.distributions objects, torch.optim.Adam",
    "hand": "hand-written loop, plain tensor ops (log_softmax at the index), torch.optim.Adam",
}
LOG_NOISE_NORM = math.log(NOISE) + 0.5 * math.log(2 * math.pi)


# --------------------------------------------------------------------------------------------
# Hand-written loops
# --------------------------------------------------------------------------------------------
def _one_hot_n(n: int, like: torch.Tensor) -> torch.Tensor:
    return nn.functional.one_hot(torch.tensor(n), MAX_OBJECTS + 1).to(like.dtype)


def hand_sleep_loss(proposal: Proposal, S: int, like: torch.Tensor) -> torch.Tensor:
    """``-(1/S) sum_s log q(z_s | x_s)`` on S fantasies, plain tensor operations."""
    prior = prior_n(like)
    total = 0.0
    for _ in range(S):
        with torch.no_grad():
            n = int(torch.multinomial(prior, 1))
            locs = torch.randint(NUM_PIXELS, (n,))
            clean = render(locs, like) if n else torch.zeros_like(like)
            signal = clean + NOISE * torch.randn_like(clean)
        log_q = proposal.count(signal).log_softmax(-1)[n]
        one_hot_n, residual = _one_hot_n(n, like), signal
        for i in range(n):
            logits = proposal.where(proposal.where_input(signal, residual, one_hot_n, i))
            log_q = log_q + logits.log_softmax(-1)[locs[i]]
            residual = residual - render(locs[i : i + 1], like)
        total = total + log_q
    return -total / S


def hand_sleep_loss_dist(proposal: Proposal, S: int, like: torch.Tensor) -> torch.Tensor:
    """The same with ``torch.distributions`` objects, as the Pyro programs are written."""
    prior = prior_n(like)
    uniform = torch.zeros_like(like)
    total = 0.0
    for _ in range(S):
        with torch.no_grad():
            n = dist.Categorical(prior).sample()
            locs = [dist.Categorical(logits=uniform).sample() for _ in range(int(n))]
            clean = render(torch.stack(locs), like) if locs else torch.zeros_like(like)
            signal = dist.Normal(clean, NOISE).to_event(1).sample()
        log_q = dist.Categorical(logits=proposal.count(signal)).log_prob(n)
        one_hot_n, residual = nn.functional.one_hot(n, MAX_OBJECTS + 1).to(like.dtype), signal
        for i, loc in enumerate(locs):
            logits = proposal.where(proposal.where_input(signal, residual, one_hot_n, i))
            log_q = log_q + dist.Categorical(logits=logits).log_prob(loc)
            residual = residual - render(loc.reshape(1), like)
        total = total + log_q
    return -total / S


def hand_wake_loss(proposal: Proposal, K: int, signal: torch.Tensor):
    """
    Wake-phi RWS on one signal, plain tensor operations: ``(loss, bound)`` with
    ``loss = -sum_k sg(wbar_k) log q(z_k | x)``.
    """
    prior_log = prior_n(signal).log()
    log_qs, log_ps = [], []
    for _ in range(K):
        log_q = proposal.count(signal).log_softmax(-1)
        with torch.no_grad():
            n = int(torch.multinomial(log_q.exp(), 1))
        log_q = log_q[n]
        one_hot_n, residual, locs = _one_hot_n(n, signal), signal, []
        for i in range(n):
            logits = proposal.where(proposal.where_input(signal, residual, one_hot_n, i))
            lq = logits.log_softmax(-1)
            with torch.no_grad():
                loc = torch.multinomial(lq.exp(), 1)
            log_q = log_q + lq[loc[0]]
            residual = residual - render(loc, signal)
            locs.append(loc)
        with torch.no_grad():
            clean = render(torch.cat(locs), signal) if n else torch.zeros_like(signal)
            log_lik = -(0.5 * ((signal - clean) / NOISE) ** 2).sum() - NUM_PIXELS * LOG_NOISE_NORM
            log_ps.append(prior_log[n] - n * math.log(NUM_PIXELS) + log_lik)
        log_qs.append(log_q)
    log_q = torch.stack(log_qs)
    log_w = torch.stack(log_ps) - log_q.detach()
    bound = torch.logsumexp(log_w, 0) - math.log(K)
    return -(torch.softmax(log_w, 0) * log_q).sum(), bound


def hand_wake_loss_dist(proposal: Proposal, K: int, signal: torch.Tensor):
    """The same with ``torch.distributions`` objects, as the Pyro programs are written."""
    prior = prior_n(signal)
    uniform = torch.zeros_like(signal)
    log_qs, log_ps = [], []
    for _ in range(K):
        q_n = dist.Categorical(logits=proposal.count(signal))
        n = q_n.sample()
        log_q = q_n.log_prob(n)
        one_hot_n = nn.functional.one_hot(n, MAX_OBJECTS + 1).to(signal.dtype)
        residual, locs = signal, []
        for i in range(int(n)):
            q_loc = dist.Categorical(
                logits=proposal.where(proposal.where_input(signal, residual, one_hot_n, i))
            )
            loc = q_loc.sample()
            log_q = log_q + q_loc.log_prob(loc)
            residual = residual - render(loc.reshape(1), signal)
            locs.append(loc)
        with torch.no_grad():
            log_p = dist.Categorical(prior).log_prob(n)
            for loc in locs:
                log_p = log_p + dist.Categorical(logits=uniform).log_prob(loc)
            clean = render(torch.stack(locs), signal) if locs else torch.zeros_like(signal)
            log_ps.append(log_p + dist.Normal(clean, NOISE).to_event(1).log_prob(signal))
        log_qs.append(log_q)
    log_q = torch.stack(log_qs)
    log_w = torch.stack(log_ps) - log_q.detach()
    bound = torch.logsumexp(log_w, 0) - math.log(K)
    return -(torch.softmax(log_w, 0) * log_q).sum(), bound


# --------------------------------------------------------------------------------------------
# The floor: what any library that runs the Pyro programs once per particle must do
# --------------------------------------------------------------------------------------------
class _Record(Messenger):
    """One bare handler per run: unconditions or replays ``values``, records sample sites."""

    def __init__(self, values: dict | None = None, uncondition: bool = False):
        super().__init__()
        self.values, self.uncondition, self.sites = values, uncondition, {}

    def _process_message(self, msg):
        if msg["type"] != "sample":
            return
        if self.uncondition and msg["is_observed"]:
            msg["is_observed"], msg["value"] = False, None
        elif self.values is not None and not msg["is_observed"]:
            msg["value"], msg["done"] = self.values[msg["name"]], True

    def _postprocess_message(self, msg):
        if msg["type"] == "sample":
            self.sites[msg["name"]] = msg


def _log_prob(sites: dict, latent_only: bool = False):
    terms = [
        s["fn"].log_prob(s["value"])
        for s in sites.values()
        if not (latent_only and s["is_observed"])
    ]
    return sum(terms[1:], terms[0]) if terms else 0.0


def floor_sleep_loss(guide, S: int, x: torch.Tensor) -> torch.Tensor:
    """The sleep-phi loss with the Pyro programs, one bare handler per run, nothing checked."""
    total = 0.0
    for _ in range(S):
        with torch.no_grad(), _Record(uncondition=True) as model_run:
            simulator(x)
        values = {name: site["value"] for name, site in model_run.sites.items()}
        with _Record(values) as guide_run:
            guide(values["signal"])
        total = total + _log_prob(guide_run.sites)
    return -total / S


def floor_wake_loss(guide, K: int, signal: torch.Tensor):
    """Wake-phi RWS with the Pyro programs, one bare handler per run, nothing checked."""
    log_qs, log_ps = [], []
    for _ in range(K):
        with _Record() as guide_run:
            guide(signal)
        values = {name: site["value"] for name, site in guide_run.sites.items()}
        with torch.no_grad(), _Record(values) as model_run:
            simulator(signal)
        log_qs.append(_log_prob(guide_run.sites))
        log_ps.append(_log_prob(model_run.sites))
    log_q = torch.stack(log_qs)
    log_w = torch.stack(log_ps) - log_q.detach()
    bound = torch.logsumexp(log_w, 0) - math.log(K)
    return -(torch.softmax(log_w, 0) * log_q).sum(), bound


# --------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------
def make_steps(group: str, proposal: Proposal, S: int, K: int, lr: float = 1e-3):
    """``{name: step(x)}`` for one group; ``x`` is the placeholder (sleep) or the signal (wake)."""
    optim = torch.optim.Adam(proposal.parameters(), lr=lr)
    # the same networks, a guide that does not call pyro.module (the torch-module path)
    lean = Proposal(register=False)
    lean.count, lean.where = proposal.count, proposal.where

    def torch_step(loss_fn):
        def step(x):
            optim.zero_grad()
            out = loss_fn(x)
            loss, value = out if isinstance(out, tuple) else (out, out)
            loss.backward()
            optim.step()
            return float(value.detach())

        return step

    def svi_step(loss):
        svi = pyro.infer.SVI(simulator, proposal.guide, pyro.optim.Adam({"lr": lr}), loss=loss)
        return svi.step

    if group == "sleep":
        module = SleepPhaseLoss(S, vectorize_particles=False)(simulator, proposal.guide)

        def csis_guide(signal, observations=None):
            proposal.guide(observations["signal"])

        csis = pyro.infer.CSIS(
            simulator, csis_guide, pyro.optim.Adam({"lr": lr}), training_batch_size=S
        )
        return {
            "sleep-svi": svi_step(SleepPhaseLoss(S, vectorize_particles=False)),
            "sleep-module": torch_step(module),
            "sleep-module-lean": torch_step(
                SleepPhaseLoss(S, vectorize_particles=False)(simulator, lean.guide)
            ),
            "csis": csis.step,
            "floor": torch_step(lambda x: floor_sleep_loss(proposal.guide, S, x)),
            "hand-dist": torch_step(lambda x: hand_sleep_loss_dist(proposal, S, x)),
            "hand": torch_step(lambda x: hand_sleep_loss(proposal, S, x)),
        }
    module = RWS(K, insomnia=1.0, vectorize_particles=False)(simulator, proposal.guide)
    theirs = pyro.infer.ReweightedWakeSleep(
        K, insomnia=1.0, vectorize_particles=False, max_plate_nesting=0
    )
    return {
        "wake-svi": svi_step(RWS(K, insomnia=1.0, vectorize_particles=False)),
        "wake-module": torch_step(module),
        "wake-module-lean": torch_step(
            RWS(K, insomnia=1.0, vectorize_particles=False)(simulator, lean.guide)
        ),
        "pyro-rws": svi_step(theirs),
        "floor": torch_step(lambda x: floor_wake_loss(proposal.guide, K, x)),
        "hand-dist": torch_step(lambda x: hand_wake_loss_dist(proposal, K, x)),
        "hand": torch_step(lambda x: hand_wake_loss(proposal, K, x)),
    }


def time_group(steps: dict, inputs, rounds: int, block_seconds: float, clock=time.perf_counter):
    """Interleaved rounds: ``(median ms/step, median ratio to hand)`` per contender."""
    names = list(steps)
    per_step = {}
    for name in names:  # warm-up and calibration
        for _ in range(3):
            steps[name](next(inputs))
        t0 = clock()
        for _ in range(3):
            steps[name](next(inputs))
        per_step[name] = (clock() - t0) / 3
    block = max(2, round(block_seconds / max(per_step.values())))
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            xs = [next(inputs) for _ in range(block)]
            t0 = clock()
            for x in xs:
                steps[name](x)
            times[name].append(1000 * (clock() - t0) / block)
    ms = {n: statistics.median(t) for n, t in times.items()}
    ratios = {
        n: statistics.median(a / h for a, h in zip(t, times["hand"], strict=True))
        for n, t in times.items()
    }
    spread = {
        n: (
            min(a / h for a, h in zip(t, times["hand"], strict=True)),
            max(a / h for a, h in zip(t, times["hand"], strict=True)),
        )
        for n, t in times.items()
    }
    return ms, ratios, spread, block


def group_inputs(group: str):
    """An endless stream of step inputs: the placeholder (sleep) or observed signals (wake)."""
    if group == "sleep":
        placeholder = torch.zeros(NUM_PIXELS)
        while True:
            yield placeholder
    signals = [s for s, _, _ in simulate(100, seed=2024)]
    while True:
        yield from signals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--groups", default="sleep,wake")
    p.add_argument("--sleep-particles", type=int, default=32)
    p.add_argument("--wake-particles", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--block-seconds", type=float, default=0.5)
    p.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: the thread's CPU time (time.thread_time; robust to other processes on a "
        "shared machine), wall: time.perf_counter",
    )
    p.add_argument("--contenders", default=None, help="comma-separated subset (hand is added)")
    p.add_argument("--profile", default=None, help="cProfile this contender instead of timing")
    p.add_argument("--profile-steps", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    S, K = args.sleep_particles, args.wake_particles
    print(f"# sequential particles on tutorial 3's simulator; {machine()}")
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M %Z')}; validation off; {args.rounds} interleaved "
        f"rounds of ~{args.block_seconds} s per contender; sleep S={S}, wake K={K}; "
        f"{args.clock} clock"
    )
    for group in args.groups.split(","):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        proposal = Proposal()
        steps = make_steps(group, proposal, S, K)
        if args.contenders:
            wanted = set(args.contenders.split(",")) | {"hand"}
            steps = {n: f for n, f in steps.items() if n in wanted}
        inputs = group_inputs(group)
        if args.profile:
            if args.profile not in steps:
                continue
            step = steps[args.profile]
            for _ in range(5):
                step(next(inputs))
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.profile_steps):
                step(next(inputs))
            profiler.disable()
            stats = pstats.Stats(profiler, stream=sys.stdout)
            stats.sort_stats("tottime").print_stats(40)
            stats.sort_stats("cumulative").print_stats(60)
            continue
        clock = time.thread_time if args.clock == "cpu" else time.perf_counter
        ms, ratios, spread, block = time_group(
            steps, inputs, args.rounds, args.block_seconds, clock
        )
        print(f"\n## {group} ({block} steps per block)\n")
        print("| contender | ms/step | ratio to hand (median, min–max over rounds) |")
        print("|---|---:|---:|")
        for name in steps:
            lo, hi = spread[name]
            print(
                f"| {name}: {LABELS[name]} | {ms[name]:.2f} | **{ratios[name]:.2f}** "
                f"({lo:.2f}–{hi:.2f}) |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
