# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Binary image data sets that need no download at run time.

* :func:`load_digits` binarizes scikit-learn's 8x8 digits (1797 images shipped inside the
  package) at pixel > 7.
* :func:`load_binarized_mnist` reads the standard binarized MNIST (Larochelle & Murray 2011)
  from a local ``.npz`` with keys ``train``, ``valid``, ``test`` of ``numpy.packbits`` rows.
  :func:`find_binarized_mnist` looks for it in ``$BINARIZED_MNIST`` and in
  ``../shared/data/binarized_mnist.npz`` relative to the working directory or to this
  repository, and returns None when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

MNIST_FILE = "binarized_mnist.npz"


def load_digits(test_fraction: float = 0.2, seed: int = 0, dtype=torch.float32):
    """sklearn's digits binarized at > 7, split into ``(train, test)`` tensors of 64 pixels."""
    from sklearn.datasets import load_digits as sk_load_digits

    images = (sk_load_digits().data > 7).astype(np.float32)
    perm = np.random.RandomState(seed).permutation(len(images))
    num_test = int(round(test_fraction * len(images)))
    data = torch.as_tensor(images[perm], dtype=dtype)
    return data[num_test:], data[:num_test]


def find_binarized_mnist() -> Path | None:
    """The path of the binarized MNIST file, or None if it is not on this machine."""
    candidates = []
    if os.environ.get("BINARIZED_MNIST"):
        candidates.append(Path(os.environ["BINARIZED_MNIST"]))
    repo = Path(__file__).resolve().parents[2]
    for base in (Path.cwd(), Path.cwd().parent, repo):
        candidates.append(base / ".." / "shared" / "data" / MNIST_FILE)
        candidates.append(base / "shared" / "data" / MNIST_FILE)
    for path in candidates:
        if path.is_file():
            return path.resolve()
    return None


def load_binarized_mnist(path: str | os.PathLike, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """
    ``{"train", "valid", "test"}`` tensors of shape ``(n, 784)`` with values in {0, 1}.

    .. warning:: The splits are stored in file order, and the test split of the standard file is
        sorted by digit: evaluate on a random subset (``test[torch.randperm(len(test))[:n]]``),
        never on ``test[:n]``.
    """
    with np.load(path) as archive:
        return {
            split: torch.as_tensor(
                np.unpackbits(archive[split], axis=1)[:, :784].astype(np.float32), dtype=dtype
            )
            for split in ("train", "valid", "test")
        }
