# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Data-parallel reweighted wake-sleep with torch.distributed: a sigmoid belief net on binarized
8x8 digits, trained on several processes with DistributedDataParallel (DDP).

    torchrun --nproc_per_node 2 tutorials/distributed_rws.py --steps 200

(``python tutorials/distributed_rws.py`` runs it as one process.) Backend gloo on CPU, nccl
when CUDA is available (one GPU per process). Recipe:

1. ``loss_module = RWS(...)(sbn.model, sbn.guide)`` is Pyro's ``ELBOModule``, an
   ``nn.Module`` whose ``forward(*args)`` is ``differentiable_loss(model, guide, *args)``.
   Here model and guide are methods of one ``nn.Module``; the loss module registers that
   module, so ``loss_module.parameters()`` holds its parameters and DDP synchronizes them.
2. Each process draws its particles independently: seed with ``seed + rank`` (DDP broadcasts
   rank 0's initial parameters, so the initialization needs no care).
3. Each process gets its own shard of each batch (``DistributedSampler``) and the model declares
   the full data size with a subsampled plate, ``pyro.plate("data", N, subsample_size=B)``:
   each process's loss is then an unbiased estimate of the whole objective and DDP's *average*
   of the gradients is the gradient of the union batch (world_size * B datapoints, scale N/(wB)).
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import pyro
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pyro_rws import RWS, log_evidence
from pyro_rws.examples.data import load_digits
from pyro_rws.examples.sbn import SBN


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="datapoints per process")
    parser.add_argument("--num-particles", type=int, default=10, help="K, particles per datapoint")
    parser.add_argument("--latent-dims", default="32", help="latent layer sizes, e.g. 32,16")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0, help="process r seeds with seed + r")
    parser.add_argument("--backend", default=None, help="default: nccl with CUDA, else gloo")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--eval-particles", type=int, default=100, help="K for the test bound")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(args) -> None:
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if "RANK" not in os.environ:  # started with plain `python`: one process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group(backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # one core per process

    train, test = load_digits()
    num_data = len(train)
    latent_dims = tuple(int(d) for d in args.latent_dims.split(","))
    torch.manual_seed(args.seed)
    sbn = SBN(train.shape[1], latent_dims).to(device)

    # model and guide are methods of sbn: the loss module registers sbn's parameters
    loss_module = RWS(num_particles=args.num_particles)(sbn.model, sbn.guide)
    ddp = DistributedDataParallel(loss_module, device_ids=[device] if backend == "nccl" else None)
    optim = torch.optim.Adam(ddp.parameters(), lr=args.lr)

    # Independent particles on every process (after DDP broadcast rank 0's parameters).
    pyro.set_rng_seed(args.seed + rank)
    # The same seed on every rank: the shards of an epoch are a partition of the data.
    sampler = DistributedSampler(TensorDataset(train), seed=args.seed, drop_last=True)
    loader = DataLoader(TensorDataset(train), args.batch_size, sampler=sampler, drop_last=True)
    if rank == 0:
        processes = f"{world_size} process{'es' if world_size > 1 else ''}"
        print(
            f"{processes} ({backend}), {num_data} training images, "
            f"{world_size} x {args.batch_size} per step, K = {args.num_particles}, "
            f"SBN 64-{'-'.join(map(str, latent_dims))}",
            flush=True,
        )

    step, epoch, start = 0, 0, time.perf_counter()
    while step < args.steps:
        sampler.set_epoch(epoch)
        for (x,) in loader:
            # each process: -(N/B) sum over its shard of the per-image IW bound
            loss = ddp(x.to(device), num_data=num_data)
            optim.zero_grad()
            loss.backward()  # DDP averages the gradients over the processes
            optim.step()
            step += 1
            if step % args.log_every == 0 or step == args.steps:
                mean = loss.detach().clone()
                dist.all_reduce(mean)  # a sum (gloo has no AVG)
                mean /= world_size
                if rank == 0:
                    print(
                        f"step {step:4d}  loss {mean.item():10.1f}  "
                        f"bound per image {-mean.item() / num_data:8.3f} nats",
                        flush=True,
                    )
            if step == args.steps:
                break
        epoch += 1

    # Held-out bound, each process on its share of the test images.
    with torch.no_grad():
        mine = test[rank::world_size].to(device)
        bound = log_evidence(sbn.model, sbn.guide, mine, num_particles=args.eval_particles)
        total = torch.stack([bound.sum(), torch.tensor(float(len(mine)), device=device)])
        dist.all_reduce(total)
    if rank == 0:
        print(
            f"test log p(x) >= {(total[0] / total[1]).item():.3f} nats per image "
            f"(K = {args.eval_particles}), {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
