"""Per-task evaluation scores of a continual learner as a ``torchmetrics.Metric`` (one row of R[i, j] per epoch).

:class:`TaskScores` keeps four sums per task (examples; correct predictions with the task given, or the summed
squared error for regression; correct predictions with the task inferred by minimum predictive entropy; examples
whose task is inferred right, von Oswald et al. 2020 §4). All four are reduced with ``dist_reduce_fx="sum"``, so
under DDP :meth:`TaskScores.compute` returns the scores of the whole evaluation split on every rank, whichever
rank saw which examples. The math is :func:`hyperlit.continual.metrics.task_score_sums` and
:func:`~hyperlit.continual.metrics.task_scores`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override

from hyperlit.continual.metrics import task_score_sums, task_scores

__all__ = ["TaskScores"]


class TaskScores(Metric):
    """Scores (3, T) of every task: with the task given, with the task inferred, task-inference accuracy.

    ``update(given, target, task, candidates)`` adds one batch of one task; ``compute()`` returns the (3, T) scores
    (accuracy or MSE; NaN for tasks without examples).

    Args:
        num_tasks: Number of tasks T.
        task_type: ``classification`` (accuracies) or ``regression`` (row 0 holds the MSE). Rows 1–2 are only
            meaningful for classification batches given with ``candidates`` (else they are 0).
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    sums: Tensor

    def __init__(self, num_tasks: int, task_type: str = "classification", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if task_type not in ("classification", "regression"):
            raise ValueError(f"task_type must be 'classification' or 'regression', got {task_type!r}")
        self.num_tasks = num_tasks
        self.task_type = task_type
        self.add_state("sums", default=torch.zeros(4, num_tasks, dtype=torch.float64), dist_reduce_fx="sum")

    @override
    def update(self, given: Tensor, target: Tensor, task: int, candidates: Tensor | None = None) -> None:
        """Add a batch of ``task``: outputs ``given`` (B, C) with the task given, ``candidates`` (K, B, C) for all."""
        if not 0 <= task < self.num_tasks:
            raise KeyError(f"unknown task id {task}; this metric has tasks 0..{self.num_tasks - 1}")
        self.sums[:, task] += task_score_sums(given, target, self.task_type, candidates, task).to(self.sums.device)

    @override
    def compute(self) -> Tensor:
        """(3, T): score with the task given, accuracy with the task inferred, task-inference accuracy."""
        return task_scores(self.sums)
