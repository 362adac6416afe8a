# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
import sys

from .cli import main

sys.exit(main())
