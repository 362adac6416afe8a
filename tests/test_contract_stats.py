# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The contract every loss keeps in what it reports: the fields of ``stats``, the effective sample
size and its warning, and the dtype (and device) of everything it returns.

Each test runs on every loss of tests/losses.py (the ``case`` fixture of conftest.py).
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from conjugate import DATA, data, exact_guide, fixed_model, guide, leaves, log_evidence, model
from losses import LOSSES

from pyro_rws import RWS, EffectiveSampleSizeWarning
from pyro_rws.diagnostics import ESSMonitor

pytestmark = pytest.mark.usefixtures("float64")


# --------------------------------------------------------------------------------------------
# stats
# --------------------------------------------------------------------------------------------
def test_stats_fields(case):
    x = data()
    K = 4
    loss = case.make(num_particles=K)
    assert loss.stats is None
    value = loss.loss_and_grads(model, guide, x)
    stats = loss.stats
    assert float(stats.loss) == pytest.approx(value, rel=1e-12)
    assert (stats.wake_theta is not None) == case.has_wake
    assert (stats.bound is not None) == case.has_wake
    assert (stats.sleep_phi is not None) == case.has_sleep
    assert (stats.wake_phi is not None) == case.has_wake_phi
    assert (stats.ess is not None) == case.returns_ess
    if case.has_wake:
        assert float(stats.bound) == pytest.approx(-value, rel=1e-12)
        assert stats.num_particles == K
    if case.bound == "iwae":
        assert float(stats.wake_theta) == pytest.approx(value, rel=1e-12)
    if case.returns_ess:
        assert stats.ess.shape == (len(DATA),)
        assert ((stats.ess >= 1 - 1e-12) & (stats.ess <= K + 1e-12)).all()
        assert float(stats.ess_mean) == pytest.approx(float(stats.ess.mean()))
        assert float(stats.ess_min) == float(stats.ess.min())
    d = stats.as_dict()
    assert d and all(type(v) is float for v in d.values())
    assert d["loss"] == pytest.approx(value, rel=1e-12)
    assert set(d) == {
        n
        for n in ("loss", "wake_theta", "wake_phi", "sleep_phi", "bound", "ess_mean", "ess_min")
        if getattr(stats, n) is not None
    }


def test_stats_exact_posterior_gives_uniform_weights(case):
    """With q(z|x) = p(z|x), log w_k = log p(x) for every particle: ess = K, bound = log p(x)."""
    if not case.has_wake:
        pytest.skip("no weights")
    x = data()
    K = 5
    loss = case.make(num_particles=K)
    value = loss.loss(fixed_model, exact_guide, x)
    expected = log_evidence(x).sum().item()
    assert value == pytest.approx(-expected, rel=1e-10)
    assert float(loss.stats.bound) == pytest.approx(expected, rel=1e-10)
    if case.returns_ess:
        assert torch.allclose(loss.stats.ess, torch.full((len(DATA),), float(K)))


# --------------------------------------------------------------------------------------------
# The effective sample size warning
# --------------------------------------------------------------------------------------------
def threshold(K):
    """The ESS below which a step counts as low, as documented in ESSMonitor."""
    return 1.0 + min(0.1, 0.02 * (K - 1))


def test_ess_monitor_patience_and_rate_limit():
    monitor = ESSMonitor(patience=3, cooldown=5)
    K = 10
    low, high = 1.0, 5.0
    just_low = threshold(K) - 0.01
    warned = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ess = [low, low, high, low, low, just_low] + [low] * 9
        for step, value in enumerate(ess, 1):
            n = len(record)
            monitor.update(value, K)
            monitor.update(low, 1)  # one particle: ignored, not a step
            if len(record) > n:
                warned.append(step)
    # low runs: steps 1-2 (reset by `high` at step 3), then from step 4: warn at 6, again 5 later
    assert warned == [6, 11]
    assert all(issubclass(w.category, EffectiveSampleSizeWarning) for w in record)
    message = str(record[0].message)
    assert f"below {threshold(K):.2f}" in message and "3 consecutive steps" in message


@pytest.mark.parametrize("K", [2, 4, 10, 100])
def test_ess_monitor_threshold(K):
    monitor = ESSMonitor(patience=1, cooldown=1)
    with pytest.warns(EffectiveSampleSizeWarning, match=f"K={K} particles"):
        monitor.update(threshold(K) - 1e-3, K)
    monitor = ESSMonitor(patience=1, cooldown=1)
    monitor.update(threshold(K) + 1e-3, K)  # no warning (filterwarnings = error)


def wide_guide(x):
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Normal(0.0, 1e4))


@pytest.mark.parametrize("spec", [s for s in LOSSES if s.returns_ess], ids=str)
def test_ess_warning_end_to_end(spec):
    """A guide far too wide: one particle in the posterior's bulk takes all the weight."""
    loss = spec.make(num_particles=10)
    x = data()
    for _ in range(99):  # default patience is 100
        loss.loss(fixed_model, wide_guide, x)
    assert float(loss.stats.ess_mean) < 1.01
    with pytest.warns(EffectiveSampleSizeWarning, match="K=10"):
        loss.loss(fixed_model, wide_guide, x)
    for _ in range(20):  # rate-limited: no second warning for cooldown steps
        loss.loss(fixed_model, wide_guide, x)


# --------------------------------------------------------------------------------------------
# dtypes and devices
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_kept(case, dtype):
    torch.set_default_dtype(dtype)  # restored by the float64 fixture
    x = data(dtype)
    seen = []

    def recording_guide(x):
        seen.append(x.dtype)
        guide(x)

    loss = case.make()
    value = loss.loss_and_grads(model, recording_guide, x)
    assert type(value) is float and math.isfinite(value)
    for name, p in leaves().items():
        assert p.dtype == dtype, name
        if p.grad is not None:
            assert p.grad.dtype == dtype, name
    for field in ("loss", "wake_theta", "wake_phi", "sleep_phi", "bound", "ess"):
        t = getattr(loss.stats, field)
        if t is not None:
            assert t.dtype == dtype, field
    assert set(seen) == {dtype}  # the guide sees data and fantasies in the data's dtype
    assert loss.differentiable_loss(model, recording_guide, x).dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("insomnia", [1.0, 0.5])
def test_cuda_step(insomnia):
    x = data().cuda()
    loss = RWS(num_particles=3, insomnia=insomnia)
    value = loss.loss_and_grads(model, guide, x)
    assert math.isfinite(value)
    for name, p in leaves().items():
        assert p.is_cuda and p.grad is not None and p.grad.is_cuda, name
    assert loss.stats.ess.is_cuda
