# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
Observation embeddings: the one convention by which amortized autoguides read the data.

An amortized guide :math:`q_\phi(z \mid x)` computes its parameters from the model's observed
values :math:`x = \{\text{site name}: x_\text{site}\}`. Every amortized autoguide of pyro_rws
(:class:`~pyro_rws.AutoAmortizedFlow`, the automatic proposal) reads them the same way:

1. **Layout.** Each observed value is cut into *datapoints* by :func:`datapoints`: the dims of
   the plates its latents lie in stay in front (with any particle dims left of them); every
   other dim of the value (its event dims, and batch dims that are not those plates, such as
   iid repeats inside one simulation) forms the per-datapoint *shape* of the observation.
2. **Standardization.** Per site and per element, :math:`\tilde x = (x - m) / s`, with ``m`` and
   ``s`` registered buffers (so they move with ``.to(device)`` and are saved in the
   ``state_dict``), the identity until :meth:`ObservationEmbedding.standardize_from` sets them
   from simulated observations (``s`` is floored at ``1e-6`` times its largest value plus a
   tiny constant, so constant elements do not divide by zero).
3. **Embedding.** Per site, a network chosen from its per-datapoint shape by
   :func:`default_embedding_net`:

   - a vector (or any shape that is not image-like) is flattened; up to
     :data:`MAX_IDENTITY_FEATURES` features it is used as it is (as ``sbi``'s default
     ``embedding_net=nn.Identity()``: the flow's conditioner reads it directly), above that an
     MLP (two hidden layers of 100, ReLU) maps it to 64 features;
   - an image-like shape, ``(H, W)`` or ``(C, H, W)`` with ``C <= 4`` and ``H, W >= 8``, goes
     through a small CNN (two 3x3 convolutions with 2x2 max-pooling, then a linear layer to 64
     features).

   A user's ``embedding_net`` replaces these: it receives the standardized tensor of the only
   observed site (``batch + shape``), or the dict ``{site name: standardized tensor}`` when there
   are several, and must return ``batch + (features,)``.
4. **Concatenation.** The per-site embeddings are concatenated, in sorted site-name order, into
   the context vector ``batch + (out_features,)``; batch dims broadcast between sites.

**Observations of varying shape** (sentences of varying length, a random number of points):
the default networks are built for one per-datapoint shape, and a value of another shape is a
ValueError (:func:`check_observation_shape`). With a user's ``embedding_net`` and
``variable_shape=True`` the shapes may vary between runs: no shape check, no standardization
(statistics over values of different shapes have no elementwise meaning, and integer codes
such as word indices must not be shifted and scaled), and the values reach ``embedding_net``
exactly as observed (same dtype, e.g. ``long`` word indices), the only site's value or the
dict ``{site name: value}``; the net does any normalization itself and returns
``batch + (features,)`` (``out_features`` is read from its first output). A site absent from
a run is given as zeros of the shape and dtype it had when first seen.
The convention's public pieces are :func:`datapoints`, :func:`default_embedding_net`,
:class:`Standardize` and :class:`ObservationEmbedding`; their signatures are stable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

#: Flat observations with at most this many features are used without an embedding network.
MAX_IDENTITY_FEATURES = 64

_EMBED_FEATURES = 64


def datapoints(
    value: torch.Tensor,
    *,
    batch_dim: int,
    event_dim: int,
    plate_dims: Sequence[int],
    plate_depth: int | None = None,
) -> torch.Tensor:
    """
    Cut an observed value into datapoints: ``lead + ones + C + shape``.

    ``value`` has shape ``lead + batch + event`` with ``len(batch) == batch_dim`` and
    ``len(event) == event_dim`` (``lead``: particle or sample dims added left of the model's
    own batch dims). ``plate_dims`` are the (negative, Pyro-style) dims of the plates that index
    datapoints, i.e. the plates the guide's latents lie in. ``C`` keeps their sizes at their
    dims and has size 1 at every other dim right of the leftmost of them, and ``ones`` are
    size-1 dims standing for the plate dims of the value left of ``C`` (``plate_depth - len(C)``
    of them; ``plate_depth``, the depth of the value's deepest plate, defaults to
    ``batch_dim``), so that ``lead + ones + C`` broadcasts like the batch shape of a sample
    site in the plates ``plate_dims`` (``lead`` keeps its position relative to the model's
    plates: particle dims sit left of every plate). ``shape`` is ``event`` if the value has no
    other batch dims, else every other batch dim and the event flattened into one dim.

    :param torch.Tensor value: the observed value.
    :param int batch_dim: number of batch dims of the observation in the model.
    :param int event_dim: number of event dims of the observation in the model.
    :param plate_dims: dims of the datapoint plates (each ``< 0``).
    :param int plate_depth: ``-dim`` of the value's leftmost plate (0: no plate).
    """
    lead = value.dim() - batch_dim - event_dim
    if lead < 0:
        raise ValueError(
            f"observed value of shape {tuple(value.shape)} has fewer dims than its batch "
            f"({batch_dim}) and event ({event_dim}) dims in the model"
        )
    n_c = max((-d for d in plate_dims), default=0)
    if n_c > batch_dim:
        raise ValueError(
            f"observed value of shape {tuple(value.shape)} with {batch_dim} batch dim(s) cannot "
            f"lie in a plate at dim {-n_c}: an observation must lie in every plate of the "
            "latents the guide conditions on it"
        )
    first = value.dim() - event_dim  # index just right of the batch dims
    keep = sorted(first + d for d in plate_dims)
    others = [i for i in range(lead, first) if i not in keep]
    c_shape = tuple(value.shape[first + d] if d in plate_dims else 1 for d in range(-n_c, 0))
    depth = batch_dim if plate_depth is None else min(plate_depth, batch_dim)
    lead_shape = tuple(value.shape[:lead]) + (1,) * max(depth - n_c, 0)
    if not others:
        return value.reshape(lead_shape + c_shape + tuple(value.shape[first:]))
    flat = math.prod(value.shape[i] for i in others) * math.prod(value.shape[first:])
    value = value.permute(list(range(lead)) + keep + others + list(range(first, value.dim())))
    return value.reshape(lead_shape + c_shape + (flat,))


def _is_image(shape: Sequence[int]) -> bool:
    if len(shape) == 2:
        return min(shape) >= 8
    return len(shape) == 3 and shape[0] <= 4 and min(shape[1:]) >= 8


class _Flatten(nn.Module):
    """Flatten the last ``ndim`` dims (any leading dims kept)."""

    def __init__(self, ndim: int):
        super().__init__()
        self.ndim = ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ndim == 1:
            return x
        return x.reshape(x.shape[: x.dim() - self.ndim] + (-1,))


class _CNN(nn.Module):
    """Two 3x3 convolutions with max-pooling and a linear layer, over any leading dims."""

    def __init__(self, shape: Sequence[int], out_features: int):
        super().__init__()
        self.shape = tuple(shape) if len(shape) == 3 else (1, *shape)
        c, h, w = self.shape
        self.net = nn.Sequential(
            nn.Conv2d(c, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * (h // 4) * (w // 4), out_features),
            nn.ReLU(),
        )
        self.event_ndim = len(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[: x.dim() - self.event_ndim]
        out = self.net(x.reshape((-1,) + self.shape))
        return out.reshape(lead + out.shape[-1:])


def default_embedding_net(shape: Sequence[int]) -> nn.Module:
    """
    The default embedding of one observed site with per-datapoint shape ``shape`` (see the
    module docstring): identity for a flat vector of at most :data:`MAX_IDENTITY_FEATURES`
    features, an MLP for a larger one, a small CNN for an image-like shape. The module maps
    ``batch + shape`` to ``batch + (features,)``.

    :param shape: the per-datapoint shape of the observation.
    """
    shape = tuple(int(s) for s in shape)
    if _is_image(shape):
        return _CNN(shape, _EMBED_FEATURES)
    numel = math.prod(shape)
    flatten = _Flatten(max(len(shape), 1))
    if len(shape) == 0:
        return _Unsqueeze()
    if numel <= MAX_IDENTITY_FEATURES:
        return flatten
    return nn.Sequential(
        flatten,
        nn.Linear(numel, 100),
        nn.ReLU(),
        nn.Linear(100, 100),
        nn.ReLU(),
        nn.Linear(100, _EMBED_FEATURES),
    )


class _Unsqueeze(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-1)


class Standardize(nn.Module):
    """
    Elementwise ``(x - mean) / std`` over a per-datapoint ``shape``, with ``mean`` and ``std``
    buffers (identity until :meth:`standardize_from` sets them). Inputs are cast to the buffers'
    dtype (integer or boolean observations included).

    :param shape: the per-datapoint shape (the trailing dims of every input).
    """

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.register_buffer("mean", torch.zeros(self.shape))
        self.register_buffer("std", torch.ones(self.shape))

    @torch.no_grad()
    def standardize_from(self, values: torch.Tensor) -> None:
        """
        Set ``mean`` and ``std`` from ``values`` of shape ``(..., *shape)`` (every leading dim is
        a sample; non-finite entries raise).

        :param torch.Tensor values: samples, e.g. simulated observations.
        """
        flat = values.detach().reshape((-1,) + self.shape).to(self.mean)
        if flat.shape[0] < 2:
            raise ValueError("standardize_from needs at least 2 samples to estimate a std")
        if not torch.isfinite(flat).all():
            raise ValueError(
                "standardize_from got non-finite values (nan or inf): remove failed simulations "
                "before standardizing"
            )
        std = flat.std(0)
        floor = 1e-6 * std.max() + 1e-12
        self.mean.copy_(flat.mean(0))
        self.std.copy_(std.clamp(min=floor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.mean.dtype) - self.mean) / self.std


def check_observation_shape(name: str, shape: Sequence[int], expected: Sequence[int]) -> None:
    """
    Raise a ValueError if an observed value of shape ``shape`` does not end in the per-datapoint
    shape ``expected`` that the embedding was built for (observations whose shape changes
    between runs, such as sentences of varying length, cannot be embedded by shape).
    """
    expected = tuple(expected)
    shape = tuple(shape)
    if len(shape) < len(expected) or shape[len(shape) - len(expected) :] != expected:
        raise ValueError(
            f"observed site {name!r} has shape {shape}, but the embedding of the observations "
            f"was built for values of shape batch + {expected}. An observation whose shape "
            "changes between runs (a sentence of varying length, a variable number of points) "
            "cannot be embedded by its shape: pass an embedding_net that reads such values "
            "(e.g. a recurrent network over a sequence) together with variable_shape=True, or "
            "give the model a fixed-shape observation (pad to a maximum length and observe the "
            "length too)."
        )


class ObservationEmbedding(nn.Module):
    """
    Standardize and embed the observed values ``{site name: batch + shape}`` into a context
    ``batch + (out_features,)`` (see the module docstring).

    :param shapes: ``{site name: per-datapoint shape}`` of every observed site the guide reads
        (with ``variable_shape``: the shape first seen, used only for absent sites).
    :param embedding_net: optional module replacing the default per-site networks; it receives
        the standardized tensor of the only site, or ``{site name: tensor}`` for several.
    :param bool variable_shape: the observations' shapes may vary between runs (needs
        ``embedding_net``): no shape check and no standardization, the values reach
        ``embedding_net`` as observed.
    :param dtypes: with ``variable_shape``, ``{site name: dtype}`` of the zeros given for a site
        absent from a run (default: the default dtype).
    :ivar int out_features: size of the context vector (with ``variable_shape``: None until the
        first call).
    """

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        embedding_net: nn.Module | None = None,
        *,
        variable_shape: bool = False,
        dtypes: Mapping[str, torch.dtype] | None = None,
    ):
        super().__init__()
        if not shapes:
            raise ValueError(
                "an amortized guide needs at least one observed site to condition on; the model "
                "has none (observe the data with pyro.sample(..., obs=x))"
            )
        if variable_shape and embedding_net is None:
            raise ValueError(
                "variable_shape=True needs an embedding_net that reads observations of varying "
                "shape (e.g. a recurrent network over a sequence): the default networks are "
                "built for one fixed shape"
            )
        self.names = sorted(shapes)
        self.shapes = {name: tuple(int(s) for s in shapes[name]) for name in self.names}
        self.variable_shape = bool(variable_shape)
        self.dtypes = dict(dtypes or {})
        self.embedding_net = embedding_net
        self.out_features: int | None = None
        if self.variable_shape:  # no standardization: values reach the user's net as observed
            self.standardizers = nn.ModuleDict()
            return
        self.standardizers = nn.ModuleDict({n: Standardize(self.shapes[n]) for n in self.names})
        if embedding_net is None:
            nets = {n: default_embedding_net(self.shapes[n]) for n in self.names}
            self.nets = nn.ModuleDict(nets)
        with torch.no_grad():
            probe = {n: torch.zeros((2,) + self.shapes[n]) for n in self.names}
            out = self._embed(probe)
        if out.dim() != 2 or out.shape[0] != 2:
            raise ValueError(
                "embedding_net must map a tensor of shape batch + observation shape to batch + "
                f"(features,); for a batch of 2 it returned shape {tuple(out.shape)}"
            )
        self.out_features = int(out.shape[-1])

    def _embed(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.variable_shape:
            x = {n: values[n] for n in self.names}
        else:
            x = {n: self.standardizers[n](values[n]) for n in self.names}
        if self.embedding_net is not None:
            return self.embedding_net(x[self.names[0]] if len(x) == 1 else x)
        parts = [self.nets[n](x[n]) for n in self.names]
        if len(parts) == 1:
            return parts[0]
        batch = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
        return torch.cat([p.expand(batch + p.shape[-1:]) for p in parts], dim=-1)

    def absent(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The value given for a site absent from a run: zeros of its first-seen shape."""
        dtype = self.dtypes.get(name, like.dtype) if self.variable_shape else like.dtype
        return torch.zeros(self.shapes[name], dtype=dtype, device=like.device)

    def forward(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """
        :param values: ``{site name: tensor of shape batch + shape}`` for every site.
        :returns: the context, ``batch + (out_features,)``.
        """
        missing = [n for n in self.names if n not in values]
        if missing:
            raise ValueError(
                f"observed site(s) {missing} missing from the observations given to the "
                f"embedding (it reads {self.names})"
            )
        if not self.variable_shape:
            for name in self.names:
                check_observation_shape(name, values[name].shape, self.shapes[name])
            return self._embed(values)
        out = self._embed(values)
        if out.dim() < 1 or (self.out_features is not None and out.shape[-1] != self.out_features):
            raise ValueError(
                "embedding_net must return batch + (features,) with the same number of features "
                f"for every input; it returned shape {tuple(out.shape)}"
                + (f" after {self.out_features} features" if self.out_features else "")
            )
        self.out_features = int(out.shape[-1])
        return out

    def standardize_from(self, values: Mapping[str, torch.Tensor]) -> None:
        """
        Set every site's standardization from simulated observations ``{site name: (N, *shape)}``
        (any leading dims are samples). Sites not in ``values`` keep theirs.

        :param values: simulated observed values per site.
        """
        if self.variable_shape:
            raise ValueError(
                "observations of variable shape are not standardized: normalize them inside "
                "embedding_net (and use num_standardize=0)"
            )
        for name, value in values.items():
            if name in self.standardizers:
                self.standardizers[name].standardize_from(value)
