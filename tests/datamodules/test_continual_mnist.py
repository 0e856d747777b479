"""PermutedMNIST / SplitMNIST on generated IDX files, the task schedule sampler, and the real MNIST copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.base import DatasetNotFoundError
from datamodules.continual_mnist import PermutedMNISTDataModule, SplitMNISTDataModule, permutations
from datamodules.mnist import load_mnist
from datamodules.task_sequence import TaskScheduleSampler
from tests.fakedata import write_fake_mnist


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    return write_fake_mnist(tmp_path_factory.mktemp("cl_mnist"), n_train=300, n_test=80)


def test_permutations_match_official_construction() -> None:
    perms = permutations(4, 1024, seed=42)
    rand = np.random.RandomState(42)
    assert torch.equal(perms[0], torch.arange(1024))  # task 0 unpermuted
    for t in range(1, 4):
        assert torch.equal(perms[t], torch.as_tensor(rand.permutation(1024)))


@pytest.mark.parametrize("pad", [False, True])
def test_permuted_batches_are_permuted_images(mnist_dir, pad: bool) -> None:
    dm = PermutedMNISTDataModule(data_dir=str(mnist_dir), num_tasks=3, pad_to_32=pad, val_size=50, batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    images, labels = load_mnist(mnist_dir, train=False)
    flat = torch.nn.functional.pad(images, (2, 2, 2, 2)) if pad else images
    flat = flat.reshape(len(flat), -1).float() / 255
    assert dm.input_dim == (1024 if pad else 784)
    loaders = dm.test_dataloader()
    assert len(loaders) == 3
    for t, loader in enumerate(loaders):
        batch = next(iter(loader))
        assert batch["task"] == t and batch["x"].shape == (8, dm.input_dim)
        assert torch.equal(batch["y"], labels[:8])
        assert torch.equal(batch["x"], flat[:8][:, dm.perms[t]])
    if pad:  # the zero border is part of what gets permuted
        assert float(flat.reshape(-1, 32, 32)[:, :2].abs().sum()) == 0.0


def test_training_schedule_one_task_per_epoch_and_seeded(mnist_dir) -> None:
    dm = PermutedMNISTDataModule(
        data_dir=str(mnist_dir),
        num_tasks=3,
        pad_to_32=False,
        val_size=50,
        batch_size=16,
        steps_per_task=5,
        epochs_per_task=2,
    )
    dm.setup("fit")
    assert dm.num_schedule_epochs == 6
    loader = dm.train_dataloader()
    assert len(loader) == 5
    seen = {}
    for epoch in range(6):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 5 and {b["task"] for b in batches} == {epoch // 2}
        seen[epoch] = torch.cat([b["y"] for b in batches])
    again = dm.train_dataloader()
    again.sampler.set_epoch(3)
    assert torch.equal(torch.cat([b["y"] for b in again]), seen[3])  # a pure function of (seed, epoch)
    again.sampler.resume(3, 2)  # resuming after 2 batches of epoch 3 yields exactly the remaining 3
    assert torch.equal(torch.cat([b["y"] for b in again]), seen[3][32:])
    again.sampler.set_epoch(6)
    with pytest.raises(ValueError, match="past the task sequence"):
        list(again)


def test_sampler_covers_each_task_before_repeating_and_splits_ranks() -> None:
    s = TaskScheduleSampler([10, 7], steps_per_epoch=5, batch_size=4)
    s.set_epoch(1)
    idx = [i - (1 << 40) for i in s]
    assert len(idx) == 20 and sorted(idx[:7]) == list(range(7)) and sorted(idx[7:14]) == list(range(7))
    ranks = [TaskScheduleSampler([10, 7], 5, 2, num_replicas=2, rank=r) for r in range(2)]
    full = TaskScheduleSampler([10, 7], 5, 4)
    merged = [torch.tensor(list(r)).view(5, 2) for r in ranks]
    assert torch.equal(torch.cat(merged, 1).flatten(), torch.tensor(list(full)))  # each rank: its slice


def test_split_mnist_tasks_are_class_pairs(mnist_dir) -> None:
    dm = SplitMNISTDataModule(data_dir=str(mnist_dir), val_size=0, batch_size=500)
    dm.setup("fit")
    _, labels = load_mnist(mnist_dir, train=False)
    for t, loader in enumerate(dm.val_dataloader()):  # val_size=0: validation measures the test split
        batch = next(iter(loader))
        assert set(batch["y"].tolist()) <= {0, 1} and batch["x"].shape[1] == 784
        assert len(batch["y"]) == int(((labels == 2 * t) | (labels == 2 * t + 1)).sum())
    with pytest.raises(ValueError, match="at most 5"):
        SplitMNISTDataModule(data_dir=str(mnist_dir), num_tasks=6)


def test_errors_missing_files_and_unknown_task(tmp_path, mnist_dir) -> None:
    dm = PermutedMNISTDataModule(data_dir=str(tmp_path), num_tasks=2)
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte"):
        dm.prepare_data()
    with pytest.raises(DatasetNotFoundError):
        dm.setup("fit")
    ok = PermutedMNISTDataModule(data_dir=str(mnist_dir), num_tasks=2, val_size=10)
    ok.setup("fit")
    with pytest.raises(KeyError, match="unknown task id 2"):
        ok.task_batch(2, "test", torch.arange(3))
    with pytest.raises(ValueError, match="steps_per_task"):
        PermutedMNISTDataModule(data_dir=str(mnist_dir), steps_per_task=0)


@pytest.mark.slow
def test_real_mnist_sequences(real_data_dir) -> None:
    dm = PermutedMNISTDataModule(data_dir=str(real_data_dir), num_tasks=2, val_size=5000, batch_size=128)
    dm.setup("fit")
    assert dm.task_size(0, "train") == 55000 and dm.task_size(1, "test") == 10000
    split = SplitMNISTDataModule(data_dir=str(real_data_dir), val_size=0)
    split.setup("fit")
    assert sum(split.task_size(t, "test") for t in range(5)) == 10000
