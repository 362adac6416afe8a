# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""The observation-embedding convention of the amortized autoguides (autoguides/embedding.py)."""

import pytest
import torch
from torch import nn

from pyro_rws.autoguides.embedding import (
    MAX_IDENTITY_FEATURES,
    ObservationEmbedding,
    Standardize,
    datapoints,
    default_embedding_net,
)

pytestmark = pytest.mark.usefixtures("float64")


def test_datapoints_plain_event():
    x = torch.randn(7, 3)  # lead 7, no batch dims, event 3
    assert torch.equal(datapoints(x, batch_dim=0, event_dim=1, plate_dims=[]), x)


def test_datapoints_keeps_plate_and_flattens_others():
    x = torch.randn(5, 3, 4, 2)  # lead 5, batch (3, 4), event 2
    y = datapoints(x, batch_dim=2, event_dim=1, plate_dims=[-2])
    assert y.shape == (5, 3, 1, 8)
    for i in range(3):
        assert torch.equal(y[2, i, 0], x[2, i].reshape(-1))
    y = datapoints(x, batch_dim=2, event_dim=1, plate_dims=[-1])
    assert y.shape == (5, 1, 4, 6)
    assert torch.equal(y[1, 0, 2], x[1, :, 2].reshape(-1))


def test_datapoints_global_latents_read_every_repeat():
    x = torch.randn(5, 3, 4, 2)
    y = datapoints(x, batch_dim=2, event_dim=1, plate_dims=[])
    assert y.shape == (5, 1, 1, 24)
    assert torch.equal(y[3, 0, 0], x[3].reshape(-1))


def test_datapoints_errors():
    with pytest.raises(ValueError, match="fewer dims"):
        datapoints(torch.randn(3), batch_dim=1, event_dim=1, plate_dims=[])
    with pytest.raises(ValueError, match="plate at dim -2"):
        datapoints(torch.randn(3, 2), batch_dim=1, event_dim=1, plate_dims=[-2])


def test_default_nets_by_shape():
    assert default_embedding_net((3,))(torch.randn(4, 3)).shape == (4, 3)
    assert default_embedding_net(())(torch.randn(4)).shape == (4, 1)
    big = default_embedding_net((MAX_IDENTITY_FEATURES + 1,))
    assert any(isinstance(m, nn.Linear) for m in big.modules())
    assert big(torch.randn(2, 4, MAX_IDENTITY_FEATURES + 1)).shape == (2, 4, 64)
    cnn = default_embedding_net((1, 16, 16))
    assert any(isinstance(m, nn.Conv2d) for m in cnn.modules())
    assert cnn(torch.randn(2, 3, 1, 16, 16)).shape == (2, 3, 64)
    assert default_embedding_net((16, 16))(torch.randn(5, 16, 16)).shape == (5, 64)
    # small 2-d events are not images: flattened
    assert default_embedding_net((4, 2))(torch.randn(5, 4, 2)).shape == (5, 8)


def test_standardize():
    s = Standardize((2,))
    x = torch.randn(1000, 2) * torch.tensor([3.0, 0.1]) + torch.tensor([5.0, -1.0])
    assert torch.equal(s(x), x)
    s.standardize_from(x)
    y = s(x)
    assert torch.allclose(y.mean(0), torch.zeros(2), atol=1e-10)
    assert torch.allclose(y.std(0), torch.ones(2))
    assert set(dict(s.named_buffers())) == {"mean", "std"}
    const = Standardize((2,))
    const.standardize_from(torch.ones(10, 2))  # a constant feature: no division by zero
    assert torch.isfinite(const(torch.ones(3, 2))).all()
    with pytest.raises(ValueError, match="non-finite"):
        s.standardize_from(torch.tensor([[1.0, float("nan")], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="at least 2"):
        s.standardize_from(torch.ones(1, 2))


def test_observation_embedding_several_sites():
    emb = ObservationEmbedding({"b": (3,), "a": (1, 8, 8)})
    assert emb.out_features == 64 + 3
    out = emb({"a": torch.randn(4, 1, 1, 8, 8), "b": torch.randn(5, 3)})  # batch dims broadcast
    assert out.shape == (4, 5, 67)
    emb.standardize_from({"b": torch.randn(100, 3) * 2 + 1})
    assert not torch.equal(emb.standardizers["b"].mean, torch.zeros(3))
    with pytest.raises(ValueError, match=r"\['b'\] missing"):
        emb({"a": torch.randn(2, 1, 8, 8)})


def test_user_embedding_net():
    net = nn.Sequential(nn.Linear(3, 7), nn.Tanh())
    emb = ObservationEmbedding({"x": (3,)}, net)
    assert emb.out_features == 7
    x = torch.randn(6, 3)
    assert torch.allclose(emb({"x": x}), net(x))
    with pytest.raises(ValueError, match="batch \\+ \\(features,\\)"):
        ObservationEmbedding({"x": (3,)}, nn.Flatten(0))
    with pytest.raises(ValueError, match="at least one observed site"):
        ObservationEmbedding({})


def test_datapoints_plate_depth():
    x = torch.randn(5, 4, 2)  # lead 5, batch (4,) not a plate (iid repeats), event 2
    assert datapoints(x, batch_dim=1, event_dim=1, plate_dims=[], plate_depth=0).shape == (5, 8)
    assert datapoints(x, batch_dim=1, event_dim=1, plate_dims=[]).shape == (5, 1, 8)
