# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""The command line: ``python -m pyro_rws`` (run in-process through ``cli.main``)."""

import runpy
import sys

import pytest

from pyro_rws import cli

FAST_GMM = ["--quick", "--no-progress", "--steps", "12", "--estimators", "rws,ws", "-K", "3"]
FAST_SBN = [
    "sbn",
    "--quick",
    "--no-progress",
    "--steps",
    "8",
    "--estimators",
    "rws,pyro-rws",
    "-K",
    "3",
    "--eval-particles",
    "5",
    "--eval-points",
    "20",
]


@pytest.mark.parametrize("argv", [["--help"], ["gmm", "--help"], ["sbn", "--help"]])
def test_help(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "usage: python -m pyro_rws" in out
    if argv[0] == "--help":
        assert "gmm" in out and "sbn" in out
    else:
        assert "--estimators" in out and "--quick" in out and "--plot" in out
        for name in cli.ESTIMATORS:
            assert name in out


def test_gmm_is_the_default_command_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "gmm.png"
    assert cli.main([*FAST_GMM, "--plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Gaussian mixture" in out
    for column in ("model error", "inference error", "bound/point", "ms/step"):
        assert column in out
    assert "RWS wake-phi" in out and "wake-sleep" in out
    assert "mixture weights learned by" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot saved to {path}" in out


def test_gmm_all_estimators(capsys):
    names = ",".join(cli.ESTIMATORS)
    argv = ["gmm", "--quick", "--no-progress", "--steps", "5", "--estimators", names, "-K", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for est in cli.ESTIMATORS.values():
        assert est.label in out


def test_sbn_digits(tmp_path, capsys):
    pytest.importorskip("sklearn")
    path = tmp_path / "sbn.png"
    assert cli.main([*FAST_SBN, "--plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert "SBN 64-16 on sklearn digits" in out
    assert "test log p(x)" in out and "K=5" in out
    assert "RWS wake-phi" in out and "Pyro RWS (joint)" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--estimators", "rws,nope"], "unknown estimator(s) nope"),
        (["gmm", "-K", "0"], "positive integers"),
        (["gmm", "--steps", "-3"], "positive"),
        (["gmm", "--estimators", "vimco", "-K", "1"], "needs K >= 2"),
        (["sbn", "--data", "/no/such/file.npz"], "--data"),
        (["frobnicate"], "invalid choice"),
        (["gmm", "--plot", "/no/such/folder/x.png"], "does not exist"),
    ],
)
def test_bad_options_exit_2(argv, message, capsys):
    assert cli.main([*argv, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_plot_without_matplotlib_fails_before_training(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["gmm", "--plot", "x.png", "--no-progress"]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_module_entry_point_exit_status(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m pyro_rws", "--estimators", "bogus"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("pyro_rws", run_name="__main__")
    assert exit_info.value.code == 2
    assert "unknown estimator(s) bogus" in capsys.readouterr().err
