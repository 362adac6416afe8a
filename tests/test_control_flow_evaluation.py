# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
:func:`log_evidence` and :func:`importance_posterior` with one run per particle
(``vectorize_particles=False``) on programs with stochastic control flow: exact log-weights of
every particle against an independent enumeration, the evidence and the posterior of the
control-flow variable against exact values (Monte Carlo tolerances from exact variances or
standard errors), per-datapoint weights along a sequential plate, resampling of whole runs,
the vectorized path's error, and the examples (tutorial 3's simulator, the PCFG) with their hand
guides and :class:`~pyro_rws.AutoAmortizedProposal`.
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conjugate import data, fixed_model, guide

from pyro_rws import AutoAmortizedProposal, importance_posterior, log_evidence
from pyro_rws.evaluation import chunk_log_weights
from pyro_rws.examples import objects, pcfg

pytestmark = pytest.mark.usefixtures("float64")

# n ~ Cat(P_N); b_i ~ Bernoulli(P_B), i < n; x ~ N(n + 2 * sum(b), 0.7)
P_N, P_B, SD = (0.3, 0.45, 0.25), 0.4, 0.7
# the guide: n ~ Cat(Q_N); b_i ~ Bernoulli(Q_B[i])
Q_N, Q_B = (0.2, 0.3, 0.5), (0.7, 0.5)


def model(x):
    n = pyro.sample("n", dist.Categorical(torch.tensor(P_N)))
    total = torch.zeros(())
    for i in range(int(n)):
        total = total + pyro.sample(f"b_{i}", dist.Bernoulli(torch.tensor(P_B)))
    pyro.sample("x", dist.Normal(n + 2 * total, SD), obs=x)


def cf_guide(x):
    n = pyro.sample("n", dist.Categorical(torch.tensor(Q_N)))
    for i in range(int(n)):
        pyro.sample(f"b_{i}", dist.Bernoulli(torch.tensor(Q_B[i])))


def configs():
    for n in range(3):
        for bs in itertools.product((0, 1), repeat=n):
            yield n, bs


def log_p(x: float, n: int, bs) -> float:
    lp = math.log(P_N[n]) + sum(math.log(P_B if b else 1 - P_B) for b in bs)
    mean = n + 2 * sum(bs)
    return lp - 0.5 * ((x - mean) / SD) ** 2 - math.log(SD * math.sqrt(2 * math.pi))


def log_q(n: int, bs) -> float:
    return math.log(Q_N[n]) + sum(math.log(Q_B[i] if b else 1 - Q_B[i]) for i, b in enumerate(bs))


def exact(x: float):
    """p(x), E_q[w^2] and p(n | x), by enumeration."""
    evidence, second, post_n = 0.0, 0.0, [0.0, 0.0, 0.0]
    for n, bs in configs():
        p, q = math.exp(log_p(x, n, bs)), math.exp(log_q(n, bs))
        evidence += p
        second += p * p / q
        post_n[n] += p
    return evidence, second, [p / evidence for p in post_n]


def values_of(particle: dict):
    n = int(particle["n"])
    return n, tuple(int(particle[f"b_{i}"]) for i in range(n))


X = torch.tensor(2.5)


def test_every_log_weight_is_exact():
    """Each sequential particle's log w equals log p(x, z) - log q(z) of its own values."""
    runs, lw, _ = chunk_log_weights(model, cf_guide, (X,), {}, 200, 0, None, "", False)
    assert lw.shape == (200,) and len(runs) == 200
    seen = set()
    for (_, guide_trace), w in zip(runs, lw, strict=True):
        latent = {k: s["value"] for k, s in guide_trace.nodes.items() if s["type"] == "sample"}
        n, bs = values_of(latent)
        assert set(latent) == {"n"} | {f"b_{i}" for i in range(n)}
        seen.add((n, bs))
        assert abs(float(w) - (log_p(2.5, n, bs) - log_q(n, bs))) < 1e-12
    assert len(seen) == 7  # every configuration was met


def test_evidence_is_unbiased_within_its_standard_error():
    K = 1000
    estimate = log_evidence(model, cf_guide, X, num_particles=K, vectorize_particles=False)
    assert estimate.shape == ()
    evidence, second, _ = exact(2.5)
    # mean of K iid weights: standard error sqrt(Var w / K), Var w = E[w^2] - p(x)^2 (exact)
    se = math.sqrt((second - evidence**2) / K)
    assert abs(math.exp(float(estimate)) - evidence) < 4 * se, (estimate, evidence, se)


def test_posterior_of_the_control_flow_variable():
    K = 1000
    post = importance_posterior(model, cf_guide, X, num_particles=K, vectorize_particles=False)
    _, _, post_n = exact(2.5)
    wbar = post.log_weights.exp()
    ns = torch.tensor([values_of(p)[0] for p in post.particles])
    assert post.latents is None and len(post.particles) == K
    for n in range(3):
        ind = (ns == n).to(wbar)
        estimate = float((wbar * ind).sum())
        se = float((wbar.square() * (ind - estimate).square()).sum().sqrt())  # delta method
        assert abs(estimate - post_n[n]) < 4.5 * se + 1e-3, (n, estimate, post_n[n], se)
    # resampled runs: each draw is one complete run, in proportion to the weights
    draws = post.sample_particles(4000, generator=torch.Generator().manual_seed(1))
    counts = [0, 0, 0]
    for draw in draws:
        n, _ = values_of(draw)
        assert set(draw) == {"n"} | {f"b_{i}" for i in range(n)}
        counts[n] += 1
    for n in range(3):
        estimate = float((wbar * (ns == n).to(wbar)).sum())
        freq, se = counts[n] / 4000, math.sqrt(estimate * (1 - estimate) / 4000)
        assert abs(freq - estimate) < 4.5 * se + 1e-9
    with pytest.raises(ValueError, match="sample_particles"):
        post.sample(10)


def test_sequential_chunks_draw_the_same_particles():
    pyro.set_rng_seed(4)
    a = log_evidence(model, cf_guide, X, num_particles=50, chunk_size=50, vectorize_particles=False)
    pyro.set_rng_seed(4)
    b = log_evidence(model, cf_guide, X, num_particles=50, chunk_size=7, vectorize_particles=False)
    pyro.set_rng_seed(4)
    post = importance_posterior(
        model, cf_guide, X, num_particles=50, chunk_size=7, vectorize_particles=False
    )
    assert torch.equal(a, b) and torch.equal(post.log_evidence, a)


def test_vectorized_chunks_of_one_equal_sequential_particles():
    """A fixed-structure model: vectorized chunks of one particle draw what sequential runs do."""
    x = data()
    results = []
    for vectorize, chunk in ((True, 1), (False, 10)):
        pyro.set_rng_seed(5)
        post = importance_posterior(
            fixed_model,
            guide,
            x,
            num_particles=10,
            chunk_size=chunk,
            vectorize_particles=vectorize,
        )
        results.append(post)
    vec, seq = results
    assert torch.equal(vec.log_weights, seq.log_weights)
    # (the running log-sum-exp adds the chunks in another order: equal to rounding)
    torch.testing.assert_close(vec.log_evidence, seq.log_evidence, rtol=1e-14, atol=1e-14)
    assert seq.latents["z"].shape == vec.latents["z"].shape == (10, 4)
    assert torch.equal(vec.latents["z"], seq.latents["z"])
    g = torch.Generator()
    assert torch.equal(vec.sample(20, g.manual_seed(0))["z"], seq.sample(20, g.manual_seed(0))["z"])


def test_vectorizing_control_flow_is_an_error_that_says_what_to_do():
    with pytest.raises(Exception) as info:
        log_evidence(model, cf_guide, X, num_particles=10)
    assert "vectorize_particles=False" in "".join(getattr(info.value, "__notes__", []))


def per_datapoint_model(xs):
    for i in pyro.plate("data", len(xs)):
        n = pyro.sample(f"n{i}", dist.Categorical(torch.tensor(P_N)))
        total = torch.zeros(())
        for j in range(int(n)):
            total = total + pyro.sample(f"b{i}_{j}", dist.Bernoulli(torch.tensor(P_B)))
        pyro.sample(f"x{i}", dist.Normal(n + 2 * total, SD), obs=xs[i])


def per_datapoint_guide(xs):
    for i in pyro.plate("data", len(xs)):
        n = pyro.sample(f"n{i}", dist.Categorical(torch.tensor(Q_N)))
        for j in range(int(n)):
            pyro.sample(f"b{i}_{j}", dist.Bernoulli(torch.tensor(Q_B[j])))


def test_sequential_plate_weights_and_draws_per_datapoint():
    xs = torch.tensor([0.2, 3.1])
    K = 500
    post = importance_posterior(
        per_datapoint_model, per_datapoint_guide, xs, num_particles=K, vectorize_particles=False
    )
    assert post.log_weights.shape == (K, 2) and post.log_evidence.shape == (2,)
    wbar = post.log_weights.exp()
    for i, x in enumerate(xs.tolist()):
        evidence, second, post_n = exact(x)
        se = math.sqrt((second - evidence**2) / K)
        assert abs(math.exp(float(post.log_evidence[i])) - evidence) < 4 * se
        ns = torch.tensor([int(p[f"n{i}"]) for p in post.particles])
        for n in range(3):
            ind = (ns == n).to(wbar)
            estimate = float((wbar[:, i] * ind).sum())
            se_n = float((wbar[:, i].square() * (ind - estimate).square()).sum().sqrt())
            assert abs(estimate - post_n[n]) < 4.5 * se_n + 1e-3
    # a draw takes each datapoint's sites from the particle drawn for that datapoint
    for draw in post.sample_particles(200):
        for i in range(2):
            n = int(draw[f"n{i}"])
            assert {k for k in draw if k.startswith(f"b{i}_")} == {f"b{i}_{j}" for j in range(n)}
    with pytest.raises(ValueError, match="sample_particles"):
        post.sample(3)


def test_tutorial_3_simulator_with_hand_and_automatic_guides():
    signal, n_true, _ = objects.simulate(1, seed=3)[0]
    hand = objects.Proposal(hidden=16)
    auto = AutoAmortizedProposal(objects.simulator, hidden_dim=16, num_standardize=10)
    for g in (hand.guide, auto):
        lz = log_evidence(
            objects.simulator, g, signal, num_particles=20, chunk_size=8, vectorize_particles=False
        )
        assert lz.shape == () and math.isfinite(float(lz))
        post = importance_posterior(
            objects.simulator, g, signal, num_particles=20, chunk_size=8, vectorize_particles=False
        )
        for draw in post.sample_particles(30):
            n = int(draw["n"])
            assert set(draw) == {"n"} | {f"loc_{i}" for i in range(n)}


def test_pcfg_with_hand_and_automatic_guides():
    grammar = pcfg.Grammar.from_dict(pcfg.ASTRONOMERS)
    model = pcfg.PCFG(grammar, max_depth=6)
    sentences = [model.sample()[1] for _ in range(2)]
    hand = pcfg.PCFGGuide(grammar, 8, 8, 6)
    auto = AutoAmortizedProposal(model.model, hidden_dim=8, num_standardize=0)
    for g in (hand.guide, auto):
        lz = log_evidence(model.model, g, sentences, num_particles=6, vectorize_particles=False)
        assert lz.shape == (2,)
        post = importance_posterior(
            model.model, g, sentences, num_particles=6, vectorize_particles=False
        )
        assert post.log_weights.shape == (6, 2)
        for draw in post.sample_particles(5):
            assert {"t0/S", "t1/S"} <= set(draw)


@pytest.mark.parametrize("local", [False, True])
def test_automatic_proposal_in_a_plate_is_consistent(local):
    """
    Issue 22 (b): with ``local_observations=False`` a local latent inside a model plate gets one
    proposal for every element (coarse: it cannot follow each x_i); by default each element's
    proposal also reads its own x_i. Either is a valid proposal: the per-datapoint evidence is
    consistent (tolerance from the effective sample size).
    """

    def plated(x):
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    x = torch.tensor([-1.5, 0.2, 2.0])
    guide = AutoAmortizedProposal(plated, hidden_dim=8, num_standardize=0, local_observations=local)
    fn = pyro.poutine.trace(guide).get_trace(x).nodes["z"]["fn"]
    assert fn.batch_shape == (3,)
    shared = torch.equal(fn.loc, fn.loc[:1].expand(3)) and torch.equal(
        fn.scale, fn.scale[:1].expand(3)
    )
    assert shared != local
    K = 4000
    post = importance_posterior(plated, guide, x, num_particles=K, chunk_size=1000)
    exact_lz = dist.Normal(0.0, math.sqrt(1.25)).log_prob(x)
    ess = post.effective_sample_size
    assert post.log_evidence.shape == (3,) and bool((ess > 50).all())
    # delta method: sd of log p_hat is about sqrt(1 / ESS - 1 / K)
    tol = 4 * (1 / ess - 1 / K).clamp_min(0).sqrt() + 1e-3
    assert bool(((post.log_evidence - exact_lz).abs() < tol).all()), (post.log_evidence, exact_lz)


def test_other_paths_of_sequential_particles():
    # vectorized particles: sample_particles slices the stacked latents
    post = importance_posterior(fixed_model, guide, data(), num_particles=20)
    draws = post.sample_particles(5)
    assert len(draws) == 5 and draws[0]["z"].shape == (4,)
    # keep_particles=False: weights only
    post = importance_posterior(
        model, cf_guide, X, num_particles=10, keep_particles=False, vectorize_particles=False
    )
    assert post.particles is None and post.latents is None and post.log_weights.shape == (10,)
    with pytest.raises(ValueError, match="keep_particles=True"):
        post.sample_particles(2)

    # a simulator without a likelihood: the guide's runs, unweighted
    def no_likelihood(x):
        n = pyro.sample("n", dist.Categorical(torch.tensor(P_N)))
        total = torch.zeros(())
        for i in range(int(n)):
            total = total + pyro.sample(f"b_{i}", dist.Bernoulli(torch.tensor(P_B)))
        pyro.sample("x", dist.Delta(n + 2 * total), obs=x)

    with pytest.warns(UserWarning, match="cannot reweight"):
        post = importance_posterior(
            no_likelihood, cf_guide, X, num_particles=30, vectorize_particles=False
        )
    assert not post.reweighted and len(post.particles) == 30
    assert all(set(d) == {"n"} | {f"b_{i}" for i in range(int(d["n"]))} for d in post.particles)
