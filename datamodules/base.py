"""Conventions shared by every hyperlit DataModule.

* ``data_dir`` defaults to ``$HYPERLIT_DATA_DIR`` and falls back to ``~/.cache/hyperlit``.
* Downloads happen only in ``prepare_data`` and only with ``download=True``, through
  torchvision's downloaders (``torchvision.datasets.utils.download_url`` / ``download_and_extract_archive``, which
  check the md5).
* Missing files raise :class:`DatasetNotFoundError`, which names the files, the expected layout and the
  ``download`` option.
* Splits are seeded (``split_seed``) so every process and every run sees the same partition.
* Training streams resume exactly in the middle of an epoch: the DataModule counts the training batches handed to
  ``training_step`` (``on_after_batch_transfer``; a loader's own count would run ahead of training whenever Lightning
  prefetches) and keeps ``(epoch, consumed_batches)`` in its ``state_dict``, which Lightning writes into every
  checkpoint. After ``fit(ckpt_path=...)`` each shuffled training loader (:class:`ResumableDataLoader`: the train
  stream and the cycled hyper stream) starts that epoch at batch ``consumed_batches mod len(loader)``, so the resumed
  run sees exactly the batches of an uninterrupted one (Lightning alone would restart the epoch's order from its
  first batch and stop early, repeating some batches and never showing others).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "DataFormatError",
    "DatasetNotFoundError",
    "HyperlitDataModule",
    "ResumableDataLoader",
    "SeededRandomSampler",
    "default_data_dir",
    "seeded_split_indices",
]


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a data set's files are missing from ``data_dir``.

    The message names the missing files, the layout the DataModule expects and how to download them.
    """

    def __init__(
        self,
        dataset: str,
        root: str | Path,
        missing: Sequence[str | Path],
        layout: str,
        download_hint: str = "pass download=True (CLI: --data.download true) on a machine with internet access",
    ) -> None:
        self.dataset = dataset
        self.root = Path(root)
        self.missing = [str(m) for m in missing]
        missing_txt = "\n".join(f"  - {m}" for m in self.missing)
        message = (
            f"{dataset} not found in {self.root}.\n"
            f"Missing files:\n{missing_txt}\n"
            f"Expected layout under data_dir:\n{layout}\n"
            f"Point data_dir at the folder that holds it (CLI: --data.data_dir PATH, or set HYPERLIT_DATA_DIR), "
            f"or {download_hint}."
        )
        super().__init__(message)


class DataFormatError(ValueError):
    """Raised when a data file exists but does not have the expected format (truncated, wrong columns...)."""


def default_data_dir() -> str:
    """``$HYPERLIT_DATA_DIR`` if set, else ``~/.cache/hyperlit``."""
    env = os.environ.get("HYPERLIT_DATA_DIR")
    if env:
        return env
    return str(Path("~/.cache/hyperlit").expanduser())


def seeded_split_indices(n: int, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """Partition ``range(n)`` into consecutive chunks of a seeded permutation with the given fractions.

    The last chunk takes the rounding remainder, so the chunks always cover all ``n`` indices.
    """
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {list(fractions)}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sizes = [round(f * n) for f in fractions[:-1]]
    sizes.append(n - sum(sizes))
    return list(torch.split(perm, sizes))


class SeededRandomSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` at the start of every epoch, so a run resumed from a checkpoint sees exactly the
    batches an uninterrupted run would have seen (a plain ``RandomSampler`` draws from the global RNG instead).
    :meth:`resume` starts the next pass over a given epoch part-way (mid-epoch resume).
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, num_indices: int) -> None:
        """Start the next pass over ``epoch`` after its first ``num_indices`` indices (later passes are whole).

        ``len`` stays the full epoch's: Lightning counts the batches of the resumed epoch from it.
        """
        self._skip = (epoch, num_indices) if num_indices > 0 else None

    def __iter__(self):  # type: ignore[no-untyped-def]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=gen)
        start = 0
        if self._skip is not None and self._skip[0] <= self.epoch:
            if self._skip[0] == self.epoch:
                start = self._skip[1]
            self._skip = None  # one pass only: a cycled stream's next pass over the epoch is complete
        return iter(order[start:].tolist())

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A training-stream loader whose position Lightning saves (``state_dict``) and restores (``load_state_dict``).

    The position is its DataModule's count of consumed training batches (see the module docstring); on restore the
    loader skips ``consumed_batches mod len(self)`` batches of that epoch, which is where a stream cycled by
    ``CombinedLoader(mode="max_size_cycle")`` stood. Only its sampler's ``resume`` (:class:`SeededRandomSampler`)
    can skip: a sampler Lightning substituted (``DistributedSampler`` under DDP with ``use_distributed_sampler``)
    restarts the epoch, with a warning.
    """

    def __init__(self, *args: Any, datamodule: HyperlitDataModule | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.datamodule = datamodule

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict() if self.datamodule is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.resume(int(state_dict["epoch"]), int(state_dict["consumed_batches"]))

    def resume(self, epoch: int, consumed_batches: int) -> None:
        """Continue ``epoch`` after ``consumed_batches`` trained batches (a cycled stream: modulo its length)."""
        if epoch < 0 or consumed_batches <= 0:
            return
        num_batches = len(self)
        skip = consumed_batches % num_batches if num_batches else 0
        if skip == 0:
            return
        resume = getattr(self.sampler, "resume", None)
        if resume is None:
            rank_zero_warn(
                f"cannot resume the training loader mid-epoch with a {type(self.sampler).__name__}: epoch {epoch} "
                f"restarts from its first batch after {consumed_batches} trained batches"
            )
            return
        resume(epoch, skip * int(self.batch_size or 1))


class HyperlitDataModule(pl.LightningDataModule):
    """Base class: data location, download flag and loader settings shared by all DataModules.

    A subclass whose ``train_dataloader()`` returns ``self.with_hyper_stream(loader)`` (and sets
    ``serves_hyper_stream = True``) serves ``{"train": ..., "hyper": ...}`` batches (``CombinedLoader``,
    ``max_size_cycle``; hyper stream: ``hyper_dataloader()``, else ``val_dataloader()``) when the model being fit
    trains hyperparameters on a held-out stream (its class attribute ``uses_hyper_stream``, see
    :mod:`hyperlit.streams`), and plain batches otherwise.

    Args:
        data_dir: Folder that holds the data set's files. Defaults to ``$HYPERLIT_DATA_DIR``, else
            ``~/.cache/hyperlit``.
        download: Download missing files in ``prepare_data`` (needs internet access).
        batch_size: Training batch size (per process under DDP).
        eval_batch_size: Batch size of validation/test/predict loaders (defaults to ``batch_size``).
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory for faster host-to-GPU copies.
        split_seed: Seed of the train/validation split (identical on every rank).
    """

    #: the training loader serves the hyper stream to models with ``uses_hyper_stream`` (:mod:`hyperlit.streams`)
    #: whether ``train_dataloader()`` passes its loader through :meth:`with_hyper_stream` (the CLI wraps
    #: DataModules that do not in :class:`hyperlit.streams.HyperStreamDataModule`)
    serves_hyper_stream: ClassVar[bool] = False

    def __init__(
        self,
        data_dir: str | None = None,
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.data_dir = Path(data_dir if data_dir is not None else default_data_dir()).expanduser()
        self.download = download
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.split_seed = split_seed
        self._consumed_epoch = -1
        self._consumed = 0
        self._resume: tuple[int, int] | None = None

    # -- helpers for subclasses -------------------------------------------------------------------
    def _loader(
        self, dataset: Dataset[Any], shuffle: bool, batch_size: int | None = None, drop_last: bool = False
    ) -> DataLoader[Any]:
        """A shuffled (training-stream, mid-epoch resumable) or sequential (evaluation) loader."""
        kwargs: dict[str, Any] = dict(
            batch_size=batch_size or (self.batch_size if shuffle else self.eval_batch_size),
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
        if not shuffle:
            return DataLoader(dataset, **kwargs)
        sampler = SeededRandomSampler(len(dataset), seed=self.split_seed)  # type: ignore[arg-type]
        loader = ResumableDataLoader(dataset, sampler=sampler, datamodule=self, **kwargs)
        if self._resume is not None:
            loader.resume(*self._resume)
        return loader

    # -- the hyper stream ----------------------------------------------------------------------------
    def with_hyper_stream(self, train: Any) -> Any:
        """``train`` combined with the hyper stream when the model being fit uses one, else ``train`` itself."""
        trainer = getattr(self, "trainer", None)
        model = getattr(trainer, "lightning_module", None)
        if isinstance(train, (CombinedLoader, Mapping)) or not getattr(model, "uses_hyper_stream", False):
            return train
        hyper = getattr(self, "hyper_dataloader", None)
        stream = hyper() if hyper is not None else self.val_dataloader()
        return CombinedLoader({"train": train, "hyper": stream}, mode="max_size_cycle")

    # -- resumable position (see the module docstring) ------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            epoch = int(trainer.current_epoch)
            if epoch != self._consumed_epoch:
                self._consumed_epoch, self._consumed = epoch, 0
                if self._resume is not None and self._resume[0] == epoch:
                    self._consumed = self._resume[1]
            self._consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Training position: the epoch and how many of its batches were trained (written into checkpoints)."""
        return {"epoch": self._consumed_epoch, "consumed_batches": self._consumed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "epoch" in state_dict and "consumed_batches" in state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict["consumed_batches"]))

    def check_files(self, dataset: str, root: Path, files: Sequence[str], layout: str) -> None:
        """Raise :class:`DatasetNotFoundError` naming every file of ``files`` missing under ``root``."""
        missing = [str(root / f) for f in files if not (root / f).exists()]
        if missing:
            raise DatasetNotFoundError(dataset, root, missing, layout)
