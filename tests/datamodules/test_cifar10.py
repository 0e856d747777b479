"""CIFAR10DataModule (torchvision's reader) on tiny generated pickle batches in both layouts and on the shared partial
copy."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import datamodules.cifar10 as cifar_module
from datamodules.base import DataFormatError, DatasetNotFoundError
from datamodules.cifar10 import CIFAR10DataModule, load_cifar_batch
from tests.fakedata import write_fake_cifar


def test_full_layout_split_and_float_images(tmp_path) -> None:
    folder = write_fake_cifar(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), verify_md5=False, batch_size=8)
    dm.setup()
    assert (len(dm.train_set), len(dm.hyper_set), len(dm.test_set)) == (80, 20, 20)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0.0 and x.max() <= 1.0
    # pixel layout: R, G, B planes, row-major (uint8 / 255)
    raw, labels = load_cifar_batch(folder / "test_batch")
    xt, yt = dm.test_set[3]
    torch.testing.assert_close(xt, torch.from_numpy(raw[3]).float() / 255, atol=0, rtol=0)
    assert yt.item() == labels[3]
    # train + hyper partition the five training batches
    batch_marks = torch.cat([dm.train_set.images[:, 0, 0, 0], dm.hyper_set.images[:, 0, 0, 0]]).bincount()
    assert batch_marks.tolist() == [20] * 5
    assert len(dm.hyper_dataloader()) == 2 and len(dm.val_dataloader()) == 3


def test_split_is_seeded(tmp_path) -> None:
    write_fake_cifar(tmp_path)
    a = CIFAR10DataModule(data_dir=str(tmp_path), verify_md5=False)
    b = CIFAR10DataModule(data_dir=str(tmp_path), verify_md5=False)
    c = CIFAR10DataModule(data_dir=str(tmp_path), verify_md5=False, split_seed=1)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.hyper_set.images, b.hyper_set.images)
    assert not torch.equal(a.hyper_set.images, c.hyper_set.images)


def test_default_verifies_the_original_md5(tmp_path) -> None:
    write_fake_cifar(tmp_path)
    with pytest.raises(DataFormatError, match=r"data_batch_1: md5 .* expected c99cafc152244af753f735de768cd75f"):
        CIFAR10DataModule(data_dir=str(tmp_path)).setup()
    with pytest.raises(DataFormatError, match="partial=True"):
        CIFAR10DataModule(data_dir=str(tmp_path)).setup()


def test_missing_files_name_them_and_the_layout(tmp_path) -> None:
    write_fake_cifar(tmp_path, files=["data_batch_1", "test_batch"])
    with pytest.raises(DatasetNotFoundError, match="data_batch_5") as err:
        CIFAR10DataModule(data_dir=str(tmp_path)).setup()
    msg = str(err.value)
    assert "cifar10/cifar-10-batches-py/data_batch_5" in msg and "download" in msg  # the most complete layout
    assert "cifar10/cifar-10-batches-py/data_batch_1" not in msg and "torchvision's layout" in msg
    with pytest.raises(DatasetNotFoundError, match="test_batch"):
        CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"), partial=True).setup()


def test_partial_option_loads_batch_1_and_test(tmp_path) -> None:
    write_fake_cifar(tmp_path, per_batch=50, files=["data_batch_1", "test_batch"])
    dm = CIFAR10DataModule(data_dir=str(tmp_path), partial=True)
    dm.setup()
    assert (len(dm.train_set), len(dm.hyper_set), len(dm.test_set)) == (40, 10, 50)


def test_corrupt_and_truncated_files(tmp_path) -> None:
    folder = write_fake_cifar(tmp_path, files=["data_batch_1", "test_batch"])
    blob = (folder / "data_batch_1").read_bytes()
    (folder / "data_batch_1").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataFormatError, match=r"data_batch_1: not a readable CIFAR-10 batch \(truncated"):
        CIFAR10DataModule(data_dir=str(tmp_path), partial=True).setup()
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}, fh, protocol=2)
    with pytest.raises(DataFormatError, match=r"\(N, 3072\)"):
        load_cifar_batch(folder / "data_batch_1")
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2]}, fh, protocol=2)
    with pytest.raises(DataFormatError, match="4 images but 3 labels"):
        load_cifar_batch(folder / "data_batch_1")
    with pytest.raises(ValueError, match="hyper_fraction"):
        CIFAR10DataModule(hyper_fraction=1.0)


def test_shared_partial_copy(real_data_dir) -> None:
    if not (real_data_dir / "cifar10" / "cifar-10-batches-py" / "data_batch_1").exists():
        pytest.skip("no CIFAR-10 copy in HYPERLIT_DATA_DIR")
    dm = CIFAR10DataModule(data_dir=str(real_data_dir), partial=True)
    dm.setup()
    assert (len(dm.train_set), len(dm.hyper_set), len(dm.test_set)) == (8000, 2000, 10000)
    counts = torch.cat([dm.train_set.labels, dm.hyper_set.labels]).bincount().tolist()
    assert counts == [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]  # data_batch_1 (shared README)
    assert dm.test_set.labels.bincount().tolist() == [1000] * 10
    with pytest.raises(DatasetNotFoundError, match="data_batch_2"):  # the default wants the full data set
        CIFAR10DataModule(data_dir=str(real_data_dir)).setup()


def test_torchvision_layout_gives_torchvision_pixels(tmp_path, monkeypatch) -> None:
    """``data_dir/cifar-10-batches-py`` (an existing torchvision download) is read, pixel for pixel as torchvision."""
    write_fake_cifar(tmp_path, layout="torchvision")
    dm = CIFAR10DataModule(data_dir=str(tmp_path), verify_md5=False)
    dm.setup()
    assert dm.root == tmp_path / "cifar-10-batches-py"
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)  # fake md5s
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_load_meta", lambda self: None)
    reference = torchvision.datasets.CIFAR10(str(tmp_path), train=False)
    expected = torch.from_numpy(reference.data).permute(0, 3, 1, 2)  # torchvision's HWC -> CHW
    assert torch.equal(dm.test_set.images, expected)
    assert dm.test_set.labels.tolist() == reference.targets


def test_partial_copy_in_either_layout(tmp_path) -> None:
    write_fake_cifar(tmp_path / "a", per_batch=10, files=["data_batch_1", "test_batch"], layout="torchvision")
    write_fake_cifar(tmp_path / "b", per_batch=10, files=["data_batch_1", "test_batch"])
    for sub in ("a", "b"):
        dm = CIFAR10DataModule(data_dir=str(tmp_path / sub), partial=True)
        dm.prepare_data()
        dm.setup()
        assert (len(dm.train_set), len(dm.hyper_set), len(dm.test_set)) == (8, 2, 10)


def test_download_only_with_download_true_through_torchvision(tmp_path, monkeypatch) -> None:
    source = tmp_path / "source"
    write_fake_cifar(source, per_batch=10, layout="torchvision")
    calls = []

    def fake_download(url: str, download_root: str, filename: str | None = None, md5: str | None = None) -> None:
        calls.append((url, filename, md5))
        archive = Path(download_root) / str(filename)
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        torchvision.datasets.utils.extract_archive(str(archive), download_root)

    monkeypatch.setattr(cifar_module, "download_and_extract_archive", fake_download)
    data = tmp_path / "data"
    with pytest.raises(DatasetNotFoundError, match="data_batch_1"):
        CIFAR10DataModule(data_dir=str(data)).prepare_data()
    assert calls == []
    dm = CIFAR10DataModule(data_dir=str(data), download=True, verify_md5=False)
    dm.prepare_data()
    assert calls == [(torchvision.datasets.CIFAR10.url, "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")]
    dm.setup()
    assert dm.root == data / "cifar-10-batches-py" and len(dm.train_set) == 40
    dm.prepare_data()  # present: nothing downloaded again
    assert len(calls) == 1
