# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
An amortized normalizing-flow autoguide, :class:`AutoAmortizedFlow`: neural posterior estimation
(NPE) as a Pyro guide.

For latent sites :math:`\theta_1, \dots, \theta_K` of the model (in the order the model samples
them) and its observed values :math:`x`, the guide is

.. math::

    q_\phi(\theta \mid x) = \prod_{k=1}^K q_\phi(\theta_k \mid \theta_{<k}, x), \qquad
    \theta_k = T_k\big(\mu_k + \sigma_k\, f_k(u_k; c_k)\big), \quad u_k \sim \mathcal N(0, I),

with :math:`c_k = (e(x), \theta_{<k})` the context (:math:`e` the observation embedding of
:mod:`pyro_rws.autoguides.embedding`, previous sites in their unconstrained form), :math:`f_k` a
conditional flow, :math:`(\mu_k, \sigma_k)` the standardization of the unconstrained
:math:`\theta_k` (from simulations, :meth:`~pyro_rws.AutoAmortizedFlow.standardize`) and
:math:`T_k` a bijection onto the prior's support: no sample falls outside it. For an interval
(a box prior) :math:`T_k` is the identity but for thin bands at the bounds
(:class:`~pyro_rws.autoguides.support.SoftEdgeTransform`), so the flow learns in the
parameter's own space as ``sbi``'s does; for other supports it is
:math:`\texttt{biject\_to}(\text{support}_k)`, as in Pyro's autoguides, and the flow runs in
that bijection's unconstrained space, whose shape may differ from the site's (the :math:`D - 1`
coordinates of a simplex of :math:`D` entries, stick-breaking onto it; the :math:`d(d-1)/2` of a
:math:`d \times d` correlation Cholesky factor). Each site is a
:class:`~pyro.distributions.TransformedDistribution`, so its ``log_prob`` at a given value is
the change of variables

.. math:: \log q(\theta_k \mid c_k) = \log \mathcal N(u_k) + \log|\det \partial u_k /
   \partial \theta_k|, \qquad u_k = f_k^{-1}\big((T_k^{-1}(\theta_k) - \mu_k)/\sigma_k; c_k\big).

**Direction.** The sleep phase (and :func:`pyro_rws.fit_guide`) scores given values, so
:math:`f_k^{-1}` must be cheap: for a site of dimension :math:`D \ge 2` each layer is a masked
autoregressive (MAF) transform, Pyro's
:class:`~pyro.distributions.transforms.ConditionalAffineAutoregressive` used as its inverse,
whose ``log_prob`` is one network pass per layer (sampling takes :math:`D` passes per layer, as
in ``sbi``'s MAF). The layers' autoregressive orders alternate, natural and reversed, as in
the MAF paper (Papamakarios et al., 2017), rather than being drawn at random: two layers with
the same order compose into one, so random orders would make the flow's capacity a matter of
the seed (on sbibm's gaussian_mixture, whose posterior mixes a wide and a narrow Gaussian,
random orders left the guide at a single-Gaussian plateau on all five seeds tried). Each
layer's network has Pyro's masks, or with ``masks="made"`` those of ``sbi``'s MADE (every
hidden unit reads the first variable of the order; Pyro's leaves a share of them reading the
context alone: half in two dimensions) and a skip connection linear in the context
(``_made``). A scalar site uses a conditional rational-quadratic spline followed by a
conditional affine map, both one pass either way.

**Data plates.** All latents must lie in the same plates (the *datapoint* plates, possibly
none); each observed site must lie in them too. Every observation is cut into datapoints by
:func:`~pyro_rws.autoguides.embedding.datapoints`, so that a batch of observations in a data
plate gives one posterior per datapoint, and global latents with several iid observations
read them all (their plate is flattened into the per-datapoint observation).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.transforms import ConditionalAffineAutoregressive, ConditionalSpline
from pyro.infer.autoguide import AutoGuide
from pyro.nn import ConditionalAutoRegressiveNN, DenseNN
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import constraints
from torch.distributions.transforms import AffineTransform, ReshapeTransform

from .embedding import ObservationEmbedding, datapoints
from .support import INTERVAL_BIJECTIONS, interval_bijection


class _ConditionalAffine(ConditionalTransformModule):
    """Elementwise ``y = loc(c) + exp(log_scale(c)) * x`` over a vector, from a dense net."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, dim: int, context_dim: int, hidden: list[int]):
        super().__init__()
        self.nn = DenseNN(context_dim, hidden, param_dims=[dim, dim])

    def condition(self, context):
        loc, log_scale = self.nn(context)
        return AffineTransform(loc, log_scale.clamp(-8.0, 8.0).exp(), event_dim=1)


def _alternating_order(dim: int, layer: int) -> torch.Tensor:
    """The autoregressive order of MAF layer ``layer``: natural, reversed on every other layer.

    Consecutive layers with the same order compose into one affine autoregressive map, so
    random orders (Pyro's default) waste layers: in two dimensions five random orders give
    three distinct blocks on average, and the flow's capacity becomes a matter of the seed."""
    order = torch.arange(dim)
    return order.flip(0) if layer % 2 else order


#: The conditioners' masks :class:`AutoAmortizedFlow` can build (its ``masks=``).
MASKS = ("pyro", "made")


def _conditioner(
    dim: int, context_dim: int, hidden: list[int], order: torch.Tensor, masks: str
) -> ConditionalAutoRegressiveNN:
    """The network of one MAF layer: Pyro's ``ConditionalAutoRegressiveNN`` (tanh) in the
    given order, with ``masks="made"`` given sbi's masks and a skip connection (``_made``)."""
    made = masks == "made"
    net = ConditionalAutoRegressiveNN(
        dim, context_dim, hidden, nonlinearity=nn.Tanh(), permutation=order, skip_connections=made
    )
    if made:
        _made(net, context_dim, hidden, order)
    return net


def _made(
    net: ConditionalAutoRegressiveNN, context_dim: int, hidden: list[int], order: torch.Tensor
) -> None:
    """Give ``net`` (built with ``skip_connections=True``) the masks of ``sbi``'s MADE
    (nflows) and a skip connection from the context, in place.

    Pyro gives the hidden units degrees spread evenly over ``0 .. D-1``, a unit of degree ``k``
    reading the context and the first ``k`` variables of the order; units of degree 0 read the
    context alone. With ``D = 2`` that is half of every layer, so only 25 of 50 units can make
    the second variable's shift and scale depend on the first. Here, as in nflows' MADE, the
    degrees cycle through ``1 .. D-1`` and every unit reads the context; the first variable's
    shift and log-scale then get the context through a skip connection linear in the context
    alone. (Linear in the variables as well, as Pyro's skip connection is, the shift would
    grow without bound in them, and the tails compound over the layers: on gaussian_mixture a
    sample landed at a bound of the box, weighted as the whole importance sample.)"""
    dim = len(order)
    position = torch.empty(dim)
    position[order] = torch.arange(dim, dtype=position.dtype)  # 1 + position: variable's degree
    inputs = torch.cat([torch.zeros(context_dim), 1 + position])
    degrees = [torch.arange(h) % max(1, dim - 1) + 1 for h in hidden]
    outputs = (1 + position).repeat(net.output_multiplier)
    masks = [degrees[0][:, None] >= inputs]
    masks += [degrees[i][:, None] >= degrees[i - 1] for i in range(1, len(hidden))]
    masks.append(outputs[:, None] > degrees[-1])
    with torch.no_grad():
        for layer, mask in zip(net.layers, masks, strict=True):
            layer.mask.copy_(mask)
        net.skip_layer.mask.copy_((inputs == 0).expand(len(outputs), -1))  # the context


class _SiteFlow(nn.Module):
    """The conditional flow of one latent site, with its standardization buffers."""

    def __init__(
        self,
        dim: int,
        context_dim: int,
        num_transforms: int,
        hidden_dims: list[int],
        log_scale_clip: tuple[float, float] = (-8.0, 8.0),
        masks: str = "pyro",
    ):
        super().__init__()
        hidden = list(hidden_dims)
        self.dim = dim
        if dim == 1:
            self.layers = nn.ModuleList(
                [
                    ConditionalSpline(
                        DenseNN(context_dim, hidden, param_dims=[8, 8, 7, 8]), 1, 8, bound=4.0
                    ),
                    _ConditionalAffine(1, context_dim, hidden),
                ]
            )
        else:
            self.layers = nn.ModuleList(
                ConditionalAffineAutoregressive(
                    _conditioner(dim, context_dim, hidden, _alternating_order(dim, i), masks),
                    log_scale_min_clip=log_scale_clip[0],
                    log_scale_max_clip=log_scale_clip[1],
                )
                for i in range(num_transforms)
            )
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def transforms(self, context: torch.Tensor) -> list:
        if self.dim == 1:
            out = [layer.condition(context) for layer in self.layers]
        else:  # MAF: the autoregressive net reads theta, so log_prob is one pass
            out = [layer.condition(context).inv for layer in self.layers]
        return out + [AffineTransform(self.loc, self.scale, event_dim=1)]


def _static_support(fn, name: str) -> constraints.Constraint:
    """The site's support with bounds reduced to its event shape (constant over plates)."""
    support = fn.support
    event_dim = fn.event_dim
    base, wrapped = support, 0
    while isinstance(base, constraints.independent):
        wrapped += base.reinterpreted_batch_ndims
        base = base.base_constraint
    base = copy.copy(base)
    for attr in ("lower_bound", "upper_bound"):
        bound = getattr(base, attr, None)
        if torch.is_tensor(bound) and bound.dim() > event_dim:
            flat = bound.reshape((-1,) + tuple(bound.shape[bound.dim() - event_dim :]))
            if not bool((flat == flat[:1]).all()):
                raise ValueError(
                    f"the support of latent site '{name}' has bounds that vary across its "
                    "plates; AutoAmortizedFlow maps onto one support per site. Write the prior "
                    "with the same bounds for every datapoint, or write the guide by hand."
                )
            setattr(base, attr, flat[0])
    return constraints.independent(base, wrapped) if wrapped else base


def _hide_in_prototype(msg) -> bool:
    return msg["type"] != "sample" or site_is_subsample(msg)


class AutoAmortizedFlow(AutoGuide):
    r"""
    An amortized autoguide :math:`q_\phi(\theta \mid x)`: a conditional normalizing flow over the
    model's continuous latents, conditioned on an embedding of its observed values, with the
    prior's support respected by construction (see :mod:`pyro_rws.autoguides.flow`).

    It trains with :class:`~pyro_rws.SleepPhaseLoss` and :func:`~pyro_rws.fit_guide` (neural
    posterior estimation), with :class:`~pyro_rws.RWS` on real observations, and serves as the
    proposal of :func:`~pyro_rws.log_evidence` and :func:`~pyro_rws.importance_posterior`.
    It is called like the model; it reads the observations from ``observations={site name:
    value}`` if given (values may carry extra leading dims, e.g. a batch of simulations), else
    from the model argument that is the observed site's ``obs=`` value, else by running the
    model once to read them.

    Example (neural posterior estimation on simulations)::

        guide = AutoAmortizedFlow(model)
        simulations = pyro_rws.simulate(model, 10_000)
        guide.standardize(simulations)
        pyro_rws.fit_guide(model, guide, simulations)
        samples = guide(observations={"x": x_o})

    :param callable model: the Pyro model (simulator with a prior and observed sites).
    :param embedding_net: optional module embedding the standardized observations (see
        :mod:`pyro_rws.autoguides.embedding`); by default one is chosen from their shapes.
    :param int num_transforms: flow layers per latent site of dimension >= 2 (``sbi``'s MAF
        default: 5).
    :param hidden_dims: widths of the hidden layers of each layer's network. The default, three
        layers of 50, matches ``sbi``'s default MAF (``hidden_features=50``, whose MADE has an
        input layer and two hidden blocks): about the same number of weights.
    :param log_scale_clip: bounds of each MAF layer's log-scale. Pyro's default, (-5, 3), caps
        a layer's stretch at e^3: on two moons (10^3 simulations) the best validation loss was
        -1.44 nats with it, -1.85 with (-8, 8) (sbi's MAF, whose scale is a softplus without an
        upper bound: -2.36).
    :param str interval_bijection: how a latent with an interval support (a box prior) is
        mapped onto it: ``"soft_edge"`` (default), the identity on the interval but for bands
        of 5 % of its width at the ends, into which the real line's tails are folded (the flow
        learns in the parameter's own space, as ``sbi``'s does, yet no sample leaves the
        support: :class:`~pyro_rws.autoguides.support.SoftEdgeTransform`), or ``"sigmoid"``
        (Pyro's ``biject_to``: the flow learns the logit, which distorts posteriors near a
        bound; on two moons with 10³ simulations C2ST 0.94 against 0.69). Other supports use
        ``biject_to`` either way.
    :param str masks: the masks of each MAF layer's network: ``"pyro"`` (default), Pyro's
        ``ConditionalAutoRegressiveNN``, whose hidden units of degree 0 read the context alone
        (half of them in two dimensions), or ``"made"``, those of ``sbi``'s MADE, where every
        unit reads the first variable of the order (see :mod:`pyro_rws.autoguides.flow`).
        ``"made"`` lets a posterior that mixes a wide and a narrow component escape a
        single-Gaussian plateau (sbibm gaussian_mixture, 10⁴ simulations: C2ST 0.644 over five
        seeds against 0.71 with ``"pyro"`` and sbi's 0.688) but was worse on seed 0 of every
        other task run (two moons, gaussian_linear, slcp; ``benchmarks/README.md``, section 12).
    :param observed: names of sites to treat as observations even where the model samples them
        (a model called without data); by default, the sites the model observes.
    """

    #: The guide computes its parameters from the observations: the sleep phase may train it.
    amortized = True

    # the prototype trace keeps observed sites (Pyro's autoguides hide them)
    _prototype_hide_fn = staticmethod(_hide_in_prototype)

    def __init__(
        self,
        model: Callable,
        *,
        embedding_net: nn.Module | None = None,
        num_transforms: int = 5,
        hidden_dims: Sequence[int] = (50, 50, 50),
        log_scale_clip: tuple[float, float] = (-8.0, 8.0),
        interval_bijection: str = "soft_edge",
        masks: str = "pyro",
        observed: Sequence[str] | None = None,
    ):
        hidden_dims = list(hidden_dims)
        if masks not in MASKS:
            raise ValueError(f"masks must be one of {MASKS}, got {masks!r}")
        sizes = [("num_transforms", num_transforms)] + [("hidden_dims", h) for h in hidden_dims]
        for key, value in sizes:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be positive int(s), got {value!r}")
        if not hidden_dims:
            raise ValueError("hidden_dims must name at least one hidden layer width")
        if isinstance(observed, str):
            observed = [observed]
        if interval_bijection not in INTERVAL_BIJECTIONS:
            raise ValueError(
                f"interval_bijection must be one of {INTERVAL_BIJECTIONS}, "
                f"got {interval_bijection!r}"
            )
        super().__init__(model)
        self._interval_bijection = interval_bijection
        low, high = (float(c) for c in log_scale_clip)
        if not low < high:
            raise ValueError(
                f"log_scale_clip must be (low, high) with low < high, got {log_scale_clip}"
            )
        self._options = dict(
            num_transforms=num_transforms,
            hidden_dims=hidden_dims,
            log_scale_clip=(low, high),
            masks=masks,
        )
        self._embedding_net = embedding_net
        self._observed = set(observed or ())

    # ----------------------------------------------------------------------------------------
    # The model's structure
    # ----------------------------------------------------------------------------------------
    def _setup_prototype(self, *args, observations=None, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        trace = self.prototype_trace
        names = self._observed | set(observations or ())
        unknown = sorted(names - set(trace.nodes))
        if unknown:
            raise ValueError(f"observed site(s) {unknown} are not sites of the model")
        observed = {
            n: s
            for n, s in trace.nodes.items()
            if s["type"] == "sample"
            and not site_is_subsample(s)
            and (n in names or s["is_observed"])
            # a simulator's returned data recorded by pyro.deterministic counts when named
            and (n in names or not s["infer"].get("_deterministic"))
            and not s["infer"].get("is_auxiliary")
            and not getattr(s["fn"], "_pyro_is_factor", False)
            and type(s["fn"]).__name__ != "Unit"
        }
        latents = {}
        for name, site in trace.iter_stochastic_nodes():
            if site_is_subsample(site) or name in observed:
                continue
            if site["fn"].support.is_discrete:
                if site["infer"].get("enumerate") == "parallel":
                    continue  # summed out by the model
                raise ValueError(
                    f"AutoAmortizedFlow models continuous latents only, but site '{name}' is "
                    f"discrete ({type(site['fn']).__name__}). Sum it out exactly by enumeration "
                    "(infer={'enumerate': 'parallel'} in the model), or write a guide for it by "
                    "hand (e.g. an amortized Categorical) and use AutoAmortizedFlow for the "
                    f"rest: AutoAmortizedFlow(poutine.block(model, hide=['{name}']))."
                )
            latents[name] = site
        if not latents:
            raise ValueError("the model has no continuous latent site for AutoAmortizedFlow")
        self._plate_frames = self._datapoint_plates(latents, observed)
        plate_dims = [f.dim for f in self._plate_frames]
        self._layout, self._slots, shapes = {}, {}, {}
        for name, site in observed.items():
            fn = site["fn"]
            batch = tuple(fn.batch_shape)
            # leading size-1 batch dims left of the plates (sbibm's simulation dim) broadcast:
            # at call time they may hold a batch of simulations, so they count as leading dims
            n_c = max((-d for d in plate_dims), default=0)
            while len(batch) > n_c and batch[0] == 1:
                batch = batch[1:]
            depth = max((-f.dim for f in site["cond_indep_stack"] if f.vectorized), default=0)
            layout = dict(
                batch_dim=len(batch),
                event_dim=fn.event_dim,
                plate_dims=plate_dims,
                plate_depth=depth,
            )
            proto = datapoints(torch.zeros(batch + tuple(fn.event_shape)), **layout)
            self._layout[name] = layout
            shapes[name] = proto.shape[max(min(depth, len(batch)), n_c) :]
            if site["is_observed"]:
                value = site["value"]
                slots = [i for i, a in enumerate(args) if a is value]
                slots += [k for k, v in kwargs.items() if v is value]
                self._slots[name] = slots[0] if slots else None
        self._observed_sites = set(observed)
        self._latent_sites = list(latents)
        self._sizes, self._bijections = {}, {}
        nets = {"embedding": ObservationEmbedding(shapes, self._embedding_net)}
        flows = []  # site k's flow at position k (site names may clash with attributes)
        context_dim = nets["embedding"].out_features
        for name, site in latents.items():
            bijection = interval_bijection(
                _static_support(site["fn"], name), self._interval_bijection
            )
            # the flow lives in the unconstrained space, whose shape may differ from the
            # site's (a simplex of D entries has D - 1 free coordinates)
            shape = torch.Size(bijection.inverse_shape(site["fn"].event_shape))
            dim = math.prod(shape)
            self._sizes[name] = (dim, shape)
            self._bijections[name] = bijection
            flows.append(_SiteFlow(dim, context_dim, **self._options))
            context_dim += dim
        first = next(iter(observed))
        value = (observations or {}).get(first, observed[first]["value"])
        options = {"device": value.device if torch.is_tensor(value) else None}
        if torch.is_tensor(value) and value.is_floating_point():
            options["dtype"] = value.dtype
        nets["flows"] = nn.ModuleList(flows)
        self.nets = nn.ModuleDict(nets).to(**options)

    def _datapoint_plates(self, latents: dict, observed: dict) -> list:
        frames = {
            name: sorted((f for f in site["cond_indep_stack"] if f.vectorized), key=lambda f: f.dim)
            for name, site in latents.items()
        }
        first, *rest = latents
        names = [f.name for f in frames[first]]
        for name in rest:
            if [f.name for f in frames[name]] != names:
                raise ValueError(
                    f"latent sites '{first}' and '{name}' lie in different plates "
                    f"({names} and {[f.name for f in frames[name]]}); AutoAmortizedFlow needs "
                    "every latent in the same plates. Combine guides for the parts by hand."
                )
        dims = {f.dim for f in frames[first]}
        for name, site in latents.items():
            batch = site["fn"].batch_shape
            for i, size in enumerate(batch):
                if size != 1 and i - len(batch) not in dims:
                    raise ValueError(
                        f"latent site '{name}' has batch shape {tuple(batch)} with dims that "
                        "are not plates; AutoAmortizedFlow models a site's value jointly. "
                        "Declare those dims as event dims (.to_event(n)) or as plates."
                    )
        for name, site in observed.items():
            missing = set(names) - {f.name for f in site["cond_indep_stack"]}
            if missing:
                raise ValueError(
                    f"observed site '{name}' is not in plate(s) {sorted(missing)} of the "
                    "latents: the guide conditions each datapoint's latents on its own "
                    "observations, so each observation must lie in the latents' plates."
                )
        return frames[first]

    # ----------------------------------------------------------------------------------------
    # Observations
    # ----------------------------------------------------------------------------------------
    def _read(self, args: tuple, kwargs: dict, observations: Mapping | None) -> dict:
        values = dict(observations or {})
        rerun = [
            n
            for n in self._observed_sites
            if n not in values and not (n in self._slots and self._slots[n] is not None)
        ]
        for name in self._observed_sites - set(values) - set(rerun):
            slot = self._slots[name]
            values[name] = args[slot] if isinstance(slot, int) else kwargs[slot]
        if rerun:
            with torch.no_grad():
                trace = poutine.block(poutine.trace(self.model).get_trace)(*args, **kwargs)
            for name in rerun:
                site = trace.nodes.get(name)
                if site is None or not site["is_observed"]:
                    raise ValueError(
                        f"AutoAmortizedFlow conditions on site '{name}', which is not observed "
                        "in this call of the model. Pass its value: "
                        f"guide(*args, observations={{'{name}': x}})."
                    )
                values[name] = site["value"]
        return {n: values[n] for n in self._observed_sites}

    def _plates(self, x: dict) -> tuple[list, Callable]:
        """The datapoint plates at this call's sizes, and a selector for minibatches."""
        plates, selects = [], []
        for f in self._plate_frames:
            sizes = {
                v.shape[v.dim() - len(self._nets["embedding"].shapes[n]) + f.dim]
                for n, v in x.items()
            }
            size = max(sizes)
            full = f.full_size if f.full_size is not None else f.size
            if full != f.size:  # subsampled in the prototype: keep the subsample size
                plates.append(pyro.plate(f.name, full, subsample_size=f.size, dim=f.dim))
                if size == full:
                    selects.append((len(plates) - 1, f.dim))
            else:
                plates.append(pyro.plate(f.name, size, dim=f.dim))
        return plates, selects

    def _context(self, x: dict, indices: dict) -> torch.Tensor:
        embedding = self._nets["embedding"]
        for dim, index in indices.items():
            x = {
                n: v.index_select(v.dim() - len(embedding.shapes[n]) + dim, index)
                for n, v in x.items()
            }
        context = embedding(x)
        n_c = max((-f.dim for f in self._plate_frames), default=0)
        while context.dim() - 1 > n_c and context.shape[0] == 1:
            context = context.squeeze(0)
        return context

    # ----------------------------------------------------------------------------------------
    # The guide
    # ----------------------------------------------------------------------------------------
    @property
    def _nets(self) -> nn.ModuleDict:
        # read past PyroModule's attribute access, which calls pyro.module (a pyro.param per
        # weight: a quarter of a training step); SVI's parameter capture still gets it below
        return self._modules["nets"]

    def _register(self) -> None:
        """Register the networks with Pyro when SVI captures parameters (param-only trace)."""
        if any(isinstance(h, TraceMessenger) and h.param_only for h in _PYRO_STACK):
            pyro.module(self._pyro_get_fullname("nets"), self._nets)

    def flow(self, name: str) -> nn.Module:
        """The conditional flow of latent site ``name`` (with its ``loc``/``scale`` buffers)."""
        return self._nets["flows"][self._latent_sites.index(name)]

    def _site_distribution(self, name: str, context: torch.Tensor) -> dist.TransformedDistribution:
        dim, shape = self._sizes[name]  # the unconstrained shape
        transforms = self.flow(name).transforms(context)
        if tuple(shape) != (dim,):
            transforms.append(ReshapeTransform((dim,), shape))
        transforms.append(self._bijections[name])
        base = dist.Normal(context.new_zeros(()), 1.0).expand(context.shape[:-1] + (dim,))
        return dist.TransformedDistribution(base.to_event(1), transforms)

    def forward(self, *args, observations: Mapping | None = None, **kwargs) -> dict:
        """
        Sample every latent site given the observations.

        :param observations: optional ``{observed site name: value}``.
        :returns: ``{latent site name: value}``.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, observations=observations, **kwargs)
        self._register()
        raw = self._read(args, kwargs, observations)
        x = {n: datapoints(v, **self._layout[n]) for n, v in raw.items()}
        plates, selects = self._plates(x)
        result = {}
        with ExitStack() as stack:
            entered = [stack.enter_context(p) for p in plates]
            indices = {dim: entered[i] for i, dim in selects}
            context = self._context(x, indices)
            for k, name in enumerate(self._latent_sites):
                value = pyro.sample(name, self._site_distribution(name, context))
                result[name] = value
                if k + 1 < len(self._latent_sites):
                    context = self._extend(context, name, value)
        return result

    def log_prob(self, latents: Mapping, observations: Mapping) -> torch.Tensor:
        r"""
        :math:`\log q(\theta \mid x)` of given latents, summed over the latent sites and the
        datapoint plates: one number per element of the leading (batch) dims, e.g. ``(B,)`` for
        ``B`` simulations as :class:`~pyro_rws.Simulations` store them. The same density the
        guide samples from and :class:`~pyro_rws.SleepPhaseLoss` scores (without Pyro's
        effect handlers: :func:`~pyro_rws.fit_guide` trains through it).

        :param dict latents: ``{latent site: value}``, with the site's shape after the
            leading dims.
        :param dict observations: ``{observed site: value}``, the same leading dims.
        """
        if self.prototype_trace is None:
            raise ValueError(
                "AutoAmortizedFlow.log_prob needs the model's structure: call the guide or "
                "standardize(simulations) first"
            )
        x = {n: datapoints(observations[n], **self._layout[n]) for n in self._observed_sites}
        context = self._context(x, {})
        total = 0.0
        for k, name in enumerate(self._latent_sites):
            value = latents[name]
            total = total + self._site_distribution(name, context).log_prob(value)
            if k + 1 < len(self._latent_sites):
                context = self._extend(context, name, value)
        n_c = max((-f.dim for f in self._plate_frames), default=0)
        return total.sum(tuple(range(-n_c, 0))) if n_c else total

    def _extend(self, context: torch.Tensor, name: str, value: torch.Tensor) -> torch.Tensor:
        dim, shape = self._sizes[name]
        u = self._bijections[name].inv(value)
        u = u.reshape(u.shape[: u.dim() - len(shape)] + (dim,))
        flow = self.flow(name)
        u = (u - flow.loc) / flow.scale
        batch = torch.broadcast_shapes(context.shape[:-1], u.shape[:-1])
        return torch.cat([context.expand(batch + context.shape[-1:]), u.expand(batch + (dim,))], -1)

    # ----------------------------------------------------------------------------------------
    # Standardization from simulations
    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def standardize(self, simulations, *args, **kwargs) -> AutoAmortizedFlow:
        """
        Set the standardization of observations and of the unconstrained latents from
        simulations (as ``sbi`` does before training).

        :param simulations: a :class:`~pyro_rws.Simulations`, or a dict ``{site name: values}``
            with the simulations along the leading dim, for latent and observed sites.
        :param args: model arguments, needed only if the guide has not been called yet.
        :returns: the guide.
        """
        values, observed = _simulated_values(simulations)
        if self.prototype_trace is None:
            if not args and not kwargs:
                args, kwargs = _model_args(simulations)
            self._setup_prototype(*args, observations=observed, **kwargs)
        observed = {
            n: datapoints(values[n], **self._layout[n]).reshape(
                (-1,) + self._nets["embedding"].shapes[n]
            )
            for n in self._observed_sites
            if n in values
        }
        self._nets["embedding"].standardize_from(observed)
        for name in self._latent_sites:
            if name not in values:
                continue
            dim, _ = self._sizes[name]
            u = self._bijections[name].inv(values[name].to(self.flow(name).loc))
            u = u.reshape(-1, dim)
            if not torch.isfinite(u).all():
                raise ValueError(
                    f"simulated values of site '{name}' lie outside (or on the boundary of) "
                    "its prior's support; standardize from samples of the prior"
                )
            std = u.std(0)
            self.flow(name).loc.copy_(u.mean(0))
            self.flow(name).scale.copy_(std.clamp(min=1e-6 * float(std.max()) + 1e-12))
        return self


def _simulated_values(simulations) -> tuple[dict, dict | None]:
    """``({site: values}, {observed site: values} or None if not known)``."""
    if isinstance(simulations, Mapping):
        return dict(simulations), None
    parts = {}
    for attr in ("latents", "observations"):
        part = getattr(simulations, attr, None)
        if isinstance(part, Mapping):
            parts.update(part)
    if parts:
        return parts, dict(simulations.observations)
    raise TypeError(
        "standardize expects pyro_rws.Simulations or a dict {site name: simulated values}, "
        f"got {type(simulations).__name__}"
    )


def _model_args(simulations) -> tuple[tuple, dict]:
    return tuple(getattr(simulations, "args", ())), dict(getattr(simulations, "kwargs", {}))
