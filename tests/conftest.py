# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Shared test setup: one thread, a fresh Pyro state per test, the ``float64`` fixture, and the
``slow`` marker (skipped unless ``--run-slow`` is given), the ``case`` fixture over every loss
of tests/losses.py.
"""

import pyro
import pytest
import torch
from losses import CASES

# Tiny tensor ops run far slower with several threads when the other core is busy.
torch.set_num_threads(1)

SLOW_OPTION = "--run-slow"


def pytest_addoption(parser):
    parser.addoption(SLOW_OPTION, action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption(SLOW_OPTION):
        return
    skip = pytest.mark.skip(reason=f"slow: run with {SLOW_OPTION}")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_pyro():
    """Every test starts with an empty param store, a fixed seed and validation on."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture
def float64():
    """float64 as the default dtype for the test (``pytestmark = usefixtures("float64")``)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(params=CASES, ids=str)
def case(request):
    """Each loss of tests/losses.py, with vectorized and with sequential particles."""
    return request.param
