"""Self-Tuning Networks as a LightningModule (MacKay, Vicol et al., ICLR 2019, Alg. 1).

The alternating loop (warm-up, T_train φ-steps per T_val λ-steps, σ tuning with the entropy term, the optimizers
``[φ, λ, σ]``, clipping, LR schedule, NaN guard, own counters, checkpointed generator, per-λ-step schedule) lives in
:class:`~hyperlit.tuning.bilevel.BilevelModule`; this module adds what is specific to STN:

* the network is an :class:`~hyperlit.nn.stn.StnNet` (structured best response, e.g. the models of
  :mod:`hyperlit.models.stn_cnn`, or any plain network converted with :func:`~hyperlit.nn.stn.convert_to_stn`);
* φ-step: per-example perturbed λ_b drive the hypernet input *and*, through their constrained values, the
  per-example regularizers (dropout, augmentation, cutout) — training mode, augmentation on;
* λ-step: eval mode (no dropout), **no augmentation**; the regularizer strengths are detached, so the
  hypergradient reaches λ only through the response path ``∂L_val/∂ŵ · ∂ŵ_φ/∂λ``;
* Lightning's validation/test loops evaluate at the current λ without perturbation: ``val/loss`` (batch-size
  weighted mean) and ``val/acc`` (micro accuracy), ``torchmetrics`` metrics, so under DDP the value of the whole split.

Where the hyper split comes from: see :mod:`hyperlit.streams` (every hyperlit DataModule serves it; a user's
DataModule with only train/val loaders is wrapped in :class:`~hyperlit.streams.HyperStreamDataModule`, which
``hyperlit fit`` does by itself).
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from hyperlit.hparams import Hyperparameter
from hyperlit.nn.stn import StnNet
from hyperlit.tuning.bilevel import BilevelModule

__all__ = ["SelfTuningModule", "resolve_hyperparameters"]


def resolve_hyperparameters(
    net: StnNet, hyperparameters: list[Hyperparameter] | None, tune: list[str] | None
) -> list[Hyperparameter]:
    """The tuned entries: ``hyperparameters`` or the network's defaults, restricted to ``tune`` (in that order).

    Raises ``KeyError`` for names the network does not understand (they would silently do nothing).
    """
    entries = list(hyperparameters) if hyperparameters is not None else net.default_hyperparameters()
    if tune is not None:
        by_name = {h.name: h for h in entries}
        missing = [n for n in tune if n not in by_name]
        if missing:
            raise KeyError(f"tune names unknown hyperparameters {missing}; available: {list(by_name)}")
        entries = [by_name[n] for n in tune]
    known = set(getattr(net, "hparam_names", ()))
    unknown = [h.name for h in entries if h.name not in known]
    if unknown:
        raise KeyError(f"{type(net).__name__} does not use hyperparameters {unknown}; it understands {sorted(known)}")
    return entries


class SelfTuningModule(BilevelModule):
    """Self-Tuning Network training: a structured best-response network and its hyperparameters, tuned jointly.

    Args:
        net: The STN network (``forward(x, hnet_input, hparams, generator)``), e.g.
            :class:`~hyperlit.models.stn_cnn.StnAlexNet`.
        hyperparameters: The search space; ``None`` uses ``net.default_hyperparameters()``.
        tune: Optional subset (by name) of the search space to tune; the others stay at the network's ``fixed``
            values.
        loss: ``cross_entropy`` (classification, also logs accuracy) or ``mse`` (regression).
        plot_schedule: Add a :class:`~hyperlit.callbacks.hparam_schedule.HyperparameterSchedule` callback (CSV +
            plot of the per-λ-step values).
        **kwargs: The loop's settings (T_train/T_val, warm-up, τ, σ tuning, the optimizers ``phi_optimizer``,
            ``hyper_optimizer``, ``sigma_optimizer`` and ``phi_lr_scheduler``, clipping, NaN policy, seed): see
            :class:`~hyperlit.tuning.bilevel.BilevelModule`. Defaults follow the official CNN code (φ: SGD lr 0.01,
            momentum 0.9; λ, σ: Adam lr 3e-3) except where the paper's command line differs (τ = 1e-3).

    The network is not part of the saved init arguments (it is saved with the weights): rebuild it when loading,
    ``SelfTuningModule.load_from_checkpoint(path, net=StnMLP(...))``; ``hyperlit fit --ckpt_path`` does this from
    the config.
    """

    def __init__(
        self,
        net: StnNet,
        hyperparameters: list[Hyperparameter] | None = None,
        tune: list[str] | None = None,
        loss: Literal["cross_entropy", "mse"] = "cross_entropy",
        plot_schedule: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(net, StnNet):
            raise TypeError(
                f"net must be an StnNet (e.g. hyperlit.models.stn_cnn.StnMLP or convert_to_stn(model)), got {type(net).__name__}"
            )
        if loss not in ("cross_entropy", "mse"):
            raise ValueError(f"loss must be 'cross_entropy' or 'mse', got {loss!r}")
        entries = resolve_hyperparameters(net, hyperparameters, tune)
        super().__init__(hyperparameters=entries, **kwargs)
        if net.hdim != self.space.dim:
            if getattr(net, "_hdim_auto", False):
                net.set_hdim(self.space.dim)
            else:
                raise ValueError(
                    f"{type(net).__name__} was built with hdim={net.hdim} but {self.space.dim} hyperparameter columns "
                    f"are tuned ({self.space.names}); set the network's hdim to {self.space.dim} or leave it None"
                )
        self.net = net
        self.loss_name = loss
        self.plot_schedule = plot_schedule
        self.save_hyperparameters(ignore=["net"])

    # -- helpers ----------------------------------------------------------------------------------------
    def hnet_input(self, lam: Tensor) -> Tensor:
        """What the hypernetwork sees for per-example unconstrained values ``lam`` (B, H): the space's mapping
        (unconstrained or constrained values, STN eq. 9); :class:`~hyperlit.tuning.delta_stn.DeltaSelfTuningModule`
        centres it at the current λ."""
        return self.space.hnet_input(lam)

    def hparam_dict(self, unconstrained: Tensor) -> dict[str, Tensor]:
        """Constrained per-example values by name (detached: regularizers never carry gradient to λ)."""
        values = self.space.constrained(unconstrained.detach())
        return {name: self.space.get(values, name) for name in self.space.names}

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.loss_name == "mse":
            return F.mse_loss(out.squeeze(-1) if out.dim() == y.dim() + 1 else out, y.to(out.dtype))
        return F.cross_entropy(out, y)

    @override
    def forward(self, x: Tensor, lam: Tensor | None = None) -> Tensor:
        """Predictions at per-example unconstrained hyperparameters ``lam`` (default: the current λ, unperturbed)."""
        lam = self.space.repeat(x.shape[0]) if lam is None else lam
        return self.net(x, self.hnet_input(lam), self.hparam_dict(lam), generator=self.rng)

    # -- the two objectives -------------------------------------------------------------------------
    @override
    def train_loss(self, batch: Any, lam: Tensor) -> Tensor:
        """Training loss at the perturbed λ_b: per-example augmentation and regularizers (train mode)."""
        x, y = self.unpack_batch(batch)
        hp = self.hparam_dict(lam)
        x = self.net.augment(x, hp, generator=self.rng)
        hnet = self.hnet_input(lam)
        out = self.net(x, hnet, hp, generator=self.rng)
        loss = self._loss(out, y)
        penalty = self.net.penalty(hnet, hp)
        if penalty is not None:
            loss = loss + penalty.mean()
        if self.loss_name == "cross_entropy" and self._trainer is not None:
            acc = self.stage_metrics("train")["acc"]
            acc.update(out.detach(), y)
            self.log("train/acc", acc, on_step=False, on_epoch=True)
        return loss

    @override
    def hyper_loss(self, batch: Any, lam: Tensor) -> Tensor:
        """Held-out loss (eval mode, no augmentation); λ's gradient flows only through the hypernet input."""
        x, y = self.unpack_batch(batch)
        out = self.net(x, self.hnet_input(lam), self.hparam_dict(lam))
        return self._loss(out, y)

    @override
    def evaluate(self, batch: Any) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Loss (and logits, labels for the accuracy) at the current, unperturbed λ."""
        x, y = self.unpack_batch(batch)
        lam = self.space.repeat(x.shape[0])
        # one shared row (stride-0 expansion): STN layers fold W + diag(Vλ̃) W_h once and run plain matmuls
        hnet = self.hnet_input(lam[:1]).expand(x.shape[0], -1)
        out = self.net(x, hnet, self.hparam_dict(lam))
        return self._loss(out, y), ((out, y) if self.loss_name == "cross_entropy" else None)

    @override
    def configure_metrics(self) -> MetricCollection:
        """Loss, plus the micro accuracy of classifiers (``loss="cross_entropy"``)."""
        metrics = super().configure_metrics()
        if self.loss_name == "cross_entropy":
            metrics.add_metrics(
                {"acc": MulticlassAccuracy(num_classes=getattr(self.net, "num_classes", None), average="micro")}
            )
        return metrics

    # -- Lightning ------------------------------------------------------------------------------------
    @override
    def configure_callbacks(self) -> list[Callback]:
        if not self.plot_schedule:
            return []
        from hyperlit.callbacks.hparam_schedule import HyperparameterSchedule

        return [HyperparameterSchedule()]

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        val = self.trainer.callback_metrics.get("val/loss")
        if val is not None:
            self.info(f"Final validation loss: {float(val):.4f}")
