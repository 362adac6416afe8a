# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Hybrid memoised wake-sleep step by step, on recorded particles: against the math of
pyro_rws/memoised.py (fast), and against the authors' code (github.com/tuananhle7/hmws),
``cmws.losses.get_cmws_5_loss`` (the HMWS variant its time-series experiments run), on identical
particles and memory, gradient for gradient. The latter needs a checkout of hmws: set
``HMWS_PATH`` to its root (nothing of it is in this repository); it is skipped otherwise, and
marked slow.

The model: ``d ~ Categorical(theta)``, ``c ~ Normal(mu[d], 1)``, ``x ~ Normal(c, 0.5)`` per
datapoint; the guide ``q(d | x) q(c | d, x)`` with separate discrete and continuous parameters.
Our guide records its draws; the hmws guide replays them in hmws's layout.

Agreement with hmws: the memory after the update, the model's gradient and the continuous
guide's gradient are equal. The discrete guide's gradient differs on purpose: hmws weights
``log q(d_m | x)`` by ``logsumexp_j v_mj`` of the normalized weights, we by ``sum_j v_mj``
(the memory element's share of the normalized weight, the HMWS paper's omega); the test checks
that hmws's discrete gradient is ours with that weight swapped, and that the two coincide for
one continuous particle (J = 1).
"""

from __future__ import annotations

import math
import os
import sys
import types

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_rws import MemoisedWakeSleep

pytestmark = pytest.mark.usefixtures("float64")

S, N, L, K = 4, 5, 2, 3
X = (-1.9, -0.4, 0.3, 1.1, 2.2)
THETA_PARAMS = ("theta", "mu")
DISCRETE_GUIDE = ("phi", "a")
CONTINUOUS_GUIDE = ("b", "e", "s")


def import_hmws():
    root = os.environ.get("HMWS_PATH")
    if not root or not os.path.isdir(os.path.join(root, "cmws")):
        pytest.skip("set HMWS_PATH to a checkout of github.com/tuananhle7/hmws")
    # import cmws.losses without cmws/__init__.py (which imports every example's dependencies)
    package = types.ModuleType("cmws")
    package.__path__ = [os.path.join(root, "cmws")]
    sys.modules.setdefault("cmws", package)
    for name in ("imageio",):  # imported by cmws.util, unused by the losses
        sys.modules.setdefault(name, types.ModuleType(name))
    import cmws.losses
    import cmws.memory

    return cmws


def model(x):
    theta = pyro.param("theta", lambda: torch.tensor([0.2, -0.1, 0.4, 0.0]))
    mu = pyro.param("mu", lambda: torch.linspace(-2.0, 2.0, S))
    with pyro.plate("data", len(x)):
        d = pyro.sample("d", dist.Categorical(logits=theta))
        c = pyro.sample("c", dist.Normal(mu[d], 1.0))
        pyro.sample("x", dist.Normal(c, 0.5), obs=x)


def params():
    store = pyro.get_param_store()
    return {n: store.get_param(n).unconstrained() for n in store.keys()}


def discrete_logits(p, x):
    return p["phi"] + p["a"] * x[:, None] * torch.arange(S, dtype=x.dtype)


def continuous_dist(p, x, d):
    return dist.Normal(p["b"][d] + p["e"] * x, p["s"].exp())


def make_guide(record):
    def guide(x):
        pyro.param("phi", lambda: torch.tensor([0.1, 0.3, -0.2, 0.0]))
        pyro.param("a", lambda: torch.tensor(0.3))
        pyro.param("b", lambda: torch.tensor([-1.5, -0.5, 0.5, 1.5]))
        pyro.param("e", lambda: torch.tensor(0.4))
        pyro.param("s", lambda: torch.tensor(-0.2))
        p = params()
        with pyro.plate("data", len(x)):
            d = pyro.sample("d", dist.Categorical(logits=discrete_logits(p, x)))
            c = pyro.sample("c", continuous_dist(p, x, d))
        record.append((d.detach(), c.detach()))

    return guide


class HmwsModel:
    def log_prob_discrete_continuous(self, d, c, obs):
        p = params()
        return (
            dist.Categorical(logits=p["theta"]).log_prob(d)
            + dist.Normal(p["mu"][d], 1.0).log_prob(c)
            + dist.Normal(c, 0.5).log_prob(obs)
        )


class HmwsGuide:
    """hmws's guide interface, replaying the draws of our guide."""

    def __init__(self, proposals, continuous):
        self.proposals, self.continuous = proposals, continuous

    def sample_discrete(self, obs, shape):
        assert tuple(shape) == (self.proposals.shape[0],)
        return self.proposals

    def sample_continuous(self, obs, d, shape):
        assert self.continuous.shape[1:] == d.shape
        return self.continuous

    def log_prob_discrete(self, obs, d):
        return dist.Categorical(logits=discrete_logits(params(), obs)).log_prob(d)

    def log_prob_continuous(self, obs, d, c):
        return continuous_dist(params(), obs, d).log_prob(c)


def hmws_memory(cmws, values):
    memory = cmws.memory.Memory.__new__(cmws.memory.Memory)
    memory.num_obs, memory.size = values.shape
    memory.memory_groups = [values.clone()]
    memory.num_groups = 1
    return memory


def one_step(J):
    """Warm up the memory, then one step whose particles are recorded."""
    x = torch.tensor(X)
    record = []
    guide = make_guide(record)
    loss = MemoisedWakeSleep(memory_size=L, num_particles=K, num_continuous_particles=J)
    with torch.no_grad():
        for _ in range(4):
            loss.loss(model, guide, x)
    before, valid, _ = loss.memory()
    assert valid.all()
    before = before["d"].clone()
    record.clear()
    surrogate = loss.differentiable_loss(model, guide, x)
    p = params()
    ours = dict(zip(NAMES, torch.autograd.grad(surrogate, [p[n] for n in NAMES]), strict=True))
    after = loss.memory()[0]["d"]
    proposals = record[0][0]  # (K, N)
    d_scored, c_scored = record[1]  # (C * J, N), candidate-major
    assert torch.equal(d_scored.view(L + K, J, N)[:, 0], torch.cat([before.T, proposals]))
    return x, p, surrogate, ours, before, after, proposals, c_scored


NAMES = THETA_PARAMS + DISCRETE_GUIDE + CONTINUOUS_GUIDE


@pytest.mark.parametrize("J", [1, 3])
def test_hybrid_step_is_the_stated_estimator(J):
    """Fast, no hmws: the memory update and every gradient against pyro_rws/memoised.py's math."""
    x, p, surrogate, ours, before, after, proposals, c_scored = one_step(J)
    C = L + K
    candidates = torch.cat([before.T, proposals])  # (C, N)
    c = c_scored.view(C, J, N)
    with torch.no_grad():
        log_w = HmwsModel().log_prob_discrete_continuous(candidates[:, None], c, x) - HmwsGuide(
            None, None
        ).log_prob_continuous(x, candidates[:, None], c)
        scores = torch.logsumexp(log_w, 1) - math.log(J)  # (C, N)
    for n in range(N):  # top-L distinct, the first copy's score counting
        first = {}
        for i in range(C):
            first.setdefault(int(candidates[i, n]), float(scores[i, n]))
        best = sorted(first, key=first.get, reverse=True)[:L]
        assert after[n].tolist() == best
    c_sel = _gathered(c_scored, after, before, proposals, J)  # (J, L, N)
    log_p = HmwsModel().log_prob_discrete_continuous(after.T[None], c_sel, x)
    log_q_c = HmwsGuide(None, None).log_prob_continuous(x, after.T[None], c_sel)
    log_q_d = HmwsGuide(None, None).log_prob_discrete(x, after.T)
    log_w = (log_p - log_q_c).detach()
    v = torch.softmax(log_w.reshape(J * L, N), 0).view(J, L, N)
    u = torch.softmax(log_w, 0)  # per memory element, over its J particles
    value = -(torch.logsumexp(log_w.reshape(J * L, N), 0) - math.log(J)).sum()
    assert surrogate.item() == pytest.approx(value.item(), rel=1e-12)
    expected = (
        -(v * log_p).sum() - (v.sum(0) * log_q_d).sum() - ((u * log_q_c).sum(0).mean(0)).sum()
    )
    grads = torch.autograd.grad(expected, [p[n] for n in NAMES])
    for n, g in zip(NAMES, grads, strict=True):
        assert torch.allclose(ours[n], g, rtol=1e-10, atol=1e-12), n


@pytest.mark.slow
@pytest.mark.parametrize("J", [1, 4])
def test_same_estimators_as_hmws_get_cmws_5_loss(J):
    cmws = import_hmws()
    x, p, _, ours, before, after, proposals, c_scored = one_step(J)
    names = NAMES
    C = L + K
    continuous = c_scored.view(C, J, N).transpose(0, 1)  # hmws: (J, C, N)

    memory = hmws_memory(cmws, before)
    hmws_loss = cmws.losses.get_cmws_5_loss(
        HmwsModel(), HmwsGuide(proposals, continuous), memory, x, torch.arange(N), J, K
    ).sum()
    theirs = dict(zip(names, torch.autograd.grad(hmws_loss, [p[n] for n in names]), strict=True))
    # the same memory (hmws keeps it in ascending order of score, we in descending)
    assert torch.equal(memory.memory_groups[0].sort(1).values, after.sort(1).values)
    for n in THETA_PARAMS + CONTINUOUS_GUIDE:
        assert torch.allclose(ours[n], theirs[n], rtol=1e-10, atol=1e-12), n

    # discrete guide: sum_m omega_m grad log q(d_m | x), omega_m = sum_j v_mj (ours) or
    # logsumexp_j v_mj (hmws), v normalized over memory and particles
    log_p = HmwsModel().log_prob_discrete_continuous(
        after.T[None], _gathered(c_scored, after, before, proposals, J), x
    )
    log_q_c = HmwsGuide(None, None).log_prob_continuous(
        x, after.T[None], _gathered(c_scored, after, before, proposals, J)
    )
    v = torch.softmax((log_p - log_q_c).detach().reshape(J * L, N), 0).view(J, L, N)
    for omega, grads in ((v.sum(0), ours), (torch.logsumexp(v, 0), theirs)):
        log_q_d = HmwsGuide(None, None).log_prob_discrete(x, after.T)
        expected = torch.autograd.grad(-(omega * log_q_d).sum(), [p[n] for n in DISCRETE_GUIDE])
        for n, g in zip(DISCRETE_GUIDE, expected, strict=True):
            assert torch.allclose(grads[n], g, rtol=1e-10, atol=1e-12), n
    if J == 1:
        for n in DISCRETE_GUIDE:
            assert torch.allclose(ours[n], theirs[n], rtol=1e-10, atol=1e-12), n


def _gathered(c_scored, after, before, proposals, J):
    """The continuous particles of the selected memory elements: (J, L, N)."""
    C = L + K
    candidates = torch.cat([before.T, proposals])  # (C, N)
    c = c_scored.view(C, J, N)
    out = []
    for n in range(N):
        rows = []
        for value in after[n]:
            first = int((candidates[:, n] == value).nonzero()[0])  # memory's copy first
            rows.append(c[first, :, n])
        out.append(torch.stack(rows, 1))  # (J, L)
    return torch.stack(out, -1)
