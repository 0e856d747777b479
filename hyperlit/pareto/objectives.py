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
evaluation losses of a whole split.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

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


class ObjectiveSet:
    """m named objectives: differentiable training losses and additive statistics for evaluation."""

    names: tuple[str, ...]

    @property
    def num_objectives(self) -> int:
        return len(self.names)

    @property
    def num_statistics(self) -> int:  # pragma: no cover - interface
        """S, the number of additive statistics per ray that :meth:`statistics` returns."""
        raise NotImplementedError

    def losses(self, outputs: Tensor, batch: Sequence[Tensor]) -> Tensor:  # pragma: no cover - interface
        """(K, m) training losses of one batch."""
        raise NotImplementedError

    def statistics(self, outputs: Tensor, batch: Sequence[Tensor]) -> Tensor:  # pragma: no cover - interface
        """(K, S) additive statistics of one batch (summed over batches and ranks)."""
        raise NotImplementedError

    def from_statistics(self, stats: Tensor, hard: bool = True) -> Tensor:  # pragma: no cover - interface
        """(K, m) evaluation losses from summed statistics (hard metrics if ``hard``)."""
        raise NotImplementedError

    def predict(self, outputs: Tensor) -> Tensor:  # pragma: no cover - interface
        """Probabilities from raw outputs (for ``predict_step``)."""
        raise NotImplementedError


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
    def num_statistics(self) -> int:
        return 2 + 3 * len(self._GY)

    @staticmethod
    def _unpack(batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        if len(batch) < 3:
            raise ValueError("fairness objectives need batches (x, y, sensitive_group)")
        return batch[0], batch[1], batch[2]

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

    def predict(self, outputs: Tensor) -> Tensor:
        return torch.sigmoid(_squeeze_logits(outputs))


class MultiTaskObjectives(ObjectiveSet):
    """One cross-entropy per task; batches ``(x, targets)`` with targets (B, T); outputs (K, B, T, C).

    Evaluation losses are the per-task cross-entropies (``hard=False``) or error rates (``hard=True``).
    """

    def __init__(self, num_tasks: int = 2) -> None:
        if num_tasks < 2:
            raise ValueError(f"multi-task objectives need >= 2 tasks, got {num_tasks}")
        self.names = tuple(f"ce_{t}" for t in range(num_tasks))

    @property
    def num_statistics(self) -> int:
        return 2 * self.num_objectives + 1  # per task: Σ CE, Σ errors; then n

    def losses(self, outputs: Tensor, batch: Sequence[Tensor]) -> Tensor:
        return multitask_cross_entropy(outputs, batch[1])

    def statistics(self, outputs: Tensor, batch: Sequence[Tensor]) -> Tensor:
        targets = batch[1]
        out = outputs.detach().double()
        ce = multitask_cross_entropy(out, targets) * targets.shape[0]  # (K, T) sums
        wrong = (out.argmax(-1) != targets).double().sum(-2)  # (K, T)
        n = torch.full_like(ce[..., :1], float(targets.shape[0]))
        return torch.cat([ce, wrong, n], dim=-1)

    def from_statistics(self, stats: Tensor, hard: bool = True) -> Tensor:
        t = self.num_objectives
        n = stats[..., -1:].clamp_min(1)
        return (stats[..., t : 2 * t] if hard else stats[..., :t]) / n

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
        f"or multi-task names {list(expected)} (ce_0, ce_1, … in order)"
    )
