"""The shared alternating loop: step schedule, warm-up, frozen φ, NaN policy, stream errors, resume."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from hyperlit.hparams import Hyperparameter
from hyperlit.tuning.bilevel import BilevelModule


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


def _trainer(tmp_path, epochs: int = 1, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


@pytest.mark.parametrize(("train_steps", "hyper_steps"), [(2, 1), (1, 1), (1, 3)])
def test_step_schedule_and_warmup(tmp_path, train_steps: int, hyper_steps: int) -> None:
    model = LinearBestResponse(train_steps=train_steps, hyper_steps=hyper_steps, warmup_steps=3, hyper_lr=0.05)
    lam0 = model.space.unconstrained.detach().clone()
    phi_step = torch.optim.SGD.step
    calls = {"n": 0}

    def counting_step(self, *a, **k):
        calls["n"] += 1
        return phi_step(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.SGD, "step", counting_step)
        _trainer(tmp_path).fit(model, train_dataloaders=_loaders())
    batches = 8
    assert int(model.phi_steps) == batches == calls["n"]
    assert int(model.warmup_phi_steps) == 3
    assert int(model.hyper_steps_done) == ((batches - 3) * hyper_steps) // train_steps
    assert len(model.schedule) == int(model.hyper_steps_done)
    assert not torch.equal(model.space.unconstrained.detach(), lam0)


def test_lambda_fixed_during_warmup_and_phi_fixed_when_frozen(tmp_path) -> None:
    model = LinearBestResponse(warmup_steps=100)
    lam0 = model.space.unconstrained.detach().clone()
    _trainer(tmp_path).fit(model, train_dataloaders=_loaders())
    assert torch.equal(model.space.unconstrained.detach(), lam0)
    assert int(model.hyper_steps_done) == 0

    frozen = LinearBestResponse(train_steps=0, warmup_steps=4, hyper_lr=0.05)
    # phase 1 (4 φ-steps), then φ frozen: λ-steps only
    trainer = _trainer(tmp_path)
    trainer.fit(frozen, train_dataloaders=_loaders())
    assert int(frozen.phi_steps) == 4
    assert int(frozen.hyper_steps_done) == 4
    w_after_phase1 = frozen.w0.detach().clone()
    frozen2 = copy.deepcopy(frozen)
    _trainer(tmp_path, epochs=2).fit(frozen2, train_dataloaders=_loaders())
    assert torch.equal(frozen2.w0.detach(), w_after_phase1)


def test_nan_policy(tmp_path) -> None:
    model = LinearBestResponse()
    model.poison = True
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        _trainer(tmp_path).fit(model, train_dataloaders=_loaders())
    skipping = LinearBestResponse(nan_policy="skip")
    skipping.poison = True
    with pytest.warns(UserWarning, match="step skipped"):
        _trainer(tmp_path).fit(skipping, train_dataloaders=_loaders())
    assert int(skipping.skipped_steps) == 8
    assert torch.count_nonzero(skipping.w0) == 0


def test_plain_batches_are_rejected(tmp_path) -> None:
    model = LinearBestResponse()
    with pytest.raises(TypeError, match="'train'"):
        _trainer(tmp_path).fit(model, train_dataloaders=_loaders()["train"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_steps": -1}, "train_steps"),
        ({"train_steps": 0}, "warm-up"),
        ({"hyper_lr": 0.0}, "hyper_lr"),
        ({"nan_policy": "ignore"}, "nan_policy"),
    ],
)
def test_bad_arguments(kwargs, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LinearBestResponse(**kwargs)


def test_resume_equals_uninterrupted(tmp_path) -> None:
    torch.manual_seed(0)
    full = LinearBestResponse(warmup_steps=2, hyper_lr=0.05)
    _trainer(tmp_path / "a", epochs=4).fit(full, train_dataloaders=_loaders())

    torch.manual_seed(0)
    first = LinearBestResponse(warmup_steps=2, hyper_lr=0.05)
    trainer = _trainer(tmp_path / "b", epochs=2)
    trainer.fit(first, train_dataloaders=_loaders())
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    torch.manual_seed(123)  # the global RNG must not matter
    resumed = LinearBestResponse(warmup_steps=2, hyper_lr=0.05)
    _trainer(tmp_path / "b", epochs=4).fit(resumed, train_dataloaders=_loaders(), ckpt_path=ckpt)

    for name in ("phi_steps", "hyper_steps_done", "warmup_phi_steps"):
        assert int(getattr(resumed, name)) == int(getattr(full, name))
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert len(resumed.schedule) == len(full.schedule)


def test_user_datamodule_with_train_and_val_only(tmp_path) -> None:
    """A DataModule without hyper_dataloader(): its val_dataloader() serves the λ-steps; detached afterwards."""
    loaders = _loaders()

    class TrainValOnly(pl.LightningDataModule):
        def train_dataloader(self):
            return loaders["train"]

        def val_dataloader(self):
            return loaders["hyper"]

    dm = TrainValOnly()
    model = LinearBestResponse(warmup_steps=2, hyper_lr=0.05)
    _trainer(tmp_path).fit(model, datamodule=dm)
    assert int(model.hyper_steps_done) == 3
    assert isinstance(next(iter(dm.train_dataloader())), list)  # the DataModule serves plain batches again
