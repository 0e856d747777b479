"""Resuming from a checkpoint taken in the middle of a task gives exactly the uninterrupted run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import PermutedMNISTDataModule
from hyperlit.checkpoint import CheckpointMismatchError
from hyperlit.continual import HyperContinualModule
from tests.continual.conftest import optimizers

Trainers = Callable[..., pl.Trainer]
STEPS = 12  # per task; checkpoints after batches 18 (middle of the 2nd task) and 30 (middle of the 3rd)


def _setup(data_dir: Path, **overrides: object) -> tuple[HyperContinualModule, PermutedMNISTDataModule]:
    pl.seed_everything(3)
    dm = PermutedMNISTDataModule(
        data_dir=str(data_dir), num_tasks=3, pad_to_32=False, val_size=100, steps_per_task=STEPS, batch_size=16
    )
    # a random subset of previous tasks (generator state), stored targets (a growing buffer) and the Adam
    # look-ahead (optimizer state) all have to survive the checkpoint
    model = HyperContinualModule(
        num_tasks=3,
        input_dim=784,
        output_dim=10,
        hidden=(20,),
        hnet_hidden=(16,),
        chunk_size=500,
        hnet_out_init_std=0.02,
        beta=0.05,
        reg_num_tasks=1,
        lookahead="adam",
        **{**optimizers(3e-3), **overrides},  # type: ignore[arg-type]
    )
    return model, dm


@pytest.mark.parametrize("reg_method", ["materialize", "gram"])  # stored targets | the θ* snapshot
def test_resume_mid_task_reproduces_accuracy_matrix(
    make_trainer: Trainers, fake_mnist_dir, tmp_path, reg_method: str
) -> None:
    model, dm = _setup(fake_mnist_dir, reg_method=reg_method)
    # two optimizers (θ, embeddings): global_step counts 2 per batch, so 12 steps = 6 batches
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=12, save_top_k=-1, filename="{step}")
    make_trainer(max_epochs=3, callbacks=[ckpt], enable_checkpointing=True).fit(model, dm)
    reference = model.acc_matrix.clone()
    assert not torch.isnan(reference.tril()).any() and int(model.total_steps) == 3 * STEPS
    for batches, task in ((18, 1), (30, 2)):
        path = tmp_path / "ckpt" / f"step={2 * batches}.ckpt"
        state = torch.load(path, weights_only=False)
        assert int(state["state_dict"]["current_task"]) == task and int(state["state_dict"]["step_in_task"]) == 6
        assert "continual" not in state and state["hyperlit"]["module"] == "HyperContinualModule"
        resumed, dm2 = _setup(fake_mnist_dir, reg_method=reg_method)
        with torch.no_grad():  # a different initialisation: everything must come from the checkpoint
            for p in resumed.parameters():
                p.add_(1.0)
        resumed.generator("reg").manual_seed(123)  # and the subset generator's state too
        make_trainer(max_epochs=3, default_root_dir=tmp_path / f"resume{batches}").fit(
            resumed, dm2, ckpt_path=str(path)
        )
        torch.testing.assert_close(resumed.acc_matrix, reference, rtol=0, atol=0, equal_nan=True)
        for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        assert torch.equal(resumed.generator("reg").get_state(), model.generator("reg").get_state())


def test_load_from_checkpoint_restores_growing_targets(make_trainer: Trainers, fake_mnist_dir, tmp_path) -> None:
    model, dm = _setup(fake_mnist_dir)
    trainer = make_trainer(max_epochs=2)
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "two_tasks.ckpt")
    restored = HyperContinualModule.load_from_checkpoint(tmp_path / "two_tasks.ckpt")
    assert restored.reg_targets.shape == model.reg_targets.shape == (1, model.hnet.num_target_params)
    assert restored.task == 1
    torch.testing.assert_close(restored.acc_matrix, model.acc_matrix, equal_nan=True)
    assert torch.equal(restored.generator("reg").get_state(), model.generator("reg").get_state())


def test_another_configuration_is_refused(make_trainer: Trainers, fake_mnist_dir, tmp_path) -> None:
    model, dm = _setup(fake_mnist_dir)
    trainer = make_trainer(max_epochs=1)
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "one_task.ckpt")
    other, dm2 = _setup(fake_mnist_dir, heads="multihead")
    with pytest.raises(CheckpointMismatchError, match="heads: checkpoint 'generated' vs model 'multihead'"):
        make_trainer(max_epochs=3).fit(other, dm2, ckpt_path=str(tmp_path / "one_task.ckpt"))


@pytest.mark.parametrize("bad", [{"num_tasks": 4}])
def test_datamodule_mismatch_is_reported(make_trainer: Trainers, fake_mnist_dir, bad) -> None:
    model, _ = _setup(fake_mnist_dir)
    dm = PermutedMNISTDataModule(data_dir=str(fake_mnist_dir), pad_to_32=False, val_size=100, steps_per_task=2, **bad)
    with pytest.raises(ValueError, match="num_tasks=4"):
        make_trainer(max_epochs=4).fit(model, dm)
