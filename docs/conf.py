# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""Sphinx configuration: API reference from the docstrings (CI builds it with ``-n -W``)."""

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
# Nitpicky: every cross-reference must resolve (CI: ``python -m sphinx -n -W``).
nitpicky = True
# No intersphinx: nothing may be fetched from the network at build time, so references to
# other projects' objects (torch, Pyro, the standard library's typing helpers) cannot resolve
# here and are not checked. Only these external names are exempt; every pyro_rws name must
# resolve.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|pyro|numpy|collections\.abc|typing)(\..+)?"),
    # a type alias in the annotations of ``fantasy_args`` (documented in the sleep-phase text)
    (r"py:class", r"(pyro_rws\.\w+\.)?FantasyArgs"),
    # torch.nn spelled short in annotations (``nn.Module``, ``Module``) and ``callable``
    (r"py:class", r"(nn\.)?Module|callable"),
]
html_theme = "alabaster"
exclude_patterns = ["_build"]
