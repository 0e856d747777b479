"""``predict_task``: continual predictions at the batch's task, at a fixed task id, or with the task inferred."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from hyperlit.continual import EWCContinualModule, HyperContinualModule
from hyperlit.continual.metrics import entropy_task_inference
from tests.continual.conftest import TinyTasks, adam, optimizers

Trainers = Callable[..., pl.Trainer]


def _hnet(**overrides: object) -> HyperContinualModule:
    kwargs: dict[str, object] = dict(num_tasks=3, input_dim=4, output_dim=2, hidden=(8,), hnet_hidden=(8,), emb_dim=2)
    kwargs.update(optimizers(1e-2))
    kwargs.update(overrides)
    return HyperContinualModule(**kwargs)  # type: ignore[arg-type]


def _ewc(**overrides: object) -> EWCContinualModule:
    return EWCContinualModule(num_tasks=3, input_dim=4, output_dim=2, hidden=(8,), optimizer=adam(1e-2), **overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize("build", [_hnet, _ewc], ids=["hypernetwork", "ewc"])
def test_predict_at_a_task_id_and_with_inferred_tasks(build, make_trainer: Trainers) -> None:
    dm = TinyTasks(num_tasks=3)
    model = build()
    trainer = make_trainer(max_epochs=dm.num_schedule_epochs, reload_dataloaders_every_n_epochs=1)
    trainer.fit(model, datamodule=dm)
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(x), batch_size=5)  # inputs only: no labels, no task ids
    model.eval()
    with torch.no_grad():
        every = model.task_outputs(x, torch.arange(3))  # (K, B, C)

    model.predict_task = 1
    fixed = torch.cat(make_trainer().predict(model, loader))
    torch.testing.assert_close(fixed, every[1])

    model.predict_task = "infer"
    out = make_trainer().predict(model, loader)
    task = torch.cat([o["task"] for o in out])
    output = torch.cat([o["output"] for o in out])
    expected_task, _ = entropy_task_inference(every)
    assert torch.equal(task, expected_task)
    torch.testing.assert_close(output, every[expected_task, torch.arange(10)])

    model.predict_task = "batch"  # the batch's own id: (x, y, task)
    tagged = make_trainer().predict(model, DataLoader([(x, torch.zeros(10, dtype=torch.long), 2)], batch_size=None))
    torch.testing.assert_close(tagged[0], every[2])


def test_infer_chooses_among_trained_tasks_only(make_trainer: Trainers) -> None:
    dm = TinyTasks(num_tasks=3, steps_per_task=2)
    model = _hnet(predict_task="infer")
    trainer = make_trainer(max_epochs=1, reload_dataloaders_every_n_epochs=1)  # only task 0 trained
    trainer.fit(model, datamodule=dm)
    out = make_trainer().predict(model, DataLoader(TensorDataset(torch.randn(6, 4)), batch_size=6))
    assert out[0]["task"].tolist() == [0] * 6


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (3, r"predict_task must be 'batch', 'infer' or a task id in 0\.\.2, got 3"),
        ("first", r"predict_task must be 'batch', 'infer' or a task id in 0\.\.2, got 'first'"),
        (True, r"predict_task must be 'batch', 'infer' or a task id in 0\.\.2, got True"),
    ],
)
def test_bad_predict_task_is_refused(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _hnet(predict_task=value)
    with pytest.raises(ValueError, match="classification tasks only"):
        _hnet(predict_task="infer", task_type="regression", output_dim=1)


def test_infer_before_any_training_is_a_clear_error(make_trainer: Trainers) -> None:
    with pytest.raises(RuntimeError, match="no task is trained yet"):
        make_trainer().predict(_hnet(predict_task="infer"), DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=4))
