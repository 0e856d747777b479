"""Baselines in the same harness (task schedule, accuracy matrix, checkpointing) as the hypernetwork learner.

* **Fine-tuning** — no protection against forgetting. In the hypernetwork harness it is
  ``HyperContinualModule(beta=0)`` (:func:`hypernetwork_fine_tuning`); on a plain network it is
  ``EWCContinualModule(ewc_lambda=0)``.
* **(Online) EWC** — :class:`EWCContinualModule`: a plain network (a multi-head MLP by default, one head per task,
  task identity given, or the user's own ``nn.Module``) trained sequentially with the EWC penalty of
  :mod:`hyperlit.continual.ewc`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from typing_extensions import override

from hyperlit.continual.base import ContinualModule, PredictTask, TaskType
from hyperlit.continual.ewc import ewc_penalty, per_example_grad_sq
from hyperlit.continual.module import HyperContinualModule
from hyperlit.continual.regularizer import ParameterSnapshot
from hyperlit.continual.targets import TaskNormStats, check_outputs, check_target, prepare_heads
from hyperlit.models.mlp import MLP
from hyperlit.nn.functional import batched_call, call_with_weights
from hyperlit.optim import check_factories

__all__ = ["EWCContinualModule", "hypernetwork_fine_tuning"]


def hypernetwork_fine_tuning(**kwargs: Any) -> HyperContinualModule:
    """The fine-tuning baseline of the hypernetwork: the same module with β = 0 (no output regularizer)."""
    kwargs["beta"] = 0.0
    return HyperContinualModule(**kwargs)


class EWCContinualModule(ContinualModule):
    """Online EWC on a plain network (``ewc_lambda=0``: fine-tuning of the plain network).

    The diagonal Fisher of each task is estimated while the task is trained, from per-example gradients of the
    task loss (for networks of ``nn.Linear`` layers from one forward and one backward pass, otherwise vectorized
    with ``vmap``; see :func:`~hyperlit.continual.ewc.per_example_grad_sq`) on every ``fisher_every``-th batch, as an exponential moving average
    (decay ``fisher_decay`` per estimate, bias-corrected), so it reflects the parameters near the end of the task; at
    the next task
    boundary it is added to the running Fisher (``F ← γ F + F_t``) and θ* is set to the current parameters.

    **Network.** Without ``target`` the module builds an MLP from ``input_dim``/``hidden``/``activation``. Any
    ``nn.Module`` can be given instead (``target=MyCNN()``; ``input_dim``, ``hidden`` and ``activation`` are then
    unused), with the rules of :class:`~hyperlit.continual.module.HyperContinualModule`'s targets
    (:mod:`hyperlit.continual.targets`):

    * all its parameters are trained and protected by the penalty (normalisation layers' affine weights included);
    * the running statistics of its BatchNorm/InstanceNorm layers are kept **per task** (``task_norm_stats``,
      checkpointed): updated while a task trains, used when it is evaluated; the target's own buffers never change.
      The Fisher is estimated with the network in eval mode (the task's running statistics, no dropout);
    * ``heads="multihead"`` needs its last layer with parameters to be an ``nn.Linear``: one with ``output_dim``
      outputs is widened to ``num_tasks · output_dim`` (one slice per task), one with ``num_tasks · output_dim`` is
      kept; ``heads="shared"`` needs ``output_dim`` outputs per example;
    * it is not saved in the hyperparameters: give it again to ``load_from_checkpoint(path, target=MyCNN())``; a
      checkpoint of another architecture is refused.

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
        optimizer: Optimizer of the network's parameters (default Adam(lr=1e-3)); its state is cleared at every
            task start.
        infer_task: Also evaluate with the task inferred by minimum predictive entropy over the heads.
        predict_task: What ``predict_step`` predicts for: ``"batch"`` (each batch's task id), a task id, or
            ``"infer"`` (the trained task of lowest predictive entropy per example); see :class:`~hyperlit.continual.base.ContinualModule`.
        nan_policy: On a non-finite loss (NaN/inf input features, divergence): ``raise`` a ``FloatingPointError``
            naming the step and the task, or ``skip`` that step (no update, no Fisher estimate, a warning, counted
            in ``skipped_steps``). Every DDP rank takes the same decision.
        target: The network (any ``nn.Module``; see above); ``None``: the MLP built from ``input_dim``,
            ``hidden`` and ``activation``.
    """

    divergence_hint = "lower the learning rate or ewc_lambda"

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
        predict_task: PredictTask = "batch",
        nan_policy: Literal["raise", "skip"] = "raise",
        target: nn.Module | None = None,
    ) -> None:
        super().__init__(num_tasks=num_tasks, task_type=task_type, infer_task=infer_task, predict_task=predict_task)
        self.save_hyperparameters(ignore=["target"])
        if heads not in ("multihead", "shared"):
            raise ValueError(f"heads must be 'multihead' or 'shared', got {heads!r}")
        self.nan_policy = self.check_nan_policy(nan_policy)
        if target is not None:
            check_target(target, type(self).__name__)
        if ewc_lambda < 0 or not 0 <= ewc_gamma <= 1 or not 0 <= fisher_decay < 1 or fisher_every < 1:
            raise ValueError(
                f"need ewc_lambda >= 0, 0 <= ewc_gamma <= 1, 0 <= fisher_decay < 1 and fisher_every >= 1; got "
                f"{ewc_lambda}, {ewc_gamma}, {fisher_decay}, {fisher_every}"
            )
        check_factories(optimizer=optimizer)
        self.optimizer = optimizer
        self.output_dim = output_dim
        self.num_heads = num_tasks if heads == "multihead" else 1
        self.user_target = target is not None
        if target is None:
            target = MLP(input_dim, hidden, output_dim * self.num_heads, activation)
        else:
            target.requires_grad_(True)
            prepare_heads(target, heads, "shared", num_tasks, output_dim)
        self.net = target
        # running statistics of norm layers: one copy per task (T, *shape), read and updated through views
        self.task_norm_stats = TaskNormStats(self.net, num_tasks)
        #: training steps skipped under ``nan_policy="skip"`` (saved in checkpoints; equal on every rank)
        self.skipped_steps = 0
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

    @override
    def checkpoint_state(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    @override
    def restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def _heads(self, out: Tensor) -> Tensor:
        """(…, B, H·C) → (…, B, H, C)."""
        check_outputs(out, self.hparams.heads, self.num_heads, self.output_dim)
        return out.reshape(*out.shape[:-1], self.num_heads, self.output_dim)

    def _run(self, x: Tensor, task: int) -> Tensor:
        """The network's outputs (B, H·C) with the norm statistics of ``task`` (training updates them)."""
        if not self.task_norm_stats.names:
            return self.net(x)
        return call_with_weights(self.net, self.task_norm_stats.of(task), x)

    @override
    def forward(self, x: Tensor, task: int) -> Tensor:
        self._check_task_id(task)
        return self._heads(self._run(x, task))[:, task if self.num_heads > 1 else 0]

    @override
    def task_outputs(self, x: Tensor, tasks: Tensor) -> Tensor:
        idx = tasks.to(x.device) if self.num_heads > 1 else torch.zeros_like(tasks, device=x.device)
        if not self.task_norm_stats.names:
            out = self._heads(self.net(x))  # one forward pass serves every candidate task
            return out[:, idx].transpose(0, 1)
        # one pass per candidate task, each with that task's norm statistics (vectorized): (K, B, H, C)
        out = self._heads(batched_call(self.net, self.task_norm_stats.of(tasks.to(x.device)), x))
        return out[torch.arange(len(idx), device=x.device), :, idx]

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

        was_training = self.net.training
        self.net.eval()  # per-example gradients: the task's running statistics, no dropout
        try:
            params = dict(self.net.named_parameters())
            batch = per_example_grad_sq(self.net, params, loss_one, x, y, buffers=self.task_norm_stats.of(task))
        finally:
            self.net.train(was_training)
        d = self.hparams.fisher_decay
        for name, f in self.fisher_running.as_dict().items():
            f.mul_(d).add_(batch[name], alpha=1 - d)
        self.fisher_batches += 1

    @override
    def train_on_batch(self, x: Tensor, y: Tensor, task: int) -> dict[str, Tensor]:
        opt = self.optimizer_list()[0]
        opt.zero_grad()
        saved = None
        if self.nan_policy == "skip" and self.task_norm_stats.names:  # a skipped step must not leave NaN statistics
            saved = self.task_norm_stats.save(task)
        loss_task = self.task_loss(self(x, task), y)
        logs = {"loss": loss_task, "loss_task": loss_task}
        loss = loss_task
        if self.hparams.ewc_lambda > 0 and task > 0:
            penalty = ewc_penalty(dict(self.net.named_parameters()), self.anchor.as_dict(), self.fisher.as_dict())
            loss = loss_task + self.hparams.ewc_lambda * penalty
            logs["ewc_penalty"] = penalty.detach()
            logs["loss"] = loss.detach()
        self.manual_backward(loss)
        if not self.finite_or_handle(logs["loss"], x, task):  # one check (one host sync) per step
            self.task_norm_stats.restore(task, saved)
            return logs
        opt.step()
        last_task = task == self.num_tasks - 1
        if self.hparams.ewc_lambda > 0 and not last_task and int(self.step_in_task) % self.hparams.fisher_every == 0:
            self._update_fisher(x, y, task)
        return logs
