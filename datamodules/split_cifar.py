"""SplitCIFAR-10: CIFAR-10 as five two-class tasks {0,1}, {2,3}, …, {8,9} (task-relative labels 0/1).

The images are read from the python-pickle batches with :func:`datamodules.cifar10.load_cifar_batch`, in either
layout that :func:`datamodules.cifar10.find_cifar10_folder` knows (torchvision's ``data_dir/cifar-10-batches-py/``
or hyperlit's ``data_dir/cifar10/cifar-10-batches-py/``). Which training batches are read is an argument
(``train_batches``, default all five), so a partial copy (e.g. only ``data_batch_1`` and ``test_batch``) serves
the same task sequence on fewer training images; ``batches.meta`` is not needed and no md5 is checked (the
:class:`~datamodules.cifar10.CIFAR10DataModule` checks them for the full set).

As in :mod:`datamodules.continual_mnist`, the images are kept once as uint8 tensors (N, 3, 32, 32), each task is an
index into them and every batch is built by tensor indexing; see :mod:`datamodules.task_sequence` for how a
sequence runs in one ``fit``. No augmentation is applied: the official ZenkeNet SplitCIFAR runs use none
(``--disable_data_augmentation``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datamodules.base import DatasetNotFoundError
from datamodules.cifar10 import FOLDER, TRAIN_FILES, find_cifar10_folder, find_or_download, load_cifar_batch
from datamodules.task_sequence import TaskSequenceDataModule

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "SplitCIFAR10DataModule"]

#: Per-channel mean (R, G, B) of the 50,000 CIFAR-10 training images, pixels in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
#: Per-channel standard deviation (R, G, B) of the same images.
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_LAYOUT = (
    f"  {FOLDER}/   (torchvision's layout; torchvision.datasets.CIFAR10(root=data_dir, download=True) writes it)\n"
    "    data_batch_1 … data_batch_5 (those named in train_batches), test_batch\n"
    f"  or cifar10/{FOLDER}/ with the same files\n"
    '  (a partial copy with only data_batch_1 and test_batch: train_batches=["data_batch_1"], '
    'CLI: --data.train_batches "[data_batch_1]")'
)


class SplitCIFAR10DataModule(TaskSequenceDataModule):
    """SplitCIFAR-10: 5 two-class tasks {0,1}, {2,3}, {4,5}, {6,7}, {8,9}; labels relative to the task (0 or 1).

    Batches are dicts ``{"x": (B, 3, 32, 32) float, "y": (B,) int64 in {0, 1}, "task": int}``.

    Args:
        num_tasks: Number of tasks (at most 5; the first ``num_tasks`` class pairs).
        train_batches: Training batch files to read (default: ``data_batch_1`` … ``data_batch_5``); e.g.
            ``["data_batch_1"]`` for a partial copy.
        val_size: Training images held out (a seeded split, before splitting by class) as the validation split;
            0 (default) makes Lightning's validation measure the test split, the papers' protocol.
        normalize: Standardize each channel with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD` (``False``: pixels in
            [0, 1], as the official code without augmentation).
        **kwargs: See :class:`~datamodules.task_sequence.TaskSequenceDataModule` (``steps_per_task``,
            ``epochs_per_task``, ``eval_size``) and :class:`~datamodules.base.HyperlitDataModule` (``data_dir``,
            ``download``, ``batch_size``, ``eval_batch_size``, ``split_seed``, …).
    """

    classes_per_task = 2
    image_shape = (3, 32, 32)

    def __init__(
        self,
        num_tasks: int = 5,
        train_batches: Sequence[str] | None = None,
        val_size: int = 0,
        normalize: bool = True,
        **kwargs: Any,
    ) -> None:
        if not 1 <= num_tasks <= 5:
            raise ValueError(f"SplitCIFAR-10 has at most 5 two-class tasks, got num_tasks={num_tasks}")
        super().__init__(num_tasks=num_tasks, **kwargs)
        if isinstance(train_batches, str):
            raise TypeError(f'train_batches must be a list of file names, e.g. ["{train_batches}"], not a string')
        batches = list(TRAIN_FILES) if train_batches is None else list(train_batches)
        unknown = [b for b in batches if b not in TRAIN_FILES]
        if not batches or unknown or len(set(batches)) != len(batches):
            raise ValueError(
                f"train_batches must be a non-empty list of distinct names out of {list(TRAIN_FILES)}, got {batches}"
            )
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        self.train_batches = batches
        self.val_size = val_size
        self.normalize = normalize
        self._images: dict[str, Tensor] = {}
        self._labels: dict[str, Tensor] = {}
        self._index: dict[str, list[Tensor]] = {}
        self._mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)

    @property
    def files(self) -> list[str]:
        """Names of the batch files read (``train_batches``, then ``test_batch``)."""
        return [*self.train_batches, "test_batch"]

    def _find(self) -> Any:
        try:
            return find_cifar10_folder(self.data_dir, self.files)
        except DatasetNotFoundError as err:
            hint = (
                "pass download=True (CLI: --data.download true) on a machine with internet access to fetch the full "
                'data set, or read only the batches you have (e.g. train_batches=["data_batch_1"])'
            )
            raise DatasetNotFoundError("CIFAR-10 (SplitCIFAR-10)", self.data_dir, err.missing, _LAYOUT, hint) from err

    def prepare_data(self) -> None:
        """Check the files; with ``download=True`` fetch torchvision's archive into ``data_dir`` when missing."""
        find_or_download(self._find, self.data_dir, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self._images:
            return
        folder = self._find()
        parts = [load_cifar_batch(folder / f) for f in self.train_batches]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        if self.val_size >= len(labels):
            raise ValueError(
                f"val_size={self.val_size} leaves no training image out of {len(labels)} (train_batches "
                f"{self.train_batches})"
            )
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, train_idx = perm[: self.val_size], perm[self.val_size :]
        test_images, test_labels = load_cifar_batch(folder / "test_batch")
        self._images = {"train": images[train_idx], "val": images[val_idx], "test": torch.from_numpy(test_images)}
        self._labels = {"train": labels[train_idx], "val": labels[val_idx], "test": torch.from_numpy(test_labels)}
        for split, y in self._labels.items():
            self._index[split] = [
                torch.nonzero((y == 2 * t) | (y == 2 * t + 1)).squeeze(1) for t in range(self.num_tasks)
            ]
        for t in range(self.num_tasks):
            if len(self._index["train"][t]) == 0:
                raise ValueError(
                    f"task {t} (classes {2 * t}, {2 * t + 1}) has no training image in {self.train_batches}"
                )

    def classes_of_task(self, task: int) -> tuple[int, int]:
        """The two CIFAR-10 classes of ``task`` (its labels 0 and 1)."""
        self._check_task(task)
        return 2 * task, 2 * task + 1

    def task_size(self, task: int, split: str) -> int:
        self._check_task(task)
        return len(self._index[split][task])

    def task_batch(self, task: int, split: str, idx: Tensor) -> tuple[Tensor, Tensor]:
        self._check_task(task)
        rows = self._index[split][task][idx]
        x = self._images[split][rows].float().div_(255.0)
        if self.normalize:
            x = (x - self._mean) / self._std
        return x, self._labels[split][rows] - 2 * task
