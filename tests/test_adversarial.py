# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import SVI
from pyro.nn import PyroModule
from pyro.optim import Adam, ClippedAdam
from torch import nn

from pyro_rws.adversarial import ALI, GAN, AdversarialStats, BiGAN

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# A tiny linear BiGAN: x = G z + noise, z = E x + noise, D linear in (x, z)
# --------------------------------------------------------------------------------------------
class JointLinear(nn.Module):
    """D(x, z) = w . [x, z] + c, or D(x) = w . x + c."""

    def __init__(self, dim, dtype=F64):
        super().__init__()
        self.lin = nn.Linear(dim, 1).to(dtype)

    def forward(self, x, z=None):
        v = x if z is None else torch.cat([x, z], -1)
        return self.lin(v).squeeze(-1)


class Linear:
    """Generator R^1 -> R^2 and encoder R^2 -> R^1 with Normal noise of scale 0.3."""

    def __init__(self, dtype=F64, joint=True):
        self.dtype = dtype
        self.gen = nn.Linear(1, 2).to(dtype)
        self.enc = nn.Linear(2, 1).to(dtype)
        self.disc = JointLinear(3 if joint else 2, dtype)
        self.x = torch.randn(7, 2, dtype=dtype)

    def model(self, x):
        pyro.module("generator", self.gen)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(1, dtype=self.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.gen(z), 0.3).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.enc)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.enc(x), 0.3).to_event(1))

    def gen_params(self):
        return [*self.gen.parameters(), *self.enc.parameters()]

    def by_hand(self, seed, joint=True):
        """The samples the loss draws with this seed (guide first, then model), the
        discriminator's BCE with its gradient, and the flipped-label BCE with its gradient."""
        n = self.x.shape[0]
        pyro.set_rng_seed(seed)
        z_q = torch.distributions.Normal(self.enc(self.x), 0.3).rsample() if joint else None
        z_p = torch.distributions.Normal(torch.zeros(n, 1, dtype=self.dtype), 1.0).rsample()
        x_p = torch.distributions.Normal(self.gen(z_p), 0.3).rsample()

        def bce(logits, label):
            return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))

        def pairs(detach):
            d = (lambda t: t.detach()) if detach else (lambda t: t)
            if joint:
                return (self.x, d(z_q)), (d(x_p), d(z_p))
            return (self.x,), (d(x_p),)

        data, fake = pairs(detach=True)
        d_loss = bce(self.disc(*data), 1.0) + bce(self.disc(*fake), 0.0)
        d_grads = torch.autograd.grad(d_loss, list(self.disc.parameters()))

        w, c = (p.detach() for p in self.disc.lin.parameters())

        def frozen(*v):
            return F.linear(torch.cat(v, -1), w, c).squeeze(-1)

        data, fake = pairs(detach=False)
        g_loss = bce(frozen(*fake), 1.0)
        if joint:
            g_loss = g_loss + bce(frozen(*data), 0.0)
        params = self.gen_params() if joint else list(self.gen.parameters())
        g_grads = torch.autograd.grad(g_loss, params)
        return d_loss.detach(), d_grads, g_loss.detach(), g_grads


def assert_grads(params, expected):
    for p, g in zip(params, expected, strict=True):
        if g is None:
            assert p.grad is None or torch.all(p.grad == 0)
        else:
            assert p.grad is not None
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("update", ["both", "generator", "discriminator"])
def test_gradient_partition_bigan(update):
    s = Linear()
    d_loss, d_grads, g_loss, g_grads = s.by_hand(seed=5)
    loss = BiGAN(s.disc, update=update)
    pyro.set_rng_seed(5)
    value = loss.loss_and_grads(s.model, s.guide, s.x)

    assert value == pytest.approx(d_loss.item(), rel=1e-12)
    assert isinstance(loss.stats, AdversarialStats)
    assert loss.stats.discriminator.item() == pytest.approx(d_loss.item(), rel=1e-12)
    assert loss.stats.generator.item() == pytest.approx(g_loss.item(), rel=1e-12)
    none = [None] * 10
    assert_grads(s.disc.parameters(), d_grads if update != "generator" else none[:2])
    assert_grads(s.gen_params(), g_grads if update != "discriminator" else none[:4])


@pytest.mark.parametrize("update", ["both", "generator", "discriminator"])
def test_gradient_partition_gan(update):
    s = Linear(joint=False)
    d_loss, d_grads, g_loss, g_grads = s.by_hand(seed=3, joint=False)
    loss = GAN(s.disc, update=update)
    pyro.set_rng_seed(3)
    value = loss.loss_and_grads(s.model, None, s.x)

    assert value == pytest.approx(d_loss.item(), rel=1e-12)
    assert loss.stats.generator.item() == pytest.approx(g_loss.item(), rel=1e-12)
    assert_grads(s.disc.parameters(), d_grads if update != "generator" else [None, None])
    assert_grads(s.gen.parameters(), g_grads if update != "discriminator" else [None, None])


def test_alias():
    assert ALI is BiGAN


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_methods_agree(dtype):
    s = Linear(dtype)
    loss = BiGAN(s.disc)
    pyro.set_rng_seed(11)
    value = loss.loss(s.model, s.guide, s.x)
    pyro.set_rng_seed(11)
    value_lg = loss.loss_and_grads(s.model, s.guide, s.x)
    grads = [p.grad.clone() for p in [*s.disc.parameters(), *s.gen_params()]]
    for p in [*s.disc.parameters(), *s.gen_params()]:
        p.grad = None
    pyro.set_rng_seed(11)
    tensor = loss.differentiable_loss(s.model, s.guide, s.x)
    assert isinstance(value, float) and isinstance(value_lg, float)
    assert tensor.dtype == dtype and tensor.dim() == 0
    assert value == value_lg == tensor.item()
    assert loss.stats.loss.dtype == dtype
    tensor.backward()
    for p, g in zip([*s.disc.parameters(), *s.gen_params()], grads, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_equilibrium_value_is_log_4():
    s = Linear()
    nn.init.zeros_(s.disc.lin.weight)
    nn.init.zeros_(s.disc.lin.bias)
    loss = BiGAN(s.disc)
    assert loss.loss(s.model, s.guide, s.x) == pytest.approx(math.log(4.0), abs=1e-15)
    stats = loss.stats.as_dict()
    assert stats["discriminator"] == stats["loss"] and stats["generator"] == pytest.approx(
        math.log(4.0)
    )
    assert stats["d_data"] == stats["d_model"] == 0.5


def snapshot(params):
    return [p.detach().clone() for p in params]


def changed(params, before):
    return [not torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True)]


def test_svi_updates_one_side_at_a_time():
    s = Linear()
    loss = BiGAN(s.disc)
    svi = SVI(s.model, s.guide, Adam({"lr": 0.05}), loss=loss)
    for _ in range(3):  # build up Adam momentum on both sides
        svi.step(s.x)
    disc, gen = list(s.disc.parameters()), s.gen_params()

    loss.update = "discriminator"
    d0, g0 = snapshot(disc), snapshot(gen)
    svi.step(s.x)
    assert all(changed(disc, d0)) and not any(changed(gen, g0))

    loss.update = "generator"
    d0, g0 = snapshot(disc), snapshot(gen)
    svi.step(s.x)
    assert not any(changed(disc, d0)) and all(changed(gen, g0))

    with pytest.raises(ValueError, match="update must be one of"):
        loss.update = "Gen"


@pytest.mark.parametrize("name", ["discriminator", "critic"])
def test_per_parameter_learning_rate(name):
    s = Linear()
    seen = []

    def lr(param_name):
        seen.append(param_name)
        return {"lr": 0.0 if param_name.startswith(name + ".") else 0.05}

    svi = SVI(s.model, s.guide, Adam(lr), loss=BiGAN(s.disc, discriminator_name=name))
    d0, g0 = snapshot(s.disc.parameters()), snapshot(s.gen_params())
    svi.step(s.x)
    assert not any(changed(s.disc.parameters(), d0)) and all(changed(s.gen_params(), g0))
    assert {f"{name}.lin.weight", f"{name}.lin.bias"} <= set(seen)


def test_differentiable_loss_with_torch_optimizer():
    """A plain PyTorch loop on differentiable_loss follows the same path as SVI."""
    svi_run, torch_run = Linear(), Linear()
    for name in ("gen", "enc", "disc"):
        getattr(torch_run, name).load_state_dict(getattr(svi_run, name).state_dict())
    torch_run.x = svi_run.x
    init = snapshot([*svi_run.disc.parameters(), *svi_run.gen_params()])

    pyro.set_rng_seed(1)
    svi = SVI(svi_run.model, svi_run.guide, pyro.optim.SGD({"lr": 0.1}), loss=BiGAN(svi_run.disc))
    for _ in range(20):
        svi.step(svi_run.x)

    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    loss_fn = BiGAN(torch_run.disc)(torch_run.model, torch_run.guide)
    disc = set(torch_run.disc.parameters())
    assert disc <= set(loss_fn.parameters())
    optim = torch.optim.SGD([*disc, *torch_run.gen_params()], lr=0.1)
    for _ in range(20):
        optim.zero_grad()
        loss_fn(torch_run.x).backward()
        optim.step()

    assert all(changed([*svi_run.disc.parameters(), *svi_run.gen_params()], init))
    for name in ("gen", "enc", "disc"):
        expected = getattr(svi_run, name).state_dict()
        for key, value in getattr(torch_run, name).state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Learning: a 2-D mixture of two Gaussians, linear-Gaussian generator and encoder
# --------------------------------------------------------------------------------------------
class Quadratic(nn.Module):
    """Logistic regression on the first and second moments of v = [x, z]: the matching
    discriminator class for a linear-Gaussian generator (its equilibrium matches moments)."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("rows", torch.triu_indices(dim, dim)[0], persistent=False)
        self.register_buffer("cols", torch.triu_indices(dim, dim)[1], persistent=False)
        self.lin = nn.Linear(dim + dim * (dim + 1) // 2, 1).to(F64)

    def forward(self, x, z=None):
        v = x if z is None else torch.cat([x, z], -1)
        quad = v[..., self.rows] * v[..., self.cols]
        return self.lin(torch.cat([v, quad], -1)).squeeze(-1)


@pytest.mark.parametrize("joint", [True, False], ids=["BiGAN", "GAN"])
def test_learns_mixture_moments(joint):
    centers = torch.tensor([[0.0, -2.0], [2.0, 0.0]], dtype=F64)
    spread = 0.45
    true_mean = centers.mean(0)
    true_cov = spread**2 * torch.eye(2, dtype=F64) + torch.cov(centers.T, correction=0)

    def sample_data(n):
        return centers[torch.randint(0, 2, (n,))] + spread * torch.randn(n, 2, dtype=F64)

    gen, enc = nn.Linear(2, 2).to(F64), nn.Linear(2, 2).to(F64)
    noise = 0.3

    def model(x):
        pyro.module("generator", gen)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(gen(z), noise).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", enc)
        scale = F.softplus(pyro.param("encoder_scale", torch.zeros(2, dtype=F64)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(enc(x), scale).to_event(1))

    def reconstruction_error():
        with torch.no_grad():
            x = sample_data(4000)
            return ((gen(enc(x)) - x) ** 2).sum(-1).mean().item()

    recon0 = reconstruction_error()
    steps = 800
    loss = BiGAN(Quadratic(4)) if joint else GAN(Quadratic(2))

    def optim_args(name):  # weight decay on the discriminator only
        wd = 0.3 if name.startswith("discriminator.") else 0.0
        return {"lr": 0.03, "betas": (0.5, 0.999), "lrd": 0.03 ** (1 / steps), "weight_decay": wd}

    svi = SVI(model, guide if joint else None, ClippedAdam(optim_args), loss=loss)
    for _ in range(steps):
        svi.step(sample_data(256))

    with torch.no_grad():
        x = gen(torch.randn(20000, 2, dtype=F64)) + noise * torch.randn(20000, 2, dtype=F64)
    # Monte Carlo error of the 20000-sample moments is ~0.01; the tolerances are for the game.
    assert (x.mean(0) - true_mean).abs().max() < 0.12
    assert (torch.cov(x.T) - true_cov).abs().max() < 0.2
    if joint:
        assert reconstruction_error() < recon0 / 4
    assert loss.stats.discriminator.item() == pytest.approx(math.log(4.0), abs=0.05)


# --------------------------------------------------------------------------------------------
# What the discriminator sees
# --------------------------------------------------------------------------------------------
class Recorder(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, 1).to(F64)
        self.calls = []

    def forward(self, x, z=None):
        self.calls.append((x, z))
        parts = [x] if z is None else [x, z]
        flat = [torch.cat(list(p.values()), -1) if isinstance(p, dict) else p for p in parts]
        return self.lin(torch.cat(flat, -1)).squeeze(-1)


def test_subsampled_minibatch_is_shared():
    data = torch.randn(20, 2, dtype=F64)

    def model(x):
        with pyro.plate("data", 20, subsample_size=5) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(1, dtype=F64), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.expand(-1, 2), 1.0).to_event(1), obs=x[idx])

    def guide(x):
        with pyro.plate("data", 20, subsample_size=5) as idx:
            pyro.sample("z", dist.Delta(x[idx, :1], event_dim=1))

    disc = Recorder(3)
    BiGAN(disc, update="discriminator").loss_and_grads(model, guide, data)
    (x_data, z_data), (x_model, z_model) = disc.calls
    assert x_data.shape == x_model.shape == (5, 2) and z_model.shape == (5, 1)
    assert torch.equal(z_data, x_data[:, :1])  # each z encodes its own datapoint


def test_several_sites_and_generator_noise():
    data = torch.randn(6, 2, dtype=F64)
    gen = nn.Linear(2, 2).to(F64)

    def model(x):
        pyro.module("generator", gen)
        with pyro.plate("data", 6):
            z1 = pyro.sample("z1", dist.Normal(torch.zeros(1, dtype=F64), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(1, dtype=F64), 1.0).to_event(1))
            eps = pyro.sample("eps", dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1))
            out = gen(torch.cat([z1, z2], -1)) + 0.1 * eps  # implicit generator
            pyro.sample("x1", dist.Delta(out[:, :1], event_dim=1), obs=x[:, :1])
            pyro.sample("x2", dist.Delta(out[:, 1:], event_dim=1), obs=x[:, 1:])

    def guide(x):
        with pyro.plate("data", 6):
            pyro.sample("z2", dist.Normal(x[:, :1], 1.0).to_event(1))
            pyro.sample("z1", dist.Normal(x[:, 1:], 1.0).to_event(1))

    disc = Recorder(4)
    loss = BiGAN(disc, latent_sites=["z1", "z2"])
    loss.loss_and_grads(model, guide, data)
    x_data, z_data = disc.calls[0]
    assert list(x_data) == ["x1", "x2"] and list(z_data) == ["z1", "z2"]
    assert torch.equal(x_data["x2"], data[:, 1:])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())

    with pytest.raises(ValueError, match=r"\['eps'\] are not sampled by the guide"):
        BiGAN(disc).loss(model, guide, data)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_bad_discriminator():
    with pytest.raises(TypeError, match="needs a discriminator"):
        BiGAN(None)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        BiGAN(lambda x, z: x.sum(-1))
    with pytest.raises(TypeError, match="not a PyroModule"):
        GAN(PyroModule[nn.Linear](2, 1))
    with pytest.raises(ValueError, match="update must be one of"):
        BiGAN(JointLinear(3), update="Disc")
    with pytest.raises(ValueError, match="must not contain"):
        BiGAN(JointLinear(3), discriminator_name="a$$$b")


def test_discriminator_must_return_logits():
    class Bad(nn.Module):
        def forward(self, x, z):
            return float(x.sum())

    s = Linear()
    with pytest.raises(TypeError, match="tensor of logits"):
        BiGAN(Bad()).loss(s.model, s.guide, s.x)


def test_not_reparameterizable():
    s = Linear()

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(1, dtype=F64)).to_event(1))
            pyro.sample("x", dist.Normal(z.expand(-1, 2), 1.0).to_event(1), obs=x)

    with pytest.raises(ValueError, match="model site 'z' is sampled from .*has_rsample=False"):
        BiGAN(s.disc).loss_and_grads(model, s.guide, s.x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(1, dtype=F64)).to_event(1))

    with pytest.raises(ValueError, match="guide site 'z' is sampled from .*has_rsample=False"):
        BiGAN(s.disc).loss_and_grads(s.model, guide, s.x)


def test_guide_must_encode_every_latent():
    s = Linear()
    with pytest.raises(ValueError, match=r"\['z'\] are not sampled by the guide"):
        BiGAN(s.disc).loss(s.model, lambda x: None, s.x)
    with pytest.raises(TypeError, match="needs a guide"):
        BiGAN(s.disc).loss(s.model, None, s.x)
    with pytest.raises(ValueError, match="not latent sites of the model"):
        BiGAN(s.disc, latent_sites=["w"]).loss(s.model, s.guide, s.x)

    def guide(x):  # a global z where the model has one per datapoint
        pyro.sample("z", dist.Normal(torch.zeros(1, dtype=F64), 1.0).to_event(1))

    with pytest.raises(ValueError, match="site 'z' lies in plate 'data'"):
        BiGAN(s.disc).loss(s.model, guide, s.x)


def test_data_not_found():
    s = Linear()

    def model(x):
        with pyro.plate("data", 7):
            z = pyro.sample("z", dist.Normal(torch.zeros(1, dtype=F64), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(s.gen(z), 0.3).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", 7):
            pyro.sample("z", dist.Normal(torch.zeros(1, dtype=F64), 1.0).to_event(1))

    with pytest.raises(ValueError, match="no observed site with data"):
        BiGAN(s.disc).loss(model, guide, None)

    def deterministic_model(x):
        with pyro.plate("data", 7):
            z = pyro.sample("z", dist.Normal(torch.zeros(1, dtype=F64), 1.0).to_event(1))
            pyro.deterministic("x", s.gen(z), event_dim=1)

    with pytest.raises(ValueError, match="no observed site with data"):
        GAN(JointLinear(2)).loss(deterministic_model, None, s.x)


def test_factor_in_model():
    s = Linear()

    def model(x):
        s.model(x)
        pyro.factor("penalty", torch.tensor(0.0, dtype=F64))

    with pytest.raises(ValueError, match="pyro.factor"):
        BiGAN(s.disc).loss(model, s.guide, s.x)
