# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""``python -m pyro_rws``: the command line (see :mod:`pyro_rws.cli`)."""

import sys

from .cli import main

sys.exit(main())
