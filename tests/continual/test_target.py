"""HyperContinualModule with a user target network: a small CNN with BatchNorm on tiny image tasks."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyperlit.checkpoint import CheckpointMismatchError
from hyperlit.continual import HyperContinualModule
from tests.continual.conftest import TinyTasks, optimizers

Trainers = Callable[..., pl.Trainer]


def small_cnn(channels: int = 4, outputs: int = 2) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * 16, outputs),
    )


def _module(target: nn.Module, **overrides: object) -> HyperContinualModule:
    kwargs: dict[str, object] = dict(
        num_tasks=2, output_dim=2, hnet_hidden=(16,), emb_dim=4, hnet_out_init_std=0.05, beta=0.01
    )
    kwargs.update(optimizers(1e-2))
    kwargs.update(overrides)
    return HyperContinualModule(target=target, **kwargs)  # type: ignore[arg-type]


def _images() -> TinyTasks:
    return TinyTasks(num_tasks=2, steps_per_task=6, image=True)


def test_cnn_with_batchnorm_weights_are_generated_and_trained(make_trainer: Trainers) -> None:
    pl.seed_everything(0)
    cnn = small_cnn()
    template = {k: v.clone() for k, v in cnn.state_dict().items()}
    m = _module(cnn)
    assert "target" not in m.hparams
    # every parameter is generated, the BatchNorm affine weight and bias included; its statistics are kept per task
    assert set(m.hnet.shapes) == {n for n, _ in cnn.named_parameters()} and "1.weight" in m.hnet.shapes
    assert m.task_norm_stats.names == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert m.task_norm_stats.get_buffer("1__running_var").shape == (2, 4)
    assert not any(p.requires_grad for p in cnn.parameters())
    dm = _images()
    x, y = dm.task_batch(0, "train", torch.arange(8))
    F.cross_entropy(m(x, 0), y).backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.hnet.parameters())
    assert float(m.task_embeddings.grad[0].abs().sum()) > 0 and all(p.grad is None for p in cnn.parameters())
    m.zero_grad()

    make_trainer(max_epochs=2).fit(m, dm)  # the DataModule's input_dim (64) is not the unused MLP default
    assert torch.isfinite(m.acc_matrix.tril()).all() and bool((m.acc_matrix[1] >= 0.75).all()), m.acc_matrix
    for k, v in cnn.state_dict().items():  # the template network (its buffers too) never changes
        assert torch.equal(v, template[k]), k
    counts = m.task_norm_stats.get_buffer("1__num_batches_tracked")
    assert counts.tolist() == [7, 6]  # each task's statistics follow its own batches (the probe above and 6 steps)
    means = m.task_norm_stats.get_buffer("1__running_mean")
    assert not torch.equal(means[0], means[1]) and bool(means.abs().sum() > 0)
    m.eval()  # evaluation uses each task's statistics: the batched call (all tasks) matches one task at a time
    xs, _ = dm.task_batch(1, "test", torch.arange(6))
    out = m.task_outputs(xs, torch.arange(2))
    for t in range(2):
        torch.testing.assert_close(out[t], m(xs, t), rtol=1e-5, atol=1e-6)


def test_cnn_checkpoint_round_trip_resumes(make_trainer: Trainers, tmp_path) -> None:
    def fresh() -> HyperContinualModule:
        pl.seed_everything(0)
        return _module(small_cnn())

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

    loaded = HyperContinualModule.load_from_checkpoint(tmp_path / "task0.ckpt", target=small_cnn())
    torch.testing.assert_close(
        loaded.task_norm_stats.get_buffer("1__running_mean"), first.task_norm_stats.get_buffer("1__running_mean")
    )
    other = _module(small_cnn(channels=8))
    with pytest.raises(CheckpointMismatchError, match=r"target: checkpoint \{'0.weight': \[4, 1, 3, 3\]"):
        make_trainer(max_epochs=2).fit(other, _images(), ckpt_path=str(tmp_path / "task0.ckpt"))


@pytest.mark.parametrize("heads", ["multihead", "separate"])
def test_per_task_heads_on_a_user_target(heads: str) -> None:
    cnn = small_cnn()
    m = _module(cnn, heads=heads, num_tasks=3)
    head = cnn[-1]
    assert isinstance(head, nn.Linear) and head.out_features == 3 * 2  # widened: one 2-way slice per task
    assert m.head_names == ["5.weight", "5.bias"]
    if heads == "separate":  # the head is an ordinary parameter of the task-specific optimizer, not generated
        assert "5.weight" not in m.hnet.shapes and head.weight.requires_grad
        assert {id(p) for p in m.task_specific_parameters()} == {id(m.task_embeddings), id(head.weight), id(head.bias)}
    else:
        assert "5.weight" in m.hnet.shapes and not head.weight.requires_grad
    x = torch.randn(5, 1, 8, 8)
    m.eval()
    out = m.task_outputs(x, torch.arange(3))
    assert out.shape == (3, 5, 2)
    for t in range(3):
        torch.testing.assert_close(out[t], m(x, t), rtol=1e-5, atol=1e-6)
    wide = small_cnn(outputs=6)  # already num_tasks · output_dim outputs: kept as it is
    _module(wide, heads=heads, num_tasks=3)
    assert wide[-1].out_features == 6


def test_user_target_requirements_are_named() -> None:
    conv_last = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    with pytest.raises(ValueError, match=r"heads='multihead' needs a target whose last layer with parameters is an "):
        _module(conv_last, heads="multihead")
    with pytest.raises(ValueError, match=r"the target's last layer '5' has 5 outputs; give it output_dim=2 outputs"):
        _module(small_cnn(outputs=5), heads="separate")
    m = _module(small_cnn(outputs=3))  # generated heads: checked at the first forward
    with pytest.raises(ValueError, match=r"the target network returns \(4, 3\); heads='generated' needs 2 outputs"):
        m(torch.randn(4, 1, 8, 8), 0)
    with pytest.raises(ValueError, match="uninitialized"):
        _module(nn.Sequential(nn.LazyLinear(2)))
    with pytest.raises(TypeError, match=r"target must be an nn\.Module"):
        _module("cnn")  # type: ignore[arg-type]
