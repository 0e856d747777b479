"""The plain small CIFAR-10 CNN: the twin of :class:`~hyperlit.models.stn_cnn.StnSmallCNN` with ordinary layers.

Same computation as the official small STN CNN at zero response (STN §5, ``cnn/hypermodels/small.py``)::

    normalise → [conv 3×3 (pad 1) → ReLU → max-pool 2 → dropout] × 3 (3→10→20→40 filters) → linear

built from ``nn.Conv2d`` / ``nn.Linear``, so the ensemble converters
(:func:`~hyperlit.nn.batch_ensemble.convert_to_batch_ensemble`,
:func:`~hyperlit.nn.batch_ensemble.convert_to_hyper_batch_ensemble`) and ``torch.func`` accept it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyperlit.models.stn_cnn import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """Three 3×3 convolutions with max-pooling and a linear classifier, for [0, 1] images.

    Args:
        num_classes: Output classes.
        filters: Filters of the three convolutions (official: 10, 20, 40).
        image_size: Input height/width (divisible by 8).
        in_channels: Input channels.
        dropout: Dropout rate after every pooling (``nn.Dropout``; 0: none).
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation standard deviation.

    Module paths: ``convs.0`` … ``convs.2``, ``fc``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        filters: Sequence[int] = (10, 20, 40),
        image_size: int = 32,
        in_channels: int = 3,
        dropout: float = 0.0,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be divisible by 8, got {image_size}")
        if len(filters) != 3 or any(int(f) < 1 for f in filters):
            raise ValueError(f"filters must be three sizes >= 1, got {list(filters)}")
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(f"mean/std need {in_channels} entries, got {len(mean)}/{len(std)}")
        chans = [in_channels, *(int(f) for f in filters)]
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1) for i in range(3))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(chans[-1] * (image_size // 8) ** 2, num_classes)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.mean.to(x)) / self.std.to(x)
        for conv in self.convs:
            x = self.dropout(F.max_pool2d(F.relu(conv(x)), 2))
        return self.fc(x.flatten(1))
