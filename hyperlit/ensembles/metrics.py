"""Ensemble metrics on member logits ``(K, N, C)``: functional math and torchmetrics ``Metric`` classes.

Definitions follow robustness_metrics / uncertainty-baselines (see ``reference/ensembles.md`` §5):

* ensemble prediction ``p̄(y|x) = (1/K) Σ_k softmax(z_k)_y`` (the mean of the members' probabilities, never the
  softmax of the mean logits), computed in log space as ``logsumexp_k log_softmax(z_k) − log K``;
* ensemble NLL ``−log p̄(y|x)``; Gibbs NLL ``(1/K) Σ_k −log p_k(y|x)`` (≥ the ensemble NLL by Jensen);
* Brier score ``Σ_c (p̄_c − 1[c = y])²``; member disagreement ``(1/K²) Σ_{m,m'} 1[argmax_m ≠ argmax_m']``;
* ECE with equal-width confidence bins on ``p̄``, L1, accumulated over the whole split.

Every ``Metric`` here has the same ``update(member_logits, target)`` signature, so that one
:class:`~torchmetrics.MetricCollection` (:func:`ensemble_metrics`) updates them all with one call; their states
are sums (``dist_reduce_fx="sum"``) or torchmetrics' own concatenated states, so ``compute()`` is the value over
the whole split under DDP, not a mean of per-batch values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError
from torchmetrics.functional.classification.calibration_error import _ce_compute
from torchmetrics.utilities.data import dim_zero_cat

__all__ = [
    "EnsembleAccuracy",
    "EnsembleBrierScore",
    "EnsembleCalibrationError",
    "EnsembleNLL",
    "GibbsNLL",
    "MemberDisagreement",
    "MemberNLL",
    "brier_score",
    "ensemble_log_probs",
    "ensemble_metrics",
    "ensemble_nll",
    "gibbs_nll",
    "member_disagreement",
    "member_nll",
]


def _check_logits(logits: Tensor, num_classes: int | None = None, ensemble_size: int | None = None) -> None:
    k = "K" if ensemble_size is None else str(ensemble_size)
    c = "C" if num_classes is None else str(num_classes)
    expected = f"member logits of shape ({k}, N, {c})"
    hint = "; view member-major (K·N, C) outputs as logits.view(K, N, C)"
    if not isinstance(logits, Tensor) or logits.ndim != 3 or not logits.is_floating_point():
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"expected floating {expected}, got {got}{hint}")
    if ensemble_size is not None and logits.shape[0] != ensemble_size:
        raise ValueError(f"expected {expected}, got {tuple(logits.shape)} (K={logits.shape[0]}){hint}")
    if num_classes is not None and logits.shape[2] != num_classes:
        raise ValueError(f"expected {expected}, got {tuple(logits.shape)} (C={logits.shape[2]})")


def _check_target(target: Tensor, n: int, what: str = "member logits (K, N, C)") -> None:
    if not isinstance(target, Tensor) or target.ndim != 1 or target.shape[0] != n:
        got = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"expected integer labels of shape (N,) = ({n},) matching {what}, got {got}")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"expected integer class labels, got dtype {target.dtype}")


def _check(logits: Tensor, target: Tensor, num_classes: int | None = None, ensemble_size: int | None = None) -> None:
    _check_logits(logits, num_classes, ensemble_size)
    _check_target(target, logits.shape[1])


# -- functional ----------------------------------------------------------------------------------------
def ensemble_log_probs(logits: Tensor) -> Tensor:
    """Log of the mean member probability, ``logsumexp_k log_softmax(z_k) − log K``: ``(K, N, C)`` → ``(N, C)``."""
    _check_logits(logits)
    return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])


def ensemble_nll(logits: Tensor, target: Tensor) -> Tensor:
    """Per-example ensemble NLL ``−log (1/K) Σ_k p_k(y|x)``, shape ``(N,)``."""
    _check(logits, target)
    return -ensemble_log_probs(logits).gather(1, target.long().unsqueeze(1)).squeeze(1)


def member_nll(logits: Tensor, target: Tensor) -> Tensor:
    """Each member's mean NLL over the examples, shape ``(K,)``."""
    _check(logits, target)
    return _member_ce(logits, target).mean(dim=1)


def _member_ce(logits: Tensor, target: Tensor) -> Tensor:
    idx = target.long().view(1, -1, 1).expand(logits.shape[0], -1, 1)
    return -F.log_softmax(logits, dim=-1).gather(2, idx).squeeze(2)


def gibbs_nll(logits: Tensor, target: Tensor) -> Tensor:
    """Per-example Gibbs NLL (mean member cross-entropy) ``(1/K) Σ_k −log p_k(y|x)``, shape ``(N,)``."""
    _check(logits, target)
    return _member_ce(logits, target).mean(dim=0)


def brier_score(probs: Tensor, target: Tensor) -> Tensor:
    """Per-example Brier score ``Σ_c (p_c − 1[c = y])²`` of probabilities ``(N, C)``, shape ``(N,)``."""
    if not isinstance(probs, Tensor) or probs.ndim != 2 or not probs.is_floating_point():
        got = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"expected floating probabilities of shape (N, C), got {got}")
    _check_target(target, probs.shape[0], what="probabilities (N, C)")
    onehot = F.one_hot(target.long(), probs.shape[1]).to(probs.dtype)
    return (probs - onehot).pow(2).sum(dim=1)


def member_disagreement(logits: Tensor) -> Tensor:
    """Per-example pairwise disagreement ``(1/K²) Σ_{m,m'} 1[argmax_m ≠ argmax_m']``, shape ``(N,)``."""
    _check_logits(logits)
    pred = logits.argmax(dim=-1)  # (K, N)
    return (pred.unsqueeze(0) != pred.unsqueeze(1)).to(logits.dtype).mean(dim=(0, 1))


# -- torchmetrics classes ---------------------------------------------------------------------------------
class _EnsembleMean(Metric):
    """Mean over the examples of a per-example ensemble quantity (sum and count states)."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, num_classes: int | None = None, ensemble_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.ensemble_size = ensemble_size
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _per_example(self, logits: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, member_logits: Tensor, target: Tensor) -> None:
        """Accumulate a batch of member logits ``(K, N, C)`` and labels ``(N,)``."""
        _check(member_logits, target, self.num_classes, self.ensemble_size)
        values = self._per_example(member_logits.detach(), target)
        self.total += values.sum().double()
        self.count += values.numel()

    def compute(self) -> Tensor:
        """The mean over every example seen since the last reset."""
        return (self.total / self.count).float()


class EnsembleNLL(_EnsembleMean):
    """Ensemble NLL ``−log (1/K) Σ_k p_k(y|x)`` averaged over the split (UB ``EnsembleCrossEntropy``).

    Args:
        num_classes: Optional ``C``, checked against the logits.
        ensemble_size: Optional ``K``, checked against the logits.
        **kwargs: Passed to :class:`~torchmetrics.Metric`.
    """

    higher_is_better = False

    def _per_example(self, logits: Tensor, target: Tensor) -> Tensor:
        return ensemble_nll(logits, target)


class GibbsNLL(_EnsembleMean):
    """Gibbs NLL ``(1/K) Σ_k −log p_k(y|x)`` averaged over the split (the members' mean cross-entropy).

    Args:
        num_classes: Optional ``C``, checked against the logits.
        ensemble_size: Optional ``K``, checked against the logits.
        **kwargs: Passed to :class:`~torchmetrics.Metric`.
    """

    higher_is_better = False

    def _per_example(self, logits: Tensor, target: Tensor) -> Tensor:
        return gibbs_nll(logits, target)


class EnsembleBrierScore(_EnsembleMean):
    """Brier score ``Σ_c (p̄_c − 1[c = y])²`` of the mean member probabilities, averaged over the split.

    Args:
        num_classes: Optional ``C``, checked against the logits.
        ensemble_size: Optional ``K``, checked against the logits.
        **kwargs: Passed to :class:`~torchmetrics.Metric`.
    """

    higher_is_better = False

    def _per_example(self, logits: Tensor, target: Tensor) -> Tensor:
        return brier_score(ensemble_log_probs(logits).exp(), target)


class MemberDisagreement(_EnsembleMean):
    """Pairwise member disagreement ``(1/K²) Σ_{m,m'} 1[argmax_m ≠ argmax_m']`` averaged over the split.

    Args:
        num_classes: Optional ``C``, checked against the logits.
        ensemble_size: Optional ``K``, checked against the logits.
        **kwargs: Passed to :class:`~torchmetrics.Metric`.
    """

    higher_is_better = None

    def _per_example(self, logits: Tensor, target: Tensor) -> Tensor:
        return member_disagreement(logits)


class MemberNLL(Metric):
    """Each member's NLL over the split; ``compute()`` returns ``(K,)``.

    Args:
        ensemble_size: ``K`` (the state has one sum per member).
        num_classes: Optional ``C``, checked against the logits.
        **kwargs: Passed to :class:`~torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, ensemble_size: int, num_classes: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
        self.ensemble_size = ensemble_size
        self.num_classes = num_classes
        self.add_state("total", torch.zeros(ensemble_size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, member_logits: Tensor, target: Tensor) -> None:
        """Accumulate a batch of member logits ``(K, N, C)`` and labels ``(N,)``."""
        _check(member_logits, target, self.num_classes, self.ensemble_size)
        self.total += _member_ce(member_logits.detach(), target).sum(dim=1).double()
        self.count += target.shape[0]

    def compute(self) -> Tensor:
        """Per-member mean NLL, shape ``(K,)``."""
        return (self.total / self.count).float()


class EnsembleAccuracy(MulticlassAccuracy):
    """Accuracy of the mean member probabilities (micro average; torchmetrics' sum states).

    Args:
        num_classes: ``C``.
        ensemble_size: Optional ``K``, checked against the logits.
        **kwargs: Passed to :class:`~torchmetrics.classification.MulticlassAccuracy` (``average`` defaults to
            ``"micro"``, the plain fraction of correct predictions).
    """

    def __init__(self, num_classes: int, ensemble_size: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("average", "micro")
        super().__init__(num_classes=num_classes, **kwargs)
        self.ensemble_size = ensemble_size

    def update(self, member_logits: Tensor, target: Tensor) -> None:  # type: ignore[override]
        """Accumulate a batch of member logits ``(K, N, C)`` and labels ``(N,)``."""
        _check(member_logits, target, self.num_classes, self.ensemble_size)
        super().update(ensemble_log_probs(member_logits.detach()).exp(), target)


class EnsembleCalibrationError(MulticlassCalibrationError):
    """Expected calibration error of the mean member probabilities (equal-width bins, L1 by default).

    torchmetrics' :class:`~torchmetrics.classification.MulticlassCalibrationError` on ``p̄``: confidence = max
    class probability, bins ``[i/B, (i+1)/B)``, ``Σ_b (|b|/N)·|acc_b − conf_b|`` over the whole split. The one
    change: a confidence of exactly 1 falls into the last bin (UB/robustness_metrics clamp it there; torchmetrics
    would give it a bin of its own).

    Args:
        num_classes: ``C``.
        n_bins: Number of equal-width bins ``B`` (UB uses 15).
        ensemble_size: Optional ``K``, checked against the logits.
        **kwargs: Passed to :class:`~torchmetrics.classification.MulticlassCalibrationError` (e.g. ``norm``).
    """

    def __init__(self, num_classes: int, n_bins: int = 15, ensemble_size: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("norm", "l1")
        super().__init__(num_classes=num_classes, n_bins=n_bins, **kwargs)
        self.ensemble_size = ensemble_size

    def update(self, member_logits: Tensor, target: Tensor) -> None:  # type: ignore[override]
        """Accumulate a batch of member logits ``(K, N, C)`` and labels ``(N,)``."""
        _check(member_logits, target, self.num_classes, self.ensemble_size)
        super().update(ensemble_log_probs(member_logits.detach()).exp(), target)

    def compute(self) -> Tensor:
        """ECE over every example seen since the last reset."""
        confidences = dim_zero_cat(self.confidences)
        accuracies = dim_zero_cat(self.accuracies)
        bounds = torch.linspace(0, 1, self.n_bins + 1, dtype=confidences.dtype, device=confidences.device)
        bounds[-1] = torch.nextafter(bounds[-1], bounds[-1] + 1)  # right-closed last bin: conf = 1 stays in it
        return _ce_compute(confidences, accuracies, bounds, norm=self.norm)


def ensemble_metrics(num_classes: int, ensemble_size: int, n_bins: int = 15) -> MetricCollection:
    """The scalar ensemble metrics in one collection, keys ``acc, nll, gibbs_nll, ece, brier, disagreement``.

    Update with ``collection.update(member_logits, target)`` (``(K, N, C)`` and ``(N,)``); prefix the keys with
    ``MetricCollection(..., prefix=...)`` or ``clone(prefix=...)`` per stage. :class:`MemberNLL` is separate
    (its value is a vector).

    Args:
        num_classes: ``C``.
        ensemble_size: ``K``.
        n_bins: Number of ECE bins.
    """
    kw = {"num_classes": num_classes, "ensemble_size": ensemble_size}
    return MetricCollection(
        {
            "acc": EnsembleAccuracy(**kw),
            "nll": EnsembleNLL(**kw),
            "gibbs_nll": GibbsNLL(**kw),
            "ece": EnsembleCalibrationError(n_bins=n_bins, **kw),
            "brier": EnsembleBrierScore(**kw),
            "disagreement": MemberDisagreement(**kw),
        },
        compute_groups=False,
    )
