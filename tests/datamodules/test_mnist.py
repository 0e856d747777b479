"""MNIST IDX reader and DataModule: generated files in the real format, the shared real copy, bad files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from datamodules.base import DataFormatError, DatasetNotFoundError
from datamodules.mnist import MNISTDataModule, load_mnist, read_idx
from tests.fakedata import write_fake_mnist, write_idx


def test_read_idx_roundtrip(tmp_path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for compress in (True, False):
        path = write_idx(tmp_path / f"a{compress}", arr, compress=compress)
        np.testing.assert_array_equal(read_idx(path), arr)


def test_truncated_and_wrong_magic(tmp_path) -> None:
    path = write_idx(tmp_path / "x", np.zeros((4, 28, 28), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataFormatError, match="truncated"):
        read_idx(path)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"PK\x03\x04 not an idx file")
    with pytest.raises(DataFormatError, match="magic"):
        read_idx(bad)


def test_datamodule_on_generated_files(tmp_path) -> None:
    write_fake_mnist(tmp_path, n_train=120, n_test=30)
    dm = MNISTDataModule(data_dir=str(tmp_path), train_size=50, val_size=40, batch_size=16)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 50 and len(dm.val_set) == 40 and len(dm.test_set) == 30
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 784) and x.dtype == torch.float32 and y.dtype == torch.long
    # seeded split: the same on every construction, different for another seed
    dm2 = MNISTDataModule(data_dir=str(tmp_path), train_size=50, val_size=40)
    dm2.setup("fit")
    assert torch.equal(dm.train_set.tensors[1], dm2.train_set.tensors[1])
    dm3 = MNISTDataModule(data_dir=str(tmp_path), train_size=50, val_size=40, split_seed=1)
    dm3.setup("fit")
    assert not torch.equal(dm.val_set.tensors[1], dm3.val_set.tensors[1])


def test_missing_files_name_layout_and_download(tmp_path) -> None:
    dm = MNISTDataModule(data_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert "train-images-idx3-ubyte.gz" in msg and "download=True" in msg and "HYPERLIT_DATA_DIR" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_bad_sizes() -> None:
    with pytest.raises(ValueError, match="60,000"):
        MNISTDataModule(train_size=55000, val_size=10000)


def test_real_mnist_counts(real_data_dir) -> None:
    images, labels = load_mnist(real_data_dir, train=True)
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert abs(images.float().mean().item() / 255 - 0.1307) < 1e-3
    test_images, test_labels = load_mnist(real_data_dir, train=False)
    assert test_images.shape == (10000, 28, 28) and test_labels[:5].tolist() == [7, 2, 1, 0, 4]
