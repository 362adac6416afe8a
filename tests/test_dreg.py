# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Doubly reparameterized gradients (``dreg=True``) of RWS and VIMCO.

One call of a loss draws R independent replicates of the same estimator: the model and guide
carry a replicate plate, every guide parameter has a replicate dimension, and weights are per
datapoint, so the gradient of ``param[r]`` is the r-th independent draw of the estimator.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import AffineTransform

from pyro_rws import RWS, VIMCO

DTYPE = torch.float64
DZ, DX, SIGMA = 2, 3, 0.7
# orthogonal columns, so that the exact posterior of z is a diagonal Gaussian (exact for every
# guide family below)
_Q = torch.linalg.qr(torch.randn(DX, DX, generator=torch.Generator().manual_seed(1)).double())[0]
A0 = _Q[:, :DZ] * torch.tensor([1.0, 2.0], dtype=DTYPE)
PRIOR0 = torch.tensor([0.3, -0.2], dtype=DTYPE)
X0 = torch.tensor(
    [[0.5, -1.0, 2.0], [1.5, 0.2, -0.3], [-0.7, 0.9, 0.4], [0.1, 0.1, 1.1]], dtype=DTYPE
)


def posterior(x):
    """Mean (N, DZ) and covariance (DZ, DZ) of p(z | x) for the linear-Gaussian model."""
    precision = torch.eye(DZ, dtype=DTYPE) + A0.T @ A0 / SIGMA**2
    cov = torch.linalg.inv(precision)
    mean = (PRIOR0 + x @ A0 / SIGMA**2) @ cov.T
    return mean, cov


def make_model_guide(R, x, kind, exact, subsample_size=None):
    """
    Linear-Gaussian model z ~ N(theta, I), x | z ~ N(A z, sigma^2 I) with theta and A model
    parameters, and a guide of family ``kind`` set to the exact posterior (``exact``) or away
    from it, with a replicate plate of size R outside the data plate.
    """
    N = x.shape[0]
    mean, cov = posterior(x)
    if not exact:
        mean = mean + torch.tensor([0.8, -0.5], dtype=DTYPE)
        cov = cov * torch.tensor([[0.5, 0.0], [0.0, 2.0]], dtype=DTYPE)
    xs = x.expand(R, N, DX)

    def model(xs):
        prior = pyro.param("prior_loc", PRIOR0.clone())
        A = pyro.param("A", A0.clone())
        with (
            pyro.plate("rep", R, dim=-2),
            pyro.plate("data", N, dim=-1, subsample_size=subsample_size) as idx,
        ):
            z = pyro.sample("z", dist.Normal(prior, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ A.T, SIGMA).to_event(1), obs=xs[:, idx])

    def guide(xs):
        loc = pyro.param("q_loc", mean.expand(R, N, DZ).clone())
        with (
            pyro.plate("rep", R, dim=-2),
            pyro.plate("data", N, dim=-1, subsample_size=subsample_size) as idx,
        ):
            if kind == "mvn":
                tril = pyro.param(
                    "q_tril",
                    torch.linalg.cholesky(cov).expand(R, N, DZ, DZ).clone(),
                    constraint=constraints.lower_cholesky,
                )
                pyro.sample("z", dist.MultivariateNormal(loc[:, idx], scale_tril=tril[:, idx]))
                return
            scale = pyro.param(
                "q_scale",
                cov.diagonal().sqrt().expand(R, N, DZ).clone(),
                constraint=constraints.positive,
            )
            if kind == "normal":
                fn = dist.Normal(loc[:, idx], scale[:, idx])
            else:  # a TransformedDistribution with rsample
                base = dist.Normal(torch.zeros_like(loc[:, idx]), 1.0)
                fn = dist.TransformedDistribution(base, AffineTransform(loc[:, idx], scale[:, idx]))
            pyro.sample("z", fn.to_event(1))

    return model, guide, xs


def grads(loss, model, guide, *args, seed=0):
    """Value and gradients of ``differentiable_loss`` for a fresh param store and seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    value = loss.differentiable_loss(model, guide, *args)
    value.backward()
    store = pyro.get_param_store()
    return value.detach(), {n: p.grad.detach().clone() for n, p in store.named_parameters()}


def estimator(name, K, dreg, **kw):
    if name == "rws":
        return RWS(num_particles=K, dreg=dreg, max_plate_nesting=2, **kw)
    return VIMCO(num_particles=K, dreg=dreg, max_plate_nesting=2, **kw)


GUIDE_PARAMS = {"q_loc", "q_scale", "q_tril"}


# --------------------------------------------------------------------------------------------
# Exactly zero at the exact posterior
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["normal", "mvn", "affine"])
@pytest.mark.parametrize(
    "name,K", [("rws", 2), ("rws", 7), ("vimco", 1), ("vimco", 2), ("vimco", 7)]
)
def test_zero_at_exact_posterior(name, K, kind):
    model, guide, xs = make_model_guide(50, X0, kind, exact=True)
    _, g = grads(estimator(name, K, dreg=True), model, guide, xs)
    phi = [n for n in g if n in GUIDE_PARAMS]
    assert len(phi) == 2
    for n in phi:  # every draw: the per-replicate gradients are all zero
        assert g[n].abs().max() < 1e-10, (n, g[n].abs().max())
    # the standard estimators are not zero per draw (only in expectation, and for VIMCO with
    # K = 1 that is the ordinary reparameterized ELBO gradient)
    if not (name == "vimco" and K == 1):
        _, g_std = grads(estimator(name, K, dreg=False), model, guide, xs)
        for n in phi:
            assert g_std[n].abs().max() > 1e-2
    # theta still gets the gradient of the bound
    assert g["prior_loc"].abs().max() > 0


# --------------------------------------------------------------------------------------------
# Same expectation as the standard estimator
# --------------------------------------------------------------------------------------------
def paired_difference(name, K, model, guide, args, seeds, flatten):
    """Per-draw differences DReG - standard for the same particles, stacked over replicates."""
    diffs = []
    for seed in seeds:
        _, g_d = grads(estimator(name, K, dreg=True), model, guide, *args, seed=seed)
        _, g_s = grads(estimator(name, K, dreg=False), model, guide, *args, seed=seed)
        for n in g_d:  # theta: the same gradient
            if n not in GUIDE_PARAMS and not n.startswith("q_"):
                torch.testing.assert_close(g_d[n], g_s[n], rtol=1e-10, atol=1e-10)
        diffs.append(flatten(g_d) - flatten(g_s))
    return torch.cat(diffs, 0)


def assert_zero_mean(diffs, z=5.0):
    """Each column of ``diffs`` (rows: independent draws) has mean zero within z standard errors."""
    mean = diffs.mean(0)
    se = diffs.std(0) / math.sqrt(diffs.shape[0])
    assert (se > 0).all()
    assert (mean.abs() < z * se).all(), (mean / se).abs().max()


@pytest.mark.parametrize("K", [2, 5])
@pytest.mark.parametrize("name", ["rws", "vimco"])
@pytest.mark.parametrize("subsample_size", [None, 2])
def test_same_expectation_as_standard(name, K, subsample_size):
    R = 4000
    model, guide, xs = make_model_guide(R, X0, "normal", exact=False, subsample_size=subsample_size)

    def flatten(g):  # (R, N * 2 * DZ): loc and scale of every datapoint of each replicate
        return torch.cat([g["q_loc"], g["q_scale"]], -1).reshape(R, -1)

    seeds = range(3) if subsample_size else range(1)  # several minibatches
    diffs = paired_difference(name, K, model, guide, (xs,), seeds, flatten)
    if subsample_size:  # datapoints outside the minibatch get no gradient from either
        diffs = diffs[:, diffs.abs().sum(0) > 0]
    assert_zero_mean(diffs)
    # and the test has power: DReG and standard differ per draw, and RWS-DReG is not IWAE-DReG
    assert diffs.abs().mean() > 1e-2
    if subsample_size is None:
        _, g_rws = grads(estimator("rws", K, dreg=True), model, guide, xs)
        _, g_iwae = grads(estimator("vimco", K, dreg=True), model, guide, xs)
        other = flatten(g_rws) - flatten(g_iwae)
        mean, se = other.mean(0), other.std(0) / math.sqrt(R)
        assert ((mean / se).abs() > 5).any()


# --------------------------------------------------------------------------------------------
# Mixed guide: a Normal and a Bernoulli site
# --------------------------------------------------------------------------------------------
def make_mixed(R, hierarchical):
    """z ~ N(0, I), b ~ Bernoulli(0.4), x ~ N(A z + 1.5 b, sigma); guide q(z) q(b | z?)."""
    x = X0[:3]
    N = x.shape[0]
    xs = x.expand(R, N, DX)

    def model(xs):
        A = pyro.param("A", A0.clone())
        with pyro.plate("rep", R, dim=-2), pyro.plate("data", N, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(DZ, dtype=DTYPE), 1.0).to_event(1))
            b = pyro.sample("b", dist.Bernoulli(torch.tensor(0.4, dtype=DTYPE)))
            pyro.sample(
                "x", dist.Normal(z @ A.T + 1.5 * b.unsqueeze(-1), SIGMA).to_event(1), obs=xs
            )

    def guide(xs):
        loc = pyro.param("q_loc", torch.full((R, N, DZ), 0.2, dtype=DTYPE))
        scale = pyro.param(
            "q_scale", torch.full((R, N, DZ), 0.8, dtype=DTYPE), constraint=constraints.positive
        )
        logit = pyro.param("q_logit", torch.full((R, N), -0.3, dtype=DTYPE))
        with pyro.plate("rep", R, dim=-2), pyro.plate("data", N, dim=-1):
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            b_logit = logit + 0.7 * z.sum(-1) if hierarchical else logit
            pyro.sample("b", dist.Bernoulli(logits=b_logit))

    return model, guide, xs


@pytest.mark.parametrize("hierarchical", [False, True])
@pytest.mark.parametrize("name", ["rws", "vimco"])
def test_mixed_guide_bernoulli_gradient_unchanged(name, hierarchical):
    model, guide, xs = make_mixed(20, hierarchical)
    for seed in range(3):
        v_d, g_d = grads(estimator(name, 4, dreg=True), model, guide, xs, seed=seed)
        v_s, g_s = grads(estimator(name, 4, dreg=False), model, guide, xs, seed=seed)
        assert v_d == v_s
        torch.testing.assert_close(g_d["q_logit"], g_s["q_logit"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_d["A"], g_s["A"], rtol=1e-10, atol=1e-12)
        assert (g_d["q_loc"] - g_s["q_loc"]).abs().max() > 1e-3  # the Normal's does change


@pytest.mark.parametrize("name,hierarchical", [("rws", False), ("vimco", False), ("vimco", True)])
def test_mixed_guide_same_expectation(name, hierarchical):
    R = 4000
    model, guide, xs = make_mixed(R, hierarchical)

    def flatten(g):
        return torch.cat([g["q_loc"], g["q_scale"]], -1).reshape(R, -1)

    assert_zero_mean(paired_difference(name, 3, model, guide, (xs,), range(1), flatten))


# --------------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [RWS, VIMCO])
@pytest.mark.parametrize("bad", [0, 1, None, "yes", 1.0])
def test_dreg_must_be_bool(cls, bad):
    with pytest.raises(TypeError, match="dreg"):
        cls(num_particles=2, dreg=bad)


def test_vimco_one_particle():
    VIMCO(num_particles=1, dreg=True)  # accepted: "sticking the landing" if all reparameterized
    with pytest.raises(ValueError, match="num_particles"):
        VIMCO(num_particles=1)
    model, guide, xs = make_mixed(2, False)
    with pytest.raises(ValueError, match="reparameterized"):
        VIMCO(num_particles=1, dreg=True).differentiable_loss(model, guide, xs)


def _discrete():
    def model():
        b = pyro.sample("b", dist.Bernoulli(torch.tensor(0.3, dtype=DTYPE)))
        pyro.sample("x", dist.Normal(b, 1.0), obs=torch.tensor(0.5, dtype=DTYPE))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, dtype=DTYPE), constraint=constraints.unit_interval)
        pyro.sample("b", dist.Bernoulli(p))

    return model, guide


@pytest.mark.parametrize("name", ["rws", "vimco"])
def test_no_reparameterized_site_warns_once_per_object(name):
    model, guide = _discrete()
    for _ in range(2):  # a new object warns again
        loss = estimator(name, 3, dreg=True, vectorize_particles=True)
        with pytest.warns(UserWarning, match="dreg"):
            v_d, g_d = grads(loss, model, guide, seed=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss.loss(model, guide)
            grads(loss, model, guide, seed=1)
        v_s, g_s = grads(estimator(name, 3, dreg=False), model, guide, seed=1)
        assert v_d == v_s
        assert g_d.keys() == g_s.keys()
        for n in g_d:
            assert torch.equal(g_d[n], g_s[n])


def test_warning_not_hidden_by_the_once_per_location_filter():
    model, guide = _discrete()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        for _ in range(2):  # two loss objects, called from the same line
            RWS(3, dreg=True).loss(model, guide)
    messages = [str(w.message) for w in record if "dreg" in str(w.message)]
    assert len(messages) == 2
    assert record[0].filename == __file__


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("name", ["rws", "vimco"])
def test_loss_methods_agree(name, vectorize):
    model, guide, xs = make_model_guide(3, X0, "normal", exact=False, subsample_size=2)
    loss = estimator(name, 4, dreg=True, vectorize_particles=vectorize)
    plain = estimator(name, 4, dreg=False, vectorize_particles=vectorize)
    value, g = grads(loss, model, guide, xs, seed=3)
    pyro.set_rng_seed(3)
    assert loss.loss(model, guide, xs) == pytest.approx(float(value), rel=1e-12)
    pyro.set_rng_seed(3)
    assert plain.loss(model, guide, xs) == pytest.approx(float(value), rel=1e-12)
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    assert loss.loss_and_grads(model, guide, xs) == pytest.approx(float(value), rel=1e-12)
    for n, p in pyro.get_param_store().named_parameters():
        torch.testing.assert_close(p.grad, g[n], rtol=1e-12, atol=1e-12)
    assert loss.stats.wake_phi is not None and loss.stats.ess is not None


@pytest.mark.filterwarnings("ignore:the guide does not read")  # non-amortized: sleep can't train
def test_rws_sleep_phase_unchanged():
    """insomnia < 1: the sleep-phi term and the particles are those of dreg=False."""
    model, guide, xs = make_model_guide(3, X0, "normal", exact=False)
    kw = dict(max_plate_nesting=2, fantasy_args={"x": 0})
    v_d, g_d = grads(RWS(3, insomnia=0.0, dreg=True, **kw), model, guide, xs)
    v_s, g_s = grads(RWS(3, insomnia=0.0, **kw), model, guide, xs)
    assert v_d == v_s
    for n in g_d:
        assert torch.equal(g_d[n], g_s[n])
    loss_d, loss_s = (RWS(3, insomnia=0.5, dreg=d, **kw) for d in (True, False))
    v_d, g_d = grads(loss_d, model, guide, xs, seed=2)
    v_s, g_s = grads(loss_s, model, guide, xs, seed=2)
    assert v_d == v_s
    assert loss_d.stats.sleep_phi == loss_s.stats.sleep_phi
    torch.testing.assert_close(g_d["A"], g_s["A"], rtol=1e-10, atol=1e-12)


def test_rws_hierarchical_guide_matches_rws_target():
    """
    A Bernoulli site whose logits depend on a reparameterized Normal site: RWS-DReG is unbiased
    for the RWS wake-phi target E[sum_k wbar_k d/dphi log q_phi(z_k)] (score at fixed z, here
    computed by replaying the guide on detached samples). The plain RWS estimator used to
    differ for this guide (its trace kept the Bernoulli's logits computed from the attached
    Normal sample); samples are now detached as they are drawn, and it agrees exactly.
    """
    from pyro_rws._dreg import dreg_log_weights
    from pyro_rws._weights import log_mean_exp

    class ReferenceRWS(RWS):
        def _terms(self, model, guide, args, kwargs):
            runs, _ = self._wake(model, guide, args, kwargs, 2, detach=False)
            lw = dreg_log_weights(
                model, guide, args, kwargs, runs, num_particles=3, vectorize=True, plate_nesting=2
            ).detached
            log_w = (lw.log_p - lw.log_q).detach()
            w = torch.softmax(log_w, 0)
            return -log_mean_exp(log_w).sum(), -(w * (lw.log_p + lw.log_q)).sum(), None

    R = 4000
    model, guide, xs = make_mixed(R, hierarchical=True)

    def flatten(g):
        return torch.cat([g["q_loc"], g["q_scale"], g["q_logit"].unsqueeze(-1)], -1).reshape(R, -1)

    _, g_d = grads(RWS(3, dreg=True, max_plate_nesting=2), model, guide, xs)
    _, g_r = grads(ReferenceRWS(3, max_plate_nesting=2), model, guide, xs)
    assert_zero_mean(flatten(g_d) - flatten(g_r))
    _, g_plain = grads(RWS(3, max_plate_nesting=2), model, guide, xs)
    torch.testing.assert_close(flatten(g_plain), flatten(g_r), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["rws", "vimco"])
def test_nondeterministic_guide_warns(name):
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.0)) + 0.1 * torch.randn(())  # like dropout
        pyro.sample("z", dist.Normal(loc, 1.0))

    with pytest.warns(UserWarning, match="deterministic"):
        estimator(name, 3, dreg=True).differentiable_loss(model, guide)


@pytest.mark.parametrize("vectorize", [True, False], ids=["vec", "seq"])
@pytest.mark.parametrize("name", ["rws", "vimco"])
def test_enumerated_model_site_is_summed_out_in_the_replay(name, vectorize):
    """
    The replay on detached values enumerates the model's enumerated sites as the wake run does
    (else it samples them, and the path term is wrong and warns): the same value and gradients,
    for the same draws, as the model with the discrete site summed out by hand (a mixture).
    """
    x = torch.tensor([0.5, -1.0, 2.0], dtype=DTYPE)

    def model(x, enumerate=True):
        loc = pyro.param("loc", torch.tensor(0.2, dtype=DTYPE))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(loc, 1.0))
            if enumerate:
                c = pyro.sample("c", dist.Bernoulli(logits=z), infer={"enumerate": "parallel"})
                pyro.sample("x", dist.Normal(z + c, 1.0), obs=x)
            else:
                mix = dist.Categorical(logits=torch.stack([-z, z], -1) / 2)  # p(c=1) = sigmoid z
                pair = torch.stack([z, z + 1], -1)
                pyro.sample("x", dist.MixtureSameFamily(mix, dist.Normal(pair, 1.0)), obs=x)

    def guide(x, enumerate=True):
        a = pyro.param("a", torch.tensor(0.3, dtype=DTYPE))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(a * x, 0.8))

    results = []
    for enumerate in (True, False):
        pyro.clear_param_store()
        loss = (RWS if name == "rws" else VIMCO)(3, dreg=True, vectorize_particles=vectorize)
        pyro.set_rng_seed(1)
        value = loss.loss_and_grads(model, guide, x, enumerate)
        results.append((value, {n: p.grad for n, p in pyro.get_param_store().named_parameters()}))
    (v0, g0), (v1, g1) = results
    assert v0 == pytest.approx(v1, rel=1e-12)
    for n in g1:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-10, atol=1e-12)
