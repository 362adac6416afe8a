# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Data-parallel training with torch.distributed: two gloo processes on loopback, each holding half
of a batch, with the same fixed particle draws as one process holding the whole batch.

With the full data size declared by a subsampled plate (``SBN.model(x, num_data=N)``), each
process's loss is an unbiased estimate of the whole objective, and DistributedDataParallel's
*average* of the per-process gradients equals, to rounding error, the single-process gradient on
the union of the shards (scale N/B). Without a subsampled plate (the plate has the size of the
shard) the average is the whole batch's gradient divided by the number of processes.

The guide's draws are fixed by replaying precomputed values of shape (K, B, H), and the model's
fantasies of the sleep phase by an outermost handler; each process takes the rows of its own
shard. Weights are per datapoint, so a datapoint's terms depend on its own draws only: that is
what makes sharding exact, and what these tests check for every loss.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from discrete import FixFantasies, fixed_trace
from losses import BY_NAME, LOSSES
from torch.nn.parallel import DistributedDataParallel

from pyro_rws import RWS
from pyro_rws.examples.sbn import SBN

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available",
)

WORLD_SIZE = 2
NUM_DATA = 40  # N, the full data size declared by the subsampled plate
BATCH = 8  # B, the union of the shards; each process holds B / 2 rows
X_DIM, LATENT_DIMS = 6, (4, 3)
K = 5
TIMEOUT = 60.0  # seconds, for the whole spawn (it takes a few)

# name -> (loss factory, num_data, find_unused_parameters): every loss of tests/losses.py with
# a subsampled plate, and RWS with a plate of the shard's size too. A loss without wake-theta
# (SleepPhaseLoss) gives the model's parameters no gradient, which DistributedDataParallel must
# be told.
CASES = {
    spec.name: (partial(spec.make, num_particles=K), NUM_DATA, not spec.has_wake_theta)
    for spec in LOSSES
} | {"rws-1-full-plate": (partial(BY_NAME["rws-1"].make, num_particles=K), None, False)}


def make_inputs() -> dict:
    """Initial parameters, a batch, K guide draws per datapoint and one fantasy per datapoint."""
    gen = torch.Generator().manual_seed(0)
    sbn = SBN(X_DIM, LATENT_DIMS).double()
    with torch.no_grad():
        for p in sbn.parameters():
            p.normal_(0.0, 0.5, generator=gen)

    def bits(*shape):
        return torch.randint(0, 2, shape, generator=gen).double()

    layers = list(enumerate(LATENT_DIMS, start=1))
    return {
        "state": sbn.state_dict(),
        "x": bits(BATCH, X_DIM),
        # the wake phase's K particles, (K, B, H) per layer
        "draws": {f"h{layer}": bits(K, BATCH, dim) for layer, dim in layers},
        # the sleep phase's fantasies (x, h) ~ p, one per datapoint: (1, B, dim)
        "fantasies": {"x": bits(1, BATCH, X_DIM)}
        | {f"h{layer}": bits(1, BATCH, dim) for layer, dim in layers},
    }


def shard(rank: int, world_size: int = WORLD_SIZE) -> slice:
    size = BATCH // world_size
    return slice(rank * size, (rank + 1) * size)


def rows_of(values: dict, rows: slice) -> dict:
    """The datapoints ``rows`` of values shaped (particles, batch, dim)."""
    return {name: value[:, rows] for name, value in values.items()}


def with_draws(guide, draws: dict):
    """``guide`` with every latent replayed from ``draws``."""
    return poutine.replay(guide, trace=fixed_trace(**draws))


def loss_module(sbn: SBN, loss, draws: dict | None = None):
    """Pyro's ELBOModule for ``loss``, with the SBN's parameters registered on it."""
    guide = sbn.guide if draws is None else with_draws(sbn.guide, draws)
    return loss(sbn.model, guide)  # sbn.model is a method of sbn: sbn is registered


def grads(module: torch.nn.Module) -> dict:
    """The gradients of the parameters that have one (SleepPhaseLoss trains the guide only)."""
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def step(module, inputs: dict, rows: slice, num_data):
    """One forward and backward pass on ``rows`` of the batch, with their fixed draws."""
    with FixFantasies(rows_of(inputs["fantasies"], rows)):
        loss = module(inputs["x"][rows], num_data=num_data)
    loss.backward()
    return loss.detach()


# --------------------------------------------------------------------------------------------
# the processes
# --------------------------------------------------------------------------------------------
def _worker(rank: int, world_size: int, port: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=TIMEOUT),
    )
    try:
        inputs = torch.load(os.path.join(directory, "inputs.pt"))
        rows = shard(rank, world_size)
        results = {}
        for name, (make_loss, num_data, find_unused) in CASES.items():
            pyro.clear_param_store()
            sbn = SBN(X_DIM, LATENT_DIMS).double()
            sbn.load_state_dict(inputs["state"])
            module = loss_module(sbn, make_loss(), rows_of(inputs["draws"], rows))
            ddp = DistributedDataParallel(module, find_unused_parameters=find_unused)
            loss = step(ddp, inputs, rows, num_data)
            results[name] = {"loss": loss, "grads": grads(module)}
            # a second step fails if the reducer waited for a parameter without gradient
            module.zero_grad()
            step(ddp, inputs, rows, num_data)
        torch.save(results, os.path.join(directory, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    """Runs the two processes once for all tests; returns the inputs and their results."""
    directory = tmp_path_factory.mktemp("distributed")
    inputs = make_inputs()
    torch.save(inputs, directory / "inputs.pt")
    context = mp.start_processes(
        _worker,
        args=(WORLD_SIZE, free_port(), str(directory)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD_SIZE} gloo processes did not finish in {TIMEOUT} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join()
    results = [torch.load(directory / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    return inputs, results


def single_process(inputs: dict, name: str, rows: slice = slice(None)):
    """Loss and gradients of one process without DDP on ``rows`` of the batch."""
    make_loss, num_data, _ = CASES[name]
    sbn = SBN(X_DIM, LATENT_DIMS).double()
    sbn.load_state_dict(inputs["state"])
    module = loss_module(sbn, make_loss(), rows_of(inputs["draws"], rows))
    loss = step(module, inputs, rows, num_data)
    return loss, grads(module)


def assert_close_dicts(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
def test_module_holds_model_and_guide_parameters():
    sbn = SBN(X_DIM, LATENT_DIMS)
    module = loss_module(sbn, RWS(num_particles=K))
    # model and guide are methods of sbn: loss(model, guide) registers sbn on the module
    assert set(module.parameters()) == set(sbn.parameters())
    assert len(list(module.parameters())) == len(list(sbn.parameters()))


@pytest.mark.parametrize("name", list(CASES))
def test_averaged_gradient_equals_whole_batch_gradient(distributed_results, name):
    inputs, results = distributed_results
    loss, expected = single_process(inputs, name)
    if CASES[name][1] is None:
        # the plate has the shard's size: the average is 1/world_size of the whole-batch sum
        loss = loss / WORLD_SIZE
        expected = {n: g / WORLD_SIZE for n, g in expected.items()}
    if not BY_NAME[name.removesuffix("-full-plate")].has_wake_theta:  # only the guide learns
        assert expected and all(".encoders." in n for n in expected)
    for rank in range(WORLD_SIZE):  # DDP left the averaged gradient on every process
        assert_close_dicts(results[rank][name]["grads"], expected)
    # each process's own loss: their mean is the whole batch's loss (same convention)
    mean_loss = sum(results[rank][name]["loss"] for rank in range(WORLD_SIZE)) / WORLD_SIZE
    torch.testing.assert_close(mean_loss, loss, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_shards_differ(distributed_results, name):
    """Not vacuous: the two processes' own gradients differ before averaging."""
    inputs, _ = distributed_results
    _, first = single_process(inputs, name, shard(0))
    _, second = single_process(inputs, name, shard(1))
    assert any(not torch.allclose(first[n], second[n]) for n in first)


@pytest.mark.slow
def test_tutorial_runs_with_torchrun():
    """tutorials/distributed_rws.py on two gloo processes, as README shows (a few steps)."""
    script = Path(__file__).resolve().parents[1] / "tutorials" / "distributed_rws.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(script), "--steps", "20", "--log-every", "10"]
    command += ["--eval-particles", "10", "--backend", "gloo"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step   20" in done.stdout and "test log p(x) >=" in done.stdout, done.stdout
