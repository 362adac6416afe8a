# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""Models used by the command line, the tutorials and the benchmarks."""
