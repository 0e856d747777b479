"""SplitCIFAR10DataModule on tiny generated pickle batches (the real CIFAR-10 format) and on the shared partial copy."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

import datamodules.cifar10 as cifar10
from datamodules import SplitCIFAR10DataModule
from datamodules.base import DatasetNotFoundError
from datamodules.cifar10 import load_cifar_batch
from datamodules.split_cifar import CIFAR10_MEAN, CIFAR10_STD
from tests.fakedata import write_fake_cifar

MEAN = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("split_cifar")
    write_fake_cifar(root, per_batch=60)
    return root


def _raw(folder, name):
    images, labels = load_cifar_batch(folder / name)
    return torch.from_numpy(images), torch.from_numpy(labels)


def test_test_split_tasks_hold_their_class_pair_with_relative_labels(cifar_dir) -> None:
    dm = SplitCIFAR10DataModule(data_dir=str(cifar_dir), eval_batch_size=7)
    dm.setup("fit")
    images, labels = _raw(cifar_dir / "cifar10" / "cifar-10-batches-py", "test_batch")
    loaders = dm.val_dataloader()  # val_size=0: validation measures the test split
    assert len(loaders) == 5 and len(dm.test_dataloader()) == 5
    for t, loader in enumerate(loaders):
        assert dm.classes_of_task(t) == (2 * t, 2 * t + 1)
        batches = list(loader)
        assert {b["task"] for b in batches} == {t}
        x = torch.cat([b["x"] for b in batches])
        y = torch.cat([b["y"] for b in batches])
        keep = (labels == 2 * t) | (labels == 2 * t + 1)
        assert dm.task_size(t, "test") == int(keep.sum()) == len(y)
        assert torch.equal(y, labels[keep] - 2 * t) and set(y.tolist()) <= {0, 1}
        assert x.shape == (len(y), 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        torch.testing.assert_close(x, (images[keep].float() / 255 - MEAN) / STD)  # dataset order, normalised


def test_training_examples_of_a_task_are_its_classes(cifar_dir) -> None:
    dm = SplitCIFAR10DataModule(data_dir=str(cifar_dir), normalize=False)
    dm.setup()
    folder = cifar_dir / "cifar10" / "cifar-10-batches-py"
    parts = [_raw(folder, f"data_batch_{k}") for k in range(1, 6)]
    all_labels = torch.cat([p[1] for p in parts])
    total = 0
    for t in range(5):
        n = dm.task_size(t, "train")
        x, y = dm.task_batch(t, "train", torch.arange(n))
        assert set(y.tolist()) <= {0, 1} and x.min() >= 0 and x.max() <= 1  # normalize=False: pixels in [0, 1]
        assert n == int(((all_labels == 2 * t) | (all_labels == 2 * t + 1)).sum())
        total += n
    assert total == 300  # five batches of 60, every image in exactly one task (10 classes, 5 pairs)


def test_validation_split_is_seeded_and_disjoint(cifar_dir) -> None:
    def make(seed: int) -> SplitCIFAR10DataModule:
        dm = SplitCIFAR10DataModule(data_dir=str(cifar_dir), val_size=50, split_seed=seed)
        dm.setup()
        return dm

    a, b, c = make(0), make(0), make(1)
    assert len(a._labels["val"]) == 50 and len(a._labels["train"]) == 250
    assert sum(a.task_size(t, "val") for t in range(5)) == 50
    assert torch.equal(a._images["val"], b._images["val"]) and torch.equal(a._images["train"], b._images["train"])
    assert not torch.equal(a._images["val"], c._images["val"])
    # train and val partition the training images (batch marker in pixel 0 counts 60 per batch)
    marks = torch.cat([a._images["train"][:, 0, 0, 0], a._images["val"][:, 0, 0, 0]]).bincount()
    assert marks.tolist() == [60] * 5
    assert a._eval_split() == "val"


def test_training_schedule_is_a_function_of_the_seed(cifar_dir) -> None:
    def batches(seed: int, epoch: int) -> list[dict]:
        dm = SplitCIFAR10DataModule(data_dir=str(cifar_dir), batch_size=8, steps_per_task=4, split_seed=seed)
        dm.setup()
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return list(loader)

    first = batches(0, 2)
    assert len(first) == 4 and {b["task"] for b in first} == {2}
    assert all(b["x"].shape == (8, 3, 32, 32) for b in first)
    again = batches(0, 2)
    assert all(torch.equal(u["x"], v["x"]) and torch.equal(u["y"], v["y"]) for u, v in zip(first, again))
    other = batches(1, 2)
    assert not all(torch.equal(u["x"], v["x"]) for u, v in zip(first, other))
    # steps_per_task=None: one pass over the smallest task; epochs_per_task: epoch e trains task e // epochs
    dm = SplitCIFAR10DataModule(data_dir=str(cifar_dir), batch_size=8, epochs_per_task=3)
    dm.setup()
    loader = dm.train_dataloader()
    assert len(loader) == math.ceil(min(dm.task_size(t, "train") for t in range(5)) / 8)
    assert dm.num_schedule_epochs == 15 and dm.task_of_epoch(7) == 2
    loader.sampler.set_epoch(7)
    assert {b["task"] for b in loader} == {2}


def test_partial_copy_reads_the_named_batches_and_eval_size(tmp_path) -> None:
    write_fake_cifar(tmp_path, per_batch=40, files=["data_batch_1", "test_batch"])
    dm = SplitCIFAR10DataModule(data_dir=str(tmp_path), train_batches=["data_batch_1"], num_tasks=3, eval_size=3)
    dm.prepare_data()
    dm.setup()
    assert sum(dm.task_size(t, "train") for t in range(3)) == int((dm._labels["train"] < 6).sum())
    assert len(dm._labels["train"]) == 40
    assert all(len(loader.dataset) == min(3, dm.task_size(t, "test")) for t, loader in enumerate(dm.val_dataloader()))


def test_missing_files_are_named_with_the_fix(tmp_path) -> None:
    write_fake_cifar(tmp_path, per_batch=10, files=["data_batch_1", "test_batch"])
    with pytest.raises(DatasetNotFoundError, match="data_batch_2") as err:
        SplitCIFAR10DataModule(data_dir=str(tmp_path)).prepare_data()
    msg = str(err.value)
    assert "cifar10/cifar-10-batches-py/data_batch_5" in msg and "batches-py/data_batch_1\n" not in msg
    assert 'train_batches=["data_batch_1"]' in msg and "download=True" in msg
    with pytest.raises(DatasetNotFoundError, match="test_batch"):
        SplitCIFAR10DataModule(data_dir=str(tmp_path / "nowhere"), train_batches=["data_batch_1"]).setup()


def test_download_goes_through_torchvision_in_prepare_data_only(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_download(url, root, filename, md5):  # writes what torchvision's archive unpacks to
        calls.append((url, filename, md5))
        write_fake_cifar(tmp_path, per_batch=10, layout="torchvision")

    monkeypatch.setattr(cifar10, "download_and_extract_archive", fake_download)  # the shared download
    with pytest.raises(DatasetNotFoundError):
        SplitCIFAR10DataModule(data_dir=str(tmp_path)).setup()  # setup never downloads
    assert calls == []
    dm = SplitCIFAR10DataModule(data_dir=str(tmp_path), download=True)
    dm.prepare_data()
    assert calls == [(cifar10.CIFAR10.url, cifar10.CIFAR10.filename, cifar10.CIFAR10.tgz_md5)]
    dm.setup()
    assert sum(dm.task_size(t, "train") for t in range(5)) == 50
    dm.prepare_data()  # files present: no second download
    assert len(calls) == 1


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="at most 5 two-class tasks"):
        SplitCIFAR10DataModule(num_tasks=6)
    with pytest.raises(ValueError, match="num_tasks"):
        SplitCIFAR10DataModule(num_tasks=0)
    for bad in ([], ["data_batch_7"], ["data_batch_1", "data_batch_1"], ["test_batch"]):
        with pytest.raises(ValueError, match="train_batches must be a non-empty list of distinct names"):
            SplitCIFAR10DataModule(train_batches=bad)
    with pytest.raises(TypeError, match=r'e.g. \["data_batch_1"\], not a string'):
        SplitCIFAR10DataModule(train_batches="data_batch_1")
    with pytest.raises(ValueError, match="val_size must be >= 0"):
        SplitCIFAR10DataModule(val_size=-1)
    with pytest.raises(ValueError, match="steps_per_task"):
        SplitCIFAR10DataModule(steps_per_task=0)
    write_fake_cifar(tmp_path, per_batch=10, files=["data_batch_1", "test_batch"])
    with pytest.raises(ValueError, match="val_size=10 leaves no training image out of 10"):
        SplitCIFAR10DataModule(data_dir=str(tmp_path), train_batches=["data_batch_1"], val_size=10).setup()
    dm = SplitCIFAR10DataModule(data_dir=str(tmp_path), train_batches=["data_batch_1"])
    dm.setup()
    with pytest.raises(KeyError, match="unknown task id 5"):
        dm.task_size(5, "train")


def test_a_task_without_training_images_is_refused(tmp_path) -> None:
    folder = write_fake_cifar(tmp_path, per_batch=10, files=["test_batch"])
    entry = {"batch_label": "b", "labels": [0, 1] * 5, "data": np.zeros((10, 3072), np.uint8), "filenames": []}
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump(entry, fh, protocol=2)
    with pytest.raises(ValueError, match=r"task 1 \(classes 2, 3\) has no training image"):
        SplitCIFAR10DataModule(data_dir=str(tmp_path), train_batches=["data_batch_1"], num_tasks=2).setup()
    dm = SplitCIFAR10DataModule(data_dir=str(tmp_path), train_batches=["data_batch_1"], num_tasks=1)
    dm.setup()
    assert dm.task_size(0, "train") == 10


def test_shared_partial_copy(real_data_dir) -> None:
    if not (real_data_dir / "cifar10" / "cifar-10-batches-py" / "data_batch_1").exists():
        pytest.skip("no CIFAR-10 copy in HYPERLIT_DATA_DIR")
    dm = SplitCIFAR10DataModule(data_dir=str(real_data_dir), train_batches=["data_batch_1"], batch_size=16)
    dm.setup()
    counts = [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]  # data_batch_1 (shared README)
    assert [dm.task_size(t, "train") for t in range(5)] == [counts[2 * t] + counts[2 * t + 1] for t in range(5)]
    assert [dm.task_size(t, "test") for t in range(5)] == [2000] * 5
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (16, 3, 32, 32) and batch["task"] == 0 and set(batch["y"].tolist()) <= {0, 1}
    with pytest.raises(DatasetNotFoundError, match="data_batch_2"):  # the default wants all five training batches
        SplitCIFAR10DataModule(data_dir=str(real_data_dir)).setup()
