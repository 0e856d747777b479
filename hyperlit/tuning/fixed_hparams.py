"""A plain image/MLP classifier trained with fixed or replayed regularization hyperparameters (STN paper, Table 1).

The baselines of a hyperparameter search (random search, TPE, grid search) and the two controls of Table 1 of
MacKay et al. (2019) train an *ordinary* network — no best-response layers — whose regularization strengths are
either fixed for the whole run or follow a schedule recorded by a Self-Tuning Network:

* fixed-value mode (``schedule=None``): every φ-step uses ``values`` (names not given keep their search-space
  ``init``, i.e. the STN's initial values; give 0 to switch a regularizer off);
* replay mode: ``schedule`` is the CSV a tuning run writes (``hparam_schedule.csv``, one row per λ-step with the
  columns ``phi_step``, ``epoch`` and one per scalar hyperparameter, see
  :meth:`~hyperlit.tuning.bilevel.BilevelModule.write_schedule_csv`). ``replay="step"`` (default): φ-step *n* uses
  the last row recorded after at most *n − 1* φ-steps, the values the STN's λ had when it took that step;
  ``replay="epoch"``: epoch *e* uses the last row of epoch *e* (the official per-epoch replay). Before the first
  row (the STN's warm-up) ``values`` apply.

The network is any :class:`~hyperlit.nn.stn.StnNet` (e.g. :class:`~hyperlit.models.stn_cnn.StnSmallCNN`); by
default it is turned into its :func:`plain_twin` — the same architecture with ordinary ``nn.Conv2d``/``nn.Linear``
layers — so the regularizers (per-example dropout, input dropout/scaling, colour jitter, cutout) are exactly the
code the STN uses, at one value for the whole batch, while the layers cost what plain layers cost. Discrete
hyperparameters are floored, as the STN floors them.

Optimization is manual (like every hyperlit module): one optimizer over the weights (``optimizer``, default SGD
lr 0.01 with momentum 0.9, and an optional per-epoch ``lr_scheduler``), an own step counter (``steps``, a buffer saved
in checkpoints) that drives the replay, and a checkpointed generator for every mask. Training, validation and test
log ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` (``test/…``), the keys
:class:`~hyperlit.tuning.stn.SelfTuningModule` logs, so one harness can compare both: ``torchmetrics`` metrics (a
batch-size-weighted mean loss, micro accuracy), reduced over DDP ranks.
"""

from __future__ import annotations

import copy
import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from hyperlit.base import HyperlitModule
from hyperlit.hparams import Hyperparameter
from hyperlit.nn.stn import StnConv2d, StnLinear, StnNet
from hyperlit.optim import check_factories
from hyperlit.tuning.batches import unpack_xy
from hyperlit.tuning.metrics import weighted_mean
from hyperlit.tuning.schedule_replay import ReplaySchedule, load_schedule

__all__ = ["FixedHyperparameterModule", "PlainConv2d", "PlainLinear", "plain_twin"]


class PlainLinear(nn.Linear):
    """``nn.Linear`` that accepts (and ignores) the hypernetwork input of the STN layer it replaces."""

    def forward(self, x: Tensor, hnet_input: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return super().forward(x)


class PlainConv2d(nn.Conv2d):
    """``nn.Conv2d`` that accepts (and ignores) the hypernetwork input of the STN layer it replaces."""

    def forward(self, x: Tensor, hnet_input: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return super().forward(x)


def _plain_layer(layer: StnLinear | StnConv2d) -> nn.Module:
    """The ordinary layer computing the STN layer's general path ``W x + b`` (its weights copied)."""
    bias = layer.bias is not None
    new: nn.Module
    if isinstance(layer, StnLinear):
        new = PlainLinear(layer.in_features, layer.out_features, bias=bias)
    else:
        new = PlainConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=bias,
            padding_mode=layer.padding_mode,
        )
    scale = layer.elem_scalar.detach() if layer.elem_scalar is not None else 1.0
    with torch.no_grad():
        new.weight.copy_(layer.weight * scale)
        if bias:
            new.bias.copy_(layer.bias * scale)  # type: ignore[operator]
    return new.to(device=layer.weight.device, dtype=layer.weight.dtype)


def plain_twin(net: StnNet) -> StnNet:
    """A copy of ``net`` whose STN layers are ordinary layers (no response weights, no bottleneck ``V``).

    Each ``StnLinear``/``StnConv2d`` becomes a :class:`PlainLinear`/:class:`PlainConv2d` holding its general
    weights ``W, b``; everything else (normalisation, regularizers, augmentation, plain layers) is kept, so the
    twin computes the STN network's output at a zero response (``Vλ̃ = 0``) at the cost of a plain network.
    """

    def replace(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, (StnLinear, StnConv2d)):
                setattr(module, name, _plain_layer(child))
            else:
                replace(child)

    twin = copy.deepcopy(net)
    replace(twin)
    return twin


def _schedule_names(path: Path, names: list[str]) -> list[str]:
    """The tuned names that the schedule CSV has a column for (in ``names`` order)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"schedule file {path} does not exist (a tuning run writes <log_dir>/hparam_schedule.csv)"
        )
    with open(path, newline="") as fh:
        header = next(csv.reader(fh), [])
    present = [n for n in names if n in header]
    if not present:
        raise KeyError(f"{path} has none of the columns {names}; header: {header}")
    return present


class FixedHyperparameterModule(HyperlitModule):
    """Plain classifier with fixed or replayed regularization hyperparameters (manual optimization).

    Batches are taken apart by :meth:`unpack_batch`: tuples/lists ``(x, y, ...)`` and dicts with the keys
    ``x``/``y``, ``input``/``target`` or ``image``/``label``; override it for another layout.

    Args:
        net: An :class:`~hyperlit.nn.stn.StnNet` classifier (``forward(x, hnet_input, hparams, generator)``).
        values: Hyperparameter values by name (constrained scale); names not given keep their ``init``.
        hyperparameters: The search space the names and ranges come from; ``None``: ``net.default_hyperparameters()``.
        schedule: A schedule CSV path (or a :class:`~hyperlit.tuning.schedule_replay.ReplaySchedule`) to replay;
            ``None``: fixed-value mode.
        replay: ``step`` (the STN's values at every φ-step) or ``epoch`` (per-epoch replay).
        plain: Train the :func:`plain_twin` of ``net`` (default); ``False`` keeps the STN layers and feeds them a
            zero hypernetwork input (same outputs, twice the layer parameters).
        optimizer: Optimizer of every weight (the only optimizer; default SGD lr 0.01, momentum 0.9, as the STN's φ).
        lr_scheduler: Its learning-rate schedule, stepped once per epoch (``None``: constant).
        grad_clip: Gradient-norm clipping (``None``: off).
        seed: Seed of the module's generator (every dropout/augmentation draw).

    Raises:
        KeyError: ``values`` or the schedule name hyperparameters outside the search space, or the search space names
            hyperparameters the network does not use.
        ValueError: A value outside its range, or an invalid setting.
    """

    def __init__(
        self,
        net: StnNet,
        values: Mapping[str, float] | None = None,
        hyperparameters: list[Hyperparameter] | None = None,
        schedule: str | Path | ReplaySchedule | None = None,
        replay: Literal["step", "epoch"] = "step",
        plain: bool = True,
        optimizer: OptimizerCallable = lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        lr_scheduler: LRSchedulerCallable | None = None,
        grad_clip: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        if not isinstance(net, StnNet):
            raise TypeError(
                f"net must be an StnNet (e.g. hyperlit.models.stn_cnn.StnSmallCNN), got {type(net).__name__}"
            )
        if replay not in ("step", "epoch"):
            raise ValueError(f"replay must be 'step' or 'epoch', got {replay!r}")
        check_factories(optimizer=optimizer, lr_scheduler=lr_scheduler)
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
        entries = list(hyperparameters) if hyperparameters is not None else net.default_hyperparameters()
        known = set(getattr(net, "hparam_names", ()))
        foreign = [h.name for h in entries if h.name not in known]
        if foreign:
            raise KeyError(
                f"{type(net).__name__} does not use hyperparameters {foreign}; it understands {sorted(known)}"
            )
        self.space_entries = {h.name: h for h in entries}
        unknown = sorted(set(values or {}) - set(self.space_entries))
        if unknown:
            raise KeyError(
                f"values name unknown hyperparameters {unknown}; the search space has {list(self.space_entries)}"
            )
        self.values = {h.name: self._check(h, (values or {}).get(h.name, h.init)) for h in entries}
        if isinstance(schedule, (str, Path)):
            path = Path(schedule)
            schedule = load_schedule(path, _schedule_names(path, list(self.space_entries)))
        if schedule is not None:
            extra = [n for n in schedule.names if n not in self.space_entries]
            if extra:
                raise KeyError(
                    f"the schedule replays {extra}, which are not in the search space {list(self.space_entries)}"
                )
        self.schedule: ReplaySchedule | None = schedule
        self.replay = replay
        self.net = plain_twin(net) if plain else net
        self.plain = plain
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.grad_clip = grad_clip
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.save_hyperparameters(ignore=["net", "schedule"])

    @staticmethod
    def _check(h: Hyperparameter, value: float) -> float:
        value = float(value)
        if not (math.isfinite(value) and h.low <= value <= h.high):
            raise ValueError(f"{h.name}={value} lies outside its range [{h.low}, {h.high}]")
        return float(math.floor(value)) if h.discrete else value

    def current_values(self) -> dict[str, float]:
        """The hyperparameter values of the next φ-step (fixed, or from the replayed schedule)."""
        out = dict(self.values)
        if self.schedule is not None:
            replayed = (
                self.schedule.at_step(int(self.steps))
                if self.replay == "step"
                else self.schedule.at_epoch(self.current_epoch)
            )
            for name, v in (replayed or {}).items():
                h = self.space_entries[name]
                out[name] = float(math.floor(v)) if h.discrete else float(v)
        return out

    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of a training, validation or test batch: the one place a batch is taken apart.

        Accepts a tuple/list ``(x, y, ...)`` or a dict with the keys ``x``/``y``, ``input``/``target`` or
        ``image``/``label`` (see :func:`~hyperlit.tuning.batches.unpack_xy`); ``TypeError`` naming these forms
        otherwise. Override it for another layout.
        """
        return unpack_xy(batch, type(self).__name__)

    def _hnet(self, batch: int) -> Tensor | None:
        if self.plain:
            return None
        return torch.zeros(1, self.net.hdim, device=self.device).expand(batch, -1)

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Predictions (regularizers active only in train mode, at the current values; no augmentation)."""
        return self.net(x, self._hnet(x.shape[0]), self.current_values() if self.training else None, self.rng)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The network's outputs (eval mode) for the batch's inputs (a bare tensor batch is taken as the inputs)."""
        x = batch if isinstance(batch, Tensor) else self.unpack_batch(batch)[0]
        return self(x)

    @override
    def configure_optimizers(self) -> Any:
        """One optimizer over every weight (and its schedule, if one is given)."""
        opt = self.build_optimizer(self.optimizer, self.parameters(), "optimizer")
        return self.optimizers_config([opt], [self.build_scheduler(self.lr_scheduler, opt, "lr_scheduler")])

    @override
    def configure_metrics(self) -> MetricCollection:
        """Batch-size-weighted mean cross-entropy and micro accuracy."""
        metrics = {
            "loss": weighted_mean(),
            "acc": MulticlassAccuracy(num_classes=getattr(self.net, "num_classes", None), average="micro"),
        }
        return MetricCollection(metrics, compute_groups=False)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, Mapping) and "train" in batch:
            batch = batch["train"]  # a DataModule that served a tuning module yields {"train", "hyper"} batches
        x, y = self.unpack_batch(batch)
        values = self.current_values()
        x = self.net.augment(x, values, generator=self.rng)  # type: ignore[arg-type]
        out = self.net(x, self._hnet(x.shape[0]), values, generator=self.rng)  # type: ignore[arg-type]
        loss = F.cross_entropy(out, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at step {int(self.steps)} (epoch {self.current_epoch}); "
                f"hyperparameters {values}"
            )
        (opt,) = self.optimizer_list()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.grad_clip is not None:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        self.steps += 1
        metrics = self.stage_metrics("train")
        metrics["loss"](loss.detach(), y.shape[0])
        metrics["acc"].update(out.detach(), y)
        self.log("train/loss", metrics["loss"], prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/acc", metrics["acc"], on_step=False, on_epoch=True)

    def _eval(self, batch: Any, stage: str) -> None:
        x, y = self.unpack_batch(batch)
        out = self.net(x, self._hnet(x.shape[0]), None)
        metrics = self.stage_metrics(stage)
        metrics["loss"].update(F.cross_entropy(out, y), y.shape[0])
        metrics["acc"].update(out, y)
        self.log(f"{stage}/loss", metrics["loss"], prog_bar=True, on_step=False, on_epoch=True)
        self.log(f"{stage}/acc", metrics["acc"], on_step=False, on_epoch=True)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval(batch, "test")
