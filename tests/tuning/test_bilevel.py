"""The shared alternating loop: step schedule, warm-up, frozen φ, NaN policy, optimizers, stream errors, resume."""

from __future__ import annotations

import copy
import functools
import pickle

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from hyperlit.hparams import Hyperparameter
from hyperlit.streams import HyperStreamDataModule
from hyperlit.tuning.bilevel import BilevelModule


def adam(lr: float) -> functools.partial:
    """A picklable Adam factory (``ddp_spawn`` pickles the module)."""
    return functools.partial(torch.optim.Adam, lr=lr)


def sgd(lr: float, momentum: float = 0.9) -> functools.partial:
    """A picklable SGD factory."""
    return functools.partial(torch.optim.SGD, lr=lr, momentum=momentum)


class LinearBestResponse(BilevelModule):
    """Ridge regression with a linear best response w(λ) = w0 + v λ̃ (the tangent of Lorraine & Duvenaud)."""

    def __init__(self, dim: int = 5, **kwargs) -> None:
        kwargs.setdefault("hyperparameters", [Hyperparameter("l2", 0.0, float("inf"), 0.1, transform="log")])
        super().__init__(**kwargs)
        self.w0 = nn.Parameter(torch.zeros(dim))
        self.v = nn.Parameter(torch.zeros(dim))
        self.poison = False

    def weights(self, lam: Tensor) -> Tensor:
        return self.w0 + self.space.hnet_input(lam)[:, :1] * self.v  # (B, D)

    def train_loss(self, batch, lam: Tensor) -> Tensor:
        x, y = batch
        w = self.weights(lam)
        penalty = self.space.constrained(lam)[:, 0] * (w**2).sum(-1)
        loss = ((x * w).sum(-1) - y).pow(2).mean() + penalty.mean()
        return loss * float("nan") if self.poison else loss

    def hyper_loss(self, batch, lam: Tensor) -> Tensor:
        x, y = batch
        return ((x * self.weights(lam)).sum(-1) - y).pow(2).mean()


def _loaders(n: int = 64, batch: int = 8) -> dict[str, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * n, 5, generator=g)
    y = x @ torch.arange(1.0, 6.0) + 0.5 * torch.randn(2 * n, generator=g)
    train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch)
    hyper = DataLoader(TensorDataset(x[n:], y[n:]), batch_size=batch)
    return {"train": train, "hyper": hyper}


@pytest.mark.parametrize(("train_steps", "hyper_steps"), [(2, 1), (1, 1), (1, 3)])
def test_step_schedule_and_warmup(make_trainer, train_steps: int, hyper_steps: int) -> None:
    model = LinearBestResponse(
        train_steps=train_steps, hyper_steps=hyper_steps, warmup_steps=3, hyper_optimizer=adam(0.05)
    )
    lam0 = model.space.unconstrained.detach().clone()
    phi_step = torch.optim.SGD.step
    calls = {"n": 0}

    def counting_step(self, *a, **k):
        calls["n"] += 1
        return phi_step(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.SGD, "step", counting_step)
        make_trainer().fit(model, train_dataloaders=_loaders())
    batches = 8
    assert int(model.phi_steps) == batches == calls["n"]
    assert int(model.warmup_phi_steps) == 3
    assert int(model.hyper_steps_done) == ((batches - 3) * hyper_steps) // train_steps
    assert len(model.schedule) == int(model.hyper_steps_done)
    assert not torch.equal(model.space.unconstrained.detach(), lam0)


def test_lambda_fixed_during_warmup_and_phi_fixed_when_frozen(make_trainer) -> None:
    model = LinearBestResponse(warmup_steps=100)
    lam0 = model.space.unconstrained.detach().clone()
    make_trainer().fit(model, train_dataloaders=_loaders())
    assert torch.equal(model.space.unconstrained.detach(), lam0)
    assert int(model.hyper_steps_done) == 0

    frozen = LinearBestResponse(train_steps=0, warmup_steps=4, hyper_optimizer=adam(0.05))
    # phase 1 (4 φ-steps), then φ frozen: λ-steps only
    trainer = make_trainer()
    trainer.fit(frozen, train_dataloaders=_loaders())
    assert int(frozen.phi_steps) == 4
    assert int(frozen.hyper_steps_done) == 4
    w_after_phase1 = frozen.w0.detach().clone()
    frozen2 = copy.deepcopy(frozen)
    make_trainer(max_epochs=2).fit(frozen2, train_dataloaders=_loaders())
    assert torch.equal(frozen2.w0.detach(), w_after_phase1)


def test_nan_policy(make_trainer) -> None:
    model = LinearBestResponse()
    model.poison = True
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        make_trainer().fit(model, train_dataloaders=_loaders())
    skipping = LinearBestResponse(nan_policy="skip")
    skipping.poison = True
    with pytest.warns(UserWarning, match="step skipped"):
        make_trainer().fit(skipping, train_dataloaders=_loaders())
    assert int(skipping.skipped_steps) == 8
    assert torch.count_nonzero(skipping.w0) == 0


def test_plain_batches_are_rejected(make_trainer) -> None:
    model = LinearBestResponse()
    with pytest.raises(TypeError, match="'train'"):
        make_trainer().fit(model, train_dataloaders=_loaders()["train"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"train_steps": -1}, ValueError, "train_steps"),
        ({"train_steps": 0}, ValueError, "warm-up"),
        ({"nan_policy": "ignore"}, ValueError, "nan_policy"),
        ({"hyper_optimizer": "adam"}, TypeError, "hyper_optimizer"),
        ({"phi_lr_scheduler": 0.1}, TypeError, "phi_lr_scheduler"),
    ],
)
def test_bad_arguments(kwargs, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        LinearBestResponse(**kwargs)


def test_optimizers_are_phi_lambda_sigma_and_global_step_counts_each(make_trainer) -> None:
    """Three optimizers in a fixed order, each over its own parameters; ``global_step`` counts every optimizer step:
    one per φ-step, two per λ-step with σ tuned (λ and σ), one without."""
    tuned = LinearBestResponse(warmup_steps=2, phi_optimizer=sgd(0.02, 0.5), hyper_optimizer=adam(0.05))
    trainer = make_trainer()
    trainer.fit(tuned, train_dataloaders=_loaders())
    phi, lam, sigma = trainer.optimizers
    assert isinstance(phi, torch.optim.SGD) and phi.param_groups[0]["momentum"] == 0.5
    assert {id(p) for g in phi.param_groups for p in g["params"]} == {id(tuned.w0), id(tuned.v)}
    assert isinstance(lam, torch.optim.Adam) and lam.param_groups[0]["params"] == [tuned.space.unconstrained]
    assert lam.param_groups[0]["lr"] == 0.05
    assert isinstance(sigma, torch.optim.Adam) and sigma.param_groups[0]["params"] == [tuned.space.scale]
    assert sigma.param_groups[0]["lr"] == 3e-3  # the default
    steps, hyper = int(tuned.phi_steps), int(tuned.hyper_steps_done)
    assert (steps, hyper) == (8, 3) and trainer.global_step == steps + 2 * hyper
    assert len(sigma.state) == 1  # σ was stepped

    fixed_sigma = LinearBestResponse(warmup_steps=2, tune_sigma=False)
    trainer = make_trainer()
    trainer.fit(fixed_sigma, train_dataloaders=_loaders())
    assert trainer.global_step == 8 + 3 and not trainer.optimizers[2].state  # σ never stepped


def test_optimizer_factory_errors_name_the_argument(make_trainer) -> None:
    model = LinearBestResponse(sigma_optimizer=lambda p: nn.Linear(1, 1))
    with pytest.raises(TypeError, match=r"sigma_optimizer must build a torch\.optim\.Optimizer"):
        make_trainer().fit(model, train_dataloaders=_loaders())


def test_default_factories_survive_pickling() -> None:
    """``ddp_spawn`` pickles the module: the lambda defaults are kept by reference to the signature."""
    model = LinearBestResponse(warmup_steps=2)
    clone = pickle.loads(pickle.dumps(model))
    opt = clone.phi_optimizer([nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.01 and opt.defaults["momentum"] == 0.9
    assert isinstance(clone.hyper_optimizer([clone.space.unconstrained]), torch.optim.Adam)


def test_resume_equals_uninterrupted(make_trainer, tmp_path) -> None:
    torch.manual_seed(0)
    full = LinearBestResponse(warmup_steps=2, hyper_optimizer=adam(0.05))
    make_trainer(max_epochs=4, default_root_dir=tmp_path / "a").fit(full, train_dataloaders=_loaders())

    torch.manual_seed(0)
    first = LinearBestResponse(warmup_steps=2, hyper_optimizer=adam(0.05))
    trainer = make_trainer(max_epochs=2, default_root_dir=tmp_path / "b")
    trainer.fit(first, train_dataloaders=_loaders())
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    torch.manual_seed(123)  # the global RNG must not matter
    resumed = LinearBestResponse(warmup_steps=2, hyper_optimizer=adam(0.05))
    make_trainer(max_epochs=4, default_root_dir=tmp_path / "b").fit(
        resumed, train_dataloaders=_loaders(), ckpt_path=ckpt
    )

    for name in ("phi_steps", "hyper_steps_done", "warmup_phi_steps"):
        assert int(getattr(resumed, name)) == int(getattr(full, name))
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert len(resumed.schedule) == len(full.schedule)


class TrainValOnly(pl.LightningDataModule):
    """A user's DataModule with only train/val loaders (no hyper stream of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.loaders = _loaders()
        self.num_features = 5

    def train_dataloader(self) -> DataLoader:
        return self.loaders["train"]

    def val_dataloader(self) -> DataLoader:
        return self.loaders["hyper"]


def test_user_datamodule_with_train_and_val_only(make_trainer) -> None:
    """Wrapped in HyperStreamDataModule, a DataModule's val_dataloader() serves the λ-steps; the DataModule itself
    still serves plain batches, and its attributes are reachable through the wrapper."""
    dm = TrainValOnly()
    wrapped = HyperStreamDataModule(dm)
    assert wrapped.num_features == 5 and wrapped.datamodule is dm
    model = LinearBestResponse(warmup_steps=2, hyper_optimizer=adam(0.05))
    make_trainer().fit(model, datamodule=wrapped)
    assert int(model.hyper_steps_done) == 3
    assert dm.trainer is not None  # Lightning's trainer reached the wrapped DataModule
    assert isinstance(next(iter(dm.train_dataloader())), list)  # the DataModule serves plain batches


def test_plain_datamodule_without_wrapper_is_a_clear_error(make_trainer) -> None:
    with pytest.raises(TypeError, match=r"HyperStreamDataModule\(datamodule\)"):
        make_trainer().fit(LinearBestResponse(warmup_steps=2), datamodule=TrainValOnly())
