"""Shared test helpers.

Fake torchvision datasets: tiny files written in torchvision's own on-disk layout, so
``optamal.data`` is exercised through the real torchvision loaders (md5 checks included:
the fixtures patch torchvision's expected checksums to those of the files written here,
they never disable the check).
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest


# --------------------------------------------------------------------------- fake datasets
def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX (LeCun) file of uint8: magic 0x0000 08 <ndim>, big-endian dims."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.tobytes())


def write_fake_mnist(root: Path, class_name: str = "MNIST", n_train: int = 20, n_test: int = 10,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """MNIST/FashionMNIST/KMNIST layout: ``<root>/<ClassName>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / class_name / "raw"
    out = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "val_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "val_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    write_idx(raw / "train-images-idx3-ubyte", out["train_x"])
    write_idx(raw / "train-labels-idx1-ubyte", out["train_y"])
    write_idx(raw / "t10k-images-idx3-ubyte", out["val_x"])
    write_idx(raw / "t10k-labels-idx1-ubyte", out["val_y"])
    return out


def _pickle(path: Path, obj) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)
    return _md5(path)


def write_fake_cifar(root: Path, monkeypatch, num_classes: int = 10, n_train: int = 150,
                     n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """CIFAR-10 (``cifar-10-batches-py``: 5 data batches, test batch, batches.meta) or
    CIFAR-100 (``cifar-100-python``: train, test, meta). Images are stored as rows of 3072
    bytes = (3, 32, 32) channel planes. Returns the images as (n, 3, 32, 32) uint8."""
    import torchvision.datasets as tvd

    rng = np.random.default_rng(seed)
    train_x = rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8)
    train_y = rng.integers(0, num_classes, n_train)
    val_x = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    val_y = rng.integers(0, num_classes, n_test)
    if num_classes == 10:
        folder = Path(root) / "cifar-10-batches-py"
        train_list = []
        for i, (xs, ys) in enumerate(zip(np.array_split(train_x, 5), np.array_split(train_y, 5))):
            name = f"data_batch_{i + 1}"
            md5 = _pickle(folder / name, {"batch_label": name, "data": xs.reshape(len(xs), -1),
                                          "labels": [int(v) for v in ys]})
            train_list.append([name, md5])
        test_md5 = _pickle(folder / "test_batch", {"batch_label": "test", "data": val_x.reshape(n_test, -1),
                                                   "labels": [int(v) for v in val_y]})
        meta_md5 = _pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
        monkeypatch.setattr(tvd.CIFAR10, "train_list", train_list)
        monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", test_md5]])
        monkeypatch.setattr(tvd.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                                  "md5": meta_md5})
    else:
        folder = Path(root) / "cifar-100-python"
        train_md5 = _pickle(folder / "train", {"data": train_x.reshape(n_train, -1),
                                               "fine_labels": [int(v) for v in train_y],
                                               "coarse_labels": [int(v) // 5 for v in train_y]})
        test_md5 = _pickle(folder / "test", {"data": val_x.reshape(n_test, -1),
                                             "fine_labels": [int(v) for v in val_y],
                                             "coarse_labels": [int(v) // 5 for v in val_y]})
        meta_md5 = _pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                                             "coarse_label_names": [f"k{i}" for i in range(20)]})
        monkeypatch.setattr(tvd.CIFAR100, "train_list", [["train", train_md5]])
        monkeypatch.setattr(tvd.CIFAR100, "test_list", [["test", test_md5]])
        monkeypatch.setattr(tvd.CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names",
                                                   "md5": meta_md5})
    return {"train_x": train_x, "train_y": train_y, "val_x": val_x, "val_y": val_y}


def write_fake_svhn(root: Path, monkeypatch, n_train: int = 12, n_test: int = 6,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """SVHN cropped digits: ``<root>/{train,test}_32x32.mat`` with 'X' (32, 32, 3, n) =
    (row, col, channel, index) and 'y' (n, 1) in 1..10, where 10 means digit 0.
    Returns 'X' and 'y' exactly as written."""
    import scipy.io
    import torchvision.datasets as tvd

    rng = np.random.default_rng(seed)
    out, split_list = {}, {k: list(v) for k, v in tvd.SVHN.split_list.items()}
    for split, n in (("train", n_train), ("test", n_test)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10  # always exercise the 10 -> 0 relabelling
        path = Path(root) / f"{split}_32x32.mat"
        path.parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(str(path), {"X": X, "y": y})
        split_list[split][2] = _md5(path)
        out[f"{split}_X"], out[f"{split}_y"] = X, y
    monkeypatch.setattr(tvd.SVHN, "split_list", split_list)
    return out


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    """A data root holding a tiny CIFAR-10 (150 train, 20 test); yields (root, arrays)."""
    root = tmp_path / "cifar_root"
    arrays = write_fake_cifar(root, monkeypatch, num_classes=10)
    return root, arrays


@pytest.fixture(scope="session")
def mnist5k_root(tmp_path_factory):
    """A session-wide data root for mnist5k (keeps tests out of ~/.cache/optamal)."""
    return tmp_path_factory.mktemp("optamal_data")
