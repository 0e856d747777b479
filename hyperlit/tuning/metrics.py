"""Metrics of the tuning modules (``torchmetrics``; their states are reduced over DDP ranks when computed).

* losses: :func:`weighted_mean`, a ``MeanMetric`` weighted by the batch's size (examples, or tokens for language
  models), so an epoch's value is the mean over the whole split however the batches (and DDP shards) are cut;
* accuracy: ``torchmetrics.classification.MulticlassAccuracy(average="micro")``, the fraction of correct argmax
  predictions.
"""

from __future__ import annotations

from torchmetrics import MeanMetric

__all__ = ["weighted_mean"]


def weighted_mean() -> MeanMetric:
    """A weighted mean (``update(value, weight)``) in which a NaN propagates, as it does in the loss.

    ``nan_strategy=nan`` keeps NaNs (and the weights); ``"disable"`` would skip the NaN check but, in torchmetrics
    1.9, also replaces every weight by 1, and the default ``"warn"`` drops NaN values from the mean.
    """
    return MeanMetric(nan_strategy=float("nan"))
