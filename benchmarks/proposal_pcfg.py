# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The ``pcfg`` part of ``proposal_compare.py`` (issue 22): on rrws's astronomers grammar, the
rrws-style hand-written inference network (``PCFGGuide``) against ``AutoAmortizedProposal``
(``pyro_rws.examples.pcfg.auto_proposal``: a GRU sentence embedding per sentence as
``embedding_net``, ``variable_shape=True``, one head per tree and non-terminal through
``address=nonterminal_address``, no standardization). Same seeds, iterations, particles, batch
(2 fresh sentences per iteration, as rrws) and optimizer (``torch.optim.Adam``, rrws's lr 1e-3)
for both guides, in two settings:

- ``ic``: inference compilation, the true model fixed: ``SleepPhaseLoss(K,
  vectorize_particles=False)`` steps on the guide only;
- ``rws``: wake-wake ``RWS(K, insomnia=1, vectorize_particles=False)``, model and guide learned
  from data (rrws's ``ww``).

Metrics: inference error ``-(1/N) sum log q(z_n|x_n)`` on one fixed set of N = 100 draws
``(z_n, x_n)`` from the true model (the same for both guides and every evaluation), scored on
batches of 2 as in training (``batch_inference_error``); model error (mean KL over
non-terminals) for ``rws``; CPU seconds per training iteration (``time.process_time``, one
thread).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _run(guide_name, setting, num_particles, steps, seed, eval_every, data, auto_kwargs):
    import pyro

    from pyro_rws import RWS, SleepPhaseLoss
    from pyro_rws.examples import pcfg

    grammar = pcfg.Grammar.from_dict(pcfg.ASTRONOMERS)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = pcfg.PCFG(grammar)  # first, as pcfg.train: the same initial model for both guides
    if guide_name == "hand-written":
        module = pcfg.PCFGGuide(grammar)
        guide = module.guide
    else:
        module = guide = pcfg.auto_proposal(model, **auto_kwargs)
    true_model = pcfg.PCFG(grammar, probs=grammar.production_probs)
    sequential = {"vectorize_particles": False, "max_plate_nesting": 0}
    if setting == "ic":
        model = true_model
        loss = SleepPhaseLoss(num_particles, **sequential)
    else:
        loss = RWS(num_particles, insomnia=1.0, **sequential)
    with torch.random.fork_rng():  # the same training sentences for both guides
        torch.manual_seed(seed + 1000)
        batches = [[true_model.sample()[1] for _ in range(2)] for _ in range(steps)]
        if guide_name != "hand-written":  # create the addresses for torch.optim (see the guide)
            guide.prepare(batches[0], num_simulations=200)
    params = list(module.parameters()) + (list(model.parameters()) if setting == "rws" else [])
    optimizer = torch.optim.Adam(params, lr=1e-3)
    if guide_name != "hand-written":
        guide.on_new_address = lambda name, ps: optimizer.add_param_group({"params": ps})
    curves = {"iterations": [], "inference_error": [], "model_error": []}

    def record(iteration):
        curves["iterations"].append(iteration)
        with torch.random.fork_rng():
            curves["inference_error"].append(pcfg.batch_inference_error(guide, true_model, data))
        curves["model_error"].append(pcfg.model_error(model, true_model))

    cpu = 0.0
    for iteration in range(steps):
        sentences = batches[iteration]
        start = time.process_time()
        optimizer.zero_grad()
        loss.loss_and_grads(model.model, guide, sentences)
        optimizer.step()
        cpu += time.process_time() - start
        if iteration % eval_every == 0:
            record(iteration)
    record(steps)
    out = dict(curves, cpu_seconds_per_step=cpu / steps, seed=seed)
    if guide_name != "hand-written":
        out["addresses"] = guide.addresses
    out["num_parameters"] = sum(p.numel() for p in module.parameters())
    return out


def part_pcfg(args) -> dict:
    import pyro

    from pyro_rws.examples import pcfg

    torch.set_num_threads(1)
    grammar = pcfg.Grammar.from_dict(pcfg.ASTRONOMERS)
    pyro.set_rng_seed(12345)  # the fixed evaluation draws
    true_model = pcfg.PCFG(grammar, probs=grammar.production_probs)
    data = [true_model.sample() for _ in range(100)]
    auto_kwargs = {"hidden_dim": 100} | json.loads(args.auto)
    path = RESULTS / f"proposal_pcfg{args.tag}.json"
    out = {
        "grammar": "astronomers",
        "steps": args.steps,
        "particles": args.particles,
        "batch": 2,
        "lr": 1e-3,
        "eval_samples": len(data),
        "auto_kwargs": auto_kwargs,
        "runs": {},
    }
    for setting in args.settings:
        for seed in args.seeds:
            for name in args.guides:
                result = _run(
                    name,
                    setting,
                    args.particles,
                    args.steps,
                    seed,
                    args.eval_every,
                    data,
                    auto_kwargs if name == "auto" else {},
                )
                out["runs"].setdefault(setting, {}).setdefault(name, []).append(result)
                print(
                    setting,
                    name,
                    seed,
                    f"inference error {result['inference_error'][-1]:.3f}",
                    f"model error {result['model_error'][-1]:.4f}",
                    f"{result['cpu_seconds_per_step']:.3f} cpu s/step",
                    flush=True,
                )
                RESULTS.mkdir(exist_ok=True)
                path.write_text(json.dumps(out, indent=1))  # partial results survive
    return out


def table_lines(load) -> list[str]:
    """The section of proposal_compare.md (``load(name)``: a results json or None)."""
    parts = [load(f"pcfg{tag}") for tag in ("", "_ic", "_rws", "_ic3")]  # (runs made apart)
    parts = [p for p in parts if p and p["runs"]]
    if not parts:
        return []
    runs: dict = {}
    for part in parts:
        for setting, guides in part["runs"].items():
            for name, seeds in guides.items():
                runs.setdefault(setting, {}).setdefault(name, []).extend(seeds)
    r = dict(parts[0], runs=runs)
    lines = [
        f"## PCFG (astronomers): rrws's hand-written inference network against "
        f"AutoAmortizedProposal, {r['steps']} iterations, K = {r['particles']}, batch "
        f"{r['batch']}, Adam {r['lr']}",
        "",
        f"Inference error: -mean log q(z|x) over the same {r['eval_samples']} draws from the "
        "true model (lower is better); model error: mean KL over non-terminals. Final values "
        "per seed, and (late) the mean over the evaluations in the second half of training, "
        "which the wake-wake curves need (they jump as the guide follows the learned model); "
        "the ratio is auto / hand-written of the late means (the target of issue 22: within "
        "10 %).",
        "",
        "| setting | seed | inference error hand-written: final, late | auto: final, late | "
        "ratio (late) | model error hand-written: final, late | auto: final, late | "
        "CPU s / step hand / auto |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"ic": "IC (SleepPhaseLoss, true model)", "rws": "RWS wake-wake (insomnia 1)"}

    def late(run, key):
        values = [
            v for i, v in zip(run["iterations"], run[key], strict=True) if 2 * i >= r["steps"]
        ]
        return run[key][-1], sum(values) / len(values)

    for setting, runs in r["runs"].items():
        hand, auto = runs.get("hand-written", []), runs.get("auto", [])
        for h, a in zip(hand, auto, strict=False):
            (ie_h, ie_hl), (ie_a, ie_al) = late(h, "inference_error"), late(a, "inference_error")
            me = "– | –"
            if setting == "rws":
                (me_h, me_hl), (me_a, me_al) = late(h, "model_error"), late(a, "model_error")
                me = f"{me_h:.4f}, {me_hl:.4f} | {me_a:.4f}, {me_al:.4f}"
            lines.append(
                f"| {names.get(setting, setting)} | {h['seed']} | {ie_h:.2f}, {ie_hl:.2f} | "
                f"{ie_a:.2f}, {ie_al:.2f} | {ie_al / ie_hl:.2f} | {me} | "
                f"{h['cpu_seconds_per_step']:.3f} / {a['cpu_seconds_per_step']:.3f} |"
            )
    lines += ["", "Curves (inference error at the evaluated iterations, mean over seeds):", ""]
    for setting, runs in r["runs"].items():
        for name, seeds in runs.items():
            its = seeds[0]["iterations"]
            mean = [
                sum(s["inference_error"][i] for s in seeds) / len(seeds) for i in range(len(its))
            ]
            cells = ", ".join(f"{i}: {m:.1f}" for i, m in zip(its, mean, strict=True))
            lines.append(f"- {setting}, {name}: {cells}")
    return lines + [""]
