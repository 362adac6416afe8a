# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
``refine_guide``'s settings on one trained guide: sbibm's slcp at 10⁴ simulations, the guide
trained once (``fit_guide``, as in ``sbibm_c2st.py``), then for each variant and observation a
refined copy, importance sampling and the C2ST against sbibm's reference posterior.

    python benchmarks/refine_particles.py --seed 1 \\
        --variants 0:0,100:300,1000:300,5000:300,1000:1000,1000:300:1e-3,1000:300:1e-4:500000

A variant is ``K:steps[:learning rate[:importance particles]]`` (defaults 1e-4 and 50,000;
``0:0`` is the guide without refinement). One JSON line per (variant, observation). Needs the
benchmark extra (sbibm); benchmarks/README.md section 12 has the results.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="0:0,100:300,1000:300")
    parser.add_argument("--observations", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--num-samples", type=int, default=2000)
    args = parser.parse_args(argv)

    import pyro
    import sbibm
    from sbibm_c2st import c2st_of, fit_pyro_rws, task_model

    import pyro_rws

    torch.set_num_threads(1)
    task = sbibm.get_task("slcp")
    model = task_model(task)
    # sbi's schedule, as the results in benchmarks/README.md were run (before the decays)
    _, guide, _, _ = fit_pyro_rws(model, 10000, args.seed, lr_decays=0)
    n = args.num_samples
    for variant in args.variants.split(","):
        k, steps, *rest = variant.split(":")
        k, steps = int(k), int(steps)
        lr = float(rest[0]) if rest else 1e-4
        particles = int(rest[1]) if len(rest) > 1 else 50000
        for i in args.observations:
            x_o = task.unflatten_data(task.get_observation(i))
            pyro.set_rng_seed(args.seed * 100 + i)
            start = time.perf_counter()
            refined = guide
            if steps:
                refined = pyro_rws.refine_guide(
                    model,
                    guide,
                    observations={"data": x_o},
                    num_steps=steps,
                    num_particles=k,
                    learning_rate=lr,
                    progress=False,
                )
            seconds = time.perf_counter() - start
            post = pyro_rws.importance_posterior(
                model, refined, observations={"data": x_o}, num_particles=particles
            )
            samples = post.sample(n)["parameters"].reshape(n, -1)
            ess = float(post.effective_sample_size.reshape(-1)[0]) / particles
            row = dict(
                seed=args.seed,
                variant=variant,
                observation=i,
                particles=particles,
                c2st=c2st_of(task, i, samples, n),
                ess_fraction=ess,
                refine_s=seconds,
            )
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
