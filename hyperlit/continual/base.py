"""Task schedule, evaluation and bookkeeping shared by every continual learner (hypernetwork and baselines).

**How a task sequence runs under Lightning: one ``fit`` with a task schedule.** The DataModule
(:mod:`datamodules.task_sequence`) serves task ``e // epochs_per_task`` in epoch e and tags every batch with its
task id. The module switches task at the first batch of a new task — that is where a subclass takes its
snapshot (θ*, stored targets, EWC anchor) in :meth:`ContinualModule.on_task_start` — and clears the state of
every optimizer (fresh Adam moments per task, as the official code rebuilds its optimizers). Lightning's
end-of-epoch validation then evaluates every task seen so far, which fills row i of the accuracy matrix R[i, j]
after the last epoch of task i. Tasks must arrive in order 0, 1, 2, …; a skipped or repeated-earlier task, or an
id outside ``0 .. num_tasks − 1``, raises.

**The task protocol: what a DataModule must provide** (:class:`datamodules.task_sequence.TaskSequenceDataModule`
does all of it; :meth:`ContinualModule.on_fit_start` and the first training step check it):

* ``num_tasks`` (equal to the module's) and ``num_schedule_epochs``, the epochs of the whole sequence (the module
  stops training after them); optionally ``task_type``, ``classes_per_task`` and ``input_dim``, checked against
  the module's;
* **a task schedule**: every training epoch serves batches of one task, tasks in order 0, 1, 2, …, each for one or
  more consecutive epochs (``epochs_per_task``). A task starting in the middle of an epoch raises — such a loader
  would train the whole sequence in one epoch and fill only the last row of R;
* batches ``(x, y, task)`` or dicts ``{"x", "y", "task"}``, one task per batch (``task`` an ``int`` or a tensor of
  equal ids);
* validation/test loaders that tag their batches the same way (one loader per task: ``dataloader_idx`` = task).

A plain DataModule (no ``num_tasks``/``num_schedule_epochs``, or ``(x, y)`` batches) is refused with a message
saying so at fit start or at the first step.

**Evaluation** accumulates a :class:`~hyperlit.continual.scores.TaskScores` metric (sums per task, reduced over
DDP ranks by torchmetrics) and, at the end of the epoch, every rank writes the synced scores into R and logs
``val/acc_task_j`` (``val/mse_task_j``), ``val/acc_mean_seen``, the inferred-task scores and the ``cl/*`` summary
of R. ``test`` logs ``test/acc_task_j`` (``test/mse_task_j``) under the test loader that served task j and the
means over the seen tasks once, under the last loader, so the table Lightning prints has one value per cell, and
keeps the scores in the ``test_scores`` buffer. A standalone ``trainer.validate`` logs the same way (``val/acc_task_j``
under loader j, ``val/acc_mean_seen`` and the inferred-task means under the last) and writes no row of R. Under DDP every rank may
evaluate a different part of each task's split (the DataModule shards it): the values are those of the whole
split.

All state that results depend on is checkpointed (persistent buffers: current task, step counters, accuracy
matrices, targets; :class:`~hyperlit.base.HyperlitModule`: generator states), and the DataModule stores its
position inside the epoch, so ``fit(ckpt_path=...)`` from a checkpoint taken in the middle of any task continues
exactly like an uninterrupted run. Training stops by itself after the last task (``trainer.should_stop``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from typing_extensions import override

from hyperlit.base import HyperlitModule
from hyperlit.continual.metrics import entropy_task_inference, summarize
from hyperlit.continual.scores import TaskScores

__all__ = ["ContinualModule"]

TaskType = Literal["classification", "regression"]
PredictTask = int | Literal["batch", "infer"]


class _ScoreView(Metric):
    """One scalar of a :class:`TaskScores`' scores, as a metric Lightning can log per test loader.

    It holds no state: ``compute`` reads the source's synced scores (``row`` of task ``task``, or the mean over the
    ``seen`` tasks when ``task`` is ``None``); ``reset`` leaves the source alone.
    """

    full_state_update = False

    def __init__(self, source: TaskScores, row: int, task: int | None, seen: int) -> None:
        super().__init__(sync_on_compute=False)  # the source syncs its own sums
        self.__dict__["_source"] = source  # not a submodule: the source is registered where it lives
        self.row, self.column, self.seen = row, task, seen

    @override
    def update(self) -> None:
        """Nothing to accumulate (the source is updated by the evaluation step)."""

    @override
    def compute(self) -> Tensor:
        scores = self.__dict__["_source"].compute()
        if self.column is None:
            return scores[self.row, : self.seen].mean()
        return scores[self.row, self.column]


class ContinualModule(HyperlitModule):
    """Base class: task switching, counters, accuracy matrix, task inference, checkpointed state.

    Subclasses implement :meth:`task_outputs`, :meth:`train_on_batch` and (optionally) :meth:`on_task_start`.

    Args:
        num_tasks: Number of tasks of the sequence (sizes the accuracy matrix and per-task parameters).
        task_type: ``classification`` (cross-entropy, accuracy) or ``regression`` (MSE; R holds MSE).
        infer_task: Also evaluate with the task inferred by minimum predictive entropy over all seen tasks
            (classification only).
        predict_task: The task :meth:`predict_step` predicts for: ``"batch"`` (the id each batch carries,
            ``(x, y, task)`` or a dict), a task id (every batch, which may then be ``x``, ``(x,)`` or ``(x, y)``),
            or ``"infer"`` (per example, the trained task of lowest predictive entropy, HNET+ENT; classification).
    """

    def __init__(
        self,
        num_tasks: int,
        task_type: TaskType = "classification",
        infer_task: bool = True,
        predict_task: PredictTask = "batch",
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if task_type not in ("classification", "regression"):
            raise ValueError(f"task_type must be 'classification' or 'regression', got {task_type!r}")
        self.num_tasks = num_tasks
        self.task_type = task_type
        self.infer_task = infer_task and task_type == "classification"
        if isinstance(predict_task, bool) or not (
            predict_task in ("batch", "infer") or (isinstance(predict_task, int) and 0 <= predict_task < num_tasks)
        ):
            raise ValueError(
                f"predict_task must be 'batch', 'infer' or a task id in 0..{num_tasks - 1}, got {predict_task!r}"
            )
        if predict_task == "infer" and task_type != "classification":
            raise ValueError("predict_task='infer' picks tasks by predictive entropy: classification tasks only")
        self.predict_task = predict_task
        nan = torch.full((num_tasks, num_tasks), math.nan)
        self.register_buffer("current_task", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("step_in_task", torch.tensor(0, dtype=torch.long))
        self.register_buffer("total_steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("acc_matrix", nan.clone())  # R[i, j], task id given
        self.register_buffer("inferred_acc_matrix", nan.clone())  # task id inferred by entropy
        self.register_buffer("task_inference_matrix", nan.clone())  # fraction of task j assigned to j
        self.register_buffer("test_scores", torch.full((3, num_tasks), math.nan))  # given, inferred, inference
        self._task: int | None = None  # Python mirror of current_task (no device sync per step)
        self.user_target = False  # a subclass given the user's own network sets this (input_dim is then unused)
        # the scalars logged per evaluation loader by test_step and a standalone validate (see test_step)
        self._eval_views: dict[str, dict[str, _ScoreView]] = {"val": {}, "test": {}}

    # -- to implement ----------------------------------------------------------------------------------
    def task_outputs(self, x: Tensor, tasks: Tensor) -> Tensor:
        """Outputs (K, B, C) of the network conditioned on each of the K task ids ``tasks`` for inputs x."""
        raise NotImplementedError

    def train_on_batch(self, x: Tensor, y: Tensor, task: int) -> dict[str, Tensor]:
        """One optimization step on a batch of ``task``; returns the values to log (``loss`` first)."""
        raise NotImplementedError

    def on_task_start(self, task: int) -> None:
        """Called once before the first step of every task (snapshots of the previous state go here)."""

    # -- base hooks ----------------------------------------------------------------------------------------
    @override
    def configure_metrics(self) -> MetricCollection:
        """One :class:`~hyperlit.continual.scores.TaskScores` (``scores``) per stage."""
        return MetricCollection({"scores": TaskScores(self.num_tasks, self.task_type)})

    @override
    def checkpoint_identity(self) -> dict[str, Any]:
        return {"num_tasks": self.num_tasks, "task_type": self.task_type}

    # -- helpers -----------------------------------------------------------------------------------------
    @property
    def higher_is_better(self) -> bool:
        return self.task_type == "classification"

    @property
    def task(self) -> int:
        """The task being trained (−1 before the first)."""
        if self._task is None:
            self._task = int(self.current_task)
        return self._task

    def task_loss(self, out: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy on the task's outputs, or MSE for regression."""
        if self.task_type == "classification":
            return F.cross_entropy(out, y)
        return F.mse_loss(out, y.view_as(out))

    @staticmethod
    def _unpack(batch: Any) -> tuple[Tensor, Tensor, int]:
        if isinstance(batch, dict):
            missing = [k for k in ("x", "y", "task") if k not in batch]
            if missing:
                raise ValueError(
                    f"a continual batch is a dict with keys 'x', 'y', 'task' (or a tuple (x, y, task)); this one has "
                    f"keys {sorted(batch)} and lacks {missing}: serve the task id of every batch"
                )
            x, y, task = batch["x"], batch["y"], batch["task"]
        elif isinstance(batch, (tuple, list)) and len(batch) == 3:
            x, y, task = batch
        else:
            what = (
                f"a {type(batch).__name__} of {len(batch)} items"
                if isinstance(batch, (tuple, list))
                else f"a {type(batch).__name__}"
            )
            raise ValueError(
                f"a continual batch is (x, y, task) or a dict with keys 'x', 'y', 'task'; got {what}: serve the task "
                "id of every batch (a datamodules.TaskSequenceDataModule does)"
            )
        if isinstance(task, Tensor):
            if task.numel() > 1 and not bool((task == task.flatten()[0]).all()):
                raise ValueError("a batch must hold examples of a single task")
            task = int(task.flatten()[0])
        return x, y, int(task)

    def _check_task_id(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise KeyError(f"unknown task id {task}; this module was built for tasks 0..{self.num_tasks - 1}")

    #: what :meth:`finite_or_handle` suggests when the inputs are finite but the loss is not
    divergence_hint = "lower the learning rate"

    def finite_or_handle(self, value: Tensor, x: Tensor, task: int) -> bool:
        """Whether ``value`` (the step's loss) is finite on every rank; if not,
        :meth:`~hyperlit.base.HyperlitModule.skip_or_raise` with a message naming the step, the task and the cause
        (``nan_policy``: the subclass's)."""
        if self.all_ranks(torch.isfinite(value).all()):
            return True
        cause = (
            "the batch's input features contain NaN/inf"
            if not bool(torch.isfinite(x).all())
            else f"the inputs are finite (diverging training? {self.divergence_hint})"
        )
        msg = (
            f"non-finite loss {value.detach().cpu().tolist()} at training step {int(self.total_steps)} "
            f"(batch {int(self.step_in_task)} of task {task}, epoch {self.current_epoch}): {cause}"
        )
        self.skip_or_raise(msg)
        return False

    def _reset_optimizer_state(self) -> None:
        if self._trainer is None:
            return
        for opt in self.optimizer_list():
            opt.optimizer.state.clear()

    def start_task(self, task: int) -> None:
        """Switch to ``task`` (the next one in order); a no-op if it is already the current task."""
        self._check_task_id(task)
        current = self.task
        if task == current:
            return
        if task != current + 1:
            raise ValueError(
                f"tasks must be trained in order 0, 1, 2, ...: got task {task} while the current task is {current}"
            )
        self.on_task_start(task)
        self.current_task.fill_(task)
        self.step_in_task.zero_()
        self._task = task
        self._reset_optimizer_state()

    # -- Lightning hooks -----------------------------------------------------------------------------------
    def datamodule_dims(self) -> dict[str, str]:
        """Hyperparameter name → DataModule attribute that must agree when both are set (checked at fit start)."""
        if self.user_target:  # input_dim sizes only the built-in MLP
            return {"output_dim": "classes_per_task"}
        return {"input_dim": "input_dim", "output_dim": "classes_per_task"}

    @override
    def on_fit_start(self) -> None:
        """Check the DataModule's side of the task protocol (``num_tasks``, ``num_schedule_epochs``, dimensions)."""
        dm = getattr(self.trainer, "datamodule", None)
        missing = [a for a in ("num_tasks", "num_schedule_epochs") if getattr(dm, a, None) is None]
        if missing:
            got = f"a {type(dm).__name__} without {' and '.join(f'`{a}`' for a in missing)}" if dm else "no DataModule"
            raise ValueError(
                f"{type(self).__name__} trains a task sequence, but fit got {got}. Give it a continual DataModule "
                "(e.g. a datamodules.TaskSequenceDataModule): `num_tasks`, `num_schedule_epochs` (the epochs of the "
                "task schedule, one task after another) and batches (x, y, task) or {'x', 'y', 'task'}; see "
                "hyperlit.continual.base"
            )
        n = dm.num_tasks
        if n != self.num_tasks:
            raise ValueError(
                f"the DataModule has num_tasks={n} but the module was built for num_tasks={self.num_tasks}"
            )
        kind = getattr(dm, "task_type", None)
        if kind is not None and kind != self.task_type:
            raise ValueError(f"the DataModule serves {kind} tasks but the module's task_type is {self.task_type!r}")
        for ours, theirs in self.datamodule_dims().items():
            a, b = self.hparams.get(ours), getattr(dm, theirs, None)
            if a is not None and b is not None and a != b:
                raise ValueError(f"the module's {ours}={a} does not match the DataModule's {theirs}={b}")

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, task = self._unpack(batch)
        if task != self.task and batch_idx > 0:
            raise ValueError(
                f"task {task} started at batch {batch_idx} of epoch {self.current_epoch} (after task {self.task}): "
                "a continual DataModule serves one task per epoch (task e // epochs_per_task in epoch e), so that the "
                "validation after each task fills its row of the accuracy matrix; this training loader changes task "
                "inside an epoch"
            )
        self.start_task(task)
        logs = self.train_on_batch(x, y, task)
        loss = logs["loss"].detach()
        self.step_in_task += 1
        self.total_steps += 1
        if self.should_log_step():
            logs = {f"train/{k}": v.detach() for k, v in logs.items()}
            shown = {"train/loss": logs.pop("train/loss"), "train/task": torch.tensor(float(task))}
            self.log_dict(logs, on_step=True, on_epoch=False)
            self.log_dict(shown, on_step=True, on_epoch=False, prog_bar=True)  # this rank's loss, the current task
        return loss

    @override
    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        dm = getattr(self.trainer, "datamodule", None)
        epochs = getattr(dm, "num_schedule_epochs", None)
        if epochs is not None and self.current_epoch + 1 >= epochs:
            self.trainer.should_stop = True  # the task sequence is over

    # -- evaluation -----------------------------------------------------------------------------------------
    def _scores(self, stage: str) -> TaskScores:
        return self.stage_metrics(stage)["scores"]  # type: ignore[return-value]

    @torch.no_grad()
    def _eval_step(self, batch: Any, seen: int, scores: TaskScores) -> int:
        """Add one evaluation batch to ``scores``; returns its task."""
        x, y, task = self._unpack(batch)
        self._check_task_id(task)
        if task >= seen:
            return task  # tasks not trained yet are not measured
        if self.infer_task:  # every seen task's outputs at once: (K, B, C)
            out = self.task_outputs(x, torch.arange(seen, device=x.device))
            scores.update(out[task], y, task, candidates=out)
        else:
            scores.update(self.task_outputs(x, torch.tensor([task], device=x.device))[0], y, task)
        return task

    @override
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._eval_views["val"] = {}

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accumulate the validation scores; a standalone ``trainer.validate`` logs them per loader like ``test``.

        Under ``fit`` the scores are logged once per epoch by ``on_validation_epoch_end`` (which also writes
        the row of the accuracy matrix). ``trainer.validate`` writes no row: it logs ``val/acc_task_j``
        (``val/mse_task_j``) in the column of the loader that served task j and ``val/acc_mean_seen``,
        ``val/acc_inferred_mean_seen``, ``val/task_inference_acc`` once, in the last column.
        """
        seen = self.task + 1
        task = self._eval_step(batch, seen, self._scores("val"))
        if seen >= 1 and self._trainer is not None and self.trainer.state.fn == "validate":
            self._log_loader_scores("val", task, dataloader_idx, seen)

    @override
    def on_validation_epoch_end(self) -> None:
        metric = self._scores("val")
        task = self.task
        if self.trainer.sanity_checking or task < 0 or self.trainer.state.fn != "fit":
            metric.reset()  # rows of R are written only by the validation that follows training
            return
        scores = metric.compute()  # synced over ranks: the whole split on every rank
        metric.reset()
        self.acc_matrix[task] = scores[0]
        if self.infer_task:
            self.inferred_acc_matrix[task] = scores[1]
            self.task_inference_matrix[task] = scores[2]
        name = "acc" if self.task_type == "classification" else "mse"
        logs = {f"val/{name}_task_{j}": scores[0, j] for j in range(task + 1)}
        logs[f"val/{name}_mean_seen"] = scores[0, : task + 1].mean()
        if self.infer_task:
            logs["val/acc_inferred_mean_seen"] = scores[1, : task + 1].mean()
            logs["val/task_inference_acc"] = scores[2, : task + 1].mean()
        for k, v in summarize(self.acc_matrix, self.higher_is_better).items():
            logs[f"cl/{k}"] = torch.tensor(v)
        logs.update(self.extra_validation_metrics())
        mean = f"val/{name}_mean_seen"  # synced over ranks (the scores' sums were reduced): shown on the progress bar
        self.log(mean, logs.pop(mean), prog_bar=True)
        self.log_dict(logs)

    def extra_validation_metrics(self) -> dict[str, Tensor]:
        """Additional values logged after each validation (e.g. the hypernetwork's weight drift)."""
        return {}

    @override
    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._eval_views["test"] = {}

    def _last_dataloader(self, stage: str) -> int:
        counts: Any = []
        if self._trainer is not None:
            counts = self.trainer.num_test_batches if stage == "test" else self.trainer.num_val_batches
        return len(counts) - 1 if isinstance(counts, list) and counts else 0

    def _log_score(self, stage: str, name: str, row: int, task: int | None, seen: int) -> None:
        """Log one scalar of the synced ``stage`` scores, computed when Lightning closes the current loader."""
        views = self._eval_views[stage]
        view = views.get(name)
        if view is None:
            view = views[name] = _ScoreView(self._scores(stage), row, task, seen)
        view.update()
        self.log(name, view, on_step=False, on_epoch=True, add_dataloader_idx=False, metric_attribute=name)

    def _log_loader_scores(self, stage: str, task: int, dataloader_idx: int, seen: int) -> None:
        """Task ``task``'s score under the current loader; the means over the seen tasks under the last loader."""
        name = "acc" if self.task_type == "classification" else "mse"
        seen_suffix = "_seen" if stage == "val" else ""  # the names fit's validation logs
        if task < seen:
            self._log_score(stage, f"{stage}/{name}_task_{task}", 0, task, seen)
        if dataloader_idx == self._last_dataloader(stage):
            self._log_score(stage, f"{stage}/{name}_mean{seen_suffix}", 0, None, seen)
            if self.infer_task:
                self._log_score(stage, f"{stage}/acc_inferred_mean{seen_suffix}", 1, None, seen)
                self._log_score(stage, f"{stage}/task_inference_acc", 2, None, seen)

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accumulate the test scores; log task j's score under its own loader and the means under the last one.

        Lightning prints (and ``trainer.test`` returns) one column (dict) per test loader: ``test/acc_task_j``
        (``test/mse_task_j``) appears in the column of the loader that served task j, the means over the seen tasks
        (``test/acc_mean``, ``test/acc_inferred_mean``, ``test/task_inference_acc``) once, in the last column. Each
        value is computed from the scores summed over DDP ranks when its loader ends.
        """
        seen = self.task + 1
        task = self._eval_step(batch, seen, self._scores("test"))
        if seen >= 1:
            self._log_loader_scores("test", task, dataloader_idx, seen)

    @override
    def on_test_epoch_end(self) -> None:
        metric = self._scores("test")
        seen = self.task + 1
        if seen < 1:  # nothing trained: nothing measured
            metric.reset()
            self.test_scores.fill_(math.nan)
            return
        self.test_scores.copy_(metric.compute())  # synced over ranks (the logged values were computed from it)
        metric.reset()

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor | dict[str, Tensor]:
        """Outputs (B, C) for the task chosen by ``predict_task``; with ``"infer"`` a dict of the outputs of the
        inferred task per example (``output``) and that task (``task``), over the tasks trained so far."""
        if self.predict_task == "batch":
            x, _, task = self._unpack(batch)
            self._check_task_id(task)
            return self.task_outputs(x, torch.tensor([task], device=x.device))[0]
        x = self._predict_inputs(batch)
        if self.predict_task == "infer":
            seen = self.task + 1
            if seen < 1:
                raise RuntimeError("predict_task='infer' chooses among the trained tasks, but no task is trained yet")
            candidates = self.task_outputs(x, torch.arange(seen, device=x.device))  # (K, B, C), one pass
            task, _ = entropy_task_inference(candidates)
            return {"output": candidates[task, torch.arange(x.shape[0], device=x.device)], "task": task}
        return self.task_outputs(x, torch.tensor([int(self.predict_task)], device=x.device))[0]

    @staticmethod
    def _predict_inputs(batch: Any) -> Tensor:
        """The inputs of a predict batch without a task id: ``x``, ``(x, ...)`` or a dict with ``x``."""
        if isinstance(batch, Tensor):
            return batch
        if isinstance(batch, dict) and "x" in batch:
            return batch["x"]
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            return batch[0]
        raise ValueError(
            f"a predict batch is x, a tuple/list starting with x, or a dict with key 'x'; got a {type(batch).__name__}"
        )

    def cl_summary(self) -> dict[str, float]:
        """During/final means, backward transfer and forgetting of the accuracy matrix (plus inference scores)."""
        out = summarize(self.acc_matrix, self.higher_is_better)
        if self.infer_task and out.get("num_tasks", 0) > 0:
            n = int(out["num_tasks"])
            out["final_mean_inferred"] = float(self.inferred_acc_matrix[n - 1, :n].mean())
            out["task_inference_acc"] = float(self.task_inference_matrix[n - 1, :n].mean())
        return out

    # -- checkpointing ------------------------------------------------------------------------------------------
    @override
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self._task = None  # re-read from the restored current_task buffer (checkpoints and ddp_spawn alike)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
