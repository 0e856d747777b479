"""Validation metrics of the tuning modules under DDP (2 CPU processes, gloo, ``ddp_spawn``): ``val/loss`` and
``val/acc`` logged by SelfTuningModule and BestResponseModule on every rank equal one process's values over the whole
validation split.

The validation split (30 examples) is sharded by Lightning's ``DistributedSampler`` (no shuffling, 15 examples per
rank, no padding) into batches of 7, 7 and 1, so a rank's mean over its batches, or its shard's mean, is not the
split's: only the batch-size-weighted torchmetrics states, reduced over ranks, give the single-process value. The
user's train/val DataModule is wrapped in :class:`~hyperlit.streams.HyperStreamDataModule` (the hyper stream is its
validation loader), and the modules keep their default (lambda) optimizer factories across the spawn.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from hyperlit.models.stn_cnn import StnMLP
from hyperlit.streams import HyperStreamDataModule
from hyperlit.tuning import BestResponseModule, SelfTuningModule

pytestmark = pytest.mark.distributed

VAL_SIZE, VAL_BATCH = 30, 7


class Blobs(pl.LightningDataModule):
    """Three noisy classes in 5 dimensions: 48 training and 30 validation examples (plain loaders, unsharded)."""

    def __init__(self, val_indices: list[int] | None = None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 3, (48 + VAL_SIZE,), generator=g)
        x = torch.randn(48 + VAL_SIZE, 5, generator=g) + 1.5 * torch.nn.functional.one_hot(y, 5).float()
        self.train = TensorDataset(x[:48], y[:48])
        val = slice(48, None)
        self.val = TensorDataset(x[val], y[val])
        if val_indices is not None:  # one rank's shard only (the control of the test)
            self.val = torch.utils.data.Subset(self.val, val_indices)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=VAL_BATCH)


class DumpValMetrics(pl.Callback):
    """Every rank writes the ``val/*`` values it logged to ``<dir>/val<rank>.json`` at the end of training."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        Path(self.directory, f"val{trainer.global_rank}.json").write_text(json.dumps(values))


def _stn() -> SelfTuningModule:
    torch.manual_seed(0)
    return SelfTuningModule(StnMLP(in_features=5, hidden=(8,), num_classes=3), warmup_steps=1, plot_schedule=False)


def _best_response() -> BestResponseModule:
    torch.manual_seed(0)
    return BestResponseModule(
        mode="local", input_dim=5, hidden_sizes=(), num_classes=3, warmup_steps=1, plot_schedule=False
    )


def _validate(make_trainer, model: pl.LightningModule, dm: pl.LightningDataModule) -> dict[str, float]:
    (result,) = make_trainer().validate(model, datamodule=dm, verbose=False)
    return result


def _check(tmp_path: Path, make_trainer, model: pl.LightningModule) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[DumpValMetrics(str(tmp_path))],
    )
    trainer.fit(model, datamodule=HyperStreamDataModule(Blobs()))
    assert int(model.hyper_steps_done) > 0  # 3 batches per rank: warm-up 1 φ-step, then T_train : T_val
    ranks = [json.loads((tmp_path / f"val{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and set(ranks[0]) == {"val/loss", "val/acc"}
    assert {k: float(trainer.callback_metrics[k]) for k in ranks[0]} == ranks[0]  # rank 0's, in the main process

    # the same weights (returned from rank 0) validated by one process over the whole split
    single = _validate(make_trainer, model, Blobs())
    assert ranks[0]["val/loss"] == pytest.approx(single["val/loss"], rel=1e-6, abs=1e-7)
    assert ranks[0]["val/acc"] == pytest.approx(single["val/acc"], abs=1e-7)
    # control: rank 0's shard alone (examples 0, 2, 4, ...) has another loss
    shard = _validate(make_trainer, model, Blobs(val_indices=list(range(0, VAL_SIZE, 2))))
    assert abs(shard["val/loss"] - single["val/loss"]) > 1e-4


def test_stn_validation_metrics_are_the_whole_splits(tmp_path, make_trainer) -> None:
    _check(tmp_path, make_trainer, _stn())


def test_best_response_validation_metrics_are_the_whole_splits(tmp_path, make_trainer) -> None:
    _check(tmp_path, make_trainer, _best_response())
