"""Baselines in the same harness (task schedule, accuracy matrix, checkpointing) as the hypernetwork learner.

* **Fine-tuning** — no protection against forgetting. In the hypernetwork harness it is
  ``HyperContinualModule(beta=0)`` (:func:`hypernetwork_fine_tuning`); on a plain network it is
  ``EWCContinualModule(ewc_lambda=0)``.
* **(Online) EWC** — :class:`EWCContinualModule`: a plain multi-head MLP (one head per task, task identity given)
  trained sequentially with the EWC penalty of :mod:`hyperlit.continual.ewc`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from typing_extensions import override

from hyperlit.continual.base import ContinualModule, TaskType
from hyperlit.continual.ewc import ewc_penalty, per_example_grad_sq
from hyperlit.continual.module import HyperContinualModule
from hyperlit.continual.regularizer import ParameterSnapshot
from hyperlit.models.mlp import MLP
from hyperlit.optim import check_factories

__all__ = ["EWCContinualModule", "hypernetwork_fine_tuning"]


def hypernetwork_fine_tuning(**kwargs: Any) -> HyperContinualModule:
    """The fine-tuning baseline of the hypernetwork: the same module with β = 0 (no output regularizer)."""
    kwargs["beta"] = 0.0
    return HyperContinualModule(**kwargs)


class EWCContinualModule(ContinualModule):
    """Online EWC on a plain MLP (``ewc_lambda=0``: fine-tuning of the plain network).

    The diagonal Fisher of each task is estimated while the task is trained, from per-example gradients of the
    task loss (vectorized with ``vmap``) on every ``fisher_every``-th batch, as an exponential moving average
    (decay ``fisher_decay`` per estimate, bias-corrected), so it reflects the parameters near the end of the task; at
    the next task
    boundary it is added to the running Fisher (``F ← γ F + F_t``) and θ* is set to the current parameters.

    Args:
        num_tasks: Number of tasks.
        input_dim: Inputs of the MLP.
        output_dim: Outputs per task.
        hidden: Hidden layer sizes.
        activation: Nonlinearity.
        heads: ``multihead`` (one output head per task, task identity given) or ``shared`` (one head).
        task_type: ``classification`` or ``regression``.
        ewc_lambda: Penalty strength λ (van de Ven & Tolias: 100–5,000 for PermutedMNIST).
        ewc_gamma: Decay γ of the online Fisher (1: plain sum).
        fisher_decay: Decay of the moving average of the per-batch Fisher estimates within a task.
        fisher_every: Estimate the Fisher on every n-th training batch (per-example gradients cost about as much
            as the training step itself).
        optimizer: Optimizer of the MLP's parameters (default Adam(lr=1e-3)); its state is cleared at every task
            start.
        infer_task: Also evaluate with the task inferred by minimum predictive entropy over the heads.
    """

    def __init__(
        self,
        num_tasks: int = 5,
        input_dim: int = 1024,
        output_dim: int = 10,
        hidden: tuple[int, ...] = (100, 100),
        activation: str = "relu",
        heads: Literal["multihead", "shared"] = "multihead",
        task_type: TaskType = "classification",
        ewc_lambda: float = 100.0,
        ewc_gamma: float = 1.0,
        fisher_decay: float = 0.9,
        fisher_every: int = 10,
        optimizer: OptimizerCallable = lambda p: torch.optim.Adam(p, lr=1e-3),
        infer_task: bool = True,
    ) -> None:
        super().__init__(num_tasks=num_tasks, task_type=task_type, infer_task=infer_task)
        self.save_hyperparameters()
        if heads not in ("multihead", "shared"):
            raise ValueError(f"heads must be 'multihead' or 'shared', got {heads!r}")
        if ewc_lambda < 0 or not 0 <= ewc_gamma <= 1 or not 0 <= fisher_decay < 1 or fisher_every < 1:
            raise ValueError(
                f"need ewc_lambda >= 0, 0 <= ewc_gamma <= 1, 0 <= fisher_decay < 1 and fisher_every >= 1; got "
                f"{ewc_lambda}, {ewc_gamma}, {fisher_decay}, {fisher_every}"
            )
        check_factories(optimizer=optimizer)
        self.optimizer = optimizer
        self.output_dim = output_dim
        self.num_heads = num_tasks if heads == "multihead" else 1
        self.net = MLP(input_dim, hidden, output_dim * self.num_heads, activation)
        self.anchor = ParameterSnapshot(self.net)
        self.fisher = ParameterSnapshot(self.net)
        self.fisher_running = ParameterSnapshot(self.net)
        self.register_buffer("fisher_batches", torch.tensor(0, dtype=torch.long))

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One optimizer (``optimizer``) over the MLP's parameters."""
        return self.build_optimizer(self.optimizer, self.net.parameters(), "optimizer")

    @override
    def checkpoint_identity(self) -> dict[str, Any]:
        return {**super().checkpoint_identity(), "heads": self.hparams.heads}

    def _heads(self, out: Tensor) -> Tensor:
        """(B, H·C) → (B, H, C)."""
        return out.reshape(len(out), self.num_heads, self.output_dim)

    @override
    def forward(self, x: Tensor, task: int) -> Tensor:
        self._check_task_id(task)
        return self._heads(self.net(x))[:, task if self.num_heads > 1 else 0]

    @override
    def task_outputs(self, x: Tensor, tasks: Tensor) -> Tensor:
        out = self._heads(self.net(x))  # one forward pass serves every candidate task
        idx = tasks.to(out.device) if self.num_heads > 1 else torch.zeros_like(tasks, device=out.device)
        return out[:, idx].transpose(0, 1)

    @torch.no_grad()
    @override
    def on_task_start(self, task: int) -> None:
        if task == 0:
            return
        n = int(self.fisher_batches)
        if n > 0:
            correction = 1.0 - self.hparams.fisher_decay**n
            for name, f in self.fisher.as_dict().items():
                f.mul_(self.hparams.ewc_gamma).add_(self.fisher_running.as_dict()[name] / correction)
        self.anchor.copy_from(self.net)
        for f in self.fisher_running.as_dict().values():
            f.zero_()
        self.fisher_batches.zero_()

    @torch.no_grad()
    def _update_fisher(self, x: Tensor, y: Tensor, task: int) -> None:
        head = task if self.num_heads > 1 else 0

        def loss_one(out: Tensor, target: Tensor) -> Tensor:
            return self.task_loss(self._heads(out)[:, head], target)

        batch = per_example_grad_sq(self.net, dict(self.net.named_parameters()), loss_one, x, y)
        d = self.hparams.fisher_decay
        for name, f in self.fisher_running.as_dict().items():
            f.mul_(d).add_(batch[name], alpha=1 - d)
        self.fisher_batches += 1

    @override
    def train_on_batch(self, x: Tensor, y: Tensor, task: int) -> dict[str, Tensor]:
        opt = self.optimizer_list()[0]
        opt.zero_grad()
        loss_task = self.task_loss(self(x, task), y)
        logs = {"loss": loss_task, "loss_task": loss_task}
        loss = loss_task
        if self.hparams.ewc_lambda > 0 and task > 0:
            penalty = ewc_penalty(dict(self.net.named_parameters()), self.anchor.as_dict(), self.fisher.as_dict())
            loss = loss_task + self.hparams.ewc_lambda * penalty
            logs["ewc_penalty"] = penalty.detach()
            logs["loss"] = loss.detach()
        self.manual_backward(loss)
        opt.step()
        last_task = task == self.num_tasks - 1
        if self.hparams.ewc_lambda > 0 and not last_task and int(self.step_in_task) % self.hparams.fisher_every == 0:
            self._update_fisher(x, y, task)
        return logs
