"""HyperlitModule: checkpoint identity, checkpointed generators, per-stage metrics, the logging throttle."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric, MetricCollection

from hyperlit.base import HyperlitModule
from hyperlit.checkpoint import CheckpointMismatchError


class Tiny(HyperlitModule):
    """A linear model with one identity field, a named generator and a per-step value logged when written."""

    def __init__(
        self,
        width: int = 3,
        optimizer: Any = lambda p: torch.optim.SGD(p, lr=0.1),
        throttled: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        self.save_hyperparameters()
        self.width = width
        self.optimizer = optimizer
        self.throttled = throttled
        self.layer = nn.Linear(width, 1)
        self.register_generator("shared", seed + 7)
        self.history: list[float] = []

    def configure_metrics(self) -> MetricCollection:
        return MetricCollection({"loss": MeanMetric()})

    def checkpoint_identity(self) -> dict[str, Any]:
        return {"width": self.width}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])

    def configure_optimizers(self) -> OptimizerLRScheduler:
        return self.build_optimizer(self.optimizer, self.parameters(), "optimizer")

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (x,) = batch
        loss = self.layer(x).pow(2).mean()
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        if not self.throttled or self.should_log_step():
            self.log("train/value", loss.detach(), on_step=True, on_epoch=False)


class Other(Tiny):
    """Same weights and identity, another module."""


def _draws(module: Tiny) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(4, generator=module.rng), torch.rand(4, generator=module.generator("shared"))


def _saved(module: Tiny) -> dict[str, Any]:
    checkpoint: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    return checkpoint


def test_checkpoint_restores_every_generator_and_the_python_state() -> None:
    module = Tiny()
    _draws(module)
    module.history = [1.0, 2.0]
    checkpoint = _saved(module)
    expected = _draws(module)
    resumed = Tiny()
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.history == [1.0, 2.0]
    for got, want in zip(_draws(resumed), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a fresh module draws something else: the restore is what made them equal
    assert not torch.equal(_draws(Tiny())[0], expected[0])


def test_pickling_keeps_generator_states_and_the_default_factory() -> None:
    module = Tiny()
    _draws(module)
    expected = _draws(pickle.loads(pickle.dumps(module)))
    copy = pickle.loads(pickle.dumps(module))
    assert isinstance(copy.build_optimizer(copy.optimizer, copy.parameters(), "optimizer"), torch.optim.SGD)
    for got, want in zip(_draws(module), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_another_configuration_class_or_origin_is_refused() -> None:
    checkpoint = _saved(Tiny(width=3))
    with pytest.raises(CheckpointMismatchError, match=r"width: checkpoint 3 vs model 4"):
        Tiny(width=4).on_load_checkpoint(checkpoint)

    with pytest.raises(CheckpointMismatchError, match="written by Tiny, not Other"):
        Other().on_load_checkpoint(checkpoint)
    del checkpoint["hyperlit"]
    with pytest.raises(CheckpointMismatchError, match="not written by a hyperlit module"):
        Tiny().on_load_checkpoint(checkpoint)


def test_state_dict_shapes_are_checked_before_loading() -> None:
    checkpoint = _saved(Tiny(width=3))
    checkpoint["state_dict"]["layer.weight"] = torch.zeros(1, 5)
    with pytest.raises(CheckpointMismatchError, match=r"layer\.weight: checkpoint \(1, 5\) vs model \(1, 3\)"):
        Tiny(width=3).on_load_checkpoint(checkpoint)


def test_metrics_are_cloned_per_stage_and_unpicklable_hparams_are_dropped() -> None:
    module = Tiny()
    module.build_metrics()
    assert {k for k in module.val_metrics.keys(keep_base=True)} == {"loss"}
    assert [module.stage_metrics(s).prefix for s in ("train", "val", "test")] == ["train/", "val/", "test/"]
    assert module.train_metrics is not module.val_metrics
    assert "optimizer" not in module.hparams and module.hparams["width"] == 3
    torch.load(_buffer(module.hparams), weights_only=True)


def _buffer(value: object) -> Any:
    import io

    buffer = io.BytesIO()
    torch.save(dict(value), buffer)  # type: ignore[call-overload]
    buffer.seek(0)
    return buffer


def _logged_steps(directory: Path) -> list[int]:
    with open(next(directory.rglob("metrics.csv"))) as fh:
        rows = list(csv.DictReader(fh))
    return [int(r["step"]) for r in rows if r.get("train/value")]


@pytest.mark.parametrize("every", [1, 3, 4])
def test_throttled_logging_writes_exactly_the_rows_of_unthrottled_logging(make_trainer, tmp_path, every) -> None:
    """should_log_step() is true on exactly the batches Lightning's logger writes (across epochs)."""
    data = DataLoader(TensorDataset(torch.randn(40, 3)), batch_size=4)
    steps = {}
    for throttled in (True, False):
        root = tmp_path / str(throttled)
        trainer = make_trainer(max_epochs=2, logger=CSVLogger(root), log_every_n_steps=every)
        trainer.fit(Tiny(throttled=throttled), train_dataloaders=data)
        steps[throttled] = _logged_steps(root)
    assert steps[True] == steps[False]
    assert len(steps[True]) == 20 // every


class Clipped(Tiny):
    """``Tiny`` whose step clips its gradients (what Lightning's mixed-precision plugin refuses for fused optimizers)."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (x,) = batch
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self.layer(x).pow(2).mean())
        self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        opt.step()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_optimizers_are_fused_except_under_mixed_precision_where_clipping_needs_them_unfused(
    make_trainer, precision
) -> None:
    module = Clipped(optimizer=lambda p: torch.optim.Adam(p, lr=0.1))
    loader = DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=4)
    make_trainer(precision=precision).fit(module, loader)  # bf16-mixed + a fused Adam would raise here
    fused = module.optimizers().optimizer.defaults["fused"]
    assert fused is (True if precision == "32-true" else None)
