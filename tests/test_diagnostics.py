# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""EffectiveSampleSizeWarning: raised when the guide has collapsed, pointing at the user's line."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from pyro.optim import Adam

from pyro_rws import RWS, VIMCO, EffectiveSampleSizeWarning


def model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 0.01), obs=x)


def guide(x):
    # far from the narrow posterior (about x): one particle takes all the weight
    loc = pyro.param("loc", torch.tensor(5.0))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(loc, 1.0))


@pytest.mark.parametrize("make", [lambda: RWS(num_particles=3), lambda: VIMCO(num_particles=3)])
@pytest.mark.parametrize("path", ["svi.step", "loss"])
def test_ess_warning_points_at_the_callers_line(make, path):
    x = torch.zeros(4)
    loss = make()
    svi = SVI(model, guide, Adam({"lr": 0.0}), loss=loss)
    with pytest.warns(EffectiveSampleSizeWarning, match="effective sample size") as record:
        for _ in range(100):
            if path == "svi.step":
                svi.step(x)  # the warning's line
            else:
                loss.loss(model, guide, x)  # the warning's line
    [warning] = [w for w in record if w.category is EffectiveSampleSizeWarning]
    assert warning.filename == __file__
    with open(__file__) as f:
        assert "# the warning's line" in f.readlines()[warning.lineno - 1]
