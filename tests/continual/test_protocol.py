"""The continual task protocol (plain DataModules are refused), the non-finite-loss policy and the test table."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hyperlit.continual import EWCContinualModule, HyperContinualModule
from tests.continual.conftest import TinyTasks, adam, optimizers

Trainers = Callable[..., pl.Trainer]


def _module(**overrides: object) -> HyperContinualModule:
    kwargs: dict[str, object] = dict(num_tasks=2, input_dim=4, output_dim=2, hidden=(8,), hnet_hidden=(8,), emb_dim=2)
    kwargs.update(optimizers(1e-2))
    kwargs.update(overrides)
    return HyperContinualModule(**kwargs)  # type: ignore[arg-type]


class Plain(pl.LightningDataModule):
    """An ordinary DataModule: (x, y) batches, no task ids, no task schedule."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))), batch_size=8)


class Untagged(Plain):
    """Declares a task sequence but serves (x, y) batches."""

    num_tasks = 2
    num_schedule_epochs = 2


class AllTasksInOneEpoch(Plain):
    """Task-tagged batches, but every task inside one epoch (no task schedule)."""

    num_tasks = 2
    num_schedule_epochs = 1

    def train_dataloader(self) -> DataLoader:
        batches = [{"x": torch.randn(4, 4), "y": torch.randint(0, 2, (4,)), "task": t} for t in (0, 0, 1, 1)]
        return DataLoader(batches, batch_size=None)


def test_plain_datamodule_is_refused_at_fit_start(make_trainer: Trainers) -> None:
    m = _module()
    with pytest.raises(
        ValueError,
        match=r"HyperContinualModule trains a task sequence, but fit got a Plain without `num_tasks` and "
        r"`num_schedule_epochs`\. Give it a continual DataModule",
    ):
        make_trainer().fit(m, Plain())
    assert int(m.total_steps) == 0  # refused before any step
    with pytest.raises(ValueError, match="but fit got no DataModule"):
        make_trainer().fit(m, train_dataloaders=Plain().train_dataloader())


def test_batches_without_task_ids_are_refused_at_the_first_step(make_trainer: Trainers) -> None:
    m = _module()
    with pytest.raises(ValueError, match=r"a continual batch is \(x, y, task\) .*; got a list of 2 items"):
        make_trainer().fit(m, Untagged())
    assert int(m.total_steps) == 0
    with pytest.raises(ValueError, match=r"this one has keys \['x', 'y'\] and lacks \['task'\]"):
        m._unpack({"x": torch.zeros(1, 4), "y": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"got a Tensor: serve the task id of every batch"):
        m._unpack(torch.zeros(2, 4))


def test_a_task_starting_inside_an_epoch_is_refused(make_trainer: Trainers) -> None:
    m = _module()
    with pytest.raises(
        ValueError, match=r"task 1 started at batch 2 of epoch 0 \(after task 0\): a continual DataModule"
    ):
        make_trainer().fit(m, AllTasksInOneEpoch())
    assert torch.isnan(m.acc_matrix).all()  # nothing half-filled


def test_nan_inputs_raise_naming_step_and_task(make_trainer: Trainers) -> None:
    m = _module()
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite loss nan at training step 4 \(batch 0 of task 1, epoch 1\): the batch's input "
        r"features contain NaN/inf; pass nan_policy='skip'",
    ):
        make_trainer(max_epochs=2).fit(m, TinyTasks(steps_per_task=4, nan_task=1))
    assert int(m.total_steps) == 4 and torch.isfinite(m.acc_matrix[0, 0])
    diverged = _module()
    with torch.no_grad():
        diverged.hnet.head.bias.fill_(math.inf)
    with pytest.raises(
        FloatingPointError, match=r"at training step 0 \(batch 0 of task 0, epoch 0\): the inputs are finite"
    ):
        make_trainer(max_epochs=2).fit(diverged, TinyTasks(steps_per_task=4))
    with pytest.raises(ValueError, match="nan_policy must be 'raise' or 'skip'"):
        _module(nan_policy="ignore")


def test_nan_policy_skip_skips_the_steps_and_keeps_state_finite(make_trainer: Trainers) -> None:
    pl.seed_everything(0)
    target = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    m = _module(target=target, nan_policy="skip", beta=0.01)
    with pytest.warns(
        UserWarning, match=r"non-finite loss nan at training step 4 .* step skipped \(nan_policy='skip'\)"
    ):
        make_trainer(max_epochs=2).fit(m, TinyTasks(steps_per_task=4, nan_task=1))
    assert int(m.skipped_steps) == 4 and int(m.total_steps) == 8  # every step of task 1, and training went on
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
    # no update in task 1: task 0's generated weights are still the targets stored when task 1 started
    torch.testing.assert_close(m.generated_weights(torch.tensor([0])), m.reg_targets, rtol=0, atol=0)
    stats = m.task_norm_stats
    assert bool(torch.isfinite(stats.get_buffer("1__running_mean")).all())  # the NaN batches left no statistics
    assert stats.get_buffer("1__num_batches_tracked").tolist() == [4, 0]


def test_test_results_are_per_dataloader(make_trainer: Trainers) -> None:
    """Lightning prints one column per test loader: task j's score only in column j, the means once (the last)."""
    pl.seed_everything(0)
    m = _module(num_tasks=3)
    dm = TinyTasks(num_tasks=3, steps_per_task=3, num_eval=10, eval_batch_size=4)
    trainer = make_trainer(max_epochs=3)
    trainer.fit(m, dm)
    results = trainer.test(m, dm, verbose=False)
    assert len(results) == 3 and len({frozenset(r.items()) for r in results}) == 3
    means = {"test/acc_mean", "test/acc_inferred_mean", "test/task_inference_acc"}
    for j, res in enumerate(results):
        assert {k for k in res if "_task_" in k} == {f"test/acc_task_{j}"}
        assert res[f"test/acc_task_{j}"] == pytest.approx(float(m.test_scores[0, j]))
        assert bool(means & res.keys()) == (j == 2)
    assert results[2]["test/acc_mean"] == pytest.approx(float(m.test_scores[0].mean()))
    assert results[2]["test/task_inference_acc"] == pytest.approx(float(m.test_scores[2].mean()))

    partial = _module(num_tasks=3)  # one task trained: only its column and the means
    trainer = make_trainer(max_epochs=1)
    trainer.fit(partial, dm)
    results = trainer.test(partial, dm, verbose=False)
    assert [sorted(r) for r in results[:2]] == [["test/acc_task_0"], []]
    assert results[2]["test/acc_mean"] == pytest.approx(results[0]["test/acc_task_0"])


@pytest.mark.distributed
@pytest.mark.slow  # ~55 s; continual DDP = one process is also checked by tests/distributed/test_ddp_continual.py
def test_test_results_under_ddp_match_one_process(make_trainer: Trainers) -> None:
    """Two ranks with uneven shards (5 and 4 of 9 examples per task: 2 and 1 batches) log the one-process values."""
    pl.seed_everything(0)
    adam = functools.partial(torch.optim.Adam, lr=1e-2)  # picklable: ddp_spawn pickles the module
    m = _module(num_tasks=2, hnet_optimizer=adam, emb_optimizer=adam)
    dm = TinyTasks(num_tasks=2, steps_per_task=3, num_eval=9, eval_batch_size=4)
    make_trainer(max_epochs=2).fit(m, dm)
    for stage in ("test", "validate"):
        single = getattr(make_trainer(), stage)(m, dm, verbose=False)
        ddp = getattr(make_trainer(devices=2, strategy="ddp_spawn"), stage)(m, dm, verbose=False)
        assert [sorted(r) for r in ddp] == [sorted(r) for r in single] and len(single[0]) == 1
        for a, b in zip(ddp, single):
            assert a == pytest.approx(b, abs=1e-6)


@pytest.mark.parametrize("kind", ["hypernetwork", "ewc"])
def test_progress_bar_shows_loss_task_and_mean_accuracy(kind: str, make_trainer: Trainers) -> None:
    pl.seed_everything(0)
    if kind == "hypernetwork":
        m: HyperContinualModule | EWCContinualModule = _module()
    else:
        m = EWCContinualModule(
            num_tasks=2, input_dim=4, output_dim=2, hidden=(8,), fisher_every=1, optimizer=adam(1e-2)
        )
    trainer = make_trainer(max_epochs=2, log_every_n_steps=1)
    trainer.fit(m, TinyTasks(steps_per_task=3))
    bar = trainer.progress_bar_metrics
    assert set(bar) == {"train/loss", "train/task", "val/acc_mean_seen"}, bar
    assert bar["train/task"] == 1.0  # the task being trained
    assert bar["val/acc_mean_seen"] == pytest.approx(float(m.acc_matrix[1, :2].mean()))
    assert bar["train/loss"] == pytest.approx(float(trainer.callback_metrics["train/loss"]))
    assert "val/acc_task_0" in trainer.callback_metrics and "train/loss_task" in trainer.callback_metrics


def test_validate_results_are_per_dataloader(make_trainer: Trainers) -> None:
    """A standalone ``validate`` logs like ``test``: task j's accuracy only in column j (the values of row T−1 of
    the accuracy matrix that fit's last validation wrote), the means once, in the last column; R is not changed."""
    pl.seed_everything(0)
    m = _module(num_tasks=3)
    dm = TinyTasks(num_tasks=3, steps_per_task=3, num_eval=10, eval_batch_size=4)
    trainer = make_trainer(max_epochs=3)
    trainer.fit(m, dm)
    matrix = m.acc_matrix.clone()
    results = trainer.validate(m, dm, verbose=False)
    assert len(results) == 3 and len({frozenset(r.items()) for r in results}) == 3
    means = {"val/acc_mean_seen", "val/acc_inferred_mean_seen", "val/task_inference_acc"}
    for j, res in enumerate(results):
        assert {k for k in res if "_task_" in k} == {f"val/acc_task_{j}"}
        assert res[f"val/acc_task_{j}"] == pytest.approx(float(matrix[2, j]))
        assert bool(means & res.keys()) == (j == 2)
    assert len({r[f"val/acc_task_{j}"] for j, r in enumerate(results)}) > 1  # not one number repeated
    assert results[2]["val/acc_mean_seen"] == pytest.approx(float(matrix[2].mean()))
    assert results[2]["val/task_inference_acc"] == pytest.approx(float(m.task_inference_matrix[2].mean()))
    torch.testing.assert_close(m.acc_matrix, matrix, rtol=0, atol=0, equal_nan=True)
    assert len(trainer.test(m, dm, verbose=False)) == 3  # evaluation after validate still works

    partial = _module(num_tasks=3)  # one task trained: only its column and the means
    trainer = make_trainer(max_epochs=1)
    trainer.fit(partial, dm)
    results = trainer.validate(partial, dm, verbose=False)
    assert [sorted(r) for r in results[:2]] == [["val/acc_task_0"], []]
    assert results[2]["val/acc_mean_seen"] == pytest.approx(results[0]["val/acc_task_0"])
    assert results[0]["val/acc_task_0"] == pytest.approx(float(partial.acc_matrix[0, 0]))
