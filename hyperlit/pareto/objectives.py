"""Objectives of the PHN experiments as named, vectorized functions.

Every function accepts a leading K dimension (one row per preference ray / per weight set) on the model
outputs and broadcasts the labels, so the K losses of a training step cost one call.

Fairness (Navon et al. 2021, §5.2: classification, false-positive and false-negative fairness). With
``p = σ(z)`` the predicted probability of the positive class and groups a = 0, b = 1 of the sensitive
attribute:

* classification: binary cross-entropy of the logits;
* FP fairness (relaxed, for training): ``|mean_{a, y=0} p − mean_{b, y=0} p|`` — the gap of the mean predicted
  probability on negatives; its hard counterpart is ``|FPR_a − FPR_b|`` with ``ŷ = 1[z > 0]``;
* FN fairness (relaxed): ``|mean_{a, y=1} (1 − p) − mean_{b, y=1} (1 − p)|`` — the gap of the mean miss
  probability on positives; hard: ``|FNR_a − FNR_b|``.

On hard predictions (p ∈ {0, 1}) the relaxed gaps equal the hard ones. A group with no example of the
conditioning label contributes a gap of 0 (no evidence of disparity), in both versions.

Multi-task (Multi-MNIST style): one cross-entropy per task.

:class:`FairnessObjectives` and :class:`MultiTaskObjectives` bundle these for the Lightning modules:
``losses`` gives the (K, m) differentiable training losses of a batch; ``statistics`` gives additive sufficient
statistics (summable over batches and, under DDP, over ranks) from which ``from_statistics`` computes the
evaluation values of a whole split. A user-defined :class:`ObjectiveSet` plugs into the same modules (its
docstring gives the batch contract).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

__all__ = [
    "FAIRNESS_OBJECTIVES",
    "FairnessObjectives",
    "MultiTaskObjectives",
    "ObjectiveSet",
    "binary_cross_entropy",
    "fnr_gap",
    "fpr_gap",
    "make_objectives",
    "multitask_cross_entropy",
    "relaxed_fnr_gap",
    "relaxed_fpr_gap",
    "resolve_objectives",
    "toy_objectives",
]

FAIRNESS_OBJECTIVES = ("bce", "fpr_gap", "fnr_gap")


def _squeeze_logits(logits: Tensor) -> Tensor:
    return logits.squeeze(-1) if logits.dim() >= 2 and logits.shape[-1] == 1 else logits


def _group_mean_gap(values: Tensor, label_mask: Tensor, group: Tensor) -> Tensor:
    """``|mean_{g=0, mask} v − mean_{g=1, mask} v|`` over the last dim; 0 if a group has no masked example."""
    g1 = (group == 1) & label_mask
    g0 = (group == 0) & label_mask
    n0, n1 = g0.sum(-1), g1.sum(-1)
    m0 = (values * g0).sum(-1) / n0.clamp_min(1)
    m1 = (values * g1).sum(-1) / n1.clamp_min(1)
    gap = (m0 - m1).abs()
    return torch.where((n0 > 0) & (n1 > 0), gap, torch.zeros_like(gap))


def _check_binary(name: str, t: Tensor) -> None:
    bad = t[(t != 0) & (t != 1)]
    if bad.numel():
        raise ValueError(f"{name} must be 0/1, found value {bad[0].item()}")


def binary_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean BCE of logits (…, B) or (…, B, 1) against 0/1 labels (B,) → (…,)."""
    z = _squeeze_logits(logits)
    return F.binary_cross_entropy_with_logits(z, y.to(z.dtype).expand_as(z), reduction="none").mean(-1)


def relaxed_fpr_gap(probs: Tensor, y: Tensor, group: Tensor) -> Tensor:
    """Relaxed FP fairness: gap between groups of the mean predicted probability on negatives (…, B) → (…,)."""
    return _group_mean_gap(probs, y == 0, group)


def relaxed_fnr_gap(probs: Tensor, y: Tensor, group: Tensor) -> Tensor:
    """Relaxed FN fairness: gap between groups of the mean miss probability ``1 − p`` on positives → (…,)."""
    return _group_mean_gap(1 - probs, y == 1, group)


def fpr_gap(preds: Tensor, y: Tensor, group: Tensor) -> Tensor:
    """``|FPR_0 − FPR_1|`` of hard 0/1 predictions (…, B) → (…,)."""
    _check_binary("predictions", preds)
    return _group_mean_gap(preds.float(), y == 0, group)


def fnr_gap(preds: Tensor, y: Tensor, group: Tensor) -> Tensor:
    """``|FNR_0 − FNR_1|`` of hard 0/1 predictions (…, B) → (…,)."""
    _check_binary("predictions", preds)
    return _group_mean_gap(1 - preds.float(), y == 1, group)


def multitask_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-task mean cross-entropy: logits (…, B, T, C), targets (B, T) → (…, T)."""
    if logits.dim() < 3 or logits.shape[-2] != targets.shape[-1]:
        raise ValueError(
            f"logits (…, B, T, C) and targets (B, T) disagree: {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    c = logits.shape[-1]
    lead = logits.shape[:-3]
    flat = logits.reshape(-1, c)
    tgt = targets.expand(*lead, *targets.shape).reshape(-1)
    ce = F.cross_entropy(flat, tgt, reduction="none").view(*lead, *targets.shape)
    return ce.mean(-2)


def toy_objectives(theta: Tensor) -> Tensor:
    """The PHN / EPO toy problem: ``ℓ1 = 1 − exp(−‖θ − 1/√d‖²)``, ``ℓ2 = 1 − exp(−‖θ + 1/√d‖²)`` → (…, 2).

    Its Pareto set is the segment ``θ = t·𝟙/√d``, t ∈ [−1, 1]; the front is concave (LS reaches its ends only).
    """
    d = theta.shape[-1]
    u = torch.full((d,), d**-0.5, dtype=theta.dtype, device=theta.device)
    l1 = 1 - torch.exp(-((theta - u) ** 2).sum(-1))
    l2 = 1 - torch.exp(-((theta + u) ** 2).sum(-1))
    return torch.stack([l1, l2], dim=-1)


# -- objective sets used by the modules ---------------------------------------------------------------------


class ObjectiveSet(ABC):
    """m named objectives: differentiable training losses and additive statistics for evaluation.

    Subclass it for your own objectives and give an instance (Python) or its import path (CLI) as ``objectives``::

        --model.objectives '{class_path: my_pkg.MyObjectives, init_args: {scale: 0.5}}'

    **Batch contract.** A batch is a tuple/list whose first element is the input of the target network, (B, …);
    the other elements belong to the objective set (labels, groups, targets). The module runs the target once per
    weight set, so every method receives ``outputs`` of shape (K, B, …): K weight sets (the training rays, or the
    R evaluation rays) × the target's output on the B examples. Then

    * :meth:`losses` ``(outputs, batch) → (K, m)``: the **relaxed** training losses, differentiable in
      ``outputs``, one per weight set and objective, in the order of :attr:`names`;
    * :meth:`statistics` ``(outputs, batch) → (K, S)``: S = :attr:`num_statistics` **additive** values per weight
      set (sums and counts; float64 advised), summed over the batches of a split and over DDP ranks;
    * :meth:`from_statistics` ``(stats (K, S), hard) → (K, m)``: the evaluation values of the whole split — the
      **hard** evaluation quantities when ``hard`` (``eval_metric="hard"``), the relaxed losses otherwise — logged
      as ``val/<name>_mean`` with the names of :meth:`eval_names`;
    * :meth:`predict` ``(outputs (K, B, …)) → (K, B, …)``: predictions (e.g. probabilities) for ``predict_step``;
    * :meth:`check_batch` (optional): raise a ``ValueError`` saying what is wrong with a batch and how to fix it.

    Everything is minimized: the hypervolume's reference point (``ref_point``) must lie above the evaluation
    values. An objective set is deep-copied per stage and pickled by ``ddp_spawn``: keep its state plain Python.

    Built-in layouts: :class:`FairnessObjectives` — batches ``(x, y, group)`` with 0/1 labels y and 0/1 sensitive
    groups of shape (B,), outputs logits (K, B) or (K, B, 1); :class:`MultiTaskObjectives` — batches
    ``(x, targets)`` with class indices targets (B, T), outputs logits (K, B, T, C).
    """

    #: the m objective names (of the training losses), e.g. ``("bce", "fpr_gap")``
    names: tuple[str, ...]

    @property
    def num_objectives(self) -> int:
        return len(self.names)

    @property
    @abstractmethod
    def num_statistics(self) -> int:
        """S, the number of additive statistics per weight set that :meth:`statistics` returns."""

    def eval_names(self, hard: bool = True) -> tuple[str, ...]:
        """Names of the m evaluation values of :meth:`from_statistics` (default: :attr:`names`)."""
        return self.names

    def check_batch(self, batch: Sequence[Any]) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` on a batch these objectives cannot use (default: accept every batch)."""

    @abstractmethod
    def losses(self, outputs: Tensor, batch: Sequence[Any]) -> Tensor:
        """(K, m) differentiable training losses of one batch."""

    @abstractmethod
    def statistics(self, outputs: Tensor, batch: Sequence[Any]) -> Tensor:
        """(K, S) additive statistics of one batch (summed over batches and ranks)."""

    @abstractmethod
    def from_statistics(self, stats: Tensor, hard: bool = True) -> Tensor:
        """(K, m) evaluation values from summed statistics (the hard quantities if ``hard``)."""

    @abstractmethod
    def predict(self, outputs: Tensor) -> Tensor:
        """Predictions (K, B, …) from raw outputs (K, B, …) (for ``predict_step``)."""


class FairnessObjectives(ObjectiveSet):
    """BCE and the relaxed FP/FN fairness gaps (training), BCE and hard gaps (evaluation).

    Batches are ``(x, y, group)`` with 0/1 labels and 0/1 sensitive groups; outputs are logits (K, B[, 1]).

    Args:
        names: A subset of ``("bce", "fpr_gap", "fnr_gap")`` in the desired order (2 or 3 objectives).
    """

    # statistics layout: [bce_sum, n, then for (g, y) in (0,0),(0,1),(1,0),(1,1): count, Σp, Σŷ]
    _GY = ((0, 0), (0, 1), (1, 0), (1, 1))

    def __init__(self, names: Sequence[str] = FAIRNESS_OBJECTIVES) -> None:
        names = tuple(names)
        unknown = [n for n in names if n not in FAIRNESS_OBJECTIVES]
        if unknown or len(set(names)) != len(names) or len(names) < 2:
            raise ValueError(
                f"fairness objectives must be >= 2 distinct names from {FAIRNESS_OBJECTIVES}, got {list(names)}"
            )
        self.names = names

    @property
    @override
    def num_statistics(self) -> int:
        return 2 + 3 * len(self._GY)

    @staticmethod
    def _unpack(batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        if len(batch) < 3:
            raise ValueError("fairness objectives need batches (x, y, sensitive_group)")
        return batch[0], batch[1], batch[2]

    @override
    def check_batch(self, batch: Sequence[Any]) -> None:
        """Labels and sensitive groups must be 0/1 (one device sync when they are)."""
        _, y, g = self._unpack(batch)
        bad_y, bad_g = (y != 0) & (y != 1), (g != 0) & (g != 1)
        if not bool(bad_y.any() | bad_g.any()):
            return
        if bool(bad_y.any()):
            values = torch.unique(y[bad_y]).tolist()[:5]
            raise ValueError(
                f"fairness objectives need 0/1 labels: batch[1] (labels y) has values {values} — map the classes to "
                "{0, 1} in the DataModule (e.g. y = (y == positive_class).float())"
            )
        values = torch.unique(g[bad_g]).tolist()[:5]
        raise ValueError(
            f"fairness objectives need 0/1 sensitive groups: batch[2] (sensitive group) has values {values} — the "
            "FPR/FNR gaps compare exactly two groups: binarize the sensitive attribute in the DataModule "
            "(e.g. group = (attribute == value).long())"
        )

    @override
    def losses(self, outputs: Tensor, batch: Sequence[Tensor]) -> Tensor:
        _, y, g = self._unpack(batch)
        z = _squeeze_logits(outputs)
        p = torch.sigmoid(z)
        table = {
            "bce": lambda: binary_cross_entropy(z, y),
            "fpr_gap": lambda: relaxed_fpr_gap(p, y, g),
            "fnr_gap": lambda: relaxed_fnr_gap(p, y, g),
        }
        return torch.stack([table[n]() for n in self.names], dim=-1)

    @override
    def statistics(self, outputs: Tensor, batch: Sequence[Tensor]) -> Tensor:
        _, y, g = self._unpack(batch)
        z = _squeeze_logits(outputs).detach().double()
        p = torch.sigmoid(z)
        hard = (z > 0).double()
        bce = F.binary_cross_entropy_with_logits(z, y.double().expand_as(z), reduction="none").sum(-1)
        cols = [bce, torch.full_like(bce, float(z.shape[-1]))]
        for gv, yv in self._GY:
            mask = ((g == gv) & (y == yv)).double()
            cols += [mask.sum().expand_as(bce), (p * mask).sum(-1), (hard * mask).sum(-1)]
        return torch.stack(cols, dim=-1)

    @override
    def from_statistics(self, stats: Tensor, hard: bool = True) -> Tensor:
        bce = stats[..., 0] / stats[..., 1].clamp_min(1)
        col = 3 if hard else 2  # Σŷ or Σp

        def rate(gv: int, yv: int) -> tuple[Tensor, Tensor]:
            i = 2 + 3 * self._GY.index((gv, yv))
            n = stats[..., i]
            return stats[..., i + col - 1] / n.clamp_min(1), n

        def gap(yv: int) -> Tensor:
            (r0, n0), (r1, n1) = rate(0, yv), rate(1, yv)
            return torch.where((n0 > 0) & (n1 > 0), (r0 - r1).abs(), torch.zeros_like(r0))

        table = {"bce": bce, "fpr_gap": gap(0), "fnr_gap": gap(1)}  # FNR gap = |(1−TPR_0) − (1−TPR_1)|
        return torch.stack([table[n] for n in self.names], dim=-1)

    @override
    def predict(self, outputs: Tensor) -> Tensor:
        return torch.sigmoid(_squeeze_logits(outputs))


class MultiTaskObjectives(ObjectiveSet):
    """One cross-entropy per task; batches ``(x, targets)`` with targets (B, T); outputs (K, B, T, C).

    Evaluation values are the per-task cross-entropies ``ce_t`` (``hard=False``) or error rates ``err_t``
    (``hard=True``).
    """

    def __init__(self, num_tasks: int = 2) -> None:
        if num_tasks < 2:
            raise ValueError(f"multi-task objectives need >= 2 tasks, got {num_tasks}")
        self.names = tuple(f"ce_{t}" for t in range(num_tasks))

    @property
    @override
    def num_statistics(self) -> int:
        return 2 * self.num_objectives + 1  # per task: Σ CE, Σ errors; then n

    @override
    def eval_names(self, hard: bool = True) -> tuple[str, ...]:
        """``err_t`` (error rates) when ``hard``, else the cross-entropies ``ce_t``."""
        return tuple(f"err_{t}" for t in range(self.num_objectives)) if hard else self.names

    @override
    def losses(self, outputs: Tensor, batch: Sequence[Tensor]) -> Tensor:
        return multitask_cross_entropy(outputs, batch[1])

    @override
    def statistics(self, outputs: Tensor, batch: Sequence[Tensor]) -> Tensor:
        targets = batch[1]
        out = outputs.detach().double()
        ce = multitask_cross_entropy(out, targets) * targets.shape[0]  # (K, T) sums
        wrong = (out.argmax(-1) != targets).double().sum(-2)  # (K, T)
        n = torch.full_like(ce[..., :1], float(targets.shape[0]))
        return torch.cat([ce, wrong, n], dim=-1)

    @override
    def from_statistics(self, stats: Tensor, hard: bool = True) -> Tensor:
        t = self.num_objectives
        n = stats[..., -1:].clamp_min(1)
        return (stats[..., t : 2 * t] if hard else stats[..., :t]) / n

    @override
    def predict(self, outputs: Tensor) -> Tensor:
        return torch.softmax(outputs, dim=-1)


def make_objectives(names: Sequence[str]) -> ObjectiveSet:
    """Objective set from names: fairness names (``bce``, ``fpr_gap``, ``fnr_gap``) or ``ce_0``, ``ce_1``, …"""
    names = tuple(names)
    if all(n in FAIRNESS_OBJECTIVES for n in names):
        return FairnessObjectives(names)
    expected = tuple(f"ce_{t}" for t in range(len(names)))
    if names == expected:
        return MultiTaskObjectives(len(names))
    raise ValueError(
        f"unknown objectives {list(names)}: use fairness names from {FAIRNESS_OBJECTIVES} "
        f"or multi-task names {list(expected)} (ce_0, ce_1, … in order), or an ObjectiveSet of your own "
        "(--model.objectives '{class_path: my_pkg.MyObjectives}')"
    )


def resolve_objectives(objectives: Sequence[str] | ObjectiveSet | type[ObjectiveSet]) -> ObjectiveSet:
    """An :class:`ObjectiveSet` from names (:func:`make_objectives`), an instance, or a subclass (built without
    arguments); a user's set is checked: >= 2 distinct names, as many distinct evaluation names, S >= 1."""
    if isinstance(objectives, type) and issubclass(objectives, ObjectiveSet):
        objectives = objectives()
    if isinstance(objectives, Mapping) and "objective_set" in objectives:  # the record a module's checkpoint keeps
        raise TypeError(
            f"this checkpoint was trained with the objective set {objectives['objective_set']} "
            f"({list(objectives.get('names', []))}), which checkpoints do not store: give it again, "
            "load_from_checkpoint(path, objectives=MyObjectives(...))"
        )
    if isinstance(objectives, str):
        raise TypeError(
            f"objectives must be a list of names or an ObjectiveSet, got the string {objectives!r} "
            f"(write [{objectives}, ...])"
        )
    if not isinstance(objectives, ObjectiveSet):
        if not all(isinstance(n, str) for n in objectives):
            raise TypeError(f"objectives must be a list of names or an ObjectiveSet instance, got {objectives!r}")
        return make_objectives(objectives)
    kind = type(objectives).__name__
    names = tuple(getattr(objectives, "names", ()))
    if len(names) < 2 or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{kind}.names must be >= 2 distinct strings (one per objective), got {list(names)}")
    objectives.names = names
    for hard in (True, False):
        eval_names = tuple(objectives.eval_names(hard))
        if len(eval_names) != len(names) or len(set(eval_names)) != len(names):
            raise ValueError(
                f"{kind}.eval_names(hard={hard}) must give {len(names)} distinct names (one per objective), got "
                f"{list(eval_names)}"
            )
    count = objectives.num_statistics
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"{kind}.num_statistics must be a positive int, got {count!r}")
    return objectives
