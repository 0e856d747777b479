"""Accuracy-matrix metrics, the TaskScores metric, entropy task inference, EWC math, the accuracy-matrix callback
and the EWC module."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torchmetrics.functional.classification import multiclass_accuracy

from datamodules import PermutedMNISTDataModule
from datamodules.task_sequence import EvalShardSampler
from hyperlit.callbacks.accuracy_matrix import AccuracyMatrixCallback
from hyperlit.continual import EWCContinualModule, TaskScores, hypernetwork_fine_tuning
from hyperlit.continual.ewc import ewc_penalty, per_example_grad_sq
from hyperlit.continual.metrics import (
    backward_transfer,
    compression_ratio,
    during_scores,
    entropy_task_inference,
    final_scores,
    forgetting,
    format_matrix,
    summarize,
    task_score_sums,
    task_scores,
    weight_drift,
)

Trainers = Callable[..., pl.Trainer]

NAN = math.nan
R = torch.tensor([[0.9, NAN, NAN], [0.8, 0.95, NAN], [0.7, 0.9, 0.99]])


def test_accuracy_matrix_metrics_by_hand() -> None:
    torch.testing.assert_close(during_scores(R), torch.tensor([0.9, 0.95, 0.99], dtype=torch.float64))
    torch.testing.assert_close(final_scores(R), torch.tensor([0.7, 0.9, 0.99], dtype=torch.float64))
    assert backward_transfer(R) == pytest.approx(((0.7 - 0.9) + (0.9 - 0.95)) / 2)
    assert forgetting(R) == pytest.approx(((0.9 - 0.7) + (0.95 - 0.9)) / 2)
    s = summarize(R[:2, :2].clone().index_fill_(0, torch.tensor([1]), NAN))  # only task 0 trained
    assert s["num_tasks"] == 1 and s["bwt"] == 0.0
    mse = torch.tensor([[0.1, NAN], [0.5, 0.2]])  # regression: lower is better, forgetting = increase
    assert forgetting(mse, higher_is_better=False) == pytest.approx(0.4)
    table = format_matrix(R)
    assert "90.00" in table and "-" in table.splitlines()[2]
    with pytest.raises(ValueError, match="square"):
        summarize(torch.zeros(2, 3))


def test_entropy_task_inference_vectorized() -> None:
    logits = torch.zeros(3, 4, 5)  # K=3 tasks, B=4 examples, C=5 classes; uniform = maximal entropy
    logits[1, 0, 2] = 10.0  # example 0: task 1 confident on class 2
    logits[2, 1, 4] = 10.0  # example 1: task 2 confident on class 4
    logits[0, 2, 0] = 5.0
    logits[2, 2, 3] = 9.0  # example 2: task 2 more confident than task 0
    logits[0, 3, 1] = 3.0
    task, pred = entropy_task_inference(logits)
    assert task.tolist()[:3] == [1, 2, 2] and pred.tolist()[:3] == [2, 4, 3]
    assert task[3] == 0 and pred[3] == 1
    with pytest.raises(ValueError, match="K tasks"):
        entropy_task_inference(torch.zeros(4, 5))


def test_task_scores_metric_accuracy_inference_and_nan() -> None:
    """Per-task accuracy equals torchmetrics' micro accuracy on that task's examples; tasks without examples are NaN;
    two metrics over halves of the batches, merged (what the DDP sum does), equal one over all of them."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for task in (0, 0, 2, 2, 2):
        candidates = torch.randn(3, 7, 4, generator=g)
        candidates[task] *= 3  # the true task is more confident: inference is right more often than not
        batches.append((task, candidates, torch.randint(0, 4, (7,), generator=g)))
    whole, halves = TaskScores(3), [TaskScores(3), TaskScores(3)]
    for i, (task, cand, y) in enumerate(batches):
        whole.update(cand[task], y, task, candidates=cand)
        halves[i % 2].update(cand[task], y, task, candidates=cand)
    scores = whole.compute()
    assert scores.shape == (3, 3) and bool(torch.isnan(scores[:, 1]).all())
    for task in (0, 2):
        given = torch.cat([c[task] for t, c, _ in batches if t == task])
        y = torch.cat([y for t, _, y in batches if t == task])
        expected = multiclass_accuracy(given, y, num_classes=4, average="micro")
        assert float(scores[0, task]) == pytest.approx(float(expected))
        inferred, pred = entropy_task_inference(torch.cat([c for t, c, _ in batches if t == task], dim=1))
        # correct with the task inferred: the task and the class within it both right
        assert float(scores[1, task]) == pytest.approx(float(((pred == y) & (inferred == task)).float().mean()))
        assert float(scores[2, task]) == pytest.approx(float((inferred == task).float().mean()))
    halves[0].merge_state(halves[1])
    torch.testing.assert_close(halves[0].compute(), scores, equal_nan=True)
    whole.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert bool(torch.isnan(whole.compute()).all())
    with pytest.raises(KeyError, match="unknown task id 3"):
        whole.update(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 3)


def test_eval_shards_cover_the_split_once() -> None:
    """Under DDP each rank evaluates a strided shard (no padding), so the summed TaskScores are the whole split's."""
    data = list(range(11))
    shards = [list(EvalShardSampler(data, num_replicas=3, rank=r)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert [len(EvalShardSampler(data, 3, r)) for r in range(3)] == [4, 4, 3]


def test_task_scores_regression_is_the_mse() -> None:
    pred, y = torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([[1.0], [0.0], [1.0]])
    sums = task_score_sums(pred, y, "regression")
    assert sums.tolist() == [3.0, 13.0, 0.0, 0.0]
    metric = TaskScores(2, "regression")
    metric.update(pred[:2], y[:2], 1)
    metric.update(pred[2:], y[2:], 1)
    assert float(metric.compute()[0, 1]) == pytest.approx(13 / 3)
    torch.testing.assert_close(
        task_scores(torch.stack([sums, torch.zeros(4)], 1))[0], torch.tensor([13 / 3, math.nan]), equal_nan=True
    )
    with pytest.raises(ValueError, match="num_tasks"):
        task_scores(torch.zeros(3, 2))


def test_drift_and_compression() -> None:
    a, b = torch.zeros(2, 3), torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(weight_drift(b, a), torch.tensor([5.0, 1.0]))
    c = compression_ratio(hnet_params=900, embedding_params=100, target_params=2000)
    assert c == {"compression_ratio": 0.5, "compression_ratio_no_emb": 0.45}


def test_per_example_fisher_matches_a_loop_and_penalty() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    got = per_example_grad_sq(net, dict(net.named_parameters()), torch.nn.functional.cross_entropy, x, y)
    expected = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for i in range(6):
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in net.named_parameters():
            expected[n] += p.grad.pow(2) / 6
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-7)
    params = {"w": torch.tensor([1.0, 2.0])}
    assert float(ewc_penalty(params, {"w": torch.zeros(2)}, {"w": torch.tensor([1.0, 0.5])})) == pytest.approx(1.5)
    with pytest.raises(KeyError, match="no anchor"):
        ewc_penalty(params, {}, {})


def _permuted(data_dir, steps: int = 40) -> PermutedMNISTDataModule:
    return PermutedMNISTDataModule(
        data_dir=str(data_dir), num_tasks=2, pad_to_32=False, val_size=100, steps_per_task=steps, batch_size=32
    )


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_ewc_module_anchor_fisher_and_callback_png(make_trainer: Trainers, fake_mnist_dir, tmp_path) -> None:
    pl.seed_everything(0)
    m = EWCContinualModule(num_tasks=2, input_dim=784, output_dim=10, hidden=(32,), ewc_lambda=50.0)
    cb = AccuracyMatrixCallback()
    logger = CSVLogger(tmp_path, name="csv")
    records = _Records()
    lightning_logger = logging.getLogger("lightning.pytorch")  # Lightning's own logger does not propagate
    lightning_logger.addHandler(records)
    try:
        trainer = make_trainer(max_epochs=2, callbacks=[cb], logger=logger)
        trainer.fit(m, _permuted(fake_mnist_dir))
    finally:
        lightning_logger.removeHandler(records)
    assert int(m.fisher_batches) == 0  # the Fisher is estimated for every task but the last
    fisher = torch.cat([f.flatten() for f in m.fisher.as_dict().values()])
    assert bool((fisher >= 0).all()) and float(fisher.sum()) > 0
    assert not torch.equal(m.anchor.as_dict()["net.0.weight"], m.net.net[0].weight)  # θ* = end of task 0
    rows, cols = torch.tril_indices(2, 2)
    assert bool((m.acc_matrix[rows, cols] > 0.5).all())
    # the callback wrote a table and one heatmap per task plus the final one (CSV logger: PNG files)
    assert cb.last_table is not None and "final mean" in cb.last_table
    assert any(msg.startswith("[accuracy matrix, final]") for msg in records.messages)  # rank_zero_info, not print
    # the logged values are the TaskScores of the last validation: row 1 of R
    logged = trainer.callback_metrics
    for j in range(2):
        assert float(logged[f"val/acc_task_{j}"]) == pytest.approx(float(m.acc_matrix[1, j]))
    assert float(logged["val/acc_mean_seen"]) == pytest.approx(float(m.acc_matrix[1].mean()))
    assert float(logged["cl/final_mean"]) == pytest.approx(m.cl_summary()["final_mean"])
    names = sorted(p.name for p in cb.figure_paths)
    assert names == [
        "accuracy_matrix_after_task_0.png",
        "accuracy_matrix_after_task_1.png",
        "accuracy_matrix_final.png",
    ]
    assert all(p.stat().st_size > 1000 for p in cb.figure_paths)


def test_callback_uses_tensorboard_add_figure(make_trainer: Trainers, fake_mnist_dir, tmp_path, monkeypatch) -> None:
    pl.seed_everything(0)
    m = hypernetwork_fine_tuning(
        num_tasks=2, input_dim=784, output_dim=10, hidden=(16,), hnet_hidden=(8,), chunk_size=800
    )
    assert m.hparams.beta == 0.0
    logger = TensorBoardLogger(tmp_path, name="tb")
    calls = []
    monkeypatch.setattr(logger.experiment, "add_figure", lambda tag, fig, global_step: calls.append(tag))
    cb = AccuracyMatrixCallback(every_task=False)
    make_trainer(max_epochs=2, callbacks=[cb], logger=logger).fit(m, _permuted(fake_mnist_dir, steps=5))
    assert calls == ["continual/accuracy_matrix_final"] and cb.figure_paths == []
