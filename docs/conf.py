# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""Sphinx configuration: API reference from the docstrings (built with -W in CI)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import pyro_rws  # noqa: E402

project = "pyro_rws"
author = "pyro_rws contributors"
copyright = "2026, pyro_rws contributors"
release = version = pyro_rws.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
# No intersphinx: nothing may be fetched from the network at build time.
nitpicky = False
html_theme = "alabaster"
exclude_patterns = ["_build"]
