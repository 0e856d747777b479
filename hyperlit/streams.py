"""Two data streams for bilevel training: ``{"train": ..., "hyper": ...}`` batches.

Modules that take hyperparameter steps on held-out data (STN, best-response hypernetworks) say so with the class
attribute ``uses_hyper_stream = True`` and receive each training batch as a dict with a ``train`` and a ``hyper``
entry, produced by Lightning's ``CombinedLoader`` in ``max_size_cycle`` mode (the shorter stream is cycled; under
DDP Lightning shards both).

Where the hyper stream comes from:

1. every :class:`datamodules.base.HyperlitDataModule` serves it itself when the model being fit uses it (its
   ``hyper_dataloader()``, else its ``val_dataloader()``), and plain batches to every other model;
2. a user's plain train/val ``LightningDataModule``: wrap it, ``HyperStreamDataModule(datamodule)`` (the hyper
   stream is its ``hyper_dataloader()`` or ``val_dataloader()``, so the validation split then serves both λ-training
   and Lightning's validation monitoring, as in the STN paper, whose reported validation numbers are optimistic
   for that reason). ``hyperlit fit`` wraps such a DataModule automatically; with a plain ``Trainer`` the module
   stops at its first training step with an error saying so;
3. a DataModule whose ``train_dataloader()`` already returns such a dict / ``CombinedLoader`` (used as is), or
   ``trainer.fit(model, train_dataloaders={"train": ..., "hyper": ...})`` with plain loaders.

A hyper stream without batches (an empty hyper/validation split, or fewer held-out examples than one batch with
``drop_last=True``) would end every epoch at once (``max_size_cycle`` cannot cycle it); the tuning modules refuse it
at fit start (:meth:`hyperlit.tuning.bilevel.BilevelModule.check_hyper_stream`).

Exact mid-epoch resume of both streams is the DataModule's (see :mod:`datamodules.base`): the wrapper hands
``state_dict``/``load_state_dict`` and the batch-transfer hooks to the DataModule it wraps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

__all__ = ["HyperStreamDataModule", "serves_hyper_stream", "split_streams", "uses_hyper_stream"]


def uses_hyper_stream(model: object) -> bool:
    """Whether ``model`` trains on ``{"train", "hyper"}`` batches (its ``uses_hyper_stream`` class attribute)."""
    return bool(getattr(model, "uses_hyper_stream", False))


def serves_hyper_stream(datamodule: object) -> bool:
    """Whether ``datamodule`` serves the hyper stream itself (its ``serves_hyper_stream`` class attribute)."""
    return bool(getattr(datamodule, "serves_hyper_stream", False))


def split_streams(batch: Any) -> tuple[Any, Any]:
    """Return ``(train_batch, hyper_batch)`` from a combined batch, with a clear error otherwise."""
    if isinstance(batch, Mapping) and "train" in batch and "hyper" in batch:
        return batch["train"], batch["hyper"]
    raise TypeError(
        "this module trains hyperparameters on a held-out stream and needs batches of the form "
        "{'train': ..., 'hyper': ...}; a plain LightningDataModule does not serve them: wrap it, "
        "hyperlit.streams.HyperStreamDataModule(datamodule) (its hyper_dataloader() or val_dataloader() supplies "
        "the hyper stream; `hyperlit fit` wraps it for you), use a hyperlit DataModule, or pass "
        f"train_dataloaders={{'train': loader, 'hyper': loader}} to Trainer.fit; got a batch of type {type(batch).__name__}"
    )


class HyperStreamDataModule(pl.LightningDataModule):
    """Serve ``{"train", "hyper"}`` training batches from a user's plain train/val DataModule.

    The training stream is the wrapped DataModule's ``train_dataloader()``; the hyper stream its
    ``hyper_dataloader()`` if it has one, else its ``val_dataloader()`` (cycled, ``max_size_cycle``). A
    ``train_dataloader()`` that already returns a dict or ``CombinedLoader`` is used as is. Everything else —
    ``prepare_data``/``setup``/``teardown``, the validation, test and predict loaders, ``state_dict``/
    ``load_state_dict`` (mid-epoch resume), the batch-transfer hooks and attribute access (``dm.num_classes``) — is
    the wrapped DataModule's.

    Args:
        datamodule: The DataModule to wrap.
    """

    serves_hyper_stream: ClassVar[bool] = True

    def __init__(self, datamodule: pl.LightningDataModule) -> None:
        if not isinstance(datamodule, pl.LightningDataModule):
            raise TypeError(f"HyperStreamDataModule wraps a LightningDataModule, got {type(datamodule).__name__}")
        self.__dict__["datamodule"] = datamodule  # before Lightning's __init__ assigns through the properties below
        super().__init__()

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("datamodule")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def __repr__(self) -> str:
        return f"HyperStreamDataModule({type(self.datamodule).__name__})"

    # -- state Lightning reads from or writes to the DataModule: the wrapped one's ----------------------------------
    @property  # type: ignore[override]
    def trainer(self) -> pl.Trainer | None:
        return self.datamodule.trainer

    @trainer.setter
    def trainer(self, trainer: pl.Trainer | None) -> None:
        self.datamodule.trainer = trainer

    @property
    def prepare_data_per_node(self) -> bool:
        return self.datamodule.prepare_data_per_node

    @prepare_data_per_node.setter
    def prepare_data_per_node(self, value: bool) -> None:
        self.datamodule.prepare_data_per_node = value

    @property
    def allow_zero_length_dataloader_with_multiple_devices(self) -> bool:
        return self.datamodule.allow_zero_length_dataloader_with_multiple_devices

    @allow_zero_length_dataloader_with_multiple_devices.setter
    def allow_zero_length_dataloader_with_multiple_devices(self, value: bool) -> None:
        self.datamodule.allow_zero_length_dataloader_with_multiple_devices = value

    @property
    @override
    def hparams(self) -> Any:
        return self.datamodule.hparams

    @property
    @override
    def hparams_initial(self) -> Any:
        return self.datamodule.hparams_initial

    # -- hooks ---------------------------------------------------------------------------------------------------
    @override
    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    @override
    def setup(self, stage: str) -> None:
        self.datamodule.setup(stage)

    @override
    def teardown(self, stage: str) -> None:
        self.datamodule.teardown(stage)

    def hyper_dataloader(self) -> Any:
        """The hyper stream: the wrapped DataModule's ``hyper_dataloader()``, else its ``val_dataloader()``."""
        hyper = getattr(self.datamodule, "hyper_dataloader", None)
        return hyper() if hyper is not None else self.datamodule.val_dataloader()

    @override
    def train_dataloader(self) -> Any:
        train = self.datamodule.train_dataloader()
        if isinstance(train, (CombinedLoader, Mapping)):
            return train
        return CombinedLoader({"train": train, "hyper": self.hyper_dataloader()}, mode="max_size_cycle")

    @override
    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    @override
    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()

    @override
    def predict_dataloader(self) -> Any:
        return self.datamodule.predict_dataloader()

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict)

    @override
    def on_exception(self, exception: BaseException) -> None:
        self.datamodule.on_exception(exception)

    def _transfer_hook(self, name: str) -> Any:
        """The wrapped DataModule's hook if it has its own, else the model's (what Lightning would have called)."""
        if is_overridden(name, self.datamodule, parent=pl.LightningDataModule):
            return getattr(self.datamodule, name)
        trainer = self.datamodule.trainer
        module = trainer.lightning_module if trainer is not None else None
        return getattr(module if module is not None else super(), name)

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self._transfer_hook("on_before_batch_transfer")(batch, dataloader_idx)

    @override
    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return self._transfer_hook("transfer_batch_to_device")(batch, device, dataloader_idx)

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self._transfer_hook("on_after_batch_transfer")(batch, dataloader_idx)
