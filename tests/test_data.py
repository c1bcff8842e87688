"""Data loaders: MNIST-1D generated locally, CIFAR-10 pickles, image folders (tiny files)."""

import pickle
import random

import numpy as np
import pytest
import torch

from rethinkbn_studies.toolkit.data import load_cifar10, load_data, load_image_folder, load_mnist1d


def test_mnist1d_shapes_split_and_normalization(tmp_path):
    data = load_mnist1d(100, cache_dir=tmp_path)
    assert data.train_x.shape == (80, 1, 40) and data.val_x.shape == (20, 1, 40)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.num_classes == 10 and data.spatial_dims == 1
    assert abs(float(data.train_x.mean())) < 1e-4
    assert float(data.train_x.std()) == pytest.approx(1.0, abs=1e-2)


def test_mnist1d_leaves_global_rngs_untouched(tmp_path):
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    load_mnist1d(40, seed=7, cache_dir=tmp_path)
    assert np.random.rand() == expected_np and random.random() == expected_py


def test_mnist1d_is_cached_and_reloaded_identically(tmp_path):
    first = load_mnist1d(40, cache_dir=tmp_path)
    assert (tmp_path / "mnist1d-40-42.npz").exists()
    second = load_mnist1d(40, cache_dir=tmp_path)
    assert torch.equal(first.train_x, second.train_x)
    assert torch.equal(first.val_y, second.val_y)


def _write_cifar(root, n_per_batch=6):
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, n_per_batch))}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_pickles_load_as_images(tmp_path):
    _write_cifar(tmp_path)
    data = load_cifar10(tmp_path)
    assert data.train_x.shape == (12, 3, 32, 32) and data.val_x.shape == (6, 3, 32, 32)
    assert data.spatial_dims == 2 and data.num_classes == 10
    per_channel = data.train_x.mean(dim=(0, 2, 3))
    assert torch.allclose(per_channel, torch.zeros(3), atol=1e-4)


def test_cifar10_missing_test_batch_is_a_clear_error(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_cifar10(tmp_path)


def _write_images(root, classes=("cat", "dog"), n=5, size=(8, 6)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(array).save(root / c / f"{i}.png")


def test_image_folder_holds_out_a_fraction_of_each_class(tmp_path):
    _write_images(tmp_path)
    data = load_image_folder(tmp_path, val_fraction=0.2)
    assert data.train_x.shape == (8, 3, 6, 8) and data.val_x.shape == (2, 3, 6, 8)
    assert sorted(data.val_y.tolist()) == [0, 1]
    assert data.num_classes == 2


def test_image_folder_with_train_and_val_subfolders(tmp_path):
    _write_images(tmp_path / "train", n=3)
    _write_images(tmp_path / "val", n=2)
    data = load_image_folder(tmp_path)
    assert len(data.train_x) == 6 and len(data.val_x) == 4


def test_image_folder_with_mixed_sizes_is_a_clear_error(tmp_path):
    _write_images(tmp_path / "a_set", classes=("a",), n=2, size=(8, 8))
    _write_images(tmp_path / "b_set", classes=("b",), n=2, size=(4, 4))
    (tmp_path / "a_set" / "a").rename(tmp_path / "a")
    (tmp_path / "b_set" / "b").rename(tmp_path / "b")
    (tmp_path / "a_set").rmdir()
    (tmp_path / "b_set").rmdir()
    with pytest.raises(ValueError, match="one size"):
        load_image_folder(tmp_path)


def test_load_data_dispatches_on_the_spec(tmp_path):
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    _write_cifar(cifar)
    assert load_data(str(cifar)).name == "CIFAR-10"
    assert load_data("mnist1d:40", cache_dir=tmp_path).train_x.shape == (32, 1, 40)
    with pytest.raises(FileNotFoundError, match="--data"):
        load_data(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("damage", ["truncate", "junk"])
def test_an_unreadable_mnist1d_cache_is_regenerated_with_a_warning(tmp_path, damage):
    first = load_mnist1d(40, cache_dir=tmp_path)
    path = tmp_path / "mnist1d-40-42.npz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"junk")
    with pytest.warns(RuntimeWarning, match=r"mnist1d-40-42\.npz cannot be read.*generating"):
        again = load_mnist1d(40, cache_dir=tmp_path)
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.val_y, again.val_y)
    assert (tmp_path / "mnist1d-40-42.npz.corrupt").exists()
    assert torch.equal(load_mnist1d(40, cache_dir=tmp_path).train_x, first.train_x)
