"""Fixtures of the continual-learning tests: one torch thread (tiny ops), generated MNIST files, Adam factories,
tiny generated task sequences."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from datamodules import TaskSequenceDataModule
from tests.fakedata import write_fake_mnist


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # the steps are tiny: one thread avoids oversubscribing the shared cores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fake_mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/mnist/*-ubyte.gz`` in the real IDX format (class-dependent blobs, learnable)."""
    return write_fake_mnist(tmp_path_factory.mktemp("fake_mnist"), n_train=600, n_test=200)


def adam(lr: float) -> OptimizerCallable:
    """An Adam factory as a Python caller writes it (a lambda: like the defaults, not saved in checkpoints).

    A ``functools.partial`` would be saved in ``hyper_parameters`` and make ``fit(ckpt_path=...)`` fail to load
    the checkpoint with ``weights_only=True``; the DDP tests, whose module is pickled, use one without resuming.
    """
    return lambda params: torch.optim.Adam(params, lr=lr)


def optimizers(lr: float) -> dict[str, OptimizerCallable]:
    """``hnet_optimizer`` and ``emb_optimizer``: Adam with the same learning rate (the old single ``lr``)."""
    return {"hnet_optimizer": adam(lr), "emb_optimizer": adam(lr)}


class TinyTasks(TaskSequenceDataModule):
    """Generated tasks of 2 classes, in memory: 1×8×8 images (``image=True``) or 4-feature vectors.

    Class c of task t is a Gaussian blob around its own mean (each task its own means), so every task is learnable
    in a few steps. ``nan_task``: that task's training inputs are all NaN.
    """

    classes_per_task = 2

    def __init__(
        self,
        num_tasks: int = 2,
        steps_per_task: int = 4,
        batch_size: int = 8,
        image: bool = False,
        num_eval: int = 12,
        nan_task: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_tasks=num_tasks, steps_per_task=steps_per_task, batch_size=batch_size, data_dir=".", **kwargs
        )
        shape = (1, 8, 8) if image else (4,)
        self.input_dim = math.prod(shape)
        g = torch.Generator().manual_seed(0)
        self.data: dict[str, list[tuple[Tensor, Tensor]]] = {"train": [], "val": [], "test": []}
        for t in range(num_tasks):
            means = 2.0 * torch.randn(2, *shape, generator=g)
            for split, n in (("train", 32), ("val", num_eval), ("test", num_eval)):
                y = torch.randint(0, 2, (n,), generator=g)
                x = means[y] + 0.5 * torch.randn(n, *shape, generator=g)
                if split == "train" and t == nan_task:
                    x = torch.full_like(x, math.nan)
                self.data[split].append((x, y))

    def setup(self, stage: str | None = None) -> None:
        pass

    def task_size(self, task: int, split: str) -> int:
        return len(self.data[split][task][1])

    def task_batch(self, task: int, split: str, idx: Tensor) -> tuple[Tensor, Tensor]:
        x, y = self.data[split][task]
        return x[idx], y[idx]
