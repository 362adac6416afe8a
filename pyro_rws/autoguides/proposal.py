# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
Inference compilation without writing a guide: :class:`AutoAmortizedProposal`.

The guide runs **the model itself**. At every latent sample site (address :math:`a_t`, met in
the model's own order, so the guide's control flow is the model's by construction) the prior is
replaced by a learned proposal; observed sites are hidden from the guide's trace. As in the
inference compilation of Le, Baydin & Wood (2017) and PyProb, a recurrent state is carried from
site to site:

.. math::

    e &= \mathrm{emb}(x), \qquad
    h_t = \mathrm{LSTM}\big([e,\ \alpha_{a_t},\ v_{a_{t-1}}(z_{t-1})],\ h_{t-1}\big), \\
    q_\phi(z \mid x) &= \prod_t q_{a_t}\big(z_t \mid \mathrm{head}_{a_t}([h_t, e])\big),

with :math:`x` the observed values (embedded once per run), :math:`\alpha_a` a learned address
embedding and :math:`v_a` an embedding of the value drawn at :math:`a`. The head of an address,
its :math:`\alpha_a` and :math:`v_a` are created the first time the address is met. The
proposal family follows the prior's support: ``Categorical`` logits for
``integer_interval(0, K-1)`` (Categorical, Binomial with a scalar count), ``Bernoulli`` logits
for ``boolean``, and for a continuous support a Normal (or a mixture of Normals) on the
unconstrained space pushed through ``biject_to(support)``; where the support is the real line
and the prior has a finite mean and standard deviation, the Normal is parameterized relative to
the prior, :math:`\mu = \mu_p + \sigma_p\,u,\ \sigma = \sigma_p\,\mathrm{softplus}(s)`
(the prior's moments are detached: the model's parameters get no gradient from the guide). Any
other site keeps its prior as the proposal (with a warning once per address).

The observations reach the guide in one of three ways, in this order: the ``observations=``
keyword (Pyro's CSIS convention, which the sleep phase of every pyro_rws loss uses); the
``observations_from`` callable given to the constructor; or a run of the model with the
caller's arguments, hidden from every other handler and with the random state restored, that
reads the ``obs=`` values (cached for repeated calls with the same argument tensors).

Batch dimensions: plates active when the guide is called (the particle plate of a vectorized
loss, ``Predictive(parallel=True)``) index independent runs; the recurrent state carries them,
and the observations are embedded per run. The model's own plates are broadcast over: the state
is one per run, and the embedding of a latent's value enters it averaged over the plate. A
latent :math:`z_i` inside model plates is proposed per element: its head also reads, per
element, the values of the observed sites in exactly the same (unsubsampled) plates,

.. math:: q_a(z_i \mid \mathrm{head}_a([h_t, e, x_i])),

so that local latents are amortized per datapoint (``local_observations=False``: the same
proposal for every element, which is still a valid proposal with the prior's support, but one
fitted by the sleep phase to the plate-average of the elements' posteriors).

**Addresses.** By default every site name is its own address. ``address=`` maps a site name to
the address whose head, :math:`\alpha_a` and :math:`v_a` it uses, so that sites met in a loop
or a recursion (``f"loc_{i}"``, a grammar's tree paths ``t0/S/0NP/1PP``) share one proposal,
as PyProb's addresses (code location and distribution) do. Sites of one address must agree on
the proposal family, the event shape and the number of categories (or the unconstrained shape)
of their priors, and lie in the same model plates; a disagreement is a ValueError.

**Observations of varying shape** (sentences of varying length): ``variable_shape=True`` with a
user's ``embedding_net``, the convention of :mod:`pyro_rws.autoguides.embedding` (no shape
check, no standardization, the values reach the net as observed).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.params.param_store import param_with_module_name
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.subsample_messenger import SubsampleMessenger
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.poutine.util import site_is_subsample
from torch import nn

from .._traces import _cuda_devices
from ._heads import _broadcast, _Head, _key, _unwrap, head_prior
from .embedding import ObservationEmbedding, check_observation_shape, datapoints


def _outer_batch() -> tuple[tuple[int, ...], int]:
    """
    The batch shape of independent runs: vectorized plates active before the model runs (the
    particle plate, ``Predictive(parallel=True)``), with ones at the model's own plate dims.
    Returns ``(shape, innermost outer dim)``; ``((), 0)`` if there is none.
    """
    sizes = {}
    for m in _PYRO_STACK:
        if isinstance(m, SubsampleMessenger) and m._vectorized and m.dim is not None:
            sizes[m.dim] = m.subsample_size if m.subsample_size is not None else m.size
    if not sizes:
        return (), 0
    inner = max(sizes)
    shape = tuple(sizes.get(d, 1) for d in range(min(sizes), 0))
    return shape, inner


class _Run(Messenger):
    """One run of the guide: proposals at the model's latent sites, observed sites hidden."""

    def __init__(
        self,
        guide: AutoAmortizedProposal,
        embedding: torch.Tensor,
        observations: dict | None = None,
    ):
        super().__init__()
        self.guide, self.embedding = guide, embedding
        self.observations = observations or {}
        self.outer = {  # plates active before the model runs: independent runs, not the model's
            m.name for m in _PYRO_STACK if isinstance(m, SubsampleMessenger) and m._vectorized
        }
        batch = embedding.shape[:-1]
        zeros = embedding.new_zeros
        self.h = zeros(batch + (guide.hidden_dim,))
        self.c = zeros(batch + (guide.hidden_dim,))
        self.prev = zeros(batch + (guide.value_dim,))
        self.priors = {}  # site name -> (prior, head), between process and postprocess

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or site_is_subsample(msg):
            return
        if msg["is_observed"]:  # not part of the guide: hidden from every outer handler
            msg["stop"] = True
            return
        name, prior = msg["name"], msg["fn"]
        plates = frozenset(
            f.name for f in msg["cond_indep_stack"] if f.vectorized and f.name not in self.outer
        )
        head = self.guide._head(name, prior, self.embedding, plates)
        batch = self.embedding.shape[:-1]
        inputs = torch.cat([self.embedding, head.address.expand(batch + (-1,)), self.prev], -1)
        flat = (-1, self.guide.hidden_dim)
        h, c = self.guide.lstm(
            inputs.reshape(-1, inputs.shape[-1]), (self.h.reshape(flat), self.c.reshape(flat))
        )
        self.h, self.c = h.reshape(self.h.shape), c.reshape(self.c.shape)
        features = torch.cat([self.h, self.embedding], -1)
        if head.local:
            features = self._with_local(features, head, prior)
        msg["fn"] = head.proposal(features, prior)
        self.priors[name] = (prior, head)
        infer = msg["infer"] or {}
        if "enumerate" in infer:  # the guide samples every latent it proposes
            msg["infer"] = {k: v for k, v in infer.items() if k != "enumerate"}

    def _with_local(self, features: torch.Tensor, head: _Head, prior) -> torch.Tensor:
        """
        The features of every plate element: the run's features with, per element, the values
        of the observed sites in exactly the latent's plates (``head.local``: name, event dim,
        width; zeros where a site is absent or does not broadcast to the latent's plates).
        """
        batch = _broadcast(features.shape[:-1], prior.batch_shape)
        parts = [features.expand(batch + features.shape[-1:])]
        for name, event_dim, width in head.local:
            value = self.observations.get(name)
            part = None
            if value is not None:
                value = torch.as_tensor(value).to(features)
                value = value.reshape(value.shape[: value.dim() - event_dim] + (-1,))
                if value.shape[-1] == width and value.dim() - 1 <= len(batch):
                    try:
                        part = value.expand(batch + (width,))
                    except RuntimeError:
                        part = None
            parts.append(part if part is not None else features.new_zeros(batch + (width,)))
        return torch.cat(parts, -1)

    def _postprocess_message(self, msg) -> None:
        entry = self.priors.pop(msg["name"], None) if msg["type"] == "sample" else None
        if entry is None:  # not a latent site of the model (its value may be conditioned)
            return
        prior, head = entry
        emb = head.embed_value(msg["value"], prior, self.embedding.dtype)
        self.prev = _reduce_to(emb, self.embedding.shape[:-1])


def _leaves(obj) -> list:
    """The leaves of nested lists, tuples and dicts of arguments (tensors, numbers, ...)."""
    if isinstance(obj, (list, tuple)):
        return [leaf for item in obj for leaf in _leaves(item)]
    if isinstance(obj, dict):
        return [leaf for key in obj for leaf in (key, *_leaves(obj[key]))]
    return [obj]


def _same(a, b) -> bool:
    """Equal non-tensor arguments (the cache of the observations is kept only for these)."""
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # an argument without a plain equality: no cache
        return False


def _reduce_to(x: torch.Tensor, batch: torch.Size) -> torch.Tensor:
    """Average ``x`` (``shape + (V,)``) over the dims that ``batch`` does not have (plates)."""
    extra = x.dim() - 1 - len(batch)
    if extra > 0:
        x = x.mean(tuple(range(extra)))
    elif extra < 0:
        x = x.reshape((1,) * -extra + x.shape)
    dims = tuple(i for i, n in enumerate(batch) if n == 1 and x.shape[i] != 1)
    if dims:
        x = x.mean(dims, keepdim=True)
    return x.expand(tuple(batch) + x.shape[-1:])


class AutoAmortizedProposal(nn.Module):
    r"""
    An amortized proposal built from the model: a guide for inference compilation without
    writing one (see :mod:`pyro_rws.autoguides.proposal` for the construction).

    Train it like any amortized guide, by :class:`~pyro_rws.SleepPhaseLoss` (inference
    compilation, no data needed), :class:`~pyro_rws.RWS` wake-φ on observations, or both, and
    use it as the proposal of :func:`~pyro_rws.log_evidence` or importance sampling::

        guide = AutoAmortizedProposal(simulator)
        svi = SVI(simulator, guide, pyro.optim.Adam({"lr": 1e-3}),
                  loss=SleepPhaseLoss(num_particles=32, vectorize_particles=False))
        for step in range(1000):
            svi.step(placeholder)   # the guide sees fantasies in place of the data

    It is called with the model's arguments (and, optionally, ``observations={site: value}``)
    and registers itself with :func:`pyro.module` under SVI's parameter capture, so a
    :mod:`pyro.optim` optimizer trains the parameters of every address, including those created
    on later steps. With a plain
    :mod:`torch.optim` optimizer, create the addresses first, ``guide.prepare(*args)`` (runs the
    guide on simulations from the model), then build the optimizer on
    ``guide.parameters()``; an address first met after :meth:`prepare` is passed to
    ``on_new_address`` (``guide.on_new_address = lambda name, params:
    optimizer.add_param_group({"params": params})``) or, if that is None, warned about.

    A model with stochastic control flow (a Python loop over a sampled count) needs
    ``vectorize_particles=False`` in the loss, as the model itself does.

    :param callable model: the Pyro model (not registered as a submodule: its parameters are
        not the guide's).
    :param embedding_net: the embedding of the observations, as in
        :class:`~pyro_rws.autoguides.embedding.ObservationEmbedding` (which standardizes and
        embeds them, one datapoint per run; by default a network chosen from their shapes).
    :param bool variable_shape: the observed values may change shape between runs (sentences
        of varying length); needs ``embedding_net``, which then receives them as observed, with
        no shape check and no standardization.
    :param callable address: ``site name -> address``: sites mapped to one address share its
        head, address embedding and value embedding (default: every site its own address);
        e.g. ``lambda name: name.rstrip("0123456789")`` shares ``loc_0, loc_1, ...``.
    :param int hidden_dim: size of the LSTM state.
    :param int address_dim: size of the address embeddings.
    :param int value_dim: size of the value embeddings.
    :param int num_components: Normal components of the proposal at continuous sites (1: a
        Normal; more: a mixture of Normals), on the unconstrained space.
    :param str continuous: the proposal at continuous sites: ``"normal"`` (a Normal or a
        mixture of ``num_components`` Normals) or ``"flow"`` (the conditional flow of
        :class:`~pyro_rws.AutoAmortizedFlow`: a spline for a scalar site, a masked autoregressive
        flow for a vector), on the unconstrained space, relative to the prior where its support
        is the real line.
    :param callable observations_from: ``(*args, **kwargs) -> {site: value}``, the observed
        values for a call without ``observations=`` (by default read from a hidden run of the
        model).
    :param int num_standardize: on the first call, the observations are standardized by the
        mean and std of this many simulations from the model (0: not standardized;
        :meth:`prepare` sets them from its own simulations). Default 100, and 0 with
        ``variable_shape`` (where a positive value is an error).
    :param bool local_observations: feed the head of a latent inside model plates, per plate
        element, the values of the observed sites in exactly the same plates (so that a local
        latent :math:`z_i` is proposed from its own :math:`x_i`); False: one proposal for every
        element.
    :param str name: the prefix of the parameters in Pyro's param store.

    References

    [1] `Inference Compilation and Universal Probabilistic Programming`, Tuan Anh Le,
        Atilim Gunes Baydin, Frank Wood (AISTATS 2017), arXiv:1610.09900
    """

    def __init__(
        self,
        model: Callable,
        *,
        embedding_net: nn.Module | None = None,
        hidden_dim: int = 64,
        address_dim: int = 16,
        value_dim: int = 16,
        num_components: int = 1,
        continuous: str = "normal",
        observations_from: Callable | None = None,
        num_standardize: int | None = None,
        local_observations: bool = True,
        variable_shape: bool = False,
        address: Callable[[str], str] | None = None,
        name: str = "AutoAmortizedProposal",
    ):
        super().__init__()
        self._model = (model,)  # a tuple: a model module is not a submodule of the guide
        self.embedding_net = embedding_net
        self.variable_shape = bool(variable_shape)
        if self.variable_shape and embedding_net is None:
            raise ValueError(
                "variable_shape=True needs an embedding_net that reads observations of varying "
                "shape (e.g. a recurrent network over a sequence): the default networks are "
                "built for one fixed shape"
            )
        if num_standardize is None:
            num_standardize = 0 if self.variable_shape else 100
        if self.variable_shape and num_standardize > 0:
            raise ValueError(
                "observations of variable shape are not standardized: use num_standardize=0 "
                "and normalize them inside embedding_net"
            )
        self.address = address
        self.hidden_dim, self.address_dim = int(hidden_dim), int(address_dim)
        self.value_dim, self.num_components = int(value_dim), int(num_components)
        if continuous not in ("normal", "flow"):
            raise ValueError(f"continuous must be 'normal' or 'flow', got {continuous!r}")
        self.continuous = continuous
        self.observations_from = observations_from
        self.num_standardize = int(num_standardize)
        self.local_observations = bool(local_observations)
        self.name = name
        self.register_buffer("_ref", torch.zeros(()), persistent=False)  # dtype and device
        self.embedding: ObservationEmbedding | None = None  # created on the first call
        self.lstm: nn.LSTMCell | None = None
        self.heads = nn.ModuleDict()
        #: observed site -> (batch dims, event dims, shape per run), from the first call
        self.observed: dict[str, tuple[int, int, tuple]] = {}
        #: observed site -> (its plates, event dim, values per element), for local proposals
        self.observed_plates: dict[str, tuple[frozenset, int, int]] = {}
        self._observed_dtypes: dict[str, torch.dtype] = {}
        self.on_new_address: Callable | None = None
        self._prepared = False
        self._cache = None
        self._params = None

    @property
    def model(self) -> Callable:
        return self._model[0]

    @property
    def addresses(self) -> list[str]:
        """The addresses met so far (by default the latent sites' names), each with its head."""
        return [k[len("site_") :].replace("\u2024", ".") for k in self.heads]

    def forward(self, *args, observations: dict | None = None, **kwargs) -> None:
        self._register()
        if observations is None and self.observations_from is not None:
            observations = self.observations_from(*args, **kwargs)
        if observations is None:
            observations = self._read_observations(args, kwargs)
        elif any(name not in self.observed for name in observations):
            self._read_observations(args, kwargs, uncondition=True)
        run = _Run(self, self._embed(observations, args, kwargs), observations)
        before = len(self.heads)
        with run:
            self.model(*args, **kwargs)
        if len(self.heads) > before:
            self._register()  # the new heads reach the optimizer of SVI

    def _register(self) -> None:
        """
        :func:`pyro.module` of the guide when SVI captures parameters (a param-only trace is
        on the stack), so that its optimizer sees every parameter, with the parameter names
        cached; if the param store holds another tensor under a name (a loaded store),
        ``pyro.module`` loads it into the guide.
        """
        if not any(isinstance(h, TraceMessenger) and h.param_only for h in _PYRO_STACK):
            return
        key = (len(self.heads), self.lstm is not None)
        if self._params is None or self._params[0] != key:
            named = self.named_parameters()
            self._params = (
                key,
                [(param_with_module_name(self.name, n), p) for n, p in named if p.requires_grad],
            )
        for full_name, p in self._params[1]:
            if pyro.param(full_name, p) is not p:
                pyro.module(self.name, self)
                self._params = None
                return

    # ----------------------------------------------------------------------------------------
    def _read_observations(self, args, kwargs, uncondition: bool = False) -> dict:
        """The observed values, from a run of the model hidden from every other handler."""
        tensors = [(a, a._version if torch.is_tensor(a) else None) for a in _leaves((args, kwargs))]
        if not uncondition and self._cache is not None and len(self._cache[0]) == len(tensors):
            if all(
                (a is b or (v is None and w is None and _same(a, b))) and v == w
                for (a, v), (b, w) in zip(self._cache[0], tensors, strict=True)
            ):
                return self._cache[1]
        model = poutine.uncondition(self.model) if uncondition else self.model
        with torch.random.fork_rng(devices=_cuda_devices()), torch.no_grad():
            with poutine.block():
                trace = poutine.trace(model).get_trace(*args, **kwargs)
        observed = {}
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and not site_is_subsample(site):
                if site["is_observed"] or (uncondition and site["infer"].get("was_observed")):
                    if not site["infer"].get("_deterministic"):
                        value = torch.as_tensor(site["value"])
                        observed[name] = value
                        if name not in self.observed:
                            self._observed_dtypes[name] = value.dtype
                            event_dim = site["fn"].event_dim
                            batch_dim = max(value.dim() - event_dim, 0)
                            shape = datapoints(
                                value, batch_dim=batch_dim, event_dim=event_dim, plate_dims=()
                            ).shape[batch_dim:]
                            self.observed[name] = (batch_dim, event_dim, tuple(shape))
                            frames = [f for f in site["cond_indep_stack"] if f.vectorized]
                            if frames and all(
                                f.full_size is None or f.full_size == f.size for f in frames
                            ):  # (a subsampled plate's hidden run drew another minibatch)
                                width = math.prod(value.shape[value.dim() - event_dim :])
                                plates = frozenset(f.name for f in frames)
                                self.observed_plates[name] = (plates, event_dim, width)
        if not uncondition:
            self._cache = (tensors, observed)
        return observed

    def _embed(self, observations: dict, args: tuple, kwargs: dict) -> torch.Tensor:
        """
        The context of each run, ``batch + (features,)``: the observations laid out and
        embedded by :class:`~pyro_rws.autoguides.embedding.ObservationEmbedding` (one datapoint
        per run), broadcast to the runs of this call.
        """
        batch, _ = _outer_batch()
        ref = self._ref
        if self.lstm is None and self.embedding is None and self.observed:
            shapes = {name: spec[2] for name, spec in self.observed.items()}
            self.embedding = ObservationEmbedding(
                shapes,
                self.embedding_net,
                variable_shape=self.variable_shape,
                dtypes=self._observed_dtypes,
            )
            self.to(device=ref.device, dtype=ref.dtype)
            if self.num_standardize > 0:
                with torch.random.fork_rng(devices=_cuda_devices()):
                    self._standardize(self._simulate(args, kwargs, self.num_standardize))
        if self.embedding is None:
            context = ref.new_zeros(tuple(batch) + (0,))
        else:
            context = self.embedding(self._lay_out(observations))
            lead = context.shape[:-1]
            if len(lead) > len(batch):
                context = context.reshape(lead[len(lead) - len(batch) :] + context.shape[-1:])
            context = context.expand(tuple(batch) + context.shape[-1:])
        if self.lstm is None:  # created once the context's size is known
            inputs = context.shape[-1] + self.address_dim + self.value_dim
            self.lstm = nn.LSTMCell(inputs, self.hidden_dim).to(device=ref.device, dtype=ref.dtype)
        return context

    def _lay_out(self, observations: dict) -> dict:
        """``{site: one datapoint per run}`` for the embedding (zeros for a site not met)."""
        ref, values = self._ref, {}
        for name, (batch_dim, event_dim, shape) in self.observed.items():
            value = observations.get(name)
            if value is None:  # not met in this run: zeros
                values[name] = self.embedding.absent(name, ref)
                continue
            if self.variable_shape:  # as observed: any shape, its own dtype (word indices)
                values[name] = torch.as_tensor(value).to(device=ref.device)
                continue
            value = torch.as_tensor(value).to(device=ref.device, dtype=ref.dtype)
            try:
                values[name] = datapoints(
                    value, batch_dim=batch_dim, event_dim=event_dim, plate_dims=()
                )
            except (ValueError, RuntimeError) as e:
                raise ValueError(
                    f"observed site '{name}' had shape {shape} per run when first seen, but a "
                    f"value of shape {tuple(value.shape)} now. AutoAmortizedProposal needs the "
                    "same observed sites and shapes in every run, or an embedding_net that "
                    "reads values of varying shape with variable_shape=True."
                ) from e
        return values

    def _head(self, name: str, prior, embedding: torch.Tensor, plates=frozenset()) -> _Head:
        address = name if self.address is None else self.address(name)
        key = _key(address)
        head = self.heads[key] if key in self.heads else None
        if head is not None:
            head.check(name, address, prior, plates)
        if head is None:
            fn = _unwrap(prior)
            local = ()
            if plates and self.local_observations:
                local = tuple(
                    (obs, event_dim, width)
                    for obs, (obs_plates, event_dim, width) in sorted(self.observed_plates.items())
                    if obs_plates == plates
                )
            head = _Head(
                head_prior(prior),
                self.hidden_dim + embedding.shape[-1] + sum(w for _, _, w in local),
                self.address_dim,
                self.value_dim,
                self.num_components,
                self.continuous == "flow",
            ).to(device=embedding.device, dtype=embedding.dtype)
            head.local, head.plates = local, plates
            self.heads[key] = head
            if head.kind == "prior":
                warnings.warn(
                    f"AutoAmortizedProposal has no proposal family for site '{name}' "
                    f"({type(fn).__name__}, support {prior.support}): it proposes from the "
                    "prior there.",
                    UserWarning,
                    stacklevel=4,
                )
            if self._prepared:
                self._new_address(address, list(head.parameters()))
        return head

    def _new_address(self, name: str, params: list) -> None:
        if self.on_new_address is not None:
            self.on_new_address(name, params)
            return
        warnings.warn(
            f"AutoAmortizedProposal met the new address '{name}' after prepare(): its "
            "parameters are not in a torch.optim optimizer built before. Add them with "
            "guide.on_new_address = lambda name, params: optimizer.add_param_group("
            "{'params': params}), prepare() on more simulations, or use pyro.optim (which "
            "picks up new parameters).",
            UserWarning,
            stacklevel=5,
        )

    def _simulate(self, args, kwargs, num: int) -> list:
        """``num`` unconditioned runs of the model (hidden, no gradient): traces and fantasies."""
        runs = []
        with torch.no_grad(), poutine.block():
            for _ in range(num):
                trace = poutine.trace(poutine.uncondition(self.model)).get_trace(*args, **kwargs)
                obs = {
                    n: s["value"]
                    for n, s in trace.nodes.items()
                    if s["type"] == "sample" and s["infer"].get("was_observed")
                }
                runs.append((trace, obs))
        return runs

    def _standardize(self, runs: list) -> None:
        """Standardize each observed site by the mean and std of its simulated values."""
        if self.embedding is None or self.variable_shape:  # (not standardized)
            return
        values = {}
        for name, (batch_dim, event_dim, _) in self.observed.items():
            found = [obs[name] for _, obs in runs if name in obs]
            for value in found[1:]:
                check_observation_shape(name, value.shape, found[0].shape)
            if len(found) > 1:
                values[name] = torch.stack(
                    [
                        datapoints(v, batch_dim=batch_dim, event_dim=event_dim, plate_dims=())
                        for v in found
                    ]
                ).to(self._ref)
        self.embedding.standardize_from(values)

    def prepare(
        self, *args, num_simulations: int = 100, standardize: bool = True, **kwargs
    ) -> AutoAmortizedProposal:
        """
        Run the guide on ``num_simulations`` runs of the model (with these arguments,
        unconditioned): this creates the embedding and the head of every address met, so that
        ``parameters()`` holds them before a :mod:`torch.optim` optimizer is built, and (with
        ``standardize``) sets the standardization of the observations from the simulated ones.
        Returns the guide.
        """
        runs = self._simulate(args, kwargs, num_simulations)
        with torch.no_grad(), poutine.block():
            for trace, obs in runs:
                poutine.replay(self, trace=trace)(*args, observations=obs, **kwargs)
        if standardize:
            self._standardize(runs)
        self._prepared = True
        return self

    def head_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters of the head of address ``name`` (or of the address of site ``name``)."""
        key = _key(name)
        if key not in self.heads and self.address is not None:
            key = _key(self.address(name))
        return list(self.heads[key].parameters())


__all__ = ["AutoAmortizedProposal"]
