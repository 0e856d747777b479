"""EWCContinualModule with a user network (a small CNN with BatchNorm) and its non-finite-step policy."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from hyperlit.checkpoint import CheckpointMismatchError
from hyperlit.continual import EWCContinualModule
from tests.continual.conftest import TinyTasks, adam
from tests.continual.test_target import small_cnn

Trainers = Callable[..., pl.Trainer]


def _ewc(**overrides: object) -> EWCContinualModule:
    kwargs: dict[str, object] = dict(
        num_tasks=2, input_dim=4, output_dim=2, hidden=(8,), ewc_lambda=10.0, fisher_every=1, optimizer=adam(1e-2)
    )
    kwargs.update(overrides)
    return EWCContinualModule(**kwargs)  # type: ignore[arg-type]


def _images() -> TinyTasks:
    return TinyTasks(num_tasks=2, steps_per_task=6, image=True)


def _fisher(m: EWCContinualModule) -> torch.Tensor:
    return torch.cat([f.flatten() for f in m.fisher.as_dict().values()])


def test_nan_inputs_raise_naming_step_and_task(make_trainer: Trainers) -> None:
    m = _ewc()
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite loss nan at training step 4 \(batch 0 of task 1, epoch 1\): the batch's input "
        r"features contain NaN/inf; pass nan_policy='skip'",
    ):
        make_trainer(max_epochs=2).fit(m, TinyTasks(steps_per_task=4, nan_task=1))
    assert int(m.total_steps) == 4 and torch.isfinite(m.acc_matrix[0, 0])
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())  # the NaN step changed nothing
    diverged = _ewc()
    with torch.no_grad():
        diverged.net.net[-1].bias.fill_(math.inf)
    with pytest.raises(
        FloatingPointError,
        match=r"at training step 0 \(batch 0 of task 0, epoch 0\): the inputs are finite \(diverging training\? "
        r"lower the learning rate or ewc_lambda\)",
    ):
        make_trainer(max_epochs=2).fit(diverged, TinyTasks(steps_per_task=4))
    with pytest.raises(ValueError, match="nan_policy must be 'raise' or 'skip'"):
        _ewc(nan_policy="ignore")


def test_nan_policy_skip_counts_the_steps_and_keeps_state_finite(make_trainer: Trainers, tmp_path: Path) -> None:
    pl.seed_everything(0)
    target = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    m = _ewc(target=target, nan_policy="skip")
    trainer = make_trainer(max_epochs=2)
    with pytest.warns(
        UserWarning, match=r"non-finite loss nan at training step 4 .* step skipped \(nan_policy='skip'\)"
    ):
        trainer.fit(m, TinyTasks(steps_per_task=4, nan_task=1))
    assert m.skipped_steps == 4 and int(m.total_steps) == 8  # every step of task 1, and training went on
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
    # no update in task 1: the weights are still the anchor θ* taken when task 1 started
    for name, p in m.net.named_parameters():
        torch.testing.assert_close(p.detach(), m.anchor.as_dict()[name], rtol=0, atol=0, msg=name)
    assert bool(torch.isfinite(_fisher(m)).all()) and float(_fisher(m).sum()) > 0  # task 0's Fisher
    stats = m.task_norm_stats
    assert bool(torch.isfinite(stats.get_buffer("1__running_mean")).all())  # the NaN batches left no statistics
    assert stats.get_buffer("1__num_batches_tracked").tolist() == [4, 0]
    trainer.save_checkpoint(tmp_path / "skipped.ckpt")
    loaded = EWCContinualModule.load_from_checkpoint(
        tmp_path / "skipped.ckpt", target=nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    )
    assert loaded.skipped_steps == 4 and loaded.nan_policy == "skip"


def test_cnn_with_batchnorm_trains_with_per_task_heads_and_statistics(make_trainer: Trainers) -> None:
    pl.seed_everything(0)
    cnn = small_cnn()
    template = {k: v.clone() for k, v in cnn.state_dict().items()}
    m = _ewc(target=cnn, heads="multihead", input_dim=1024)  # input_dim sizes only the built-in MLP: unused
    assert m.net is cnn and "target" not in m.hparams
    assert isinstance(cnn[-1], nn.Linear) and cnn[-1].out_features == 2 * 2  # widened: one 2-way head per task
    assert m.task_norm_stats.names == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    make_trainer(max_epochs=2).fit(m, _images())
    assert torch.isfinite(m.acc_matrix.tril()).all() and bool((m.acc_matrix[1] >= 0.75).all()), m.acc_matrix
    for k, v in cnn.state_dict().items():  # the network's own BatchNorm buffers are only a template
        if "running" in k or "num_batches" in k:
            assert torch.equal(v, template[k]), k
    assert not torch.equal(cnn[0].weight.detach(), template["0.weight"])  # its parameters are trained
    counts = m.task_norm_stats.get_buffer("1__num_batches_tracked")
    assert counts.tolist() == [6, 6]  # each task's statistics follow its own batches
    means = m.task_norm_stats.get_buffer("1__running_mean")
    assert not torch.equal(means[0], means[1])
    fisher = m.fisher.as_dict()  # task 0's Fisher covers every parameter, the BatchNorm affine ones included
    assert set(fisher) == {n for n, _ in cnn.named_parameters()} and float(fisher["1.weight"].sum()) > 0
    m.eval()  # evaluation uses each task's statistics: the batched call (all tasks) matches one task at a time
    xs, _ = _images().task_batch(1, "test", torch.arange(6))
    out = m.task_outputs(xs, torch.arange(2))
    assert out.shape == (2, 6, 2)
    for t in range(2):
        torch.testing.assert_close(out[t], m(xs, t), rtol=1e-5, atol=1e-6)


def test_cnn_checkpoint_round_trip_resumes(make_trainer: Trainers, tmp_path: Path) -> None:
    def fresh(channels: int = 4) -> EWCContinualModule:
        pl.seed_everything(0)
        return _ewc(target=small_cnn(channels=channels), heads="multihead")

    reference = fresh()
    make_trainer(max_epochs=2).fit(reference, _images())
    first = fresh()
    trainer = make_trainer(max_epochs=1)
    trainer.fit(first, _images())
    trainer.save_checkpoint(tmp_path / "task0.ckpt")

    resumed = fresh()
    with torch.no_grad():  # another starting point: everything must come from the checkpoint
        for p in resumed.parameters():
            p.add_(1.0)
    make_trainer(max_epochs=2).fit(resumed, _images(), ckpt_path=str(tmp_path / "task0.ckpt"))
    torch.testing.assert_close(resumed.acc_matrix, reference.acc_matrix, rtol=0, atol=0, equal_nan=True)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)

    loaded = EWCContinualModule.load_from_checkpoint(tmp_path / "task0.ckpt", target=small_cnn())
    assert loaded.net[-1].out_features == 4
    for name in ("task_norm_stats.1__running_mean", "net.0.weight", "fisher_running.0__weight"):
        torch.testing.assert_close(loaded.state_dict()[name], first.state_dict()[name], msg=name)
    with pytest.raises(CheckpointMismatchError, match=r"net\.0\.weight: checkpoint \(4, 1, 3, 3\) vs model \(8, 1"):
        make_trainer(max_epochs=2).fit(fresh(channels=8), _images(), ckpt_path=str(tmp_path / "task0.ckpt"))


def test_user_network_requirements_are_named() -> None:
    with pytest.raises(ValueError, match=r"heads='multihead' needs a target whose last layer with parameters is an "):
        _ewc(target=nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), heads="multihead")
    with pytest.raises(ValueError, match=r"Use heads='shared'"):
        _ewc(target=nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), heads="multihead")
    with pytest.raises(ValueError, match=r"the target's last layer '5' has 5 outputs; give it output_dim=2 outputs"):
        _ewc(target=small_cnn(outputs=5), heads="multihead")
    m = _ewc(target=small_cnn(outputs=3), heads="shared")  # one head: checked at the first forward
    with pytest.raises(ValueError, match=r"the target network returns \(4, 3\); heads='shared' needs 2 outputs"):
        m(torch.randn(4, 1, 8, 8), 0)
    with pytest.raises(ValueError, match=r"uninitialized .* before giving it to EWCContinualModule"):
        _ewc(target=nn.Sequential(nn.LazyLinear(2)))
    with pytest.raises(TypeError, match=r"target must be an nn\.Module"):
        _ewc(target="cnn")
    shared = _ewc(target=small_cnn(), heads="shared", infer_task=False)
    assert shared.net[-1].out_features == 2
    assert shared(torch.randn(3, 1, 8, 8), 1).shape == (3, 2)
