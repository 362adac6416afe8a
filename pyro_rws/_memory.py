# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
The memory of :class:`~pyro_rws.MemoisedWakeSleep`: per datapoint, up to L distinct values of
the guide's discrete latents, and the selection of the best L distinct ones among the memory and
new candidates.

Layout. A discrete guide site's value in a vectorized trace has shape ``(P,) + batch + event``,
the particle dim first and the data plate somewhere in ``batch``. In the memory it is kept as
``(N, L) + rest``: datapoint first, memory slot second, ``rest`` the other plates' dims and the
event dims, in their order. :func:`to_memory_layout` and :func:`from_memory_layout` convert.
Slots not yet filled (a datapoint seen for the first time, or fewer distinct candidates than L
so far) are marked invalid and carry no weight.
"""

from __future__ import annotations

import math

import torch


def data_position(value: torch.Tensor, event_dim: int, data_dim: int, plate_nesting: int):
    """The value reshaped to ``plate_nesting + 1`` batch dims, and the index of the data dim."""
    batch_dims = value.dim() - event_dim
    if batch_dims < plate_nesting + 1:
        value = value.reshape((1,) * (plate_nesting + 1 - batch_dims) + value.shape)
        batch_dims = plate_nesting + 1
    return value, batch_dims + data_dim


def to_memory_layout(value, event_dim: int, data_dim: int, plate_nesting: int) -> torch.Tensor:
    """``(P,) + batch + event`` (the data plate at ``data_dim`` of batch) to ``(B, P) + rest``."""
    value, index = data_position(value, event_dim, data_dim, plate_nesting)
    return value.movedim(index, 0)


def from_memory_layout(value, event_dim: int, data_dim: int, plate_nesting: int) -> torch.Tensor:
    """The inverse of :func:`to_memory_layout`: ``(B, P) + rest`` to ``(P,) + batch + event``."""
    return value.movedim(0, value.dim() - event_dim + data_dim)


def top_distinct(
    keys: dict[str, torch.Tensor], scores: torch.Tensor, keep: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    For each datapoint, the indices of the ``size`` best distinct candidates.

    :param dict keys: per site, candidate values of shape ``(B, C) + rest``.
    :param torch.Tensor scores: ``(B, C)``, higher is better.
    :param torch.Tensor keep: ``(B, C)`` bool, candidates that may be selected.
    :returns: indices ``(B, size)`` into the C candidates, best first, and whether each selected
        slot holds a valid candidate (False where fewer than ``size`` distinct candidates with a
        finite score exist). Of equal candidates the first one counts (memory before proposals).
    """
    B, C = scores.shape
    same = torch.ones(B, C, C, dtype=torch.bool, device=scores.device)
    for value in keys.values():
        flat = value.reshape(B, C, -1)
        same = same & (flat[:, :, None, :] == flat[:, None, :, :]).all(-1)
    earlier = torch.ones(C, C, dtype=torch.bool, device=scores.device).tril(-1)
    duplicate = (same & earlier & keep[:, None, :]).any(-1)
    selectable = keep & ~duplicate
    masked = torch.where(selectable, scores, torch.full_like(scores, -math.inf))
    # NaN scores (a log_prob that returned NaN) must not be selected over finite ones
    masked = torch.where(torch.isnan(masked), torch.full_like(masked, -math.inf), masked)
    best, index = masked.topk(size, dim=1)
    return index, best > -math.inf


class Memory:
    """
    Per datapoint, ``size`` slots of discrete latent values (one tensor per guide site, shape
    ``(N, size) + rest``), their validity ``(N, size)`` and the score each had when last selected.
    Allocated on the first step, on the device of the data.
    """

    def __init__(self, size: int):
        self.size = size
        self.values: dict[str, torch.Tensor] = {}
        self.valid: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.num_data: int | None = None

    @property
    def allocated(self) -> bool:
        return self.valid is not None

    def allocate(self, num_data: int, like: dict[str, torch.Tensor], score_like: torch.Tensor):
        """Empty slots for ``num_data`` datapoints, shaped and typed like ``like`` (B, P, ...)."""
        self.num_data = num_data
        self.values = {
            name: v.new_zeros((num_data, self.size) + v.shape[2:]) for name, v in like.items()
        }
        self.valid = torch.zeros(num_data, self.size, dtype=torch.bool, device=score_like.device)
        self.scores = score_like.new_full((num_data, self.size), -math.inf)

    def check(self, num_data: int, like: dict[str, torch.Tensor]) -> None:
        """Raise if the data plate's size or the sites' shapes changed since allocation."""
        if num_data != self.num_data:
            raise ValueError(
                f"the data plate has size {num_data}, but the memory was made for "
                f"{self.num_data} datapoints. Use one MemoisedWakeSleep object per data set "
                "(or reset it with a new object)."
            )
        for name, v in like.items():
            stored = self.values.get(name)
            if stored is None or stored.shape[2:] != v.shape[2:]:
                raise ValueError(
                    f"the discrete guide sites or their shapes changed since the memory was "
                    f"made (site '{name}'): the memory holds {sorted(self.values)}. The guide's "
                    "discrete sites must keep their names and per-datapoint shapes."
                )

    def to(self, device) -> None:
        self.values = {k: v.to(device) for k, v in self.values.items()}
        self.valid = self.valid.to(device)
        self.scores = self.scores.to(device)

    def select(self, index: torch.Tensor):
        """The slots of datapoints ``index``: values ``(B, size) + rest`` and validity."""
        return {k: v[index] for k, v in self.values.items()}, self.valid[index]

    def update(self, index, values: dict, valid: torch.Tensor, scores: torch.Tensor) -> None:
        for k, v in values.items():
            self.values[k][index] = v
        self.valid[index] = valid
        self.scores[index] = scores

    def state_dict(self) -> dict:
        return {
            "memory_size": self.size,
            "values": dict(self.values),
            "valid": self.valid,
            "scores": self.scores,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["memory_size"] != self.size:
            raise ValueError(
                f"the state holds a memory of size {state['memory_size']}, this loss has "
                f"memory_size={self.size}."
            )
        valid = state["valid"]
        self.values = {k: v.clone() for k, v in state["values"].items()}
        self.valid = None if valid is None else valid.clone()
        self.scores = None if state["scores"] is None else state["scores"].clone()
        self.num_data = None if valid is None else valid.shape[0]


def support_size(fn, per_datapoint: int) -> int | float:
    """How many values one datapoint's draws of a site with enumerable support can take."""
    n = fn.enumerate_support(expand=False).shape[0]
    return n**per_datapoint if per_datapoint * math.log(max(n, 1)) < 700 else math.inf
