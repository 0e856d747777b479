"""Batches through one overridable hook (``unpack_batch``): tuples/lists and dict batches for STN, best-response and
fixed-hyperparameter modules, in training, hyper and validation steps; clear errors for other layouts."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from hyperlit.models.stn_cnn import StnMLP
from hyperlit.tuning import BestResponseModule, FixedHyperparameterModule, SelfTuningModule
from hyperlit.tuning.batches import ACCEPTED_BATCHES, unpack_xy

FORMS = "a tuple or list (x, y, ...) or a dict with the keys 'x'/'y', 'input'/'target' or 'image'/'label'"


class DictDataset(Dataset):
    """Examples as dicts ``{kx: x_i, ky: y_i}`` (the default collate stacks them into a dict of tensors)."""

    def __init__(self, n: int, keys: tuple[str, str] = ("x", "y"), seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
        self.keys = keys

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {self.keys[0]: self.x[i], self.keys[1]: self.y[i]}


def _loaders(keys: tuple[str, str]) -> tuple[dict[str, DataLoader], DataLoader]:
    train = DataLoader(DictDataset(48, keys, seed=0), batch_size=16)
    hyper = DataLoader(DictDataset(32, keys, seed=1), batch_size=16)
    return {"train": train, "hyper": hyper}, DataLoader(DictDataset(32, keys, seed=2), batch_size=16)


def _stn(**kwargs: Any) -> SelfTuningModule:
    return SelfTuningModule(StnMLP(in_features=8, hidden=(8,), num_classes=3), plot_schedule=False, **kwargs)


def test_unpack_xy_accepts_exactly_the_documented_forms() -> None:
    x, y, idx = torch.zeros(4, 2), torch.ones(4), torch.arange(4)
    assert unpack_xy((x, y)) == (x, y)
    assert unpack_xy([x, y, idx]) == (x, y)  # further entries ignored
    for kx, ky in (("x", "y"), ("input", "target"), ("image", "label")):
        assert unpack_xy({kx: x, ky: y, "extra": idx}) == (x, y)
    assert unpack_xy({"image": idx, "label": idx, "x": x, "y": y}) == (x, y)  # x/y first
    assert ACCEPTED_BATCHES == FORMS
    cases = [
        ({"features": x, "labels": y}, "a dict with the keys ['features', 'labels']"),
        ({"x": x, "label": y}, "a dict with the keys ['label', 'x']"),
        ((x,), "a tuple of length 1"),
        (x, "a Tensor"),
    ]
    for batch, described in cases:
        message = (
            f"Mod cannot split {described} into inputs and targets: it accepts {FORMS}; "
            "for another layout override Mod.unpack_batch(batch) -> (x, y)"
        )
        with pytest.raises(TypeError, match=re.escape(message)):
            unpack_xy(batch, "Mod")
    with pytest.raises(
        TypeError, match=re.escape("Mod needs tensors for the batch's inputs and targets, got (list, int)")
    ):
        unpack_xy(([1.0], 3), "Mod")


@pytest.mark.parametrize("keys", [("x", "y"), ("input", "target"), ("image", "label")])
def test_stn_trains_and_validates_on_dict_batches(make_trainer, keys: tuple[str, str]) -> None:
    module = _stn(warmup_steps=1, train_steps=1)
    train, val = _loaders(keys)
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    assert int(module.phi_steps) == 3 and int(module.hyper_steps_done) == 2  # λ-steps on the dict hyper batches
    assert {"train/loss", "hyper/loss", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    (result,) = trainer.validate(module, dataloaders=val, verbose=False)
    assert torch.isfinite(torch.tensor(result["val/loss"]))


def test_best_response_and_fixed_modules_take_dict_batches(make_trainer) -> None:
    train, val = _loaders(("input", "target"))
    br = BestResponseModule(input_dim=8, num_classes=3, warmup_steps=1, plot_schedule=False)
    trainer = make_trainer()
    trainer.fit(br, train_dataloaders=train, val_dataloaders=val)
    assert int(br.phi_steps) == 3 and int(br.hyper_steps_done) == 2
    assert {"val/loss", "val/acc"} <= set(trainer.callback_metrics)

    fixed = FixedHyperparameterModule(StnMLP(in_features=8, hidden=(8,), num_classes=3))
    image_train, image_val = _loaders(("image", "label"))
    trainer = make_trainer()
    trainer.fit(fixed, train_dataloaders=image_train["train"], val_dataloaders=image_val)
    assert int(fixed.steps) == 3 and {"train/loss", "val/loss", "val/acc"} <= set(trainer.callback_metrics)


class PixelStn(SelfTuningModule):
    """Another batch layout: ``{"pixels": x, "cls": y}``, through the overridden hook."""

    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        return batch["pixels"], batch["cls"]


def test_a_subclass_overrides_the_hook_for_another_layout(make_trainer) -> None:
    module = PixelStn(StnMLP(in_features=8, hidden=(8,), num_classes=3), plot_schedule=False, warmup_steps=1)
    train, val = _loaders(("pixels", "cls"))
    trainer = make_trainer()
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    assert int(module.hyper_steps_done) == 1 and "val/loss" in trainer.callback_metrics


def test_a_batch_of_another_layout_stops_at_the_first_step(make_trainer) -> None:
    module = _stn()
    train, _ = _loaders(("features", "labels"))
    message = (
        "SelfTuningModule cannot split a dict with the keys ['features', 'labels'] into inputs and targets: it "
        f"accepts {FORMS}; for another layout override SelfTuningModule.unpack_batch(batch) -> (x, y)"
    )
    with pytest.raises(TypeError, match=re.escape(message)):
        make_trainer().fit(module, train_dataloaders=train)
    assert int(module.phi_steps) == 0
    # in validation too (here a bare tensor per batch)
    fixed = FixedHyperparameterModule(StnMLP(in_features=8, hidden=(8,), num_classes=3))
    with pytest.raises(TypeError, match=r"FixedHyperparameterModule cannot split a Tensor into inputs and targets"):
        make_trainer().validate(fixed, dataloaders=DataLoader(torch.randn(8, 8), batch_size=4), verbose=False)
