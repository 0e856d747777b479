"""Save and plot the hyperparameter schedule of a tuning run (STN Fig. 4-style trajectories).

:class:`~hyperlit.tuning.bilevel.BilevelModule` records one row per λ-step in ``pl_module.schedule`` (constrained
value and σ — the perturbation std on the unconstrained scale — of every hyperparameter, plus the step counters). This callback

* draws the trajectories into TensorBoard (``add_figure``) after every ``every_n_epochs`` validation epochs and at
  the end of training when the logger supports figures, and
* at the end of training writes ``<log_dir>/<filename>.png`` next to the logger's files and the module's
  ``hparam_schedule.csv`` (any logger, including ``CSVLogger``, which has no image API; nothing is written without a logger).

Only rank 0 draws and writes; matplotlib is imported lazily with the object API (no pyplot state).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["HyperparameterSchedule", "plot_schedule", "schedule_columns"]

_META = {"hyper_step", "phi_step", "epoch"}


def schedule_columns(rows: Sequence[dict[str, float]]) -> list[str]:
    """Hyperparameter value columns of a schedule (σ and counter columns excluded), in first-seen order."""
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols and k not in _META and not k.startswith("sigma_")]
    return [c for c in cols if not c.endswith(("_min", "_max"))]


def plot_schedule(rows: Sequence[dict[str, float]], path: str | Path | None = None) -> Any:
    """One panel per hyperparameter: constrained value against the λ-step (in the title: σ of the last step, the
    perturbation std on the unconstrained scale).

    Returns the ``matplotlib.figure.Figure``; saves it as PNG when ``path`` is given.
    """
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("the schedule is empty: no λ-step has been taken yet")
    cols = schedule_columns(rows)
    ncol = min(4, len(cols))
    nrow = math.ceil(len(cols) / ncol)
    fig = Figure(figsize=(3.2 * ncol, 2.4 * nrow), layout="constrained")
    steps = [row.get("hyper_step", i) for i, row in enumerate(rows)]
    for k, col in enumerate(cols):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        ax.plot(steps, [row.get(col, math.nan) for row in rows], lw=1.2)
        base = col.removesuffix("_mean")
        last = rows[-1]
        keys = (
            f"sigma_unconstrained_{base}",
            f"sigma_unconstrained_{base}_mean",
            f"sigma_{base}",
            f"sigma_{base}_mean",
        )
        sigma = next((last[k] for k in keys if k in last), None)  # (sigma_<name>: schedules of older versions)
        ax.set_title(base + (f"  (σ unconstr.={sigma:.3g})" if sigma is not None else ""), fontsize=9)
        ax.set_xlabel("λ-step", fontsize=8)
        ax.tick_params(labelsize=7)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    return fig


class HyperparameterSchedule(Callback):
    """Write the λ-schedule as CSV + PNG at the end of training and plot it into TensorBoard during training.

    Args:
        filename: Base name of the CSV and PNG files in the logger's directory.
        every_n_epochs: Draw into TensorBoard every this many validation epochs (0: never).
    """

    def __init__(self, filename: str = "hparam_schedule", every_n_epochs: int = 10) -> None:
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0, got {every_n_epochs}")
        self.filename = filename
        self.every_n_epochs = every_n_epochs
        self.csv_path: Path | None = None
        self.png_path: Path | None = None

    @staticmethod
    def _rows(pl_module: pl.LightningModule) -> list[dict[str, float]]:
        return list(getattr(pl_module, "schedule", []) or [])

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.every_n_epochs == 0:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        rows = self._rows(pl_module)
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if not rows or not hasattr(experiment, "add_figure"):
            return
        try:
            fig = plot_schedule(rows)
        except ImportError:  # matplotlib is optional
            return
        experiment.add_figure("hparam_schedule", fig, global_step=trainer.current_epoch)  # type: ignore[union-attr]

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank calls it; None without a logger
        if not trainer.is_global_zero or trainer.logger is None or not log_dir:
            return
        rows = self._rows(pl_module)
        if not rows:
            return
        base = Path(log_dir) / self.filename
        # the CSV itself is written by BilevelModule.on_train_end (also without this callback), right after this hook
        self.csv_path = Path(log_dir) / "hparam_schedule.csv"
        try:
            fig = plot_schedule(rows, base.with_suffix(".png"))
        except ImportError:  # matplotlib is optional
            return
        self.png_path = base.with_suffix(".png")
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if hasattr(experiment, "add_figure"):
            experiment.add_figure("hparam_schedule", fig, global_step=trainer.current_epoch)  # type: ignore[union-attr]
