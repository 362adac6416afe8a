# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""
Binarized MNIST download, verification and conversion (pyro_rws.examples.mnist), offline: a
local HTTP server on 127.0.0.1 serves small generated .amat files; nothing reaches the internet.
"""

import functools
import hashlib
import http.server
import socket
import threading

import numpy as np
import pytest
import torch

from pyro_rws.cli.train import load_sbn_data
from pyro_rws.examples import mnist
from pyro_rws.examples.data import (
    MNIST_FILE,
    find_binarized_mnist,
    load_binarized_mnist,
    shuffled_batches,
)

ROWS = {"train": 5, "valid": 3, "test": 4}


def amat(images: np.ndarray) -> bytes:
    """The published text format: one image a line, 784 space-separated 0/1 digits."""
    return "".join(" ".join(map(str, row)) + "\n" for row in images.tolist()).encode()


def closed_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: the connection is refused, as when offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


@pytest.fixture
def served(tmp_path):
    """``(base_url, images, checksums, hits)``: generated splits served over local HTTP."""
    root = tmp_path / "server"
    root.mkdir()
    rng = np.random.RandomState(0)
    images, checksums = {}, {}
    for split, n in ROWS.items():
        images[split] = (rng.rand(n, 784) < 0.3).astype(np.uint8)
        name = f"binarized_mnist_{split}.amat"
        body = amat(images[split])
        (root / name).write_bytes(body)
        checksums[split] = mnist.Checksum(name, len(body), hashlib.sha256(body).hexdigest())
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            hits.append(self.path)

    handler = functools.partial(Handler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", images, checksums, hits, root
    finally:
        server.shutdown()
        server.server_close()


def test_download_verify_convert_once(served, tmp_path):
    base_url, images, checksums, hits, _ = served
    cache = tmp_path / "cache"
    path = mnist.binarized_mnist_path(cache, base_url=base_url, checksums=checksums)
    assert path == cache / MNIST_FILE
    assert sorted(p.name for p in cache.iterdir()) == [MNIST_FILE]  # .amat and temp files gone
    with np.load(path) as archive:  # the project's format: packbits rows of 98 bytes
        assert sorted(archive.files) == ["test", "train", "valid"]
        assert archive["train"].dtype == np.uint8 and archive["train"].shape == (5, 98)
    data = load_binarized_mnist(path, dtype=torch.float64)
    for split in ROWS:
        assert torch.equal(data[split], torch.as_tensor(images[split], dtype=torch.float64))
    assert len(hits) == 3
    # a second call finds the file and downloads nothing
    assert mnist.binarized_mnist_path(cache, base_url=base_url, checksums=checksums) == path
    assert len(hits) == 3


def test_corrupted_download_is_rejected_and_cache_left_clean(served, tmp_path):
    base_url, images, checksums, _, root = served
    body = bytearray((root / "binarized_mnist_valid.amat").read_bytes())
    body[0] = ord("1") if body[0] == ord("0") else ord("0")  # same size, one pixel flipped
    (root / "binarized_mnist_valid.amat").write_bytes(bytes(body))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="binarized_mnist_valid.amat is corrupt.*SHA-256"):
        mnist.binarized_mnist_path(cache, base_url=base_url, checksums=checksums)
    assert list(cache.iterdir()) == []


def test_wrong_size_is_rejected(served, tmp_path):
    base_url, images, checksums, _, root = served
    (root / "binarized_mnist_test.amat").write_bytes(amat(images["test"][:2]))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"binarized_mnist_test.amat .*bytes, expected"):
        mnist.binarized_mnist_path(cache, base_url=base_url, checksums=checksums)
    assert list(cache.iterdir()) == []


def test_no_network_says_where_to_put_the_files(served, tmp_path):
    _, images, checksums, _, root = served
    closed = closed_url()
    cache = tmp_path / "cache"
    with pytest.raises(mnist.DownloadError) as info:
        mnist.binarized_mnist_path(cache, base_url=closed, checksums=checksums, timeout=5)
    message = str(info.value)
    assert "could not download" in message and str(cache) in message
    assert "binarized_mnist_train.amat" in message and "$PYRO_RWS_DATA" in message
    assert list(cache.iterdir()) == []
    # following the message: the files put there by hand are verified and converted
    for split in ROWS:
        name = f"binarized_mnist_{split}.amat"
        (cache / name).write_bytes((root / name).read_bytes())
    path = mnist.binarized_mnist_path(cache, download=False, checksums=checksums)
    assert torch.equal(
        load_binarized_mnist(path)["valid"], torch.as_tensor(images["valid"]).float()
    )


def test_cache_dir_from_environment(served, tmp_path, monkeypatch, capsys):
    base_url, images, checksums, _, _ = served
    monkeypatch.delenv("BINARIZED_MNIST", raising=False)
    monkeypatch.setenv("PYRO_RWS_DATA", str(tmp_path / "env-cache"))
    monkeypatch.chdir(tmp_path)
    path = mnist.binarized_mnist_path(
        tmp_path / "env-cache", base_url=base_url, checksums=checksums
    )
    assert find_binarized_mnist() == path.resolve()
    # --data mnist finds it there (and would download it there)
    train, test, label = load_sbn_data("mnist")
    assert train.shape == (5, 784) and test.shape == (4, 784) and str(path.resolve()) in label
    # the shuffled test split holds the same images
    assert sorted(map(tuple, test.int().tolist())) == sorted(map(tuple, images["test"].tolist()))


def test_shuffled_batches_cover_each_epoch():
    data = torch.arange(10.0).unsqueeze(-1)
    batches = shuffled_batches(data, 3, torch.Generator().manual_seed(0))
    epoch = torch.cat([next(batches) for _ in range(3)]).flatten()
    assert len(set(epoch.tolist())) == 9  # 3 full batches, the 10th row dropped this epoch
    with pytest.raises(ValueError, match="batch_size must be in"):
        next(shuffled_batches(data, 11))


def test_progress_is_one_output_in_a_notebook(monkeypatch):
    from pyro_rws.examples import progress as module

    shown = []

    class Handle:
        def update(self, data, raw):
            shown.append(data["text/plain"])

    monkeypatch.setattr(module, "_new_output", Handle)  # no IPython needed
    monkeypatch.setattr(module, "_in_jupyter", lambda: True)
    for _ in module.progress(range(3), mininterval=0):
        pass
    assert shown and all("\r" not in line and "\n" not in line for line in shown)
    assert shown[-1].startswith("100%") and "3/3" in shown[-1]
    count = len(shown)
    monkeypatch.setattr(module, "_in_jupyter", lambda: False)
    for _ in module.progress(range(3), mininterval=0):  # the usual bar, on stderr
        pass
    assert len(shown) == count


def test_cli_data_mnist_offline_exits_2_with_the_place(tmp_path, monkeypatch, capsys):
    from pyro_rws import cli

    closed = closed_url()
    monkeypatch.setattr(mnist, "find_binarized_mnist", lambda: None)  # even where one exists
    monkeypatch.setenv("PYRO_RWS_DATA", str(tmp_path))
    monkeypatch.setenv("PYRO_RWS_MNIST_URL", closed)
    assert cli.main(["sbn", "--data", "mnist", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: --data mnist: could not download" in err and str(tmp_path) in err
    assert list(tmp_path.iterdir()) == []
