"""The continual-learning baselines check a checkpoint before loading it: resuming online EWC or plain
fine-tuning (``EWCContinualModule(ewc_lambda=0)``) from another module's checkpoint, or from one of another
architecture, raises :class:`~hyperlit.checkpoint.CheckpointMismatchError` naming the module or the tensors,
while their own checkpoints resume; the hypernetwork fine-tuning baseline (``HyperContinualModule(beta=0)``)
refuses an EWC checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from datamodules import Regression1DDataModule
from hyperlit.checkpoint import CheckpointMismatchError
from hyperlit.continual import EWCContinualModule, HyperContinualModule, hypernetwork_fine_tuning
from tests.continual.conftest import adam

Trainers = Callable[..., pl.Trainer]


def _dm() -> Regression1DDataModule:
    return Regression1DDataModule(num_tasks=2, num_train=16, num_test=8, batch_size=4, steps_per_task=3)


def _ewc(hidden: tuple[int, ...] = (8,), ewc_lambda: float = 10.0) -> EWCContinualModule:
    torch.manual_seed(0)
    return EWCContinualModule(
        num_tasks=2,
        input_dim=1,
        output_dim=1,
        hidden=hidden,
        task_type="regression",
        ewc_lambda=ewc_lambda,
        fisher_every=1,
        optimizer=adam(0.01),
        infer_task=False,
    )


def _hyper() -> HyperContinualModule:
    torch.manual_seed(0)
    return HyperContinualModule(
        num_tasks=2, input_dim=1, output_dim=1, hidden=(8,), task_type="regression", hnet_hidden=(8,), emb_dim=2
    )


def _saved(make_trainer: Trainers, tmp_path: Path, module: object, name: str, max_epochs: int = 1) -> Path:
    trainer = make_trainer(max_epochs=max_epochs)
    trainer.fit(module, datamodule=_dm())  # type: ignore[arg-type]
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return path


def _resume(make_trainer: Trainers, module: object, ckpt: Path) -> None:
    make_trainer(max_epochs=2).fit(module, datamodule=_dm(), ckpt_path=ckpt)  # type: ignore[arg-type]


@pytest.mark.parametrize("ewc_lambda", [10.0, 0.0], ids=["ewc", "fine_tuning"])
def test_ewc_and_fine_tuning_refuse_a_hypernetwork_checkpoint(
    make_trainer: Trainers, tmp_path: Path, ewc_lambda: float
) -> None:
    ckpt = _saved(make_trainer, tmp_path, _hyper(), "hyper")
    with pytest.raises(
        CheckpointMismatchError, match=r"written by HyperContinualModule, not EWCContinualModule[\s\S]*--init_from"
    ):
        _resume(make_trainer, _ewc(ewc_lambda=ewc_lambda), ckpt)


def test_ewc_refuses_another_architecture_and_resumes_its_own(make_trainer: Trainers, tmp_path: Path) -> None:
    ckpt = _saved(make_trainer, tmp_path, _ewc(hidden=(8,)), "ewc8")
    with pytest.raises(CheckpointMismatchError, match=r"net\.net\.0\.weight: checkpoint \(8, 1\) vs model \(16, 1\)"):
        _resume(make_trainer, _ewc(hidden=(16,)), ckpt)
    # its own checkpoint (end of task 0) resumes: task 1 is trained from the saved weights, anchor and Fisher
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    resumed = _ewc(hidden=(8,))
    _resume(make_trainer, resumed, ckpt)
    assert int(resumed.current_task) == 1
    assert torch.isfinite(resumed.acc_matrix[1]).all()
    fisher = torch.cat([f.flatten() for f in resumed.fisher.as_dict().values()])
    assert float(fisher.sum()) > 0  # task 0's Fisher was folded in at the task boundary after resuming
    assert not torch.equal(saved["net.net.0.weight"], resumed.net.net[0].weight.detach())


def test_hypernetwork_fine_tuning_refuses_an_ewc_checkpoint(make_trainer: Trainers, tmp_path: Path) -> None:
    ckpt = _saved(make_trainer, tmp_path, _ewc(), "ewc")
    torch.manual_seed(0)
    model = hypernetwork_fine_tuning(
        num_tasks=2, input_dim=1, output_dim=1, hidden=(8,), task_type="regression", hnet_hidden=(8,), emb_dim=2
    )
    assert model.hparams["beta"] == 0.0
    with pytest.raises(CheckpointMismatchError, match=r"written by EWCContinualModule, not HyperContinualModule"):
        _resume(make_trainer, model, ckpt)
