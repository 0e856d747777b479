"""Write what ``predict_step`` returns to a file: ``hyperlit predict`` adds :class:`PredictionWriter` by default.

Whatever a module's ``predict_step`` returns is written: a tensor, a dict of tensors (nested dicts get dotted
names) or a tuple/list of tensors. Each output tensor's *example dimension* is the first dimension whose size is the
batch's number of examples (dimension 0 for most modules; a ``(R, B, C)`` output of R models, as the Pareto
baselines return, is written example-major as ``(B, R, C)``). A tensor without such a dimension (e.g. a dict's
preference ``rays``) is a per-batch value.

* ``format="pt"``: ``torch.save`` of the outputs concatenated over the batches: a tensor, or a dict of them with the
  same keys (a tuple/list output becomes the keys ``output0``, ``output1``...); a per-batch value is saved once if
  every batch returned the same one, else as a list (one entry per batch).
* ``format="csv"``: one row per example, with named columns: an ``index`` column (the example's index in the
  predict dataset, when Lightning tracks it: map-style datasets), then each output flattened,
  ``prediction`` / ``prediction_3`` / ``prediction_0_3`` for a tensor (``name``, ``name_3``... for a dict's entry
  ``name``); per-batch values are repeated on each row of their batch.

Files: ``<output_dir>/predictions.<format>`` (``output_dir`` defaults to the run's log folder, ``trainer.log_dir``).
With several predict dataloaders each gets ``predictions_dataloader<i>``. Under DDP nothing is gathered:
every rank writes its own share, ``predictions-rank<R>.<format>`` (Lightning splits the predict set over the ranks
without repeating examples); the ``index`` column (csv), or the ``predictions-rank<R>-index.pt`` file next to a
``pt`` file, puts the rows back in dataset order. Outputs are held on the CPU until the end of the epoch.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

__all__ = ["PredictionWriter"]

_FORMATS = ("csv", "pt")

#: one batch: named output tensors, the examples' dataset indices, the number of examples, a bare tensor?
_Batch = tuple[dict[str, Tensor], list[int] | None, int | None, bool]


def _batch_size(batch: Any) -> int | None:
    """The number of examples of a batch: the leading size of its first tensor."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim > 0 else None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = _batch_size(item)
            if size is not None:
                return size
    return None


def _flatten(output: Any, prefix: str, out: dict[str, Tensor]) -> None:
    """Name → tensor for a tensor, a (nested) dict or a tuple/list of tensors."""
    if isinstance(output, Tensor):
        out[prefix] = output.detach().cpu()
    elif isinstance(output, Mapping):
        for key, value in output.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(output, (list, tuple)):
        for i, value in enumerate(output):
            _flatten(value, f"{prefix}_{i}" if prefix else f"output{i}", out)
    elif isinstance(output, (bool, int, float)):
        out[prefix] = torch.as_tensor(output)
    else:
        raise TypeError(
            f"PredictionWriter writes tensors (or dicts, tuples or lists of them); predict_step returned a "
            f"{type(output).__name__}{f' for {prefix!r}' if prefix else ''}"
        )


def _example_major(tensor: Tensor, n: int | None) -> Tensor | None:
    """``tensor`` with its example dimension (the first of size ``n``) first; ``None`` for a per-batch value."""
    if n is None or tensor.ndim == 0:
        return None
    for dim, size in enumerate(tensor.shape):
        if size == n:
            return tensor.movedim(dim, 0) if dim else tensor
    return None


class PredictionWriter(BasePredictionWriter):
    """Writes every module's predictions to ``predictions.csv`` (or ``.pt``); see the module docstring.

    Args:
        output_dir: Folder of the files; ``None``: the run's log folder (``trainer.log_dir``, else
            ``default_root_dir``).
        format: ``csv`` (one row per example, named columns) or ``pt`` (``torch.save`` of the concatenated outputs).
        filename: Stem of the files.
    """

    def __init__(
        self, output_dir: str | None = None, format: Literal["csv", "pt"] = "csv", filename: str = "predictions"
    ) -> None:
        if format not in _FORMATS:
            raise ValueError(f"PredictionWriter format must be one of {list(_FORMATS)}, got {format!r}")
        if not filename or Path(filename).name != filename:
            raise ValueError(f"PredictionWriter filename must be a plain file name (a stem), got {filename!r}")
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.format = format
        self.filename = filename
        self._dir: Path | None = None
        self._batches: dict[int, list[_Batch]] = {}
        #: the files the last predict epoch wrote
        self.written: list[Path] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "predict":  # trainer.log_dir broadcasts: every rank asks here
            log_dir = trainer.log_dir if self.output_dir is None else self.output_dir
            self._dir = Path(log_dir if log_dir is not None else trainer.default_root_dir)

    @override
    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = {}

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if prediction is None:
            return
        flat: dict[str, Tensor] = {}
        _flatten(prediction, "", flat)
        indices = [int(i) for i in batch_indices] if batch_indices else None
        n = len(indices) if indices is not None else _batch_size(batch)
        batches = self._batches.setdefault(dataloader_idx, [])
        if self.format == "csv":  # fail on the first batch, not after the whole predict epoch
            layout = _csv_layout(flat, n)
            if batches and layout != _csv_layout(batches[0][0], batches[0][2]):
                raise ValueError(
                    "PredictionWriter(format='csv') needs the same output shapes in every batch, got "
                    f"{_csv_layout(batches[0][0], batches[0][2])} then {layout}; use format='pt'"
                )
        batches.append((flat, indices, n, isinstance(prediction, Tensor)))

    @override
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        self.written = []
        directory = self._dir if self._dir is not None else Path(trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        for dl_idx, batches in sorted(self._batches.items()):
            stem = self.filename
            if len(self._batches) > 1 or dl_idx > 0:
                stem += f"_dataloader{dl_idx}"
            if trainer.world_size > 1:
                stem += f"-rank{trainer.global_rank}"
            path = directory / f"{stem}.{self.format}"
            if self.format == "csv":
                self._write_csv(path, batches)
            else:
                self._write_pt(path, batches)
            self.written.append(path)
        self._batches = {}
        if self.written:
            rank_zero_info(f"predictions written to {', '.join(map(str, self.written))}")

    def _write_csv(self, path: Path, batches: list[_Batch]) -> None:
        header_written = False
        with_index = all(indices is not None for _, indices, _, _ in batches)
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            for flat, indices, n, bare in batches:
                majors = {k: _example_major(v, n) for k, v in flat.items()}
                rows = next(int(m.shape[0]) for m in majors.values() if m is not None)  # checked per batch
                columns = [
                    major.reshape(rows, -1).tolist()
                    if major is not None
                    else [value.reshape(-1).tolist()] * rows  # a per-batch value: repeated on each row
                    for value, major in zip(flat.values(), majors.values())
                ]
                if not header_written:
                    names = [("prediction" if bare else key, shape) for key, (shape, _) in _csv_layout(flat, n).items()]
                    writer.writerow((["index"] if with_index else []) + [c for s in names for c in _column_names(*s)])
                    header_written = True
                for r in range(rows):
                    row: list[Any] = [indices[r]] if with_index and indices is not None else []
                    for column in columns:
                        row.extend(column[r])
                    writer.writerow(row)

    def _write_pt(self, path: Path, batches: list[_Batch]) -> None:
        merged: dict[str, Any] = {}
        for key in batches[0][0]:
            parts = [(flat[key], n) for flat, _, n, _ in batches if key in flat]
            majors = [_example_major(t, n) for t, n in parts]
            if all(m is not None for m in majors):
                merged[key] = torch.cat(majors, dim=0)  # type: ignore[arg-type]
            elif all(t.shape == parts[0][0].shape and torch.equal(t, parts[0][0]) for t, _ in parts):
                merged[key] = parts[0][0]  # the same per-batch value in every batch: saved once
            else:
                merged[key] = [t for t, _ in parts]
        bare = batches[0][3]
        torch.save(next(iter(merged.values())) if bare else merged, path)
        indices = [i for _, idx, _, _ in batches for i in (idx or [])]
        if indices and "-rank" in path.stem:
            torch.save(torch.tensor(indices), path.with_name(f"{path.stem}-index.pt"))


def _column_names(name: str, shape: tuple[int, ...]) -> list[str]:
    """``name`` for a scalar per example, else ``name_i`` / ``name_i_j``... over the trailing dimensions."""
    if not shape:
        return [name]
    return [f"{name}_{'_'.join(map(str, idx))}" for idx in itertools.product(*(range(d) for d in shape))]


def _csv_layout(flat: dict[str, Tensor], n: int | None) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Name → (shape of one row's values, per example?) of a batch; ``ValueError`` if nothing is per example."""
    layout = {}
    for key, value in flat.items():
        major = _example_major(value, n)
        layout[key] = (tuple(major.shape[1:]), True) if major is not None else (tuple(value.shape), False)
    if not any(per_example for _, per_example in layout.values()):
        shapes = {k: tuple(v.shape) for k, v in flat.items()}
        raise ValueError(
            "PredictionWriter(format='csv') writes one row per example, but no output of predict_step has a "
            f"dimension of the batch's size ({n}): {shapes}; use format='pt'"
        )
    return layout
