"""The base of the ensemble modules: evaluation of K members, their averaged prediction and its metrics.

An ensemble's prediction is the mean of its members' predictive distributions, ``p(y | x) = (1/K) Σ_k p_k(y | x)``
(Lakshminarayanan et al. 2017; BatchEnsemble, Wen et al. 2020, §3; hyper-ensembles, Wenzel et al. 2020, §2), never
the softmax of the mean logits. Every ensemble module says what its K members output for N examples,
:meth:`EnsembleEvaluation.member_logits` → ``(K, N, C)``, and this base turns that into

* validation/test metrics of the averaged prediction (``torchmetrics``, reduced over DDP ranks, whole split):
  ``nll`` (also logged as ``loss``), ``acc``, ``ece`` (15 equal-width bins), ``brier``, plus the members' mean
  ``gibbs_nll`` and their ``disagreement``;
* ``predict_step``: the averaged probabilities ``(N, C)``;
* :meth:`EnsembleEvaluation.collect_member_logits`: every member's logits on a whole loader, e.g. for greedy
  selection of a hyper-deep ensemble (:func:`~hyperlit.ensembles.selection.greedy_selection`).

Subclasses implement the training (manual optimization, like every hyperlit module) and ``configure_optimizers``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MetricCollection
from typing_extensions import override

from hyperlit.base import HyperlitModule
from hyperlit.ensembles.metrics import ensemble_log_probs, ensemble_metrics
from hyperlit.tuning.batches import unpack_xy

__all__ = ["EVAL_METRICS", "EnsembleEvaluation", "EnsembleModule", "check_ensemble_args"]

#: the metrics logged per validation/test epoch, ``{stage}/{name}`` (``{stage}/loss`` repeats ``nll``)
EVAL_METRICS = ("nll", "acc", "ece", "brier", "gibbs_nll", "disagreement")


class EnsembleEvaluation:
    """Evaluation of K members (a mixin of :class:`EnsembleModule` and of the hyper-batch module, which is a
    Self-Tuning Network): needs the attributes ``ensemble_size``, ``num_classes`` and :meth:`member_logits`."""

    ensemble_size: int
    num_classes: int

    # -- to be provided by subclasses -------------------------------------------------------------------------
    def member_logits(self, x: Tensor) -> Tensor:
        """The K members' logits ``(K, N, C)`` for N examples at the evaluation setting (called in eval mode)."""
        raise NotImplementedError

    # -- batches ----------------------------------------------------------------------------------------------
    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of a batch: a tuple/list ``(x, y, ...)`` or a dict with ``x``/``y``, ``input``/``target`` or
        ``image``/``label`` (see :func:`~hyperlit.tuning.batches.unpack_xy`)."""
        return unpack_xy(batch, type(self).__name__)

    def checked_member_logits(self, x: Tensor) -> Tensor:
        """:meth:`member_logits` with its shape checked against ``(K, N, C)``."""
        logits = self.member_logits(x)
        expected = (self.ensemble_size, x.shape[0], self.num_classes)
        if tuple(logits.shape) != expected:
            raise ValueError(
                f"{type(self).__name__}.member_logits returned shape {tuple(logits.shape)}, expected (K, N, C) = "
                f"{expected}: check num_classes and that the members' outputs are stacked member-major"
            )
        return logits

    # -- metrics and evaluation --------------------------------------------------------------------------------
    @override
    def configure_metrics(self) -> MetricCollection:
        """The averaged prediction's NLL, accuracy, ECE, Brier score, the members' Gibbs NLL and disagreement."""
        return ensemble_metrics(self.num_classes, self.ensemble_size)

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = self.unpack_batch(batch)
        logits = self.checked_member_logits(x)
        metrics = self.stage_metrics(stage)
        logits = logits.detach()
        for name in EVAL_METRICS:  # one by one: a subclass's collection may hold other metrics (a training loss)
            metrics[name].update(logits, y)
            self.log(f"{stage}/{name}", metrics[name], on_step=False, on_epoch=True, prog_bar=name in ("nll", "acc"))
        self.log(f"{stage}/loss", metrics["nll"], on_step=False, on_epoch=True)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The ensemble's predictive probabilities ``(N, C)`` (a bare tensor batch is taken as the inputs)."""
        x = batch if isinstance(batch, Tensor) else self.unpack_batch(batch)[0]
        return ensemble_log_probs(self.checked_member_logits(x)).exp()

    @torch.no_grad()
    def collect_member_logits(self, loader: Iterable[Any]) -> tuple[Tensor, Tensor]:
        """Every member's logits ``(K, N, C)`` and the labels ``(N,)`` of a whole loader (eval mode, no grad)."""
        was_training = self.training
        self.eval()
        try:
            outs, labels = [], []
            for batch in loader:
                x, y = self.unpack_batch(batch)
                outs.append(self.checked_member_logits(x.to(self.device)).float().cpu())
                labels.append(y.cpu())
        finally:
            self.train(was_training)
        if not outs:
            raise ValueError("collect_member_logits got an empty loader")
        return torch.cat(outs, dim=1), torch.cat(labels)


class EnsembleModule(EnsembleEvaluation, HyperlitModule):
    """Base LightningModule of the ensemble family: K members evaluated at once, predictions averaged.

    Args:
        ensemble_size: Number of members K.
        num_classes: Number of classes C of the classifier.
        seed: Seed of the module's generator.
    """

    def __init__(self, ensemble_size: int, num_classes: int, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.ensemble_size, self.num_classes = check_ensemble_args(ensemble_size, num_classes)


def check_ensemble_args(ensemble_size: int, num_classes: int) -> tuple[int, int]:
    """``(K, C)`` as ints; ``ValueError`` unless K >= 1 and C >= 2."""
    if int(ensemble_size) < 1:
        raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2 (a classifier), got {num_classes}")
    return int(ensemble_size), int(num_classes)
