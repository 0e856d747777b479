"""Continual-learning metrics computed from an accuracy matrix and generated weights (Lightning-free).

``R[i, j]`` is the score on task j after training task i (accuracy for classification, MSE for regression);
entries not yet measured are NaN. With T trained tasks:

* during accuracy  ``during_j = R[j, j]``           (right after learning task j)
* final accuracy   ``final_j  = R[T−1, j]``        (after the whole sequence)
* backward transfer ``BWT = mean_{j<T−1}(final_j − during_j)`` (Lopez-Paz & Ranzato 2017; negative = forgetting)
* forgetting       ``max_{i<T−1} R[i, j] − final_j``  averaged over j < T−1 (Chaudhry et al. 2018)

Task inference by predictive entropy (HNET+ENT, von Oswald et al. 2020 §4): for every candidate task embedding
the network's softmax entropy is computed, and the task with the lowest entropy is chosen — all candidates at
once from a (K, B, C) logit tensor.

Per-task scores of one evaluation are sums over examples (:func:`task_score_sums`), so that they add up over
batches and over DDP ranks; :func:`task_scores` turns the summed counts into scores. The torchmetrics wrapper that
accumulates them is :class:`hyperlit.continual.scores.TaskScores`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "backward_transfer",
    "compression_ratio",
    "during_scores",
    "entropy_task_inference",
    "final_scores",
    "forgetting",
    "format_matrix",
    "num_trained_tasks",
    "summarize",
    "task_score_sums",
    "task_scores",
    "weight_drift",
]


def _check(matrix: Tensor) -> Tensor:
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"accuracy matrix must be square (T, T), got {tuple(matrix.shape)}")
    return matrix.detach().double().cpu()


def num_trained_tasks(matrix: Tensor) -> int:
    """Number of leading rows of ``matrix`` that hold a measurement on their own task (R[i, i] not NaN)."""
    diag = _check(matrix).diagonal()
    n = 0
    while n < len(diag) and not math.isnan(float(diag[n])):
        n += 1
    return n


def during_scores(matrix: Tensor) -> Tensor:
    """``R[j, j]`` for every trained task j."""
    n = num_trained_tasks(matrix)
    return _check(matrix).diagonal()[:n].clone()


def final_scores(matrix: Tensor) -> Tensor:
    """``R[T−1, j]`` for j < T, T the number of trained tasks."""
    n = num_trained_tasks(matrix)
    if n == 0:
        return torch.empty(0, dtype=torch.float64)
    return _check(matrix)[n - 1, :n].clone()


def backward_transfer(matrix: Tensor) -> float:
    """Mean of ``final_j − during_j`` over the tasks before the last one (0 with fewer than two tasks)."""
    n = num_trained_tasks(matrix)
    if n < 2:
        return 0.0
    return float((final_scores(matrix)[: n - 1] - during_scores(matrix)[: n - 1]).mean())


def forgetting(matrix: Tensor, higher_is_better: bool = True) -> float:
    """Mean over j < T−1 of the drop from the best earlier score to the final one."""
    n = num_trained_tasks(matrix)
    if n < 2:
        return 0.0
    r = _check(matrix)[:n, :n]
    best = r[: n - 1, : n - 1].nan_to_num(nan=-math.inf if higher_is_better else math.inf)
    best = best.max(0).values if higher_is_better else best.min(0).values
    drop = best - r[n - 1, : n - 1] if higher_is_better else r[n - 1, : n - 1] - best
    return float(drop.mean())


def summarize(matrix: Tensor, higher_is_better: bool = True) -> dict[str, float]:
    """``during_mean``, ``final_mean``, ``bwt``, ``forgetting`` and ``num_tasks`` of an accuracy matrix."""
    n = num_trained_tasks(matrix)
    if n == 0:
        return {"num_tasks": 0.0}
    return {
        "num_tasks": float(n),
        "during_mean": float(during_scores(matrix).mean()),
        "final_mean": float(final_scores(matrix).mean()),
        "bwt": backward_transfer(matrix),
        "forgetting": forgetting(matrix, higher_is_better),
    }


def entropy_task_inference(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Infer the task of each example from (K, B, C) logits of K candidate tasks by minimum predictive entropy.

    Returns:
        ``(task, prediction)``: the inferred task per example (B,) and the class predicted with that task's
        output (B,). The entropies are divided by ``log C`` (Henning et al. 2021), which leaves the choice
        unchanged when all tasks have C outputs.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (K tasks, B examples, C classes), got {tuple(logits.shape)}")
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1) / math.log(max(logits.shape[-1], 2))  # (K, B)
    task = entropy.argmin(0)
    chosen = logits[task, torch.arange(logits.shape[1], device=logits.device)]  # (B, C)
    return task, chosen.argmax(-1)


def task_score_sums(
    given: Tensor, target: Tensor, task_type: str = "classification", candidates: Tensor | None = None, task: int = 0
) -> Tensor:
    """The four sums of one batch of one task (float64, shape (4,)), added up by :func:`task_scores`.

    ``[examples, correct with the task given | summed squared error, correct with the task inferred, examples whose
    task is inferred right]``. Classification counts correct argmax predictions; with the task inferred an example
    is correct only if both its task and its class within that task are right (the class-incremental score of the
    official code, the class ``argmax + task · C`` against the global label); regression sums the squared error
    averaged over output dimensions. The last two need ``candidates``, the (K, B, C) outputs of every candidate
    task (:func:`entropy_task_inference`), of which ``given`` is row ``task``; without them they are 0.

    Args:
        given: Outputs (B, C) of the network conditioned on the batch's true task.
        target: Class labels (B,) or regression targets (B, …).
        task_type: ``classification`` or ``regression``.
        candidates: Outputs (K, B, C) for all candidate tasks (classification only), or ``None``.
        task: The batch's task id (needed with ``candidates``).
    """
    sums = torch.zeros(4, dtype=torch.float64, device=given.device)
    sums[0] = len(target)
    if task_type == "classification":
        sums[1] = (given.argmax(-1) == target).sum()
        if candidates is not None:
            inferred, pred = entropy_task_inference(candidates)
            right_task = inferred == task
            sums[2] = ((pred == target) & right_task).sum()
            sums[3] = right_task.sum()
    elif task_type == "regression":
        err = (given.double() - target.view_as(given).double()).pow(2)
        sums[1] = err.mean(-1).sum() if err.dim() > 1 else err.sum()
    else:
        raise ValueError(f"task_type must be 'classification' or 'regression', got {task_type!r}")
    return sums


def task_scores(sums: Tensor) -> Tensor:
    """Scores (3, T) from summed counts (4, T) of :func:`task_score_sums`; NaN for tasks without examples.

    Rows: score with the task given (accuracy or MSE), accuracy with the task inferred, task-inference accuracy.
    """
    if sums.dim() != 2 or sums.shape[0] != 4:
        raise ValueError(f"sums must be (4, num_tasks), got {tuple(sums.shape)}")
    count = sums[0]
    scores = sums[1:] / count
    scores[:, count == 0] = math.nan
    return scores.float()


def weight_drift(current: Tensor, reference: Tensor) -> Tensor:
    """‖h(e_j) − h(e_j)|_{after task j}‖₂ per task: rows of (K, P) generated weights against their snapshots."""
    if current.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(current.shape)} vs {tuple(reference.shape)}")
    return (current - reference).norm(dim=-1)


def compression_ratio(hnet_params: int, embedding_params: int, target_params: int) -> dict[str, float]:
    """Trainable hypernetwork parameters over generated target parameters, with and without task embeddings.

    As in the official code (``mnist/train_utils.py``), chunk embeddings count as hypernetwork parameters and the
    ratio "with embeddings" includes the embeddings of all tasks.
    """
    if target_params < 1:
        raise ValueError(f"target_params must be >= 1, got {target_params}")
    return {
        "compression_ratio": (hnet_params + embedding_params) / target_params,
        "compression_ratio_no_emb": hnet_params / target_params,
    }


def format_matrix(matrix: Tensor, scale: float = 100.0, digits: int = 2, label: str = "after task") -> str:
    """A plain-text table of R (rows: after task i; columns: task j); NaN shown as ``-``."""
    r = _check(matrix)
    t = r.shape[0]
    width = max(digits + 5, 7)
    head = f"{label:>12} | " + " ".join(f"{'task ' + str(j):>{width}}" for j in range(t))
    lines = [head, "-" * len(head)]
    for i in range(t):
        cells = [("-" if math.isnan(float(v)) else f"{float(v) * scale:.{digits}f}").rjust(width) for v in r[i]]
        lines.append(f"{i:>12} | " + " ".join(cells))
    return "\n".join(lines)
