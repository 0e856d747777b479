"""DeepEnsembleModule under DDP (2 CPU processes, gloo, ``ddp_spawn``): the stacked members trained on two ranks
(per-member L2 and label smoothing, per-member gradient clipping, SGD momentum) equal one process trained on the
full batches, both ranks end identical, and the logged validation metrics of the averaged prediction are the whole
split's (torchmetrics states reduced over ranks), not a rank's shard's."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from hyperlit.ensembles.base import EVAL_METRICS
from hyperlit.ensembles.deep import DeepEnsembleModule
from tests.distributed.test_ddp_bilevel import DumpState
from tests.distributed.test_ddp_metrics_tuning import DumpValMetrics

pytestmark = pytest.mark.distributed

TRAIN, VAL, VAL_BATCH = 48, 30, 7


class Blobs(pl.LightningDataModule):
    """Three noisy classes in 5 dimensions. Training: order-preserving shards (rank r takes examples r, r + W, ...)
    in batches of ``8 / W``, so a 2-rank step sees exactly one process's batch of 8; validation: Lightning's own
    (unshuffled) sharding, 15 examples per rank in batches of 7, 7 and 1."""

    def __init__(self, val_indices: list[int] | None = None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 3, (TRAIN + VAL,), generator=g)
        x = torch.randn(TRAIN + VAL, 5, generator=g) + 1.5 * nn.functional.one_hot(y, 5).float()
        self.train = TensorDataset(x[:TRAIN], y[:TRAIN])
        self.val: TensorDataset | Subset = TensorDataset(x[TRAIN:], y[TRAIN:])
        if val_indices is not None:  # one rank's shard only (the control of the test)
            self.val = Subset(self.val, val_indices)

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.train, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.train, batch_size=8 // world, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=VAL_BATCH)


def _ensemble() -> DeepEnsembleModule:
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    return DeepEnsembleModule(
        net,
        ensemble_size=3,
        num_classes=3,
        member_hparams={"l2": [0.5, 0.0, 2.0], "label_smoothing": [0.0, 0.1, 0.3]},
        grad_clip=0.5,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),  # picklable for ddp_spawn
        seed=5,
    )


def _trainer(root: Path, devices: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_epochs=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )


def test_two_ranks_equal_one_process_and_log_the_whole_splits_metrics(tmp_path) -> None:
    model = _ensemble()
    trainer = _trainer(tmp_path, 2, callbacks=[DumpState(str(tmp_path)), DumpValMetrics(str(tmp_path))])
    trainer.fit(model, datamodule=Blobs())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["steps"] == [12.0]  # 48 examples / (2 ranks x 4) = 6 steps per epoch, 2 epochs

    # one process, full batches of 8 (same examples per step), same initialisation
    single = _ensemble()
    _trainer(tmp_path / "single", 1, limit_val_batches=0).fit(single, datamodule=Blobs())
    assert single.l2_divisor == TRAIN  # every rank read the whole training set's size, not its shard's
    for name, value in single.state_dict().items():
        torch.testing.assert_close(
            torch.tensor(ranks[0][name], dtype=torch.float32), value.reshape(-1).float(), atol=2e-6, rtol=1e-5, msg=name
        )

    # validation metrics: every rank logged the whole split's values
    vals = [json.loads((tmp_path / f"val{r}.json").read_text()) for r in (0, 1)]
    assert vals[0] == vals[1] and set(vals[0]) == {f"val/{m}" for m in (*EVAL_METRICS, "loss")}
    (whole,) = _trainer(tmp_path / "v", 1).validate(model, datamodule=Blobs(), verbose=False)
    for key, value in vals[0].items():
        assert value == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key
    (shard,) = _trainer(tmp_path / "s", 1).validate(
        model, datamodule=Blobs(val_indices=list(range(0, VAL, 2))), verbose=False
    )
    assert abs(shard["val/nll"] - whole["val/nll"]) > 1e-4  # control: a rank's shard alone differs
