"""scikit-learn's handwritten digits (1,797 8×8 images, 10 classes) — real data that ships with scikit-learn.

Used by the offline quickstart: no download, no ``data_dir``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from datamodules.base import HyperlitDataModule, seeded_split_indices

__all__ = ["DigitsDataModule"]


class DigitsDataModule(HyperlitDataModule):
    """Digits split into train / hyper / test (seeded).

    The ``hyper`` split is what STN-style modules tune their hyperparameters on; it is also served by
    ``val_dataloader`` so Lightning's validation loop reports the loss on the same held-out data.

    Args:
        fractions: Fractions of (train, hyper/validation, test).
        flatten: Return flat 64-vectors (MLPs) instead of 1×8×8 images.
        **kwargs: See :class:`~datamodules.base.HyperlitDataModule`.
    """

    num_classes = 10

    serves_hyper_stream = True  # train_dataloader() goes through with_hyper_stream

    def __init__(
        self, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), flatten: bool = True, **kwargs: Any
    ) -> None:
        kwargs.setdefault("batch_size", 64)
        super().__init__(**kwargs)
        self.fractions = tuple(fractions)
        self.flatten = flatten
        self.input_dim = 64

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.as_tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.as_tensor(data.target, dtype=torch.long)
        if not self.flatten:
            x = x.view(-1, 1, 8, 8)
        idx = seeded_split_indices(len(y), self.fractions, self.split_seed)
        self.train_set, self.hyper_set, self.test_set = (TensorDataset(x[i], y[i]) for i in idx)

    def train_dataloader(self) -> DataLoader:
        return self.with_hyper_stream(self._loader(self.train_set, shuffle=True, drop_last=True))

    def hyper_dataloader(self) -> DataLoader:
        """Held-out stream for hyperparameter steps (shuffled, cycled by the tuning modules)."""
        return self._loader(self.hyper_set, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.hyper_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
