"""BatchEnsemble as a LightningModule (Wen, Tran & Ba, ICLR 2020, §3).

K members share every weight ``W`` of the user's network and own rank-1 fast weights, ``W_k = W ⊙ (s_k r_kᵀ)``
(:mod:`hyperlit.nn.batch_ensemble`). Training follows google/uncertainty-baselines' ``batchensemble.py``: every
batch of N examples is tiled K times member-major, so every member sees the same examples, and the loss is the mean
cross-entropy over the K·N rows (the mean of the members' losses) plus the L2 penalty ``c · Σ ‖W‖²`` (Keras
convention, no ½) on the shared kernels only — the fast weights and member biases get no L2, and their learning
rate is ``fast_lr_multiplier`` × the shared weights' (UB: 0.5). Evaluation averages the members' probabilities
(:class:`~hyperlit.ensembles.base.EnsembleModule`).

Optimization is manual: one optimizer (``optimizer``) over two parameter groups, ``[shared weights, fast
weights]``, an optional per-epoch ``lr_scheduler``, and an own step counter ``steps`` saved in checkpoints.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from typing_extensions import override

from hyperlit.ensembles.base import EnsembleModule
from hyperlit.nn.batch_ensemble import BatchEnsembleModel, convert_to_batch_ensemble, tile_members
from hyperlit.optim import check_factories
from hyperlit.tuning.metrics import weighted_mean

__all__ = ["BatchEnsembleModule", "fast_weight_groups", "kernel_sq_norm"]


def fast_weight_groups(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    """Scale the learning rate of the fast-weight group (the optimizer's second group) by ``multiplier`` and switch
    its weight decay off (BatchEnsemble's fast weights carry no L2)."""
    if len(optimizer.param_groups) != 2:
        raise ValueError(
            f"the optimizer factory must keep the two parameter groups it is given [shared, fast], got "
            f"{len(optimizer.param_groups)} groups"
        )
    group = optimizer.param_groups[1]
    group["lr"] = group["lr"] * multiplier
    if "initial_lr" in group:
        group["initial_lr"] = group["initial_lr"] * multiplier
    if "weight_decay" in group:
        group["weight_decay"] = 0.0


def kernel_sq_norm(params: list[nn.Parameter]) -> Tensor:
    """``Σ ‖W‖²`` over the kernels (parameters with two or more dimensions) of ``params``."""
    kernels = [p for p in params if p.dim() > 1]
    if not kernels:
        return torch.zeros(())
    return torch.stack([p.pow(2).sum() for p in kernels]).sum()


class BatchEnsembleModule(EnsembleModule):
    """BatchEnsemble of a user's classifier: K rank-1 members sharing its weights, trained and evaluated at once.

    Args:
        model: A plain classifier (its ``nn.Linear``/``nn.Conv2d`` layers become BatchEnsemble layers via
            :func:`~hyperlit.nn.batch_ensemble.convert_to_batch_ensemble`, the shared weights copied from it) or an
            already converted :class:`~hyperlit.nn.batch_ensemble.BatchEnsembleModel`.
        ensemble_size: Number of members K (ignored for an already converted model, which has its own).
        num_classes: Number of classes.
        l2: Coefficient ``c`` of the penalty ``c · Σ ‖W‖²`` on the shared kernels (UB WRN-28-10: 3e-4).
        label_smoothing: Label smoothing of the training cross-entropy.
        fast_lr_multiplier: Learning rate of the fast weights (r, s, member biases) relative to the shared weights.
        fast_init: Initialisation of the fast weights: ``normal`` (N(1, scale²), UB's WRN), ``random_sign`` (±1
            with P(+1) = scale, edward2's ``RandomSign``) or ``ones``.
        fast_init_scale: Its scale (UB: 0.5).
        skip: Dotted names of layers to keep shared without fast weights.
        optimizer: Optimizer factory over ``[shared, fast]`` parameter groups (default SGD lr 0.1, Nesterov
            momentum 0.9, UB's recipe).
        lr_scheduler: Optional learning-rate schedule, stepped once per epoch.
        grad_clip: Clip the gradient norm to this value (``None``: no clipping).
        seed: Seed of the fast-weight initialisation and of the module's generator.
    """

    def __init__(
        self,
        model: nn.Module,
        ensemble_size: int = 4,
        num_classes: int = 10,
        l2: float = 0.0,
        label_smoothing: float = 0.0,
        fast_lr_multiplier: float = 0.5,
        fast_init: Literal["normal", "random_sign", "ones"] = "normal",
        fast_init_scale: float = 0.5,
        skip: list[str] | None = None,
        optimizer: OptimizerCallable = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        lr_scheduler: LRSchedulerCallable | None = None,
        grad_clip: float | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(model, BatchEnsembleModel):
            net = model
        else:
            net = convert_to_batch_ensemble(
                model, ensemble_size, skip=skip or (), fast_init=fast_init, fast_init_scale=fast_init_scale, seed=seed
            )
        super().__init__(net.ensemble_size, num_classes, seed=seed)
        if l2 < 0 or not 0 <= label_smoothing < 1 or fast_lr_multiplier <= 0:
            raise ValueError(
                f"need l2 >= 0, 0 <= label_smoothing < 1 and fast_lr_multiplier > 0, got {l2}, {label_smoothing}, "
                f"{fast_lr_multiplier}"
            )
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
        check_factories(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.net = net
        self.l2 = float(l2)
        self.label_smoothing = float(label_smoothing)
        self.fast_lr_multiplier = float(fast_lr_multiplier)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.grad_clip = grad_clip
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        #: the mean training loss, a torchmetrics metric reduced over DDP ranks
        self.train_loss_metric = weighted_mean()
        self.save_hyperparameters(ignore=["model"])

    @override
    def checkpoint_identity(self) -> dict[str, Any]:
        return {"ensemble_size": self.ensemble_size}

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Member logits ``(K, N, C)``."""
        return self.net.member_outputs(x)

    @override
    def member_logits(self, x: Tensor) -> Tensor:
        return self.net.member_outputs(x)

    @override
    def configure_optimizers(self) -> Any:
        """One optimizer over ``[shared weights, fast weights]`` (fast: ``fast_lr_multiplier`` × lr, no decay)."""
        slow, fast = list(self.net.slow_parameters()), list(self.net.fast_parameters())
        opt = self.build_optimizer(self.optimizer, [{"params": slow}, {"params": fast}], "optimizer")
        fast_weight_groups(opt, self.fast_lr_multiplier)
        return self.optimizers_config([opt], [self.build_scheduler(self.lr_scheduler, opt, "lr_scheduler")])

    def train_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean member cross-entropy on the tiled batch plus the shared kernels' L2; also the member logits."""
        k = self.ensemble_size
        out = self.net(tile_members(x, k))
        loss = F.cross_entropy(out, y.repeat(k), label_smoothing=self.label_smoothing)
        if self.l2 > 0:
            loss = loss + self.l2 * kernel_sq_norm(list(self.net.slow_parameters())).to(loss)
        return loss, out.view(k, x.shape[0], -1)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self.unpack_batch(batch)
        (opt,) = self.optimizer_list()
        loss, _ = self.train_loss(x, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {int(self.steps)}")
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.grad_clip is not None:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        self.steps += 1
        self.train_loss_metric(loss.detach(), x.shape[0])
        self.log("train/loss", self.train_loss_metric, prog_bar=True, on_step=True, on_epoch=True)
        return loss.detach()
