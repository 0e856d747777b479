"""PermutedMNIST and SplitMNIST task sequences (von Oswald et al. 2020; van de Ven & Tolias 2019).

Both read LeCun's IDX files through :func:`datamodules.mnist.load_mnist` (torchvision's ``MNIST/raw/`` or
hyperlit's ``mnist/`` under ``data_dir``, see :mod:`datamodules.mnist`), keep the images once as uint8 tensors and
build each batch by tensor indexing; see :mod:`datamodules.task_sequence` for how a sequence runs in one ``fit``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from datamodules.mnist import MNIST_MEAN, MNIST_STD, MNISTDataModule, load_mnist
from datamodules.task_sequence import TaskSequenceDataModule

__all__ = ["PermutedMNISTDataModule", "SplitMNISTDataModule", "permutations"]


def permutations(num_tasks: int, dim: int, seed: int = 42) -> Tensor:
    """Pixel permutations (num_tasks, dim): task 0 is the identity, task t ≥ 1 ``RandomState(seed).permutation``.

    Same construction as the official code (``[None] + [rand.permutation(dim) for _ in range(T − 1)]``), so
    seed 42 gives the paper's permutations.
    """
    rand = np.random.RandomState(seed)
    perms = [np.arange(dim)] + [rand.permutation(dim) for _ in range(num_tasks - 1)]
    return torch.as_tensor(np.stack(perms), dtype=torch.long)


class _MNISTSequence(TaskSequenceDataModule):
    """Shared loading: uint8 images (optionally zero-padded to 32×32), seeded validation split."""

    def __init__(
        self,
        pad_to_32: bool = False,
        val_size: int = 5000,
        train_size: int | None = None,
        normalize: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if val_size < 0 or (train_size is not None and train_size < 1):
            raise ValueError(f"need val_size >= 0 and train_size >= 1 or None, got {val_size}, {train_size}")
        self.pad_to_32 = pad_to_32
        self.val_size = val_size
        self.train_size = train_size
        self.normalize = normalize
        self.input_dim = 1024 if pad_to_32 else 784
        self._images: dict[str, Tensor] = {}
        self._labels: dict[str, Tensor] = {}

    def prepare_data(self) -> None:
        # same files, same checks and download as the plain MNIST DataModule
        MNISTDataModule(data_dir=str(self.data_dir), download=self.download).prepare_data()

    def _flat(self, images: Tensor) -> Tensor:
        if self.pad_to_32:
            images = torch.nn.functional.pad(images, (2, 2, 2, 2))
        return images.reshape(len(images), -1).contiguous()

    def setup(self, stage: str | None = None) -> None:
        if self._images:
            return
        images, labels = load_mnist(self.data_dir, train=True)
        if self.val_size >= len(labels):
            raise ValueError(f"val_size={self.val_size} leaves no training image out of {len(labels)}")
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, rest = perm[: self.val_size], perm[self.val_size :]
        train_idx = rest if self.train_size is None else rest[: self.train_size]
        flat = self._flat(images)
        test_images, test_labels = load_mnist(self.data_dir, train=False)
        self._images = {"train": flat[train_idx], "val": flat[val_idx], "test": self._flat(test_images)}
        self._labels = {"train": labels[train_idx], "val": labels[val_idx], "test": test_labels}
        self._build_tasks()

    def _build_tasks(self) -> None:
        raise NotImplementedError

    def _to_float(self, images: Tensor) -> Tensor:
        x = images.float() / 255.0
        return (x - MNIST_MEAN) / MNIST_STD if self.normalize else x


class PermutedMNISTDataModule(_MNISTSequence):
    """PermutedMNIST: task t is MNIST with a fixed pixel permutation (task 0 unpermuted), 10 classes per task.

    The permutation is applied as a tensor index to the preloaded (optionally padded) images of each batch, so it
    costs one gather per batch. With ``pad_to_32`` (the paper's setting) the images are zero-padded to 32×32
    *before* permuting, so the padding pixels are scattered too.

    Args:
        num_tasks: Number of permutations (tasks).
        pad_to_32: Zero-pad the 28×28 images to 32×32 (1,024 inputs) as in the official code.
        val_size: Training images held out as the validation split (the same images for every task); 0 makes
            Lightning's validation measure the test split, the papers' protocol.
        train_size: Use only this many training images per task (``None``: all remaining).
        normalize: Standardize with MNIST's mean/std (the official code uses [0, 1] pixels).
        permutation_seed: Seed of the permutations (42 is the paper's).
        **kwargs: See :class:`~datamodules.task_sequence.TaskSequenceDataModule` (``steps_per_task``,
            ``epochs_per_task``, ``eval_size``) and :class:`~datamodules.base.HyperlitDataModule`.
    """

    classes_per_task = 10

    def __init__(
        self,
        num_tasks: int = 10,
        pad_to_32: bool = True,
        val_size: int = 5000,
        train_size: int | None = None,
        normalize: bool = False,
        permutation_seed: int = 42,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_tasks=num_tasks,
            pad_to_32=pad_to_32,
            val_size=val_size,
            train_size=train_size,
            normalize=normalize,
            **kwargs,
        )
        self.permutation_seed = permutation_seed
        self.perms = permutations(num_tasks, self.input_dim, permutation_seed)

    def _build_tasks(self) -> None:
        pass

    def task_size(self, task: int, split: str) -> int:
        self._check_task(task)
        return len(self._labels[split])

    def task_batch(self, task: int, split: str, idx: Tensor) -> tuple[Tensor, Tensor]:
        self._check_task(task)
        images = self._images[split][idx]
        return self._to_float(images[:, self.perms[task]]), self._labels[split][idx]


class SplitMNISTDataModule(_MNISTSequence):
    """SplitMNIST: 5 two-class tasks {0,1}, {2,3}, {4,5}, {6,7}, {8,9}; labels relative to the task (0 or 1).

    Args:
        num_tasks: Number of tasks (at most 5; the first ``num_tasks`` pairs).
        pad_to_32: Zero-pad to 32×32 (default: 784 inputs, as the official SplitMNIST runs).
        val_size: Training images held out for validation (0: validate on the test split).
        train_size: Use only this many training images (before splitting by class).
        normalize: Standardize with MNIST's mean/std.
        **kwargs: See :class:`~datamodules.task_sequence.TaskSequenceDataModule`.
    """

    classes_per_task = 2

    def __init__(
        self,
        num_tasks: int = 5,
        pad_to_32: bool = False,
        val_size: int = 5000,
        train_size: int | None = None,
        normalize: bool = False,
        **kwargs: Any,
    ) -> None:
        if not 1 <= num_tasks <= 5:
            raise ValueError(f"SplitMNIST has at most 5 two-class tasks, got num_tasks={num_tasks}")
        super().__init__(
            num_tasks=num_tasks,
            pad_to_32=pad_to_32,
            val_size=val_size,
            train_size=train_size,
            normalize=normalize,
            **kwargs,
        )
        self._index: dict[str, list[Tensor]] = {}

    def _build_tasks(self) -> None:
        for split, labels in self._labels.items():
            self._index[split] = [
                torch.nonzero((labels == 2 * t) | (labels == 2 * t + 1)).squeeze(1) for t in range(self.num_tasks)
            ]

    def task_size(self, task: int, split: str) -> int:
        self._check_task(task)
        return len(self._index[split][task])

    def task_batch(self, task: int, split: str, idx: Tensor) -> tuple[Tensor, Tensor]:
        self._check_task(task)
        rows = self._index[split][task][idx]
        return self._to_float(self._images[split][rows]), self._labels[split][rows] - 2 * task
