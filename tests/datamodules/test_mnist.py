"""MNIST through torchvision's IDX reader: generated files in both layouts, the shared real copy, bad files, download."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.mnist as tv_mnist

from datamodules.base import DataFormatError, DatasetNotFoundError
from datamodules.mnist import MNISTDataModule, find_mnist_folder, load_mnist, read_mnist_file
from tests.fakedata import write_fake_mnist, write_idx


def test_read_mnist_file_roundtrip_raw_and_gz(tmp_path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    for compress in (True, False):
        path = write_idx(tmp_path / f"images{compress}", images, compress=compress)
        out = read_mnist_file(path, "images")
        assert out.dtype == torch.uint8
        np.testing.assert_array_equal(out.numpy(), images)
        path = write_idx(tmp_path / f"labels{compress}", labels, compress=compress)
        out = read_mnist_file(path, "labels")
        assert out.dtype == torch.int64 and out.tolist() == [3, 1, 4]


def test_truncated_wrong_magic_and_wrong_kind(tmp_path) -> None:
    path = write_idx(tmp_path / "x", np.zeros((4, 28, 28), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataFormatError, match=r"x: .*truncated"):
        read_mnist_file(path, "images")
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"PK\x03\x04 not an idx file")
    with pytest.raises(DataFormatError, match=r"bad\.gz: not an IDX file \(bad magic"):
        read_mnist_file(bad, "images")
    gz = write_idx(tmp_path / "cut", np.zeros((4, 28, 28), np.uint8), compress=True)
    gz.write_bytes(gz.read_bytes()[:-12])  # a truncated gzip stream
    with pytest.raises(DataFormatError, match=r"cut\.gz: cannot decompress"):
        read_mnist_file(gz, "images")
    labels = write_idx(tmp_path / "labels", np.zeros(5, np.uint8), compress=True)
    with pytest.raises(DataFormatError, match="not an MNIST images file"):
        read_mnist_file(labels, "images")


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


@pytest.mark.parametrize("compress", [False, True])
def test_torchvision_layout_is_read_like_torchvision(tmp_path, compress: bool) -> None:
    """``data_dir/MNIST/raw`` (an existing torchvision download) gives exactly torchvision's tensors."""
    write_fake_mnist(tmp_path, n_train=40, n_test=10, layout="torchvision", compress=compress)
    assert find_mnist_folder(tmp_path) == tmp_path / "MNIST" / "raw"
    images, labels = load_mnist(tmp_path, train=True)
    if not compress:  # torchvision's own dataset reads only the uncompressed files
        reference = tv_mnist.MNIST(str(tmp_path), train=True, download=False)
        assert torch.equal(images, reference.data) and torch.equal(labels, reference.targets)
    write_fake_mnist(tmp_path, n_train=40, n_test=10, seed=1)  # hyperlit's layout too: torchvision's comes first
    assert find_mnist_folder(tmp_path) == tmp_path / "MNIST" / "raw"
    assert torch.equal(load_mnist(tmp_path, train=True)[1], labels)


def test_missing_files_name_layouts_and_download(tmp_path) -> None:
    dm = MNISTDataModule(data_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert "train-images-idx3-ubyte.gz" in msg and "download=True" in msg and "HYPERLIT_DATA_DIR" in msg
    assert "MNIST/raw/" in msg and "mnist/" in msg
    assert isinstance(info.value, FileNotFoundError)
    # an incomplete copy: the message names what is missing from it
    write_fake_mnist(tmp_path, n_train=10, n_test=5)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"Missing files:\n  - mnist/t10k-labels-idx1-ubyte.gz\nExpected"):
        MNISTDataModule(data_dir=str(tmp_path)).setup("fit")


def test_download_goes_through_torchvision_into_its_layout(tmp_path, monkeypatch) -> None:
    calls: list[tuple[str, str | None]] = []
    source = write_fake_mnist(tmp_path / "source", n_train=30, n_test=10) / "mnist"

    def fake_download(url: str, download_root: str, filename: str | None = None, md5: str | None = None) -> None:
        calls.append((url, md5))
        name = Path(url).name
        Path(download_root).mkdir(parents=True, exist_ok=True)
        (Path(download_root) / name).write_bytes((source / name).read_bytes())
        tv_mnist.extract_archive(str(Path(download_root) / name), download_root)

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", fake_download)
    data = tmp_path / "data"
    with pytest.raises(DatasetNotFoundError):
        MNISTDataModule(data_dir=str(data)).prepare_data()  # download=False never downloads
    assert calls == []
    dm = MNISTDataModule(data_dir=str(data), download=True, val_size=10)
    dm.prepare_data()
    assert len(calls) == 4 and all(md5 for _, md5 in calls)  # torchvision's md5 of every file
    assert (data / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    dm.setup("fit")
    assert len(dm.train_set) == 20 and len(dm.test_set) == 10
    dm.prepare_data()  # files present: nothing downloaded again
    assert len(calls) == 4


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
