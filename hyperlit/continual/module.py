"""Continual learning with task-conditioned hypernetworks (von Oswald, Henning, Grewe, Sacramento, ICLR 2020).

A hypernetwork h(e, θ) maps a learned task embedding e^(t) to the weights of a target MLP. Training task T
minimizes (Eq. 2)::

    L = L_task(h(e^(T), θ)) + β · R(θ),   R = 1/|S| Σ_{t∈S} ‖h(e^(t), θ*) − h(e^(t), θ + Δθ)‖²

with θ* the hypernetwork before task T, S all previous tasks or k of them drawn per step from a seeded generator
(identical on every process), and Δθ an optional detached look-ahead (``none`` | ``sgd`` | ``adam``).
See :mod:`hyperlit.continual.regularizer` for the vectorized regularizer and :mod:`hyperlit.continual.base` for
how the task sequence runs inside one ``fit``.

Optimizers, in this order (both built from injected factories; the state of both is cleared at every task
start): ``hnet_optimizer`` for θ (the hypernetwork, including chunk embeddings; the look-ahead reads this one) and
``emb_optimizer`` for the task-specific parameters (the task embeddings and, with ``heads="separate"``, the
per-task output heads). Both default to Adam(lr=1e-3, betas=(0.9, 0.999)), the official setting. ``grad_clip``
clips the joint gradient norm over both parameter sets. Both step on every batch, so Lightning's ``global_step``
(and with it ``ModelCheckpoint(every_n_train_steps)`` and ``max_steps``) counts 2 per batch. Old embeddings get no
gradient unless ``train_old_embeddings`` (paper default: frozen; hypnettorch's example lets them move).

Heads (task identity given):

* ``generated`` — the target has ``output_dim`` outputs; every task's generated weights include its own output
  layer (hypnettorch's setup; per-task heads implicitly).
* ``multihead`` — the target has ``num_tasks · output_dim`` outputs, all generated; task t reads its slice
  (the official PermutedMNIST code; the regularizer covers all heads, as there).
* ``separate`` — the output layer is an ordinary parameter (``num_tasks · output_dim`` outputs, task t's slice is
  its head), not generated; only the hidden layers come from the hypernetwork.

**Target network.** Without ``target`` the module builds an MLP from ``input_dim``/``hidden``/``activation``. Any
``nn.Module`` can be given instead (``target=MyCNN()``; ``input_dim``, ``hidden`` and ``activation`` are then
unused); it is run functionally (``torch.func.functional_call``) and:

* **every parameter of it is generated** per task (convolutions, linear layers, the affine weight and bias of
  normalisation layers), except the output head with ``heads="separate"``; its own parameters are only a template
  and never change;
* **normalisation statistics are kept per task.** The running mean/variance (and batch count) of every
  BatchNorm/InstanceNorm layer with ``track_running_stats=True`` are buffers, not generated: the module keeps one
  copy per task (``task_norm_stats``, checkpointed), updated while that task trains and used when it is evaluated,
  as hypnettorch does — one task's statistics would be wrong for another task's generated weights. The target's own
  buffers stay as they were. Layers built with ``track_running_stats=False`` use batch statistics throughout;
* **heads**: ``generated`` needs the target to return ``output_dim`` outputs per example; ``multihead`` and
  ``separate`` need its last layer with parameters (in registration order) to be an ``nn.Linear``: one with
  ``output_dim`` outputs is replaced by one with ``num_tasks · output_dim`` outputs (one slice per task), one that
  already has ``num_tasks · output_dim`` outputs is kept;
* it is not saved in the hyperparameters: give it again to ``load_from_checkpoint(path, target=MyCNN())``; the
  checkpoint records its parameter shapes, and a checkpoint of another architecture is refused.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from typing_extensions import override

from hyperlit.continual.base import ContinualModule, PredictTask, TaskType
from hyperlit.continual.metrics import compression_ratio, weight_drift
from hyperlit.continual.regularizer import (
    Lookahead,
    ParameterSnapshot,
    RegMethod,
    compute_targets,
    gram_is_cheaper,
    gram_regularization_loss,
    lookahead_delta,
    online_targets_bytes,
    regularization_loss,
    sample_previous_tasks,
    stored_targets_bytes,
)
from hyperlit.continual.targets import TaskNormStats, check_outputs, check_target, head_parameter_names, prepare_heads
from hyperlit.models.mlp import MLP
from hyperlit.nn.functional import batched_call, call_with_weights
from hyperlit.nn.hypernet import HyperNetwork
from hyperlit.optim import check_factories

__all__ = ["HyperContinualModule"]

Heads = Literal["generated", "multihead", "separate"]
HnetInit = Literal["default", "xavier"]
NanPolicy = Literal["raise", "skip"]


class HyperContinualModule(ContinualModule):
    """Task-conditioned hypernetwork with the output regularizer (full or chunked hypernetwork).

    Args:
        num_tasks: Number of tasks (one embedding each).
        input_dim: Inputs of the target MLP (1,024 for PermutedMNIST padded to 32×32, 784 unpadded, 1 for the toy).
        output_dim: Outputs per task (classes per task; 1 for regression).
        hidden: Hidden layer sizes of the target MLP.
        activation: Target MLP nonlinearity (``relu``, ``elu``, ``tanh``, ``sigmoid``).
        heads: ``generated`` | ``multihead`` | ``separate`` (see the module docstring).
        task_type: ``classification`` or ``regression``.
        hnet_hidden: Hidden layers of the hypernetwork (official: [25, 25] PermutedMNIST, [10, 10] toy).
        hnet_activation: Hypernetwork nonlinearity (``relu``, ``elu``, ``tanh``, ``sigmoid``, ``none``).
        chunk_size: Generate the target weights in chunks of this size (chunked hypernetwork); ``None``: full.
        chunk_emb_dim: Size of the chunk embeddings (shared by all tasks, part of θ).
        emb_dim: Size of the task embeddings.
        emb_init_std: Task embeddings are initialised N(0, emb_init_std²).
        hnet_out_init_std: Std of the hypernetwork's output-layer weights (``None``: PyTorch's default init).
        init_bias_from_target: Start the (full) hypernetwork's output bias at the target's default init.
        hnet_init: ``default`` (PyTorch's layer init, as hypnettorch) or ``xavier``, the official code's
            (:meth:`reset_hypernetwork`).
        beta: Regularization strength β (0 gives the fine-tuning baseline).
        reg_num_tasks: Regularize k random previous tasks per step (``None``: all).
        online_targets: Compute targets from a frozen θ* every step (memory ``|θ|``) instead of storing them
            (memory (T−1)·P); both are reported as ``cl/target_memory_bytes``.
        reg_method: How R is computed: ``materialize`` generates the k regularized tasks' weights (k, P) and
            compares them with the targets; ``gram`` gives the same value from Gram matrices of the hypernetwork's
            output layer at a cost independent of k (see :mod:`hyperlit.continual.regularizer`; needs the θ*
            snapshot, kept for it instead of stored targets); ``auto`` (default) takes ``gram`` for chunked
            hypernetworks from k·C ≥ 3(h+1) regularized rows (h the last hidden size) and ``materialize`` otherwise.
        lookahead: ``none`` (default; hypnettorch) | ``sgd`` | ``adam`` (the paper's, detached).
        train_old_embeddings: Let the regularizer move earlier tasks' embeddings.
        init_emb_from_previous: Start each new task embedding from the previous task's.
        hnet_optimizer: Optimizer of θ (the hypernetwork), e.g. ``lambda p: torch.optim.Adam(p, lr=1e-4)``; the
            ``adam`` look-ahead needs a plain ``torch.optim.Adam`` here.
        emb_optimizer: Optimizer of the task embeddings (and separate heads).
        grad_clip: Clip the gradient norm, joint over θ and the task-specific parameters, to this value (``None``:
            no clipping).
        infer_task: Also evaluate with the task inferred by minimum predictive entropy.
        predict_task: What ``predict_step`` predicts for: ``"batch"`` (each batch's task id), a task id, or
            ``"infer"`` (the trained task of lowest predictive entropy per example); see :class:`~hyperlit.continual.base.ContinualModule`.
        track_drift: Keep each task's generated weights at the end of its training (T·P floats) and log how far
            they drift afterwards.
        reg_seed: Seed of the generator that draws the regularized subset (same on every process).
        nan_policy: On a non-finite loss (NaN/inf input features, divergence): ``raise`` a ``FloatingPointError``
            naming the step and the task, or ``skip`` that step (no update, a warning, counted in
            ``skipped_steps``). Every DDP rank takes the same decision.
        target: The target network (any ``nn.Module``; see the module docstring); ``None``: the MLP built from
            ``input_dim``, ``hidden`` and ``activation``.
    """

    divergence_hint = "lower the learning rate or set grad_clip"

    def __init__(
        self,
        num_tasks: int = 5,
        input_dim: int = 1024,
        output_dim: int = 10,
        hidden: tuple[int, ...] = (100, 100),
        activation: str = "relu",
        heads: Heads = "generated",
        task_type: TaskType = "classification",
        hnet_hidden: tuple[int, ...] = (100, 100),
        hnet_activation: str = "relu",
        chunk_size: int | None = None,
        chunk_emb_dim: int = 8,
        emb_dim: int = 8,
        emb_init_std: float = 1.0,
        hnet_out_init_std: float | None = None,
        init_bias_from_target: bool = False,
        hnet_init: HnetInit = "default",
        beta: float = 0.01,
        reg_num_tasks: int | None = None,
        online_targets: bool = False,
        reg_method: RegMethod = "auto",
        lookahead: Lookahead = "none",
        train_old_embeddings: bool = False,
        init_emb_from_previous: bool = False,
        hnet_optimizer: OptimizerCallable = lambda p: torch.optim.Adam(p, lr=1e-3),
        emb_optimizer: OptimizerCallable = lambda p: torch.optim.Adam(p, lr=1e-3),
        grad_clip: float | None = None,
        infer_task: bool = True,
        predict_task: PredictTask = "batch",
        track_drift: bool = True,
        reg_seed: int = 0,
        nan_policy: NanPolicy = "raise",
        target: nn.Module | None = None,
    ) -> None:
        super().__init__(num_tasks=num_tasks, task_type=task_type, infer_task=infer_task, predict_task=predict_task)
        self.save_hyperparameters(ignore=["target"])
        if heads not in ("generated", "multihead", "separate"):
            raise ValueError(f"heads must be 'generated', 'multihead' or 'separate', got {heads!r}")
        self.check_nan_policy(nan_policy)
        if target is not None:
            check_target(target, type(self).__name__)
        if lookahead not in ("none", "sgd", "adam"):
            raise ValueError(f"lookahead must be 'none', 'sgd' or 'adam', got {lookahead!r}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if hnet_init not in ("default", "xavier"):
            raise ValueError(f"hnet_init must be 'default' or 'xavier', got {hnet_init!r}")
        if hnet_init == "xavier" and (hnet_out_init_std is not None or init_bias_from_target):
            raise ValueError(
                "hnet_init='xavier' sets every hypernetwork parameter: drop hnet_out_init_std/init_bias_from_target"
            )
        if reg_method not in ("auto", "materialize", "gram"):
            raise ValueError(f"reg_method must be 'auto', 'materialize' or 'gram', got {reg_method!r}")
        if reg_num_tasks is not None and reg_num_tasks < 1:
            raise ValueError(f"reg_num_tasks must be >= 1 or None (all previous tasks), got {reg_num_tasks}")
        if emb_dim < 1:
            raise ValueError(f"emb_dim must be >= 1, got {emb_dim}")
        check_factories(hnet_optimizer=hnet_optimizer, emb_optimizer=emb_optimizer)
        self.hnet_optimizer = hnet_optimizer
        self.emb_optimizer = emb_optimizer
        self.output_dim = output_dim
        self.nan_policy = nan_policy
        self.num_heads = 1 if heads == "generated" else num_tasks
        self.user_target = target is not None
        if target is None:
            target = MLP(input_dim, hidden, output_dim * self.num_heads, activation)
        else:
            target.requires_grad_(True)  # every parameter is generated (but the separate heads)
            prepare_heads(target, heads, "generated", num_tasks, output_dim)
        self.target = target
        self.head_names = head_parameter_names(self.target)
        self.hnet = HyperNetwork(
            self.target,
            cond_dim=emb_dim,
            hidden=hnet_hidden,
            activation=hnet_activation,  # type: ignore[arg-type]
            chunk_size=chunk_size,
            chunk_emb_dim=chunk_emb_dim,
            exclude=tuple(self.head_names) if heads == "separate" else (),
            out_init_std=hnet_out_init_std,
            init_bias_from_target=init_bias_from_target,
        )
        # generated tensors are not trained as ordinary parameters (and must not look unused to DDP)
        for name, p in self.target.named_parameters():
            p.requires_grad_(name not in self.hnet.shapes)
        # running statistics of norm layers: one copy per task (T, *shape), read and updated through views
        self.task_norm_stats = TaskNormStats(self.target, num_tasks)
        self.register_buffer("skipped_steps", torch.tensor(0, dtype=torch.long))
        self.task_embeddings = nn.Parameter(torch.randn(num_tasks, emb_dim) * emb_init_std)
        p_gen = self.hnet.num_target_params
        self.register_buffer("reg_targets", torch.zeros(0, p_gen))  # stored targets, grows to (T−1, P)
        # θ*: for online targets and for the Gram form (auto: only chunked hypernetworks can take it)
        keep_snapshot = online_targets or reg_method == "gram"
        keep_snapshot |= reg_method == "auto" and self.hnet.chunk_embeddings is not None
        self.theta_star = ParameterSnapshot(self.hnet) if keep_snapshot else None
        self.register_buffer("emb_star", torch.zeros(num_tasks, emb_dim))
        self.register_buffer("weights_after_task", torch.zeros(num_tasks if track_drift else 0, p_gen))
        self.register_generator("reg", reg_seed)  # draws the regularized subset, identically on every rank
        self._eval_weights: Tensor | None = None  # the seen tasks' weights, generated once per evaluation epoch
        self._eval_active = False
        if hnet_init == "xavier":
            self.reset_hypernetwork()
        big = ["reg_targets", "weights_after_task"]
        if self.theta_star is not None:
            big += [f"theta_star.{n}" for n, _ in self.theta_star.named_buffers()]
        # identical on every process by construction: no need for DDP to broadcast them each step (issue 9)
        self._ddp_params_and_buffers_to_ignore = big

    @torch.no_grad()
    def reset_hypernetwork(self) -> None:
        """The official code's initialisation (von Oswald et al. 2020, hypercl ``generate_classifier``): every
        hypernetwork matrix Xavier-uniform, every 1-D parameter 0, chunk embeddings N(0, 1) and task embeddings
        N(0, emb_init_std²), drawn in this order from the global generator."""
        for name, p in self.hnet.named_parameters():
            if name == "chunk_embeddings":
                p.normal_(0.0, 1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                nn.init.xavier_uniform_(p)
        self.task_embeddings.normal_(0.0, self.hparams.emb_init_std)

    # -- parameters ------------------------------------------------------------------------------------------
    def task_specific_parameters(self) -> list[nn.Parameter]:
        """Parameters owned by tasks: the embeddings and (``heads="separate"``) the output heads."""
        heads = [p for n, p in self.target.named_parameters() if p.requires_grad]
        return [self.task_embeddings, *heads]

    @override
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """``[hnet_optimizer(θ), emb_optimizer(task embeddings and separate heads)]``, in this order."""
        return [
            self.build_optimizer(self.hnet_optimizer, self.hnet.parameters(), "hnet_optimizer"),
            self.build_optimizer(self.emb_optimizer, self.task_specific_parameters(), "emb_optimizer"),
        ]

    def num_task_specific_params(self) -> int:
        return sum(p.numel() for p in self.task_specific_parameters())

    def compression(self) -> dict[str, float]:
        """Compression ratio with and without task embeddings (official counting: chunk embeddings in θ)."""
        return compression_ratio(self.hnet.num_parameters(), self.task_embeddings.numel(), self.hnet.num_target_params)

    # -- generation ----------------------------------------------------------------------------------------
    def generated_weights(self, tasks: Tensor) -> Tensor:
        """Flat generated target weights (K, P) for task ids (K,)."""
        return self.hnet.flat(self.task_embeddings[tasks])

    def _check_outputs(self, out: Any) -> Tensor:
        return check_outputs(out, self.hparams.heads, self.num_heads, self.output_dim)

    def _select_head(self, out: Tensor, tasks: Tensor) -> Tensor:
        """(K, B, H·C) outputs → (K, B, C) outputs of each row's task head."""
        self._check_outputs(out)
        if self.num_heads == 1:
            return out
        k, b = out.shape[:2]
        out = out.reshape(k, b, self.num_heads, self.output_dim)
        return out[torch.arange(k, device=out.device), :, tasks]

    def _evaluation_weights(self, tasks: Tensor) -> Tensor | None:
        """Flat weights of ``tasks`` from the evaluation epoch's cache (``None`` outside evaluation or beyond it).

        Inside a validation/test/predict epoch the parameters do not change, so the seen tasks' weights are
        generated once (lazily, on the first batch) and every batch only runs the target network.
        """
        if not self._eval_active or torch.is_grad_enabled():
            return None
        if self._eval_weights is None:
            seen = max(self.task + 1, 1)
            self._eval_weights = self.generated_weights(torch.arange(seen, device=self.task_embeddings.device))
        cached = self._eval_weights
        if len(tasks) == 1:
            t = int(tasks[0])
            return cached[t : t + 1] if t < len(cached) else None
        if int(tasks.max()) >= len(cached):
            return None
        if len(tasks) == len(cached) and bool((tasks == torch.arange(len(tasks), device=tasks.device)).all()):
            return cached
        return cached[tasks]

    def _evaluation_epoch(self, active: bool) -> None:
        self._eval_active = active
        self._eval_weights = None

    @override
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._evaluation_epoch(True)

    @override
    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._evaluation_epoch(False)

    @override
    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._evaluation_epoch(True)

    @override
    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._evaluation_epoch(False)

    @override
    def on_predict_epoch_start(self) -> None:
        super().on_predict_epoch_start()
        self._evaluation_epoch(True)

    @override
    def on_predict_epoch_end(self) -> None:
        super().on_predict_epoch_end()
        self._evaluation_epoch(False)

    @override
    def task_outputs(self, x: Tensor, tasks: Tensor) -> Tensor:
        tasks = tasks.to(self.task_embeddings.device)
        flat = self._evaluation_weights(tasks)
        weights = self.hnet.unflatten(self.generated_weights(tasks) if flat is None else flat)
        return self._select_head(batched_call(self.target, {**weights, **self.task_norm_stats.of(tasks)}, x), tasks)

    @override
    def forward(self, x: Tensor, task: int) -> Tensor:
        """Outputs (B, C) of the target network with the weights (and norm statistics) of ``task``."""
        self._check_task_id(task)
        weights = self.hnet(self.task_embeddings[task])
        out = self._check_outputs(call_with_weights(self.target, {**weights, **self.task_norm_stats.of(task)}, x))
        if self.num_heads == 1:
            return out
        return out.reshape(len(out), self.num_heads, self.output_dim)[:, task]

    # -- task boundaries ------------------------------------------------------------------------------------
    @torch.no_grad()
    @override
    def on_task_start(self, task: int) -> None:
        hp = self.hparams
        if task > 0:
            if hp.track_drift:
                self.weights_after_task[task - 1] = compute_targets(self.hnet, self.task_embeddings[task - 1 : task])[0]
            self.emb_star.copy_(self.task_embeddings)
            if hp.beta > 0:
                if self.theta_star is not None:
                    self.theta_star.copy_from(self.hnet)
                if not hp.online_targets and not self.uses_gram(task):
                    # all previous tasks' targets h(e_j, θ*), one batched call (HNT get_current_targets)
                    self.register_buffer("reg_targets", compute_targets(self.hnet, self.task_embeddings[:task]))
                else:
                    self.register_buffer("reg_targets", self.reg_targets.new_zeros(0, self.hnet.num_target_params))
            if hp.init_emb_from_previous:
                self.task_embeddings[task] = self.task_embeddings[task - 1]

    def uses_gram(self, task: int) -> bool:
        """Whether the regularizer of ``task`` takes the Gram form (``reg_method``; k is fixed within a task)."""
        method = self.hparams.reg_method
        if method != "auto" or task < 1:
            return method == "gram"
        k = task if self.hparams.reg_num_tasks is None else min(task, self.hparams.reg_num_tasks)
        return gram_is_cheaper(self.hnet, k)

    def target_memory_bytes(self) -> int:
        """Memory that the regularization targets take now (stored targets, and θ* + embeddings if kept)."""
        total = stored_targets_bytes(len(self.reg_targets), self.hnet.num_target_params)
        if self.theta_star is not None:
            total += online_targets_bytes(self.hnet, self.num_tasks, self.task_embeddings.shape[1])
        return total

    # -- training ---------------------------------------------------------------------------------------------
    def regularizer(self, task: int, delta: list[Tensor] | None = None) -> Tensor:
        """R(θ + Δθ) over the previous tasks drawn for this step (Eq. 2, one batched hypernetwork call)."""
        hp = self.hparams
        ids = sample_previous_tasks(task, hp.reg_num_tasks, self.generator("reg")).to(self.task_embeddings.device)
        emb = self.task_embeddings[ids]
        if not hp.train_old_embeddings:
            emb = emb.detach()
        named_delta = None
        if delta is not None:
            named_delta = {n: d for (n, _), d in zip(self.hnet.named_parameters(), delta)}
        if self.uses_gram(task):
            assert self.theta_star is not None
            theta_star = self.theta_star.as_dict()
            return gram_regularization_loss(self.hnet, emb, theta_star, self.emb_star[ids], named_delta)
        if self.theta_star is not None and hp.online_targets:
            return regularization_loss(
                self.hnet,
                emb,
                theta_star=self.theta_star.as_dict(),
                target_embeddings=self.emb_star[ids],
                delta=named_delta,
            )
        if len(self.reg_targets) < task:
            raise RuntimeError(f"stored targets cover {len(self.reg_targets)} tasks, need {task}")
        return regularization_loss(self.hnet, emb, targets=self.reg_targets[ids], delta=named_delta)

    @override
    def train_on_batch(self, x: Tensor, y: Tensor, task: int) -> dict[str, Tensor]:
        hp = self.hparams
        opt_hnet, opt_emb = self.optimizer_list()
        opt_hnet.zero_grad()
        opt_emb.zero_grad()
        saved = None
        if self.nan_policy == "skip" and self.task_norm_stats.names:  # a skipped step must not leave NaN statistics
            saved = self.task_norm_stats.save(task)
        loss_task = self.task_loss(self(x, task), y)
        logs = {"loss": loss_task, "loss_task": loss_task}
        if hp.beta > 0 and task > 0:
            if hp.lookahead == "none":
                reg = self.regularizer(task)
                self.manual_backward(loss_task + hp.beta * reg)
            else:  # Δθ from the task gradient alone (detached), then the regularizer at θ + Δθ
                self.manual_backward(loss_task)
                delta = lookahead_delta(opt_hnet.optimizer, list(self.hnet.parameters()), hp.lookahead)
                reg = self.regularizer(task, delta)
                self.manual_backward(hp.beta * reg)
            logs["reg"] = reg.detach()
            logs["loss"] = loss_task.detach() + hp.beta * reg.detach()
        else:
            self.manual_backward(loss_task)
        # one check (one host sync) per step, before any parameter changes
        if not self.finite_or_handle(logs["loss"], x, task):
            self.task_norm_stats.restore(task, saved)
            return logs
        if hp.grad_clip is not None:  # one norm over both optimizers' parameters
            params = [*self.hnet.parameters(), *self.task_specific_parameters()]
            torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
        opt_hnet.step()
        opt_emb.step()
        return logs

    # -- metrics & checkpointing ---------------------------------------------------------------------------------
    def weight_drift(self) -> Tensor:
        """‖h(e_j) − h(e_j)|after task j‖₂ for the tasks finished so far (needs ``track_drift``)."""
        done = max(self.task, 0)
        if not self.hparams.track_drift or done == 0:
            return torch.zeros(0)
        with torch.no_grad():
            now = compute_targets(self.hnet, self.task_embeddings[:done])
        return weight_drift(now, self.weights_after_task[:done])

    @override
    def extra_validation_metrics(self) -> dict[str, Tensor]:
        logs = {k: torch.tensor(v) for k, v in self.compression().items()}
        logs["cl/target_memory_bytes"] = torch.tensor(float(self.target_memory_bytes()))
        drift = self.weight_drift()
        for j, d in enumerate(drift):
            logs[f"cl/drift_task_{j}"] = d
        return logs

    @override
    def checkpoint_identity(self) -> dict[str, Any]:
        """The base's, the heads and the target network's parameter shapes (another architecture is refused)."""
        shapes = {n: list(p.shape) for n, p in self.target.named_parameters()}
        return {**super().checkpoint_identity(), "heads": self.hparams.heads, "target": shapes}

    @override
    def prepare_state_dict(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get("state_dict", {}).get("reg_targets")
        if stored is not None:  # the stored-target buffer grows per task: give it the saved shape first
            self.register_buffer("reg_targets", torch.zeros_like(stored, device=self.reg_targets.device))

    @override
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # the stored-target buffer grows per task; any load_state_dict (e.g. ddp_spawn handing rank 0's weights
        # back to the main process, which bypasses the checkpoint hooks) must take the saved shape
        stored = state_dict.get(prefix + "reg_targets")
        if stored is not None and stored.shape != self.reg_targets.shape:
            self.register_buffer("reg_targets", torch.zeros_like(stored, device=self.reg_targets.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
