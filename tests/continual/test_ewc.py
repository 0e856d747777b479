"""EWCContinualModule with a user network (a small CNN with BatchNorm) and its non-finite-step policy."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from hyperlit.checkpoint import CheckpointMismatchError
from hyperlit.continual import EWCContinualModule, baselines
from hyperlit.continual import ewc as ewc_module
from hyperlit.continual.ewc import per_example_grad_sq
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


# --- the nn.Linear fast path of per_example_grad_sq ----------------------------------------------------------------


def _heads_loss(kind: str, head: int, classes: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One example's loss on ``head``'s slice of a multihead output, as EWCContinualModule builds it."""

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = out.reshape(len(out), -1, classes)[:, head]
        if kind == "ce":
            return nn.functional.cross_entropy(logits, y)
        return nn.functional.mse_loss(logits, y)

    return loss


def _targets(kind: str, n: int, classes: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randint(0, classes, (n,)) if kind == "ce" else torch.randn(n, classes, dtype=dtype)


@pytest.mark.parametrize("kind", ["ce", "mse"])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("inplace", [False, True])
def test_linear_fisher_equals_vmap_for_a_multihead_mlp(
    kind: str, dtype: torch.dtype, rtol: float, inplace: bool
) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3 * 4))
    net = net.to(dtype)
    x = torch.randn(10, 6, dtype=dtype)
    y = _targets(kind, 10, 4, dtype)
    params = dict(net.named_parameters())
    for head in (0, 2):
        loss = _heads_loss(kind, head, 4)
        fast = per_example_grad_sq(net, params, loss, x, y, method="linear")
        slow = per_example_grad_sq(net, params, loss, x, y, method="vmap")
        assert set(fast) == set(params) and float(fast["4.weight"].sum()) > 0
        for n in params:
            assert fast[n].dtype == dtype and fast[n].shape == params[n].shape
            torch.testing.assert_close(
                fast[n], slow[n], rtol=rtol, atol=rtol * 1e-3 * float(slow[n].detach().abs().max())
            )
        # the other heads' rows get no gradient, in both
        rows = torch.ones(12, dtype=torch.bool)
        rows[4 * head : 4 * head + 4] = False
        assert float(fast["4.weight"][rows].abs().sum()) == 0 and float(fast["4.bias"][rows].abs().sum()) == 0
    some = {n: params[n] for n in ("0.bias", "4.weight")}  # a subset: the others are fixed
    fast = per_example_grad_sq(net, some, _heads_loss(kind, 1, 4), x, y, method="linear")
    slow = per_example_grad_sq(net, some, _heads_loss(kind, 1, 4), x, y, method="vmap")
    assert set(fast) == set(some)
    for n in some:
        torch.testing.assert_close(fast[n], slow[n], rtol=rtol, atol=rtol * 1e-3 * float(slow[n].detach().abs().max()))


class _Twice(nn.Module):
    """One nn.Linear applied twice per example (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class _Positions(nn.Module):
    """An nn.Linear applied at every position of a sequence (input (B, L, in)), then pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x.view(len(x), 2, 2).repeat(1, 1, 2))).sum(1)


class _Tied(nn.Module):
    """An output layer that reuses the first layer's weight outside an nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x)) @ self.lin.weight


class _AsInput(nn.Module):
    """A weight given to ``F.linear`` as its input (with B = 5 rows, as many as the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(nn.functional.linear(self.lin.weight, x).T)


def _tied_layers() -> nn.Module:
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    net[2].weight = net[0].weight  # two nn.Linear modules, one weight
    return net


def _conv() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 2, 2, padding=1), nn.Flatten(), nn.Linear(18, 3))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_conv, r"parameter '1\.weight' is not the weight or bias of an nn\.Linear"),
        (_Twice, r"parameter 'lin\.weight' is used more than once in a forward pass \(shared weights\)"),
        (_tied_layers, r"parameter '0\.weight' is used more than once in a forward pass \(shared weights\)"),
        (_Positions, r"gets input \(5, 2, 4\), not \(B=5, in\) \(applied at several positions per example\)"),
        (_Tied, r"parameter 'lin\.weight' is used by 'matmul', not only by an nn\.Linear"),
        (_AsInput, r"parameter 'lin\.weight' is used by 'linear' as its input, not as its weight or bias"),
        (lambda: small_cnn(outputs=3).eval(), r"parameter '0\.weight' is not the weight or bias"),
    ],
)
def test_other_networks_fall_back_to_vmap_and_agree(make: Callable[[], nn.Module], reason: str) -> None:
    torch.manual_seed(0)
    net = make()
    x = torch.randn(5, 1, 8, 8) if isinstance(net, nn.Sequential) and len(net) == 6 else torch.randn(5, 4)
    y = torch.randint(0, 3, (5,))
    params = dict(net.named_parameters())
    loss = nn.functional.cross_entropy
    with pytest.raises(ValueError, match=reason):
        per_example_grad_sq(net, params, loss, x, y, method="linear")
    auto = per_example_grad_sq(net, params, loss, x, y)
    slow = per_example_grad_sq(net, params, loss, x, y, method="vmap")
    expected = {n: torch.zeros_like(p) for n, p in params.items()}  # and both equal a loop over the examples
    for i in range(len(x)):
        grads = torch.autograd.grad(
            loss(net(x[i : i + 1]), y[i : i + 1]), list(params.values()), allow_unused=True, materialize_grads=True
        )
        for n, g in zip(params, grads):
            expected[n] += g.pow(2) / len(x)
    for n in params:
        torch.testing.assert_close(auto[n], slow[n], rtol=0, atol=0, msg=n)
        torch.testing.assert_close(auto[n], expected[n], rtol=1e-5, atol=1e-7, msg=n)


def test_linear_path_refuses_batch_coupling_and_bad_method() -> None:
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    dropout = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 3))
    loss = nn.functional.cross_entropy
    with pytest.raises(ValueError, match=r"dropout '1' is in training mode \(random per example\)"):
        per_example_grad_sq(dropout, dict(dropout.named_parameters()), loss, x, y, method="linear")
    norm = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"BatchNorm '1' uses batch statistics \(examples are not independent\)"):
        per_example_grad_sq(norm, dict(norm.named_parameters()), loss, x, y, method="linear")
    norm.eval()  # running statistics: each example on its own, the fast path applies
    fast = per_example_grad_sq(norm, dict(norm.named_parameters()), loss, x, y, method="linear")
    slow = per_example_grad_sq(norm, dict(norm.named_parameters()), loss, x, y, method="vmap")
    for n in fast:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match=r"method must be 'auto', 'linear' or 'vmap', got 'loop'"):
        per_example_grad_sq(norm, dict(norm.named_parameters()), loss, x, y, method="loop")  # type: ignore[arg-type]


def _no_vmap(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
    raise AssertionError("the vmap path was taken")


def test_ewc_module_takes_the_linear_path_with_unchanged_fisher(
    make_trainer: Trainers, monkeypatch: pytest.MonkeyPatch
) -> None:
    pl.seed_everything(0)
    m = _ewc(heads="multihead", num_tasks=3)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    m.net.train()
    with monkeypatch.context() as patch:
        patch.setattr(ewc_module, "_vmap_grad_sq", _no_vmap)
        m._update_fisher(x, y, 1)
    fast = {n: f.clone() for n, f in m.fisher_running.as_dict().items()}
    assert m.net.training  # the mode is restored
    for f in m.fisher_running.as_dict().values():
        f.zero_()
    m.fisher_batches.zero_()
    with monkeypatch.context() as patch:  # the same update again, by the vmap path
        patch.setattr(baselines, "per_example_grad_sq", functools.partial(per_example_grad_sq, method="vmap"))
        m._update_fisher(x, y, 1)
    for n, f in m.fisher_running.as_dict().items():
        torch.testing.assert_close(fast[n], f, rtol=1e-5, atol=1e-9, msg=n)
    assert float(fast["net.2.weight"][2:4].sum()) > 0 and float(fast["net.2.weight"][:2].abs().sum()) == 0
    with monkeypatch.context() as patch:  # training the built-in MLP never takes the vmap path
        patch.setattr(ewc_module, "_vmap_grad_sq", _no_vmap)
        trained = _ewc(heads="multihead")
        make_trainer(max_epochs=2).fit(trained, TinyTasks(steps_per_task=4))
    assert float(_fisher(trained).sum()) > 0 and torch.isfinite(trained.acc_matrix.tril()).all()
