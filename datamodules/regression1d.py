"""The 1-D continual regression toy of von Oswald et al. (2020): three polynomials on disjoint intervals.

=====  ==========  ===========
task   function    x-domain
=====  ==========  ===========
0      x + 3       [−4, −2]
1      2x² − 1     [−1, 1]
2      (x − 3)³    [2, 4]
=====  ==========  ===========

As in the official code (hypnettorch ``ToyRegression``): training inputs are drawn uniformly from the domain and
their targets get Gaussian noise (std 0.05); test inputs are equidistant and noise-free. Everything is generated
from ``data_seed``, so there is nothing to download.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datamodules.task_sequence import TaskSequenceDataModule

__all__ = ["TASKS", "Regression1DDataModule"]

TASKS: list[tuple[Callable[[np.ndarray], np.ndarray], tuple[float, float]]] = [
    (lambda x: x + 3.0, (-4.0, -2.0)),
    (lambda x: 2.0 * x**2 - 1.0, (-1.0, 1.0)),
    (lambda x: (x - 3.0) ** 3, (2.0, 4.0)),
]


class Regression1DDataModule(TaskSequenceDataModule):
    """Three polynomial regression tasks, one after another (inputs (B, 1), targets (B, 1)).

    Args:
        num_tasks: Use the first ``num_tasks`` polynomials (at most 3).
        num_train: Training points per task.
        num_test: Test points per task (equidistant over the domain).
        noise_std: Standard deviation of the noise added to the training targets.
        data_seed: Seed of the inputs and the noise (42 in the official run).
        **kwargs: See :class:`~datamodules.task_sequence.TaskSequenceDataModule` (the official run:
            ``batch_size=32``, ``steps_per_task=4001``). Validation measures the test points.
    """

    task_type = "regression"
    classes_per_task = 1

    def __init__(
        self,
        num_tasks: int = 3,
        num_train: int = 100,
        num_test: int = 50,
        noise_std: float = 0.05,
        data_seed: int = 42,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("batch_size", 32)
        kwargs.setdefault("data_dir", ".")  # generated data: no files are read
        super().__init__(num_tasks=num_tasks, **kwargs)
        if not 1 <= num_tasks <= len(TASKS):
            raise ValueError(f"the 1-D toy has {len(TASKS)} tasks, got num_tasks={num_tasks}")
        if num_train < 1 or num_test < 1:
            raise ValueError(f"need num_train >= 1 and num_test >= 1, got {num_train}, {num_test}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.num_train = num_train
        self.num_test = num_test
        self.noise_std = noise_std
        self.data_seed = data_seed
        self.input_dim = 1
        self.data: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._generate()

    def _generate(self) -> None:
        rand = np.random.RandomState(self.data_seed)
        train, test = [], []
        for fn, (lo, hi) in TASKS[: self.num_tasks]:
            x = rand.uniform(lo, hi, size=(self.num_train, 1))
            y = fn(x) + rand.normal(0.0, self.noise_std, size=x.shape)
            xt = np.linspace(lo, hi, self.num_test).reshape(-1, 1)
            train.append((torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)))
            test.append((torch.as_tensor(xt, dtype=torch.float32), torch.as_tensor(fn(xt), dtype=torch.float32)))
        empty = (torch.empty(0, 1), torch.empty(0, 1))
        self.data = {"train": train, "val": [empty] * self.num_tasks, "test": test}

    def setup(self, stage: str | None = None) -> None:
        pass

    def task_size(self, task: int, split: str) -> int:
        self._check_task(task)
        return len(self.data[split][task][0])

    def task_batch(self, task: int, split: str, idx: Tensor) -> tuple[Tensor, Tensor]:
        self._check_task(task)
        x, y = self.data[split][task]
        return x[idx], y[idx]
