"""Two data streams for bilevel training: ``{"train": ..., "hyper": ...}`` batches.

Modules that take hyperparameter steps on held-out data (STN, best-response hypernetworks) receive each
training batch as a dict with a ``train`` and a ``hyper`` entry, produced by Lightning's ``CombinedLoader`` in
``max_size_cycle`` mode (the shorter stream is cycled; under DDP Lightning shards both).

Where the hyper stream comes from, in order:

1. a DataModule whose ``train_dataloader()`` already returns such a dict / ``CombinedLoader`` (used as is);
2. a DataModule with a ``hyper_dataloader()`` method (all hyperlit DataModules that split off a hyper set);
3. any other DataModule: its ``val_dataloader()`` (so a user's DataModule with only train/val loaders works;
   the validation split then serves both λ-training and Lightning's validation monitoring, as in the STN
   paper, whose reported validation numbers are optimistic for that reason);
4. ``trainer.fit(model, train_dataloaders={"train": ..., "hyper": ...})`` with plain loaders.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader

__all__ = ["attach_hyper_stream", "detach_hyper_stream", "split_streams"]


def attach_hyper_stream(trainer: pl.Trainer) -> None:
    """Make the trainer's DataModule serve ``{"train", "hyper"}`` training batches (call from ``setup``).

    Replaces the DataModule instance's ``train_dataloader`` with one that combines the original training
    loader with ``hyper_dataloader()`` (or ``val_dataloader()``). Idempotent.
    """
    dm = trainer.datamodule
    if dm is None or getattr(dm, "_hyperlit_streams_attached", False):
        return
    original = dm.train_dataloader
    hyper = getattr(dm, "hyper_dataloader", None) or dm.val_dataloader

    def combined() -> Any:
        train = original()
        if isinstance(train, (CombinedLoader, Mapping)):
            return train
        return CombinedLoader({"train": train, "hyper": hyper()}, mode="max_size_cycle")

    dm._hyperlit_original_train_dataloader = original
    dm.train_dataloader = combined  # type: ignore[method-assign]
    dm._hyperlit_streams_attached = True


def detach_hyper_stream(trainer: pl.Trainer) -> None:
    """Undo :func:`attach_hyper_stream` (call from ``teardown``), so the DataModule can serve other modules."""
    dm = trainer.datamodule
    if dm is None or not getattr(dm, "_hyperlit_streams_attached", False):
        return
    if "train_dataloader" in vars(dm):
        del dm.train_dataloader  # the instance attribute; the class's method shows through again
    dm._hyperlit_streams_attached = False


def split_streams(batch: Any) -> tuple[Any, Any]:
    """Return ``(train_batch, hyper_batch)`` from a combined batch, with a clear error otherwise."""
    if isinstance(batch, Mapping) and "train" in batch and "hyper" in batch:
        return batch["train"], batch["hyper"]
    raise TypeError(
        "this module trains hyperparameters on a held-out stream and needs batches of the form "
        "{'train': ..., 'hyper': ...}; use a DataModule (its hyper_dataloader() or val_dataloader() supplies "
        "the hyper stream) or pass train_dataloaders={'train': loader, 'hyper': loader} to Trainer.fit; "
        f"got a batch of type {type(batch).__name__}"
    )
