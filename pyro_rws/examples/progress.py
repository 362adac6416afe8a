# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Progress bars that a saved notebook keeps as one line.

In a Jupyter kernel, :mod:`tqdm`'s text bar reaches the notebook as one stream output per
refresh, and a notebook saved after a run holds all of them (hundreds for a long loop).
:func:`progress` is ``tqdm`` that, inside a kernel, draws into a single output updated in place,
so the saved notebook holds one line, the bar's final state; elsewhere it is the usual bar.
"""

from __future__ import annotations

from tqdm import tqdm


def _in_jupyter() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


class _DisplayLine:
    """A file for tqdm that shows the latest line written to it in one notebook output."""

    encoding = "utf-8"

    def __init__(self, handle):
        self._handle = handle

    def write(self, text: str) -> None:
        # tqdm redraws with "\r<bar>": keep what follows the last carriage return
        line = text.rsplit("\r", 1)[-1].strip("\n")
        if line.strip():
            self._handle.update({"text/plain": line}, raw=True)

    def flush(self) -> None:
        pass


def _new_output():
    """An empty notebook output and the handle that updates it."""
    from IPython.display import display

    return display({"text/plain": ""}, raw=True, display_id=True)


def progress(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, drawn as one output updated in place in a Jupyter kernel."""
    if _in_jupyter() and "file" not in kwargs:
        kwargs["file"] = _DisplayLine(_new_output())
    return tqdm(iterable, **kwargs)
