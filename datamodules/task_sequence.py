"""A sequence of tasks served one after another inside **one** ``Trainer.fit`` (continual learning).

How a task sequence runs under Lightning (the design every continual DataModule and module here follows):

* **Epoch e trains task ``e // epochs_per_task``.** One epoch is ``steps_per_task`` batches (default: one pass
  over the task's training data), so ``max_epochs = num_tasks · epochs_per_task`` covers the sequence and
  Lightning's end-of-epoch validation measures every task after each task (a row of the accuracy matrix).
* Every batch is a dict ``{"x", "y", "task"}``; ``task`` is a Python ``int`` (not moved to the device, no
  host sync), so the module learns the current task from the data and switches at the first batch of a new task.
* Batches are a pure function of ``(seed, epoch, batch index)``: within a task, examples are drawn from a stream of
  seeded permutations of the task's training set (pass q of task t uses seed ``(seed, t, q)``).
* **Resuming in the middle of a task.** The DataModule counts the training batches handed to ``training_step``
  (its ``on_after_batch_transfer`` hook) and stores ``(epoch, consumed)`` in its ``state_dict``, which Lightning
  writes into every checkpoint. After ``fit(ckpt_path=...)`` the sampler of that epoch starts at the batch after
  the last one trained, so a resumed run sees exactly the batches of an uninterrupted one. (Lightning itself
  restarts a non-resumable loader from the beginning of the epoch.)
* Validation/test loaders: one loader per task (``dataloader_idx`` = task), over the task's validation split
  (or its test split when ``val_size == 0``, the papers' protocol) and test split.

The module side of this protocol (what a continual module checks at fit start and at the first step) is
documented in :mod:`hyperlit.continual.base`.

Under DDP (tested in tests/distributed/test_ddp_continual.py) the training sampler must not be replaced by
Lightning's: use ``Trainer(use_distributed_sampler=False)``; the sampler then gives each rank its slice of every
global batch. Each task's evaluation split is sharded without padding (:class:`EvalShardSampler`: rank r takes
examples r, r + W, …), so the ranks together see every example exactly once and the module's summed metrics are
those of the whole split.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from datamodules.base import HyperlitDataModule

__all__ = ["EvalShardSampler", "TaskScheduleSampler", "TaskSequenceDataModule", "TaskSequenceDataset"]

_STRIDE = 1 << 40  # encoded training index = task * _STRIDE + example index


def _identity(batch: Any) -> Any:
    return batch


class TaskSequenceDataset(Dataset[dict[str, Any]]):
    """Batched view of a :class:`TaskSequenceDataModule` split: ``__getitems__`` returns one collated batch.

    With ``task`` set, indices are example indices of that task; without, they are encoded as
    ``task * 2**40 + index`` (the training sampler's indices) and every batch must come from one task.
    """

    def __init__(self, dm: TaskSequenceDataModule, split: str, task: int | None = None) -> None:
        self.dm, self.split, self.task = dm, split, task

    def __len__(self) -> int:
        if self.task is not None:
            return self.dm.task_size(self.task, self.split)
        return sum(self.dm.task_size(t, self.split) for t in range(self.dm.num_tasks))

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.task is not None:
            task = self.task
        else:
            tasks = torch.div(idx, _STRIDE, rounding_mode="floor")
            task = int(tasks[0])
            if not bool((tasks == task).all()):
                raise ValueError(f"a training batch mixes tasks {sorted(set(tasks.tolist()))}")
            idx = idx - task * _STRIDE
        x, y = self.dm.task_batch(task, self.split, idx)
        return {"x": x, "y": y, "task": task}

    def __getitem__(self, index: int) -> dict[str, Any]:
        batch = self.__getitems__([index])
        return {"x": batch["x"][0], "y": batch["y"][0], "task": batch["task"]}


class _ScheduleLoader(DataLoader):
    """The training loader: resumable mid-epoch, with its position kept by the DataModule (see module docstring)."""

    def state_dict(self) -> dict[str, Any]:
        dm = self.dataset.dm  # type: ignore[attr-defined]
        return dm.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.sampler.resume(int(state_dict["epoch"]), int(state_dict["consumed_batches"]))  # type: ignore[attr-defined]


class TaskScheduleSampler(Sampler[int]):
    """Training indices of the task scheduled for the current epoch (set by Lightning through ``set_epoch``).

    Args:
        task_sizes: Training examples per task.
        steps_per_epoch: Batches per epoch.
        batch_size: Per-process batch size.
        epochs_per_task: Epochs spent on each task.
        seed: Seed of the example order.
        num_replicas: Processes sharing each global batch (DDP); rank ``rank`` takes its slice.
        rank: This process's rank.
    """

    def __init__(
        self,
        task_sizes: list[int],
        steps_per_epoch: int,
        batch_size: int,
        epochs_per_task: int = 1,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if any(n < 1 for n in task_sizes):
            raise ValueError(f"every task needs at least one training example, got sizes {task_sizes}")
        self.task_sizes = list(task_sizes)
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        self.epochs_per_task = epochs_per_task
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.resume_epoch = -1
        self.resume_batches = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches: int) -> None:
        """In epoch ``epoch``, skip the first ``batches`` batches (they were trained before the checkpoint)."""
        self.resume_epoch, self.resume_batches = epoch, batches

    def task_of_epoch(self, epoch: int) -> int:
        return epoch // self.epochs_per_task

    def __len__(self) -> int:
        return self.steps_per_epoch * self.batch_size

    def _permutation(self, task: int, rep: int) -> Tensor:
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + task) * 1_000_003 + rep) % (2**63 - 1))
        return torch.randperm(self.task_sizes[task], generator=gen)

    def __iter__(self):  # type: ignore[no-untyped-def]
        task = self.task_of_epoch(self.epoch)
        if task >= len(self.task_sizes):
            raise ValueError(
                f"epoch {self.epoch} is past the task sequence ({len(self.task_sizes)} tasks × "
                f"{self.epochs_per_task} epochs); set trainer.max_epochs <= {len(self.task_sizes) * self.epochs_per_task}"
            )
        n = self.task_sizes[task]
        global_batch = self.batch_size * self.num_replicas
        start_batch = self.resume_batches if self.epoch == self.resume_epoch else 0
        epoch_in_task = self.epoch % self.epochs_per_task
        first = (epoch_in_task * self.steps_per_epoch + start_batch) * global_batch
        last = (epoch_in_task + 1) * self.steps_per_epoch * global_batch
        if first >= last:
            return iter([])
        pos = torch.arange(first, last).view(-1, global_batch)
        pos = pos[:, self.rank * self.batch_size : (self.rank + 1) * self.batch_size].reshape(-1)
        reps = torch.div(pos, n, rounding_mode="floor")
        out = torch.empty_like(pos)
        for rep in reps.unique().tolist():  # one permutation per pass over the task's data
            mask = reps == rep
            out[mask] = self._permutation(task, rep)[pos[mask] - rep * n]
        return iter((out + task * _STRIDE).tolist())


class EvalShardSampler(DistributedSampler):
    """Rank ``rank`` of ``num_replicas`` takes examples ``rank, rank + W, …`` in order: no padding, no shuffling.

    Unlike ``DistributedSampler`` (which repeats examples to even out the shards), every example is evaluated
    exactly once over all ranks; shards differ by at most one example. Being a ``DistributedSampler``, Lightning
    leaves it in place whatever ``use_distributed_sampler`` says.
    """

    def __init__(self, dataset: Dataset[Any], num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class TaskSequenceDataModule(HyperlitDataModule):
    """Base class of continual-learning DataModules (see the module docstring for the schedule).

    Subclasses load their data in ``setup`` and implement :meth:`task_size` and :meth:`task_batch`.

    Args:
        num_tasks: Number of tasks in the sequence.
        steps_per_task: Training batches per epoch (``None``: one pass over the smallest task's training data).
        epochs_per_task: Epochs per task.
        eval_size: Use at most this many validation/test examples per task (``None``: all).
        **kwargs: See :class:`~datamodules.base.HyperlitDataModule`.
    """

    task_type = "classification"
    classes_per_task = 10

    def __init__(
        self,
        num_tasks: int = 5,
        steps_per_task: int | None = None,
        epochs_per_task: int = 1,
        eval_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if steps_per_task is not None and steps_per_task < 1:
            raise ValueError(f"steps_per_task must be >= 1 or None, got {steps_per_task}")
        if epochs_per_task < 1:
            raise ValueError(f"epochs_per_task must be >= 1, got {epochs_per_task}")
        if eval_size is not None and eval_size < 1:
            raise ValueError(f"eval_size must be >= 1 or None, got {eval_size}")
        self.num_tasks = num_tasks
        self.steps_per_task = steps_per_task
        self.epochs_per_task = epochs_per_task
        self.eval_size = eval_size

    # -- to implement ------------------------------------------------------------------------------
    def task_size(self, task: int, split: str) -> int:
        """Number of examples of ``task`` in ``split`` (``train``, ``val`` or ``test``)."""
        raise NotImplementedError

    def task_batch(self, task: int, split: str, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs and targets of the examples ``idx`` of ``task`` in ``split``."""
        raise NotImplementedError

    # -- schedule ------------------------------------------------------------------------------------
    @property
    def num_schedule_epochs(self) -> int:
        """Epochs of the whole sequence, ``num_tasks · epochs_per_task``."""
        return self.num_tasks * self.epochs_per_task

    def task_of_epoch(self, epoch: int) -> int:
        """The task trained in ``epoch``."""
        return epoch // self.epochs_per_task

    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise KeyError(f"unknown task id {task}; this sequence has tasks 0..{self.num_tasks - 1}")

    def _eval_split(self) -> str:
        return "val" if self.task_size(0, "val") > 0 else "test"

    # -- loaders -------------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def train_dataloader(self) -> DataLoader:
        sizes = [self.task_size(t, "train") for t in range(self.num_tasks)]
        world, rank = self._world()
        steps = self.steps_per_task or math.ceil(min(sizes) / (self.batch_size * world))
        sampler = TaskScheduleSampler(
            sizes, steps, self.batch_size, self.epochs_per_task, self.split_seed, num_replicas=world, rank=rank
        )
        if self._resume is not None:
            sampler.resume(*self._resume)
        return _ScheduleLoader(
            TaskSequenceDataset(self, "train"),
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=_identity,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        world, rank = self._world()
        loaders = []
        for t in range(self.num_tasks):
            ds: Dataset[Any] = TaskSequenceDataset(self, split, task=t)
            if self.eval_size is not None and len(ds) > self.eval_size:  # type: ignore[arg-type]
                ds = torch.utils.data.Subset(ds, range(self.eval_size))
            # under DDP each rank evaluates its shard (a split smaller than the world is evaluated whole by every
            # rank: per-task ratios of summed counts are the same, and every rank runs the same loaders)
            shard = world > 1 and len(ds) >= world  # type: ignore[arg-type]
            loaders.append(
                DataLoader(
                    ds,
                    batch_size=self.eval_batch_size,
                    sampler=EvalShardSampler(ds, world, rank) if shard else None,
                    shuffle=False,
                    collate_fn=_identity,
                    num_workers=self.num_workers,
                    pin_memory=self.pin_memory,
                    persistent_workers=self.num_workers > 0,
                )
            )
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per task over its validation split (its test split when there is none)."""
        return self._eval_loaders(self._eval_split())

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per task over its test split."""
        return self._eval_loaders("test")
