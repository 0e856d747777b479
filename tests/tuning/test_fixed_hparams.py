"""FixedHyperparameterModule and plain_twin: plain equivalence, schedule replay, errors, checkpointed counters."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hyperlit.checkpoint import CheckpointMismatchError
from hyperlit.hparams import Hyperparameter
from hyperlit.models.stn_cnn import StnMLP, StnSmallCNN
from hyperlit.nn.stn import StnLayer
from hyperlit.tuning.fixed_hparams import FixedHyperparameterModule, PlainConv2d, plain_twin
from tests.tuning.test_bilevel import sgd

ZERO = {"dropout0": 0.0, "dropout1": 0.0, "dropout2": 0.0, "hue": 0.0, "contrast": 0.0, "sat": 0.0, "bright": 0.0}
ZERO |= {"indropout": 0.0, "inscale": 0.0, "cutlength": 0.0, "cutholes": 0.0}


def _net() -> StnSmallCNN:
    torch.manual_seed(0)
    return StnSmallCNN(filters=(3, 4, 5), image_size=8)


def _loader(n: int = 8, batch: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_plain_twin_has_no_stn_layers_and_matches_the_zero_response() -> None:
    net = _net()
    with torch.no_grad():  # a non-zero response, so the check would fail if the twin kept it
        for layer in net.stn_layers():
            layer.hyper_bottleneck.normal_(0, 1.0)
    twin = plain_twin(net)
    assert not any(isinstance(m, StnLayer) for m in twin.modules())
    assert sum(isinstance(m, PlainConv2d) for m in twin.modules()) == 3
    assert sum(p.numel() for p in twin.parameters()) < sum(p.numel() for p in net.parameters())
    x = torch.rand(5, 3, 8, 8)
    net.eval(), twin.eval()
    zero = torch.zeros(1, net.hdim).expand(5, -1)
    torch.testing.assert_close(twin(x, None), net(x, zero))
    assert not torch.allclose(twin(x, None), net(x, torch.ones(1, net.hdim).expand(5, -1)))


def test_fixed_mode_without_regularization_trains_like_a_plain_cnn(tmp_path: Path) -> None:
    module = FixedHyperparameterModule(_net(), values=ZERO, optimizer=sgd(0.1), seed=3)
    convs = [m for m in module.net.modules() if isinstance(m, nn.Conv2d)]
    ref = nn.Sequential(
        *(
            nn.Sequential(nn.Conv2d(c.in_channels, c.out_channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            for c in convs
        ),
        nn.Flatten(),
        nn.Linear(module.net.fc.in_features, 10),
    )
    with torch.no_grad():
        for r, c in zip([s[0] for s in ref[:3]], convs):
            r.weight.copy_(c.weight), r.bias.copy_(c.bias)
        ref[4].weight.copy_(module.net.fc.weight), ref[4].bias.copy_(module.net.fc.bias)
    mean, std = module.net.mean, module.net.std
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for x, y in _loader():
        opt.zero_grad()
        F.cross_entropy(ref((x - mean) / std), y).backward()
        opt.step()
    _trainer(tmp_path, max_epochs=1).fit(module, train_dataloaders=_loader())
    assert int(module.steps) == 2
    torch.testing.assert_close(module.net.fc.weight, ref[4].weight)
    torch.testing.assert_close(convs[0].weight, ref[0][0].weight)


def test_regularizers_act_in_training_only() -> None:
    module = FixedHyperparameterModule(_net(), values={**ZERO, "dropout0": 0.8, "indropout": 0.5})
    x = torch.rand(6, 3, 8, 8)
    module.train()
    train_out = module(x)
    module.eval()
    torch.testing.assert_close(module(x), module(x))
    assert not torch.allclose(train_out, module(x))


def _write_schedule(path: Path, rows: list[dict[str, float]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


class _Record(Callback):
    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.seen.append(pl_module.current_values())


def test_step_replay_uses_the_values_recorded_before_each_step(tmp_path: Path) -> None:
    rows = [
        {"hyper_step": 1, "phi_step": 2, "epoch": 0, "dropout0": 0.3, "cutholes": 1.0, "sigma_dropout0": 0.5},
        {"hyper_step": 2, "phi_step": 4, "epoch": 1, "dropout0": 0.6, "cutholes": 2.7, "sigma_dropout0": 0.5},
    ]
    path = _write_schedule(tmp_path / "hparam_schedule.csv", rows)
    module = FixedHyperparameterModule(_net(), values={"dropout0": 0.05, "cutholes": 3.0}, schedule=path)
    rec = _Record()
    _trainer(tmp_path, max_epochs=3, callbacks=[rec]).fit(module, train_dataloaders=_loader())
    assert [v["dropout0"] for v in rec.seen] == [0.05, 0.05, 0.3, 0.3, 0.6, 0.6]
    # discrete entries are floored like the STN floors them; names the schedule lacks keep their values
    assert [v["cutholes"] for v in rec.seen] == [3.0, 3.0, 1.0, 1.0, 2.0, 2.0]
    assert all(v["dropout1"] == 0.05 for v in rec.seen)


def test_epoch_replay_uses_the_values_reached_at_the_end_of_each_epoch(tmp_path: Path) -> None:
    rows = [
        {"hyper_step": 1, "phi_step": 1, "epoch": 0, "dropout0": 0.2},
        {"hyper_step": 2, "phi_step": 2, "epoch": 0, "dropout0": 0.4},
        {"hyper_step": 3, "phi_step": 3, "epoch": 1, "dropout0": 0.7},
    ]
    path = _write_schedule(tmp_path / "s.csv", rows)
    module = FixedHyperparameterModule(_net(), schedule=path, replay="epoch")
    rec = _Record()
    _trainer(tmp_path, max_epochs=3, callbacks=[rec]).fit(module, train_dataloaders=_loader())
    assert [v["dropout0"] for v in rec.seen] == [0.4, 0.4, 0.7, 0.7, 0.7, 0.7]


def test_bad_names_and_values_raise(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="nope"):
        FixedHyperparameterModule(_net(), values={"nope": 0.1})
    with pytest.raises(KeyError, match="does not use"):
        FixedHyperparameterModule(_net(), hyperparameters=[Hyperparameter("wdecay", 0.0, 1.0)])
    with pytest.raises(ValueError, match="outside its range"):
        FixedHyperparameterModule(_net(), values={"dropout0": 0.95})
    with pytest.raises(ValueError, match="replay"):
        FixedHyperparameterModule(_net(), replay="batch")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="StnNet"):
        FixedHyperparameterModule(nn.Linear(2, 2))  # type: ignore[arg-type]
    path = _write_schedule(tmp_path / "s.csv", [{"hyper_step": 1, "phi_step": 1, "epoch": 0, "alpha": 0.1}])
    with pytest.raises(KeyError, match="none of the columns"):
        FixedHyperparameterModule(_net(), schedule=path)
    with pytest.raises(FileNotFoundError):
        FixedHyperparameterModule(_net(), schedule=tmp_path / "missing.csv")


def test_step_counter_and_generator_survive_a_checkpoint(tmp_path: Path) -> None:
    module = FixedHyperparameterModule(_net(), values={**ZERO, "dropout1": 0.5})
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(module, train_dataloaders=_loader())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    fresh = FixedHyperparameterModule(_net(), values={**ZERO, "dropout1": 0.5})
    fresh.load_state_dict(ckpt["state_dict"])
    fresh.on_load_checkpoint(ckpt)
    assert int(fresh.steps) == 2
    torch.testing.assert_close(fresh.rng.get_state(), module.rng.get_state())
    # a checkpoint of another architecture (plain=False keeps the STN layers) is refused with one clear error
    other = FixedHyperparameterModule(_net(), values={**ZERO, "dropout1": 0.5}, plain=False)
    with pytest.raises(CheckpointMismatchError, match="missing from the checkpoint"):
        other.on_load_checkpoint(ckpt)


def test_works_with_an_stn_mlp_and_the_unconverted_net() -> None:
    torch.manual_seed(0)
    net = StnMLP(in_features=6, hidden=(8, 8), num_classes=3)
    plain = FixedHyperparameterModule(net, values={"dropout0": 0.0, "dropout1": 0.0}).eval()
    kept = FixedHyperparameterModule(net, values={"dropout0": 0.0, "dropout1": 0.0}, plain=False).eval()
    x = torch.rand(4, 6)
    torch.testing.assert_close(plain(x), kept(x))


def test_hyperlit_datamodule_serves_plain_batches_and_the_schedule_steps(make_trainer) -> None:
    """A hyperlit DataModule adds the hyper stream only for tuning modules: this module gets plain batches. The
    optional ``lr_scheduler`` is stepped once per epoch; metrics are torchmetrics' (train/val loss and accuracy)."""
    from datamodules.digits import DigitsDataModule

    class Batches(Callback):
        def __init__(self) -> None:
            self.kinds: set[type] = set()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            self.kinds.add(type(batch))

    torch.manual_seed(0)
    module = FixedHyperparameterModule(
        StnMLP(in_features=64, hidden=(8,), num_classes=10),
        optimizer=sgd(0.1),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    )
    batches = Batches()
    trainer = make_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2, callbacks=[batches])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert batches.kinds == {list}
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.025)
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    assert 0 <= float(trainer.callback_metrics["val/acc"]) <= 1
