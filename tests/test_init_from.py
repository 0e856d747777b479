"""Fine-tuning on a user's own DataModule with ``hyperlit fit --init_from`` (issue 9).

``--init_from CKPT`` copies a checkpoint's tensors (weights, and for STN also λ and σ) into a freshly built module
and starts a *new* run: fresh optimizers, fresh step counters, the new DataModule. ``--ckpt_path`` instead resumes
the same run (optimizers, counters, generator, loops).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from datamodules.digits import DigitsDataModule
from hyperlit.checkpoint import CheckpointMismatchError, load_weights
from hyperlit.cli import main
from hyperlit.models.stn_cnn import StnMLP
from hyperlit.tuning import SelfTuningModule

COUNTERS = ("phi_steps", "warmup_phi_steps", "hyper_steps_done", "skipped_steps")


class BlobsDataModule(pl.LightningDataModule):
    """A user's own DataModule (plain Lightning, train/val loaders only): 64 features, Gaussian class blobs."""

    def __init__(self, num_classes: int = 10, n: int = 320, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.num_classes, self.n, self.batch_size, self.seed = num_classes, n, batch_size, seed

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(self.seed)
        centres = torch.randn(self.num_classes, 64, generator=g)
        y = torch.randint(0, self.num_classes, (self.n,), generator=g)
        x = centres[y] + 0.5 * torch.randn(self.n, 64, generator=g)
        cut = self.n * 3 // 4
        self.train_set, self.val_set = TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class Snapshot(pl.Callback):
    """Records the module's state when the fine-tuning run starts (after ``init_from``) and when it ends."""

    records: ClassVar[dict[str, Any]] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        Snapshot.records["start"] = {
            "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optimizer_states": [len(opt.state) for opt in trainer.optimizers],
            "global_step": trainer.global_step,
            "datamodule": type(getattr(trainer.datamodule, "datamodule", trainer.datamodule)).__name__,
        }

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        Snapshot.records["end"] = {
            "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "schedule": list(getattr(pl_module, "schedule", [])),
        }


def _pretrained_stn(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A few STN steps on scikit-learn's digits, saved as a Lightning checkpoint."""
    torch.manual_seed(0)
    module = SelfTuningModule(
        StnMLP(in_features=64, hidden=(32,), num_classes=10),
        warmup_steps=2,
        hyper_optimizer=lambda p: torch.optim.Adam(p, lr=0.1),
        plot_schedule=False,
    )
    lam0 = module.space.unconstrained.detach().clone()
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=8,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert int(module.phi_steps) == 8 and int(module.hyper_steps_done) == 3
    assert not torch.equal(module.space.unconstrained.detach(), lam0)  # λ moved: taking it over is observable
    path = tmp_path / "digits.ckpt"
    trainer.save_checkpoint(path)
    return path, {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_stn_init_from_continues_on_a_users_datamodule(tmp_path: Path) -> None:
    ckpt, trained = _pretrained_stn(tmp_path)
    Snapshot.records.clear()
    main(
        [
            "fit",
            "--seed_everything",
            "123",  # a fresh initialisation differs from the checkpoint
            "--model",
            "hyperlit.tuning.SelfTuningModule",
            "--model.net",
            "hyperlit.models.StnMLP",
            "--model.net.init_args.hidden",
            "[32]",
            "--model.warmup_steps",
            "2",
            "--model.hyper_optimizer.lr",
            "0.1",
            "--model.plot_schedule",
            "false",
            "--data",
            f"{__name__}.BlobsDataModule",
            "--init_from",
            str(ckpt),
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "5",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.callbacks+",
            f"{__name__}.Snapshot",
        ]
    )
    start, end = Snapshot.records["start"], Snapshot.records["end"]
    assert start["datamodule"] == "BlobsDataModule"
    # weights, λ and σ copied from the checkpoint ...
    for name, value in trained.items():
        if name.split(".")[-1] not in COUNTERS:
            torch.testing.assert_close(start["state_dict"][name], value, atol=0, rtol=0, msg=name)
    # ... but a new run: counters at zero, optimizers without state, Lightning's loops at step 0
    for name in COUNTERS:
        assert int(start["state_dict"][name]) == 0, name
    assert start["optimizer_states"] == [0, 0, 0] and start["global_step"] == 0
    # the new run trains on the new data with its own schedule: warm-up again (2 φ-steps), then 1 λ-step per 2 φ-steps
    assert int(end["state_dict"]["phi_steps"]) == 5 and int(end["state_dict"]["warmup_phi_steps"]) == 2
    assert int(end["state_dict"]["hyper_steps_done"]) == 1 and len(end["schedule"]) == 1
    assert end["schedule"][0]["phi_step"] == 4.0  # 2 warm-up φ-steps + T_train = 2, counted from zero
    lam_ckpt = trained["space.unconstrained"]
    assert not torch.equal(end["state_dict"]["space.unconstrained"], lam_ckpt)  # λ moved on from the checkpoint's
    assert not torch.equal(end["state_dict"]["net.layers.0.weight"], trained["net.layers.0.weight"])


def test_init_from_other_number_of_classes_skips_the_head_only_when_asked(tmp_path: Path) -> None:
    ckpt, trained = _pretrained_stn(tmp_path)
    torch.manual_seed(1)
    three = SelfTuningModule(StnMLP(in_features=64, hidden=(32,), num_classes=3), plot_schedule=False)
    with pytest.raises(
        CheckpointMismatchError, match=r"net\.layers\.1\.weight: checkpoint \(10, 32\) vs model \(3, 32\)"
    ):
        load_weights(three, ckpt)
    head_before = three.net.layers[1].weight.detach().clone()
    skipped = load_weights(three, ckpt, strict_shapes=False)
    assert "net.layers.1.weight" in skipped and "net.layers.0.weight" not in skipped
    torch.testing.assert_close(three.net.layers[0].weight.detach(), trained["net.layers.0.weight"], atol=0, rtol=0)
    torch.testing.assert_close(three.space.unconstrained.detach(), trained["space.unconstrained"], atol=0, rtol=0)
    assert torch.equal(three.net.layers[1].weight.detach(), head_before)  # the head keeps its fresh initialisation
    assert all(int(getattr(three, name)) == 0 for name in COUNTERS)


def test_phn_init_from_needs_the_built_architecture(tmp_path: Path) -> None:
    """PHN builds its layers from the DataModule's ``input_dim`` in ``setup``: ``init_from`` (which runs before
    ``setup``) needs ``in_dim`` given, and an unbuilt module gets a clear error instead of a silent no-op."""
    from datamodules.tabular import AdultDataModule
    from hyperlit.pareto import ParetoHyperNetModule
    from tests.datamodules.tabular_fakedata import write_fake_adult

    write_fake_adult(tmp_path, n_train=160, n_test=60)
    torch.manual_seed(0)
    trained = ParetoHyperNetModule(solver="ls", optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(trained, datamodule=AdultDataModule(data_dir=str(tmp_path), verify_row_counts=False, batch_size=32))
    ckpt = tmp_path / "phn.ckpt"
    trainer.save_checkpoint(ckpt)

    with pytest.raises(CheckpointMismatchError, match=r"shares no weights with ParetoHyperNetModule.*in_dim"):
        load_weights(ParetoHyperNetModule(solver="ls", optimizer=lambda p: torch.optim.Adam(p, lr=1e-3)), ckpt)
    torch.manual_seed(1)
    fresh = ParetoHyperNetModule(solver="ls", in_dim=trained.in_dim)
    assert not torch.equal(fresh.hnet.head.weight, trained.hnet.head.weight)
    # weights copied; the counters are skipped on purpose (a fine-tuning run starts them afresh)
    assert load_weights(fresh, ckpt) == ["epo_fallbacks", "epo_solves", "ray_step"]
    assert int(trained.ray_step) > 0
    assert int(fresh.ray_step) == 0
    for (name, a), (_, b) in zip(trained.named_parameters(), fresh.named_parameters()):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=name)
