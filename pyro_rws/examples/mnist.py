# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Getting binarized MNIST onto this machine: download once, verify, convert, cache.

The standard binarized MNIST of Larochelle & Murray (2011) (the split of Salakhutdinov &
Murray 2008: 50,000 training, 10,000 validation, 10,000 test images of 28x28 binary pixels) is
published as three text files ``binarized_mnist_{train,valid,test}.amat``, one image a line of
784 space-separated 0/1 digits. :func:`binarized_mnist_path` returns the project's compact
``binarized_mnist.npz`` (keys ``train``, ``valid``, ``test``: ``numpy.packbits`` rows, 98 bytes
an image), looking first where :func:`~pyro_rws.examples.data.find_binarized_mnist` looks and
otherwise building it in the cache directory (``$PYRO_RWS_DATA``, else ``~/.cache/pyro_rws``):

1. each ``.amat`` file is taken from the cache directory if a user put it there, else
   downloaded from ``$PYRO_RWS_MNIST_URL`` (default :data:`BASE_URL`) into a temporary file
   there;
2. its size and SHA-256 are checked against :data:`CHECKSUMS` (a downloaded file that fails is
   deleted; the message says which file and what was expected);
3. the three splits are packed and written to a temporary file that is renamed to
   ``binarized_mnist.npz`` only when complete, so an interrupted or failed run leaves no partial
   file behind, and the ``.amat`` files that were downloaded are deleted.

The sizes and checksums are those of the published files; they agree with the checksums that
TensorFlow Datasets records for the same URLs, and the ``.npz`` shipped on this project's
machines, written back as ``.amat`` text, reproduces them byte for byte. Tests pass their own
``checksums`` table and a local ``base_url``.

Without network access the error says where to put the files. From the command line:
``python -m pyro_rws.examples.mnist`` prints the path of the ``.npz``, downloading it if needed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import MNIST_FILE, cache_dir, find_binarized_mnist

BASE_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
PIXELS = 784


@dataclass(frozen=True)
class Checksum:
    """What a published split file must be: its name, its size in bytes, its SHA-256."""

    filename: str
    size: int
    sha256: str


CHECKSUMS: dict[str, Checksum] = {
    "train": Checksum(
        "binarized_mnist_train.amat",
        78_400_000,
        "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    ),
    "valid": Checksum(
        "binarized_mnist_valid.amat",
        15_680_000,
        "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    ),
    "test": Checksum(
        "binarized_mnist_test.amat",
        15_680_000,
        "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
    ),
}


class DownloadError(OSError):
    """Binarized MNIST could not be fetched; the message says where to put the files instead."""


def binarized_mnist_path(
    root: str | os.PathLike | None = None,
    download: bool = True,
    base_url: str | None = None,
    checksums: dict[str, Checksum] | None = None,
    timeout: float = 60.0,
) -> Path:
    """
    The path of ``binarized_mnist.npz``, built in ``root`` (default: the cache directory) from
    the published ``.amat`` files when it is not already on this machine.

    :param root: the directory to build the file in; when given, only this directory is
        searched (not ``$BINARIZED_MNIST`` or the other places).
    :param bool download: fetch missing ``.amat`` files; if False, a missing file raises
        :class:`FileNotFoundError`.
    :param str base_url: where the ``.amat`` files are (default ``$PYRO_RWS_MNIST_URL`` or
        :data:`BASE_URL`).
    :param dict checksums: ``{split: Checksum}``, default :data:`CHECKSUMS`.
    :param float timeout: seconds to wait for the server.
    :raises DownloadError: when a file cannot be downloaded (no network).
    :raises ValueError: when a file does not match its size or checksum.
    """
    if root is None:
        found = find_binarized_mnist()
        if found is not None:
            return found
        root = cache_dir()
    root = Path(root)
    target = root / MNIST_FILE
    if target.is_file():
        return target
    checksums = CHECKSUMS if checksums is None else checksums
    base_url = base_url or os.environ.get("PYRO_RWS_MNIST_URL") or BASE_URL
    root.mkdir(parents=True, exist_ok=True)
    splits, fetched = {}, []
    try:
        for split, expected in checksums.items():
            path = root / expected.filename
            if not path.is_file():
                if not download:
                    raise FileNotFoundError(_where_to_put(root, base_url, checksums))
                try:
                    path = _download(base_url + expected.filename, root, timeout)
                except (urllib.error.URLError, OSError) as e:
                    raise DownloadError(
                        f"could not download {base_url + expected.filename} "
                        f"({getattr(e, 'reason', e)}). " + _where_to_put(root, base_url, checksums)
                    ) from e
                fetched.append(path)
            _verify(path, expected, downloaded=path in fetched)
            splits[split] = np.packbits(_read_amat(path), axis=1)
        _write_atomically(target, splits)
    finally:
        for path in fetched:
            path.unlink(missing_ok=True)
    return target


def _where_to_put(root: Path, base_url: str, checksums: dict[str, Checksum]) -> str:
    names = ", ".join(c.filename for c in checksums.values())
    return (
        f"binarized MNIST is not on this machine. Download {names} from {base_url} and put them "
        f"in {root} (set $PYRO_RWS_DATA to use another directory): they are checked and "
        f"converted to {root / MNIST_FILE} on the next run. Or point $BINARIZED_MNIST at an "
        "existing binarized_mnist.npz."
    )


def _download(url: str, root: Path, timeout: float) -> Path:
    """Streams ``url`` into a temporary file in ``root`` (deleted on failure); its path."""
    fd, name = tempfile.mkstemp(dir=root, prefix=".download.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, length=1 << 20)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def _verify(path: Path, expected: Checksum, downloaded: bool) -> None:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    problem = None
    if size != expected.size:
        problem = f"{size} bytes, expected {expected.size}"
    elif digest.hexdigest() != expected.sha256:
        problem = f"SHA-256 {digest.hexdigest()}, expected {expected.sha256}"
    if problem:
        what = "the downloaded file was deleted; try again" if downloaded else "replace it"
        raise ValueError(
            f"{expected.filename} is corrupt or not the published file: {problem} ({what})"
        )


def _read_amat(path: Path) -> np.ndarray:
    """An ``.amat`` file of 0/1 digits separated by white space, as a ``(n, 784)`` uint8 array."""
    raw = np.fromfile(path, dtype=np.uint8)
    digits = raw[(raw != ord(" ")) & (raw != ord("\n")) & (raw != ord("\r")) & (raw != ord("\t"))]
    if digits.size % PIXELS or ((digits != ord("0")) & (digits != ord("1"))).any():
        raise ValueError(f"{path} is not rows of {PIXELS} space-separated 0/1 digits")
    return (digits - ord("0")).reshape(-1, PIXELS)


def _write_atomically(target: Path, splits: dict[str, np.ndarray]) -> None:
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **splits)
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    try:
        print(binarized_mnist_path())
    except (DownloadError, ValueError) as e:
        sys.exit(f"error: {e}")
