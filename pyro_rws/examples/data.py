# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Binary image data sets and the minibatches drawn from them.

* :func:`load_digits` binarizes scikit-learn's 8x8 digits (1797 images shipped inside
  scikit-learn) at pixel > 7.
* :func:`load_binarized_mnist` reads the standard binarized MNIST (Larochelle & Murray 2011)
  from a local ``.npz`` with keys ``train``, ``valid``, ``test`` of ``numpy.packbits`` rows.
  :func:`find_binarized_mnist` says where such a file is on this machine (or None);
  :func:`pyro_rws.examples.mnist.binarized_mnist_path` downloads it when it is nowhere.
* :func:`shuffled_test_split` and :func:`shuffled_batches`: the fixed random test subset and the
  endless shuffled minibatches that the command line and the benchmarks train and evaluate on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
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


def cache_dir() -> Path:
    """Where downloaded data is kept: ``$PYRO_RWS_DATA``, else ``~/.cache/pyro_rws``."""
    return Path(os.environ.get("PYRO_RWS_DATA") or Path.home() / ".cache" / "pyro_rws")


def find_binarized_mnist() -> Path | None:
    """
    The path of the binarized MNIST ``.npz`` on this machine, or None. Looks, in this order, at
    ``$BINARIZED_MNIST``, :func:`cache_dir` and ``shared/data/`` next to or above the working
    directory and this repository.
    """
    candidates = []
    if os.environ.get("BINARIZED_MNIST"):
        candidates.append(Path(os.environ["BINARIZED_MNIST"]))
    candidates.append(cache_dir() / MNIST_FILE)
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
        sorted by digit: evaluate on a random subset (:func:`shuffled_test_split`), never on
        ``test[:n]``.
    """
    with np.load(path) as archive:
        return {
            split: torch.as_tensor(
                np.unpackbits(archive[split], axis=1)[:, :784].astype(np.float32), dtype=dtype
            )
            for split in ("train", "valid", "test")
        }


def shuffled_test_split(test: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """
    ``test`` in a fixed random order, so that ``test[:n]`` is a fair subset (binarized MNIST's
    test split is stored sorted by digit).
    """
    return test[torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))]


def shuffled_batches(
    data: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[torch.Tensor]:
    """
    Endless minibatches of ``batch_size`` rows of ``data``: each epoch a new random order
    (drawn from ``generator``), the last incomplete batch of an epoch dropped.
    """
    if not 0 < batch_size <= len(data):
        raise ValueError(f"batch_size must be in [1, {len(data)}], got {batch_size}")
    while True:
        order = torch.randperm(len(data), generator=generator)
        for pos in range(0, len(order) - batch_size + 1, batch_size):
            yield data[order[pos : pos + batch_size]]
