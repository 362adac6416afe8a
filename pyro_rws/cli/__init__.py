# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
``python -m pyro_rws``: train and compare wake-sleep estimators on built-in problems.

Subcommands:

* ``gmm`` (the default): the Gaussian-mixture experiment of Le et al. (2019), which needs no
  download. Prints model error, inference error, bound and ms/step per estimator and K.
* ``pcfg``: the probabilistic context-free grammar of Le et al. (2019), stochastic control flow
  (every loss with ``vectorize_particles=False``). Prints model and inference error per
  estimator and K.
* ``sbn``: sigmoid belief nets on scikit-learn's digits, or on binarized MNIST (downloaded once
  with ``--data mnist``, or a path). Prints held-out log p(x) and ms/step per estimator.

``--plot FILE.png`` saves the curves (needs matplotlib); ``--quick`` is a smoke test of a few
seconds. Run ``python -m pyro_rws gmm --help`` or ``python -m pyro_rws sbn --help`` for the
options of each.

This module reads the command line and dispatches: :mod:`.parser` holds the options,
:mod:`.estimators` the named losses, :mod:`.commands` the two experiments, :mod:`.train` one
training run, :mod:`.report` the tables and plots.
"""

from __future__ import annotations

import sys

import torch

from .commands import run_gmm, run_sbn
from .estimators import ESTIMATORS, Estimator
from .parser import UsageError, build_parser
from .pcfg import run_pcfg

__all__ = ["ESTIMATORS", "Estimator", "build_parser", "main"]

COMMANDS = {"gmm": run_gmm, "sbn": run_sbn, "pcfg": run_pcfg}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pyro_rws``; returns the exit status (2 for bad options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["gmm", *argv]  # gmm is the default command
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, message already printed)
        return 0 if e.code is None else int(e.code)
    torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
